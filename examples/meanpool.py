"""A recommendation backbone of your own, as a plugin: the mean of the history's item embeddings.

    duet evaluate --plugin examples/meanpool.py --backbone meanpool --seeds 1
    duet run scenarios/quickstart.yaml --plugin examples/meanpool.py --set model.backbone=meanpool

The user head (one 32 x 32 dynamic layer) maps the mean to a user vector; a
target scores its dot product with the target's embedding. `Backbone`'s
docstring lists what a backbone implements; PPG, SWA, the bus and the runner
need nothing else. Its checkpoints record the name ``meanpool``: `duet cloud`,
`duet devices` and `duet info` take the same ``--plugin``. Scenarios cache
trained checkpoints by recipe, the backbone's name included but not its code:
after changing the code, remove its cached ones (``runs/.checkpoints/meanpool-*``).
"""

import torch

from duet_bus.models import Backbone, register_backbone


@register_backbone("meanpool")
class MeanPool(Backbone):
    def __init__(self, n_items: int, history_len: int, dim: int, dropout: float) -> None:
        super().__init__(n_items, history_len, dim, dropout)
        self.dynamic_shapes = ((dim, dim),)

    def summarize(self, clicks: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (clicks != 0).unsqueeze(-1)
        return (self.item_emb(clicks) * mask).sum(1) / lengths.clamp(min=1).unsqueeze(-1)

    def features(self, history: torch.Tensor, history_len: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.summarize(history, history_len))

    def readout(self, out: torch.Tensor, targets: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return torch.einsum("bd,bkd->bk", out, self.item_emb(targets))
