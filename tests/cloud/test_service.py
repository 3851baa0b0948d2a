"""The generator service on the in-process bus: what no record may do to it."""

import asyncio

import numpy as np
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from cloud import CloudConfig, GeneratorService
from duet_bus import protocol
from duet_bus.bus import MemoryBus, Topics
from duet_bus.data.streams import offline_test_sessions


def requests(sessions, spec, **override):
    out = []
    for s in sessions:
        fields = dict(session_id=s.session_id, request_id=protocol.new_request_id(), device_id=s.device_id,
                      model_version=spec.model_version, realtime=np.asarray(s.realtime, np.int64),
                      reply_topic="duet.weights", reply_partition=0, sent_at=1.0)
        out.append(protocol.encode(protocol.SessionStart(**{**fields, **override})))
    return out


async def started(bus, checkpoint, **config):
    service = GeneratorService(bus, [checkpoint], CloudConfig(topics=Topics(), **config))
    await service.start()
    return service


async def take(service, bus, values):
    for value in values:
        await bus.send(service.config.topics.sessions, value, partition=0)
    records = []
    while len(records) < len(values):
        records += await service.consumer.getmany(50, 1000)
    return records


def letters(bus):
    return [protocol.decode(r.value) for r in bus.topics["duet.deadletter"][0]]


def replies(bus):
    return [protocol.decode(r.value) for part in bus.topics["duet.weights"] for r in part]


async def test_a_bug_in_one_record_stays_in_that_record(duet_checkpoint, tiny_shared, monkeypatch):
    bus = MemoryBus()
    service = await started(bus, duet_checkpoint)
    sessions = offline_test_sessions(tiny_shared)[:4]
    poisoned = sessions[2].realtime[-1]
    forward = GeneratorService._forward

    def buggy(self, checkpoint, samples):  # our bug, triggered by one record only
        if any(s[-1] == poisoned for s in samples):
            raise RuntimeError("boom")
        return forward(self, checkpoint, samples)

    monkeypatch.setattr(GeneratorService, "_forward", buggy)
    records = await take(service, bus, requests(sessions, duet_checkpoint.spec))
    await service.handle(records)
    hit = [s for s in sessions if s.realtime[-1] == poisoned]
    assert len(replies(bus)) == len(sessions) - len(hit)
    assert [letter.reason for letter in letters(bus)] == ["internal error: RuntimeError: boom"] * len(hit)
    assert service.stats.internal_errors == len(hit)
    assert await service.consumer.lag() == 0
    assert bus.groups[service.config.group_id].committed == {("duet.sessions", 0): len(sessions)}


async def test_replies_only_to_allowed_topics_and_existing_partitions(duet_checkpoint, tiny_shared):
    bus = MemoryBus()
    service = await started(bus, duet_checkpoint)
    session = offline_test_sessions(tiny_shared)[0]
    bad = (requests([session], duet_checkpoint.spec, reply_topic="peer.replies")
           + requests([session], duet_checkpoint.spec, reply_partition=4)
           + requests([session], duet_checkpoint.spec, reply_topic="duet.reports"))
    await service.handle(await take(service, bus, bad))
    reasons = [letter.reason for letter in letters(bus)]
    assert reasons == [
        "reply_topic: 'peer.replies' is not a reply topic of this cloud (allowed: duet.weights)",
        "reply_partition: 4 is not a partition of duet.weights (it has 4)",
        "reply_topic: 'duet.reports' is not a reply topic of this cloud (allowed: duet.weights)",
    ]
    assert "peer.replies" not in bus.topics and not replies(bus)
    assert bus.topics["duet.reports"] == [[]]


