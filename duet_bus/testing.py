"""Pytest fixtures for Kafka integration tests against the embedded broker.

Installed as a pytest plugin (entry point ``pytest11``), so any project that
installs duet-bus can write::

    async def test_my_service(kafka_bus, kafka_topics):
        await kafka_bus.ensure_topics(kafka_topics.all())
        await kafka_bus.send(kafka_topics.sessions, b"...")

- ``kafka_broker``: one embedded Tansu broker per test session (or the
  cluster named by ``DUET_TEST_BOOTSTRAP``), stopped at the end;
- ``kafka_bootstrap``: its ``host:port``;
- ``kafka_topics``: a `Topics` with names unique to the test;
- ``kafka_bus``: a started `KafkaBus`, stopped after the test.

`write_udata` / `write_uitem` write a tiny GroupLens-style dataset with a
learnable structure, for tests that need data without the real MovieLens.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from duet_bus.broker import EmbeddedBroker
from duet_bus.bus import KafkaBus, Topics

BOOTSTRAP_ENV = "DUET_TEST_BOOTSTRAP"


@pytest.fixture(scope="session")
def kafka_broker():
    if os.environ.get(BOOTSTRAP_ENV):
        yield None
        return
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
    return os.environ.get(BOOTSTRAP_ENV) or kafka_broker.bootstrap


@pytest.fixture
def kafka_topics(request) -> Topics:
    tag = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    return Topics(sessions=f"{tag}.sessions", weights=f"{tag}.weights", reports=f"{tag}.reports",
                  deadletter=f"{tag}.deadletter")


@pytest_asyncio.fixture
async def kafka_bus(kafka_bootstrap):
    bus = KafkaBus(kafka_bootstrap)
    await bus.start()
    try:
        yield bus
    finally:
        await bus.stop()


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
