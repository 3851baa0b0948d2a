"""Faults injected for real: poison records, fuzzing, stale replies, a broker and workers killed.

Each test bounds its loops in count and time; `make bench-faults` runs the
same faults larger and prints the table of the README's reliability section.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest

from cloud import CloudConfig, GeneratorService
from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus import protocol
from duet_bus.broker import EmbeddedBroker, free_port
from duet_bus.bus import KafkaBus, Topics
from duet_bus.data.streams import offline_test_sessions
from duet_bus.testing import hostile_records


async def serving(bus, checkpoint, topics, **config):
    service = GeneratorService(bus, [checkpoint], CloudConfig(topics=topics, **config))
    await service.start()
    stop = asyncio.Event()
    return service, stop, asyncio.create_task(service.run(stop))


async def until(condition, timeout_s: float, step_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step_s)
    return True


async def test_records_that_once_killed_the_worker_are_dead_lettered(kafka_bus, kafka_topics, duet_checkpoint,
                                                                    tiny_shared):
    service, stop, task = await serving(kafka_bus, duet_checkpoint, kafka_topics)
    good = offline_test_sessions(tiny_shared)[0]
    body = msgpack.unpackb(protocol.encode(protocol.SessionStart(
        "s", protocol.new_request_id(), "d", duet_checkpoint.model_version, np.array([1, 2]), kafka_topics.weights,
        0, 1.0)))
    poison = {
        "partition beyond the topic": {**body, "reply_partition": 99},
        "dtype a list": {**body, "realtime": {**body["realtime"], "dtype": ["int64"]}},
        "type a map": {**body, "type": {"session_start": 1}},
        "65 dimensions": {**body, "realtime": {**body["realtime"], "shape": [1] * 65}},
        "shape [0, 2**63]": {**body, "realtime": {**body["realtime"], "shape": [0, 2**63]}},
        "illegal reply topic": {**body, "reply_topic": "no such/topic"},
        "reply topic not served": {**body, "reply_topic": "peer.replies"},
    }
    for value in poison.values():
        await kafka_bus.send(kafka_topics.sessions, msgpack.packb(value, use_bin_type=True))
    await kafka_bus.send(kafka_topics.sessions, None, key=b"device-7")  # a tombstone
    fleet = Fleet(kafka_bus, FleetConfig(topics=kafka_topics, deadline_s=20))
    await fleet.start()
    try:
        report = await fleet.run(DeviceAgent(good.device_id, duet_checkpoint, fleet), good)
        assert await until(lambda: service.stats.dead_letters == len(poison) + 1, 30)
        assert not task.done(), "the worker stopped"
    finally:
        await fleet.stop()
        stop.set()
        await asyncio.wait_for(task, 10)
        await service.stop()
    assert not report.fallback
    assert service.stats.internal_errors == 0
    topics = await _topics(kafka_bus)
    assert "peer.replies" not in topics


async def _topics(bus: KafkaBus) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bus.bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_fuzz_a_live_worker_every_record_answered_or_dead_lettered(kafka_bus, kafka_topics, duet_checkpoint):
    count = 400
    service, stop, task = await serving(kafka_bus, duet_checkpoint, kafka_topics)
    spec = duet_checkpoint.spec
    records = list(hostile_records(count, seed=7, model_version=spec.model_version, reply_topic=kafka_topics.weights,
                                   n_items=spec.n_items, realtime_len=spec.realtime_len))
    try:
        sent = await kafka_bus.send_many([(kafka_topics.sessions, r, b"fuzz-%d" % i, None)
                                          for i, r in enumerate(records)])
        assert sent == [None] * count
        done = await until(lambda: service.stats.served + service.stats.dead_letters >= count, 60)
        assert not task.done(), "the worker stopped"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await service.stop()
    assert done, f"{service.stats.served} answered + {service.stats.dead_letters} dead letters of {count}"
    assert service.stats.served + service.stats.dead_letters == count
    assert service.stats.served > 20 and service.stats.dead_letters > 250 and service.stats.internal_errors == 0


async def test_replies_left_by_an_earlier_run_are_never_taken_as_answers(kafka_bus, kafka_topics, duet_checkpoint,
                                                                          tiny_shared):
    """Regression: the embedded broker reports a wrong end offset after a multi-record batch, so a fleet
    that seeks to the end re-reads old replies. With no cloud running, every session must fall back."""
    sessions = offline_test_sessions(tiny_shared)
    await kafka_bus.ensure_topics(kafka_topics.all())
    layers = [(np.zeros(s, np.float32), np.zeros(s[1], np.float32)) for s in duet_checkpoint.spec.layer_shapes]
    old = [protocol.encode(protocol.WeightsReady(
        s.session_id, protocol.new_request_id(), s.device_id, duet_checkpoint.model_version, "duet", layers,
        1.0, 1.0, 0.1, 50)) for s in sessions]
    await kafka_bus.send_many([(kafka_topics.weights, v, None, 0) for v in old])  # one batch
    fleet = Fleet(kafka_bus, FleetConfig(topics=kafka_topics, deadline_s=1.0))
    await fleet.start()
    try:
        reports = await asyncio.wait_for(asyncio.gather(*(
            fleet.run(DeviceAgent(s.device_id, duet_checkpoint, fleet), s) for s in sessions)), 30)
    finally:
        await fleet.stop()
    assert all(r.fallback for r in reports) and fleet.stats.fallbacks == len(sessions)
    assert len({r.session_id for r in reports}) == len(sessions)
    assert all(r.session_id.endswith(f"@{fleet.run_id}") for r in reports)  # unique per run on the wire


async def test_broker_killed_and_restarted_sessions_fall_back_then_are_served_again(duet_checkpoint, tiny_shared):
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    topics = Topics()
    bus = KafkaBus(broker.bootstrap)
    await bus.start()
    service, stop, task = await serving(bus, duet_checkpoint, topics, retry_backoff_s=0.2)
    fleet = Fleet(bus, FleetConfig(topics=topics, deadline_s=1.0))
    await fleet.start()
    assert await until(lambda: len(service.consumer.assignment()) == topics.session_partitions, 30)
    sessions = offline_test_sessions(tiny_shared)
    agents = {s.device_id: DeviceAgent(s.device_id, duet_checkpoint, fleet) for s in sessions}
    reports = []

    async def one(i: int):
        s = sessions[i % len(sessions)]
        reports.append(await asyncio.wait_for(fleet.run(agents[s.device_id], s), 10))
        return reports[-1]

    try:
        for i in range(5):
            assert not (await one(i)).fallback
        broker.process.kill()
        broker.process.wait(5)
        during = [await one(i) for i in range(3)]
        broker = EmbeddedBroker(port=port).start()
        deadline = time.monotonic() + 60
        after = []
        while time.monotonic() < deadline and sum(not r.fallback for r in after) < 3:
            after.append(await one(len(after)))
        assert not task.done(), "the worker stopped"
    finally:
        await fleet.stop()
        stop.set()
        await asyncio.wait_for(task, 15)
        await service.stop()
        await bus.stop()
        broker.stop()
    assert all(r.fallback for r in during)
    assert sum(not r.fallback for r in after) >= 3, f"not served again: {len(after)} sessions after the restart"
    assert fleet.stats.sessions == len(reports)  # every session ended in a report: none lost


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "duet_bus.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


class _Lines:
    """A process's output lines, read in a thread, to wait for one without blocking the event loop."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


