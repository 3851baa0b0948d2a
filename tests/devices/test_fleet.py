"""Fleet behaviour that needs no broker: the MemoryBus stands in (tests only)."""

import asyncio

import numpy as np

from cloud import CloudConfig, GeneratorService
from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus import protocol
from duet_bus.bus import MemoryBus, Topics
from duet_bus.data.streams import offline_test_sessions


async def test_timeout_falls_back_to_the_global_classifier(duet_checkpoint, tiny_shared):
    bus = MemoryBus()
    fleet = Fleet(bus, FleetConfig(deadline_s=0.2))
    await fleet.start()
    session = offline_test_sessions(tiny_shared)[0]
    report = await fleet.run(DeviceAgent(session.device_id, duet_checkpoint, fleet), session)
    await fleet.stop()
    assert report.fallback and fleet.stats.fallbacks == 1
    assert np.isfinite(report.scores).all()


async def test_duplicate_and_foreign_replies_are_dropped(duet_checkpoint, tiny_shared):
    bus = MemoryBus()
    topics = Topics()
    service = GeneratorService(bus, [duet_checkpoint], CloudConfig(topics=topics))
    await service.start()
    fleet = Fleet(bus, FleetConfig(topics=topics, deadline_s=5))
    await fleet.start()
    session = offline_test_sessions(tiny_shared)[0]
    agent = DeviceAgent(session.device_id, duet_checkpoint, fleet)

    async def serve_twice_and_a_stranger():
        while not (records := await service.consumer.getmany(50, 10)):
            pass
        await service.handle(records)
        await service.handle(records)  # at-least-once redelivery
        request = protocol.decode(records[0].value)
        request.device_id = "someone-else"
        request.session_id = "other-session"
        request.request_id = protocol.new_request_id()  # a request this fleet never sent
        await bus.send(topics.sessions, protocol.encode(request))
        await service.handle(await service.consumer.getmany(50, 10))

    server = asyncio.create_task(serve_twice_and_a_stranger())
    report = await fleet.run(agent, session)
    await server
    await asyncio.sleep(0.3)
    await fleet.stop()
    assert not report.fallback
    assert fleet.stats.dropped_duplicates == 1  # the redelivered reply
    assert fleet.stats.dropped_foreign == 1  # the reply to a request this fleet never sent


async def test_device_finetune_matches_the_offline_baseline(tiny_shared, tmp_path):
    from duet_bus import checkpoint
    from duet_bus.tasks.recommendation import finetune_scores
    from duet_bus.finetune import FinetuneConfig
    from duet_bus.models import ModelConfig
    from duet_bus.train import TrainConfig, train_model

    result = train_model(tiny_shared, ModelConfig(backbone="sasrec"), TrainConfig(epochs=1, batch_size=64), seed=0)
    checkpoint.save(tmp_path / "base.pt", result.model, tiny_shared)
    base = checkpoint.load(tmp_path / "base.pt")
    offline, _ = finetune_scores(base.model, tiny_shared, FinetuneConfig(), seed=0)
    fleet = Fleet(MemoryBus(), FleetConfig(publish_reports=False))
    sessions = offline_test_sessions(tiny_shared, with_recent=FinetuneConfig().recent, seed=0)
    reports = [await fleet.run(DeviceAgent(s.device_id, base, fleet, method="finetune"), s) for s in sessions]
    np.testing.assert_allclose(np.stack([r.scores for r in reports]), offline, atol=1e-5)
    assert all(r.delay_ms["finetune_ms"] > 0 for r in reports)


async def test_a_reply_is_routed_by_its_ids_and_checked_by_the_device_it_is_for(duet_checkpoint, tiny_shared):
    """The fleet reads a reply's map and ids only; the device checks the rest. Garbage and a reply without ids
    are counted as invalid where they arrive and reach no device; a reply to this device's request that fails
    the checks (NaN weights) makes that device fall back at once, counted as invalid."""
    import msgpack

    bus = MemoryBus()
    topics = Topics()
    fleet = Fleet(bus, FleetConfig(topics=topics, deadline_s=600))  # a fallback here is not the deadline's
    await fleet.start()
    session = offline_test_sessions(tiny_shared)[0]
    agent = DeviceAgent(session.device_id, duet_checkpoint, fleet)
    consumer = bus.group_consumer([topics.sessions], "cloud")
    await consumer.start()

    async def answer_badly():
        while not (records := await consumer.getmany(50, 10)):
            pass
        request = protocol.decode(records[0].value)
        await bus.send(topics.weights, b"\xc1 not msgpack", partition=0)
        layers = [(np.full((i, o), np.nan, np.float32), np.zeros(o, np.float32))
                  for i, o in duet_checkpoint.spec.layer_shapes]
        good = protocol.encode(protocol.WeightsReady(
            request.session_id, request.request_id, request.device_id, request.model_version, "duet", layers,
            1.0, 2.0, 0.3, 1))
        body = msgpack.unpackb(good)
        await bus.send(topics.weights, msgpack.packb({**body, "request_id": 7}), partition=0)  # no id to route by
        await bus.send(topics.weights, good, partition=0)

    server = asyncio.create_task(answer_badly())
    report = await asyncio.wait_for(fleet.run(agent, session), 60)
    await server
    await fleet.stop()
    assert report.fallback and fleet.stats.fallbacks == 1
    assert fleet.stats.invalid_replies == 3  # the garbage, the reply without an id, and the NaN weights
