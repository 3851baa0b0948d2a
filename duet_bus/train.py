"""Cloud training of backbone and classifier (base) or backbone and generator (DUET).

Paper eq. 7: the backbone and the generator are trained jointly on every
device's history with binary cross-entropy, each sample weighted by
``gamma ** t`` where ``t`` is its position in its session (``gamma = 1`` is
uniform). Adam, learning rate 1e-3, batches of whole sessions (`session_batches`). Model selection and early
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


def session_batches(prepared: Prepared, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The training samples in batches of whole sessions, sessions in a random order, about
    ``batch_size`` samples each.

    Every sample of a session shares the session's real-time clicks, so DUET encodes them and
    generates the session's layers once per session instead of once per sample (`session_rows`),
    and applies them to the session's samples together. The base model trains on the same batches.
    """
    key = prepared.train_user * (int(prepared.train_pos.max()) + 1) + prepared.train_session_start
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    order = rng.permutation(len(starts))
    samples = np.concatenate([np.arange(starts[s], ends[s]) for s in order])
    # A batch ends with the session in which its batch_size-th sample falls.
    # A session longer than batch_size skips batch numbers; those hold nothing and are not batches.
    last = (np.cumsum(ends[order] - starts[order]) - 1) // batch_size
    sizes = np.bincount(last, weights=ends[order] - starts[order]).astype(np.int64)
    return np.split(samples, np.cumsum(sizes[sizes > 0])[:-1])


def session_rows(batch: Samples) -> torch.Tensor:
    """Each sample's session as a row number ``(B,)``: 0 for the batch's first session, and so on (a
    batch of `session_batches` holds each session's samples next to each other)."""
    t = batch.position_in_session
    new = np.r_[True, (batch.user[1:] != batch.user[:-1]) | (np.diff(t) != 1)]
    return torch.from_numpy(np.cumsum(new) - 1)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_group = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1)
    return (per_group * weight).sum() / weight.sum()


def optimizer_for(model: RecModel, config: TrainConfig) -> torch.optim.Optimizer:
    # fused: one kernel over every parameter instead of a handful of small ops per parameter tensor; the
    # generator has many small tensors, so for DUET this is a measurable share of a step (bench_model).
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)


def train_step(model: RecModel, optimizer: torch.optim.Optimizer, batch: Samples) -> float:
    """One optimisation step on a batch of whole sessions; the batch's loss."""
    logits = model(**tensors(batch), sessions=session_rows(batch))
    loss = weighted_bce(logits, torch.from_numpy(batch.labels), torch.from_numpy(batch.weight))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


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
    optimizer = optimizer_for(model, config)
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
            batches = session_batches(prepared, config.batch_size, rng)
            task = progress.add_task(f"{label} epoch {epoch}", total=len(batches))
            model.train()
            total = 0.0
            for index in batches:
                batch = samples.take(index)
                total += train_step(model, optimizer, batch) * len(batch)
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


class _TrainingProgress(Progress):
    """Progress bars in a terminal. Where they do not show (output to a file, a CI log) a line as each
    task (an epoch of a model) ends instead, so that a long training is not silent until its result."""

    def remove_task(self, task_id) -> None:
        if not self.console.is_terminal:
            task = next((t for t in self.tasks if t.id == task_id), None)
            if task is not None:
                self.console.print(f"{task.description}: {task.completed:.0f} steps in {task.elapsed or 0:.1f} s")
        super().remove_task(task_id)


def progress_bar() -> Progress:
    """The rich progress display used while training."""
    return _TrainingProgress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )
