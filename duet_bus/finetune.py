"""The fine-tuning baseline: k gradient steps of the classifier on the device.

The device holds the static layers (frozen) and the global classifier; it
takes ``steps`` Adam steps on its labelled recent samples and uses the
result for its session (`adam_steps`, shared by both tasks; the image task
calls it with its own features and cross-entropy). Both the offline evaluation and the device agent run
exactly this function, and both time it the same way: the backbone forward
over the labelled samples plus the steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from duet_bus.data.prep import Samples
from duet_bus.errors import ConfigError
from duet_bus.models import LayerWeights, RecModel
from duet_bus.models.dynamic import SessionLayout, stack_layers, unstack_layers
from duet_bus.train import tensors


ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 10
    lr: float = 1e-3
    recent: int = 10  # labelled positions just before the session

    def __post_init__(self) -> None:
        for name in ("steps", "recent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune.{name}: must be a positive integer, got {getattr(self, name)!r}")


def adam_steps(start: LayerWeights, loss_of: Callable[[LayerWeights], torch.Tensor],
               config: FinetuneConfig) -> LayerWeights:
    """``config.steps`` Adam steps on copies of the dynamic layers ``start``; the backbone stays frozen.

    ``loss_of`` maps the layers to the loss (the caller computes the
    backbone's features once, without gradients). The layers may be many
    devices' at once, stacked on a leading axis (`dynamic.stack_layers`), with
    ``loss_of`` the sum of each device's own loss: each device's slice then gets
    exactly its own gradient, and Adam is element-wise, so every slice takes
    the steps that device takes alone (`finetune_many`; a test compares them).
    """
    params = [t.detach().clone().requires_grad_(True) for layer in start for t in layer]
    # torch.optim.Adam(params, lr, fused=True), step by step: its fused kernel (one per step over all the
    # layers; for many devices' stacked layers the per-tensor updates were what cost the most of a step),
    # called directly. The same update to the bit (a test compares them), without the optimizer object,
    # whose first construction imports torch._dynamo (3 s of CPU in a run's first fine-tuned session).
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    step = [torch.zeros((), dtype=torch.float32) for _ in params]
    for _ in range(config.steps):
        grads = torch.autograd.grad(loss_of(list(zip(params[0::2], params[1::2]))), params)
        with torch.no_grad():
            torch._foreach_add_(step, 1)
            torch._fused_adam_(params, list(grads), exp_avg, exp_avg_sq, [], step, amsgrad=False, lr=config.lr,
                               beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], weight_decay=0.0, eps=ADAM_EPS,
                               maximize=False)
    return [(w.detach(), b.detach()) for w, b in zip(params[0::2], params[1::2])]


def adam_steps_stacked(start: LayerWeights, count: int, loss_of: Callable[[LayerWeights], torch.Tensor],
                       config: FinetuneConfig) -> list[LayerWeights]:
    """`adam_steps` for ``count`` devices that all start from ``start``: their copies stacked, then split again."""
    return unstack_layers(adam_steps(stack_layers([start] * count), loss_of, config))


def finetune_classifier(
    model: RecModel, start: LayerWeights, recent: Samples, config: FinetuneConfig
) -> tuple[LayerWeights, float]:
    """Fine-tuned copies of the classifier weights ``start``, and the wall time in ms."""
    x = tensors(recent)
    labels = torch.from_numpy(recent.labels)
    begin = time.perf_counter()
    with torch.no_grad():  # the static layers' part, once
        features = model.backbone.features(x["history"], x["history_len"], x["targets"])
        side = model.backbone.target_side(x["targets"])
    weights = adam_steps(start, lambda layers: F.binary_cross_entropy_with_logits(
        model.apply_head(features, x["targets"], layers, side=side), labels), config)
    return weights, (time.perf_counter() - begin) * 1000


def finetune_many(model: RecModel, start: LayerWeights, recents: list[Samples],
                  config: FinetuneConfig) -> list[LayerWeights]:
    """`finetune_classifier` for many devices in one stacked computation: one backbone pass over every
    device's labelled samples, and ``config.steps`` Adam steps on all devices' copies of ``start`` at once.
    Each device's result is what it computes alone, to float rounding."""
    batch = Samples.concat(recents)
    x = tensors(batch)
    layout = SessionLayout.of_lengths([len(r) for r in recents])
    # Each device's loss is the mean over its own samples' targets, as alone.
    share = torch.from_numpy(np.concatenate([np.full(len(r), 1.0 / r.labels.size, np.float32) for r in recents]))
    labels = torch.from_numpy(batch.labels)
    with torch.no_grad():  # the static layers' part, once
        features = model.backbone.features(x["history"], x["history_len"], x["targets"])
        side = model.backbone.target_side(x["targets"])
        spread = layout.spread(features)

    def loss_of(layers: LayerWeights) -> torch.Tensor:
        logits = model.apply_head(features, x["targets"], layers, layout, side, spread)
        return (F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1) * share).sum()

    return adam_steps_stacked(start, len(recents), loss_of, config)
