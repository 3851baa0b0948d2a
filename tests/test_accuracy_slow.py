"""Accuracy on real ML-100k: minutes of training, so behind `make test-slow` (marker `slow`)."""

import pytest

from duet_bus.evaluate import EvalConfig, evaluate
from duet_bus.train import TrainConfig


@pytest.mark.slow
def test_duet_beats_base_on_ml100k_sasrec_over_three_seeds():
    config = EvalConfig(backbone="sasrec", seeds=(0, 1, 2), methods=("base", "duet"), train=TrainConfig(epochs=10))
    doc = evaluate(config, show_progress=False)
    base, duet = doc["methods"]["base"], doc["methods"]["duet"]
    assert duet["auc_mean"] > base["auc_mean"], (duet["auc_mean"], base["auc_mean"])
    wins = sum(d["auc"] > b["auc"] for d, b in zip(duet["per_seed"], base["per_seed"]))
    assert wins >= 2, f"DUET beat base on {wins} of 3 seeds"
