"""Bus cost on this machine: session round trip against a raw broker echo.

On one embedded broker, prints:

- raw echo round trip (p50, p99): a client sends a session-start-sized
  message to a topic, an echo worker in a consumer group sends it back to the
  client's reply partition (the same hops as a session, nothing computed);
- the same echo with reply-sized answers: the echo worker pads each answer to
  the size of a session's `WeightsReady` (the bytes a session moves, nothing
  computed);
- session round trip (p50, p99): a fleet's device sends a real SessionStart,
  the generator service validates, generates (GRU4Rec DUET, N_p = 5) and
  replies, the device receives the WeightsReady; and of it the time inside
  the cloud worker (receive to send: batch wait, validation, generation,
  encoding);
- both at 1, 10 and 100 sessions in flight, and the ratio session / echo;
- all of it three times, each on a fresh broker: with float32 replies (the
  default), float16 ones (half the bytes; `--weight-encoding float16`) and
  int8 ones (a quarter; `--weight-encoding int8`);
- where the round trip goes at 100 in flight: from a request leaving its
  device to the cloud taking the batch it is in, inside the cloud, and from
  its reply leaving the cloud to the device taking it; and what sending 100
  requests or 100 replies to one partition costs the sending process
  (acknowledged after, and its CPU time);
- sessions per second of one cloud worker draining a backlog;
- what encoding a batch of 100 replies costs the worker, each reply's
  arrays alone (as it did) against the batch's converted at once (as it
  does), in each encoding;
- what one batched generation of 100 sessions costs at torch's 2 threads
  and at 1 (`duet cloud --torch-threads`, default 1): on the main thread,
  then on an executor thread as the worker runs it (`asyncio.to_thread`),
  then on the main thread again while that thread lives; each in a fresh
  process.

The device side runs as `duet devices` does (`duet_bus.process`: one torch
thread, the start-up heap frozen). Absolute times are this machine's; the
ratios are what to compare.
Run: `make bench-bus` (or python bench/bench_bus.py [--max-wait-ms T], the
cloud worker's micro-batch wait, default 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cloud import CloudConfig, GeneratorService
from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus import checkpoint, process, protocol
from duet_bus.broker import EmbeddedBroker
from duet_bus.bus import KafkaBus, Topics
from duet_bus.checkpoint import Checkpoint, global_layers, model_version
from duet_bus.data import load_dataset, prepare
from duet_bus.data.streams import offline_test_sessions
from duet_bus.models import ModelConfig, PPGConfig, build_model

LEVELS = (1, 10, 100)
ENCODINGS = ("float32", "float16", "int8")  # the default, and the half- and quarter-size replies
SESSIONS_PER_LEVEL = 300
MIN_ROUNDS = 20  # at 100 in flight 300 sessions were 3 bursts, and the p50 of 3 bursts moved 34-81 ms between runs
BACKLOG = 20000  # about 2 s of one worker: long enough to average the machine's noise


def untrained_checkpoint(prepared) -> Checkpoint:
    model = build_model(ModelConfig(backbone="gru4rec", ppg=PPGConfig(n_generators=5)), prepared.n_items, 10).eval()
    return Checkpoint(model, model_version(model), prepared.name, prepared.config, prepared.n_items,
                      global_layers(model, prepared))


async def echo_server(bootstrap: str, req: str, rep: str, answer_bytes: int = 0) -> None:
    """The raw echo worker (its own process): send every request back to its reply partition, padded to
    ``answer_bytes`` if that is more."""
    bus = KafkaBus(bootstrap)
    await bus.start()
    server = bus.group_consumer([req], f"{req}-echo")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        records = await server.getmany(timeout_ms=50, max_records=256)
        if records:
            await bus.send_many([(rep, r.value.ljust(answer_bytes, b"\0"), r.key, 0) for r in records])
            await server.commit({(r.topic, r.partition): r.offset + 1 for r in records})
    await server.stop()
    await bus.stop()


async def echo_round_trips(bus: KafkaBus, req: str, rep: str, payload: bytes, level: int) -> list[float]:
    client = bus.partition_consumer(rep, 0)
    await client.start()
    waiting: dict[bytes, asyncio.Future] = {}
    stop = asyncio.Event()

    async def receive():
        while not stop.is_set():
            for r in await client.getmany(timeout_ms=50, max_records=1000):
                future = waiting.pop(r.key, None)
                if future is not None and not future.done():
                    future.set_result(time.perf_counter())

    async def one() -> float:
        key = uuid.uuid4().bytes
        future = asyncio.get_running_loop().create_future()
        waiting[key] = future
        start = time.perf_counter()
        await bus.send(req, payload, key=key)
        return (await asyncio.wait_for(future, 60) - start) * 1000

    task = asyncio.create_task(receive())
    await one()  # warm-up (the echo worker may still be joining its group)
    out: list[float] = []
    while len(out) < max(SESSIONS_PER_LEVEL, MIN_ROUNDS * level):
        out += await asyncio.gather(*(one() for _ in range(level)))
    stop.set()
    await task
    await client.stop()
    return out


async def session_round_trips(fleet: Fleet, agents, sessions, level: int) -> tuple[list[float], list[float]]:
    """Round trips and, of each, the time spent inside the cloud worker (receive to send)."""
    out: list[float] = []
    cloud: list[float] = []
    i = 0
    while len(out) < max(SESSIONS_PER_LEVEL, MIN_ROUNDS * level):
        batch = [(agents[(i + j) % len(agents)], sessions[(i + j) % len(sessions)]) for j in range(level)]
        i += level
        reports = await asyncio.gather(*(fleet.run(a, s) for a, s in batch))
        if any(r.fallback for r in reports):
            raise RuntimeError("a session fell back: the cloud worker is not keeping up within the deadline")
        out += [r.delay_ms["round_trip_ms"] for r in reports]
        cloud += [r.delay_ms["cloud_ms"] for r in reports]
    return out, cloud


async def burst_timeline(fleet: Fleet, agents, sessions, level: int) -> list[float]:
    """Where a session's round trip goes at ``level`` in flight, medians over at least `MIN_ROUNDS` bursts (ms):
    from its request leaving the device to the cloud taking the batch it is in, the cloud (taken to its
    reply stamped sent), from there to the device taking the reply, and the round trip. The first and the
    third are differences of two processes' clocks: right on one host, not across hosts."""
    parts: list[tuple[float, float, float, float]] = []
    i = 0

    async def one(agent, session) -> tuple[float, float, float, float]:
        delay: dict[str, float] = {}
        sent = time.time()  # what the request's own sent_at is stamped with, microseconds later
        reply = await fleet.request(agent, session, delay, {})
        if reply is None:
            raise RuntimeError("a session fell back: the cloud worker is not keeping up within the deadline")
        received = sent + delay["round_trip_ms"] / 1000
        return ((reply.received_at - sent) * 1000, delay["cloud_ms"], (received - reply.sent_at) * 1000,
                delay["round_trip_ms"])

    while len(parts) < MIN_ROUNDS * level:
        parts += await asyncio.gather(*(one(agents[(i + j) % len(agents)], sessions[(i + j) % len(sessions)])
                                        for j in range(level)))
        i += level
    return [float(v) for v in np.median(np.array(parts), axis=0)]


