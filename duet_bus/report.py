"""Render results: the paper's Table 1 from an evaluation document, and a scenario run's report.

A run directory holds ``results.json`` (the scenario, per-method metrics with
mean and std over sessions, the delay breakdown with measured and modelled
parts apart, payload sizes, the shifts), ``sessions.csv`` (one row per session
and method) and PNG plots. Everything here is computed from those rows, so
`duet report RUN_DIR` re-renders the same table and plots from the files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from operator import attrgetter, itemgetter
from pathlib import Path

import numpy as np
from rich.table import Table

from duet_bus.errors import DuetError

LABELS = {"base": "Base (no DMG)", "finetune": "Fine-tuning", "duet_no_swa": "DUET (w/o SWA)", "duet": "DUET"}


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


METRIC_NAMES = {"auc": "AUC", "gauc": "GAUC", "ndcg10": "NDCG@10", "hr10": "HR@10", "logloss": "LogLoss",
                 "accuracy": "Accuracy"}


def label(method: str, generators: int | None = None) -> str:
    """How tables and plots name a method (``duet_np3`` -> ``DUET (N_p=3)``)."""
    if method in LABELS:
        return LABELS[method] + (f" (N_p={generators})" if method == "duet" and generators else "")
    return f"DUET (N_p={method.removeprefix('duet_np')})" if method.startswith("duet_np") else method


def table1(doc: dict) -> Table:
    """The paper's Table 1 / Table 2 shape: the primary metric's mean and std over seeds, the other
    metrics' means, device cost and delay; columns from the task's metrics."""
    seeds = len(doc["seeds"])
    metrics = doc.get("metrics", ["auc", "gauc", "ndcg10", "hr10", "logloss"])
    primary = doc.get("primary", metrics[0])
    others = [m for m in metrics if m != primary]
    table = Table(
        title=f"{doc['dataset']} / {doc['backbone']}: {seeds} seed{'s' if seeds != 1 else ''} "
        f"(mean, sample std)",
        caption="LR*: needs labels of the device's real-time data. Delay p50, measured on this CPU: "
        "fine-tuning = on-device compute; DUET = cloud generation of one session (network not included).",
    )
    name = METRIC_NAMES.get(primary, primary)
    for column in ("Method", "LR*", f"{name} mean", f"{name} std", *(METRIC_NAMES.get(m, m) for m in others),
                   "Param.", "FLOPs", "Delay p50"):
        table.add_column(column, justify="left" if column == "Method" else "right")
    device = doc.get("device", {})
    for method, m in doc["methods"].items():
        delay = "0" if method == "base" else f"{m['delay_ms_p50']:.2f} ms"
        table.add_row(
            label(method, m.get("generators")),
            "yes" if m.get("needs_labels") else "",
            f"{m[f'{primary}_mean']:.4f}",
            f"{m[f'{primary}_std']:.4f}",
            *(f"{m[f'{o}_mean']:.4f}" for o in others),
            _si(device.get("params", 0)),
            _si(device.get("flops_per_sample", 0)),
            delay,
        )
    return table


def swa_sweep(doc: dict) -> list[tuple[int, str]]:
    """The generative methods of an evaluation, by their ``N_p``, smallest first."""
    return sorted((m["generators"], name) for name, m in doc["methods"].items() if m.get("generators"))


def table4(doc: dict) -> Table:
    """The paper's Table 4: the primary metric and its seed-to-seed std for base and each ``N_p``."""
    primary = doc.get("primary", "auc")
    name = METRIC_NAMES.get(primary, primary)
    seeds = len(doc["seeds"])
    table = Table(title=f"{doc['dataset']} / {doc['backbone']}: effect of N_p, {seeds} seeds (mean, sample std)")
    for column in ("Method", "N_p", f"{name} mean", f"{name} std", "best epoch (mean)"):
        table.add_column(column, justify="left" if column == "Method" else "right")
    rows = [(None, "base")] + swa_sweep(doc) if "base" in doc["methods"] else swa_sweep(doc)
    for n_p, method in rows:
        m = doc["methods"][method]
        epochs = [t["best_epoch"] for t in doc.get("training", {}).get(method, [])]
        table.add_row(label(method) if n_p is None else "DUET" if n_p > 1 else "DUET (w/o SWA)",
                      "-" if n_p is None else str(n_p), f"{m[f'{primary}_mean']:.4f}", f"{m[f'{primary}_std']:.4f}",
                      f"{np.mean(epochs):.1f}" if epochs else "")
    return table


