import msgpack
import numpy as np
import pytest

from duet_bus import protocol, tensors
from duet_bus.protocol import ModelSpec, ProtocolError, SessionReport, SessionStart, WeightsReady


def start(**kw):
    base = dict(session_id="s1", request_id="r1", device_id="d1", model_version="m1", realtime=np.array([3, 4, 5]),
                reply_topic="duet.weights", reply_partition=2, sent_at=1.5)
    return SessionStart(**{**base, **kw})


def test_events_round_trip():
    event = start()
    back = protocol.decode(protocol.encode(event))
    assert isinstance(back, SessionStart) and back.session_id == "s1" and back.reply_partition == 2
    assert np.array_equal(back.realtime, [3, 4, 5])
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    reply = WeightsReady("s1", "r1", "d1", "m1", "duet", [(w, np.ones(3, np.float32))], 1.0, 2.0, 0.3, 7)
    back = protocol.decode(protocol.encode(reply))
    assert np.array_equal(back.layers[0][0], w) and back.batch_size == 7
    report = SessionReport("s1", "d1", "duet", "m1", np.zeros(3, np.float32), np.ones(3, np.float32), False,
                           {"round_trip_ms": 1.0}, {"upload": 10})
    assert protocol.decode(protocol.encode(report)).delay_ms == {"round_trip_ms": 1.0}


@pytest.mark.parametrize("encoding,tolerance,ratio", [("float16", 1e-2, 0.55), ("int8", 3e-2, 0.35)])
def test_reduced_precision_weights_shrink_the_payload(encoding, tolerance, ratio):
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    reply = WeightsReady("s1", "r1", "d1", "m1", "duet", [(w, np.zeros(128, np.float32))], 1.0, 2.0, 0.3, 1)
    full, small = protocol.encode(reply), protocol.encode(reply, encoding)
    assert len(small) < ratio * len(full)
    got = protocol.decode(small).layers[0][0]
    assert got.dtype == np.float32 and np.abs(got - w).max() < tolerance * np.abs(w).max()


def test_every_bad_field_is_named():
    good = msgpack.unpackb(protocol.encode(start()))
    cases = {
        "v": {**good, "v": 1},
        "type": {**good, "type": "hello"},
        "session_id": {**good, "session_id": 7},
        "reply_partition": {**good, "reply_partition": -1},
        "sent_at": {**good, "sent_at": float("nan")},
        "realtime": {**good, "realtime": {**good["realtime"], "data": b"\x00"}},
    }
    for field, body in cases.items():
        with pytest.raises(ProtocolError) as info:
            protocol.decode(msgpack.packb(body))
        assert info.value.field == field
    with pytest.raises(ProtocolError, match="message: not valid msgpack"):
        protocol.decode(b"\xc1")
    with pytest.raises(ProtocolError, match="message: .* exceed"):
        protocol.decode(b"\x00" * (protocol.MAX_MESSAGE_BYTES + 1))


def test_model_checks():
    spec = ModelSpec("m1", n_items=10, realtime_len=5, layer_shapes=((4, 3),))
    protocol.check_session_start(start(), spec)
    with pytest.raises(ProtocolError, match="realtime: item id 11"):
        protocol.check_session_start(start(realtime=np.array([11])), spec)
    with pytest.raises(ProtocolError, match="model_version"):
        protocol.check_session_start(start(model_version="other"), spec)
    reply = WeightsReady("s1", "r1", "d1", "m1", "duet", [(np.zeros((4, 2), np.float32), np.zeros(2, np.float32))],
                         1.0, 2.0, 0.3, 1)
    with pytest.raises(ProtocolError, match="layers: shapes"):
        protocol.check_weights(reply, spec)


def test_tensor_codec_rejects_lies():
    enc = tensors.encode(np.arange(6, dtype=np.int64).reshape(2, 3))
    assert np.array_equal(tensors.decode(enc, 100), np.arange(6).reshape(2, 3))
    with pytest.raises(tensors.TensorError, match="exceed"):
        tensors.decode(enc, 5)
    with pytest.raises(tensors.TensorError, match="bytes"):
        tensors.decode({**enc, "shape": [3, 3]}, 100)
    with pytest.raises(tensors.TensorError, match="dtype"):
        tensors.decode({**enc, "dtype": "object"}, 100)