async def producer_cost(bus: KafkaBus, topic: str, sizes: dict[str, int], count: int = 100,
                        rounds: int = 50) -> dict[str, tuple[float, float]]:
    """For messages of each size: `KafkaBus.send_many` of ``count`` of them to one partition, acknowledged
    (ms, median), and this process's CPU time per call (ms, mean): what sending a burst's replies costs the
    client, beside the broker."""
    out = {}
    for name, size in sizes.items():
        messages = [(topic, bytes(size), b"k", 0) for _ in range(count)]
        walls = []
        cpu = time.process_time()
        for _ in range(rounds):
            start = time.perf_counter()
            await bus.send_many(messages)
            walls.append((time.perf_counter() - start) * 1000)
        out[name] = (float(np.median(walls)), (time.process_time() - cpu) * 1000 / rounds)
    return out


async def worker_throughput(bus: KafkaBus, ckpt: Checkpoint, sessions, max_wait_ms: float) -> float:
    tag = uuid.uuid4().hex[:8]
    topics = Topics(sessions=f"s-{tag}", weights=f"w-{tag}", reports=f"r-{tag}", deadletter=f"d-{tag}")
    await bus.ensure_topics(topics.all())
    messages = []
    for n in range(BACKLOG):
        s = sessions[n % len(sessions)]
        messages.append((topics.sessions, protocol.encode(protocol.SessionStart(
            f"{s.session_id}-{n}", protocol.new_request_id(), s.device_id, ckpt.model_version, s.realtime, topics.weights, 0, time.time())),
            s.device_id.encode(), None))
    for k in range(0, len(messages), 5000):
        await bus.send_many(messages[k:k + 5000])
    service = GeneratorService(bus, [ckpt], CloudConfig(topics=topics, group_id=f"cloud-{tag}",
                                                            max_wait_ms=max_wait_ms))
    await service.start()
    first: list = []
    while not first:  # wait out the group join, then time from the first batch on
        first, received_at = await service.next_batch()
    start = time.perf_counter()
    await service.handle(first, received_at)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    deadline = time.monotonic() + 120
    while service.stats.served < BACKLOG and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    stop.set()
    await task  # the last batch delivered and committed
    elapsed = time.perf_counter() - start
    served = service.stats.served
    await service.stop()
    return served / elapsed


