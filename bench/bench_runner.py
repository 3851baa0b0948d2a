"""Scenario runner cost on this machine.

Prints, in one run:

- simulated sessions per wall second of the same scenario (200 devices, all
  four methods, GRU4Rec) with the in-process bus and with Kafka (the embedded
  broker), and their ratio;
- peak memory per simulated device at 1k and 10k devices (peak RSS of a run
  minus the peak RSS of the same process with data and models loaded and no
  device, divided by the device count).

Every measurement runs in a fresh child process so that peak RSS is its own.
Checkpoints are trained once (1 epoch; accuracy is not what this measures)
and cached in a temporary folder. Run: `make bench-runner`.
"""

from __future__ import annotations

import json
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


def child(kind: str, devices: int, duration: str, folder: str) -> dict:
    from duet_bus.runner import load_checkpoints, prepare_data, run_scenario
    from duet_bus.scenario import parse_scenario

    doc = dict(SCENARIO, duration=duration, output=str(Path(folder) / f"{kind}-{devices}"))
    doc["devices"] = {"count": max(devices, 1)}  # 0: load data and models, run nothing
    doc["bus"] = {"kind": kind}
    scenario = parse_scenario(doc)
    prepared = prepare_data(scenario)
    checkpoints = load_checkpoints(scenario, prepared)
    loaded = _rss_mb()
    if devices == 0:
        return {"rss_mb": loaded}
    start = time.perf_counter()
    result, _ = run_scenario(scenario, prepared, checkpoints)
    wall = time.perf_counter() - start
    return {"rss_mb": _rss_mb(), "loaded_mb": loaded, "sessions": result["run"]["sessions"], "wall_s": wall,
            "run_wall_s": result["run"]["wall_s"]}


def spawn(kind: str, devices: int, duration: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(devices), duration, folder],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {kind}/{devices} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    console = Console()
    with tempfile.TemporaryDirectory() as folder:
        console.print("training the bench checkpoints (1 epoch each, cached for the rest of the run)")
        spawn("memory", 0, "3h", folder)

        table = Table(title="Simulated sessions per wall second (200 devices, 4 methods, 3 virtual hours)")
        for col in ("Bus", "Sessions", "Wall s", "Sessions / s", "vs in-process"):
            table.add_column(col, justify="right")
        rates = {}
        for kind in ("memory", "kafka"):
            r = spawn(kind, 200, "3h", folder)
            rates[kind] = r["sessions"] / r["run_wall_s"]
            table.add_row("in-process" if kind == "memory" else "Kafka (embedded Tansu)", str(r["sessions"]),
                          f"{r['run_wall_s']:.1f}", f"{rates[kind]:.1f}", f"{rates[kind] / rates['memory']:.2f}x")
        console.print(table)

        table = Table(title="Peak memory per simulated device (Kafka, 4 methods, 15 virtual minutes)")
        for col in ("Devices", "Sessions", "Peak RSS MB", "Baseline MB", "KB / device"):
            table.add_column(col, justify="right")
        baseline = spawn("kafka", 0, "15m", folder)["rss_mb"]
        for n in (1000, 10000):
            r = spawn("kafka", n, "15m", folder)
            per = (r["rss_mb"] - baseline) * 1024 / n
            table.add_row(f"{n:,}", str(r["sessions"]), f"{r['rss_mb']:.0f}", f"{baseline:.0f}", f"{per:.1f}")
        console.print(table)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])))
    else:
        main()
