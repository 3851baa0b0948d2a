"""Cut a user's timeline into sessions.

A session is a run of consecutive interactions of one device. At its start the
device uploads its real-time samples (the clicks just before the session) and
receives dynamic-layer weights that it uses for every sample of the session.
Two ways to cut, both config values: every ``length`` interactions ("count"),
or wherever the gap between two interactions exceeds ``gap_seconds`` ("gap").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duet_bus.errors import ConfigError


@dataclass(frozen=True)
class SessionConfig:
    mode: str = "count"  # "count" or "gap"
    length: int = 5  # interactions per session (mode "count"); also the cap in mode "gap"
    gap_seconds: float = 1800.0  # mode "gap": a longer pause starts a new session

    def __post_init__(self) -> None:
        if self.mode not in ("count", "gap"):
            raise ConfigError(f"sessions.mode: must be 'count' or 'gap', got {self.mode!r}")
        if self.length < 1:
            raise ConfigError(f"sessions.length: must be a positive integer, got {self.length}")
        if self.gap_seconds <= 0:
            raise ConfigError(f"sessions.gap_seconds: must be positive, got {self.gap_seconds}")


def session_starts(times: np.ndarray, first: int, stop: int, cfg: SessionConfig) -> np.ndarray:
    """For each position in ``[first, stop)``, the position where its session starts.

    ``times`` is the user's sorted timestamp array. Sessions never reach back
    before ``first``, so the real-time samples of a session are always clicks
    the device had before it.
    """
    n = stop - first
    if n <= 0:
        return np.zeros(0, np.int64)
    offset = np.arange(n)
    if cfg.mode == "count":
        return first + (offset // cfg.length) * cfg.length
    gaps = np.diff(times[first:stop]) > cfg.gap_seconds
    new = np.concatenate([[True], gaps])
    starts = np.where(new, first + offset, 0)
    starts = np.maximum.accumulate(starts)
    # Cap a long sitting at `length` interactions, counted from its own start.
    return starts + ((first + offset - starts) // cfg.length) * cfg.length


def session_bounds(times: np.ndarray, first: int, stop: int, cfg: SessionConfig) -> list[tuple[int, int]]:
    """The sessions of positions ``[first, stop)`` as ``(start, end)`` pairs, end exclusive."""
    starts = session_starts(times, first, stop, cfg)
    if len(starts) == 0:
        return []
    cuts = np.flatnonzero(np.diff(starts)) + 1
    begin = np.concatenate([[0], cuts])
    end = np.concatenate([cuts, [len(starts)]])
    return [(first + int(b), first + int(e)) for b, e in zip(begin, end)]
