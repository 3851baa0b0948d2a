"""Two runs of one scenario side by side, session by session (`duet compare A B`).

A scenario and its seed fix every session a run simulates: which device
starts one when, what it clicks, its negatives. So two runs that differ only
in a setting (the reply encoding, the network mix, the deadline, the bus,
the number of shards) score the same sessions, and the effect of the setting
on accuracy is a paired difference, exact per session, not a comparison of
two noisy means. Delays are measured, so they differ run to run; they are set
side by side as medians.

The comparison pairs rows by session and method, says which settings differ
between the two runs' scenarios, and counts the sessions only one run has
(runs of different seeds or scenarios share few or none: an error says so).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from duet_bus.errors import DuetError
from duet_bus.report import LABELS, METRIC_NAMES, by_method, column, read_run, run_metrics

# Where a run's scenario says nothing about what it simulates (its own folder, the dashboard).
NOT_SETTINGS = ("output", "dashboard")


def compare_runs(a: Path, b: Path) -> dict:
    """The comparison document of runs ``a`` and ``b`` (their output folders): B against A."""
    (doc_a, rows_a), (doc_b, rows_b) = (_read(p) for p in (a, b))
    _, primary = run_metrics(doc_a["scenario"])
    if run_metrics(doc_b["scenario"])[1] != primary:
        raise DuetError(f"{a} and {b} score different tasks ({primary} against {run_metrics(doc_b['scenario'])[1]})")
    keys_a = set(zip(column(rows_a, "session_id"), column(rows_a, "method")))
    keys_b = set(zip(column(rows_b, "session_id"), column(rows_b, "method")))
    common = keys_a & keys_b
    if not common:
        raise DuetError(f"{a} and {b} have no session in common: runs of one scenario with the same seed (and "
                        f"data) simulate the same sessions; these differ in "
                        f"{', '.join(differences(doc_a['scenario'], doc_b['scenario'])) or 'nothing recorded'}")
    higher = primary != "logloss"
    methods: dict[str, Any] = {}
    grouped_a, grouped_b = by_method(rows_a), by_method(rows_b)
    for method in [m for m in doc_a["scenario"]["methods"] if m in grouped_a and m in grouped_b]:
        pairs = _pairs(grouped_a[method], grouped_b[method], primary)
        if not pairs:
            continue
        va, vb = (np.array(v, np.float64) for v in zip(*(p[0] for p in pairs)))
        diff = vb - va
        better = diff > 0 if higher else diff < 0
        worse = diff < 0 if higher else diff > 0
        totals_a, totals_b = (np.array(v, np.float64) for v in zip(*(p[1] for p in pairs)))
        fallbacks = [sum(p[2][k] for p in pairs) for k in (0, 1)]
        methods[method] = {
            "sessions": len(pairs), f"{primary}_a": float(va.mean()), f"{primary}_b": float(vb.mean()),
            "diff_mean": float(diff.mean()),
            "diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
            "diff_max_abs": float(np.abs(diff).max()), "better": float(better.mean()), "worse": float(worse.mean()),
            "changed": int((diff != 0).sum()),
            "total_ms_p50_a": float(np.percentile(totals_a, 50)), "total_ms_p50_b": float(np.percentile(totals_b, 50)),
            "fallbacks_a": fallbacks[0], "fallbacks_b": fallbacks[1],
        }
    return {"a": str(a), "b": str(b), "primary": primary,
            "differences": differences(doc_a["scenario"], doc_b["scenario"]),
            "only_a": len(keys_a - keys_b), "only_b": len(keys_b - keys_a), "methods": methods}


def _read(run: Path) -> tuple[dict, list[dict]]:
    if any(run.glob("seed-*/results.json")):
        raise DuetError(f"{run}: a run over seeds; compare its seed-K folders one by one")
    return read_run(run)


def _pairs(rows_a: list[dict], rows_b: list[dict], metric: str) -> list[tuple]:
    """((metric A, metric B), (total ms A, total ms B), (fallback A, fallback B)) per session both runs have."""
    b = {r["session_id"]: r for r in rows_b}
    return [((r[metric], o[metric]), (r["total_ms"], o["total_ms"]), (r["fallback"], o["fallback"]))
            for r in rows_a if (o := b.get(r["session_id"])) is not None]


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The settings in which two runs' scenarios differ, as ``key: A -> B`` (nested keys dotted)."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        if not prefix and key in NOT_SETTINGS:
            continue
        name = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{name}.")
        elif va != vb:
            out.append(f"{name}: {_short(va)} -> {_short(vb)}")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_table(doc: dict) -> Table:
    primary = doc["primary"]
    name = METRIC_NAMES.get(primary, primary)
    skipped = [f"{n} session(s) only in {side}" for n, side in ((doc["only_a"], "A"), (doc["only_b"], "B")) if n]
    table = Table(
        title=f"B against A, session by session\nA: {doc['a']}\nB: {doc['b']}",
        caption=("Settings that differ: " + ("; ".join(doc["differences"]) or "none recorded (the same scenario)")
                 + f". {name}: mean over the sessions both runs scored; Δ = B - A per session (standard error), "
                 "the shares of sessions on which B is better / worse, and the largest |Δ|. Delays are measured "
                 "in each run: p50 of the total per session, in ms."
                 + (f" Not paired: {', '.join(skipped)}." if skipped else "")),
    )
    for col in ("Method", "Sessions", f"{name} A", f"{name} B", "Δ (s.e.)", "better/worse", "max |Δ|",
                "Total p50 A", "Total p50 B", "Fallbacks A/B"):
        table.add_column(col, justify="left" if col == "Method" else "right", no_wrap=col == "Method")
    for m, r in doc["methods"].items():
        table.add_row(LABELS.get(m, m), str(r["sessions"]), f"{r[f'{primary}_a']:.4f}", f"{r[f'{primary}_b']:.4f}",
                      f"{r['diff_mean']:+.5f} ({r['diff_se']:.5f})", f"{r['better']:.0%}/{r['worse']:.0%}",
                      f"{r['diff_max_abs']:.2g}", f"{r['total_ms_p50_a']:.2f}", f"{r['total_ms_p50_b']:.2f}",
                      f"{r['fallbacks_a']}/{r['fallbacks_b']}")
    return table
