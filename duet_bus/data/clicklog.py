"""Read a click log of one's own: the ``csv`` dataset.

A fleet owner's question is about their own devices, so a recommendation
dataset may be any CSV file of interactions (``--dataset csv --data-path
clicks.csv``; in a scenario ``data: {dataset: csv, path: clicks.csv}``):

- a header line naming the columns ``user``, ``item`` and ``timestamp`` (in
  any order; other columns are ignored), and optionally ``genres``
  (``|``-separated; the ``interest_drift`` shift needs them);
- ``timestamp``: seconds (an integer or a decimal number, e.g. Unix time) or
  an ISO 8601 date and time (``2024-05-01T12:30:00``; without a zone it is
  read as UTC);
- ``user`` and ``item``: integers are kept as the ids reports show; a column
  with any other value is numbered ``1, 2, ...`` in order of first
  appearance (the numbering is the same for the same file).

Every user needs `prep.MIN_INTERACTIONS` events (training, validation and
test targets): users with fewer are left out, and the dataset's ``source``
(printed by `duet evaluate` and kept in its results) says how many.
"""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from duet_bus.data.movielens import Interactions
from duet_bus.errors import DataError

COLUMNS = ("user", "item", "timestamp")


def read_click_log(path: Path) -> Interactions:
    """The interactions of a CSV click log (see the module docstring); `DataError` naming the file, line and
    column of the first value that cannot be read."""
    from duet_bus.data.prep import MIN_INTERACTIONS

    users, items, times, genres = _read(path)
    user, item = _ids(users), _ids(items)
    by_item: dict[int, tuple[str, ...]] = {}  # an item's first non-empty genres
    for raw, value in zip(item.tolist(), genres or ()):
        if value.strip() and raw not in by_item:
            by_item[raw] = tuple(g.strip() for g in value.split("|") if g.strip())
    ids, counts = np.unique(user, return_counts=True)
    short = ids[counts < MIN_INTERACTIONS]
    source = path.name
    if len(short):
        keep = ~np.isin(user, short)
        if not keep.any():
            raise DataError(f"{path}: no user has {MIN_INTERACTIONS} interactions (training, validation and test "
                            f"need one each)")
        user, item, times = user[keep], item[keep], times[keep]
        source += f" ({len(short)} of {len(ids)} users, with fewer than {MIN_INTERACTIONS} interactions, left out)"
    return Interactions("csv", user, item, times, by_item, source=source)


def _read(path: Path) -> tuple[list[str], list[str], np.ndarray, list[str] | None]:
    users, items, times, genres = [], [], [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = csv.reader(handle)
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path}: empty file; expected a header line naming {', '.join(COLUMNS)}")
            names = [h.strip().lower() for h in header]
            missing = [c for c in COLUMNS if c not in names]
            if missing:
                raise DataError(f"{path}: the header names no {' or '.join(missing)} column (it has "
                                f"{', '.join(repr(h) for h in header)}; expected {', '.join(COLUMNS)}, "
                                f"and optionally genres, separated by commas)")
            where = [names.index(c) for c in COLUMNS]
            g = names.index("genres") if "genres" in names else None
            width = max(where + [g or 0]) + 1
            for row in rows:
                line = rows.line_num
                if not row or not any(field.strip() for field in row):
                    continue
                if len(row) < width:
                    raise DataError(f"{path}:{line}: {len(row)} fields, the header names {len(header)}")
                u, i, t = (row[k].strip() for k in where)
                for column, value in zip(COLUMNS, (u, i, t)):
                    if not value:
                        raise DataError(f"{path}:{line}: no {column}")
                users.append(u)
                items.append(i)
                times.append(_seconds(t, path, line))
                if g is not None:
                    genres.append(row[g])
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc
    if not users:
        raise DataError(f"{path}: no interactions after the header")
    return users, items, np.array(times, np.int64), genres if g is not None else None


def _seconds(value: str, path: Path, line: int) -> int:
    try:
        return int(float(value))
    except (ValueError, OverflowError):  # OverflowError: inf
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise DataError(f"{path}:{line}: timestamp {value[:40]!r} is neither seconds nor an ISO 8601 date and "
                        f"time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def _ids(values: list[str]) -> np.ndarray:
    """A column's ids: its integers, or (any other value in it) each distinct value numbered from 1 in order of
    first appearance."""
    try:
        return np.array([int(v) for v in values], np.int64)
    except ValueError:
        number: dict[str, int] = {}
        return np.array([number.setdefault(v, len(number) + 1) for v in values], np.int64)