def encoding_cost(ckpt: Checkpoint, sessions, encoding: str, count: int = 100, rounds: int = 50) -> tuple[float, float]:
    """Encoding one batch's ``count`` replies (ms, median of ``rounds``): each reply's arrays on their own, as
    the worker did, and the batch's arrays converted at once (`protocol.layer_rows`), as it does."""
    with torch.inference_mode():
        realtime, lengths = ckpt.model.realtime_batch([sessions[i % len(sessions)].realtime for i in range(count)])
        layers = [(w.numpy(), b.numpy()) for w, b in ckpt.model.weights_for(realtime, lengths)]

    def reply(i: int) -> protocol.WeightsReady:
        return protocol.WeightsReady("s", "r", "d", ckpt.model_version, "duet", [(w[i], b[i]) for w, b in layers],
                                     0.0, time.time(), 1.0, count)

    def alone() -> list[bytes]:
        return [protocol.encode(reply(i), encoding) for i in range(count)]

    def together() -> list[bytes]:
        rows = protocol.layer_rows(layers, encoding)
        return [protocol.encode(reply(i), encoding, rows(i)) for i in range(count)]

    times: dict = {alone: [], together: []}
    for _ in range(rounds):  # alternating, so that the machine's noise falls on both
        for way in times:
            start = time.perf_counter()
            way()
            times[way].append((time.perf_counter() - start) * 1000)
    return float(np.median(times[alone])), float(np.median(times[together]))


def generation_cost(path: Path, threads: int, rounds: int = 100) -> dict[str, float]:
    """One batched generation of 100 sessions (ms, median of ``rounds``) at ``threads`` torch threads, in
    this (fresh) process: on the main thread, then on an executor thread as `GeneratorService` runs it
    (`asyncio.to_thread`), then on the main thread again while that thread lives."""
    process.set_torch_threads(threads)
    prepared = prepare(load_dataset("ml-100k"), seed=0)
    ckpt = checkpoint.load(path)
    samples = [s.realtime for s in offline_test_sessions(prepared)[:100]]

    def generate() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            realtime, lengths = ckpt.model.realtime_batch(samples)
            [(w.numpy(), b.numpy()) for w, b in ckpt.model.weights_for(realtime, lengths)]
        return (time.perf_counter() - start) * 1000

    async def in_thread() -> tuple[list[float], list[float]]:
        thread = [await asyncio.to_thread(generate) for _ in range(rounds)]
        return thread, [generate() for _ in range(rounds)]  # the loop's executor thread still alive

    main_before = [generate() for _ in range(rounds)]
    thread, main_after = asyncio.run(in_thread())
    return {"main": float(np.median(main_before)), "thread": float(np.median(thread)),
            "main after": float(np.median(main_after))}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def request_payload(ckpt: Checkpoint, sessions) -> bytes:
    """A session-start request of this model: what the echoes send."""
    return protocol.encode(protocol.SessionStart("s", protocol.new_request_id(), "d", ckpt.model_version,
                                                 sessions[0].realtime, "w", 0, 0.0))