def plot_training(path: Path, doc: dict) -> Path:
    """The paper's Figure 3: training accuracy (or validation score) and loss per epoch for base and each
    ``N_p``, mean over seeds with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = doc.get("curves", {})
    score = "train_accuracy" if any("train_accuracy" in e for c in curves.values() for r in c for e in r["epochs"]) \
        else "valid_auc"
    methods = [m for m in ["base", *(m for _, m in swa_sweep(doc))] if m in curves]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        runs = [r["epochs"] for r in curves[method]]
        length = min(len(r) for r in runs)
        n_p = doc["methods"].get(method, {}).get("generators")
        name = "Base (no DMG)" if method == "base" else f"N_p = {n_p}"
        for ax, key in zip(axes, (score, "loss")):
            values = np.array([[e[key] for e in r[:length]] for r in runs])
            x = np.arange(1, length + 1)
            line, = ax.plot(x, values.mean(0), marker="o", label=name)
            ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_ylabel(score.replace("_", " "))
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{doc['dataset']} / {doc['backbone']}: training per epoch, mean over {len(doc['seeds'])} seeds "
                 f"(band: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- scenario runs ---------------------------------------------------------------------------------

MEASURED = ("bus_ms", "cloud_ms", "generation_ms", "finetune_ms", "compute_ms")
MODELLED = ("upload_ms", "download_ms")
AROUND = 3  # sessions shown before and after a shift


def _stats(values) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return {"mean": 0.0, "std": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "p99": float(np.percentile(v, 99))}


def column(rows: list, key: str) -> list:
    """One column of a run's rows: ``[r[key] for r in rows]``, read at C speed. The rows of one report are
    all alike: a runner's records (fields, and the task's metrics in ``metrics``) or ``sessions.csv``
    rows (dicts)."""
    if not rows:
        return []
    first = rows[0]
    if isinstance(first, dict):
        return list(map(itemgetter(key), rows))
    if key in first.metrics:
        return [r.metrics[key] for r in rows]
    return list(map(attrgetter(key), rows))


def method_order(scenario: dict, rows: list[dict]) -> list[str]:
    present = set(column(rows, "method"))
    return [m for m in scenario["methods"] if m in present]


def run_metrics(scenario: dict) -> tuple[list[str], str]:
    """A run's per-session metrics and the one its tables and plots lead with (runs recorded before
    image tasks had recommendation's)."""
    return scenario.get("metrics", ["auc", "ndcg10", "hr10", "logloss"]), scenario.get("primary", "auc")


def around_shift(rows: list[dict], shift: dict, method: str, metric: str = "auc",
                 window: int = AROUND) -> dict[int, list[float]]:
    """A metric per session of the shifted devices, by session index relative to the shift (0 = first after)."""
    shifted = set(shift["devices"])
    by_device: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] == method and r["device_id"] in shifted:
            by_device.setdefault(r["device_id"], []).append(r)
    out: dict[int, list[float]] = {k: [] for k in range(-window, window)}
    for sessions in by_device.values():
        sessions.sort(key=lambda r: r["start_s"])
        after = [r for r in sessions if r["start_s"] >= shift["at_s"]]
        before = [r for r in sessions if r["start_s"] < shift["at_s"]]
        for k, r in enumerate(after[:window]):
            out[k].append(r[metric])
        for k, r in enumerate(reversed(before[-window:]), start=1):
            out[-k].append(r[metric])
    return out


