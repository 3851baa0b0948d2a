"""Scenario runner cost on this machine.

Prints, in one run:

- simulated sessions per wall second of one scenario (GRU4Rec, all four
  methods, Poisson arrivals at 2 sessions per device-hour, 60 s windows) at
  200 and 10,000 devices, with the in-process bus and over Kafka (the embedded
  broker), on the batched device side (`devices.batched`, the default) and,
  as the baseline measured in the same run, one device at a time;
- the 10,000-device run with torch's intra-op threads at the scenario's
  default (`torch_threads: 1`) against one per core, in-process and over
  Kafka;
- the same scenario at 10,000 devices in one process and split over 2
  runner processes (`duet run --shards 2`), on the in-process bus (each
  shard with its own cloud, records through files) and over Kafka (the
  cloud and the collector in the parent): the wall time of the whole command
  (start-up, data, cached checkpoints, run, report) and of the run alone
  (for shards, the slowest shard's);
- peak memory per simulated device at 1,000, 10,000 and 100,000 devices (15
  virtual minutes, in-process bus): the peak RSS of the run minus the peak RSS
  of the same run with one device (data, models, imports, bus and report all
  loaded), divided by the extra devices.

Beside each run's rate: the cores its process kept busy (its CPU time over
the run and report, divided by their wall time; the embedded broker, a
process of its own, not counted). A runner that stays at one core is bound
by its own Python under the GIL: its device batches are many small torch
operations, each taking the GIL between kernels.

Every measurement runs in a fresh child process so that peak RSS is its own.
Checkpoints are trained once (1 epoch; accuracy is not what this measures)
and cached in a temporary folder. Run: `make bench-runner` (about 20 minutes).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

SCENARIO = {
    "name": "bench", "seed": 0,
    "data": {"dataset": "ml-100k", "holdout": 0.3},
    "model": {"backbone": "gru4rec", "epochs": 1},
    "methods": ["base", "finetune", "duet_no_swa", "duet"],
    "devices": {"count": 200},
    "arrivals": {"kind": "poisson", "rate_per_hour": 2},
    "window": "60s", "duration": "3h", "dashboard": False,
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def child(kind: str, devices: int, duration: str, batched: bool, folder: str, threads: int) -> dict:
    from duet_bus.runner import load_checkpoints, prepare_data, run_scenario
    from duet_bus.scenario import parse_scenario

    doc = dict(SCENARIO, duration=duration, output=str(Path(folder) / f"{kind}-{devices}-{batched}-{threads}"))
    doc["devices"] = {"count": devices, "batched": batched}
    doc["bus"] = {"kind": kind}
    if threads:
        doc["torch_threads"] = threads
    scenario = parse_scenario(doc)
    prepared = prepare_data(scenario)
    checkpoints = load_checkpoints(scenario, prepared)
    start, cpu = time.perf_counter(), os.times()
    result, _ = run_scenario(scenario, prepared, checkpoints)
    wall, cpu_end = time.perf_counter() - start, os.times()
    # This process's CPU over the run and its report (the embedded broker, a child, not counted): cores busy.
    busy = (cpu_end.user - cpu.user + cpu_end.system - cpu.system) / wall
    return {"rss_mb": _rss_mb(), "sessions": result["run"]["sessions"], "wall_s": wall,
            "run_wall_s": result["run"]["wall_s"], "cores": busy}


def spawn(kind: str, devices: int, duration: str, batched: bool, folder: str, threads: int = 0) -> dict:
    """One run in a fresh process; ``threads``: the scenario's torch_threads (0: its default, 1)."""
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(devices), duration, str(int(batched)),
                          folder, str(threads)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {kind}/{devices} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sharded(kind: str, shards: int, folder: str) -> tuple[int, float, float]:
    """`duet run` of the 10,000-device scenario on bus ``kind`` with ``shards`` processes: (sessions, wall s
    of the command, wall s of the run alone: for shards, the slowest shard's)."""
    import yaml

    doc = dict(SCENARIO, duration="15m", output=str(Path(folder) / f"shards-{kind}-{shards}"))
    doc["devices"] = {"count": 10_000}
    doc["bus"] = {"kind": kind}
    path = Path(folder) / f"shards-{kind}.yaml"
    path.write_text(yaml.safe_dump(doc))
    args = [sys.executable, "-m", "duet_bus.cli", "run", str(path), "--no-dashboard"]
    start = time.perf_counter()
    subprocess.run(args + (["--shards", str(shards)] if shards > 1 else []), capture_output=True, check=True)
    wall = time.perf_counter() - start
    run = json.loads((Path(doc["output"]) / "results.json").read_text())["run"]
    return run["sessions"], wall, max((s["wall_s"] for s in run.get("shards", ())), default=run["wall_s"])


