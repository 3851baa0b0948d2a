"""The dynamic layers: a small MLP whose weights may differ per sample.

Weights are a list of ``(W, b)`` with ``W: (B, in, out)`` and ``b: (B, out)``
(per-sample, generated) or ``W: (in, out)`` and ``b: (out,)`` (one set for the
whole batch, the global classifier). Inputs are ``(B, in)`` or ``(B, K, in)``
(K candidate targets sharing one set of weights). One ``baddbmm`` per layer,
never a Python loop over samples.

A generated layer may also stay in the generator's factored form
(`Factored`): ``W = H W2 + 1 b2^T`` with a per-sample ``H: (B, in, h)`` and
the shared ``W2: (h, out)``, ``b2: (out,)``. Applied as
``(x H) W2 + sum(x) b2 + b``, it never forms the ``in x out`` matrix: for a
MobileNetV3-Small head (576 x 1024, h = 32) that is 18 k numbers per session
instead of 590 k, and the same result up to float rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Factored(NamedTuple):
    """One generated layer as its factors (see the module docstring)."""

    h: Tensor  # (B, in, hidden): per sample
    w2: Tensor  # (hidden, out): shared by every sample of a model version
    b2: Tensor  # (out,): shared
    b: Tensor  # (B, out): the layer's bias, per sample

    def materialize(self) -> tuple[Tensor, Tensor]:
        """The full ``(W, b)``: ``W = H W2 + b2`` (broadcast over the input rows)."""
        return torch.matmul(self.h, self.w2) + self.b2, self.b


LayerWeights = list[tuple[Tensor, Tensor]]  # a layer may also be `Factored`


def layer_bytes(shapes: tuple[tuple[int, int], ...], itemsize: int = 4, hidden: int = 0) -> int:
    """Bytes of one session's dynamic layers on the wire, before msgpack framing: the full ``(W, b)`` per
    layer, or (``hidden`` > 0) the factored form's ``H`` (in x hidden) and ``b``."""
    return sum((i * (hidden or o) + o) * itemsize for i, o in shapes)


def materialize(weights: LayerWeights) -> LayerWeights:
    """Every layer as a full ``(W, b)``: what goes on the wire in the float encodings."""
    return [layer.materialize() if isinstance(layer, Factored) else layer for layer in weights]


def apply_dynamic(x: Tensor, weights: LayerWeights) -> Tensor:
    """Run the dynamic MLP: ReLU between layers, none after the last."""
    squeeze = x.dim() == 2
    h = x.unsqueeze(1) if squeeze else x  # (B, K, in)
    for n, layer in enumerate(weights):
        if isinstance(layer, Factored):
            # (x H) W2 + sum(x) b2 + b: never the in x out matrix.
            low = torch.matmul(h, layer.h)  # (B, K, hidden); one session's H (batch 1) serves all its samples
            bias = layer.b.unsqueeze(1) + h.sum(-1, keepdim=True) * layer.b2
            h = torch.addmm(bias.reshape(-1, bias.size(-1)), low.reshape(-1, low.size(-1)),
                            layer.w2).view(h.size(0), h.size(1), -1)
        elif layer[0].dim() == 2:
            w, b = layer
            h = torch.addmm(b, h.reshape(-1, h.size(-1)), w).view(h.size(0), h.size(1), -1)
        else:
            w, b = layer
            h = torch.baddbmm(b.unsqueeze(1), h, w)
        if n < len(weights) - 1:
            h = torch.relu(h)
    return h.squeeze(1) if squeeze else h


class StaticLayers(nn.Module):
    """The global classifier: one set of dynamic-layer weights for everyone."""

    def __init__(self, shapes: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList()
        for fan_in, fan_out in shapes:
            w = torch.empty(fan_in, fan_out)
            nn.init.kaiming_uniform_(w.T, a=math.sqrt(5))  # nn.Linear's default
            self.weight.append(nn.Parameter(w))
            self.bias.append(nn.Parameter(torch.empty(fan_out).uniform_(-fan_in**-0.5, fan_in**-0.5)))

    def layer_weights(self) -> LayerWeights:
        return list(zip(self.weight, self.bias))
