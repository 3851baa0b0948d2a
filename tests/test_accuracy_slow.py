"""Accuracy on real data (ML-100k, Fashion-MNIST): minutes of training, so behind `make test-slow` (marker `slow`).

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


@pytest.mark.slow
def test_fashion_mnist_small_what_the_readme_reports():
    """Fashion-MNIST, MobileNetV3-Small, the README's settings, seeds 0-1 (about 10 minutes).

    What the runs show (README, "The vision task"): fine-tuning on the device's labelled images beats
    base on every seed; DUET does not beat base in this training budget. The same seeds train to
    different models on different machines (base seed 0: 0.813 on one, 0.788 on another), and on the
    second DUET was 0.009 above base on seed 0 and 0.003 below on seed 1; so the band per seed is
    what both machines gave, and DUET's mean over the two seeds may not exceed base's by a point.
    A change that makes DUET win clearly (or lose more) is still seen.
    """
    from duet_bus.data.images import load_fashion_mnist

    try:
        load_fashion_mnist()
    except Exception as exc:  # noqa: BLE001 - any reason the real files are absent
        pytest.skip(f"Fashion-MNIST is not installed here ({exc}); `make fashion-mnist` extracts it")
    config = EvalConfig(dataset="fashion-mnist", backbone="mobilenetv3_small", seeds=(0, 1),
                        methods=("base", "finetune", "duet"), train=TrainConfig(epochs=6, batch_size=64, lr=2e-3,
                                                                                 patience=3))
    doc = evaluate(config, show_progress=False)
    accuracy = {m: [s["accuracy"] for s in doc["methods"][m]["per_seed"]] for m in config.methods}
    assert all(f > b for f, b in zip(accuracy["finetune"], accuracy["base"])), accuracy
    assert all(b - 0.04 < d < b + 0.02 for d, b in zip(accuracy["duet"], accuracy["base"])), accuracy
    assert sum(accuracy["duet"]) / 2 < sum(accuracy["base"]) / 2 + 0.01, accuracy
