"""MobileNetV3-Large and -Small (Howard et al., ICCV 2019; the paper's reference [11]).

Written here because torchvision cannot be imported beside the torch CPU wheel
this project pins. The blocks are the paper's: inverted residuals (1x1
expansion, depthwise k x k, optional squeeze-and-excite, 1x1 projection),
hard-swish in the later stages, a last 1x1 conv and global average pooling.
At width 1.0, 224x224 RGB and 1,000 classes the parameter counts equal the
reference implementation's (5,483,032 Large, 2,542,856 Small; a test holds
that), so the architecture is the published one.

Device/cloud split, as in the DUET paper: the **static layers** are the
feature extractor (``features`` + pooling: 960-d for Large, 576-d for Small);
the **dynamic layers** are the classifier head ``[(960, 1280), (1280, C)]``
(Large) or ``[(576, 1024), (1024, C)]`` (Small), ReLU-free hard-swish in the
reference is replaced by the ReLU the shared dynamic-layer code applies
between layers.

For small inputs (Fashion-MNIST's 28x28 grey images) ``small_input=True``
keeps the stem and the first strided block at stride 1, so the feature map
is 4x4 rather than 1x1 before pooling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from duet_bus.errors import ConfigError


def _divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never more than 10 % down (the reference's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * nn.functional.hardsigmoid(self.fc2(s))


# BatchNorm keeps torch's default momentum (0.1), not the reference's 0.01: trained for a few hundred
# steps only, running statistics at 0.01 are still mostly their initial values and the model in eval
# mode classifies at chance (measured: 10 % validation accuracy after two Fashion-MNIST epochs).
def _conv(cin: int, cout: int, kernel: int, stride: int, groups: int, act: type[nn.Module] | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout, eps=0.001)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, act: type[nn.Module],
                 stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_conv(cin, expanded, 1, 1, 1, act))
        layers.append(_conv(expanded, expanded, kernel, stride, expanded, act))
        if se:
            layers.append(SqueezeExcite(expanded))
        layers.append(_conv(expanded, cout, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


# (kernel, expanded, out, squeeze-excite, hard-swish, stride): the paper's Tables 1 and 2.
_LARGE = [(3, 16, 16, False, False, 1), (3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1),
          (5, 72, 40, True, False, 2), (5, 120, 40, True, False, 1), (5, 120, 40, True, False, 1),
          (3, 240, 80, False, True, 2), (3, 200, 80, False, True, 1), (3, 184, 80, False, True, 1),
          (3, 184, 80, False, True, 1), (3, 480, 112, True, True, 1), (3, 672, 112, True, True, 1),
          (5, 672, 160, True, True, 2), (5, 960, 160, True, True, 1), (5, 960, 160, True, True, 1)]
_SMALL = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
          (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
          (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
          (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]
VARIANTS = {"mobilenetv3_large": (_LARGE, 1280), "mobilenetv3_small": (_SMALL, 1024)}


@dataclass(frozen=True)
class MobileNetConfig:
    variant: str = "mobilenetv3_small"
    in_channels: int = 1
    width: float = 1.0  # the paper's width multiplier
    small_input: bool = True  # stride 1 in the stem and the first strided block (28x28 images)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"model.backbone: must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0 < self.width <= 4:
            raise ConfigError(f"model.width: must be in (0, 4], got {self.width!r}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"model.in_channels: must be 1 (grey) or 3 (RGB), got {self.in_channels!r}")


class MobileNetV3(nn.Module):
    """The static layers: image ``(B, C, H, W)`` -> pooled feature ``(B, feature_dim)``."""

    def __init__(self, config: MobileNetConfig) -> None:
        super().__init__()
        self.config = config
        blocks, self.head_dim = VARIANTS[config.variant]
        width = config.width
        stem = _divisible(16 * width)
        layers: list[nn.Module] = [_conv(config.in_channels, stem, 3, 1 if config.small_input else 2, 1,
                                         nn.Hardswish)]
        cin, strided = stem, 0
        for kernel, expanded, cout, se, hswish, stride in blocks:
            if stride == 2:
                strided += 1
                if config.small_input and strided == 1:
                    stride = 1
            cout = _divisible(cout * width)
            layers.append(InvertedResidual(cin, kernel, _divisible(expanded * width), cout, se,
                                           nn.Hardswish if hswish else nn.ReLU, stride))
            cin = cout
        self.feature_dim = 6 * cin
        layers.append(_conv(cin, self.feature_dim, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images).mean((2, 3))

    def dynamic_shapes(self, n_classes: int) -> tuple[tuple[int, int], ...]:
        """The classifier head the cloud generates: feature -> head_dim -> classes."""
        return ((self.feature_dim, self.head_dim), (self.head_dim, n_classes))
