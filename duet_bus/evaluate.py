"""Offline comparison of the four methods on the same test sessions.

Per seed: prepare the data (the seed fixes the evaluation negatives), train a
base model, a DUET without SWA (``N_p = 1``) and a DUET (``N_p`` generators),
and score every user's test session (1 positive, 100 negatives) with

- ``base``: the global model, no device model generalisation;
- ``finetune``: per device, the base model's classifier (the dynamic layers)
  takes ``k`` Adam steps on the device's labelled recent samples, then
  predicts; the wall time of those steps on this CPU is measured per device;
- ``duet_no_swa`` / ``duet``: the generator makes the classifier's weights
  from the device's real-time clicks in one forward pass.

Results are means and sample standard deviations (ddof=1) over seeds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from duet_bus.data import load_dataset, prepare
from duet_bus.data.prep import Prepared, PrepConfig
from duet_bus.errors import ConfigError
from duet_bus.finetune import FinetuneConfig, finetune_classifier
from duet_bus.metrics import ranking_metrics
from duet_bus.models import ModelConfig, PPGConfig, RecModel
from duet_bus.train import TrainConfig, predict, progress_bar, tensors, train_model

METHODS = ("base", "finetune", "duet_no_swa", "duet")
NEEDS_LABELS = {"finetune"}


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "ml-100k"
    data_path: str | None = None
    backbone: str = "sasrec"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = METHODS
    prep: PrepConfig = field(default_factory=PrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    swa: PPGConfig = field(default_factory=lambda: PPGConfig(n_generators=5))
    dropout: float = 0.1

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if not self.seeds:
            raise ConfigError("seeds: need at least one seed")

    def model_config(self, method: str) -> ModelConfig:
        ppg = {"duet": self.swa, "duet_no_swa": replace(self.swa, n_generators=1)}.get(method)
        return ModelConfig(backbone=self.backbone, dropout=self.dropout, ppg=ppg)


def finetune_scores(
    model: RecModel, prepared: Prepared, config: FinetuneConfig, seed: int, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune the classifier per device (`finetune.finetune_classifier`), then score its session.

    Returns the ``(n_users, K)`` logits and each device's fine-tuning wall time in ms.
    """
    rng = np.random.default_rng(seed + 2)
    sessions = prepared.eval_samples(split)
    start = model.head.layer_weights()
    model.eval()
    scores = np.empty(sessions.targets.shape, np.float32)
    millis = np.empty(prepared.n_users)
    for u in range(prepared.n_users):
        recent = prepared.recent_labelled(rng, u, split, config.recent)
        weights, millis[u] = finetune_classifier(model, start, recent, config)
        x = tensors(sessions.take(np.array([u])))
        with torch.inference_mode():
            scores[u] = model.score(x["history"], x["history_len"], x["targets"], weights).numpy()[0]
    return scores, millis


def generation_millis(model: RecModel, prepared: Prepared, count: int = 200) -> np.ndarray:
    """Wall time of generating one session's weights (batch of 1), in ms."""
    sessions = prepared.eval_samples("test")
    x = tensors(sessions)
    out = np.empty(min(count, len(sessions)))
    model.eval()
    with torch.inference_mode():
        model.weights_for(x["realtime"][:1], x["realtime_len"][:1])  # warm-up
        for i in range(len(out)):
            start = time.perf_counter()
            model.weights_for(x["realtime"][i : i + 1], x["realtime_len"][i : i + 1])
            out[i] = (time.perf_counter() - start) * 1000
    return out


def device_cost(model: RecModel, prepared: Prepared) -> dict[str, int]:
    """Parameters the device holds (static layers + one set of dynamic weights) and FLOPs per sample."""
    shapes = model.backbone.dynamic_shapes
    params = sum(p.numel() for p in model.backbone.parameters()) + sum(i * o + o for i, o in shapes)
    x = tensors(prepared.eval_samples("test", users=np.array([0])))
    weights = [(torch.zeros(i, o), torch.zeros(o)) for i, o in shapes]
    model.eval()
    counter = FlopCounterMode(display=False)
    # With autograd on: under no_grad/inference_mode the transformer layer runs
    # a fused fast-path kernel that the counter does not see.
    with counter:
        model.score(x["history"], x["history_len"], x["targets"][:, :1], weights)
    return {"params": int(params), "flops_per_sample": int(counter.get_total_flops())}


def summarize(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def evaluate(config: EvalConfig, show_progress: bool = True) -> dict:
    """Run every method for every seed; return the results document (see README)."""
    data = load_dataset(config.dataset, config.data_path)
    per_seed: dict[str, list[dict]] = {m: [] for m in config.methods}
    delays: dict[str, list[float]] = {m: [] for m in config.methods}
    training: dict[str, list[dict]] = {}
    cost: dict[str, int] = {}
    progress = progress_bar()
    if show_progress:
        progress.start()
    try:
        for seed in config.seeds:
            prepared = prepare(data, config.prep, seed=seed)
            test = prepared.eval_samples("test")
            trained: dict[str, RecModel] = {}
            for method in ("base", "duet_no_swa", "duet"):
                if method in config.methods or (method == "base" and "finetune" in config.methods):
                    result = train_model(
                        prepared, config.model_config(method), config.train, seed, progress,
                        label=f"seed {seed} {method}",
                    )
                    trained[method] = result.model
                    training.setdefault(method, []).append(
                        {"seed": seed, "best_epoch": result.best_epoch, "valid_auc": result.best_valid_auc,
                         "seconds_per_epoch": result.seconds_per_epoch}
                    )
            cost = device_cost(next(iter(trained.values())), prepared)
            for method in config.methods:
                if method == "finetune":
                    scores, millis = finetune_scores(trained["base"], prepared, config.finetune, seed)
                    delays[method].extend(millis.tolist())
                else:
                    scores = predict(trained[method], test)
                    if method != "base":
                        delays[method].extend(generation_millis(trained[method], prepared).tolist())
                per_seed[method].append({"seed": seed, **ranking_metrics(scores)})
    finally:
        if show_progress:
            progress.stop()
    return _document(config, data.source, per_seed, delays, training, cost)


def _document(config, source, per_seed, delays, training, cost) -> dict:
    methods = {}
    for method, rows in per_seed.items():
        entry = {}
        for metric in ("auc", "gauc", "ndcg10", "hr10", "logloss"):
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = summarize([r[metric] for r in rows])
        entry["delay_ms_p50"] = float(np.percentile(delays[method], 50)) if delays[method] else 0.0
        entry["delay_ms_p99"] = float(np.percentile(delays[method], 99)) if delays[method] else 0.0
        entry["delay_kind"] = {
            "base": "none (no request)",
            "finetune": "device fine-tuning, measured on this CPU",
        }.get(method, "cloud generation of one session, measured on this CPU (network not included)")
        entry["needs_labels"] = method in NEEDS_LABELS
        entry["per_seed"] = rows
        methods[method] = entry
    return {
        "dataset": config.dataset,
        "source": source,
        "backbone": config.backbone,
        "seeds": list(config.seeds),
        "config": asdict(config),
        "device": cost,
        "training": training,
        "methods": methods,
        "torch_threads": torch.get_num_threads(),
    }
