"""The vision model: MobileNetV3 static layers + a generated classifier head.

The same split as `RecModel` (``umn.py``): ``weights_for`` is what the cloud
computes from a session's real-time samples (the global head for the base
model), ``score`` what the device computes with its static layers and those
weights. The generator is the one `PPG` (with SWA) of the recommendation
task; only its input differs: the mean static feature of the session's
real-time images. A device may upload the images or their features (its
static layers' output, the embedding of the paper's Table 3):
``weights_for`` takes either.

Generated heads are large (MobileNetV3-Large: 960x1280 + 1280xC, about 5 MB
in fp32 per session). Training and the offline evaluation keep them in the
generator's factored form (`Factored`: the head is never formed); where the
full product is asked for (the float wire encodings) ``weights_for``
generates at most ``chunk`` sessions at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from duet_bus.errors import ConfigError
from duet_bus.models.dynamic import (LayerWeights, SessionLayout, StaticLayers, apply_by_session, apply_dynamic,
                                     per_session, split_sessions, stack_layers)
from duet_bus.models.mobilenetv3 import MobileNetConfig, MobileNetV3
from duet_bus.models.ppg import PPG, PPGConfig


@dataclass(frozen=True)
class VisionConfig:
    backbone: MobileNetConfig = MobileNetConfig()
    n_classes: int = 10
    ppg: PPGConfig | None = None  # None: the base model with a global head
    image_size: tuple[int, int] = (28, 28)  # (H, W) the static layers take

    def __post_init__(self) -> None:
        if self.n_classes < 2:
            raise ConfigError(f"model.n_classes: must be at least 2, got {self.n_classes!r}")

    task = "image_classification"

    @property
    def method(self) -> str:
        if self.ppg is None:
            return "base"
        return "duet" if self.ppg.n_generators > 1 else "duet_no_swa"

    @property
    def name(self) -> str:
        """The backbone's name as the results and the model version say it."""
        return self.backbone.variant


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

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def embed(self, images: Tensor) -> Tensor:
        """Static features of images ``(..., C, H, W)`` -> ``(..., feature_dim)``."""
        lead = images.shape[:-3]
        return self.backbone(images.reshape(-1, *images.shape[-3:])).view(*lead, -1)

    def summarize(self, realtime: Tensor, realtime_len: Tensor) -> Tensor:
        """Mean feature of each session's real-time samples (the first ``len`` count).

        ``realtime`` is images ``(B, R, C, H, W)`` or their features ``(B, R, feature_dim)``.
        """
        features = self.embed(realtime) if realtime.dim() == 5 else realtime
        mask = (torch.arange(realtime.size(1), device=realtime.device)[None, :] < realtime_len[:, None]).float()
        return (features * mask[..., None]).sum(1) / realtime_len.clamp(min=1)[:, None].float()

    def weights_for(self, realtime: Tensor | None, realtime_len: Tensor | None, chunk: int = 64,
                    factored: bool = False) -> LayerWeights:
        """Head weights per session (full, ``chunk`` sessions at a time, or factored); or the global head."""
        if not isinstance(self.head, PPG):
            return self.head.layer_weights()
        if factored:
            return self.head(self.summarize(realtime, realtime_len), factored=True)
        parts = [self.head(self.summarize(realtime[i: i + chunk], realtime_len[i: i + chunk]))
                 for i in range(0, realtime.size(0), chunk)]
        return [(torch.cat([p[n][0] for p in parts]), torch.cat([p[n][1] for p in parts]))
                for n in range(len(self.dynamic_shapes))]

    def realtime_batch(self, samples: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Requests' images ``(R, C, H, W)`` or embeddings ``(R, F)`` -> one zero-padded batch and lengths."""
        longest = max(len(s) for s in samples)
        batch = np.zeros((len(samples), longest, *samples[0].shape[1:]), np.float32)
        for i, sample in enumerate(samples):
            batch[i, : len(sample)] = sample
        return torch.from_numpy(batch), torch.tensor([len(s) for s in samples])

    def score(self, images: Tensor, weights: LayerWeights) -> Tensor:
        """Class logits ``(B, K, classes)`` for ``K`` images per session ``(B, K, C, H, W)``."""
        return apply_dynamic(self.embed(images), weights)

    def forward(self, images: Tensor, realtime: int) -> Tensor:
        """Logits ``(B, S, classes)`` of whole sessions ``(B, S, C, H, W)`` (training).

        One backbone pass over every image; the head is generated (factored)
        from the features of each session's first ``realtime`` images and
        applied to all ``S``. The base model ignores ``realtime``.
        """
        features = self.embed(images)
        if not isinstance(self.head, PPG):
            return apply_dynamic(features, self.head.layer_weights())
        lengths = torch.full((images.size(0),), realtime, dtype=torch.long)
        weights = self.head(self.summarize(features[:, :realtime], lengths), factored=True)
        return apply_dynamic(features, weights)


    # -- what a device does with this model (`devices.DeviceAgent` asks) -------------------------------

    def upload(self, realtime: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
        """The images themselves (``kind`` images_uint8: as 8-bit pixels, each the nearest of ``code / 255``), or
        (``kind`` embeddings) their static features computed on the device."""
        if kind == "images_uint8":
            return np.rint(np.clip(np.asarray(realtime, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8), "images"
        if kind != "embeddings":
            return np.asarray(realtime, np.float32), "images"
        with torch.inference_mode():
            return self.embed(torch.from_numpy(np.asarray(realtime, np.float32))).numpy(), "embeddings"

    def score_samples(self, samples, weights: LayerWeights) -> np.ndarray:
        """Class logits ``(K, classes)`` of a session's images with the given head."""
        return self.score(torch.from_numpy(samples.images)[None], weights)[0].numpy()

    def finetune(self, start: LayerWeights, recent, config) -> tuple[LayerWeights, float]:
        """The fine-tuning baseline on the device: Adam steps of the head on its labelled recent images
        (cross-entropy), and their wall time in ms (the backbone forward of those images included)."""
        import time

        from duet_bus.finetune import adam_steps

        begin = time.perf_counter()
        with torch.no_grad():
            features = self.embed(torch.from_numpy(recent.images))
        target = torch.from_numpy(recent.labels)
        weights = adam_steps(start, lambda layers: nn.functional.cross_entropy(apply_dynamic(features, layers), target),
                             config)
        return weights, (time.perf_counter() - begin) * 1000

    # -- the same for many devices at once (the runner's batched path; each result is one device's) --------

    def score_many(self, sessions: list, weights: list[LayerWeights] | LayerWeights) -> list[np.ndarray]:
        """`score_samples` of many sessions in one forward: with one head for all (the global one), or each
        session's own (a list, one per session)."""
        features = self.embed(torch.from_numpy(np.concatenate([s.images for s in sessions])))
        if per_session(weights):
            layout = SessionLayout.of_lengths([len(s) for s in sessions])
            logits = apply_by_session(features, stack_layers(weights), layout)
        else:
            logits = apply_dynamic(features, weights)
        return split_sessions(logits, [len(s) for s in sessions])

    def finetune_many(self, start: LayerWeights, recents: list, config) -> list[LayerWeights]:
        """`finetune` for many devices in one stacked computation: one backbone pass over every device's
        labelled images, and the Adam steps on all devices' copies of ``start`` at once (see
        `finetune.adam_steps`). Each device's result is what it computes alone, to float rounding."""
        from duet_bus.finetune import adam_steps_stacked

        with torch.no_grad():
            features = self.embed(torch.from_numpy(np.concatenate([r.images for r in recents])))
        target = torch.from_numpy(np.concatenate([r.labels for r in recents]))
        layout = SessionLayout.of_lengths([len(r) for r in recents])
        spread = layout.spread(features)
        share = torch.cat([torch.full((len(r),), 1.0 / len(r)) for r in recents])  # each device's own mean

        def loss_of(layers: LayerWeights) -> Tensor:
            logits = apply_by_session(features, layers, layout, spread)
            return (nn.functional.cross_entropy(logits, target, reduction="none") * share).sum()

        return adam_steps_stacked(start, len(recents), loss_of, config)

