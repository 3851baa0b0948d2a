"""The events on the wire: typed dataclasses, the msgpack codec and validation.

Every event is one msgpack map with ``"v"`` (the schema version) and
``"type"``; arrays use the ``tensors`` encoding. ``docs/protocol.md``
describes every field for clients in other languages.

Decoding validates everything it can without a model (version, types, array
encodings, finite values, size limits) and raises `ProtocolError` naming the
field; it never raises anything else, whatever the bytes (a fuzz test holds it
to that). What depends on the model (item-id range, weight shapes) is checked
by `check_session_start` / `check_weights` against a `ModelSpec`.

Version 2 added ``request_id``: a fresh random nonce per request that the
reply carries back, so a device takes only the answer to the request it sent
(never a reply left on the topic by an earlier run), and ``model_info``, the
record by which the cloud announces what it serves.

Version 3 serves both tasks: a request's ``realtime_kind`` says what its
real-time samples are (``items``: item ids; ``images``: ``(R, C, H, W)``
floats, or 8-bit pixels standing for ``code / 255``; ``embeddings``:
``(R, F)`` floats, the device's static-layer output), and a reply's
``form`` says whether each layer is the full ``(W, b)`` or the generator's
per-session factor ``(H, b)`` (``factored``; the device holds the shared
``W2``, ``b2`` with its static layers).
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np

from duet_bus import tensors
from duet_bus.errors import DuetError

SCHEMA_VERSION = 3
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_ARRAY_ELEMENTS = 1 << 20
MAX_REALTIME = 1024
REALTIME_KINDS = ("items", "images", "embeddings")
# What a device may upload as a session's real-time samples (paper Table 3): the samples as they are (item ids,
# float32 images), images as 8-bit pixels (a camera's own format: a quarter of the bytes, each pixel within
# 1/510 of the float), or (image models) the static layers' features. Item ids go as ids in every setting.
UPLOADS = ("samples", "images_uint8", "embeddings")
# How the cloud may send a session's layers, each name -> (the reply's `form`, its arrays' `tensors` encoding):
# the full (W, b) per layer in float32, float16 or int8; or the generator's per-session factor H and the bias.
REPLY_ENCODINGS = {"float32": ("full", "float32"), "float16": ("full", "float16"), "int8": ("full", "int8"),
                   "factored": ("factored", "float32"), "factored_float16": ("factored", "float16")}
FORMS = ("full", "factored")
MAX_PARTITION = (1 << 31) - 1
# What Kafka itself accepts as a topic name.
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def new_request_id() -> str:
    """A fresh nonce for one request: 128 random bits, hex."""
    return secrets.token_hex(16)


class ProtocolError(DuetError):
    """An event failed validation; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelSpec:
    """What a model version accepts and produces: checked on both sides of the bus."""

    model_version: str
    n_items: int  # item ids are 1..n_items (0 for a model that takes no items)
    realtime_len: int
    layer_shapes: tuple[tuple[int, int], ...]
    # What real-time samples the model takes, each kind with the shape of one sample.
    realtime_kinds: tuple[tuple[str, tuple[int, ...]], ...] = (("items", ()),)
    factor_hidden: int = 0  # h of the generator (the factored form's H is in x h); 0: no generator


@dataclass
class SessionStart:
    """Device -> cloud: "here are my real-time samples, send my dynamic weights"."""

    session_id: str
    request_id: str  # a fresh nonce (`new_request_id`); only the reply that carries it back answers this request
    device_id: str
    model_version: str
    realtime: np.ndarray  # int64 item ids, most recent last; or float32 images / embeddings, one per row
    reply_topic: str
    reply_partition: int
    sent_at: float  # device wall clock, unix seconds
    realtime_kind: str = "items"  # items, images or embeddings
    TYPE = "session_start"


