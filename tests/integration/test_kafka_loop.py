"""The device-cloud loop on the real embedded broker."""

import asyncio
import time

import msgpack
import numpy as np
import pytest

from cloud import CloudConfig, GeneratorService
from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus import protocol
from duet_bus.data.streams import offline_test_sessions
from duet_bus.metrics import auc
from duet_bus.train import predict


async def running(service):
    await service.start()
    stop = asyncio.Event()
    return stop, asyncio.create_task(service.run(stop))


async def shutdown(service, stop, task):
    stop.set()
    await asyncio.wait_for(task, 10)
    await service.stop()


async def test_fleet_and_cloud_reproduce_the_offline_auc(kafka_bus, kafka_topics, duet_checkpoint, tiny_shared):
    service = GeneratorService(kafka_bus, [duet_checkpoint], CloudConfig(topics=kafka_topics, max_wait_ms=20))
    stop, task = await running(service)
    fleet = Fleet(kafka_bus, FleetConfig(topics=kafka_topics, deadline_s=20))
    await fleet.start()
    try:
        sessions = offline_test_sessions(tiny_shared)
        agents = {s.device_id: DeviceAgent(s.device_id, duet_checkpoint, fleet) for s in sessions}
        reports = await asyncio.wait_for(
            asyncio.gather(*(fleet.run(agents[s.device_id], s) for s in sessions)), 60)
    finally:
        await fleet.stop()
        await shutdown(service, stop, task)

    assert not any(r.fallback for r in reports)
    assert service.stats.served == len(sessions) and max(service.stats.batch_sizes) > 1
    online = np.stack([r.scores for r in reports])
    offline = predict(duet_checkpoint.model, tiny_shared.eval_samples("test"))
    np.testing.assert_allclose(online, offline, atol=1e-5)
    labels = np.stack([r.labels for r in reports])
    assert auc(labels, online) == pytest.approx(auc(labels, offline), abs=1e-9)
    for r in reports:
        assert r.delay_ms["round_trip_ms"] >= r.delay_ms["cloud_ms"] >= r.delay_ms["generation_ms"] > 0
        assert r.payload_bytes["upload"] > 0 and r.payload_bytes["download"] > 0


async def test_two_workers_share_the_load(kafka_bootstrap, kafka_bus, kafka_topics, duet_checkpoint, tiny_shared):
    config = CloudConfig(topics=kafka_topics, group_id=f"{kafka_topics.sessions}-group", max_wait_ms=5)
    first = GeneratorService(kafka_bus, [duet_checkpoint], config)
    second = GeneratorService(kafka_bus, [duet_checkpoint], config)
    a, b = await running(first), await running(second)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait for the group to settle on both members
        if first.consumer.assignment() and second.consumer.assignment():
            break
        await asyncio.sleep(0.2)
    assert first.consumer.assignment() and second.consumer.assignment(), "the second worker got no partition"
    assert not first.consumer.assignment() & second.consumer.assignment()
    fleet = Fleet(kafka_bus, FleetConfig(topics=kafka_topics, deadline_s=20))
    await fleet.start()
    try:
        sessions = offline_test_sessions(tiny_shared)
        agents = [DeviceAgent(s.device_id, duet_checkpoint, fleet) for s in sessions]
        reports = await asyncio.wait_for(asyncio.gather(*(fleet.run(g, s) for g, s in zip(agents, sessions))), 60)
    finally:
        await fleet.stop()
        await shutdown(first, *a)
        await shutdown(second, *b)
    assert not any(r.fallback for r in reports)
    assert first.stats.served > 0 and second.stats.served > 0
    assert first.stats.served + second.stats.served == len(sessions)


