"""Shared fixtures: tiny MovieLens-shaped files the tests write themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_udata(path: Path, n_users: int = 24, n_items: int = 40, per_user: int = 16, seed: int = 0) -> Path:
    """A GroupLens-style u.data where each user walks through one of 4 item clusters.

    The structure is learnable: the next item is usually the next one in the
    user's cluster, so a sequence model and a generator both have signal.
    """
    rng = np.random.default_rng(seed)
    rows = []
    cluster = n_items // 4
    for u in range(1, n_users + 1):
        c = u % 4
        start = rng.integers(0, cluster)
        t0 = 880_000_000 + int(rng.integers(0, 10_000))
        for j in range(per_user):
            if rng.random() < 0.8:
                item = 1 + c * cluster + (start + j) % cluster
            else:
                item = int(rng.integers(1, n_items + 1))
            rows.append(f"{u}\t{item}\t{int(rng.integers(1, 6))}\t{t0 + 60 * j}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_uitem(path: Path, n_items: int = 40) -> Path:
    genres = ["0"] * 19
    lines = []
    for i in range(1, n_items + 1):
        flags = list(genres)
        flags[1 + i % 4] = "1"
        lines.append(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|" + "|".join(flags))
    path.write_text("\n".join(lines) + "\n")
    return path


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
