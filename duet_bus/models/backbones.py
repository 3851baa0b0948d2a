"""The static layers: three recommendation backbones, and the registry that names them.

Each backbone turns a click history and candidate targets into the input of
the dynamic layers, and the dynamic layers' output into one logit per target.
Sizes follow the authors' public code (32-d embeddings): SASRec and GRU4Rec
score a target by the dot product of a 32->32->32 user head (the dynamic
layers) with a static 32->32->32 target tower; DIN runs target attention over
the history and an MLP 64->128->64->1 (the dynamic layers). Unlike that code,
padding is masked everywhere.

``summarize`` is the shared encoder body that the generator (PPG) puts in
front of its neck: it encodes the device's real-time clicks with the same
embeddings the backbone learns.

A backbone of your own: subclass `Backbone`, implement what its docstring
lists, and name it with `@register_backbone("name")` in a module given to
the commands with ``--plugin`` (``model.backbone: name`` in a scenario,
``--backbone name`` for `duet evaluate` and `duet train`). Its checkpoints
record the name, so `duet cloud`, `duet devices` and `duet info` take the
same ``--plugin``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from duet_bus.errors import ConfigError

#: The recommendation backbones by name, in the order they are listed (`register_backbone` adds to it).
BACKBONES: dict[str, type["Backbone"]] = {}


def register_backbone(name: str):
    """Class decorator: make a `Backbone` subclass the recommendation backbone ``name`` (not a built-in one's
    name: checkpoints and their cache know a backbone by its name)."""
    def add(cls: type[Backbone]) -> type[Backbone]:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise TypeError(f"register_backbone({name!r}): {cls!r} is not a Backbone subclass")
        if name in BUILT_IN:
            raise ValueError(f"register_backbone({name!r}): a built-in backbone's name; give yours another")
        BACKBONES[name] = cls
        return cls
    return add


def _last_valid(states: Tensor, lengths: Tensor) -> Tensor:
    """The state at position ``length - 1`` of each left-aligned sequence."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, states.size(-1))
    return states.gather(1, index).squeeze(1)


def _masked_mean(emb: Tensor, lengths: Tensor) -> Tensor:
    mask = torch.arange(emb.size(1), device=emb.device)[None, :] < lengths[:, None]
    total = (emb * mask.unsqueeze(-1)).sum(1)
    return total / lengths.clamp(min=1).unsqueeze(-1).to(emb.dtype)