@dataclass
class WeightsReady:
    """Cloud -> device: the dynamic-layer weights generated for one session."""

    session_id: str
    request_id: str  # copied from the request
    device_id: str
    model_version: str
    method: str
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W: in x out, b: out) per dynamic layer
    received_at: float  # cloud wall clock when the request was consumed
    sent_at: float  # cloud wall clock when the reply was produced
    generation_ms: float  # the batched generator forward, measured
    batch_size: int  # sessions in the cloud micro-batch
    form: str = "full"  # full: (W, b) per layer; factored: (H, b), W = H W2 + b2 with the device's W2, b2
    TYPE = "weights_ready"


@dataclass
class SessionReport:
    """Device -> reports topic: what one session scored and what it cost."""

    session_id: str
    device_id: str
    method: str
    model_version: str
    # Ranking: (n,) float32 logits of the session's candidates, positive first, and labels (n,) 0/1.
    # Classification: (n, classes) logits of the session's images, and labels (n,) the class ids.
    scores: np.ndarray
    labels: np.ndarray
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


@dataclass
class ModelInfo:
    """Cloud -> models topic: what a worker serves, so a client can build valid requests.

    Published by every worker when it starts, keyed by ``model_version``; a
    client reads the topic from the beginning and keeps the latest per key.
    """

    model_version: str
    method: str  # what its replies say: duet or duet_no_swa
    backbone: str
    n_items: int  # item ids are 1..n_items
    realtime_len: int  # L: at most this many real-time samples are used (the most recent)
    layer_shapes: list[list[int]]  # (in, out) of each dynamic layer, first layer first
    weight_encoding: str  # how replies come (`REPLY_ENCODINGS`): float32, float16, int8, factored, factored_float16
    sessions_topic: str  # where requests go
    reply_topics: list[str]  # the only topics a request may name as reply_topic
    at: float  # cloud wall clock
    task: str = "recommendation"  # or image_classification
    realtime_kinds: dict[str, list[int]] = field(default_factory=lambda: {"items": []})  # kind -> one sample's shape
    TYPE = "model_info"


@dataclass
class ShardRecords:
    """Runner shard -> reports topic: a part of one shard's session records (`duet run --shards`).

    The shards of a run each simulate their own devices; whoever writes the run's report collects
    every shard's parts by ``run_id`` and writes one report, as one process would. A row is a
    ``sessions.csv`` row (column -> str, number or bool); a shard's last part has ``done`` set and
    carries its ``run`` figures (maps of numbers) and its ``shifts`` (label, kind, at_s and the
    shard's shifted devices).
    """

    run_id: str
    shard: int
    shards: int
    part: int
    rows: list[dict]
    done: bool
    run: dict = field(default_factory=dict)
    shifts: list[dict] = field(default_factory=list)
    TYPE = "shard_records"


Event = SessionStart | WeightsReady | SessionReport | DeadLetter | ModelInfo | ShardRecords


def encode(event: Event, weight_encoding: str | None = None, encoded_layers: list[dict] | None = None) -> bytes:
    """msgpack bytes of an event; ``weight_encoding`` ('float16', 'int8') shrinks weights.

    ``encoded_layers``: a `WeightsReady`'s layers as `layer_rows` makes them, in place of encoding its
    arrays here (the same bytes)."""
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "type": event.TYPE}
    for name, value in event.__dict__.items():
        if name == "layers":
            value = encoded_layers if encoded_layers is not None else [
                {"w": tensors.encode(w, weight_encoding), "b": tensors.encode(b, weight_encoding)} for w, b in value]
        elif isinstance(value, np.ndarray):
            value = tensors.encode(value)
        body[name] = value
    return msgpack.packb(body, use_bin_type=True)


