"""Personalized Parameters Generator (paper eq. 5-6), with SWA (eq. 8-9).

From a device's real-time samples to the weights of every dynamic layer:

    s      = backbone.summarize(real-time clicks)        shared encoder body
    e_n    = L_n(E_share(s))                             eq. 5, one linear per layer
    w_n    = reshape(W1 e_n + B1, [in, h]) W2 + B2       eq. 6, a two-layer generator
    b_n    = Wb e_n + Bb                                 the layer's bias
    K_n    = (w_n, b_n)

The first generator layer makes one ``h``-vector per input neuron and the
second maps it to the output neurons (the HyperNetwork factorisation of paper
eq. 3-4), so the generator is small even for a 64x128 layer. Each layer keeps
``N_p`` such generators as stacked, registered parameters: they are trained,
saved in the ``state_dict`` and mixed by SWA (``swa.py``) into the one used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from duet_bus.errors import ConfigError
from duet_bus.models.dynamic import Factored, LayerWeights
from duet_bus.models.swa import mix, swa_weights


@dataclass(frozen=True)
class PPGConfig:
    n_generators: int = 1  # N_p; 1 is "DUET (w/o SWA)"
    tau: float = 0.1  # SWA temperature
    detach_p: bool = True
    p_per_layer: bool = True
    neck_dim: int = 64
    z_dim: int = 32
    hidden_dim: int = 32

    def __post_init__(self) -> None:
        for name in ("n_generators", "neck_dim", "z_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"model.ppg.{name}: must be a positive integer, got {value!r}")
        if not self.tau > 0:
            raise ConfigError(f"model.ppg.tau: must be positive, got {self.tau!r}")


class LayerGenerator(nn.Module):
    """``g^(n)``: ``N_p`` stacked two-layer generators for one dynamic layer."""

    PARTS = ("w1", "b1", "w2", "b2", "wb", "bb")

    def __init__(self, z_dim: int, fan_in: int, fan_out: int, hidden: int, n_gen: int) -> None:
        super().__init__()
        self.fan_in, self.fan_out, self.hidden = fan_in, fan_out, hidden
        # SWA uses a p-weighted mean of N_p independently drawn generators,
        # which shrinks each part's scale by about sqrt(N_p); scale them up so
        # the generator actually used starts at the intended scale whatever N_p.
        # (Measured: without it, N_p = 5 starts ~5x too small and trails N_p = 1.)
        spread = math.sqrt(n_gen)
        bound = spread * z_dim**-0.5
        self.w1 = nn.Parameter(torch.empty(n_gen, z_dim, fan_in * hidden).uniform_(-bound, bound))
        # B1 carries the input-independent part: with W1 = 0 the generator is a
        # static rank-h classifier, so DUET contains the base model.
        self.b1 = nn.Parameter(torch.randn(n_gen, fan_in * hidden) * spread)
        # Scale W2 so the generated weights start with Kaiming variance 2/fan_in.
        self.w2 = nn.Parameter(torch.randn(n_gen, hidden, fan_out) * spread * math.sqrt(2.0 / (fan_in * hidden)))
        self.b2 = nn.Parameter(torch.zeros(n_gen, fan_out))
        self.wb = nn.Parameter(torch.empty(n_gen, z_dim, fan_out).uniform_(-bound, bound) * 0.1)
        self.bb = nn.Parameter(torch.zeros(n_gen, fan_out))

    def mixed(self, p: Tensor) -> tuple[Tensor, ...]:
        return tuple(mix(getattr(self, name), p) for name in self.PARTS)

    def only(self) -> tuple[Tensor, ...]:
        """The one generator of a bank of one: what `mixed` gives it, to the bit (its ``p`` is exactly 1)."""
        return tuple(getattr(self, name)[0] for name in self.PARTS)

    def forward(self, e: Tensor, params: tuple[Tensor, ...], factored: bool = False) -> tuple[Tensor, ...]:
        w1, b1, w2, b2, wb, bb = params
        h = torch.addmm(b1, e, w1).view(e.size(0), self.fan_in, self.hidden)
        layer = Factored(h, w2, b2, torch.addmm(bb, e, wb))
        return layer if factored else layer.materialize()


class PPG(nn.Module):
    """The generator: real-time summary ``(B, in_dim)`` -> per-sample dynamic-layer weights."""

    def __init__(self, in_dim: int, shapes: tuple[tuple[int, int], ...], config: PPGConfig) -> None:
        super().__init__()
        self.config = config
        self.neck = nn.Sequential(nn.Linear(in_dim, config.neck_dim), nn.ReLU())  # E_share
        self.layer_linear = nn.ModuleList(nn.Linear(config.neck_dim, config.z_dim) for _ in shapes)
        self.generators = nn.ModuleList(
            LayerGenerator(config.z_dim, i, o, config.hidden_dim, config.n_generators) for i, o in shapes
        )
        self._cache: tuple[tuple, list] | None = None

    def swa_p(self) -> list[Tensor]:
        """The SWA mixing weights ``p``, one vector per dynamic layer."""
        cfg = self.config
        if cfg.p_per_layer:
            return [swa_weights(g.w1, cfg.tau, cfg.detach_p) for g in self.generators]
        joint = torch.cat([g.w1.flatten(1) for g in self.generators], dim=1)
        return [swa_weights(joint, cfg.tau, cfg.detach_p)] * len(self.generators)

    def train(self, mode: bool = True) -> "PPG":
        # Parameters change only while training; a fused optimizer updates them in place without bumping
        # their version counters, so the serving cache below is dropped whenever the mode changes.
        # (Measured: without this, validation after each epoch of fused-Adam training read the mixture
        # of the first epoch, and model selection stalled at its AUC.)
        self._cache = None
        return super().train(mode)

    def _mixed_generators(self) -> list[tuple[Tensor, ...]]:
        if self.config.n_generators == 1:
            # SWA over one generator: p = softmax of one number = 1 exactly, and 1 * w = w (a gradient through
            # p would be 0). So skip forming S and the mixture, and their backward passes.
            return [g.only() for g in self.generators]
        if self.training or torch.is_grad_enabled():
            return [g.mixed(p) for g, p in zip(self.generators, self.swa_p())]
        # Serving: the mixture depends on parameters only; recompute it only
        # when a parameter changed (load_state_dict bumps tensor versions).
        key = tuple(p._version for p in self.parameters()) + tuple(p.data_ptr() for p in self.parameters())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, [g.mixed(p) for g, p in zip(self.generators, self.swa_p())])
        return self._cache[1]

    def unfactor(self, layers: list[tuple[Tensor, Tensor]]) -> LayerWeights:
        """A factored reply's ``(H, b)`` per layer (no batch axis) -> `Factored` layers with the shared
        ``W2``, ``b2`` this model holds: what a device applies without forming ``W``.

        The shared factors are read from the serving cache (without gradients): a device calls this for every
        reply, wherever gradients happen to be on, and mixing the generators again each time (with autograd)
        was 10 ms a MobileNetV3-Small reply, most of a vision run's main thread."""
        with torch.no_grad():
            mixed = self._mixed_generators()
        out = []
        for (h, b), (_, _, w2, b2, _, _) in zip(layers, mixed):
            out.append(Factored(h.unsqueeze(0), w2, b2, b.unsqueeze(0)))
        return out

    def forward(self, summary: Tensor, factored: bool = False) -> LayerWeights:
        """Per-sample weights; ``factored`` keeps each layer as its `Factored` parts."""
        shared = self.neck(summary)
        return [
            gen(lin(shared), params, factored)
            for gen, lin, params in zip(self.generators, self.layer_linear, self._mixed_generators())
        ]
