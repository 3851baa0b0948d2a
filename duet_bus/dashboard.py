"""The live console of a scenario run (`rich.live`).

It reads the runner's `RunState` after every virtual instant with sessions and
redraws at most ``refresh_hz`` times a wall second: virtual time and speed-up,
sessions and the running primary metric (AUC, accuracy) per method (overall and on shifted devices since the
last shift), delay percentiles split into upload / bus / cloud (generation) /
download / device compute, the cloud's batch sizes and consumer lag,
fallbacks and dead letters.
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from duet_bus.report import METRIC_NAMES, LABELS
from duet_bus.runner import RunState
from duet_bus.tasks import task_named


RECENT = 2000  # sessions per method the delay percentiles are taken over


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render(state: RunState) -> Group:
    s = state.scenario
    speedup = state.now_s / state.wall_s if state.wall_s > 0 else 0.0
    head = Text.assemble(
        (f"{s.name}", "bold"),
        f"  virtual {_hms(state.now_s)} / {_hms(s.duration_s)}",
        f"  wall {state.wall_s:.1f} s  speed-up x{speedup:,.0f}",
        f"  sessions {state.sessions}  devices active {state.devices_active}",
        f"  fallbacks {state.fallbacks}",
        f"  (delays: the last {RECENT:,} sessions of each method)",
    )
    last = state.shifts[-1] if state.shifts else None
    primary = task_named(s.task).primary
    name = METRIC_NAMES.get(primary, primary)
    table = Table(expand=False, title_justify="left")
    for col in ("Method", "Sessions", name, f"{name} since {last.label}" if last else f"{name} since shift",
                "upload p50", "bus p50", "cloud p50", "gen p50", "download p50", "device p50", "total p95"):
        table.add_column(col, justify="left" if col == "Method" else "right")
    # Counts and means over the whole run (running totals); delay percentiles over the recent sessions.
    by_method: dict[str, list] = {m: [] for m in s.methods}
    for r in state.records[-RECENT * len(s.methods):]:
        by_method[r.method].append(r)
    for m, rows in by_method.items():
        totals = state.totals.get(m)
        if not rows or totals is None:
            table.add_row(LABELS.get(m, m), "0", *["-"] * 9)
            continue
        p50 = lambda key: f"{np.percentile([getattr(r, key) for r in rows], 50):.2f}"  # noqa: E731
        table.add_row(
            LABELS.get(m, m), str(totals.sessions), f"{totals.total / totals.sessions:.4f}",
            f"{totals.since_shift_total / totals.since_shift:.4f} ({totals.since_shift})"
            if last and totals.since_shift else "-",
            p50("upload_ms"), p50("bus_ms"), p50("cloud_ms"), p50("generation_ms"), p50("download_ms"),
            f"{np.percentile([r.finetune_ms + r.compute_ms for r in rows], 50):.2f}",
            f"{np.percentile([r.total_ms for r in rows], 95):.2f}",
        )
    cloud = state.cloud
    batches = [b for c in cloud for b in c.stats.batch_sizes]
    cloud_line = Text(
        f"cloud: {len(cloud)} worker(s), {sum(c.stats.served for c in cloud)} served, "
        f"{sum(c.stats.batches for c in cloud)} batches (recent mean size "
        f"{np.mean(batches) if batches else 0:.1f}, max {max(batches, default=0)}), "
        f"consumer lag {sum(c.stats.lag for c in cloud)}, dead letters {sum(c.stats.dead_letters for c in cloud)}"
    )
    shifts_line = Text("shifts: " + (", ".join(f"{e.label} ({len(e.devices)} devices)" for e in state.shifts)
                                     or "none yet"), style="dim")
    return Group(head, table, cloud_line, shifts_line, Text("delays in ms; upload/download modelled, "
                                                            "the rest measured", style="dim"))


class Dashboard:
    """``with Dashboard(console) as d: runner.on_step = d.update``."""

    def __init__(self, console: Console, refresh_hz: float = 4.0) -> None:
        self.console = console
        self.interval = 1.0 / refresh_hz
        self._last = 0.0
        self._live = Live(console=console, auto_refresh=False, transient=False)

    def __enter__(self) -> "Dashboard":
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.__exit__(*exc)

    def update(self, state: RunState) -> None:
        now = time.perf_counter()
        if now - self._last >= self.interval or state.finished or state.interrupted:
            self._last = now
            self._live.update(render(state), refresh=True)