def layer_rows(layers: list[tuple[np.ndarray, np.ndarray]], weight_encoding: str | None = None
               ) -> Callable[[int], list[dict]]:
    """A batch's layers (each ``(W, b)`` with a leading axis, one row per reply), each array converted to the
    wire once (`tensors.Rows`); called with ``i``, reply ``i``'s encoded layers for `encode`: what `encode`
    makes of layers ``[(W[i], b[i]), ...]``, to the byte."""
    columns = [(tensors.Rows(w, weight_encoding), tensors.Rows(b, weight_encoding)) for w, b in layers]
    return lambda i: [{"w": ws[i], "b": bs[i]} for ws, bs in columns]


def decode(data: bytes) -> Event:
    """Parse and validate one event; raise `ProtocolError` naming the field."""
    return parse(unpack(data))


def unpack(data: bytes) -> dict:
    """What `decode` checks before the event's own fields (bytes, size, a msgpack map with string keys, the
    schema version, a known type): the event's map, for `parse`. A fleet routes a reply by its map's
    ``request_id`` and leaves the rest of the checks to the device it is for."""
    if data is None:
        raise ProtocolError("message", "no value (a tombstone): expected a msgpack map")
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError("message", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message", f"{len(data)} bytes exceed the limit of {MAX_MESSAGE_BYTES}")
    if not data:
        raise ProtocolError("message", "empty value: expected a msgpack map")
    body = _unpack(bytes(data))
    if not isinstance(body, dict):
        raise ProtocolError("message", f"expected a map, got {_kind(body)}")
    for key in body:
        if not isinstance(key, str):
            raise ProtocolError("message", f"map keys must be strings, got a key of type {_kind(key)}")
    version = body.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ProtocolError("v", f"schema version {_show(version)} is not supported (expected the integer "
                                 f"{SCHEMA_VERSION})")
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in _PARSERS:
        raise ProtocolError("type", f"unknown event type {_show(kind)} (known: {', '.join(_PARSERS)})")
    return body


def parse(body: dict) -> Event:
    """The event of a map that `unpack` gave, every field checked; raise `ProtocolError` naming the field."""
    return _PARSERS[body["type"]](_Fields(body))


def _unpack(data: bytes) -> Any:
    """msgpack -> Python, with a reason a client can act on when it fails."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=MAX_MESSAGE_BYTES,
                               max_str_len=MAX_MESSAGE_BYTES)
    except UnicodeDecodeError as exc:
        raise ProtocolError("message", "a msgpack str holds bytes that are not UTF-8 (binary data must be "
                                       "packed as bin)") from exc
    except msgpack.ExtraData as exc:
        if isinstance(exc.unpacked, dict):
            raise ProtocolError("message", f"{len(exc.extra)} bytes follow the msgpack map (one map per "
                                           f"message)") from exc
        raise ProtocolError("message", f"not a msgpack map: the bytes start with a msgpack {_kind(exc.unpacked)} "
                                       f"and {len(exc.extra)} more bytes follow") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # Truncated data, reserved bytes, nesting or ext types msgpack cannot turn into Python.
        raise ProtocolError("message", f"not valid msgpack ({exc.__class__.__name__}: {exc})"[:300]) from exc


def _kind(value: Any) -> str:
    return {dict: "map", list: "array", bytes: "bin", str: "str", bool: "bool", int: "int",
            float: "float", type(None): "nil"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """A value in an error message: short, and never a whole payload."""
    if isinstance(value, (dict, list, bytes)):
        kind = _kind(value)
        return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed access to a decoded map; every failure names the field."""

    def __init__(self, body: dict) -> None:
        self.body = body

    def get(self, name: str, kind: type | tuple[type, ...]):
        try:
            value = self.body[name]
        except KeyError:
            raise ProtocolError(name, "missing") from None
        if type(value) is kind and kind is not float:  # what msgpack gives for a well-formed field: done
            return value
        # A number field takes msgpack int or float: many encoders write 2.0 as an int.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names = _kind(kind()) if isinstance(kind, type) else " or ".join(_kind(k()) for k in kind)
            raise ProtocolError(name, f"expected {'a number' if kind is float else names}, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(name, f"must be finite, got {value}")
        return value

    def text(self, name: str, limit: int = 256) -> str:
        value = self.get(name, str)
        if not value or len(value) > limit:
            raise ProtocolError(name, f"must be a non-empty string of at most {limit} characters, "
                                      f"got {len(value)}")
        return value

    def topic(self, name: str) -> str:
        value = self.get(name, str)
        if not _TOPIC_NAME.match(value):
            raise ProtocolError(name, f"{_show(value)} is not a legal Kafka topic name (1-249 of a-z A-Z 0-9 . _ -)")
        return value

    def count(self, name: str, limit: int = MAX_PARTITION) -> int:
        value = self.get(name, int)
        if not 0 <= value <= limit:
            raise ProtocolError(name, f"must be in 0..{limit}, got {_show(value)}")
        return value

    def array(self, name: str, value: Any = None) -> np.ndarray:
        try:
            return tensors.decode(self.get(name, dict) if value is None else value, MAX_ARRAY_ELEMENTS)
        except tensors.TensorError as exc:
            raise ProtocolError(name, str(exc)) from exc

    def number_map(self, name: str, kind: type) -> dict:
        value = self.get(name, dict)
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(name, f"keys must be strings, got {_kind(key)}")
            if not isinstance(item, (int, float)) or isinstance(item, bool):
                raise ProtocolError(f"{name}.{key}", f"expected a number, got {_kind(item)}")
            if not math.isfinite(item):
                raise ProtocolError(f"{name}.{key}", f"must be finite, got {item}")
        return {k: kind(v) for k, v in value.items()}


def _session_start(f: _Fields) -> SessionStart:
    kind = f.get("realtime_kind", str)
    if kind not in REALTIME_KINDS:
        raise ProtocolError("realtime_kind", f"{_show(kind)} is not one of {', '.join(REALTIME_KINDS)}")
    realtime = f.array("realtime")
    dtype = f.body["realtime"]["dtype"]
    if kind == "items":
        if dtype not in ("int32", "int64"):
            raise ProtocolError("realtime", f"item ids must be int32 or int64, got {dtype}")
        if realtime.ndim != 1 or not 1 <= len(realtime) <= MAX_REALTIME:
            raise ProtocolError("realtime", f"must be 1-D with 1..{MAX_REALTIME} item ids, got shape {realtime.shape}")
    else:
        ndim = 4 if kind == "images" else 2
        if kind == "images" and dtype == "uint8":  # 8-bit pixels: code / 255, as a float image is made of them
            realtime = realtime.astype(np.float32) / 255.0
        elif dtype not in ("float32", "float16"):
            allowed = "float32, float16 or uint8" if kind == "images" else "float32 or float16"
            raise ProtocolError("realtime", f"{kind} must be {allowed}, got {dtype}")
        if realtime.ndim != ndim or not 1 <= len(realtime) <= MAX_REALTIME or 0 in realtime.shape:
            shape = "(R, C, H, W)" if kind == "images" else "(R, F)"
            raise ProtocolError("realtime", f"{kind} must be {shape} with 1..{MAX_REALTIME} samples, got shape "
                                            f"{realtime.shape}")
        if kind == "images" and (realtime.min() < 0 or realtime.max() > 1):
            raise ProtocolError("realtime", f"image pixels must be in [0, 1], got {float(realtime.min()):g}.."
                                            f"{float(realtime.max()):g}")
    return SessionStart(
        session_id=f.text("session_id"), request_id=f.text("request_id", 64), device_id=f.text("device_id"),
        model_version=f.text("model_version"), realtime=realtime, reply_topic=f.topic("reply_topic"),
        reply_partition=f.count("reply_partition"), sent_at=f.get("sent_at", float), realtime_kind=kind,
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
        for part in ("w", "b"):  # weights are numbers of a weight encoding: integers would fail in the product
            dtype = layer[part]["dtype"]
            if dtype not in tensors.WEIGHT_ENCODINGS:
                raise ProtocolError(f"layers[{n}].{part}",
                                    f"weights must be one of {', '.join(tensors.WEIGHT_ENCODINGS)}, got {dtype}")
        if w.ndim != 2 or b.ndim != 1:
            raise ProtocolError(f"layers[{n}]", f"w must be 2-D and b 1-D, got {w.shape} and {b.shape}")
        layers.append((w, b))
    form = f.get("form", str)
    if form not in FORMS:
        raise ProtocolError("form", f"{_show(form)} is not one of {', '.join(FORMS)}")
    for n, (w, b) in enumerate(layers):
        if form == "full" and b.shape != (w.shape[1],):
            raise ProtocolError(f"layers[{n}]", f"w must be (in, out) and b (out,), got {w.shape} and {b.shape}")
    return WeightsReady(
        session_id=f.text("session_id"), request_id=f.text("request_id", 64), device_id=f.text("device_id"),
        model_version=f.text("model_version"),
        method=f.text("method"), layers=layers, received_at=f.get("received_at", float),
        sent_at=f.get("sent_at", float), generation_ms=f.get("generation_ms", float),
        batch_size=f.count("batch_size"), form=form,
    )


def _session_report(f: _Fields) -> SessionReport:
    scores, labels = f.array("scores"), f.array("labels")
    if scores.ndim not in (1, 2) or labels.ndim != 1 or len(scores) != len(labels):
        raise ProtocolError("scores", f"scores {scores.shape} must be (n,) or (n, classes) and labels (n,), got "
                                      f"labels {labels.shape}")
    if scores.ndim == 2 and not ((labels >= 0) & (labels < scores.shape[1]) & (labels == np.round(labels))).all():
        raise ProtocolError("labels", f"class ids must be integers in 0..{scores.shape[1] - 1}")
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


def _model_info(f: _Fields) -> ModelInfo:
    shapes = f.get("layer_shapes", list)
    if not shapes or not all(isinstance(s, list) and len(s) == 2 and all(
            type(d) is int and d > 0 for d in s) for s in shapes):
        raise ProtocolError("layer_shapes", "must be a non-empty list of [in, out] positive integers")
    topics = f.get("reply_topics", list)
    if not topics or not all(isinstance(t, str) and _TOPIC_NAME.match(t) for t in topics):
        raise ProtocolError("reply_topics", "must be a non-empty list of topic names")
    kinds = f.get("realtime_kinds", dict)
    if not kinds or not all(k in REALTIME_KINDS and isinstance(v, list) and all(type(d) is int and d > 0 for d in v)
                            for k, v in kinds.items()):
        raise ProtocolError("realtime_kinds", f"must map some of {', '.join(REALTIME_KINDS)} to a sample shape")
    return ModelInfo(
        task=f.text("task"), realtime_kinds=kinds,
        model_version=f.text("model_version"), method=f.text("method"), backbone=f.text("backbone"),
        n_items=f.count("n_items", 1 << 62), realtime_len=f.count("realtime_len", MAX_REALTIME),
        layer_shapes=shapes, weight_encoding=f.text("weight_encoding"), sessions_topic=f.topic("sessions_topic"),
        reply_topics=topics, at=f.get("at", float),
    )


_SCALARS = (str, int, float, bool)


def _plain(name: str, value: Any, depth: int = 0) -> None:
    """``value`` holds only maps with string keys, arrays and scalars (what a shard's figures hold)."""
    if depth > 8:
        raise ProtocolError(name, "nested too deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(name, f"keys must be strings, got {_kind(key)}")
            _plain(f"{name}.{key}", item, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain(f"{name}[{i}]", item, depth + 1)
    elif value is not None and not isinstance(value, _SCALARS):
        raise ProtocolError(name, f"expected a map, array, str, number or bool, got {_kind(value)}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(name, f"must be finite, got {value}")


def _shard_records(f: _Fields) -> ShardRecords:
    shards, shard = f.count("shards"), f.count("shard")
    if not shard < shards:
        raise ProtocolError("shard", f"must be in 0..{shards - 1} (shards {shards}), got {shard}")
    rows = f.get("rows", list)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(k, str) and isinstance(v, _SCALARS)
                                                for k, v in row.items()):
            raise ProtocolError(f"rows[{i}]", "expected a map of column names to a str, number or bool")
    run, shifts = f.get("run", dict), f.get("shifts", list)
    _plain("run", run)
    _plain("shifts", shifts)
    if not all(isinstance(s, dict) for s in shifts):
        raise ProtocolError("shifts", "expected an array of maps")
    return ShardRecords(run_id=f.text("run_id"), shard=shard, shards=shards, part=f.count("part"), rows=rows,
                        done=f.get("done", bool), run=run, shifts=shifts)


_PARSERS = {
    SessionStart.TYPE: _session_start,
    WeightsReady.TYPE: _weights_ready,
    SessionReport.TYPE: _session_report,
    DeadLetter.TYPE: _dead_letter,
    ModelInfo.TYPE: _model_info,
    ShardRecords.TYPE: _shard_records,
}


def check_session_start(event: SessionStart, spec: ModelSpec) -> None:
    """Model-dependent checks of a request (the cloud runs them before generating)."""
    if event.model_version != spec.model_version:
        raise ProtocolError("model_version", f"{event.model_version!r} is not served here (serving "
                                             f"{spec.model_version!r})")
    kinds = dict(spec.realtime_kinds)
    if event.realtime_kind not in kinds:
        raise ProtocolError("realtime_kind", f"{event.realtime_kind} is not what {spec.model_version} takes "
                                             f"({', '.join(kinds)})")
    if len(event.realtime) > spec.realtime_len:
        raise ProtocolError("realtime", f"{len(event.realtime)} samples exceed the model's {spec.realtime_len}")
    if event.realtime_kind == "items":
        items = event.realtime.tolist()  # at most realtime_len ids: Python's min and max are 6x numpy's masks
        if items and (min(items) < 1 or max(items) > spec.n_items):
            bad = next(i for i in items if not 1 <= i <= spec.n_items)
            raise ProtocolError("realtime", f"item id {bad} outside 1..{spec.n_items}")
    elif tuple(event.realtime.shape[1:]) != kinds[event.realtime_kind]:
        raise ProtocolError("realtime", f"one sample of {event.realtime_kind} has shape "
                                        f"{tuple(event.realtime.shape[1:])}, the model takes "
                                        f"{kinds[event.realtime_kind]}")


def expected_shapes(spec: ModelSpec, form: str) -> tuple[tuple[int, int], ...]:
    """The ``w`` shape of each layer in a reply of this form."""
    if form == "factored":
        return tuple((i, spec.factor_hidden) for i, _ in spec.layer_shapes)
    return spec.layer_shapes


def check_weights(event: WeightsReady, spec: ModelSpec) -> None:
    """Model-dependent checks of a reply (the device runs them before using the weights)."""
    if event.model_version != spec.model_version:
        raise ProtocolError("model_version", f"{event.model_version!r} does not fit the static layers "
                                             f"{spec.model_version!r}")
    if event.form == "factored" and not spec.factor_hidden:
        raise ProtocolError("form", f"{spec.model_version} has no generator factors to combine a factored reply with")
    shapes = tuple(w.shape for w, _ in event.layers)
    expected = expected_shapes(spec, event.form)
    if shapes != expected:
        raise ProtocolError("layers", f"shapes {shapes} do not match the model's {expected} ({event.form} form)")
    biases = tuple(b.shape for _, b in event.layers)
    if biases != tuple((o,) for _, o in spec.layer_shapes):
        raise ProtocolError("layers", f"bias shapes {biases} do not match the model's outputs")
