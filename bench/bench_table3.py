"""The paper's Table 3 on this machine: what a session uploads and downloads, and what the device computes.

For each model (MobileNetV3-Small/-Large on 28x28 grey Fashion-MNIST images and
on 224x224 RGB CK+-sized images; GRU4Rec and DIN on ML-100k-sized catalogues),
untrained, DUET with N_p = 5, it encodes real protocol messages and prints:

- upload: the session-start record with the raw real-time samples (images as
  float32 / item ids), for images also as 8-bit pixels (`devices.upload:
  images_uint8`, the paper's raw upload) and as their embeddings (the device's
  static-layer features; the device computes them first);
- download: the weights-ready record in each weight encoding: the full head
  as float32 / float16 / int8, and the factored form (the per-session factor
  H and the bias, float32 / float16; W2 and b2 are shipped once with the static
  layers);
- the modelled transfer time of each on the paper's four links (bytes /
  bandwidth; no latency);
- device compute: applying the full head vs the factored form to a session's
  samples (best of 20), and the largest logit difference between the two
  (float rounding only: the algebra is the same).

Bytes are exact (they do not depend on training); times are this machine's.
Run: `python bench/bench_table3.py`.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench_vision import best_ms  # noqa: E402  (bench/ is the script's folder)
from duet_bus import protocol
from duet_bus.models import ModelConfig, PPGConfig, build_model
from duet_bus.models.dynamic import apply_dynamic, materialize
from duet_bus.models.mobilenetv3 import MobileNetConfig
from duet_bus.models.vision import VisionConfig, VisionModel
from duet_bus.protocol import SessionStart, WeightsReady
from duet_bus.scenario import TABLE3_PROFILES

PPG = PPGConfig(n_generators=5)


def request_bytes(realtime: np.ndarray, kind: str) -> int:
    return len(protocol.encode(SessionStart("s" * 24, "r" * 32, "d" * 12, "m" * 30, realtime, "duet.weights", 0,
                                            1.0, kind)))


def reply_bytes(layers, form: str, encoding: str | None) -> int:
    event = WeightsReady("s" * 24, "r" * 32, "d" * 12, "m" * 30, "duet", layers, 1.0, 2.0, 1.0, 1, form)
    return len(protocol.encode(event, encoding))


def vision_case(variant: str, channels: int, size: int, small_input: bool):
    model = VisionModel(VisionConfig(MobileNetConfig(variant, in_channels=channels, small_input=small_input), 10,
                                     PPG, image_size=(size, size))).eval()
    realtime = torch.rand(1, 1, channels, size, size)
    images = torch.rand(1, 4, channels, size, size)
    with torch.inference_mode():
        features = model.embed(images)
        embedding = model.embed(realtime[0]).numpy()
        factored = model.weights_for(realtime, torch.tensor([1]), factored=True)
    pixels, kind = model.upload(realtime[0].numpy(), "images_uint8")
    uploads = {"raw": request_bytes(realtime[0].numpy(), "images"), "uint8": request_bytes(pixels, kind),
               "embedding": request_bytes(embedding, "embeddings")}
    name = f"{variant.removeprefix('mobilenetv3_').capitalize()} {channels}x{size}x{size}"
    return name, model, features, factored, uploads


def rec_case(backbone: str):
    model = build_model(ModelConfig(backbone=backbone, ppg=PPG), n_items=1682, history_len=10).eval()
    items = torch.randint(1, 1683, (1, 10))
    targets = torch.randint(1, 1683, (1, 101))
    with torch.inference_mode():
        features = model.backbone.features(items, torch.tensor([10]), targets)
        factored = model.weights_for(items, torch.tensor([10]), factored=True)
    return f"{backbone} (ML-100k)", model, features, factored, {"raw": request_bytes(items[0].numpy(), "items")}


def main() -> None:
    torch.manual_seed(0)
    cases = [vision_case("mobilenetv3_small", 1, 28, False), vision_case("mobilenetv3_large", 1, 28, False),
             vision_case("mobilenetv3_small", 3, 224, False), vision_case("mobilenetv3_large", 3, 224, False),
             rec_case("gru4rec"), rec_case("din")]
    sizes = Table(title="Bytes per session on the wire (protocol v3 records, msgpack framing included) and modelled "
                        "transfer time on the paper's links (bytes / bandwidth)")
    for col in ("model", "upload raw", "raw uint8", "upload embedding", "download fp32", "fp16", "int8", "factored",
                "factored fp16",
                *(f"{p} fp32 / factored" for p in TABLE3_PROFILES)):
        sizes.add_column(col, justify="right")
    compute = Table(title="Device compute of one session's head, this machine (best of 20): full product vs factored")
    for col in ("model", "full (W given)", "factored", "ratio", "max |logit difference|"):
        compute.add_column(col, justify="right")
    for name, model, features, factored, uploads in cases:
        with torch.inference_mode():
            full = materialize(factored)
            down = {enc: reply_bytes([(w[0].numpy(), b[0].numpy()) for w, b in full], "full", enc)
                    for enc in ("float32", "float16", "int8")}
            factor = [(f.h[0].numpy(), f.b[0].numpy()) for f in factored]
            down["factored"], down["factored16"] = (reply_bytes(factor, "factored", e) for e in ("float32", "float16"))
            full_ms = best_ms(lambda: apply_dynamic(features, full), 20)
            factored_ms = best_ms(lambda: apply_dynamic(features, factored), 20)
            diff = float((apply_dynamic(features, full) - apply_dynamic(features, factored)).abs().max())
        times = [f"{p.transfer_ms(down['float32']):.1f} / {p.transfer_ms(down['factored']):.2f} ms"
                 for p in TABLE3_PROFILES.values()]
        up = [_kb(uploads[k]) if k in uploads else "-" for k in ("raw", "uint8", "embedding")]
        sizes.add_row(name, *up, *(_kb(down[e]) for e in ("float32", "float16", "int8", "factored", "factored16")),
                      *times)
        compute.add_row(name, f"{full_ms:.3f} ms", f"{factored_ms:.3f} ms", f"{factored_ms / full_ms:.2f}x",
                        f"{diff:.1e}")
    console = Console(width=220)
    console.print(sizes)
    console.print(compute)


def _kb(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.2f} kB"


if __name__ == "__main__":
    main()