async def phase(encoding: str, path: Path, answer_bytes: int, max_wait_ms: str,
                drain: bool) -> tuple[list[list[str]], float | None, list[float], dict[str, tuple[float, float]]]:
    """One encoding's rows (and, if ``drain``, the backlog drain) on a broker of its own, in a process of its own
    (`main` runs each phase as a child): a second phase in the same process measured slower, whatever its
    encoding and even on a fresh broker (100 in flight: 59-66 ms against 33-45 ms in the first)."""
    process.set_torch_threads(1)  # the device side as `duet devices` runs it (`--torch-threads`, default 1)
    prepared = prepare(load_dataset("ml-100k"), seed=0)
    sessions = offline_test_sessions(prepared)
    ckpt = checkpoint.load(path)
    payload = request_payload(ckpt, sessions)
    rows = []
    with EmbeddedBroker() as broker:
        bus = KafkaBus(broker.bootstrap)
        await bus.start()
        topics = Topics()
        await bus.ensure_topics({**topics.all(), "echo.req": 4, "echo.rep": 1, "echo-big.req": 4, "echo-big.rep": 1})
        # The echo workers and the cloud worker run in processes of their own, as deployed.
        workers = [
            subprocess.Popen([sys.executable, __file__, "--echo-server", broker.bootstrap, "echo.req", "echo.rep",
                              "0"]),
            subprocess.Popen([sys.executable, __file__, "--echo-server", broker.bootstrap, "echo-big.req",
                              "echo-big.rep", str(answer_bytes)]),
            subprocess.Popen([sys.executable, "-m", "duet_bus.cli", "cloud", "--bootstrap", broker.bootstrap,
                              "--checkpoint", str(path), "--max-wait-ms", max_wait_ms, "--weight-encoding", encoding],
                             stdout=subprocess.DEVNULL),
        ]
        fleet = Fleet(bus, FleetConfig(topics=topics, deadline_s=60, publish_reports=False))
        await fleet.start()
        try:
            agents = [DeviceAgent(s.device_id, ckpt, fleet) for s in sessions]
            process.freeze_startup_heap()  # as `duet devices` does once its sessions are loaded
            await fleet.run(agents[0], sessions[0])  # warm-up: the cloud joins its group
            for level in LEVELS:
                echo = await echo_round_trips(bus, "echo.req", "echo.rep", payload, level)
                big = await echo_round_trips(bus, "echo-big.req", "echo-big.rep", payload, level)
                session, cloud = await session_round_trips(fleet, agents, sessions, level)
                rows.append([encoding, str(level), f"{pct(echo, 50):.2f}", f"{pct(echo, 99):.2f}",
                             f"{pct(big, 50):.2f}", f"{pct(session, 50):.2f}", f"{pct(session, 99):.2f}",
                             f"{pct(cloud, 50):.2f}", f"{pct(session, 50) / pct(echo, 50):.2f}x",
                             f"{pct(session, 50) / pct(big, 50):.2f}x"])
            timeline = await burst_timeline(fleet, agents, sessions, LEVELS[-1])
            await bus.ensure_topics({"produce.cost": 1})
            sending = await producer_cost(bus, "produce.cost", {"request": len(payload), "reply": answer_bytes})
        finally:
            await fleet.stop()
            for worker in workers:
                worker.terminate()
                worker.wait(timeout=30)
        try:
            rate = await worker_throughput(bus, ckpt, sessions, float(max_wait_ms)) if drain else None
        finally:
            await bus.stop()
    return rows, rate, timeline, sending


