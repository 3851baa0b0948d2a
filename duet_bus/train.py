"""Cloud training of backbone and classifier (base) or backbone and generator (DUET).

Paper eq. 7: the backbone and the generator are trained jointly on every
device's history with binary cross-entropy, each sample weighted by
``gamma ** t`` where ``t`` is its position in its session (``gamma = 1`` is
uniform). Adam, learning rate 1e-3, batch 1024. Model selection and early
stopping look at the validation split only; the test split is never touched
here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from duet_bus.data.prep import Prepared, Samples
from duet_bus.errors import ConfigError
from duet_bus.metrics import ranking_metrics
from duet_bus.models import ModelConfig, RecModel, build_model


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # at most; early stopping usually ends sooner
    # Groups of one positive and its negatives: 256 groups = 1280 labelled
    # samples, the nearest to the paper's batch of 1024.
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    gamma: float = 1.0
    patience: int = 5  # epochs without a better validation AUC before stopping

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name}: must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr: must be positive, got {self.lr!r}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"train.gamma: must be in (0, 1], got {self.gamma!r}")


@dataclass
class EpochLog:
    epoch: int
    loss: float
    valid_auc: float
    seconds: float


@dataclass
class TrainResult:
    model: RecModel
    best_epoch: int
    best_valid_auc: float
    log: list[EpochLog] = field(default_factory=list)

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([e.seconds for e in self.log]))


def tensors(samples: Samples) -> dict[str, torch.Tensor]:
    """The model inputs of a batch, as torch tensors."""
    return {
        "history": torch.from_numpy(samples.history),
        "history_len": torch.from_numpy(samples.history_len),
        "realtime": torch.from_numpy(samples.realtime),
        "realtime_len": torch.from_numpy(samples.realtime_len),
        "targets": torch.from_numpy(samples.targets),
    }


@torch.inference_mode()
def predict(model: RecModel, samples: Samples, batch_size: int = 2048) -> np.ndarray:
    """Logits ``(N, K)`` for every group, in eval mode."""
    was_training = model.training
    model.eval()
    out = [model(**tensors(samples.take(np.arange(i, min(i + batch_size, len(samples))))))
           for i in range(0, len(samples), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_group = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    return (per_group * weight).sum() / weight.sum()


def train_model(
    prepared: Prepared,
    model_config: ModelConfig,
    config: TrainConfig,
    seed: int,
    progress: Progress | None = None,
    label: str = "",
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> TrainResult:
    """Train one model; return it at its best validation epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    model = build_model(model_config, prepared.n_items, prepared.config.history_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    valid = prepared.eval_samples("valid")
    best_auc, best_epoch, best_state, stale = -1.0, 0, None, 0
    log: list[EpochLog] = []
    own_progress = progress is None
    progress = progress or progress_bar()
    if own_progress:
        progress.start()
    try:
        for epoch in range(1, config.epochs + 1):
            start = time.perf_counter()
            samples = prepared.train_samples(rng, config.gamma)
            order = rng.permutation(len(samples))
            steps = range(0, len(order), config.batch_size)
            task = progress.add_task(f"{label} epoch {epoch}", total=len(steps))
            model.train()
            total = 0.0
            for i in steps:
                batch = samples.take(order[i : i + config.batch_size])
                logits = model(**tensors(batch))
                loss = weighted_bce(logits, torch.from_numpy(batch.labels), torch.from_numpy(batch.weight))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                progress.advance(task)
            progress.remove_task(task)
            valid_auc = ranking_metrics(predict(model, valid))["auc"]
            log.append(EpochLog(epoch, total / len(samples), valid_auc, time.perf_counter() - start))
            if on_epoch is not None:
                on_epoch(log[-1])
            if valid_auc > best_auc:
                best_auc, best_epoch, stale = valid_auc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    break
    finally:
        if own_progress:
            progress.stop()
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, best_epoch, best_auc, log)


def progress_bar() -> Progress:
    """The rich progress display used while training."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )
