"""Preprocessing: MovieLens interactions -> per-device timelines and labelled samples.

The recipe (paper 4.1.1; every number is a `PrepConfig` value):

1. Items are re-indexed from 1 in order of first appearance in the sorted
   raw ids (0 is padding); users are re-indexed from 0 (a user is a device).
2. Each user's interactions are sorted by time (ties keep file order).
3. Position ``p`` of a timeline is a sample whose *history* is the up to
   ``history_len`` items before it (left-aligned, zero-padded) and whose
   positive target is the item at ``p``.
4. The last position is the test target, the second-to-last the validation
   target; each gets ``eval_negatives`` (100) distinct sampled items the user
   never interacted with. Every earlier position from 1 on is a training
   positive with ``train_negatives`` (4) fresh negatives per epoch.
5. The *real-time samples* of a sample are the up to ``history_len`` clicks
   before the start of its session (see `sessions`), never the target itself.
   For the validation and test targets the session starts at the target.
6. ``holdout`` (default 0) keeps the most recent fraction of each user's
   timeline out of all of the above: training, validation and test use only
   the part before it (`Prepared.known`), and the scenario runner streams the
   held-out part as new sessions the models have never seen.

Deterministic for a given seed: the evaluation negatives depend only on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from duet_bus.data.movielens import Interactions
from duet_bus.data.sessions import SessionConfig, session_starts
from duet_bus.errors import ConfigError, DataError


@dataclass(frozen=True)
class PrepConfig:
    history_len: int = 10
    train_negatives: int = 4
    eval_negatives: int = 100
    sessions: SessionConfig = field(default_factory=SessionConfig)
    holdout: float = 0.0  # most recent fraction of each timeline kept for streaming

    def __post_init__(self) -> None:
        for name in ("history_len", "train_negatives", "eval_negatives"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name}: must be a positive integer, got {value!r}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"data.holdout: must be in [0, 1), got {self.holdout!r}")


@dataclass
class Samples:
    """A batch of labelled groups: one history, one real-time set, K targets."""

    user: np.ndarray  # (B,)
    history: np.ndarray  # (B, L) item ids, left-aligned, 0 = padding
    history_len: np.ndarray  # (B,)
    realtime: np.ndarray  # (B, L)
    realtime_len: np.ndarray  # (B,)
    targets: np.ndarray  # (B, K) item ids, positive first
    labels: np.ndarray  # (B, K) float32
    weight: np.ndarray  # (B,) float32, gamma ** (position in session)
    position_in_session: np.ndarray  # (B,)

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> "Samples":
        return Samples(**{k: v[index] for k, v in self.__dict__.items()})

    @staticmethod
    def concat(parts: list["Samples"]) -> "Samples":
        return Samples(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in parts[0].__dict__})


SEEN_TABLE_MAX = 64_000_000  # entries of `Prepared._seen`'s dense table (bytes)


@dataclass
class Prepared:
    """A dataset ready for training and evaluation."""

    name: str
    config: PrepConfig
    n_users: int
    n_items: int  # largest item index; embeddings need n_items + 1 rows
    items: np.ndarray  # all timelines concatenated, item indices
    times: np.ndarray  # matching timestamps
    offsets: np.ndarray  # (n_users + 1,) timeline of user u is items[offsets[u]:offsets[u+1]]
    raw_user_ids: np.ndarray
    raw_item_ids: np.ndarray  # index i -> raw id (index 0 unused)
    genres: dict[int, tuple[str, ...]]  # item index -> genres
    eval_negatives: dict[str, np.ndarray]  # "valid"/"test" -> (n_users, eval_negatives)
    train_user: np.ndarray  # training positives: user
    train_pos: np.ndarray  # position in the user's timeline
    train_session_start: np.ndarray  # position where its session starts
    seen_keys: np.ndarray  # sorted user * (n_items + 1) + item, for negative sampling
    known: np.ndarray  # (n_users,) length of the part of each timeline that training and evaluation use
    # Derived data shared by every simulated device of a user (`streams.heldout_sessions`), built on demand.
    shared: dict = field(default_factory=dict, repr=False, compare=False)

    def timeline(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def windows(self, user: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The up to L items before position ``end`` of each user, left-aligned."""
        length = self.config.history_len
        size = np.minimum(end, length)
        start = self.offsets[user] + end - size
        col = np.arange(length)
        idx = start[:, None] + col[None, :]
        valid = col[None, :] < size[:, None]
        out = np.where(valid, self.items[np.minimum(idx, len(self.items) - 1)], 0)
        return out.astype(np.int64), size.astype(np.int64)

    def sample_negatives(self, rng: np.random.Generator, user: np.ndarray, k: int) -> np.ndarray:
        """``k`` items per row that the row's user never interacted with (with replacement)."""
        base = user[:, None] * (self.n_items + 1)
        out = rng.integers(1, self.n_items + 1, size=(len(user), k))
        return self._redraw_seen(rng, out, lambda items: self._seen(base + items))

    def negatives_for(self, rng: np.random.Generator, user: int, rows: int, k: int) -> np.ndarray:
        """`sample_negatives` for ``rows`` rows of one user: the same draws from ``rng`` and the same items,
        checked against the user's row of the seen table (a simulated session's draws are all one user's)."""
        out = rng.integers(1, self.n_items + 1, size=(rows, k))
        return self._redraw_seen(rng, out, self._seen_row(user).__getitem__)

    def _redraw_seen(self, rng: np.random.Generator, out: np.ndarray, seen) -> np.ndarray:
        """Draw every item of ``out`` that ``seen(out)`` marks again, until none is marked."""
        for _ in range(100):
            bad = seen(out)
            count = int(np.count_nonzero(bad))
            if not count:
                return out
            out[bad] = rng.integers(1, self.n_items + 1, size=count)
        raise DataError("negative sampling: a user has interacted with almost every item")

    def _seen_row(self, user: int) -> np.ndarray:
        """Whether ``user`` interacted with each item, ``(n_items + 1,)``: `_seen` for one user's keys."""
        width = self.n_items + 1
        table = self._seen_table()
        if table is not None:
            return table[user * width : (user + 1) * width]
        row = np.zeros(width, bool)
        row[self.timeline(user)] = True  # every item of the user's timeline, as `seen_keys` holds them
        return row

    def _seen_table(self) -> np.ndarray | None:
        """A dense user x item table of what was seen, where it is small (ML-100k 1.6 MB, ML-1m 22 MB)."""
        if self.n_users * (self.n_items + 1) > SEEN_TABLE_MAX:
            return None
        if "seen" not in self.shared:
            table = np.zeros(self.n_users * (self.n_items + 1), bool)
            table[self.seen_keys] = True
            self.shared["seen"] = table
        return self.shared["seen"]

    def _seen(self, keys: np.ndarray) -> np.ndarray:
        # The dense table where there is one: one lookup instead of a binary search per key, which was most
        # of what drawing a simulated session's negatives cost.
        table = self._seen_table()
        if table is not None:
            return table[keys]
        pos = np.searchsorted(self.seen_keys, keys)
        pos = np.minimum(pos, len(self.seen_keys) - 1)
        return self.seen_keys[pos] == keys

    def train_samples(self, rng: np.random.Generator, gamma: float) -> Samples:
        """All training groups with fresh negatives."""
        user, pos = self.train_user, self.train_pos
        history, history_len = self.windows(user, pos)
        realtime, realtime_len = self.windows(user, self.train_session_start)
        negatives = self.sample_negatives(rng, user, self.config.train_negatives)
        targets = np.concatenate([self.items[self.offsets[user] + pos][:, None], negatives], axis=1)
        labels = np.zeros(targets.shape, np.float32)
        labels[:, 0] = 1.0
        t = pos - self.train_session_start
        return Samples(
            user, history, history_len, realtime, realtime_len, targets, labels,
            (gamma ** t).astype(np.float32), t,
        )

    def eval_samples(self, split: str, users: np.ndarray | None = None) -> Samples:
        """One group per user: the validation or test target with its fixed 100 negatives."""
        if split not in self.eval_negatives:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        users = np.arange(self.n_users) if users is None else np.asarray(users)
        pos = self.known[users] - (1 if split == "test" else 2)
        history, history_len = self.windows(users, pos)
        targets = np.concatenate(
            [self.items[self.offsets[users] + pos][:, None], self.eval_negatives[split][users]], axis=1
        )
        labels = np.zeros(targets.shape, np.float32)
        labels[:, 0] = 1.0
        zeros = np.zeros(len(users), np.int64)
        return Samples(
            users, history, history_len, history.copy(), history_len.copy(), targets, labels,
            np.ones(len(users), np.float32), zeros,
        )

    def recent_labelled(self, rng: np.random.Generator, user: int, split: str, count: int) -> Samples:
        """The labelled samples a device has just before its validation/test target.

        The ``count`` positions before the target, each with fresh training
        negatives: what on-device fine-tuning may learn from.
        """
        end = int(self.known[user]) - (1 if split == "test" else 2)
        return self.labelled(rng, user, np.arange(max(1, end - count), end))

    def labelled(self, rng: np.random.Generator, user: int, pos: np.ndarray) -> Samples:
        """Positions ``pos`` of a user's timeline, each with fresh training negatives."""
        users = np.full(len(pos), user)
        history, history_len = self.windows(users, pos)
        negatives = self.sample_negatives(rng, users, self.config.train_negatives)
        targets = np.concatenate([self.items[self.offsets[user] + pos][:, None], negatives], axis=1)
        labels = np.zeros(targets.shape, np.float32)
        labels[:, 0] = 1.0
        return Samples(
            users, history, history_len, history.copy(), history_len.copy(), targets, labels,
            np.ones(len(pos), np.float32), np.zeros(len(pos), np.int64),
        )


