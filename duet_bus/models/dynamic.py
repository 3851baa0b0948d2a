"""The dynamic layers: a small MLP whose weights may differ per sample.

Weights are a list of ``(W, b)`` with ``W: (B, in, out)`` and ``b: (B, out)``
(per-sample, generated) or ``W: (in, out)`` and ``b: (out,)`` (one set for the
whole batch, the global classifier). Inputs are ``(B, in)`` or ``(B, K, in)``
(K candidate targets sharing one set of weights). One ``baddbmm`` per layer,
never a Python loop over samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LayerWeights = list[tuple[Tensor, Tensor]]


def apply_dynamic(x: Tensor, weights: LayerWeights) -> Tensor:
    """Run the dynamic MLP: ReLU between layers, none after the last."""
    squeeze = x.dim() == 2
    h = x.unsqueeze(1) if squeeze else x  # (B, K, in)
    for n, (w, b) in enumerate(weights):
        if w.dim() == 2:
            h = torch.addmm(b, h.reshape(-1, h.size(-1)), w).view(h.size(0), h.size(1), -1)
        else:
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