async def test_a_reply_refused_for_good_dead_letters_its_request(duet_checkpoint, tiny_shared):
    class Refusing(MemoryBus):
        async def send(self, topic, value, key=None, partition=None):
            if topic == "duet.weights":
                raise MessageSizeTooLargeError()
            return await super().send(topic, value, key, partition)

    bus = Refusing()
    service = await started(bus, duet_checkpoint)
    await service.handle(await take(service, bus, requests(offline_test_sessions(tiny_shared)[:2],
                                                           duet_checkpoint.spec)))
    assert [letter.reason for letter in letters(bus)] == [
        "reply_partition: the broker refused the reply to duet.weights[0] (MessageSizeTooLargeError); the broker "
        "must take record batches of 4 MiB and their framing (Kafka: message.max.bytes, 1 MiB by default)"] * 2
    assert await service.consumer.lag() == 0


async def test_delivery_is_retried_while_the_broker_is_away(duet_checkpoint, tiny_shared):
    class Flaky(MemoryBus):
        outage = 2  # attempts that fail

        async def send_many(self, messages):
            if self.outage:
                self.outage -= 1
                return [KafkaConnectionError()] * len(messages)
            return await super().send_many(messages)

    bus = Flaky()
    service = await started(bus, duet_checkpoint, retry_backoff_s=0.01)
    bus.outage = 2
    sessions = offline_test_sessions(tiny_shared)[:3]
    await service.handle(await take(service, bus, requests(sessions, duet_checkpoint.spec)))
    assert len(replies(bus)) == 3 and service.stats.delivery_retries == 2
    assert bus.groups[service.config.group_id].committed == {("duet.sessions", 0): 3}


async def test_a_batch_not_delivered_when_stopping_is_read_again(duet_checkpoint, tiny_shared):
    class Down(MemoryBus):
        down = False

        async def send_many(self, messages):
            if self.down:
                return [KafkaConnectionError()] * len(messages)
            return await super().send_many(messages)

    bus = Down()
    service = await started(bus, duet_checkpoint, retry_backoff_s=0.01)
    bus.down = True
    values = requests(offline_test_sessions(tiny_shared)[:3], duet_checkpoint.spec)
    records = await take(service, bus, values)
    stop = asyncio.Event()
    stop.set()
    await service.handle(records, stop=stop)
    assert bus.groups[service.config.group_id].committed == {}
    again = await service.consumer.getmany(50, 1000)
    assert [r.value for r in again] == values


@pytest.mark.parametrize("batches, fail_after_s", [(2, 0.0), (3, 0.2)])
async def test_batches_in_flight_behind_one_that_failed_are_read_again(duet_checkpoint, tiny_shared, batches,
                                                                       fail_after_s):
    """`run` prepares and sends later batches while earlier ones wait for their acknowledgements; when one
    gives up, the batches behind it (already generated, perhaps sent) must not be committed before it:
    all are read again, nothing is lost, commits never skip. A slow failure lets two batches queue behind."""
    class FailsOnce(MemoryBus):
        failures = 0

        async def send_many(self, messages):
            if self.failures:
                self.failures -= 1
                await asyncio.sleep(fail_after_s)
                return [KafkaConnectionError()] * len(messages)
            return await super().send_many(messages)

    bus = FailsOnce()
    service = await started(bus, duet_checkpoint, max_batch=3, delivery_timeout_s=0, retry_backoff_s=0.01)
    commits = []
    commit = service.consumer.commit

    async def recorded(offsets):
        commits.append(offsets[("duet.sessions", 0)])
        await commit(offsets)

    service.consumer.commit = recorded
    bus.failures = 1  # the first batch's replies
    values = requests(offline_test_sessions(tiny_shared)[:3 * batches], duet_checkpoint.spec)
    for value in values:
        await bus.send("duet.sessions", value, partition=0)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    for _ in range(500):
        if commits and commits[-1] == 3 * batches:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert commits == [3 * (k + 1) for k in range(batches)]  # in order, none before the failed batch was served
    # Every batch was generated twice: the later ones were ready (in flight) when the first gave up.
    assert service.stats.served == 2 * 3 * batches
    answered = {r.request_id for r in replies(bus)}
    assert answered == {protocol.decode(v).request_id for v in values}