class Backbone(nn.Module):
    """Interface of the static layers (see the module docstring).

    A subclass is built as ``cls(n_items, history_len=L, dim=d, dropout=p)`` and sets `dynamic_shapes`; it
    implements `features`, `readout` and `summarize` (and `target_side`, if its readout has a static part
    worth computing once per target). Histories and real-time clicks are ``(B, L)`` item ids, left-aligned
    and zero-padded, with their lengths; targets are ``(B, K)`` item ids.
    """

    #: (in, out) of each dynamic layer, ReLU between them, none after the last.
    dynamic_shapes: tuple[tuple[int, int], ...]
    #: ``summarize(clicks)`` equals ``features(clicks, ...)`` (the encoding of a history, whatever the targets).
    summary_is_features: bool = False

    def __init__(self, n_items: int, history_len: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.history_len = history_len
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.dropout = nn.Dropout(dropout)

    def features(self, history: Tensor, history_len: Tensor, targets: Tensor) -> Tensor:
        """Input of the dynamic layers: ``(B, F)`` or ``(B, K, F)``."""
        raise NotImplementedError

    def readout(self, out: Tensor, targets: Tensor, side: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` from the dynamic layers' output; ``side``: `target_side` of the targets, if
        already computed (fine-tuning reads out the same targets at every step)."""
        raise NotImplementedError

    def target_side(self, targets: Tensor) -> Tensor | None:
        """What the readout computes from the targets alone (static layers), or None."""
        return None

    def summarize(self, realtime: Tensor, realtime_len: Tensor) -> Tensor:
        """``(B, dim)`` summary of the real-time clicks, the generator's input."""
        raise NotImplementedError


class _TowerScored(Backbone):
    """Backbones whose score is <user head(state), target tower(target)>."""

    summary_is_features = True

    def __init__(self, n_items: int, history_len: int, dim: int, dropout: float) -> None:
        super().__init__(n_items, history_len, dim, dropout)
        self.dynamic_shapes = ((dim, dim), (dim, dim))
        self.target_tower = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self._target_cache: tuple[tuple, Tensor] | None = None  # `_every_target`

    def train(self, mode: bool = True) -> "_TowerScored":
        self._target_cache = None  # see `_every_target`
        return super().train(mode)

    def encode(self, seq: Tensor, lengths: Tensor) -> Tensor:
        raise NotImplementedError

    def features(self, history: Tensor, history_len: Tensor, targets: Tensor) -> Tensor:
        return self.encode(history, history_len)

    def readout(self, out: Tensor, targets: Tensor, side: Tensor | None = None) -> Tensor:
        tower = self.target_side(targets) if side is None else side
        return torch.einsum("bd,bkd->bk", out, tower)

    def target_side(self, targets: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.training:
            return self.target_tower(self.item_emb(targets))
        # index_select over the flat ids, not `table[targets]`: the same rows, copied 7x as fast (torch's
        # advanced indexing of a (B, K) index was 40 % of a device batch's scoring forward).
        table = self._every_target()
        return table.index_select(0, targets.reshape(-1)).view(*targets.shape, table.size(-1))

    def _every_target(self) -> Tensor:
        """The target tower of every item, ``(n_items + 1, dim)``: in inference the tower is a function of the
        item alone, so devices and evaluation look targets up instead of running the tower on each of a
        batch's ``B x K`` candidates (half of a scoring forward's time). Computed again whenever a weight
        it depends on may have changed: ``load_state_dict`` bumps tensor versions; a fused optimizer step
        does not, but it runs in training mode, and `train` drops the table (as `PPG` drops its mixture)."""
        weights = (self.item_emb.weight, *self.target_tower.parameters())
        key = tuple(p._version for p in weights) + tuple(p.data_ptr() for p in weights)
        if self._target_cache is None or self._target_cache[0] != key:
            with torch.no_grad():
                self._target_cache = (key, self.target_tower(self.item_emb.weight))
        return self._target_cache[1]

    def summarize(self, realtime: Tensor, realtime_len: Tensor) -> Tensor:
        return self.encode(realtime, realtime_len)


class SASRec(_TowerScored):
    """Item + position embedding, one causal transformer encoder layer (4 heads, ff 128)."""

    def __init__(self, n_items: int, history_len: int = 10, dim: int = 32, dropout: float = 0.1) -> None:
        super().__init__(n_items, history_len, dim, dropout)
        self.pos_emb = nn.Embedding(history_len, dim)
        self.layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=128, dropout=dropout, batch_first=True
        )
        causal = torch.triu(torch.ones(history_len, history_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)

    def encode(self, seq: Tensor, lengths: Tensor) -> Tensor:
        steps = seq.size(1)
        positions = torch.arange(steps, device=seq.device)
        x = self.dropout(self.item_emb(seq) + self.pos_emb(positions)[None])
        # Left-aligned: query i sees keys <= i, all real for i < length, so no
        # row is fully masked; padded queries are never read.
        states = self.layer(x, src_mask=self.causal[:steps, :steps], src_key_padding_mask=seq == 0)
        return _last_valid(states, lengths)


class GRU4Rec(_TowerScored):
    """One GRU(32, 32) over the history, state at the last valid position."""

    def __init__(self, n_items: int, history_len: int = 10, dim: int = 32, dropout: float = 0.1) -> None:
        super().__init__(n_items, history_len, dim, dropout)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def encode(self, seq: Tensor, lengths: Tensor) -> Tensor:
        states, _ = self.gru(self.dropout(self.item_emb(seq)))
        return _last_valid(states, lengths)


class DIN(Backbone):
    """Target attention over the history; [pooled, target] -> MLP 64->128->64->1."""

    def __init__(self, n_items: int, history_len: int = 10, dim: int = 32, dropout: float = 0.1) -> None:
        super().__init__(n_items, history_len, dim, dropout)
        self.dynamic_shapes = ((2 * dim, 128), (128, 64), (64, 1))
        self.attention = nn.Sequential(nn.Linear(4 * dim, 36), nn.ReLU(), nn.Linear(36, 1))

    def features(self, history: Tensor, history_len: Tensor, targets: Tensor) -> Tensor:
        hist = self.dropout(self.item_emb(history))  # (B, L, d)
        target = self.item_emb(targets)  # (B, K, d)
        h = hist.unsqueeze(1).expand(-1, target.size(1), -1, -1)  # (B, K, L, d)
        t = target.unsqueeze(2).expand_as(h)
        score = self.attention(torch.cat([h, t, h - t, h * t], dim=-1)).squeeze(-1)  # (B, K, L)
        mask = (history == 0).unsqueeze(1)
        weight = torch.softmax(score.masked_fill(mask, float("-inf")), dim=-1)
        pooled = torch.einsum("bkl,bld->bkd", weight, hist)
        return torch.cat([pooled, target], dim=-1)

    def readout(self, out: Tensor, targets: Tensor, side: Tensor | None = None) -> Tensor:
        return out.squeeze(-1)

    def summarize(self, realtime: Tensor, realtime_len: Tensor) -> Tensor:
        return _masked_mean(self.item_emb(realtime), realtime_len)


BUILT_IN = {"din": DIN, "sasrec": SASRec, "gru4rec": GRU4Rec}  # in the order tables list them
BACKBONES.update(BUILT_IN)


def make_backbone(name: str, n_items: int, history_len: int, dim: int = 32, dropout: float = 0.1) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} (a "
                          f"backbone of your own: register it in a module given with --plugin)")
    return BACKBONES[name](n_items, history_len=history_len, dim=dim, dropout=dropout)