async def test_bad_events_go_to_the_dead_letter_topic_and_service_goes_on(
        kafka_bus, kafka_topics, duet_checkpoint, tiny_shared):
    service = GeneratorService(kafka_bus, [duet_checkpoint], CloudConfig(topics=kafka_topics))
    stop, task = await running(service)
    good = offline_test_sessions(tiny_shared)[0]
    base = {"v": protocol.SCHEMA_VERSION, "type": "session_start", "session_id": "s", "request_id": "r",
            "device_id": "d", "realtime_kind": "items",
            "model_version": duet_checkpoint.model_version, "reply_topic": kafka_topics.weights,
            "reply_partition": 0, "sent_at": 1.0}
    nan = np.array([1.0, np.nan], np.float32)
    bad = {
        "garbage": b"\x00\xffnot msgpack",
        "version": msgpack.packb({**base, "v": 99, "realtime": {"dtype": "int64", "shape": [1],
                                                                 "data": np.int64(3).tobytes()}}),
        "nan": msgpack.packb({**base, "realtime": {"dtype": "float32", "shape": [2], "data": nan.tobytes()}}),
        "unknown item": msgpack.packb({**base, "realtime": {"dtype": "int64", "shape": [1],
                                                              "data": np.int64(10**6).tobytes()}}),
    }
    letters_consumer = kafka_bus.group_consumer([kafka_topics.deadletter], f"{kafka_topics.deadletter}-reader")
    await letters_consumer.start()
    fleet = Fleet(kafka_bus, FleetConfig(topics=kafka_topics, deadline_s=20))
    await fleet.start()
    try:
        for value in bad.values():
            await kafka_bus.send(kafka_topics.sessions, value)
        report = await fleet.run(DeviceAgent(good.device_id, duet_checkpoint, fleet), good)
        letters = []
        deadline = time.monotonic() + 30
        while len(letters) < len(bad) and time.monotonic() < deadline:
            letters += [protocol.decode(r.value) for r in await letters_consumer.getmany(500, 100)]
    finally:
        await letters_consumer.stop()
        await fleet.stop()
        await shutdown(service, stop, task)
    assert not report.fallback  # the good session was served after the bad ones
    reasons = sorted(letter.reason for letter in letters)
    assert len(reasons) == 4 and service.stats.dead_letters == 4
    assert any(r.startswith("message: not a msgpack map") for r in reasons)
    assert any(r.startswith("v: schema version 99") for r in reasons)
    assert any(r.startswith("realtime:") and "NaN" in r for r in reasons)
    assert any(r.startswith("realtime: item id 1000000") for r in reasons)
    assert {letter.original for letter in letters} == set(bad.values())
    assert all(letter.topic == kafka_topics.sessions for letter in letters)


async def test_consumer_lag_counts_what_is_fetched_but_not_consumed(kafka_bus, kafka_topics):
    topic = kafka_topics.reports
    await kafka_bus.ensure_topics({topic: 1})
    await kafka_bus.send_many([(topic, b"x%d" % i, None, 0) for i in range(10)])
    consumer = kafka_bus.group_consumer([topic], f"{topic}-lag")
    await consumer.start()
    try:
        taken: list = []
        deadline = time.monotonic() + 20
        while len(taken) < 3 and time.monotonic() < deadline:
            taken += await consumer.getmany(timeout_ms=200, max_records=3 - len(taken))
        assert len(taken) == 3
        assert await consumer.lag() == 7
    finally:
        await consumer.stop()


async def test_a_cloud_batch_of_replies_to_one_partition_is_one_record_batch(kafka_bus, kafka_topics, monkeypatch):
    # aiokafka keeps one produce request in flight per broker, with at most one record batch per partition:
    # a worker's 256 GRU4Rec-sized replies (8.8 kB each) in 1 MiB batches took three round trips.
    topic = kafka_topics.weights
    await kafka_bus.ensure_topics({topic: 1})
    batches = []
    send_batch = kafka_bus._producer.send_batch

    async def counted(batch, *args, **kwargs):
        batches.append(batch.record_count())
        return await send_batch(batch, *args, **kwargs)

    monkeypatch.setattr(kafka_bus._producer, "send_batch", counted)
    values = [i.to_bytes(4, "big") * 2206 for i in range(256)]
    assert await kafka_bus.send_many([(topic, v, b"device", 0) for v in values]) == [None] * 256
    assert batches == [256]
    consumer = kafka_bus.partition_consumer(topic, 0, from_start=True)
    await consumer.start()
    try:
        taken: list = []
        deadline = time.monotonic() + 20
        while len(taken) < 256 and time.monotonic() < deadline:
            taken += await consumer.getmany(timeout_ms=200, max_records=256)
        assert [r.value for r in taken] == values
    finally:
        await consumer.stop()
