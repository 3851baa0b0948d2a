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

import numpy as np
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


class SessionLayout(NamedTuple):
    """Where each sample of a batch of whole sessions sits: its session ``rows`` (contiguous, in order),
    its ``slot`` in the session, each session's ``first`` sample, and the longest session (``width``)."""

    rows: Tensor
    slot: Tensor
    first: Tensor
    width: int

    @staticmethod
    def of(rows: Tensor) -> "SessionLayout":
        first = torch.nonzero(torch.cat([rows.new_ones(1, dtype=torch.bool), rows[1:] != rows[:-1]]))[:, 0]
        slot = torch.arange(len(rows)) - first[rows]
        return SessionLayout(rows, slot, first, int(slot.max()) + 1)

    @staticmethod
    def of_lengths(lengths: list[int]) -> "SessionLayout":
        """Sessions of these many samples, one after the other."""
        return SessionLayout.of(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))

    @property
    def even(self) -> bool:
        """Whether every session has ``width`` samples: then `spread` and `gather` are reshapes."""
        return len(self.rows) == len(self.first) * self.width

    def spread(self, features: Tensor) -> Tensor:
        """Samples ``(N, ..., in)`` as ``(sessions, width * ..., in)``: a session's samples in its row
        (zeros after its last), for `apply_dynamic` with one set of layers per session."""
        if self.even:  # no row to pad (a runner's sessions and fine-tuning sets mostly are)
            return features.reshape(len(self.first), -1, features.size(-1))
        grid = features.new_zeros(len(self.first), self.width, *features.shape[1:])
        grid = grid.index_put((self.rows, self.slot), features)
        return grid.reshape(len(self.first), -1, features.size(-1))

    def gather(self, out: Tensor, sample_shape: torch.Size) -> Tensor:
        """The inverse of `spread` for the layers' output: ``(N, ..., out)`` for samples of ``sample_shape``."""
        if self.even:
            return out.reshape(len(self.rows), *sample_shape[1:-1], out.size(-1))
        return out.view(len(self.first), self.width, *sample_shape[1:-1], -1)[self.rows, self.slot]


def apply_by_session(features: Tensor, weights: LayerWeights, layout: SessionLayout,
                     spread: Tensor | None = None) -> Tensor:
    """`apply_dynamic` with one set of layers per session (batch axis = sessions) on samples ``(N, ..., in)``
    laid out by ``layout``: each session's layers apply to all its samples in one product. ``spread``:
    ``layout.spread(features)`` if already made (fine-tuning applies new layers to the same samples)."""
    grid = layout.spread(features) if spread is None else spread
    return layout.gather(apply_dynamic(grid, weights), features.shape)


def stack_layers(per_session: list[LayerWeights]) -> LayerWeights:
    """Sessions' layers (each ``(W, b)`` without a batch axis, or `Factored` with a batch of one) as one
    set with a session axis, for `apply_by_session`: factored layers stay factored (they share ``W2``)."""
    out = []
    for layers in zip(*per_session):
        if all(isinstance(layer, Factored) for layer in layers):
            first = layers[0]
            out.append(Factored(torch.cat([layer.h for layer in layers]), first.w2, first.b2,
                                torch.cat([layer.b for layer in layers])))
        else:
            full = [layer.materialize() if isinstance(layer, Factored) else layer for layer in layers]
            # A layer with a batch of one ((1, in, out): a factored reply, formed) loses that axis; the others,
            # most, go as they are (a reshape per session was most of what stacking a batch's replies cost).
            out.append((torch.stack([w if w.dim() == 2 else w.reshape(w.shape[-2:]) for w, _ in full]),
                        torch.stack([b if b.dim() == 1 else b.reshape(b.shape[-1:]) for _, b in full])))
    return out


def per_session(weights) -> bool:
    """Whether ``weights`` are one set of layers per session (a list of `LayerWeights`), not one for all."""
    return isinstance(weights, list) and bool(weights) and isinstance(weights[0], list)


def unstack_layers(stacked: LayerWeights) -> list[LayerWeights]:
    """The inverse of `stack_layers` for full layers: one ``[(W, b), ...]`` per session."""
    return [[(w[i], b[i]) for w, b in stacked] for i in range(stacked[0][0].size(0))]


def split_sessions(out: Tensor, lengths: list[int]) -> list[np.ndarray]:
    """A batch's output rows cut into its sessions' (``lengths`` rows each), each session's own copy.

    A copy, not a view: a view keeps the whole batch's tensor alive as long as any one session's result
    is kept, and behind it (the allocator cannot give back the heap below a live block) the batch's freed
    working memory: about 8 MB a 128-session recommendation batch, 62 kB a session in flight, which was
    most of a simulated device's memory in a 100,000-device run.
    """
    return [part.numpy().copy() for part in out.split(lengths)]


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
