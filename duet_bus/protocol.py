"""The events on the wire: typed dataclasses, the msgpack codec and validation.

Every event is one msgpack map with ``"v"`` (the schema version) and
``"type"``; arrays use the ``tensors`` encoding. ``docs/protocol.md``
describes every field for clients in other languages.

Decoding validates everything it can without a model (version, types, array
encodings, finite values, size limits) and raises `ProtocolError` naming the
field. What depends on the model (item-id range, weight shapes) is checked by
`check_session_start` / `check_weights` against a `ModelSpec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from duet_bus import tensors
from duet_bus.errors import DuetError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ARRAY_ELEMENTS = 1 << 20
MAX_REALTIME = 1024


class ProtocolError(DuetError):
    """An event failed validation; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelSpec:
    """What a model version accepts and produces: checked on both sides of the bus."""

    model_version: str
    n_items: int
    realtime_len: int
    layer_shapes: tuple[tuple[int, int], ...]


@dataclass
class SessionStart:
    """Device -> cloud: "here are my real-time samples, send my dynamic weights"."""

    session_id: str
    device_id: str
    model_version: str
    realtime: np.ndarray  # int64 item ids, most recent last
    reply_topic: str
    reply_partition: int
    sent_at: float  # device wall clock, unix seconds
    TYPE = "session_start"


@dataclass
class WeightsReady:
    """Cloud -> device: the dynamic-layer weights generated for one session."""

    session_id: str
    device_id: str
    model_version: str
    method: str
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W: in x out, b: out) per dynamic layer
    received_at: float  # cloud wall clock when the request was consumed
    sent_at: float  # cloud wall clock when the reply was produced
    generation_ms: float  # the batched generator forward, measured
    batch_size: int  # sessions in the cloud micro-batch
    TYPE = "weights_ready"


@dataclass
class SessionReport:
    """Device -> reports topic: what one session scored and what it cost."""

    session_id: str
    device_id: str
    method: str
    model_version: str
    scores: np.ndarray  # float32 logits of the session's candidates, positive first
    labels: np.ndarray  # float32 0/1, same length
    fallback: bool  # weights did not arrive in time: the global classifier was used
    delay_ms: dict[str, float] = field(default_factory=dict)  # measured and modelled parts, named
    payload_bytes: dict[str, int] = field(default_factory=dict)
    TYPE = "session_report"


@dataclass
class DeadLetter:
    """What failed validation, where it came from, and why."""

    reason: str
    topic: str
    partition: int
    offset: int
    original: bytes
    at: float
    TYPE = "dead_letter"


Event = SessionStart | WeightsReady | SessionReport | DeadLetter


def encode(event: Event, weight_encoding: str | None = None) -> bytes:
    """msgpack bytes of an event; ``weight_encoding`` ('float16', 'int8') shrinks weights."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": event.TYPE}
    for name, value in event.__dict__.items():
        if name == "layers":
            value = [{"w": tensors.encode(w, weight_encoding), "b": tensors.encode(b, weight_encoding)}
                     for w, b in value]
        elif isinstance(value, np.ndarray):
            value = tensors.encode(value)
        body[name] = value
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes) -> Event:
    """Parse and validate one event; raise `ProtocolError` naming the field."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError("message", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message", f"{len(data)} bytes exceed the limit of {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("message", f"not valid msgpack ({exc.__class__.__name__})") from exc
    if not isinstance(body, dict):
        raise ProtocolError("message", f"expected a map, got {type(body).__name__}")
    version = body.get("v")
    if version != SCHEMA_VERSION:
        raise ProtocolError("v", f"schema version {version!r} is not supported (expected {SCHEMA_VERSION})")
    kind = body.get("type")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError("type", f"unknown event type {kind!r} (known: {', '.join(_PARSERS)})")
    return parser(_Fields(body))


