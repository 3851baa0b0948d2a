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
