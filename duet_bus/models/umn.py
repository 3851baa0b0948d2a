"""The Universal Meta Network: static backbone + dynamic classifier.

One class serves every method. Its two halves are the device-cloud split:
``weights_for`` is what the cloud computes from the real-time samples (for the
base model: the global classifier, no request needed), ``score`` is what the
device computes with the static layers and those weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from duet_bus.errors import ConfigError
from duet_bus.models.backbones import Backbone, make_backbone
from duet_bus.models.dynamic import (LayerWeights, SessionLayout, StaticLayers, apply_by_session, apply_dynamic,
                                     per_session, split_sessions, stack_layers)
from duet_bus.models.ppg import PPG, PPGConfig


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "sasrec"
    dim: int = 32
    dropout: float = 0.1
    ppg: PPGConfig | None = None  # None: the base model with a global classifier

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout!r}")

    task = "recommendation"

    @property
    def name(self) -> str:
        """The backbone's name as the results and the model version say it."""
        return self.backbone

    @property
    def method(self) -> str:
        if self.ppg is None:
            return "base"
        return "duet" if self.ppg.n_generators > 1 else "duet_no_swa"


class RecModel(nn.Module):
    def __init__(self, backbone: Backbone, head: StaticLayers | PPG, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config

    @property
    def generative(self) -> bool:
        return isinstance(self.head, PPG)

    @property
    def dynamic_shapes(self) -> tuple[tuple[int, int], ...]:
        return self.backbone.dynamic_shapes

    def weights_for(self, realtime: Tensor, realtime_len: Tensor, factored: bool = False) -> LayerWeights:
        """Dynamic-layer weights: generated per sample (``factored``: as `Factored` layers), or the global
        classifier."""
        if isinstance(self.head, PPG):
            return self.head(self.backbone.summarize(realtime, realtime_len), factored=factored)
        return self.head.layer_weights()

    def realtime_batch(self, samples: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Requests' item ids -> the ``(B, L)`` left-aligned, zero-padded batch (the most recent ``L``) and lengths."""
        length = self.backbone.history_len
        realtime = np.zeros((len(samples), length), np.int64)
        lengths = np.empty(len(samples), np.int64)
        for i, items in enumerate(samples):
            recent = items[-length:]
            realtime[i, : len(recent)] = recent
            lengths[i] = len(recent)
        return torch.from_numpy(realtime), torch.from_numpy(lengths)

    def score(self, history: Tensor, history_len: Tensor, targets: Tensor, weights: LayerWeights,
              layout: SessionLayout | None = None) -> Tensor:
        """Logits ``(B, K)`` for K targets per sample with the given dynamic weights: one set per sample, or
        (``layout``) one per session."""
        return self.apply_head(self.backbone.features(history, history_len, targets), targets, weights, layout)

    def apply_head(self, features: Tensor, targets: Tensor, weights: LayerWeights,
                   layout: SessionLayout | None = None, side: Tensor | None = None,
                   spread: Tensor | None = None) -> Tensor:
        """`score` from the backbone's features (and, if already computed, the targets' `Backbone.target_side`
        and the features' `SessionLayout.spread`)."""
        if layout is None:
            out = apply_dynamic(features, weights)
        else:
            out = apply_by_session(features, weights, layout, spread)
        return self.backbone.readout(out, targets, side)

    def forward(
        self, history: Tensor, history_len: Tensor, realtime: Tensor, realtime_len: Tensor, targets: Tensor,
        sessions: Tensor | None = None,
    ) -> Tensor:
        """Training and offline scoring: generated layers stay factored (never formed, same result).

        ``sessions`` (training): each sample's session row, a session's samples next to each other; the
        session's real-time clicks (the same for all its samples) are encoded and its layers generated once.
        A session's real-time clicks are the history of its first sample, so where the backbone's summary
        is its encoding of a history (`Backbone.summary_is_features`), that encoding is read off the
        features instead of being computed a second time.
        """
        if sessions is None or not self.generative:
            return self.score(history, history_len, targets, self.weights_for(realtime, realtime_len, factored=True))
        layout = SessionLayout.of(sessions)
        first = layout.first
        features = self.backbone.features(history, history_len, targets)
        if (self.backbone.summary_is_features and torch.equal(realtime[first], history[first])
                and torch.equal(realtime_len[first], history_len[first])):
            summary = features[first]
        else:
            summary = self.backbone.summarize(realtime[first], realtime_len[first])
        return self.apply_head(features, targets, self.head(summary, factored=True), layout)

    # -- what a device does with this model (`devices.DeviceAgent` asks) ---------------------------

    def upload(self, realtime: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
        """What a device sends as its real-time samples: its item ids, whatever upload is configured."""
        return np.asarray(realtime, np.int64), "items"

    def score_samples(self, samples, weights: LayerWeights) -> np.ndarray:
        """Logits of a session's samples with the given dynamic weights, flat: ``(n * K,)``, as reports carry them."""
        from duet_bus.train import tensors

        x = tensors(samples)
        return self.score(x["history"], x["history_len"], x["targets"], weights).numpy().ravel()

    def finetune(self, start: LayerWeights, recent, config) -> tuple[LayerWeights, float]:
        """The fine-tuning baseline on the device: ``config.steps`` Adam steps, and their wall time in ms."""
        from duet_bus.finetune import finetune_classifier

        return finetune_classifier(self, start, recent, config)

    # -- the same for many devices at once (the runner's batched path; each result is one device's) --------

    def score_many(self, sessions: list, weights: list[LayerWeights] | LayerWeights) -> list[np.ndarray]:
        """`score_samples` of many sessions in one forward: with one set of layers for all (the global
        classifier), or each session's own (a list, one per session)."""
        from duet_bus.data.prep import Samples
        from duet_bus.train import tensors

        x = tensors(Samples.concat(sessions))
        if per_session(weights):
            layout = SessionLayout.of_lengths([len(s) for s in sessions])
            logits = self.score(x["history"], x["history_len"], x["targets"], stack_layers(weights), layout)
        else:
            logits = self.score(x["history"], x["history_len"], x["targets"], weights)
        return [scores.ravel() for scores in split_sessions(logits, [len(s) for s in sessions])]

    def finetune_many(self, start: LayerWeights, recents: list, config) -> list[LayerWeights]:
        """`finetune` for many devices in one stacked computation (`finetune.finetune_many`)."""
        from duet_bus.finetune import finetune_many

        return finetune_many(self, start, recents, config)


def build_model(config: ModelConfig, n_items: int, history_len: int) -> RecModel:
    backbone = make_backbone(config.backbone, n_items, history_len, config.dim, config.dropout)
    if config.ppg is None:
        head: StaticLayers | PPG = StaticLayers(backbone.dynamic_shapes)
    else:
        head = PPG(backbone.dim, backbone.dynamic_shapes, config.ppg)
    return RecModel(backbone, head, config)