class _Fields:
    """Typed access to a decoded map; every failure names the field."""

    def __init__(self, body: dict) -> None:
        self.body = body

    def get(self, name: str, kind: type | tuple[type, ...]):
        if name not in self.body:
            raise ProtocolError(name, "missing")
        value = self.body[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ProtocolError(name, f"expected {names}, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(name, f"must be finite, got {value}")
        return value

    def text(self, name: str) -> str:
        value = self.get(name, str)
        if not value or len(value) > 256:
            raise ProtocolError(name, "must be a non-empty string of at most 256 characters")
        return value

    def count(self, name: str) -> int:
        value = self.get(name, int)
        if value < 0:
            raise ProtocolError(name, f"must be non-negative, got {value}")
        return value

    def array(self, name: str, value=None) -> np.ndarray:
        try:
            return tensors.decode(self.body.get(name) if value is None else value, MAX_ARRAY_ELEMENTS)
        except tensors.TensorError as exc:
            raise ProtocolError(name, str(exc)) from exc

    def number_map(self, name: str, kind: type) -> dict:
        value = self.get(name, dict)
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, (int, float)) or isinstance(item, bool):
                raise ProtocolError(f"{name}.{key}", f"expected a {kind.__name__}")
            if not math.isfinite(item):
                raise ProtocolError(f"{name}.{key}", f"must be finite, got {item}")
        return {k: kind(v) for k, v in value.items()}


def _session_start(f: _Fields) -> SessionStart:
    realtime = f.array("realtime")
    if realtime.ndim != 1 or not 1 <= len(realtime) <= MAX_REALTIME:
        raise ProtocolError("realtime", f"must be 1-D with 1..{MAX_REALTIME} item ids, got shape {realtime.shape}")
    if realtime.dtype != np.int64 or f.body["realtime"]["dtype"] not in ("int32", "int64"):
        raise ProtocolError("realtime", "item ids must be int32 or int64")
    return SessionStart(
        session_id=f.text("session_id"), device_id=f.text("device_id"), model_version=f.text("model_version"),
        realtime=realtime, reply_topic=f.text("reply_topic"), reply_partition=f.count("reply_partition"),
        sent_at=f.get("sent_at", float),
    )


def _weights_ready(f: _Fields) -> WeightsReady:
    raw = f.get("layers", list)
    if not raw:
        raise ProtocolError("layers", "must hold at least one layer")
    layers = []
    for n, layer in enumerate(raw):
        if not isinstance(layer, dict):
            raise ProtocolError(f"layers[{n}]", "expected a map with w and b")
        w, b = f.array(f"layers[{n}].w", layer.get("w")), f.array(f"layers[{n}].b", layer.get("b"))
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ProtocolError(f"layers[{n}]", f"w must be (in, out) and b (out,), got {w.shape} and {b.shape}")
        layers.append((w, b))
    return WeightsReady(
        session_id=f.text("session_id"), device_id=f.text("device_id"), model_version=f.text("model_version"),
        method=f.text("method"), layers=layers, received_at=f.get("received_at", float),
        sent_at=f.get("sent_at", float), generation_ms=f.get("generation_ms", float),
        batch_size=f.count("batch_size"),
    )


def _session_report(f: _Fields) -> SessionReport:
    scores, labels = f.array("scores"), f.array("labels")
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ProtocolError("scores", f"scores {scores.shape} and labels {labels.shape} must be equal 1-D shapes")
    return SessionReport(
        session_id=f.text("session_id"), device_id=f.text("device_id"), method=f.text("method"),
        model_version=f.text("model_version"), scores=scores, labels=labels, fallback=f.get("fallback", bool),
        delay_ms=f.number_map("delay_ms", float), payload_bytes=f.number_map("payload_bytes", int),
    )


def _dead_letter(f: _Fields) -> DeadLetter:
    return DeadLetter(
        reason=f.get("reason", str), topic=f.get("topic", str), partition=f.get("partition", int),
        offset=f.get("offset", int), original=f.get("original", bytes), at=f.get("at", float),
    )


_PARSERS = {
    SessionStart.TYPE: _session_start,
    WeightsReady.TYPE: _weights_ready,
    SessionReport.TYPE: _session_report,
    DeadLetter.TYPE: _dead_letter,
}


def check_session_start(event: SessionStart, spec: ModelSpec) -> None:
    """Model-dependent checks of a request (the cloud runs them before generating)."""
    if event.model_version != spec.model_version:
        raise ProtocolError("model_version", f"{event.model_version!r} is not served here (serving "
                                             f"{spec.model_version!r})")
    if len(event.realtime) > spec.realtime_len:
        raise ProtocolError("realtime", f"{len(event.realtime)} items exceed the model's {spec.realtime_len}")
    bad = (event.realtime < 1) | (event.realtime > spec.n_items)
    if bad.any():
        raise ProtocolError("realtime", f"item id {int(event.realtime[bad][0])} outside 1..{spec.n_items}")


def check_weights(event: WeightsReady, spec: ModelSpec) -> None:
    """Model-dependent checks of a reply (the device runs them before using the weights)."""
    if event.model_version != spec.model_version:
        raise ProtocolError("model_version", f"{event.model_version!r} does not fit the static layers "
                                             f"{spec.model_version!r}")
    shapes = tuple(w.shape for w, _ in event.layers)
    if shapes != spec.layer_shapes:
        raise ProtocolError("layers", f"shapes {shapes} do not match the model's {spec.layer_shapes}")
