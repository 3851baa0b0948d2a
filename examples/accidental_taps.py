"""A shift of your own, as a plugin: from the shift on, a share of a device's clicks are accidental taps.

    duet run scenarios/quickstart.yaml --plugin examples/accidental_taps.py  # with, in the scenario:
    shifts:
      - {kind: accidental_taps, at: 3h, fraction: 0.5, rate: 0.3}

Each click of a shifted device's later sessions is, with probability
``rate``, replaced by an item drawn uniformly from the catalogue: the clicks
to predict, and the histories and real-time samples that follow them, get
noisier. Every draw comes from the device's own generator, so a run over
shards shifts the same clicks as one process.
"""

from typing import Any

import numpy as np

from duet_bus.shifts import Shift, register_shift


@register_shift
class AccidentalTaps(Shift):
    KIND = "accidental_taps"
    PARAMS = {"rate": (0.3, "share of clicks replaced by a random item")}

    @classmethod
    def check(cls, key: str, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            return "must be a number in (0, 1]"
        return None

    def apply(self, device, rng: np.random.Generator) -> None:
        rate, n_items = float(self.params["rate"]), self.prepared.n_items

        def taps(clicks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            out = clicks.copy()
            hit = rng.random(len(out)) < rate
            out[hit] = rng.integers(1, n_items + 1, size=int(hit.sum()))
            return out

        device.transform = taps
