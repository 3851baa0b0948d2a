"""Effect of the weights' wire precision on accuracy and payload.

For each checkpoint given, generates every test session's dynamic weights,
sends them through the real wire codec as float32, float16 and int8, scores
the sessions with what the device decodes, and prints AUC and reply size per
encoding (mean and sample std over the checkpoints; train them with different
``--seed``s).

    duet train --backbone gru4rec --method duet --seed 0 --out s0.pt   # and s1, s2
    python bench/bench_precision.py s0.pt s1.pt s2.pt
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from duet_bus import checkpoint, protocol
from duet_bus.data import load_dataset, prepare
from duet_bus.metrics import auc
from duet_bus.tensors import WEIGHT_ENCODINGS
from duet_bus.train import tensors


def measure(path: str) -> dict[str, tuple[float, int]]:
    ckpt = checkpoint.load(path)
    prepared = prepare(load_dataset(ckpt.dataset), ckpt.prep, seed=0)
    sessions = prepared.eval_samples("test")
    x = tensors(sessions)
    with torch.inference_mode():
        generated = [(w.numpy(), b.numpy()) for w, b in ckpt.model.weights_for(x["realtime"], x["realtime_len"])]
    out = {}
    for encoding in WEIGHT_ENCODINGS:
        scores, sizes = [], []
        for i in range(len(sessions)):
            reply = protocol.WeightsReady(f"s{i}", "r", "d", ckpt.model_version, "duet",
                                          [(w[i], b[i]) for w, b in generated], 0.0, 0.0, 0.0, 1)
            data = protocol.encode(reply, encoding)
            sizes.append(len(data))
            layers = [(torch.from_numpy(w), torch.from_numpy(b)) for w, b in protocol.decode(data).layers]
            with torch.inference_mode():
                scores.append(ckpt.model.score(x["history"][i : i + 1], x["history_len"][i : i + 1],
                                               x["targets"][i : i + 1], layers).numpy()[0])
        out[encoding] = (auc(sessions.labels, np.stack(scores)), int(np.median(sizes)))
    return out


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit(__doc__)
    results = [measure(p) for p in paths]
    table = Table(title=f"Wire precision of the generated weights ({len(paths)} checkpoints)")
    for col in ("encoding", "AUC mean", "AUC std", "AUC - float32 AUC", "reply bytes"):
        table.add_column(col, justify="right")
    for encoding in WEIGHT_ENCODINGS:
        aucs = np.array([r[encoding][0] for r in results])
        delta = aucs - np.array([r["float32"][0] for r in results])
        table.add_row(encoding, f"{aucs.mean():.5f}", f"{aucs.std(ddof=1) if len(aucs) > 1 else 0:.5f}",
                      f"{delta.mean():+.5f}", str(results[0][encoding][1]))
    Console(width=120).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
