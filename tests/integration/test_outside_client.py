"""A client that is not ours (kafka-python), written from docs/protocol.md alone, against a live cloud."""

import asyncio
import secrets
import time

import msgpack
import numpy as np
import pytest

from cloud import CloudConfig, GeneratorService


def _outside_client(bootstrap: str, topics, realtime: np.ndarray, kind: str, partition: int
                    ) -> tuple[dict, dict, list]:
    """What docs/protocol.md tells a stranger to do; runs in a thread (kafka-python blocks)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    models = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    models.assign([TopicPartition(topics.models, 0)])
    models.seek_to_beginning()
    info = msgpack.unpackb(next(iter(models)).value)
    models.close()

    replies = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=15_000)
    replies.assign([TopicPartition(topics.weights, partition)])
    replies.seek_to_end()
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    request_id = secrets.token_hex(16)
    producer.send(topics.sessions, key=b"outside-device", value=msgpack.packb({
        "v": 3, "type": "session_start", "session_id": "outside-1", "request_id": request_id,
        "device_id": "outside-device", "model_version": info["model_version"], "realtime_kind": kind,
        "realtime": {"dtype": realtime.dtype.name, "shape": list(realtime.shape),
                     "data": realtime.astype(realtime.dtype.newbyteorder("<")).tobytes()},
        "reply_topic": topics.weights, "reply_partition": partition, "sent_at": int(time.time())}))
    producer.flush(10)
    producer.close()
    reply, others = None, []
    for record in replies:  # ends after consumer_timeout_ms without records
        body = msgpack.unpackb(record.value)
        if body.get("request_id") == request_id:
            reply = body
            break
        others.append(body)
    replies.close()
    return info, reply, others


async def _ask(kafka_bus, kafka_topics, kafka_bootstrap, checkpoint, realtime, kind, encoding="float32"):
    service = GeneratorService(kafka_bus, [checkpoint], CloudConfig(topics=kafka_topics, weight_encoding=encoding))
    await service.start()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        return await asyncio.wait_for(asyncio.to_thread(
            _outside_client, kafka_bootstrap, kafka_topics, realtime, kind, 2), 60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await service.stop()


async def test_a_kafka_python_client_learns_the_model_and_gets_its_weights(kafka_bus, kafka_topics,
                                                                          duet_checkpoint, kafka_bootstrap):
    info, reply, _ = await _ask(kafka_bus, kafka_topics, kafka_bootstrap, duet_checkpoint,
                                np.array([3, 1, 4, 1, 5], np.int64), "items")
    spec = duet_checkpoint.spec
    assert info["model_version"] == spec.model_version and info["n_items"] == spec.n_items
    assert info["task"] == "recommendation" and info["realtime_kinds"] == {"items": []}
    assert reply is not None, "no reply carried the client's request_id"
    assert reply["v"] == 3 and reply["session_id"] == "outside-1" and reply["form"] == "full"
    shapes = [tuple(layer["w"]["shape"]) for layer in reply["layers"]]
    assert shapes == [tuple(s) for s in info["layer_shapes"]] == list(spec.layer_shapes)
    w = np.frombuffer(reply["layers"][0]["w"]["data"], "<f4").reshape(shapes[0])
    assert np.isfinite(w).all()


@pytest.mark.parametrize("pixels, encoding", [(np.float32, "factored"), (np.uint8, "factored_float16")])
async def test_a_kafka_python_client_uploads_images_and_gets_a_factored_head(kafka_bus, kafka_topics,
                                                                            vision_checkpoint, kafka_bootstrap,
                                                                            pixels, encoding):
    spec = vision_checkpoint.spec
    image_shape = dict(spec.realtime_kinds)["images"]
    images = np.random.default_rng(0).random((2, *image_shape), dtype=np.float32)
    if pixels is np.uint8:  # 8-bit pixels, code / 255, as docs/protocol.md says
        images = np.rint(images * 255).astype(np.uint8)
    info, reply, _ = await _ask(kafka_bus, kafka_topics, kafka_bootstrap, vision_checkpoint, images, "images",
                                encoding)
    assert info["task"] == "image_classification" and info["weight_encoding"] == encoding
    assert info["realtime_kinds"]["images"] == list(image_shape)
    assert reply is not None and reply["form"] == "factored"
    dtype = "float16" if encoding == "factored_float16" else "float32"
    assert all(layer[part]["dtype"] == dtype for layer in reply["layers"] for part in ("w", "b"))
    # The factor H of each layer is (in, h): far smaller than the (in, out) head.
    assert [tuple(layer["w"]["shape"]) for layer in reply["layers"]] == [
        (i, spec.factor_hidden) for i, _ in spec.layer_shapes]