def paired_vs_base(grouped: dict[str, list], method: str, metric: str) -> dict[str, float]:
    """A method against base on the same sessions: the mean per-session difference of ``metric``, its
    standard error, and the shares of sessions won, tied and lost (every method scores every session,
    so the pairs are exact; the difference's spread is far smaller than either method's). ``grouped``:
    the rows by method (`by_method`)."""
    base_rows, mine = grouped.get("base", []), grouped.get(method, [])
    base = dict(zip(column(base_rows, "session_id"), column(base_rows, metric)))
    diff = np.array([value - base[session] for session, value in zip(column(mine, "session_id"), column(mine, metric))
                     if session in base])
    if len(diff) == 0:
        return {"sessions": 0, "mean": 0.0, "se": 0.0, "won": 0.0, "tied": 0.0, "lost": 0.0}
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return {"sessions": len(diff), "mean": float(diff.mean()), "se": se, "won": float((diff > 0).mean()),
            "tied": float((diff == 0).mean()), "lost": float((diff < 0).mean())}


def summarize_run(scenario: dict, rows: list[dict], shifts: list[dict], run: dict) -> dict:
    """The ``results.json`` document of a run."""
    metrics, primary = run_metrics(scenario)
    methods = {}
    grouped = by_method(rows)
    for m in method_order(scenario, rows):
        mine = grouped.get(m, [])
        totals = by_profile(mine)
        timing = _timings(mine)
        methods[m] = {"sessions": len(mine)}
        for metric in metrics:  # mean and std over sessions
            stats = _stats(column(mine, metric))
            methods[m][f"{metric}_mean"], methods[m][f"{metric}_std"] = stats["mean"], stats["std"]
        methods[m] |= {
            "fallbacks": sum(map(bool, column(mine, "fallback"))),
            # finetune_ms and compute_ms of a batched run: timed alone for some sessions, calibrated for the rest
            "device_timing": {kind: timing.count(kind) for kind in ("measured", "calibrated")},
            "delay_ms": {
                "total": _stats(column(mine, "total_ms")),
                "measured": {k: _stats(column(mine, k)) for k in MEASURED},
                "modelled": {k: _stats(column(mine, k)) for k in MODELLED},
            },
            "delay_ms_p50_by_profile": {p: float(np.percentile(totals[p], 50)) for p in sorted(totals)},
            "payload_bytes": {"upload_mean": float(np.mean(column(mine, "upload_bytes"))),
                              "download_mean": float(np.mean(column(mine, "download_bytes")))},
        }
        if m != "base" and "base" in grouped:
            methods[m]["vs_base"] = paired_vs_base(grouped, m, primary)
    shift_docs = []
    for shift in shifts:
        around = {}
        for m in methods:
            around[m] = {str(k): {f"{primary}_mean": float(np.mean(v)) if v else None, "sessions": len(v)}
                         for k, v in around_shift(rows, shift, m, primary).items()}
        shift_docs.append({**shift, "devices_shifted": len(shift["devices"]), "around": around})
    return {"scenario": scenario, "run": run, "methods": methods, "shifts": shift_docs}


def by_method(rows: list) -> dict[str, list]:
    """A run's rows by method, in one pass (the report reads each method's sessions many times)."""
    out: dict[str, list] = {}
    for method, r in zip(column(rows, "method"), rows):
        out.setdefault(method, []).append(r)
    return out


def by_profile(rows: list) -> dict[str, list[float]]:
    """Each network profile's session delays (``total_ms``), in one pass."""
    out: dict[str, list[float]] = {}
    for profile, total in zip(column(rows, "profile"), column(rows, "total_ms")):
        out.setdefault(profile, []).append(total)
    return out


def _timings(rows: list) -> list[str]:
    try:
        return column(rows, "device_timing")
    except (KeyError, AttributeError):  # runs recorded before batching timed every session alone
        return ["measured"] * len(rows)


