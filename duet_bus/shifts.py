"""Distribution shifts: named, seeded changes to what devices click or photograph.

A scenario applies a shift at a virtual time to a fraction of the devices (or
to the devices of listed users / owners). Each kind is a small class that
says which tasks it applies to (``TASKS``):

- ``handover`` (both tasks): the device changes hands. From the shift on it
  streams another owner's held-out sessions (chosen with the scenario seed).
  A recommendation device's click log, and so its history and real-time
  samples, keep the old owner's clicks until the new owner's replace them; a
  camera device takes the new owner's pictures through its own camera.
- ``interest_drift``: the device's user turns to other genres. From the shift
  on, each click is replaced with probability ``strength`` by an item of the
  target genres (``genres``, default: one genre the device has clicked least
  among the catalogue's eight most common), drawn by popularity among items
  the device has not clicked. Genres come from ``ml-100k.item`` / ``u.item`` /
  ``movies.dat``.

More kinds: subclass `Shift`, decorate it with `register_shift`, and load the
module with ``duet run --plugin your.module``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import numpy as np

from duet_bus.data.images import CORRUPTIONS, corrupt
from duet_bus.data.prep import Prepared
from duet_bus.data.streams import DeviceStream, ImageStream
from duet_bus.errors import ConfigError
from duet_bus.tasks import task_for

SHIFTS: dict[str, type["Shift"]] = {}


def register_shift(cls: type["Shift"]) -> type["Shift"]:
    SHIFTS[cls.KIND] = cls
    return cls


class Shift:
    """One kind of shift. ``PARAMS`` maps each parameter to (default, description)."""

    KIND: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, tuple[Any, str]]] = {}
    TASKS: ClassVar[tuple[str, ...]] = ("recommendation",)  # the tasks whose devices it can shift

    @classmethod
    def check_params(cls, doc: dict, params: dict) -> list[tuple[str, str]]:
        """Fill ``params`` from ``doc`` (defaults for missing keys); return the problems as (key, message)."""
        problems = []
        for key, (default, _) in cls.PARAMS.items():
            value = doc.get(key, default)
            problem = cls.check(key, value)
            if problem:
                problems.append((key, f"{problem}, got {value!r}"))
            else:
                params[key] = value
        return problems

    @classmethod
    def check(cls, key: str, value: Any) -> str | None:
        return None

    def __init__(self, prepared: Prepared, params: dict[str, Any]) -> None:
        self.prepared = prepared
        self.params = params

    def apply(self, device: DeviceStream, rng: np.random.Generator) -> None:
        raise NotImplementedError


@register_shift
class Handover(Shift):
    KIND = "handover"
    PARAMS = {}
    TASKS = ("recommendation", "image_classification")

    def __init__(self, prepared, params: dict[str, Any]) -> None:
        super().__init__(prepared, params)
        self.streaming = task_for(prepared.name).stream_owners(prepared)[1]

    def apply(self, device, rng: np.random.Generator) -> None:
        others = self.streaming[self.streaming != device.user]
        if len(others):
            device.switch_to(int(rng.choice(others)))


@register_shift
class InterestDrift(Shift):
    KIND = "interest_drift"
    PARAMS = {
        "strength": (0.8, "probability that a click is replaced by a target-genre item"),
        "genres": (None, "target genres (default: one chosen per device)"),
    }

    @classmethod
    def check(cls, key: str, value: Any) -> str | None:
        if key == "strength" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value <= 1):
            return "must be a number in (0, 1]"
        if key == "genres" and value is not None and (
                not isinstance(value, list) or not value or not all(isinstance(g, str) for g in value)):
            return "must be a list of genre names"
        return None

    def __init__(self, prepared: Prepared, params: dict[str, Any]) -> None:
        super().__init__(prepared, params)
        known = np.concatenate([prepared.timeline(u)[: prepared.known[u]] for u in range(prepared.n_users)])
        self.popularity = np.bincount(known, minlength=prepared.n_items + 1).astype(np.float64)
        counts = Counter(g for item, gs in prepared.genres.items() for g in gs if g != "unknown")
        if not counts:  # a drift towards genres needs them (a u.data without its u.item, a log without genres)
            raise ConfigError(f"shifts: interest_drift needs item genres, and these {prepared.name} items have none "
                              f"(MovieLens: its item file beside the ratings; a CSV log: a genres column)")
        self.common = [g for g, _ in counts.most_common(8)]
        wanted = params.get("genres")
        if wanted:
            missing = [g for g in wanted if g not in counts]
            if missing:
                raise ConfigError(f"shifts: interest_drift.genres: {missing[0]!r} is not a genre of "
                                  f"{prepared.name}; genres: {', '.join(sorted(counts))}")

    def _items_of(self, genres: list[str], exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = np.array([i for i, gs in self.prepared.genres.items() if set(gs) & set(genres)], np.int64)
        items = np.setdiff1d(items, exclude)
        weights = self.popularity[items] + 1.0
        return items, weights / weights.sum()

    def apply(self, device: DeviceStream, rng: np.random.Generator) -> None:
        genres = self.params.get("genres")
        if not genres:
            mine = Counter(g for item in device.log for g in self.prepared.genres.get(int(item), ()))
            genres = [min(self.common, key=lambda g: (mine.get(g, 0), self.common.index(g)))]
        items, p = self._items_of(genres, device.log)
        if len(items) == 0:
            return
        strength = float(self.params["strength"])

        def drift(clicks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            out = clicks.copy()
            swap = rng.random(len(out)) < strength
            out[swap] = rng.choice(items, size=int(swap.sum()), p=p)
            return out

        device.transform = drift


@register_shift
class LabelMix(Shift):
    KIND = "label_mix"
    PARAMS = {"alpha": (0.3, "Dirichlet concentration of the new class mix (small: few classes)")}
    TASKS = ("image_classification",)

    @classmethod
    def check(cls, key: str, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return "must be a positive number"
        return None

    def __init__(self, prepared, params: dict[str, Any]) -> None:
        super().__init__(prepared, params)
        pool = prepared.sessions[prepared.split("stream")].ravel()  # pictures no model was trained on
        self.by_class = [pool[prepared.labels[pool] == c] for c in range(prepared.n_classes)]
        self.classes = np.array([c for c, members in enumerate(self.by_class) if len(members)])

    def apply(self, device: ImageStream, rng: np.random.Generator) -> None:
        mix = rng.dirichlet(np.full(len(self.classes), float(self.params["alpha"])))
        length = self.prepared.config.session_length
        for i in range(len(device.queue)):
            labels = rng.choice(self.classes, size=length, p=mix)
            device.queue[i] = np.array([rng.choice(self.by_class[c]) for c in labels])


@register_shift
class Corruption(Shift):
    KIND = "corruption"
    PARAMS = {
        "type": ("noise", f"one of {', '.join(CORRUPTIONS)}"),
        "severity": (3, "1 (mild) to 5 (severe)"),
    }
    TASKS = ("image_classification",)

    @classmethod
    def check(cls, key: str, value: Any) -> str | None:
        if key == "type" and value not in CORRUPTIONS:
            return f"must be one of {', '.join(CORRUPTIONS)}"
        if key == "severity" and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5):
            return "must be an integer from 1 to 5"
        return None

    def apply(self, device: ImageStream, rng: np.random.Generator) -> None:
        kind, severity, before = self.params["type"], self.params["severity"], device.transform

        def damaged(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return corrupt(images if before is None else before(images, rng), kind, severity, rng)

        device.transform = damaged  # on top of any earlier corruption
