"""The scenario runner on camera devices: a tiny Fashion-MNIST-shaped scenario over the embedded broker."""

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from rich.console import Console

from duet_bus.dashboard import render
from duet_bus.runner import load_checkpoints, prepare_data, run_scenario
from duet_bus.scenario import load_scenario


@pytest.fixture(scope="module")
def scenario_file(fashion_shared, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision-scenario")
    doc = {
        "name": "tiny-vision", "seed": 1,
        "data": {"dataset": "fashion-mnist", "path": str(fashion_shared), "devices": 6, "max_images": 0,
                 "holdout": 0.4},
        "model": {"backbone": "mobilenetv3_small", "width": 0.25, "epochs": 1, "batch_size": 16,
                  "swa": {"generators": 2}},
        "methods": ["base", "finetune", "duet_no_swa", "duet"],
        "finetune": {"steps": 2, "recent": 8},
        "devices": {"count": 8, "network": {"4g_5": 1, "5g_100": 1}, "deadline": "20s"},
        "arrivals": {"kind": "poisson", "rate_per_hour": 3},
        "shifts": [{"kind": "label_mix", "at": "40m", "fraction": 0.5, "alpha": 0.2},
                   {"kind": "corruption", "at": "80m", "fraction": 0.5, "type": "noise", "severity": 5}],
        "cloud": {"weight_encoding": "factored"},
        "window": "5m", "duration": "2h", "output": str(folder / "runs" / "tiny"), "dashboard": False,
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(path, label, bootstrap, on_step=None, **changes):
    scenario = load_scenario(path)
    scenario = replace(scenario, output=str(Path(scenario.output).parent / label), bootstrap=bootstrap, **changes)
    prepared = prepare_data(scenario)
    return run_scenario(scenario, prepared, load_checkpoints(scenario, prepared), on_step=on_step)


def rows(out):
    with open(out / "sessions.csv") as f:
        return list(csv.DictReader(f))


def test_camera_devices_run_every_method_through_both_shifts(scenario_file, kafka_bootstrap):
    states = []
    doc, out = run(scenario_file, "first", kafka_bootstrap, on_step=states.append)
    assert doc["run"]["finished"] and doc["run"]["over_the_bus"]["lost"] == 0
    assert doc["scenario"]["task"] == "image_classification" and doc["scenario"]["primary"] == "accuracy"
    assert set(doc["methods"]) == {"base", "finetune", "duet_no_swa", "duet"}
    for m, r in doc["methods"].items():
        assert r["sessions"] == doc["run"]["sessions"] > 0
        assert 0 <= r["accuracy_mean"] <= 1 and r["logloss_mean"] > 0 and r["fallbacks"] == 0
    duet = doc["methods"]["duet"]
    assert duet["payload_bytes"]["upload_mean"] > 2 * 28 * 28 * 4  # two float32 images went up
    assert doc["run"]["cloud"]["served"] == 2 * doc["run"]["sessions"]
    table = rows(out)
    assert {"accuracy", "logloss"} <= set(table[0]) and "auc" not in table[0]
    assert all(float(r["samples"]) == 4 for r in table)  # 6 images, 2 of them real-time
    labels, corrupted = doc["shifts"]
    assert (labels["kind"], corrupted["kind"]) == ("label_mix", "corruption")
    assert labels["devices_shifted"] == corrupted["devices_shifted"] == 4
    assert set(labels["around"]["duet"]["0"]) == {"accuracy_mean", "sessions"}
    assert {p.name for p in out.glob("*.png")} == {"accuracy_around_shifts.png", "delays.png"}

    # The live dashboard speaks the task's metric.
    console = Console(record=True, width=220)
    console.print(render(states[-1]))
    screen = console.export_text()
    assert "Accuracy since corruption@80m" in screen and "AUC" not in screen
    assert f"{doc['methods']['base']['accuracy_mean']:.4f}" in screen

    # The same scenario and seed give the same sessions and the same per-session accuracy.
    again, out2 = run(scenario_file, "second", kafka_bootstrap)
    key = lambda r: (r["session_id"], r["method"])  # noqa: E731
    first, second = sorted(table, key=key), sorted(rows(out2), key=key)
    assert [key(r) for r in first] == [key(r) for r in second]
    assert [r["accuracy"] for r in first] == [r["accuracy"] for r in second]


def test_embedding_uploads_score_as_image_uploads(scenario_file, kafka_bootstrap):
    images, _ = run(scenario_file, "images", kafka_bootstrap, methods=("duet",))
    embeddings, out = run(scenario_file, "embeddings", kafka_bootstrap, methods=("duet",), upload="embeddings")
    a, b = images["methods"]["duet"], embeddings["methods"]["duet"]
    assert np.isclose(a["accuracy_mean"], b["accuracy_mean"]) and np.isclose(a["logloss_mean"], b["logloss_mean"],
                                                                              atol=1e-5)
    assert b["payload_bytes"]["upload_mean"] < a["payload_bytes"]["upload_mean"] / 2