def main() -> None:
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as folder:
        console.print("training the bench checkpoints (1 epoch each, cached for the rest of the run)")
        spawn("memory", 1, "1m", True, folder)

        table = Table(title="Simulated sessions per wall second (GRU4Rec, 4 methods; the run's own wall time)")
        for col in ("Devices", "Virtual", "Bus", "Device side", "Sessions", "Wall s", "Sessions / s",
                    "vs one at a time", "Runner's cores busy"):
            table.add_column(col, justify="right")
        for devices, duration in ((200, "3h"), (10_000, "15m")):
            for kind in ("memory", "kafka"):
                rates = {}
                for batched in (False, True):
                    r = spawn(kind, devices, duration, batched, folder)
                    rates[batched] = r["sessions"] / r["run_wall_s"]
                    table.add_row(f"{devices:,}", duration, "in-process" if kind == "memory" else "Kafka (Tansu)",
                                  "batched" if batched else "one at a time", f"{r['sessions']:,}",
                                  f"{r['run_wall_s']:.1f}", f"{rates[batched]:,.0f}",
                                  f"{rates[batched] / rates[False]:.1f}x", f"{r['cores']:.2f}")
        console.print(table)

        cores = os.cpu_count() or 1
        table = Table(title=f"torch threads during the run (10,000 devices, 15 virtual min, batched; "
                            f"{cores} cores)")
        for col in ("Bus", "torch_threads", "Sessions", "Wall s", "Sessions / s", f"vs {cores} threads"):
            table.add_column(col, justify="right")
        for kind in ("memory", "kafka"):
            rates = {}
            for threads in (cores, 1):
                r = spawn(kind, 10_000, "15m", True, folder, threads)
                rates[threads] = r["sessions"] / r["run_wall_s"]
                table.add_row("in-process" if kind == "memory" else "Kafka (Tansu)",
                              f"{threads}" + (" (default)" if threads == 1 else ""), f"{r['sessions']:,}",
                              f"{r['run_wall_s']:.1f}", f"{rates[threads]:,.0f}", f"{rates[threads] / rates[cores]:.2f}x")
        console.print(table)

        table = Table(title="One run over shards (10,000 devices, 15 virtual min; the whole command: start-up, "
                            "data, cached checkpoints, run, report; the run alone: for shards, the slowest shard's)")
        for col in ("Bus", "Processes", "Sessions", "Command wall s", "Sessions / s", "vs one process",
                    "Run wall s", "Sessions / s", "vs one process"):
            table.add_column(col, justify="right")
        for kind in ("memory", "kafka"):
            walls, runs = {}, {}
            for shards in (1, 2):
                sessions, walls[shards], runs[shards] = sharded(kind, shards, folder)
                table.add_row("in-process" if kind == "memory" else "Kafka (Tansu)", str(shards), f"{sessions:,}",
                              f"{walls[shards]:.1f}", f"{sessions / walls[shards]:,.0f}",
                              f"{walls[1] / walls[shards]:.2f}x", f"{runs[shards]:.1f}",
                              f"{sessions / runs[shards]:,.0f}", f"{runs[1] / runs[shards]:.2f}x")
        console.print(table)

        table = Table(title="Peak memory per simulated device (in-process bus, batched, 4 methods, 15 virtual min)")
        for col in ("Devices", "Sessions", "Peak RSS MB", "1-device run MB", "kB / device", "Wall s"):
            table.add_column(col, justify="right")
        baseline = spawn("memory", 1, "15m", True, folder)["rss_mb"]
        for n in (1_000, 10_000, 100_000):
            r = spawn("memory", n, "15m", True, folder)
            per = (r["rss_mb"] - baseline) * 1024 / (n - 1)
            table.add_row(f"{n:,}", f"{r['sessions']:,}", f"{r['rss_mb']:.0f}", f"{baseline:.0f}", f"{per:.1f}",
                          f"{r['run_wall_s']:.0f}")
        console.print(table)


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1", sys.argv[6],
                               int(sys.argv[7]))))
    else:
        main()
