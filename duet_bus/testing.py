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
learnable structure, for tests that need data without the real MovieLens;
`write_fashion` writes the four idx files of a tiny Fashion-MNIST-shaped set
(each class a bright square at its own place, so it can be learnt).
`hostile_records` makes malformed session-start records of many kinds (for
fuzzing a cloud worker: every one must end answered or dead-lettered).
"""

from __future__ import annotations

import gzip
import os
import uuid
from pathlib import Path
from typing import Iterator

import msgpack
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
                  deadletter=f"{tag}.deadletter", models=f"{tag}.models")


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


# -- hostile input -----------------------------------------------------------------------------------

# Values of every msgpack kind, including the ones that broke the worker once:
# maps and lists where a str is expected (unhashable), huge and negative ints.
_ODD_VALUES = [None, True, False, 0, -1, 2**63 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 300,
               "duet.weights", "peer.replies", "bad topic/name", b"", b"\xff" * 8, [], [1, 2], {}, {"a": 1},
               {1: 2}, [[[]]], "session_start", 2, 1.0]


def valid_session_start(model_version: str, reply_topic: str, n_items: int, realtime_len: int,
                        rng: np.random.Generator, image_shape: tuple[int, ...] | None = None) -> dict:
    """A well-formed session_start body (as a dict, before msgpack): item ids, or images of ``image_shape``."""
    from duet_bus import protocol

    count = int(rng.integers(1, realtime_len + 1))
    if image_shape is None:
        items = rng.integers(1, n_items + 1, size=count, dtype=np.int64)
        kind, realtime = "items", {"dtype": "int64", "shape": [len(items)], "data": items.tobytes()}
    else:
        images = rng.random((count, *image_shape), dtype=np.float32)
        kind, realtime = "images", {"dtype": "float32", "shape": list(images.shape), "data": images.tobytes()}
    return {"v": protocol.SCHEMA_VERSION, "type": "session_start", "session_id": f"fuzz-{rng.integers(1 << 62)}",
            "request_id": protocol.new_request_id(), "device_id": f"fuzz-device-{rng.integers(100)}",
            "model_version": model_version, "realtime_kind": kind, "realtime": realtime,
            "reply_topic": reply_topic, "reply_partition": 0, "sent_at": 1.0}


def _float_lie(body: dict, rng: np.random.Generator) -> None:
    """Make a request's real-time samples lie about floats: NaN/inf pixels, wrong dtype, shape or kind."""
    array = body["realtime"]
    shape = array["shape"] if array["dtype"] == "float32" else [1, 1, 4, 4]
    count = int(np.prod(shape))
    lie = int(rng.integers(6))
    if lie == 0:
        data = np.full(count, [np.nan, np.inf, -np.inf][int(rng.integers(3))], np.float32)
        body["realtime"] = {"dtype": "float32", "shape": shape, "data": data.tobytes()}
    elif lie == 1:
        body["realtime"] = {"dtype": "float64", "shape": shape, "data": b"\0" * 8 * count}
    elif lie == 2:
        body["realtime"] = {"dtype": "float32", "shape": [*shape[:-1], shape[-1] + 1],
                            "data": b"\0" * 4 * (count // shape[-1]) * (shape[-1] + 1)}
    elif lie == 3:
        body["realtime_kind"] = ["embeddings", "items", "images", "pixels"][int(rng.integers(4))]
    elif lie == 4:
        body["realtime"] = {"dtype": "float16", "shape": [0, *shape[1:]], "data": b""}
    else:
        body["realtime"] = {"dtype": "float32", "shape": [2000, 1], "data": b"\0" * 8000}


def hostile_records(n: int, seed: int, model_version: str, reply_topic: str, n_items: int,
                    realtime_len: int, image_shape: tuple[int, ...] | None = None) -> Iterator[bytes | None]:
    """``n`` records for a sessions topic, seeded: mostly broken, some valid.

    Kinds: random bytes, truncated and bit-flipped valid messages, a field
    removed or replaced by a value of another msgpack kind (top level and
    inside the array map), lying array headers (shape vs bytes, 65
    dimensions, ``[0, 2**63]``), float samples that lie (NaN and infinite
    pixels, float64, a sample shape the model does not take, a wrong
    ``realtime_kind``, no samples, too many), reply topics and partitions the
    cloud must refuse, tombstones (None), and intact valid requests (item ids,
    or images of ``image_shape`` for an image model).
    """
    rng = np.random.default_rng(seed)
    for _ in range(n):
        body = valid_session_start(model_version, reply_topic, n_items, realtime_len, rng, image_shape)
        kind = int(rng.integers(11))
        if kind == 0:
            yield rng.bytes(int(rng.integers(0, 200)))
            continue
        if kind == 1:
            data = bytearray(msgpack.packb(body))
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
            yield bytes(data)
            continue
        if kind == 2:
            data = msgpack.packb(body)
            yield data[: int(rng.integers(0, len(data)))]
            continue
        if kind == 3:
            yield None
            continue
        if kind == 4:
            del body[list(body)[int(rng.integers(len(body)))]]
        elif kind == 5:
            body[list(body)[int(rng.integers(len(body)))]] = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
        elif kind == 6:
            array = body["realtime"]
            key = ["dtype", "shape", "data", "scale"][int(rng.integers(4))]
            array[key] = _ODD_VALUES[int(rng.integers(len(_ODD_VALUES)))]
        elif kind == 7:
            array = body["realtime"]
            array["shape"] = [[1] * 65, [0, 2**63], [2**31, 2**31], [len(array["data"])], [-1]][int(rng.integers(5))]
        elif kind == 8:
            body["reply_topic"], body["reply_partition"] = [
                ("peer.replies", 0), ("bad topic/name", 0), (reply_topic, 1 << 20), (reply_topic, -3),
                ("x" * 250, 0)][int(rng.integers(5))]
        elif kind == 9:
            _float_lie(body, rng)
        # kind 10: valid as made
        yield msgpack.packb(body, use_bin_type=True)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """One idx file (uint8 or big-endian int32 arrays), gzipped or not."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    data = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_fashion(folder: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> Path:
    """Tiny Fashion-MNIST-shaped idx files: 28x28 noise with a bright 6x6 square where the class says."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 4)
            images[i, 2 + 7 * row: 8 + 7 * row, 2 + 6 * col: 8 + 6 * col] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress=False)
    return folder
