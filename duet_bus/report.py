"""Render results: the paper's Table 1 from an evaluation document."""

from __future__ import annotations

from rich.table import Table

LABELS = {"base": "Base (no DMG)", "finetune": "Fine-tuning", "duet_no_swa": "DUET (w/o SWA)", "duet": "DUET"}


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def table1(doc: dict) -> Table:
    """A Table-1-shaped comparison: AUC mean/std, GAUC, NDCG@10, HR@10, device cost, delay."""
    seeds = len(doc["seeds"])
    table = Table(
        title=f"{doc['dataset']} / {doc['backbone']}: {seeds} seed{'s' if seeds != 1 else ''} "
        f"(mean, sample std)",
        caption="LR*: needs labels of the device's real-time data. Delay p50, measured on this CPU: "
        "fine-tuning = on-device compute; DUET = cloud generation of one session (network not included).",
    )
    for name in ("Method", "LR*", "AUC mean", "AUC std", "GAUC", "NDCG@10", "HR@10", "Param.", "FLOPs",
                 "Delay p50"):
        table.add_column(name, justify="left" if name == "Method" else "right")
    device = doc.get("device", {})
    for method, m in doc["methods"].items():
        delay = "0" if method == "base" else f"{m['delay_ms_p50']:.2f} ms"
        table.add_row(
            LABELS.get(method, method),
            "yes" if m.get("needs_labels") else "",
            f"{m['auc_mean']:.4f}",
            f"{m['auc_std']:.4f}",
            f"{m['gauc_mean']:.4f}",
            f"{m['ndcg10_mean']:.4f}",
            f"{m['hr10_mean']:.4f}",
            _si(device.get("params", 0)),
            _si(device.get("flops_per_sample", 0)),
            delay,
        )
    return table
