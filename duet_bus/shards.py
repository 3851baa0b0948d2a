"""One run over several runner processes (and hosts), meeting on Kafka.

A run's devices are split over ``N`` shards (device ``i`` in shard ``i % N``,
`runner.Shard`); everything drawn per device is drawn for all of the run's
devices and per device (arrivals, profiles, shift choices and their
randomness), so a shard simulates exactly its devices of the one-process run.
Each shard's fleet takes its replies on its own partition of the weights
topic; one consumer group of cloud workers serves them all. When a shard is
done it publishes its session records on the reports topic (`ShardRecords`,
in parts) and whoever writes the report collects every shard's by run id and
writes one report, as one process would: the same sessions with the same
metrics (delays are measured, so they differ).

- `run_sharded` (`duet run --shards N`, one host): the broker (embedded
  unless the scenario names a cluster), the run's cloud workers and the
  collector in this process, the shards as child processes.
- `run_shard` (`duet run --shard k/N --run-id R`, one per host): one shard
  against a shared cluster; the cloud is `duet cloud` workers serving the
  same checkpoint files (give them in `model.checkpoints`).
- `collect_run` (`duet run --collect N --run-id R`): the report of a run whose
  shards ran elsewhere, or whose parent was killed.

With the in-process bus (`bus.kind: memory`) there is no broker to meet on:
`duet run --shards N` then runs every shard with its own in-process cloud
(`run_memory_shard`), each child writes its records to a file in the same
messages it would publish (in the run's output folder, `records_folder`), and
the parent reads them (`read_records`) and removes them. The sessions, their
metrics and the report are those of one process, and the run uses as many
cores as it has shards. Shards whose parent was killed write their files all
the same, and `duet run --collect N --run-id R` makes the report of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from duet_bus import protocol
from duet_bus.broker import BrokerError, EmbeddedBroker
from duet_bus.bus import KafkaBus, Topics
from duet_bus.checkpoint import Checkpoint
from duet_bus.errors import ConfigError, DuetError
from duet_bus.protocol import ProtocolError, ShardRecords
from duet_bus.report import write_run
from duet_bus.runner import (RunState, Shard, cloud_figures, cloud_ready, cloud_workers, kafka_security, run_async,
                             run_figures, run_interruptible, scenario_doc, stop_cloud)
from duet_bus.scenario import Scenario

log = logging.getLogger("duet.shards")
ROWS_PER_PART = 1000
STOP_S = 60.0  # how long a shard process asked to stop may take to report what it has done
PARENT_ENV = "DUET_SHARD_PARENT"  # in the environment of the shard processes `_child` starts: `take_parents_stop`


def take_parents_stop() -> None:
    """In a shard process that `duet run --shards N` started (`_child`): stop when the parent asks, or when it
    is gone.

    The parent asks its shards to stop with SIGINT, and each runs in a session of its own, so no terminal's
    Ctrl-C reaches it. So a shard takes SIGINT whatever it inherited: a parent started with SIGINT ignored (a
    script's background job) handed that to its shards, and when one shard failed the others ignored the
    request and were killed `STOP_S` later, their sessions unreported. And a parent killed outright (SIGKILL,
    or SIGTERM where it does not take Ctrl-C) left its shards running on in their sessions until their next
    line of output failed; each now stops as if asked (`_stop_when_parent_is_gone`)."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if parent.isdigit():  # the parent's pid (anything else was not set by `_child`: no parent to watch)
        threading.Thread(target=_stop_when_parent_is_gone, args=(int(parent),), name="parent-watch",
                         daemon=True).start()


def _stop_when_parent_is_gone(parent: int, settle_s: float = 2.0) -> None:
    """Wait for the end of this shard's stdin, a pipe its parent holds open and never writes to; if the parent
    is gone (this process handed to another parent), stop as the parent would have asked, the output that
    went to it (a closed pipe now) going nowhere."""
    try:
        while os.read(0, 1 << 16):  # the file descriptor, not sys.stdin: no lock held at interpreter exit
            pass
    except OSError:  # no stdin to read: nothing to watch
        return
    give_up = time.monotonic() + settle_s  # the parent's files close just before its children are handed over
    while os.getppid() == parent:
        if time.monotonic() > give_up:
            return  # the parent lives and closed the pipe itself
        time.sleep(0.05)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    os.kill(os.getpid(), signal.SIGINT)


def shard_topics(count: int) -> Topics:
    """The run's topics: a reply partition for each shard."""
    return Topics(weight_partitions=max(Topics.weight_partitions, count))


def parse_shard(text: str, run_id: str | None) -> Shard:
    """``k/N`` (``--shard``) -> a `Shard` that leaves the cloud to others."""
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--shard: must be k/N with 0 <= k < N, got {text!r}")
    if not run_id:
        raise ConfigError("--shard: needs --run-id, the same for every shard of the run (and for --collect)")
    return Shard(int(index), int(count), run_id, cloud=False)


def shard_messages(shard: Shard, state: RunState, run: dict) -> list[ShardRecords]:
    """A shard's records in parts; its last part carries its figures and shifts."""
    rows = [record.row() for record in state.records]
    parts = [rows[i: i + ROWS_PER_PART] for i in range(0, len(rows), ROWS_PER_PART)] or [[]]
    shifts = [asdict(event) for event in state.shifts]
    last = len(parts) - 1
    return [ShardRecords(run_id=shard.run_id, shard=shard.index, shards=shard.count, part=n, rows=part,
                         done=n == last, run=run if n == last else {}, shifts=shifts if n == last else [])
            for n, part in enumerate(parts)]


async def publish_records(bus, topics: Topics, shard: Shard, state: RunState, run: dict) -> None:
    """A shard's records on the reports topic, in parts."""
    for message in shard_messages(shard, state, run):
        await bus.send(topics.reports, protocol.encode(message), key=shard.run_id.encode(), partition=0)


def records_folder(scenario: Scenario, run_id: str) -> Path:
    """Where the in-process shards of run ``run_id`` write their records (``shard-k.records``): a folder of
    the run's output folder, removed once the run's report is written. A parent killed mid-run leaves it, its
    shards' records in it, for `collect_run`."""
    return Path(scenario.output) / f".shards-{run_id}"


def write_records(path: Path, messages: list[ShardRecords]) -> None:
    """An in-process shard's records: each part as on the reports topic, after its length (4 bytes, big
    endian). Written to a temporary name and renamed, so a file that exists is complete."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        for message in messages:
            data = protocol.encode(message)
            f.write(len(data).to_bytes(4, "big") + data)
    part.replace(path)


def read_records(path: Path, run_id: str, shard: int, count: int) -> list[ShardRecords]:
    """Shard ``shard``'s records from the file `write_records` wrote; an error naming the file and what is
    wrong with it when it is not one shard's complete records of run ``run_id``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DuetError(f"run {run_id}: shard {shard} wrote no records ({exc.strerror}: {path})") from exc
    messages: list[ShardRecords] = []
    at = 0
    while at < len(data):
        size = int.from_bytes(data[at: at + 4], "big")
        if at + 4 + size > len(data):
            raise DuetError(f"run {run_id}: {path}: cut short in part {len(messages)} "
                            f"({len(data) - at - 4} of {size} bytes)")
        try:
            message = protocol.decode(data[at + 4: at + 4 + size])
        except ProtocolError as exc:
            raise DuetError(f"run {run_id}: {path}: part {len(messages)} is not a shard's records ({exc})") from exc
        if not isinstance(message, ShardRecords) or (message.run_id, message.shard, message.shards,
                                                     message.part) != (run_id, shard, count, len(messages)):
            raise DuetError(f"run {run_id}: {path}: part {len(messages)} is not part {len(messages)} of shard "
                            f"{shard}/{count} of this run")
        messages.append(message)
        at += 4 + size
    if not messages or not messages[-1].done:
        raise DuetError(f"run {run_id}: {path}: shard {shard}'s last part is missing")
    return messages


async def collect_records(consumer, run_id: str, count: int, timeout_s: float,
                          running: list[asyncio.Task] | None = None, partial: bool = False) -> list[ShardRecords]:
    """Every part of every shard of run ``run_id`` from the reports topic, shard by shard, part by part.

    Stops with an error when ``timeout_s`` passes first (``partial``: returns the shards complete by then),
    or when a shard process in ``running`` ends without having published its last part.
    """
    parts: dict[int, dict[int, ShardRecords]] = {k: {} for k in range(count)}
    last: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s

    def complete(k: int) -> bool:
        return k in last and len(parts[k]) == last[k] + 1

    while not all(complete(k) for k in range(count)):
        missing = [k for k in range(count) if k not in last]
        if time.monotonic() > deadline:
            if partial:
                break
            raise BrokerError(f"run {run_id}: shard(s) {missing or 'all'} did not publish all their records "
                              f"within {timeout_s:.0f} s")
        for task in running or ():
            if task.done() and task.result() != 0:
                raise DuetError(f"run {run_id}: a shard process failed (exit code {task.result()}); see above")
        for record in await consumer.getmany(timeout_ms=200, max_records=100):
            try:
                message = protocol.decode(record.value)
            except ProtocolError:
                continue  # not ours to judge: session reports of other runs, anything
            if not isinstance(message, ShardRecords) or message.run_id != run_id:
                continue
            if message.shards != count:
                raise DuetError(f"run {run_id}: shard {message.shard} says the run has {message.shards} shards, "
                                f"this collector waits for {count}")
            parts[message.shard][message.part] = message
            if message.done:
                last[message.shard] = message.part
    return [parts[k][n] for k in range(count) if complete(k) for n in range(last[k] + 1)]


def merge(scenario: Scenario, messages: list[ShardRecords], wall_s: float,
          cloud: dict | None = None) -> tuple[list[dict], list[dict], dict]:
    """The shards' rows in the one-process order (by start, device, method), their shifts with every
    shard's devices, and the run's figures. ``cloud``: the figures of the cloud that served the shards;
    without them, the shards' own clouds (in-process shards) summed, or none ("elsewhere")."""
    order = {m: i for i, m in enumerate(scenario.methods)}
    rows = [row for m in messages for row in m.rows]
    rows.sort(key=lambda r: (r["start_s"], int(r["device_id"].split("-")[0][1:]), order[r["method"]]))
    done = [m for m in messages if m.done]
    shifts = [dict(event, devices=sorted((d for m in done for d in m.shifts[i]["devices"]),
                                         key=lambda d: int(d.split("-")[0][1:])))
              for i, event in enumerate(done[0].shifts)]
    runs = [m.run for m in done]

    def total(*path: str) -> Any:
        values = []
        for run in runs:
            for key in path:
                run = run.get(key, {})
            values.append(run)
        return sum(v for v in values if isinstance(v, (int, float)))

    virtual = max(run["virtual_s"] for run in runs)
    if cloud is None:  # the shards' own clouds (in-process shards), or workers elsewhere (`duet cloud`)
        cloud = ({k: total("cloud", k) for k in runs[0]["cloud"]} if total("cloud", "workers")
                 else {"workers": "elsewhere (duet cloud)"})
    figures = {
        "virtual_s": virtual, "wall_s": wall_s, "speedup": virtual / max(wall_s, 1e-9),
        "sessions": total("sessions"), "finished": all(run["finished"] for run in runs),
        "interrupted": any(run["interrupted"] for run in runs), "checkpoints": runs[0]["checkpoints"],
        "cloud": cloud,
        "over_the_bus": {k: total("over_the_bus", k) for k in runs[0]["over_the_bus"]},
        "fleet": {k: total("fleet", k) for k in runs[0]["fleet"]},
        "shards": [{"shard": m.shard, "sessions": m.run["sessions"], "wall_s": m.run["wall_s"]} for m in done],
    }
    return rows, shifts, figures


def write_merged(scenario: Scenario, messages: list[ShardRecords], wall_s: float,
                 cloud: dict | None = None) -> tuple[dict, Path]:
    """The one report of a run from its shards' records (`merge`), in the scenario's output folder."""
    rows, shifts, figures = merge(scenario, messages, wall_s, cloud)
    out = Path(scenario.output)
    return write_run(out, scenario_doc(scenario), rows, shifts, figures), out


def run_shard(scenario: Scenario, prepared: Any, checkpoints: dict[str, Checkpoint], shard: Shard,
              on_step: Callable[[RunState], None] | None = None) -> RunState:
    """One shard of a run: its devices against the scenario's cluster; its records go to the reports topic."""
    if scenario.bus_kind != "kafka" or not scenario.bootstrap:
        raise ConfigError("--shard: shards meet on a Kafka cluster: give bus.bootstrap (e.g. --set "
                          "bus.bootstrap=host:9092); on the in-process bus, `--shards N` splits a run over "
                          "this host's processes")
    topics = shard_topics(shard.count)

    security = kafka_security(scenario)

    async def publish(bus, state: RunState) -> None:
        await publish_records(bus, topics, shard, state, run_figures(state, checkpoints))

    async def publish_alone(state: RunState) -> None:
        bus = KafkaBus(scenario.bootstrap, security=security)
        await bus.start()
        try:
            await publish(bus, state)
        finally:
            await bus.stop()

    state = run_interruptible(lambda step: run_async(scenario, prepared, checkpoints, scenario.bootstrap, step,
                                                     topics=topics, security=security, shard=shard, then=publish),
                              on_step)
    if state.interrupted:  # stopped before (or while) its records went out: its sessions so far, on a bus of its own
        asyncio.run(publish_alone(state))
    return state


def run_memory_shard(scenario: Scenario, prepared: Any, checkpoints: dict[str, Checkpoint], shard: Shard,
                     path: Path, on_step: Callable[[RunState], None] | None = None) -> RunState:
    """One shard of `duet run --shards N` on the in-process bus: its devices and a cloud of its own in this
    process (a cloud's replies depend on nothing but the request); its records written to ``path``."""
    if scenario.bus_kind != "memory":
        raise ConfigError("--shard-out: only for shards on the in-process bus (bus.kind: memory)")
    shard = replace(shard, cloud=True)
    state = run_interruptible(lambda step: run_async(scenario, prepared, checkpoints, None, step,
                                                     topics=shard_topics(shard.count), shard=shard), on_step)
    write_records(path, shard_messages(shard, state, run_figures(state, checkpoints)))  # interrupted: so far
    return state


def collect_run(scenario: Scenario, count: int, run_id: str, timeout_s: float = 3600.0) -> tuple[dict, Path]:
    """The report of run ``run_id`` whose ``count`` shards run elsewhere: read from the start of the reports
    topic until every shard has published, then written as one run's. On the in-process bus: the records its
    shards left in `records_folder` when their parent was killed (the run's wall time is then its slowest
    shard's)."""
    if scenario.bus_kind == "memory":
        return _collect_files(scenario, count, run_id)
    if not scenario.bootstrap:
        raise ConfigError("--collect: reads the run's records from its Kafka cluster: give bus.bootstrap")

    async def collect() -> list[ShardRecords]:
        bus = KafkaBus(scenario.bootstrap, security=kafka_security(scenario))
        await bus.start()
        try:
            consumer = bus.partition_consumer(shard_topics(count).reports, 0, from_start=True)
            await consumer.start()
            try:
                return await collect_records(consumer, run_id, count, timeout_s)
            finally:
                await consumer.stop()
        finally:
            await bus.stop()

    start = time.perf_counter()
    messages = asyncio.run(collect())
    return write_merged(scenario, messages, time.perf_counter() - start)


def _collect_files(scenario: Scenario, count: int, run_id: str) -> tuple[dict, Path]:
    folder = records_folder(scenario, run_id)
    if not folder.is_dir():
        raise ConfigError(f"--collect: no records of run {run_id} in {folder} (in-process shards leave theirs "
                          f"there when their parent is killed; give the run's --output and --run-id)")
    messages = [m for k in range(count) for m in read_records(folder / f"shard-{k}.records", run_id, k, count)]
    result = write_merged(scenario, messages, max(m.run["wall_s"] for m in messages if m.done))
    shutil.rmtree(folder)
    return result


def run_sharded(scenario: Scenario, checkpoints: dict[str, Checkpoint], count: int, child_args: list[str],
                echo=print) -> tuple[dict, Path]:
    """`duet run FILE --shards N` on one host: this process holds the broker (unless the scenario names a
    cluster), the cloud workers and the collector; ``count`` child processes (``duet <child_args> --shard
    k/N``) simulate the devices. ``checkpoints`` are loaded (trained and cached) before: the shards load
    the same files from the cache. On the in-process bus each shard has a cloud of its own instead."""
    cores = os.cpu_count() or 1
    if count > cores:
        echo(f"--shards {count} on {cores} {'core' if cores == 1 else 'cores'}: the shards share cores, so the "
             f"device times measured in them (sessions timed alone) are slower than a device's")
    if scenario.bus_kind == "memory":
        run_id = secrets.token_hex(4)
        folder = records_folder(scenario, run_id)
        folder.mkdir(parents=True)
        try:
            files = [folder / f"shard-{k}.records" for k in range(count)]
            start = time.perf_counter()
            try:
                asyncio.run(_memory_sharded(run_id, files, child_args, echo))
            except KeyboardInterrupt:  # each shard was asked to stop, and wrote its sessions so far
                if not any(f.exists() for f in files):
                    raise
                echo(f"run {run_id}: interrupted; the report covers the sessions done so far")
            wall = time.perf_counter() - start
            messages = [m for k, f in enumerate(files) if f.exists() for m in read_records(f, run_id, k, count)]
            return write_merged(scenario, messages, wall)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    security = kafka_security(scenario)
    broker = EmbeddedBroker() if not scenario.bootstrap else None
    interrupted: dict[str, Any] = {}
    try:
        if broker is not None:
            broker.start()
        bootstrap = broker.bootstrap if broker is not None else scenario.bootstrap
        messages, wall, cloud = asyncio.run(_sharded(scenario, checkpoints, count, child_args, bootstrap,
                                                     security, echo, interrupted))
    except KeyboardInterrupt:  # each shard was asked to stop, and published its sessions so far
        if not interrupted.get("messages"):
            raise
        messages, wall, cloud = interrupted["messages"], interrupted["wall"], interrupted["cloud"]
    finally:
        if broker is not None:
            broker.stop()
    return write_merged(scenario, messages, wall, cloud)


async def _sharded(scenario: Scenario, checkpoints: dict[str, Checkpoint], count: int, child_args: list[str],
                   bootstrap: str, security, echo,
                   interrupted: dict[str, Any]) -> tuple[list[ShardRecords], float, dict]:
    """The Kafka side of `run_sharded`. On Ctrl-C (this task cancelled) it stops the shards, collects what
    they publish into ``interrupted`` (``asyncio.run`` then raises `KeyboardInterrupt` whatever this returns)."""
    run_id = secrets.token_hex(4)
    topics = shard_topics(count)
    bus = KafkaBus(bootstrap, security=security)
    await bus.start()
    stop = asyncio.Event()
    services = cloud_workers(scenario, bus, checkpoints, topics)
    workers: list[asyncio.Task] = []
    children: list[asyncio.Task] = []
    try:
        await bus.ensure_topics(topics.all())
        collector = bus.partition_consumer(topics.reports, 0)  # from now on: before any shard can publish
        await collector.start()
        for service in services:
            await service.start()
            workers.append(asyncio.create_task(service.run(stop)))
        await cloud_ready(services, topics)
        start = time.perf_counter()
        children = [asyncio.create_task(_child(child_args + ["--shard", f"{k}/{count}", "--run-id", run_id,
                                                             "--set", f"bus.bootstrap={bootstrap}"],
                                               echo, f"shard {k}/{count}:"))
                    for k in range(count)]
        echo(f"run {run_id}: {count} shards started, the cloud ({len(services)} worker(s)) here")
        try:
            messages = await collect_records(collector, run_id, count, timeout_s=24 * 3600, running=children)
        except asyncio.CancelledError:  # Ctrl-C: each shard is asked to stop, and publishes what it has
            for task in children:
                task.cancel()
            await asyncio.gather(*children, return_exceptions=True)
            again = bus.partition_consumer(topics.reports, 0, from_start=True)  # the parts read before, too
            await again.start()
            try:
                messages = await collect_records(again, run_id, count, timeout_s=10, partial=True)
            finally:
                await again.stop()
            interrupted.update(messages=messages, wall=time.perf_counter() - start, cloud=cloud_figures(services))
            await collector.stop()
            echo(f"run {run_id}: interrupted; the report covers the sessions done so far")
            raise
        wall = time.perf_counter() - start
        await asyncio.gather(*children)
        await collector.stop()
        return messages, wall, cloud_figures(services)
    finally:
        for task in children:
            task.cancel()
        await asyncio.gather(*children, return_exceptions=True)  # each stopped and reaped before the loop ends
        await stop_cloud(services, workers, stop)
        await bus.stop()


async def _memory_sharded(run_id: str, files: list[Path], child_args: list[str],
                          echo: Callable[[str], Any]) -> None:
    """One in-process shard per file of ``files`` as a child process, each writing its records into its
    file; the first that fails stops the others."""
    count = len(files)
    children = [asyncio.create_task(_child(child_args + ["--shard", f"{k}/{count}", "--run-id", run_id,
                                                         "--shard-out", str(files[k])], echo, f"shard {k}/{count}:"))
                for k in range(count)]
    echo(f"run {run_id}: {count} shards started, each with its own in-process cloud")
    try:
        for done in asyncio.as_completed(children):
            code = await done
            if code != 0:
                raise DuetError(f"run {run_id}: a shard process failed (exit code {code}); see above")
    finally:
        for task in children:
            task.cancel()
        await asyncio.gather(*children, return_exceptions=True)  # each stopped and reaped before the loop ends


async def _child(args: list[str], echo: Callable[[str], Any], label: str) -> int:
    """One shard process (`duet run ... --shard k/N`); its exit code. Its output lines (progress, its last
    line) are passed to ``echo`` after ``label``; its errors go to this process's stderr.

    It runs in a session of its own, so that Ctrl-C reaches only the parent, which stops it once: cancelled,
    this sends it SIGINT (a shard then reports what it has done, as a run does on Ctrl-C) and waits up to
    ``STOP_S`` for it to exit before killing it (it takes SIGINT whatever this process ignores:
    `take_parents_stop`)."""
    # Its stdin: a pipe held open and never written to, whose end tells it this process is gone.
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "duet_bus.cli", *args, "--no-dashboard",
                                                   stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                   start_new_session=True,
                                                   env={**os.environ, PARENT_ENV: str(os.getpid())})

    async def ended() -> int:  # the rest of its output, then its exit
        await process.stdout.read()
        return await process.wait()

    try:
        async for line in process.stdout:
            text = line.decode(errors="replace").strip()
            if text:  # its last line names its shard already
                echo(text if text.startswith(label.rstrip(":")) else f"{label} {text}")
        return await process.wait()
    except asyncio.CancelledError:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(ended(), STOP_S)
            except asyncio.TimeoutError:
                process.kill()
        await ended()
        raise
    finally:
        process.stdin.close()
        if process.returncode is None:  # cancelled again while it stopped (Ctrl-C twice): it ends with this run
            process.kill()
            await process.wait()  # reaped, its pipes closed, before the loop closes
