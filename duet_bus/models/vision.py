"""The vision model: MobileNetV3 static layers + a generated classifier head.

The same split as `RecModel` (``umn.py``): ``weights_for`` is what the cloud
computes from a session's real-time images (the global head for the base
model), ``score`` what the device computes with its static layers and those
weights. The generator is the one `PPG` (with SWA) of the recommendation
task; only its input differs: the mean static feature of the session's
real-time images.

Generated heads are large (MobileNetV3-Large: 960x1280 + 1280xC, about 5 MB
in fp32 per session), so ``weights_for`` generates at most ``chunk``
sessions at a time and `head_bytes` says what one costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from duet_bus.errors import ConfigError
from duet_bus.models.dynamic import LayerWeights, StaticLayers, apply_dynamic
from duet_bus.models.mobilenetv3 import MobileNetConfig, MobileNetV3
from duet_bus.models.ppg import PPG, PPGConfig


@dataclass(frozen=True)
class VisionConfig:
    backbone: MobileNetConfig = MobileNetConfig()
    n_classes: int = 10
    ppg: PPGConfig | None = None  # None: the base model with a global head

    def __post_init__(self) -> None:
        if self.n_classes < 2:
            raise ConfigError(f"model.n_classes: must be at least 2, got {self.n_classes!r}")

    @property
    def method(self) -> str:
        if self.ppg is None:
            return "base"
        return "duet" if self.ppg.n_generators > 1 else "duet_no_swa"


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MobileNetV3(config.backbone)
        self.dynamic_shapes = self.backbone.dynamic_shapes(config.n_classes)
        self.head: StaticLayers | PPG = (StaticLayers(self.dynamic_shapes) if config.ppg is None
                                         else PPG(self.backbone.feature_dim, self.dynamic_shapes, config.ppg))

    @property
    def generative(self) -> bool:
        return isinstance(self.head, PPG)

    def embed(self, images: Tensor) -> Tensor:
        """Static features of images ``(..., C, H, W)`` -> ``(..., feature_dim)``."""
        lead = images.shape[:-3]
        return self.backbone(images.reshape(-1, *images.shape[-3:])).view(*lead, -1)

    def summarize(self, realtime: Tensor, realtime_len: Tensor) -> Tensor:
        """Mean feature of each session's real-time images ``(B, R, C, H, W)`` (the first ``len`` count)."""
        features = self.embed(realtime)
        mask = (torch.arange(realtime.size(1), device=realtime.device)[None, :] < realtime_len[:, None]).float()
        return (features * mask[..., None]).sum(1) / realtime_len.clamp(min=1)[:, None].float()

    def weights_for(self, realtime: Tensor, realtime_len: Tensor, chunk: int = 64) -> LayerWeights:
        """Head weights per session, generated ``chunk`` sessions at a time; or the global head."""
        if not isinstance(self.head, PPG):
            return self.head.layer_weights()
        parts = [self.head(self.summarize(realtime[i: i + chunk], realtime_len[i: i + chunk]))
                 for i in range(0, realtime.size(0), chunk)]
        return [(torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts]))
                for n in range(len(self.dynamic_shapes))]

    def score(self, images: Tensor, weights: LayerWeights) -> Tensor:
        """Class logits ``(B, K, classes)`` for ``K`` images per session ``(B, K, C, H, W)``."""
        return apply_dynamic(self.embed(images), weights)

    def forward(self, images: Tensor, realtime: Tensor, realtime_len: Tensor) -> Tensor:
        return self.score(images, self.weights_for(realtime, realtime_len))


def head_bytes(shapes: tuple[tuple[int, int], ...], itemsize: int = 4) -> int:
    """Bytes of one session's head on the wire, before msgpack framing (the paper's download)."""
    return sum((i * o + o) * itemsize for i, o in shapes)