MIN_INTERACTIONS = 3  # one training target, the validation target and the test target


def prepare(data: Interactions, config: PrepConfig | None = None, seed: int = 0) -> Prepared:
    """Re-index, sort, split and sample evaluation negatives (see the module docstring)."""
    config = config or PrepConfig()
    raw_users, user_idx = np.unique(data.user, return_inverse=True)
    raw_items, item_idx = np.unique(data.item, return_inverse=True)
    item_idx = item_idx + 1
    order = np.lexsort((np.arange(len(data)), data.timestamp, user_idx))
    user_sorted, items, times = user_idx[order], item_idx[order], data.timestamp[order]
    counts = np.bincount(user_sorted, minlength=len(raw_users))
    short = np.flatnonzero(counts < MIN_INTERACTIONS)
    if len(short):
        raise DataError(
            f"{data.source}: user {raw_users[short[0]]} has {counts[short[0]]} interactions; "
            f"every user needs at least {MIN_INTERACTIONS} (train, validation, test)"
        )
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # At least MIN_INTERACTIONS stay known; the held-out part may be empty.
    known = np.maximum(np.ceil(counts * (1 - config.holdout)).astype(np.int64), MIN_INTERACTIONS)
    n_items = len(raw_items)
    seen_keys = np.unique(user_sorted.astype(np.int64) * (n_items + 1) + items)

    train_user, train_pos, train_start = [], [], []
    for u in range(len(raw_users)):
        n = int(known[u])
        stop = n - 2  # positions [1, n-2) are training targets
        if stop <= 1:
            continue
        starts = session_starts(times[offsets[u] : offsets[u + 1]], 1, stop, config.sessions)
        train_user.append(np.full(stop - 1, u))
        train_pos.append(np.arange(1, stop))
        train_start.append(starts)

    prepared = Prepared(
        name=data.name,
        config=config,
        n_users=len(raw_users),
        n_items=n_items,
        items=items.astype(np.int64),
        times=times.astype(np.int64),
        offsets=offsets,
        raw_user_ids=raw_users,
        raw_item_ids=np.concatenate([[0], raw_items]),
        genres={i + 1: data.genres.get(int(r), ()) for i, r in enumerate(raw_items)},
        eval_negatives={},
        train_user=np.concatenate(train_user).astype(np.int64),
        train_pos=np.concatenate(train_pos).astype(np.int64),
        train_session_start=np.concatenate(train_start).astype(np.int64),
        seen_keys=seen_keys,
        known=known,
    )
    rng = np.random.default_rng(seed)
    for split in ("valid", "test"):
        prepared.eval_negatives[split] = _distinct_negatives(prepared, rng, config.eval_negatives)
    return prepared


def _distinct_negatives(prepared: Prepared, rng: np.random.Generator, k: int) -> np.ndarray:
    out = np.empty((prepared.n_users, k), np.int64)
    all_items = np.arange(1, prepared.n_items + 1)
    for u in range(prepared.n_users):
        unseen = np.setdiff1d(all_items, prepared.timeline(u), assume_unique=False)
        if len(unseen) < k:
            raise DataError(f"user {prepared.raw_user_ids[u]}: only {len(unseen)} unseen items, need {k} negatives")
        out[u] = rng.choice(unseen, size=k, replace=False)
    return out
