"""What a device sees of one session.

A `DeviceSession` holds the device's real-time clicks (uploaded to the cloud)
and the session's samples (history, candidate targets, labels: the labels are
used for evaluation only), plus the labelled recent samples that on-device
fine-tuning may learn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from duet_bus.data.prep import Prepared, Samples


@dataclass
class DeviceSession:
    session_id: str
    device_id: str
    realtime: np.ndarray  # (<= L,) item ids, most recent last
    samples: Samples  # the session's samples to score
    recent: Samples | None = None  # labelled recent samples (fine-tuning only)


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
