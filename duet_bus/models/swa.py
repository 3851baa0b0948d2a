"""Stable Weight Adapter (paper eq. 8-9).

``N_p`` generators are trained side by side. From their flattened first-layer
weights ``W'_1`` (one row per generator) the self-similarity ``S = W'_1 W'_1^T``
is formed; its row sums ``p'`` are normalised and tempered,
``p_i = softmax_i(p'_i / (tau * sum_j p'_j))``, and the generator actually used
is the ``p``-weighted sum of the ``N_p`` generators' parameters.

``sum_j p'_j`` is the sum of all entries of ``S``, i.e. ``||sum_i W'_1,i||^2``:
never negative, so the normalisation keeps the sign of ``p'``; an epsilon guards
the degenerate zero.

Two choices the paper leaves open are arguments here (see README, "SWA
choices", for the measurement behind the defaults):
- ``detach``: whether gradients flow through ``p`` (``True`` treats ``p`` as
  a weighting read off the current generators, not something to optimise);
- per-layer ``p``: each dynamic layer's generator bank gets its own ``p``
  from its own first-layer weights (the caller decides by what it passes).
"""

from __future__ import annotations

import torch
from torch import Tensor


def swa_weights(first_layer: Tensor, tau: float, detach: bool) -> Tensor:
    """The mixing weights ``p`` (shape ``(N_p,)``) from first-layer weights ``(N_p, ...)``."""
    flat = first_layer.flatten(1)
    if detach:
        flat = flat.detach()
    similarity = flat @ flat.T
    row_sums = similarity.sum(1)
    return torch.softmax(row_sums / (tau * (row_sums.sum() + 1e-12)), dim=0)


def mix(bank: Tensor, p: Tensor) -> Tensor:
    """``sum_i p_i * bank[i]`` over the leading generator axis."""
    return torch.tensordot(p, bank, dims=1)