async def test_worker_killed_the_other_takes_over_and_sigterm_leaves_cleanly(duet_checkpoint_file, duet_checkpoint,
                                                                            tiny_shared):
    with EmbeddedBroker() as broker:
        workers = [_spawn("cloud", "--bootstrap", broker.bootstrap, "--checkpoint", str(duet_checkpoint_file))
                   for _ in range(2)]
        outputs = [_Lines(w) for w in workers]
        try:
            assert await until(lambda: all(o.has("partitions of duet.sessions: ") and not o.has(": none")
                                           for o in outputs), 60), [o.lines for o in outputs]
            bus = KafkaBus(broker.bootstrap)
            await bus.start()
            fleet = Fleet(bus, FleetConfig(deadline_s=1.0))
            await fleet.start()
            sessions = offline_test_sessions(tiny_shared)
            reports: list = []
            stop_devices = asyncio.Event()

            async def device(s):
                agent = DeviceAgent(s.device_id, duet_checkpoint, fleet)
                while not stop_devices.is_set():
                    reports.append((time.monotonic(), await asyncio.wait_for(fleet.run(agent, s), 10)))

            devices = [asyncio.create_task(device(s)) for s in sessions[:8]]
            await asyncio.sleep(2)
            workers[0].kill()  # SIGKILL: no chance to leave the group
            killed_at = time.monotonic()
            survivor = outputs[1]
            took_over = await until(lambda: survivor.has("partitions of duet.sessions: 0, 1, 2, 3"), 40)
            # Sessions well after the takeover (a busy machine makes the takeover itself slower).
            await until(lambda: sum(t > killed_at + 12 for t, _ in reports) >= 8, 30)
            stop_devices.set()
            await asyncio.wait_for(asyncio.gather(*devices), 20)
            await fleet.stop()
            await bus.stop()
            workers[1].send_signal(signal.SIGTERM)
            code = workers[1].wait(timeout=20)
        finally:
            for w in workers:
                w.kill()
                w.wait(10)
    assert took_over, survivor.lines
    assert code == 0 and survivor.has("stopped: served")
    late = [r for t, r in reports if t > killed_at + 12]
    assert late and not any(r.fallback for r in late), "sessions after the takeover fell back"
    assert fleet.stats.sessions == len(reports)  # every session ended: answered or fell back
    print(f"\n{len(reports)} sessions, {sum(r.fallback for _, r in reports)} fell back, "
          f"{fleet.stats.dropped_duplicates} duplicate or late replies dropped")


def test_duet_broker_on_a_taken_port_fails_at_once():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "duet_bus.cli", "broker", "--port", str(port)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and not result.stdout


@pytest.mark.parametrize("command", ["devices", "cloud"])
def test_no_broker_reachable_is_one_line(command, duet_checkpoint_file):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "duet_bus.cli", command, "--bootstrap", f"127.0.0.1:{port}",
                             "--checkpoint", str(duet_checkpoint_file)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DUET_KAFKA_LOG": "critical"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot reach Kafka at 127.0.0.1:{port} (KafkaConnectionError); start a broker with `duet broker` "
        "and pass the address it prints, or point --bootstrap at your cluster"]