def write_run(out: Path, scenario: dict, records: list, shifts: list, run: dict) -> dict:
    """Write ``results.json``, ``sessions.csv`` and the plots; return the results document."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sessions.csv", "w", newline="") as f:  # row by row: a big run's rows never all at once
        writer, header = csv.writer(f), None
        for record in records:
            row = record.row() if hasattr(record, "row") else record  # a runner's record, or already a row
            if header is None:
                header = list(row)
                writer.writerow(header)
            elif list(row) != header:
                raise ValueError(f"session {row.get('session_id')!r}: columns {list(row)} differ from the "
                                 f"first row's {header}")
            writer.writerow(row.values())
    shift_dicts = [s if isinstance(s, dict) else asdict(s) for s in shifts]
    doc = summarize_run(scenario, records, shift_dicts, run)  # a record reads like a row (`record[key]`)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    plot_run(out, doc, records)
    return doc


_NUMERIC = {"start_s", "upload_ms", "download_ms", "bus_ms", "cloud_ms", "generation_ms", "finetune_ms",
            "compute_ms", "total_ms"}
_INT = {"user", "index", "samples", "upload_bytes", "download_bytes"}


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """The results document and the session rows of a run directory (for `duet report`)."""
    results, sessions = run_dir / "results.json", run_dir / "sessions.csv"
    for path in (results, sessions):
        if not path.is_file():
            raise DuetError(f"{path}: missing; is {run_dir} the output folder of `duet run`?")
    try:
        doc = json.loads(results.read_text())
    except json.JSONDecodeError as exc:
        raise DuetError(f"{results}: not valid JSON ({exc})") from exc
    rows = []
    numeric = _NUMERIC | set(run_metrics(doc.get("scenario", {}))[0])
    with open(sessions, newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                for key in numeric:
                    row[key] = float(row[key])
                for key in _INT:
                    row[key] = int(row[key])
                row["fallback"] = row["fallback"] == "True"
            except (KeyError, ValueError) as exc:
                raise DuetError(f"{sessions}:{line}: malformed row ({exc})") from exc
            rows.append(row)
    return doc, rows


def rerender(run_dir: Path) -> dict:
    """`duet report`: recompute the results document and the plots from the run's files."""
    doc, rows = read_run(run_dir)
    shifts = [{k: s[k] for k in ("label", "kind", "at_s", "devices")} for s in doc.get("shifts", [])]
    new = summarize_run(doc["scenario"], rows, shifts, doc["run"])
    (run_dir / "results.json").write_text(json.dumps(new, indent=2))
    plot_run(run_dir, new, rows)
    return new


def summarize_seeds(scenario: dict, runs: list[tuple[int, dict, list[dict]]]) -> dict:
    """The ``results.json`` of a run over several seeds, from each seed's results document and rows.

    Per method: each metric's mean and sample std over seeds (of each seed's mean over sessions), and
    against base the paired per-session difference pooled over every seed's sessions (mean, standard
    error, shares won/tied/lost), beside the per-seed differences (mean, std over seeds, seeds won).
    """
    metrics, primary = run_metrics(scenario)
    pooled = [{**r, "session_id": f"{seed}/{r['session_id']}"} for seed, _, rows in runs for r in rows]
    grouped = by_method(pooled)
    methods = {}
    for m in method_order(scenario, pooled):
        per_seed = []
        for seed, doc, _ in runs:
            r = doc["methods"].get(m)
            if r is not None:
                per_seed.append({"seed": seed, "sessions": r["sessions"], **{k: r[f"{k}_mean"] for k in metrics},
                                 **({"vs_base": r["vs_base"]["mean"]} if "vs_base" in r else {})})
        entry: dict = {"seeds": len(per_seed), "sessions": sum(p["sessions"] for p in per_seed)}
        for k in metrics:
            stats = _stats([p[k] for p in per_seed])
            entry[f"{k}_mean"], entry[f"{k}_std"] = stats["mean"], stats["std"]
        if m != "base" and "base" in grouped:
            by_seed = [p["vs_base"] for p in per_seed if "vs_base" in p]
            stats = _stats(by_seed)
            entry["vs_base"] = paired_vs_base(grouped, m, primary) | {
                "seed_mean": stats["mean"], "seed_std": stats["std"], "seeds_won": sum(v > 0 for v in by_seed)}
        entry["per_seed"] = per_seed
        methods[m] = entry
    return {"kind": "seeds", "scenario": scenario, "seeds": [seed for seed, _, _ in runs],
            "runs": {str(seed): doc["run"] for seed, doc, _ in runs}, "methods": methods}