async def main(max_wait_ms: str) -> None:
    prepared = prepare(load_dataset("ml-100k"), seed=0)
    ckpt = untrained_checkpoint(prepared)
    sessions = offline_test_sessions(prepared)
    payload = request_payload(ckpt, sessions)
    # What a session's answer weighs in each encoding: a WeightsReady of this model.
    answers = {encoding: len(protocol.encode(protocol.WeightsReady(
        "s", protocol.new_request_id(), sessions[0].device_id, ckpt.model_version, "duet",
        [(w.numpy(), b.numpy()) for w, b in ckpt.global_layers], 0.0, 0.0, 0.0, 1), encoding))
        for encoding in ENCODINGS}
    table = Table(title=f"Round trips on the embedded broker (ms, this machine; cloud --max-wait-ms {max_wait_ms}; "
                        f"request {len(payload)} B, reply " + ", ".join(f"{n} B in {e}" for e, n in answers.items())
                        + ")")
    for col in ("replies", "in flight", "echo p50", "echo p99", "echo, reply-sized answers p50", "session p50",
                "session p99", "of it in cloud p50", "session / echo p50", "session / reply-sized echo p50"):
        table.add_column(col, justify="right")
    where = Table(title=f"Where a session's round trip goes at {LEVELS[-1]} in flight (medians, ms), and what "
                        f"sending {LEVELS[-1]} messages to one partition costs (send_many to acknowledged, median; "
                        f"this process's CPU per call)")
    for col in ("replies", "request to the cloud taking its batch", "in the cloud", "reply to the device taking it",
                "round trip", f"{LEVELS[-1]} requests: acked", "CPU", f"{LEVELS[-1]} replies: acked", "CPU"):
        where.add_column(col, justify="right")
    rate = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "duet.pt"
        checkpoint.save(path, ckpt.model, prepared)
        for encoding in ENCODINGS:
            drain = encoding == "float32"
            out = subprocess.run([sys.executable, __file__, "--phase", encoding, str(path), str(answers[encoding]),
                                  max_wait_ms, str(int(drain))], check=True, stdout=subprocess.PIPE, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if drain:
                rate = result["rate"]
            for row in result["rows"]:
                table.add_row(*row)
            sending = result["sending"]
            where.add_row(encoding, *(f"{v:.1f}" for v in result["timeline"]),
                          *(f"{v:.2f}" for kind in ("request", "reply") for v in sending[kind]))
        generation_rows = []
        for round_ in (1, 2):
            for n in (2, 1):
                out = subprocess.run([sys.executable, __file__, "--generation", str(path), str(n)], check=True,
                                     stdout=subprocess.PIPE, text=True)
                cost = json.loads(out.stdout.strip().splitlines()[-1])
                generation_rows.append([str(n), str(round_), *(f"{cost[k]:.2f}" for k in ("main", "thread", "main after"))])
    console = Console(width=200)
    console.print(table)
    console.print(where)
    costs = Table(title="Encoding a batch of 100 replies in the cloud worker (ms, median of 50, alternating)")
    for col in ("replies", "each reply's arrays alone", "the batch's arrays at once", "speed-up"):
        costs.add_column(col, justify="right")
    for encoding in ENCODINGS:
        alone, together = encoding_cost(ckpt, sessions, encoding)
        costs.add_row(encoding, f"{alone:.2f}", f"{together:.2f}", f"{alone / together:.2f}x")
    console.print(costs)
    threads = Table(title="One batched generation of 100 sessions (GRU4Rec DUET N_p=5; ms, median of 100; each "
                          "row a fresh process, rows alternating)")
    for col in ("torch threads", "round", "main thread", "then an executor thread (as the worker)",
                "then the main thread again, that thread alive"):
        threads.add_column(col, justify="right")
    for row in generation_rows:
        threads.add_row(*row)
    console.print(threads)
    console.print(f"one cloud worker drains a backlog of {BACKLOG} sessions at {rate:.0f} sessions/s "
                  f"(GRU4Rec DUET N_p=5, float32 replies, micro-batches up to 256)")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--echo-server":
        asyncio.run(echo_server(*sys.argv[2:5], int(sys.argv[5])))
    elif len(sys.argv) == 4 and sys.argv[1] == "--generation":
        print(json.dumps(generation_cost(Path(sys.argv[2]), int(sys.argv[3]))))
    elif len(sys.argv) == 7 and sys.argv[1] == "--phase":
        encoding, ckpt_path, answer, wait, drain = sys.argv[2:]
        rows, rate, timeline, sending = asyncio.run(phase(encoding, Path(ckpt_path), int(answer), wait, drain == "1"))
        print(json.dumps({"rows": rows, "rate": rate, "timeline": timeline, "sending": sending}))
    else:
        parser = argparse.ArgumentParser(description="session round trip against a raw broker echo")
        parser.add_argument("--max-wait-ms", default="0", help="the cloud worker's micro-batch wait (ms)")
        asyncio.run(main(parser.parse_args().max_wait_ms))
