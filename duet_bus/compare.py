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
Two runs over seeds (`duet run --seeds N`) pair seed with seed: the paired
difference pooled over all their sessions, and each seed's beside it, since
retraining moves a method by more than the sessions' standard error says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from duet_bus.errors import DuetError
from duet_bus.report import LABELS, METRIC_NAMES, by_method, column, is_seeds_folder, read_run, run_metrics

# Keys of a run's scenario that say nothing about what it simulates (its own folder, the dashboard).
NOT_SETTINGS = ("output", "dashboard")


def compare_runs(a: Path, b: Path) -> dict:
    """The comparison document of runs ``a`` and ``b`` (their output folders): B against A. Two runs over seeds
    (`duet run --seeds N`) pair seed with seed, and add each method's difference per seed (mean, std over
    seeds, the seeds on which B is better)."""
    (scenario_a, seeds_a, rows_a), (scenario_b, seeds_b, rows_b) = (_read(p) for p in (a, b))
    if (seeds_a is None) != (seeds_b is None):
        raise DuetError(f"{a if seeds_a is not None else b} is a run over seeds and the other is not; compare "
                        f"runs of one kind (or a seed-K folder with a run of that seed)")
    _, primary = run_metrics(scenario_a)
    if run_metrics(scenario_b)[1] != primary:
        raise DuetError(f"{a} and {b} score different tasks ({primary} against {run_metrics(scenario_b)[1]})")
    keys_a = set(zip(column(rows_a, "session_id"), column(rows_a, "method")))
    keys_b = set(zip(column(rows_b, "session_id"), column(rows_b, "method")))
    if not keys_a & keys_b:
        raise DuetError(f"{a} and {b} have no session in common: runs of one scenario with the same seed (and "
                        f"data) simulate the same sessions; these differ in "
                        f"{', '.join(differences(scenario_a, scenario_b)) or 'nothing recorded'}")
    higher = primary != "logloss"  # the primary metrics (AUC, accuracy) are better higher
    methods: dict[str, Any] = {}
    grouped_a, grouped_b = by_method(rows_a), by_method(rows_b)
    for method in [m for m in scenario_a["methods"] if m in grouped_a and m in grouped_b]:
        pairs = _pairs(grouped_a[method], grouped_b[method], primary)
        if pairs:
            methods[method] = _paired(pairs, primary, higher)
            if seeds_a is not None:
                methods[method] |= _per_seed(pairs, higher)
    return {"a": str(a), "b": str(b), "primary": primary, "differences": differences(scenario_a, scenario_b),
            "seeds": sorted(set(seeds_a) & set(seeds_b)) if seeds_a is not None else None,
            "only_a": len(keys_a - keys_b), "only_b": len(keys_b - keys_a), "methods": methods}


def _read(run: Path) -> tuple[dict, list[int] | None, list[dict]]:
    """A run folder's scenario, its seeds (a run over seeds; None for one run) and its rows; a run over seeds'
    rows are every seed's, their session ids prefixed with the seed."""
    if not is_seeds_folder(run):
        doc, rows = read_run(run)
        return doc["scenario"], None, rows
    doc = json.loads((run / "results.json").read_text())
    rows = [{**r, "session_id": f"{seed}/{r['session_id']}"}
            for seed in doc["seeds"] for r in read_run(run / f"seed-{seed}")[1]]
    return doc["scenario"], list(doc["seeds"]), rows


def _pairs(rows_a: list[dict], rows_b: list[dict], metric: str) -> list[tuple]:
    """(session id, (metric A, metric B), (total ms A, total ms B), (fallback A, fallback B)) per session both
    runs have."""
    b = {r["session_id"]: r for r in rows_b}
    return [(r["session_id"], (r[metric], o[metric]), (r["total_ms"], o["total_ms"]), (r["fallback"], o["fallback"]))
            for r in rows_a if (o := b.get(r["session_id"])) is not None]


def _paired(pairs: list[tuple], primary: str, higher: bool) -> dict:
    va, vb = (np.array(v, np.float64) for v in zip(*(p[1] for p in pairs)))
    diff = vb - va
    better, worse = (diff > 0, diff < 0) if higher else (diff < 0, diff > 0)
    totals_a, totals_b = (np.array(v, np.float64) for v in zip(*(p[2] for p in pairs)))
    return {
        "sessions": len(pairs), f"{primary}_a": float(va.mean()), f"{primary}_b": float(vb.mean()),
        "diff_mean": float(diff.mean()),
        "diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
        "diff_max_abs": float(np.abs(diff).max()), "better": float(better.mean()), "worse": float(worse.mean()),
        "changed": int((diff != 0).sum()),
        "total_ms_p50_a": float(np.percentile(totals_a, 50)), "total_ms_p50_b": float(np.percentile(totals_b, 50)),
        "fallbacks_a": sum(p[3][0] for p in pairs), "fallbacks_b": sum(p[3][1] for p in pairs),
    }


def _per_seed(pairs: list[tuple], higher: bool) -> dict:
    """Of a run over seeds: the mean difference of each seed, their mean and std, the seeds B is better on."""
    by_seed: dict[str, list[float]] = {}
    for session, (va, vb), _, _ in pairs:
        by_seed.setdefault(session.split("/", 1)[0], []).append(vb - va)
    means = [float(np.mean(v)) for v in by_seed.values()]
    return {"seed_mean": float(np.mean(means)), "seed_std": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0,
            "seeds_better": sum(m > 0 if higher else m < 0 for m in means), "seeds_compared": len(means)}


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
    over = f", seeds {', '.join(map(str, doc['seeds']))} pooled" if doc["seeds"] is not None else ""
    table = Table(
        title=f"B against A, session by session{over}\nA: {doc['a']}\nB: {doc['b']}",
        caption=("Settings that differ: " + ("; ".join(doc["differences"]) or "none recorded (the same scenario)")
                 + f". {name}: mean over the sessions both runs scored; Δ = B - A per session (standard error), "
                 "the shares of sessions on which B is better / worse, and the largest |Δ|"
                 + ("; Δ per seed: each seed's mean Δ, mean ± std over seeds" if doc["seeds"] is not None else "")
                 + ". Delays are measured in each run: p50 of the total per session, in ms."
                 + (f" Not paired: {', '.join(skipped)}." if skipped else "")),
    )
    seeds = doc["seeds"] is not None
    for col in ("Method", "Sessions", f"{name} A", f"{name} B", "Δ (s.e.)", "better/worse", "max |Δ|",
                *(("Δ per seed", "seeds better") if seeds else ()), "Total p50 A", "Total p50 B", "Fallbacks A/B"):
        table.add_column(col, justify="left" if col == "Method" else "right", no_wrap=col == "Method")
    for m, r in doc["methods"].items():
        per_seed = (f"{r['seed_mean']:+.5f} ± {r['seed_std']:.5f}", f"{r['seeds_better']}/{r['seeds_compared']}"
                    ) if seeds else ()
        table.add_row(LABELS.get(m, m), str(r["sessions"]), f"{r[f'{primary}_a']:.4f}", f"{r[f'{primary}_b']:.4f}",
                      f"{r['diff_mean']:+.5f} ({r['diff_se']:.5f})", f"{r['better']:.0%}/{r['worse']:.0%}",
                      f"{r['diff_max_abs']:.2g}", *per_seed, f"{r['total_ms_p50_a']:.2f}",
                      f"{r['total_ms_p50_b']:.2f}", f"{r['fallbacks_a']}/{r['fallbacks_b']}")
    return table