def write_seeds(out: Path, scenario: dict, folders: list[tuple[int, Path]]) -> dict:
    """Write the report over seeds into ``out`` from the seeds' run folders; return it."""
    runs = [(seed, *read_run(folder)) for seed, folder in folders]
    doc = summarize_seeds(scenario, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    return doc


def is_seeds_folder(out: Path) -> bool:
    """Whether ``out`` holds a run over seeds (its ``results.json`` of kind ``seeds``, a ``seed-K`` folder each)."""
    try:
        return json.loads((out / "results.json").read_text()).get("kind") == "seeds"
    except (OSError, ValueError, AttributeError):
        return False  # not one: reading it as a single run says what is wrong with the folder


def rerender_seeds(out: Path) -> dict:
    """`duet report` on a folder of a run over seeds: recompute its report from the seeds' folders."""
    doc = json.loads((out / "results.json").read_text())
    return write_seeds(out, doc["scenario"], [(seed, out / f"seed-{seed}") for seed in doc["seeds"]])


def seeds_table(doc: dict) -> Table:
    scenario, runs = doc["scenario"], doc["runs"]
    metrics, primary = run_metrics(scenario)
    name = METRIC_NAMES.get(primary, primary)
    seeds = doc["seeds"]
    wall = sum(r["wall_s"] for r in runs.values())
    table = Table(
        title=f"{scenario['name']}: {len(seeds)} seeds ({', '.join(map(str, seeds))}), {scenario['devices']} devices, "
              f"{next(iter(runs.values()))['virtual_s'] / 3600:.2f} h virtual each, {wall:.0f} s wall in all"
              + (" (INTERRUPTED: partial)" if any(r.get("interrupted") for r in runs.values()) else ""),
        caption=f"{name}: mean ± sample std over seeds of each seed's mean over sessions. Δ vs base: the paired "
                "per-session difference pooled over every seed's sessions (standard error; shares of sessions "
                "won/lost), and per seed (mean ± std over seeds; seeds on which the method beats base).",
    )
    for column in ("Method", "Sessions", f"{name} (over seeds)", "Δ vs base, pooled (s.e.)", "won/lost",
                   "Δ per seed", "seeds won"):
        table.add_column(column, justify="left" if column == "Method" else "right", no_wrap=column == "Method")
    for m, r in doc["methods"].items():
        vs = r.get("vs_base")
        table.add_row(LABELS.get(m, m), str(r["sessions"]), f"{r[f'{primary}_mean']:.4f} ± {r[f'{primary}_std']:.4f}",
                      f"{vs['mean']:+.4f} ({vs['se']:.4f})" if vs else "",
                      f"{vs['won']:.0%}/{vs['lost']:.0%}" if vs else "",
                      f"{vs['seed_mean']:+.4f} ± {vs['seed_std']:.4f}" if vs else "",
                      f"{vs['seeds_won']}/{r['seeds']}" if vs else "")
    return table


def run_table(doc: dict) -> Table:
    run, scenario = doc["run"], doc["scenario"]
    metrics, primary = run_metrics(scenario)
    name = METRIC_NAMES.get(primary, primary)
    others = [m for m in metrics if m != primary]
    table = Table(
        title=f"{scenario['name']}: {run['sessions']} sessions on {scenario['devices']} devices, "
              f"{run['virtual_s'] / 3600:.2f} h virtual in {run['wall_s']:.0f} s wall"
              + (" (INTERRUPTED: partial)" if run.get("interrupted") else ""),
        caption=f"{name} per session (mean, std over sessions); Δ vs base: the mean per-session difference on "
                "the same sessions (standard error), and the shares of sessions won/lost against base. "
                "Delay p50 in ms: measured = bus round trip "
                f"+ cloud (this machine, {'in-process bus' if scenario['bus_kind'] == 'memory' else 'over Kafka'}); "
                "modelled = radio upload + download (network profile); "
                "device = fine-tuning + inference (measured x compute_factor; in a batched run most are calibrated "
                "from the sessions timed alone, see results.json device_timing)." + _bus_counts(run),
    )
    for column in ("Method", "Sessions", f"{name} mean", f"{name} std", "Δ vs base (s.e.)", "won/lost",
                   *(METRIC_NAMES.get(o, o) for o in others), "Fallbacks", "Total p50", "Total p95", "Measured", "Modelled", "Device", "Up/down bytes"):
        table.add_column(column, justify="left" if column == "Method" else "right", no_wrap=column == "Method")
    for m, r in doc["methods"].items():
        d = r["delay_ms"]
        measured = d["measured"]["bus_ms"]["p50"] + d["measured"]["cloud_ms"]["p50"]
        modelled = d["modelled"]["upload_ms"]["p50"] + d["modelled"]["download_ms"]["p50"]
        device = d["measured"]["finetune_ms"]["p50"] + d["measured"]["compute_ms"]["p50"]
        vs = r.get("vs_base")
        table.add_row(LABELS.get(m, m), str(r["sessions"]), f"{r[f'{primary}_mean']:.4f}",
                      f"{r[f'{primary}_std']:.4f}", f"{vs['mean']:+.4f} ({vs['se']:.4f})" if vs else "",
                      f"{vs['won']:.0%}/{vs['lost']:.0%}" if vs else "",
                      *(f"{r[f'{o}_mean']:.4f}" for o in others), str(r["fallbacks"]),
                      f"{d['total']['p50']:.2f}", f"{d['total']['p95']:.2f}", f"{measured:.2f}",
                      f"{modelled:.3f}", f"{device:.2f}",
                      f"{r['payload_bytes']['upload_mean']:.0f}/{r['payload_bytes']['download_mean']:.0f}")
    return table


def _bus_counts(run: dict) -> str:
    bus = run.get("over_the_bus")
    if not bus:
        return ""
    return (f"\nOver the bus: {bus['started']} requests started, {bus['answered']} answered, "
            f"{bus['fell_back']} fell back, {bus['lost']} lost; "
            f"{run.get('cloud', {}).get('dead_letters', 0)} dead letters.")


# -- plots -------------------------------------------------------------------------------------------

def plot_run(out: Path, doc: dict, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(doc["methods"])
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    written = []
    if doc["shifts"]:
        written.append(_plot_shifts(plt, out, doc, rows, methods, colors))
    if rows:
        written.append(_plot_delays(plt, out, rows, methods, colors))
    sweep = sorted({(_generators(doc, m), m) for m in methods if _generators(doc, m)})
    if len({n for n, _ in sweep}) >= 3:  # a sweep, not just DUET against DUET w/o SWA
        written.append(_plot_swa(plt, out, doc, sweep))
    return written


def _generators(doc: dict, method: str) -> int | None:
    return doc["scenario"].get("generators", {}).get(method)


def _plot_shifts(plt, out: Path, doc: dict, rows: list[dict], methods: list[str], colors: dict) -> Path:
    shifts = doc["shifts"]
    primary = run_metrics(doc["scenario"])[1]
    fig, axes = plt.subplots(1, len(shifts), figsize=(5.2 * len(shifts), 4.2), squeeze=False, sharey=True)
    for ax, shift in zip(axes[0], shifts):
        for i, m in enumerate(methods):
            around = around_shift(rows, shift, m, primary)
            ks = [k for k in sorted(around) if around[k]]
            mean = [np.mean(around[k]) for k in ks]
            sem = [np.std(around[k], ddof=1) / np.sqrt(len(around[k])) if len(around[k]) > 1 else 0 for k in ks]
            x = np.array(ks) + (i - (len(methods) - 1) / 2) * 0.06  # small dodge so error bars do not overlap
            ax.errorbar(x, mean, yerr=sem, marker="o", ms=4, capsize=3, color=colors[m], label=LABELS.get(m, m))
        ax.axvline(-0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{shift['label']} ({shift['devices_shifted']} devices)")
        ax.set_xlabel("session relative to the shift (0 = first after)")
        ax.set_xticks(range(-AROUND, AROUND))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{METRIC_NAMES.get(primary, primary)} per session (mean ± s.e.)")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.suptitle(f"{doc['scenario']['name']}: accuracy around each shift")
    fig.tight_layout()
    path = out / "accuracy_around_shifts.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_delays(plt, out: Path, rows: list[dict], methods: list[str], colors: dict) -> Path:
    profiles = sorted(set(column(rows, "profile")))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    ax = axes[0]
    parts = [("upload_ms", "upload (modelled)"), ("bus_ms", "bus (measured)"),
             ("cloud_ms", "cloud incl. generation (measured)"), ("download_ms", "download (modelled)"),
             ("finetune_ms", "fine-tuning (measured or calibrated)"), ("compute_ms", "inference (measured or calibrated)")]
    bottom = np.zeros(len(methods))
    cmap = plt.get_cmap("Set2")
    grouped = by_method(rows)
    for j, (key, label) in enumerate(parts):
        values = np.array([np.median(column(grouped.get(m, []), key)) for m in methods])
        ax.bar([LABELS.get(m, m) for m in methods], values, bottom=bottom, label=label, color=cmap(j))
        bottom += values
    ax.set_ylabel("median delay per session (ms)")
    ax.set_title("where the delay goes (medians of each part)")
    ax.set_ylim(0, bottom.max() * 1.6 if bottom.max() > 0 else 1)  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.tick_params(axis="x", labelsize=8)
    ax = axes[1]
    styles = dict(zip(profiles, ["-", "--", ":", "-."] * (len(profiles) // 4 + 1)))
    for m in methods:
        totals = by_profile(grouped.get(m, []))
        for p in profiles:
            v = np.sort(totals.get(p, []))
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), styles[p], color=colors[m])
    ax.set_xscale("log")
    ax.set_xlabel("delay per session (ms, log scale)")
    ax.set_ylabel("share of sessions")
    ax.set_title("delay distribution per method and network profile")
    ax.grid(alpha=0.3, which="both")
    # Colour is the method, line style the network profile: two short legends
    # beside the plot instead of one entry per pair on top of the curves.
    from matplotlib.lines import Line2D

    method_legend = ax.legend([Line2D([], [], color=colors[m]) for m in methods], [LABELS.get(m, m) for m in methods],
                              title="method", fontsize=7, title_fontsize=7, loc="upper left",
                              bbox_to_anchor=(1.01, 1))
    ax.add_artist(method_legend)
    ax.legend([Line2D([], [], color="0.3", linestyle=styles[p]) for p in profiles], profiles, title="network",
              fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.subplots_adjust(right=0.88)  # room for the two legends right of the plot
    path = out / "delays.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_swa(plt, out: Path, doc: dict, sweep: list[tuple[int, str]]) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    n = [k for k, _ in sweep]
    primary = run_metrics(doc["scenario"])[1]
    mean = [doc["methods"][m][f"{primary}_mean"] for _, m in sweep]
    sem = [doc["methods"][m][f"{primary}_std"] / np.sqrt(doc["methods"][m]["sessions"]) for _, m in sweep]
    ax.errorbar(n, mean, yerr=sem, marker="o", capsize=3)
    ax.set_xticks(n)
    ax.set_xlabel("SWA generators N_p (1 = DUET w/o SWA)")
    ax.set_ylabel(f"{METRIC_NAMES.get(primary, primary)} per session (mean ± s.e.)")
    ax.set_title(f"{doc['scenario']['name']}: SWA ablation")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "swa_ablation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
