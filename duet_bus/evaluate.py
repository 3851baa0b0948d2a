"""Offline comparison of the methods on the same test sessions, for either task.

Per seed the task (`duet_bus.tasks`) prepares its data, trains what the
methods need and scores every test session with each method; this module
runs the seeds and writes the results document. Every method reports each
of the task's metrics as ``<metric>_mean`` and ``<metric>_std`` (sample
standard deviation, ddof=1, over seeds) beside the per-seed values, so a
script reads both tasks the same way.

Methods: ``base`` (the global model), ``finetune`` (k Adam steps of the
classifier on the device's labelled recent samples: needs labels on the
device), ``duet_no_swa`` (one generator), ``duet`` (``N_p`` generators mixed
by SWA) and ``duet_npK`` (``N_p = K``, for the SWA sweep of Table 4).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duet_bus.errors import ConfigError
from duet_bus.finetune import FinetuneConfig
from duet_bus.models import PPGConfig
from duet_bus.tasks import SeedResult, task_for
from duet_bus.tasks.base import METHOD, generators
from duet_bus.train import TrainConfig, progress_bar

METHODS = ("base", "finetune", "duet_no_swa", "duet")
NEEDS_LABELS = {"finetune"}


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "ml-100k"
    data_path: str | None = None
    backbone: str = ""  # "": the task's default
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = METHODS
    prep: Any = None  # the task's data preparation (`PrepConfig`, `ImagePrepConfig`); None: its default
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    swa: PPGConfig = field(default_factory=lambda: PPGConfig(n_generators=5))
    dropout: float = 0.1  # recommendation backbones
    width: float = 1.0  # vision backbones: MobileNetV3's width multiplier
    small_input: bool = False  # vision backbones: stride 1 in the stem (slower, finer features)

    def __post_init__(self) -> None:
        task = task_for(self.dataset)
        if not self.backbone:
            object.__setattr__(self, "backbone", task.default_backbone)
        if self.prep is None:
            object.__setattr__(self, "prep", task.default_prep())
        unknown = [m for m in self.methods if not METHOD.match(m)]
        if unknown:
            raise ConfigError(f"methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)} "
                              f"or duet_npK (K generators)")
        if not self.methods:
            raise ConfigError("methods: need at least one method")
        if not self.seeds:
            raise ConfigError("seeds: need at least one seed")
        task.check(self)

    @property
    def task(self):
        return task_for(self.dataset)

    def generators(self, method: str) -> int | None:
        return generators(method, self.swa.n_generators)


def summarize(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def evaluate(config: EvalConfig, show_progress: bool = True, cache_dir: str | Path | None = None,
             say: Callable[[str], None] | None = None) -> dict:
    """Run every method for every seed; return the results document (see README).

    With ``cache_dir`` each seed's results are kept there as it finishes (keyed by everything that
    shapes them but the seed list), and a seed already there is read, not run again: a long
    evaluation can be stopped and resumed, or extended by more seeds. ``say`` is told a line as each
    seed finishes (where no progress bar shows, as in a log, it is all there is to see of a long run).
    """
    task = config.task
    results: list[tuple[int, SeedResult]] = []
    progress = progress_bar()
    if show_progress:
        progress.start()
    try:
        for n, seed in enumerate(config.seeds, 1):
            begin = time.perf_counter()
            path = _seed_file(cache_dir, config, seed) if cache_dir is not None else None
            if path is not None and path.is_file():
                result, took = SeedResult(**json.loads(path.read_text())), "read from the cache"
            else:
                result = task.run_seed(config, seed, progress)
                took = f"{time.perf_counter() - begin:.0f} s"
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.with_suffix(".tmp").write_text(json.dumps(asdict(result), default=float))
                    path.with_suffix(".tmp").replace(path)
            results.append((seed, result))
            if say is not None:
                scores = ", ".join(f"{m} {result.metrics[m][task.primary]:.4f}" for m in config.methods)
                say(f"seed {seed} ({n} of {len(config.seeds)}, {took}): {task.primary} {scores}")
    finally:
        if show_progress:
            progress.stop()
    return _document(config, task, results)


def _seed_file(cache_dir: str | Path, config: EvalConfig, seed: int) -> Path:
    recipe = json.dumps({**asdict(config), "seeds": [seed], "training": config.task.training_version},
                        sort_keys=True, default=str)
    return Path(cache_dir) / f"{config.dataset}-{config.backbone}-seed{seed}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.json"


def _document(config: EvalConfig, task, results: list[tuple[int, SeedResult]]) -> dict:
    methods = {}
    for method in config.methods:
        rows = [{"seed": seed, **r.metrics[method]} for seed, r in results]
        delays = [d for _, r in results for d in r.delays_ms.get(method, [])]
        entry: dict[str, Any] = {}
        for metric in task.metrics:
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = summarize([r[metric] for r in rows])
        entry["delay_ms_p50"] = float(np.percentile(delays, 50)) if delays else 0.0
        entry["delay_ms_p99"] = float(np.percentile(delays, 99)) if delays else 0.0
        entry["delay_kind"] = {
            "base": "none (no request)",
            "finetune": "device fine-tuning, measured on this CPU",
        }.get(method, "cloud generation of one session, measured on this CPU (network not included)")
        entry["needs_labels"] = method in NEEDS_LABELS
        entry["generators"] = config.generators(method)
        entry["per_seed"] = rows
        methods[method] = entry
    trained = sorted({m for _, r in results for m in r.training})
    return {
        "task": task.name,
        "dataset": config.dataset,
        "source": task.source(config),
        "backbone": config.backbone,
        "seeds": list(config.seeds),
        "metrics": list(task.metrics),
        "primary": task.primary,
        "config": asdict(config),
        "device": results[-1][1].device if results else {},
        "training": {m: [{"seed": seed, **r.training[m]} for seed, r in results if m in r.training]
                     for m in trained},
        "curves": {m: [{"seed": seed, "epochs": r.curves[m]} for seed, r in results if m in r.curves]
                   for m in trained},
        "methods": methods,
        "torch_threads": torch.get_num_threads(),
    }
