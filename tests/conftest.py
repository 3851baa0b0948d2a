"""Shared fixtures: tiny MovieLens-shaped files the tests write themselves."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

# aiokafka logs every failed connection while a test has its broker down; our own loggers say it once.
logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

from duet_bus.testing import write_udata, write_uitem


@pytest.fixture
def udata(tmp_path: Path) -> Path:
    write_uitem(tmp_path / "u.item")
    return write_udata(tmp_path / "u.data")


@pytest.fixture
def tiny(udata: Path):
    """The tiny dataset prepared with a short history and small negative counts."""
    from duet_bus.data import load_dataset, prepare
    from duet_bus.data.prep import PrepConfig

    return prepare(load_dataset("ml-100k", udata), PrepConfig(history_len=5, eval_negatives=20), seed=0)


@pytest.fixture(scope="session")
def tiny_shared(tmp_path_factory):
    """Like `tiny`, shared by every test of the session (read-only use)."""
    from duet_bus.data import load_dataset, prepare
    from duet_bus.data.prep import PrepConfig

    folder = tmp_path_factory.mktemp("data")
    write_uitem(folder / "u.item")
    path = write_udata(folder / "u.data")
    return prepare(load_dataset("ml-100k", path), PrepConfig(history_len=5, eval_negatives=20), seed=0)


@pytest.fixture(scope="session")
def duet_checkpoint_file(tiny_shared, tmp_path_factory) -> Path:
    """A small trained DUET (N_p = 3) saved to a checkpoint file."""
    from duet_bus import checkpoint
    from duet_bus.models import ModelConfig, PPGConfig
    from duet_bus.train import TrainConfig, train_model

    result = train_model(tiny_shared, ModelConfig(backbone="gru4rec", ppg=PPGConfig(n_generators=3)),
                         TrainConfig(epochs=2, batch_size=64), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "duet.pt"
    checkpoint.save(path, result.model, tiny_shared)
    return path


@pytest.fixture(scope="session")
def duet_checkpoint(duet_checkpoint_file):
    """`duet_checkpoint_file` loaded back through the checkpoint file."""
    from duet_bus import checkpoint

    return checkpoint.load(duet_checkpoint_file)


@pytest.fixture(scope="session")
def fashion_shared(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST-shaped folder of idx files (480 images), shared by the session."""
    from duet_bus.testing import write_fashion

    return write_fashion(tmp_path_factory.mktemp("fashion"), n_train=400, n_test=80)


@pytest.fixture(scope="session")
def fashion_prepared(fashion_shared):
    from duet_bus.data.images import ImagePrepConfig, load_fashion_mnist, prepare_images

    return prepare_images(load_fashion_mnist(fashion_shared), ImagePrepConfig(devices=6, max_images=0), seed=0)


@pytest.fixture(scope="session")
def vision_checkpoint(fashion_prepared, tmp_path_factory):
    """A small MobileNetV3-Small (width 0.25) DUET (N_p = 2) trained one epoch, saved and loaded back."""
    from duet_bus import checkpoint
    from duet_bus.evaluate import EvalConfig
    from duet_bus.tasks.vision import model_config, train_vision
    from duet_bus.train import TrainConfig

    config = EvalConfig(dataset="fashion-mnist", width=0.25)
    result = train_vision(fashion_prepared, model_config(config, "duet_np2", fashion_prepared),
                          TrainConfig(epochs=1, batch_size=16), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "vision.pt"
    checkpoint.save(path, result.model, fashion_prepared)
    return checkpoint.load(path)
