"""Vision model cost on this machine (groundwork for the vision task).

For MobileNetV3-Large and -Small on 28x28 grey images (stem stride 1 and 2),
untrained, 10 classes, DUET N_p = 5, prints:

- device side: static-layer parameters and FLOPs per image, the head's size;
- one training step (forward + backward, 64 sessions of 6 images) of the base
  model and of DUET (the generated head kept factored, as training does),
  and their ratio;
- the cloud's head generation per session at 1 and 64 sessions in a batch,
  against the device's base forward of one session (5 images), and the
  bytes of the generated heads of one 64-session chunk.

Ratios against the base forward measured in the same run are what to compare.
Run: `python bench/bench_vision.py`.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from duet_bus.models import PPGConfig
from duet_bus.models.mobilenetv3 import MobileNetConfig
from duet_bus.models.dynamic import layer_bytes
from duet_bus.models.vision import VisionConfig, VisionModel


def best_ms(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    table = Table(title="MobileNetV3 on 28x28 Fashion-MNIST-sized images, this machine (ms, best of 5)")
    for col in ("backbone", "stem", "static params", "FLOPs / image", "head fp32", "train step base",
                "train step DUET (ratio)",
                "base forward, 1 session", "generation / session, batch 1", "same, batch 64", "heads of 64"):
        table.add_column(col, justify="right")
    for variant in ("mobilenetv3_small", "mobilenetv3_large"):
        for small_input in (False, True):
            backbone = MobileNetConfig(variant, in_channels=1, small_input=small_input)
            base = VisionModel(VisionConfig(backbone, 10))
            duet = VisionModel(VisionConfig(backbone, 10, PPGConfig(n_generators=5)))
            static = sum(p.numel() for p in base.backbone.parameters())
            counter = FlopCounterMode(display=False)
            base.eval()
            with counter:
                base.embed(torch.rand(1, 1, 28, 28))
            flops = counter.get_total_flops()
            batch = torch.rand(64, 6, 1, 28, 28)
            labels = torch.randint(0, 10, (64, 6))
            steps = []
            for model in (base, duet):
                model.train()
                optimiser = torch.optim.Adam(model.parameters())

                def step() -> None:
                    optimiser.zero_grad()
                    logits = model(batch, 2)
                    torch.nn.functional.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1)).backward()
                    optimiser.step()

                steps.append(best_ms(step, 3))
            train_ms = steps[0]
            base.eval()
            duet.eval()
            session = torch.rand(1, 5, 1, 28, 28)
            with torch.inference_mode():
                forward_ms = best_ms(lambda: base.score(session, base.weights_for(None, None)))
                one = best_ms(lambda: duet.weights_for(torch.rand(1, 1, 1, 28, 28), torch.tensor([1])))
                many = best_ms(lambda: duet.weights_for(torch.rand(64, 1, 1, 28, 28), torch.ones(64, dtype=torch.long)),
                               3) / 64
            size = layer_bytes(duet.dynamic_shapes)
            table.add_row(variant.removeprefix("mobilenetv3_"), "1" if small_input else "2", f"{static / 1e6:.2f} M",
                          f"{flops / 1e6:.1f} M", f"{size / 1e6:.2f} MB", f"{train_ms:.0f}",
                          f"{steps[1]:.0f} ({steps[1] / train_ms:.2f}x)", f"{forward_ms:.2f}",
                          f"{one:.2f} ({one / forward_ms:.2f}x)", f"{many:.2f} ({many / forward_ms:.2f}x)",
                          f"{64 * size / 1e6:.0f} MB")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
