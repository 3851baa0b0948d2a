"""Faults and load on the real embedded broker: what is started, answered, fell back, lost.

Every part runs the shipped processes (`duet broker`, `duet cloud`, `duet run`)
as separate processes, each on its own broker, and injects the fault for real:

1. broker killed (SIGKILL) and restarted mid-scenario: `duet run` of the
   quickstart scenario against `duet broker`, the broker killed at about a
   fifth of the virtual run and started again on the same port 3 s later;
2. one of two cloud workers killed with SIGKILL while 100 devices stream
   sessions: the other takes its partitions; duplicate and late replies are
   dropped and counted;
3. a fuzz run: 10,000 hostile records (`duet_bus.testing.hostile_records`)
   against a live `duet cloud`: every record must end answered or
   dead-lettered, the worker must stay up; its RSS before and after;
4. a load test: 1,000 devices for at most 60 s, offered load doubling every
   8 s until sessions fall back: sessions/s, round trip p50/p99.

Parts 2-4 serve an untrained GRU4Rec DUET (N_p = 5) on ML-100k shapes: the
bus does not care what the weights are. Run: `make bench-faults` (about 4
minutes here; part 1 trains the quickstart's models first unless cached), or
`python bench/bench_faults.py [broker] [worker] [fuzz] [load]` for some parts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from devices import DeviceAgent, Fleet, FleetConfig
from duet_bus import checkpoint, process
from duet_bus.broker import free_port
from duet_bus.bus import KafkaBus, Topics
from duet_bus.data import load_dataset, prepare
from duet_bus.data.streams import offline_test_sessions
from duet_bus.testing import hostile_records

sys.path.insert(0, str(Path(__file__).parent))
from bench_bus import untrained_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
console = Console(width=160)
logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
logging.getLogger("duet").setLevel(logging.ERROR)


class Proc:
    """A `duet ...` process whose output lines are collected (with their time) in a thread."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "duet_bus.cli", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in iter(self.popen.stdout.readline, ""):
            self.lines.append((time.monotonic(), line.rstrip()))

    def wait_for(self, pattern: str, timeout_s: float) -> float | None:
        """When a line matching ``pattern`` appeared (monotonic), or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for at, line in list(self.lines):
                if re.search(pattern, line):
                    return at
            time.sleep(0.05)
        return None

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.popen.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def broker(port: int) -> Proc:
    proc = Proc("broker", "--port", str(port))
    if proc.wait_for("embedded Kafka-compatible broker", 30) is None:
        raise RuntimeError(f"duet broker did not start: {proc.lines}")
    return proc


def cloud(bootstrap: str, ckpt: Path) -> Proc:
    proc = Proc("cloud", "--bootstrap", bootstrap, "--checkpoint", str(ckpt))
    if proc.wait_for(r"partitions of duet\.sessions: \d", 60) is None:
        raise RuntimeError(f"duet cloud did not start: {proc.lines}")
    return proc


# -- 1. broker killed mid-scenario ----------------------------------------------------------------

def broker_restart(tmp: Path) -> dict:
    port = free_port()
    doc = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())
    doc.update(name="faults-broker-restart", output="runs/faults-broker-restart", dashboard=False)
    doc["bus"] = {"bootstrap": f"127.0.0.1:{port}"}
    path = tmp / "broker_restart.yaml"
    path.write_text(yaml.safe_dump(doc))
    first = broker(port)
    run = Proc("run", str(path), "--no-dashboard")
    try:
        if run.wait_for(r"virtual\s+1\.[2-9]", 900) is None:
            raise RuntimeError(f"duet run did not get going: {run.lines[-5:]}")
        first.popen.kill()  # SIGKILL: the broker dies with its wrapper
        first.popen.wait(10)
        time.sleep(3)
        second = broker(port)
        try:
            run.popen.wait(900)
        finally:
            second.stop()
    finally:
        run.stop()
        first.stop()
    if run.popen.returncode != 0:
        raise RuntimeError(f"duet run failed: {run.lines[-10:]}")
    results = json.loads((ROOT / "runs" / "faults-broker-restart" / "results.json").read_text())
    bus = results["run"]["over_the_bus"]
    fleet = results["run"]["fleet"]
    return {"fault": "broker SIGKILLed at 1.2 virtual h, back 3 s later (`duet run` quickstart)", **bus,
            "notes": f"run finished; {fleet['dropped_duplicates']} late/duplicate replies dropped, "
                     f"{fleet['reports_unpublished']} reports unpublished, "
                     f"{results['run']['cloud']['delivery_retries']} cloud delivery retries"}


# -- 2. one of two workers killed -----------------------------------------------------------------

async def _stream(bootstrap: str, ckpt, sessions, seconds: float, on_tick=None) -> tuple[list, Fleet, int]:
    """100 devices, each running its session back to back (0.1 s apart) for ``seconds``."""
    bus = KafkaBus(bootstrap)
    await bus.start()
    fleet = Fleet(bus, FleetConfig(deadline_s=2.0, publish_reports=False))
    await fleet.start()
    reports: list = []
    end = time.monotonic() + seconds

    async def device(s):
        agent = DeviceAgent(s.device_id, ckpt, fleet)
        while time.monotonic() < end:
            reports.append((time.monotonic(), await fleet.run(agent, s)))
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(device(s)) for s in sessions[:100]]
    if on_tick is not None:
        await on_tick()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await fleet.stop()
    await bus.stop()
    lost = sum(isinstance(r, BaseException) for r in results)
    return reports, fleet, lost


def worker_kill(ckpt_path: Path, ckpt, sessions) -> dict:
    port = free_port()
    b = broker(port)
    bootstrap = f"127.0.0.1:{port}"
    workers = [cloud(bootstrap, ckpt_path)]
    workers.append(cloud(bootstrap, ckpt_path))
    # the first worker gives up half of the partitions once the second joins
    workers[1].wait_for(r"partitions of duet\.sessions: \d", 30)
    time.sleep(3)
    killed = {}

    async def kill_later():
        await asyncio.sleep(10)
        workers[0].popen.kill()
        killed["at"] = time.monotonic()

    try:
        reports, fleet, lost = asyncio.run(_stream(bootstrap, ckpt, sessions, 30, kill_later))
        took = workers[1].wait_for(r"partitions of duet\.sessions: 0, 1, 2, 3", 1)
    finally:
        for w in workers:
            w.stop()
        b.stop()
    started = fleet.stats.sessions + lost
    fell_back = sum(r.fallback for _, r in reports)
    after = [r for t, r in reports if took is not None and t > took + 1]
    return {"fault": "1 of 2 cloud workers SIGKILLed, 100 devices streaming for 30 s", "started": started,
            "answered": len(reports) - fell_back, "fell_back": fell_back, "lost": started - len(reports),
            "notes": f"survivor owned all partitions {took - killed['at']:.1f} s after the kill; "
                     f"{sum(r.fallback for r in after)} fallbacks after that; "
                     f"{fleet.stats.dropped_duplicates} duplicate/late replies dropped"
            if took else "the survivor never owned all partitions"}


# -- 3. fuzzing a live worker ---------------------------------------------------------------------

async def _fuzz(bootstrap: str, ckpt, count: int, sessions) -> dict:
    bus = KafkaBus(bootstrap)
    await bus.start()
    topics = Topics()
    spec = ckpt.spec
    records = list(hostile_records(count, seed=0, model_version=spec.model_version, reply_topic=topics.weights,
                                   n_items=spec.n_items, realtime_len=spec.realtime_len))
    sent = await bus.send_many([(topics.sessions, r, b"fuzz-%d" % i, None) for i, r in enumerate(records)])
    assert sent == [None] * count, "the broker refused fuzz records"
    readers = [bus.group_consumer([t], f"fuzz-count-{t}") for t in (topics.weights, topics.deadletter)]
    for r in readers:
        await r.start()
    seen = [0, 0]
    deadline = time.monotonic() + 180
    while sum(seen) < count and time.monotonic() < deadline:
        for i, r in enumerate(readers):
            seen[i] += len(await r.getmany(200, 5000))
    for r in readers:
        await r.stop()
    fleet = Fleet(bus, FleetConfig(deadline_s=5.0, publish_reports=False))
    await fleet.start()
    after = await asyncio.gather(*(fleet.run(DeviceAgent(s.device_id, ckpt, fleet), s) for s in sessions[:50]))
    await fleet.stop()
    await bus.stop()
    return {"answered": seen[0], "dead_lettered": seen[1], "valid_after": sum(not r.fallback for r in after)}


def fuzz(ckpt_path: Path, ckpt, sessions, count: int = 10_000) -> dict:
    port = free_port()
    b = broker(port)
    worker = cloud(f"127.0.0.1:{port}", ckpt_path)
    try:
        before = worker.rss_mb()
        out = asyncio.run(_fuzz(f"127.0.0.1:{port}", ckpt, count, sessions))
        alive = worker.popen.poll() is None
        after_mb = worker.rss_mb() if alive else float("nan")
    finally:
        worker.stop()
        b.stop()
    return {"fault": f"{count:,} hostile records of ~30 kinds, then 50 valid sessions", "started": count,
            "answered": out["answered"], "fell_back": 0, "lost": count - out["answered"] - out["dead_lettered"],
            "dead_lettered": out["dead_lettered"],
            "notes": f"worker {'up' if alive else 'DIED'}; RSS {before:.0f} -> {after_mb:.0f} MB; "
                     f"then {out['valid_after']}/50 valid sessions answered"}


# -- 4. load ----------------------------------------------------------------------------------------

async def _load(bootstrap: str, ckpt, sessions, budget_s: float = 60.0, step_s: float = 8.0) -> list[dict]:
    bus = KafkaBus(bootstrap)
    await bus.start()
    fleet = Fleet(bus, FleetConfig(deadline_s=2.0, publish_reports=False))
    await fleet.start()
    agents = [DeviceAgent(f"load-{i}", ckpt, fleet) for i in range(1000)]
    rng = np.random.default_rng(0)
    rows, rate, start = [], 100, time.monotonic()
    while time.monotonic() - start + step_s <= budget_s:
        results: list = []

        async def one(agent, session):
            delay: dict = {}
            reply = await fleet.request(agent, session, delay, {})
            results.append(delay.get("round_trip_ms") if reply is not None else None)

        tasks, t0 = [], time.monotonic()
        for k in range(int(rate * step_s)):
            await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(agents[int(rng.integers(1000))],
                                                 sessions[int(rng.integers(len(sessions)))])))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        rtt = [r for r in results if r is not None]
        rows.append({"offered": rate, "achieved": len(rtt) / elapsed, "p50": float(np.percentile(rtt, 50)) if rtt
                     else float("nan"), "p99": float(np.percentile(rtt, 99)) if rtt else float("nan"),
                     "fallbacks": len(results) - len(rtt), "sessions": len(results)})
        if rows[-1]["fallbacks"]:
            break
        rate *= 2
    await fleet.stop()
    await bus.stop()
    return rows


def load(ckpt_path: Path, ckpt, sessions) -> list[dict]:
    port = free_port()
    b = broker(port)
    worker = cloud(f"127.0.0.1:{port}", ckpt_path)
    try:
        return asyncio.run(_load(f"127.0.0.1:{port}", ckpt, sessions))
    finally:
        worker.stop()
        b.stop()


def main(parts: list[str]) -> None:
    process.set_torch_threads(1)  # the device side as `duet devices` runs it (`--torch-threads`, default 1)
    prepared = prepare(load_dataset("ml-100k"), seed=0)
    sessions = offline_test_sessions(prepared)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "duet.pt"
        model = untrained_checkpoint(prepared)
        checkpoint.save(path, model.model, prepared)
        ckpt = checkpoint.load(path)
        process.freeze_startup_heap()  # as `duet devices` does once its sessions are loaded
        rows, load_rows = [], []
        for name, part in (("broker", lambda: broker_restart(tmp)),
                           ("worker", lambda: worker_kill(path, ckpt, sessions)),
                           ("fuzz", lambda: fuzz(path, ckpt, sessions))):
            if name in parts:
                console.print(f"[bold]{name}[/] ...")
                rows.append(part())
                console.print(rows[-1])
        if "load" in parts:
            console.print("[bold]load[/] ...")
            load_rows = load(path, ckpt, sessions)

    table = Table(title="Faults injected on the embedded broker (this machine)")
    for col in ("fault", "started", "answered", "fell back", "lost", "dead-lettered", "notes"):
        table.add_column(col, justify="left" if col in ("fault", "notes") else "right")
    for r in rows:
        table.add_row(r["fault"], f"{r['started']:,}", f"{r['answered']:,}", f"{r['fell_back']:,}",
                      f"{r['lost']:,}", f"{r.get('dead_lettered', 0):,}", r["notes"])
    console.print(table)
    if not load_rows:
        return
    table = Table(title="Load: 1,000 devices, one cloud worker, offered load doubling every 8 s (request to weights)")
    for col in ("offered sessions/s", "answered sessions/s", "round trip p50 ms", "p99 ms", "fallbacks"):
        table.add_column(col, justify="right")
    for r in load_rows:
        table.add_row(f"{r['offered']:,}", f"{r['achieved']:,.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
                      f"{r['fallbacks']:,} of {r['sessions']:,}")
    console.print(table)
    first = next((r["offered"] for r in load_rows if r["fallbacks"]), None)
    console.print(f"fallbacks start at {first:,} sessions/s offered" if first else
                  f"no fallbacks up to {load_rows[-1]['offered']:,} sessions/s offered (60 s budget)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["broker", "worker", "fuzz", "load"])