@pytest.mark.parametrize("value", [None, b"", b"\xc1", b"\x93\x01\x02\x03"])
async def test_tombstones_and_garbage_are_dead_lettered(duet_checkpoint, value):
    bus = MemoryBus()
    service = await started(bus, duet_checkpoint)
    await service.handle(await take(service, bus, [value]))
    (letter,) = letters(bus)
    assert letter.reason.startswith("message: ") and letter.original == (value or b"")


async def test_the_worker_announces_what_it_serves(duet_checkpoint):
    bus = MemoryBus()
    await started(bus, duet_checkpoint, weight_encoding="float16")
    (record,) = bus.topics["duet.models"][0]
    info = protocol.decode(record.value)
    spec = duet_checkpoint.spec
    assert record.key == spec.model_version.encode()
    assert (info.model_version, info.n_items, info.realtime_len) == (spec.model_version, spec.n_items,
                                                                     spec.realtime_len)
    assert [tuple(s) for s in info.layer_shapes] == list(spec.layer_shapes)
    assert info.reply_topics == ["duet.weights"] and info.weight_encoding == "float16"


def test_a_head_too_large_for_one_message_is_refused_with_the_encodings_that_fit(vision_checkpoint):
    from dataclasses import fields, replace

    from duet_bus.checkpoint import Checkpoint
    from duet_bus.errors import ConfigError

    class Large(Checkpoint):  # the head of MobileNetV3-Large, 960 x 1280 x 10: 4.97 MB in float32
        @property
        def spec(self):
            return replace(super().spec, layer_shapes=((960, 1280), (1280, 10)))

    big = Large(**{f.name: getattr(vision_checkpoint, f.name) for f in fields(Checkpoint)})
    with pytest.raises(ConfigError, match="float32 is 4.97 MB, over the 4 MiB message limit; use float16"):
        GeneratorService(MemoryBus(), [big], CloudConfig())
    for encoding in ("float16", "int8", "factored", "factored_float16"):
        GeneratorService(MemoryBus(), [big], CloudConfig(weight_encoding=encoding))


async def test_the_in_process_bus_keeps_its_retention_and_consumers_read_on():
    """`MemoryBus(retention_bytes)`: a partition deletes its oldest records past the limit; offsets stay
    absolute, and a consumer whose position was deleted reads on from the oldest record kept."""
    bus = MemoryBus(retention_bytes=1000)
    await bus.ensure_topics({"t": 1})
    consumer = bus.group_consumer(["t"], "g")
    await consumer.start()
    offsets = [(await bus.send("t", bytes(100), partition=0))[1] for _ in range(30)]
    assert offsets == list(range(30))
    log = bus.topics["t"][0]
    assert 1000 - 100 < log.bytes <= 1250 and log.base > 0 and log[0].offset == log.base
    records = await consumer.getmany(10, 1000)
    assert [r.offset for r in records] == list(range(log.base, 30))
    assert await consumer.lag() == 0


@pytest.mark.parametrize("encoding", list(protocol.REPLY_ENCODINGS))
async def test_a_batchs_replies_are_what_encode_makes_of_each(duet_checkpoint, tiny_shared, encoding):
    """The worker converts a batch's arrays to the wire at once (`protocol.layer_rows`): each reply is
    still, to the byte, what `protocol.encode` makes of that reply alone."""
    bus = MemoryBus()
    service = await started(bus, duet_checkpoint, weight_encoding=encoding)
    sessions = offline_test_sessions(tiny_shared)[:5]
    await service.handle(await take(service, bus, requests(sessions, duet_checkpoint.spec)))
    values = [r.value for part in bus.topics["duet.weights"] for r in part]
    layers, _ = service._forward(duet_checkpoint, [np.asarray(s.realtime, np.int64) for s in sessions])
    assert len(values) == len(sessions)
    for i, value in enumerate(values):
        sent = protocol.decode(value)
        alone = protocol.WeightsReady(**{**sent.__dict__, "layers": [(w[i], b[i]) for w, b in layers]})
        assert value == protocol.encode(alone, service.config.array_encoding)
