"""What a device sees of one session.

A `DeviceSession` holds the device's real-time samples (clicks or images,
uploaded to the cloud) and the session's samples (history, candidate targets,
labels; or images and labels: the labels are used for evaluation only), plus
the labelled recent samples that on-device fine-tuning may learn from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from duet_bus.data.images import SPLITS, ImageSamples, PreparedImages
from duet_bus.data.prep import Prepared, Samples
from duet_bus.data.sessions import session_bounds


@dataclass
class DeviceSession:
    session_id: str
    device_id: str
    realtime: np.ndarray  # (<= L,) item ids, most recent last; or (R, C, H, W) images
    samples: Any  # the session's samples to score: `Samples`, or `images.ImageSamples`
    recent: Any = None  # labelled recent samples, the same kind (fine-tuning only)
    realtime_kind: str = "items"  # what `realtime` holds (protocol.REALTIME_KINDS)


def device_id(prepared: Prepared, user: int) -> str:
    return f"{prepared.name}-u{int(prepared.raw_user_ids[user])}"


def offline_test_sessions(prepared: Prepared, users: np.ndarray | None = None, with_recent: int = 0,
                  seed: int = 0) -> list[DeviceSession]:
    """Each user's offline test session (the one `duet evaluate` scores) as a device session."""
    users = np.arange(prepared.n_users) if users is None else np.asarray(users)
    samples = prepared.eval_samples("test", users)
    rng = np.random.default_rng(seed + 2)
    out = []
    for i, u in enumerate(users):
        one = samples.take(np.array([i]))
        out.append(DeviceSession(
            session_id=f"{device_id(prepared, u)}-test",
            device_id=device_id(prepared, u),
            realtime=one.realtime[0, : one.realtime_len[0]].copy(),
            samples=one,
            recent=prepared.recent_labelled(rng, int(u), "test", with_recent) if with_recent else None,
        ))
    return out


@dataclass
class SourceSession:
    """One held-out session of a user: the items clicked, in order, and when it began."""

    user: int
    items: np.ndarray
    start_time: int  # dataset timestamp (seconds)


def heldout_sessions(prepared: Prepared, user: int) -> tuple[SourceSession, ...]:
    """A user's held-out interactions (see `PrepConfig.holdout`) cut into sessions: built once per user
    and shared by every device that streams them (they are only read)."""
    key = ("heldout", user)
    if key not in prepared.shared:
        begin, end = int(prepared.known[user]), int(prepared.offsets[user + 1] - prepared.offsets[user])
        times = prepared.times[prepared.offsets[user] : prepared.offsets[user + 1]]
        items = prepared.timeline(user)
        prepared.shared[key] = tuple(SourceSession(user, items[a:b], int(times[a]))
                                     for a, b in session_bounds(times, begin, end, prepared.config.sessions))
    return prepared.shared[key]


