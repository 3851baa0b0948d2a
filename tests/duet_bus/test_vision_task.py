"""The image-classification task: factored heads, devices and sessions, `duet evaluate` on tiny idx files."""

import json

import numpy as np
import pytest
import torch

from duet_bus.cli import main
from duet_bus.data.images import SPLITS, ImagePrepConfig, load_fashion_mnist, prepare_images
from duet_bus.errors import ConfigError
from duet_bus.evaluate import EvalConfig, evaluate
from duet_bus.models import PPGConfig
from duet_bus.models.dynamic import Factored, apply_dynamic, materialize
from duet_bus.models.ppg import PPG
from duet_bus.testing import write_fashion
from duet_bus.train import TrainConfig


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_fashion(tmp_path_factory.mktemp("fashion"), n_train=400, n_test=80)


@pytest.mark.parametrize("shape", [(4, 3, 12), (4, 12)])
def test_a_factored_layer_gives_what_its_product_gives(shape):
    torch.manual_seed(0)
    ppg = PPG(8, ((12, 16), (16, 5)), PPGConfig(n_generators=3)).eval()
    summary, x = torch.randn(4, 8), torch.randn(*shape)
    with torch.no_grad():
        factored = ppg(summary, factored=True)
        full = ppg(summary)
    assert all(isinstance(layer, Factored) for layer in factored)
    for (w, b), (fw, fb) in zip(materialize(factored), full):
        torch.testing.assert_close(w, fw)
        torch.testing.assert_close(b, fb)
    torch.testing.assert_close(apply_dynamic(x, factored), apply_dynamic(x, full), rtol=1e-5, atol=1e-5)


def test_devices_sessions_and_splits(fashion):
    config = ImagePrepConfig(devices=5, session_length=4, realtime=1, max_images=0)
    prepared = prepare_images(load_fashion_mnist(fashion), config, seed=3)
    assert prepared.images.shape[1:] == (1, 28, 28) and prepared.images.dtype == np.float32
    used = prepared.sessions.ravel()
    assert len(np.unique(used)) == len(used)  # no image in two sessions
    assert (prepared.owner[prepared.sessions] == prepared.session_device[:, None]).all()  # one device each
    for device in range(config.devices):
        splits = prepared.session_split[prepared.session_device == device]
        assert (np.diff(splits) >= 0).all()  # train, valid, test, stream in time order
    assert {SPLITS[s] for s in prepared.session_split} >= {"train", "stream"}
    again = prepare_images(load_fashion_mnist(fashion), config, seed=3)
    assert np.array_equal(again.sessions, prepared.sessions) and np.array_equal(again.images, prepared.images)
    test = prepared.split("test")[0]
    recent = prepared.recent_labelled(int(test), 6)
    assert len(recent) == 6 and (prepared.owner[recent] == prepared.session_device[test]).all()
    assert not set(recent) & set(prepared.sessions[test])


@pytest.mark.parametrize("changes, message", [
    ({"realtime": 6}, "leave none to classify"),
    ({"alpha": 0}, "data.alpha"),
    ({"valid": 0.5, "test": 0.3, "holdout": 0.3}, "must leave sessions to train on"),
    ({"devices": 0}, "data.devices"),
])
def test_bad_image_preparation_is_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        ImagePrepConfig(**changes)


def test_evaluate_reports_accuracy_for_every_method_and_the_training_curves(fashion):
    config = EvalConfig(
        dataset="fashion-mnist", data_path=str(fashion), seeds=(0, 1), width=0.25,
        methods=("base", "finetune", "duet_no_swa", "duet_np2"),
        prep=ImagePrepConfig(devices=6, max_images=0), train=TrainConfig(epochs=2, batch_size=16, lr=2e-3),
    )
    doc = evaluate(config, show_progress=False)
    assert doc["task"] == "image_classification" and doc["backbone"] == "mobilenetv3_small"
    assert doc["metrics"] == ["accuracy", "logloss"] and doc["primary"] == "accuracy"
    for name, m in doc["methods"].items():
        assert 0 <= m["accuracy_mean"] <= 1 and m["accuracy_std"] >= 0, name
        assert [r["seed"] for r in m["per_seed"]] == [0, 1]
    assert doc["methods"]["finetune"]["needs_labels"] and doc["methods"]["finetune"]["delay_ms_p50"] > 0
    assert doc["methods"]["duet_np2"]["generators"] == 2 and doc["methods"]["duet_np2"]["delay_ms_p50"] > 0
    assert not doc["methods"]["base"]["needs_labels"]
    assert set(doc["curves"]) == {"base", "duet_no_swa", "duet_np2"}  # finetune starts from base
    epochs = doc["curves"]["duet_np2"][0]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["train_accuracy"] <= 1 for e in epochs)
    assert doc["device"]["params"] > 0 and doc["device"]["flops_per_sample"] > 0
    json.dumps(doc)


def test_cli_evaluate_on_images_and_its_mistakes(fashion, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["evaluate", "--dataset", "fashion-mnist", "--data-path", str(fashion), "--seeds", "1",
                 "--epochs", "1", "--devices", "4", "--width", "0.25", "--methods", "base,duet", "--out", str(out)])
    assert code == 0
    assert "Accuracy mean" in capsys.readouterr().out
    assert set(json.loads(out.read_text())["methods"]) == {"base", "duet"}
    assert main(["report", str(out)]) == 0  # the tables again, and the training curves (Figure 3)
    assert out.with_suffix(".png").stat().st_size > 10_000
    (tmp_path / "not-results.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path / "not-results.json")]) == 2
    assert "not a results document of `duet evaluate`" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "fashion-mnist", "--backbone", "sasrec", "--data-path", str(fashion)]) == 2
    assert "not a backbone of the image_classification task" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", "fashion-mnist", "--data-path", str(tmp_path / "none")]) == 2
    assert "no Fashion-MNIST folder" in capsys.readouterr().err
