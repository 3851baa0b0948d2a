"""Accuracy on real ML-100k: minutes of training, so behind `make test-slow` (marker `slow`).

What these assert is what the 5-seed tables in the README show (see "Results
on ML-100k"): DUET beats base on GRU4Rec on every seed; on SASRec it is level
with base, as in the paper (+0.0002 there), so the SASRec test asserts parity
within one seed-to-seed standard deviation instead of a win that the
measurements do not support.
"""

import statistics

import pytest

from duet_bus.evaluate import EvalConfig, evaluate
from duet_bus.train import TrainConfig

SEEDS = (0, 1, 2)


def run(backbone: str) -> tuple[list[float], list[float]]:
    config = EvalConfig(backbone=backbone, seeds=SEEDS, methods=("base", "duet"), train=TrainConfig(epochs=10))
    doc = evaluate(config, show_progress=False)
    base, duet = doc["methods"]["base"], doc["methods"]["duet"]
    return [s["auc"] for s in base["per_seed"]], [s["auc"] for s in duet["per_seed"]]


@pytest.mark.slow
def test_duet_beats_base_on_ml100k_gru4rec_on_every_seed():
    base, duet = run("gru4rec")
    assert statistics.mean(duet) > statistics.mean(base), (duet, base)
    wins = sum(d > b for d, b in zip(duet, base))
    assert wins == len(SEEDS), f"DUET beat base on {wins} of {len(SEEDS)} seeds: {duet} vs {base}"


@pytest.mark.slow
def test_duet_is_level_with_base_on_ml100k_sasrec():
    base, duet = run("sasrec")
    spread = max(statistics.stdev(base), statistics.stdev(duet))
    assert statistics.mean(duet) > statistics.mean(base) - spread, (duet, base)