def log_windows(log: np.ndarray, ends: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The up to ``length`` items of ``log`` before each index in ``ends``, left-aligned, 0-padded."""
    size = np.minimum(ends, length)
    col = np.arange(length)
    idx = (ends - size)[:, None] + col[None, :]
    valid = col[None, :] < size[:, None]
    padded = np.concatenate([log, [0]]).astype(np.int64)
    return np.where(valid, padded[np.minimum(idx, len(log))], 0), size.astype(np.int64)


def log_window_run(log: np.ndarray, start: int, stop: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`log_windows` for the run of indices ``start .. stop - 1``: when each has a full window before it
    (a simulated device's sessions, but for its first few clicks), the windows are one gather."""
    if start < length:
        return log_windows(log, np.arange(start, stop), length)
    rows = log[_window_grid(stop - start, length) + (start - length)]
    return rows.astype(np.int64, copy=False), np.full(stop - start, length, np.int64)


@functools.lru_cache(maxsize=256)
def _window_grid(rows: int, length: int) -> np.ndarray:
    """``grid[i, j] = i + j``: the offsets of ``rows`` consecutive windows of ``length``."""
    grid = np.arange(rows)[:, None] + np.arange(length)[None, :]
    grid.flags.writeable = False
    return grid


class DeviceStream:
    """What one simulated device clicks, session after session.

    The device keeps its own click log: the history its backbone reads and the
    real-time samples it uploads are the log's most recent items, so after a
    shift (another user's stream, drifted items) the device's inputs change
    the way a real device's would. ``transform`` is set by shifts that alter
    the items a device clicks (`duet_bus.shifts`).
    """

    __slots__ = ("index", "prepared", "device_id", "home_user", "negatives", "log", "user", "_sessions", "_next",
                 "transform", "sessions_done")

    def __init__(self, index: int, prepared: Prepared, user: int, negatives: int) -> None:
        self.index = index
        self.prepared = prepared
        self.device_id = f"d{index:05d}-u{int(prepared.raw_user_ids[user])}"
        self.home_user = user
        self.negatives = negatives
        # The device's whole click log: shifts read it (the genres a device rarely watched).
        self.log = prepared.timeline(user)[: prepared.known[user]].copy()
        self.switch_to(user)
        self.transform = None  # (items, rng) -> items
        self.sessions_done = 0

    def switch_to(self, user: int) -> None:
        """From now on, stream ``user``'s held-out sessions."""
        self.user = user
        self._sessions, self._next = heldout_sessions(self.prepared, user), 0

    @property
    def queue(self) -> tuple[SourceSession, ...]:
        """The held-out sessions still to stream."""
        return self._sessions[self._next:]

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._sessions)

    @property
    def home_id(self) -> int:
        """Raw id of the user the device started with (what a scenario's ``devices`` lists)."""
        return int(self.prepared.raw_user_ids[self.home_user])

    @property
    def owner_id(self) -> int:
        """Raw id of the user whose sessions the device streams now."""
        return int(self.prepared.raw_user_ids[self.user])

    def next_time(self) -> int:
        """Dataset timestamp of the next session (``arrivals: replay``)."""
        return self._sessions[self._next].start_time

    def next_session(self, rng: np.random.Generator, recent: int = 0) -> DeviceSession:
        """Cut the device's next session: score each click given the clicks before it."""
        source = self._sessions[self._next]
        self._next += 1
        items = source.items if self.transform is None else self.transform(source.items, rng)
        history_len = self.prepared.config.history_len
        realtime = self.log[-history_len:].copy()
        log = np.concatenate([self.log, items])
        samples = self._samples(rng, log, len(self.log), len(log), self.negatives)
        labelled = None
        if recent:
            labelled = self._samples(rng, self.log, max(1, len(self.log) - recent), len(self.log),
                                     self.prepared.config.train_negatives)
        self.log = log
        self.sessions_done += 1
        return DeviceSession(f"{self.device_id}-s{self.sessions_done}", self.device_id, realtime, samples, labelled)

    def _samples(self, rng: np.random.Generator, log: np.ndarray, start: int, stop: int, k: int) -> Samples:
        """Positions ``start .. stop - 1`` of ``log`` as samples, each with ``k`` fresh negatives."""
        prepared, count = self.prepared, stop - start
        history, history_len = log_window_run(log, start, stop, prepared.config.history_len)
        positives = log[start:stop]
        negatives = prepared.negatives_for(rng, self.user, count, k)
        clash = negatives == positives[:, None]  # a drifted click can be an item this user never saw
        clashes = int(np.count_nonzero(clash))
        while clashes:
            negatives[clash] = prepared.negatives_for(rng, self.user, clashes, 1)[:, 0]
            clash = negatives == positives[:, None]
            clashes = int(np.count_nonzero(clash))
        targets = np.empty((count, k + 1), np.int64)
        targets[:, 0] = positives
        targets[:, 1:] = negatives
        labels = np.zeros(targets.shape, np.float32)
        labels[:, 0] = 1.0
        return Samples(np.full(count, self.user), history, history_len, history.copy(), history_len.copy(),
                       targets, labels, np.ones(count, np.float32), np.zeros(count, np.int64))

SPLIT_STREAM = SPLITS.index("stream")


class ImageStream:
    """What one simulated camera device photographs, session after session.

    The device streams its owner's held-out sessions (the ``stream`` split,
    never trained on), each taken through the device's own camera. It keeps
    its own log of the images it saw, with their labels: on-device
    fine-tuning learns from the last of them. Shifts change what it
    photographs (``switch_to`` another owner's sessions, a new ``queue``) or
    how the pictures come out (``transform``, e.g. a corruption).
    """

    LOG = 256  # labelled images a device keeps for fine-tuning

    def __init__(self, index: int, prepared: PreparedImages, owner: int) -> None:
        self.index = index
        self.prepared = prepared
        self.device_id = f"d{index:05d}-u{owner}"
        self.home_user = owner
        self.camera = owner  # the device's camera stays with the device
        mine = (prepared.session_device == owner) & (prepared.session_split != SPLIT_STREAM)
        seen = prepared.sessions[mine].ravel()[-self.LOG:]
        self.log_images = prepared.images[seen]
        self.log_labels = prepared.labels[seen]
        self.switch_to(owner)
        self.transform = None  # (images, rng) -> images
        self.sessions_done = 0

    def switch_to(self, owner: int) -> None:
        """From now on, photograph what ``owner`` photographed in its held-out sessions."""
        self.user = owner
        stream = (self.prepared.session_device == owner) & (self.prepared.session_split == SPLIT_STREAM)
        self.queue: list[np.ndarray] = list(self.prepared.sessions[stream])

    @property
    def exhausted(self) -> bool:
        return not self.queue

    @property
    def home_id(self) -> int:
        return self.home_user

    @property
    def owner_id(self) -> int:
        return self.user

    def next_time(self) -> int:
        raise NotImplementedError("image sessions carry no timestamps to replay")

    def next_session(self, rng: np.random.Generator, recent: int = 0) -> DeviceSession:
        index = self.queue.pop(0)
        images = self.prepared.render(index, self.camera)
        if self.transform is not None:
            images = self.transform(images, rng)
        labels = self.prepared.labels[index]
        realtime = self.prepared.config.realtime
        labelled = ImageSamples(self.log_images[-recent:], self.log_labels[-recent:]) if recent else None
        self.log_images = np.concatenate([self.log_images, images])[-self.LOG:]
        self.log_labels = np.concatenate([self.log_labels, labels])[-self.LOG:]
        self.sessions_done += 1
        return DeviceSession(f"{self.device_id}-s{self.sessions_done}", self.device_id, images[:realtime],
                             ImageSamples(images[realtime:], labels[realtime:]), labelled, realtime_kind="images")
