"""Arrays <-> msgpack-ready maps: raw bytes + dtype + shape.

    {"dtype": "float32", "shape": [32, 32], "data": <bytes, little-endian, C order>}
    {"dtype": "int8", "shape": [...], "scale": 0.0123, "data": <bytes>}   # value = int8 * scale

``float32`` is the default for weights; ``float16`` halves the payload and
``int8`` (symmetric, one scale per tensor) quarters it. Decoding always gives
float32 for weights so the device code never sees the wire precision. Integer
arrays (``int32``, ``int64``) decode as int64; ``uint8`` (8-bit image pixels)
as uint8, which the receiver scales.
"""

from __future__ import annotations

import math

import numpy as np

WIRE_DTYPES = {"float32", "float16", "int8", "uint8", "int32", "int64"}
WEIGHT_ENCODINGS = ("float32", "float16", "int8")
MAX_DIMS = 8


class TensorError(ValueError):
    """An encoded array is malformed; the message says how."""


def encode(array: np.ndarray, encoding: str | None = None) -> dict:
    """Encode an array; ``encoding`` converts floats to float16 or int8 on the way."""
    array = np.asarray(array)
    out: dict = {}
    if encoding == "int8":
        out["scale"] = scale = _int8_scale(float(np.abs(array).max()) if array.size else 0.0)
        if not math.isfinite(scale):
            array = np.zeros(array.shape, np.int8)
        else:
            # |x| / scale <= 127 up to rounding, far below 127.5: rint alone keeps every value in [-127, 127]
            # (a clip changed nothing and was a third of the time; a test holds the two equal).
            array = np.rint(array / scale).astype(np.int8)  # (rint in place failed on a 0-d array's scalar)
    elif encoding is not None:
        array = array.astype(encoding, copy=False)  # float32 weights as float32: no copy (tobytes makes one)
    name = _LITTLE.get(array.dtype)
    if name is not None:  # already little-endian (any native array on x86 and ARM): bytes as they are
        data = array.tobytes()  # C order, a copy for a strided view
    else:
        name = array.dtype.name
        if name not in WIRE_DTYPES:
            raise TensorError(f"dtype {name} cannot go on the wire (allowed: {sorted(WIRE_DTYPES)})")
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    out.update(dtype=name, shape=list(array.shape), data=data)
    return out


def _int8_scale(peak: float) -> float:
    """int8's scale for an array whose largest ``|x|`` is ``peak``. NaN or infinite weights: the scale carries
    it and the codes are zeros, so a receiver refuses the array (as it refuses non-finite float32 weights)
    instead of taking whatever int8 codes NaN would cast to."""
    if not math.isfinite(peak):
        return peak
    return peak / 127.0 if peak > 0 else 1.0


class Rows:
    """A batch of arrays converted to the wire at once: ``rows[i]`` is `encode` of ``batch[i]``, to the byte.

    A cloud worker's replies are the rows of one generated batch; per array, the handful of numpy calls that
    quantizing to int8 or converting to float16 makes were most of what encoding a reply cost (32 and 20 us
    a GRU4Rec reply, against 10 us in float32). Row by row the same numbers: int8's peak is each row's
    ``max|x|`` (a float32, exactly as ``float()`` gives it), its scale `_int8_scale` of that, and the quotient
    a float32 division by the scale rounded to float32, as NumPy divides a float32 array by a Python float.
    A row's map is made when asked for, so that it lives as briefly as its message (a whole batch's maps
    made at once outlived Python's young collections: twice the full collections of a backlog drain)."""

    def __init__(self, batch: np.ndarray, encoding: str | None = None) -> None:
        batch = np.asarray(batch)
        self._encoding, self._batch, self._scales = encoding, batch, None
        self._fast = (batch.ndim > 0 and batch.size > 0 and batch.dtype == _LITTLE_FLOAT32
                      and encoding in WEIGHT_ENCODINGS + (None,))
        if not self._fast:  # anything else (another dtype or byte order, no elements): `encode` row by row
            return
        self._shape = list(batch.shape[1:])  # one list for every row's map: msgpack only reads it
        if encoding == "int8":
            self._scales = [_int8_scale(peak) for peak in np.abs(batch).reshape(len(batch), -1).max(axis=1).tolist()]
            self._finite = [math.isfinite(scale) for scale in self._scales]
            quotient = batch / np.asarray(self._scales, np.float32).reshape(-1, *[1] * (batch.ndim - 1))
            np.rint(quotient, out=quotient)
            with np.errstate(invalid="ignore"):  # a non-finite row's codes: zeros instead, as `encode` sends
                self._batch = quotient.astype(np.int8)
        elif encoding == "float16":
            self._batch = batch.astype("<f2")
        self._name = _LITTLE[self._batch.dtype]

    def __len__(self) -> int:
        return len(self._batch)

    def __getitem__(self, i: int) -> dict:
        row = self._batch[i]
        if not self._fast:
            return encode(row, self._encoding)
        if self._scales is None:  # little-endian float32 or float16: the row's bytes as they are
            return {"dtype": self._name, "shape": self._shape, "data": row.tobytes()}
        return {"scale": self._scales[i], "dtype": "int8", "shape": self._shape,
                "data": row.tobytes() if self._finite[i] else bytes(row.size)}


# The wire's dtypes in little-endian byte order, by dtype (a dict lookup: `dtype.name` costs microseconds).
_LITTLE = {np.dtype(name).newbyteorder("<"): name for name in WIRE_DTYPES}
_WIRE = {name: dtype for dtype, name in _LITTLE.items()}
_LITTLE_FLOAT32 = np.dtype("<f4")


def decode(obj: object, max_elements: int) -> np.ndarray:
    """Decode and check an encoded array; int8 and float16 come back as float32."""
    if not isinstance(obj, dict):
        raise TensorError(f"expected an encoded array (map), got {type(obj).__name__}")
    try:
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    except KeyError:
        raise TensorError(f"encoded array lacks {sorted({'dtype', 'shape', 'data'} - obj.keys())}") from None
    wire = _WIRE.get(dtype) if isinstance(dtype, str) else None
    if wire is None:
        shown = repr(dtype)[:40] if isinstance(dtype, str) else f"of type {type(dtype).__name__}"
        raise TensorError(f"dtype {shown} not allowed (allowed: {sorted(WIRE_DTYPES)})")
    if type(shape) is not list:
        raise TensorError("shape must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{len(shape)} dimensions exceed the limit of {MAX_DIMS}")
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise TensorError("shape must be a list of non-negative integers")
        # Each dimension on its own too: [0, 2**63] holds no element but no array can have it.
        if d > max_elements:
            raise TensorError(f"shape {shape} exceeds the limit of {max_elements} elements")
        count *= d
    if count > max_elements:
        raise TensorError(f"shape {shape} exceeds the limit of {max_elements} elements")
    if not isinstance(data, bytes):
        raise TensorError(f"data must be bytes, got {type(data).__name__}")
    if len(data) != count * wire.itemsize:
        raise TensorError(f"data has {len(data)} bytes, shape {shape} of {dtype} needs {count * wire.itemsize}")
    array = np.frombuffer(data, dtype=wire).reshape(shape)
    if dtype == "int8":
        scale = obj.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise TensorError(f"int8 array needs a positive finite number as scale, got {repr(scale)[:40]}")
        return array.astype(np.float32) * np.float32(scale)
    if dtype in ("float16", "float32"):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise TensorError("contains NaN or infinite values")
        return array
    if dtype == "uint8":
        return array.copy()  # not widened: the receiver makes floats of it at once
    return array.astype(np.int64)
