"""The Universal Meta Network: static backbone + dynamic classifier.

One class serves every method. Its two halves are the device-cloud split:
``weights_for`` is what the cloud computes from the real-time samples (for the
base model: the global classifier, no request needed), ``score`` is what the
device computes with the static layers and those weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from duet_bus.errors import ConfigError
from duet_bus.models.backbones import Backbone, make_backbone
from duet_bus.models.dynamic import LayerWeights, StaticLayers, apply_dynamic
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

    def weights_for(self, realtime: Tensor, realtime_len: Tensor) -> LayerWeights:
        """Dynamic-layer weights: generated per sample, or the global classifier."""
        if isinstance(self.head, PPG):
            return self.head(self.backbone.summarize(realtime, realtime_len))
        return self.head.layer_weights()

    def score(self, history: Tensor, history_len: Tensor, targets: Tensor, weights: LayerWeights) -> Tensor:
        """Logits ``(B, K)`` for K targets per sample with the given dynamic weights."""
        features = self.backbone.features(history, history_len, targets)
        return self.backbone.readout(apply_dynamic(features, weights), targets)

    def forward(
        self, history: Tensor, history_len: Tensor, realtime: Tensor, realtime_len: Tensor, targets: Tensor
    ) -> Tensor:
        return self.score(history, history_len, targets, self.weights_for(realtime, realtime_len))


def build_model(config: ModelConfig, n_items: int, history_len: int) -> RecModel:
    backbone = make_backbone(config.backbone, n_items, history_len, config.dim, config.dropout)
    if config.ppg is None:
        head: StaticLayers | PPG = StaticLayers(backbone.dynamic_shapes)
    else:
        head = PPG(backbone.dim, backbone.dynamic_shapes, config.ppg)
    return RecModel(backbone, head, config)
