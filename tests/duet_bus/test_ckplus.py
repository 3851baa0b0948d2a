"""CK+ by path, on a tiny fake CK+ tree the test writes (no CK+ image is shipped or downloaded)."""

import numpy as np
import pytest
from PIL import Image

from duet_bus.data.ckplus import prepare_ckplus
from duet_bus.data.images import SPLITS, ImagePrepConfig
from duet_bus.errors import DataError
from duet_bus.evaluate import EvalConfig, evaluate
from duet_bus.train import TrainConfig


def write_ckplus(root, people: int = 4, videos: int = 4, frames: int = 8):
    """People S001..; each video's frames brighten towards the end; every third video unlabelled."""
    rng = np.random.default_rng(0)
    for p in range(1, people + 1):
        for v in range(1, videos + 1):
            folder = root / "cohn-kanade-images" / f"S{p:03d}" / f"{v:03d}"
            folder.mkdir(parents=True)
            emotion = 1 + (p + v) % 7
            for f in range(1, frames + 1):
                pixels = rng.integers(0, 40, (40, 30), dtype=np.uint8)
                if f > frames - 3:
                    pixels[5 * (emotion % 4): 5 * (emotion % 4) + 10, :] = 250
                Image.fromarray(pixels).save(folder / f"S{p:03d}_{v:03d}_{f:08d}.png")
            labels = root / "Emotion" / f"S{p:03d}" / f"{v:03d}"
            labels.mkdir(parents=True)
            if v % 3:
                (labels / f"S{p:03d}_{v:03d}_{frames:08d}_emotion.txt").write_text(f"   {emotion:.7e}\n")
    return root


def test_the_papers_protocol_on_a_fake_tree(tmp_path):
    root = write_ckplus(tmp_path)
    prepared = prepare_ckplus(root, ImagePrepConfig(realtime=1, image_size=32, valid=0.0, test=0.25, holdout=0.0),
                              seed=0)
    assert prepared.images.shape == (4 * 3 * 6, 1, 32, 32)  # 3 labelled videos per person, 6 frames each
    assert prepared.sessions.shape == (12, 6)
    labels = prepared.labels[prepared.sessions]
    assert (labels[:, :3] == 0).all() and (labels[:, 3:] > 0).all()  # neutral first, then the emotion
    assert (labels[:, 3:] == labels[:, 3:4]).all()
    assert sorted(set(prepared.session_device.tolist())) == [0, 1, 2, 3]  # a person is a device
    assert [SPLITS[s] for s in np.sort(prepared.session_split)] == ["train"] * 9 + ["test"] * 3
    assert prepared.classes[0] == "neutral" and len(prepared.classes) == 8


def test_what_is_wrong_with_a_ckplus_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="CK\\+ is not bundled"):
        prepare_ckplus(None, ImagePrepConfig(), 0)
    with pytest.raises(DataError, match="not a CK\\+ folder"):
        prepare_ckplus(tmp_path, ImagePrepConfig(), 0)
    root = write_ckplus(tmp_path / "ck", people=1, videos=1)
    next((root / "Emotion").rglob("*.txt")).write_text("9\n")
    with pytest.raises(DataError, match="_emotion.txt: emotion 9 is not one of 1..7"):
        prepare_ckplus(root, ImagePrepConfig(image_size=32), 0)
    png = next((root / "cohn-kanade-images").rglob("*.png"))
    png.write_bytes(b"\x89PNG garbage")
    next((root / "Emotion").rglob("*.txt")).write_text("3\n")
    with pytest.raises(DataError, match=f"{png.name}: not a readable image"):
        prepare_ckplus(root, ImagePrepConfig(image_size=32), 0)
    with pytest.raises(DataError, match="data.session_length must be 6"):
        prepare_ckplus(root, ImagePrepConfig(session_length=5), 0)


def test_evaluate_runs_on_ckplus(tmp_path):
    root = write_ckplus(tmp_path, people=4, videos=6)
    config = EvalConfig(dataset="ck+", data_path=str(root), seeds=(0,), width=0.25, methods=("base", "duet"),
                        prep=ImagePrepConfig(realtime=1, image_size=32, valid=0.2, test=0.2, holdout=0.0),
                        train=TrainConfig(epochs=1, batch_size=4))
    doc = evaluate(config, show_progress=False)
    assert doc["task"] == "image_classification" and doc["source"].startswith("CK+")
    assert 0 <= doc["methods"]["duet"]["accuracy_mean"] <= 1


def test_a_split_left_empty_is_named(tmp_path):
    from duet_bus.errors import ConfigError

    root = write_ckplus(tmp_path)
    config = EvalConfig(dataset="ck+", data_path=str(root), seeds=(0,), methods=("base",),
                        prep=ImagePrepConfig(realtime=1, image_size=32, valid=0.0), train=TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="no valid session among the 12 sessions of ck\\+"):
        evaluate(config, show_progress=False)


def test_a_ckplus_scenario_runs_every_method_through_its_shifts(tmp_path):
    """People as devices through the runner (in-process bus): the same code path as Fashion-MNIST's."""
    from duet_bus.runner import load_checkpoints, prepare_data, run_scenario
    from duet_bus.scenario import parse_scenario

    root = write_ckplus(tmp_path / "ck", people=6, videos=6)
    scenario = parse_scenario({
        "name": "ck", "seed": 0,
        "data": {"dataset": "ck+", "path": str(root), "realtime": 1, "image_size": 32, "holdout": 0.4},
        "model": {"width": 0.25, "epochs": 1, "batch_size": 4, "swa": {"generators": 2}},
        "finetune": {"steps": 2, "recent": 4},
        "devices": {"count": 6, "deadline": "20s"},
        "arrivals": {"rate_per_hour": 4},
        "shifts": [{"kind": "label_mix", "at": "20m", "fraction": 0.5},
                   {"kind": "corruption", "at": "40m", "fraction": 0.5, "type": "blur", "severity": 2}],
        "bus": {"kind": "memory"}, "window": "5m", "duration": "2h", "output": str(tmp_path / "runs" / "ck"),
        "dashboard": False,
    })
    prepared = prepare_data(scenario)
    doc, out = run_scenario(scenario, prepared, load_checkpoints(scenario, prepared))
    assert doc["run"]["finished"] and doc["run"]["sessions"] > 0 and doc["run"]["over_the_bus"]["lost"] == 0
    for method in ("base", "finetune", "duet_no_swa", "duet"):
        assert 0 <= doc["methods"][method]["accuracy_mean"] <= 1
        assert doc["methods"][method]["sessions"] == doc["run"]["sessions"]
    assert [s["kind"] for s in doc["shifts"]] == ["label_mix", "corruption"]
