"""Read MovieLens interaction files (and, through `clicklog`, a CSV log of one's own).

Three formats, one result (`Interactions`):

- the ML-100k copy inside the PyPI wheel ``recbole==1.2.1``
  (``recbole/dataset_example/ml-100k/ml-100k.inter``, tab-separated with a
  typed header), located through ``importlib.metadata`` so recbole itself is
  never imported (its dependencies are heavy);
- GroupLens ML-100k ``u.data`` (tab-separated ``user item rating timestamp``);
- GroupLens ML-1M ``ratings.dat`` (``user::item::rating::timestamp``).

Item genres come from the matching item file when it is present
(``ml-100k.item``, ``u.item`` or ``movies.dat``); the runner's
``interest_drift`` shift needs them, training does not.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duet_bus.errors import DataError

RECBOLE_DIST = "recbole"
RECBOLE_ML100K = "recbole/dataset_example/ml-100k"


@dataclass(frozen=True)
class Interactions:
    """Raw interactions of one dataset, one row per (user, item, time) event."""

    name: str
    user: np.ndarray  # int64, raw user ids
    item: np.ndarray  # int64, raw item ids
    timestamp: np.ndarray  # int64, seconds
    genres: dict[int, tuple[str, ...]] = field(default_factory=dict)  # raw item id -> genres
    source: str = ""

    def __len__(self) -> int:
        return len(self.user)


def bundled_ml100k_dir() -> Path:
    """Folder of the ML-100k files shipped in the recbole wheel (not imported)."""
    try:
        dist = importlib.metadata.distribution(RECBOLE_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            "ML-100k ships in the PyPI wheel recbole==1.2.1, which is not installed; "
            "run `pip install --no-deps recbole==1.2.1` (make does this) "
            "or pass --data-path to a GroupLens u.data file"
        ) from exc
    folder = Path(str(dist.locate_file(RECBOLE_ML100K)))
    if not (folder / "ml-100k.inter").is_file():
        raise DataError(f"recbole {dist.version} is installed but has no {RECBOLE_ML100K}/ml-100k.inter")
    return folder


def load_dataset(name: str, path: str | Path | None = None) -> Interactions:
    """Load ``ml-100k`` (bundled, or from ``path``), ``ml-1m`` (``path`` required) or ``csv``, a click log of
    one's own (``path`` required; `clicklog`).

    ``path`` may be the interaction file itself or the folder holding it (MovieLens).
    """
    if name == "csv":
        from duet_bus.data.clicklog import read_click_log

        if path is None:
            raise DataError("dataset csv: give the path of the CSV file (columns user, item, timestamp) with "
                            "--data-path, or data.path in a scenario")
        if not Path(path).is_file():
            raise DataError(f"{path}: {'a folder, not a CSV file' if Path(path).is_dir() else 'no such file'}")
        return read_click_log(Path(path))
    if name not in ("ml-100k", "ml-1m"):
        raise DataError(f"dataset: unknown dataset {name!r}; choose ml-100k, ml-1m or csv")
    if path is None:
        if name == "ml-1m":
            raise DataError("dataset ml-1m: give the path to ratings.dat (GroupLens ml-1m); it is not bundled")
        folder = bundled_ml100k_dir()
        return _read_recbole(name, folder / "ml-100k.inter", folder / "ml-100k.item")
    path = Path(path)
    if path.is_dir():
        for candidate in ("ratings.dat", "u.data", f"{name}.inter"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise DataError(f"{path}: no ratings.dat, u.data or {name}.inter in this folder")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.name.endswith(".inter"):
        return _read_recbole(name, path, path.with_suffix(".item"))
    if path.name == "ratings.dat" or path.suffix == ".dat":
        return _read_grouplens(name, path, "::", path.parent / "movies.dat")
    return _read_grouplens(name, path, "\t", path.parent / "u.item")


def _rows(path: Path, sep: str, skip_header: bool):
    try:
        with open(path, encoding="latin-1") as handle:
            for lineno, line in enumerate(handle, start=1):
                if skip_header and lineno == 1:
                    continue
                line = line.rstrip("\r\n")
                if line:
                    yield lineno, line.split(sep)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc


def _parse_events(path: Path, sep: str, skip_header: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users, items, times = [], [], []
    for lineno, fields in _rows(path, sep, skip_header):
        if len(fields) < 4:
            raise DataError(
                f"{path}:{lineno}: expected 4 fields (user, item, rating, timestamp) "
                f"separated by {sep!r}, got {len(fields)}"
            )
        try:
            users.append(int(fields[0]))
            items.append(int(fields[1]))
            times.append(int(float(fields[3])))
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: not a number in {fields[:4]!r}") from exc
    if not users:
        raise DataError(f"{path}: no interactions")
    return np.array(users, np.int64), np.array(items, np.int64), np.array(times, np.int64)


def _read_recbole(name: str, inter: Path, item_file: Path) -> Interactions:
    user, item, ts = _parse_events(inter, "\t", skip_header=True)
    genres: dict[int, tuple[str, ...]] = {}
    if item_file.is_file():
        for lineno, fields in _rows(item_file, "\t", skip_header=True):
            if len(fields) < 4:
                raise DataError(f"{item_file}:{lineno}: expected 4 tab-separated fields, got {len(fields)}")
            genres[int(fields[0])] = tuple(fields[3].split())
    return Interactions(name, user, item, ts, genres, source=str(inter.name))


def _read_grouplens(name: str, ratings: Path, sep: str, item_file: Path) -> Interactions:
    user, item, ts = _parse_events(ratings, sep, skip_header=False)
    genres: dict[int, tuple[str, ...]] = {}
    if item_file.is_file():
        genres = _read_u_item(item_file) if item_file.name == "u.item" else _read_movies_dat(item_file)
    return Interactions(name, user, item, ts, genres, source=str(ratings.name))


_U_ITEM_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy "
    "Film-Noir Horror Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


def _read_u_item(path: Path) -> dict[int, tuple[str, ...]]:
    genres = {}
    for lineno, fields in _rows(path, "|", skip_header=False):
        flags = fields[5:]
        if len(flags) != len(_U_ITEM_GENRES):
            raise DataError(f"{path}:{lineno}: expected {len(_U_ITEM_GENRES)} genre flags, got {len(flags)}")
        genres[int(fields[0])] = tuple(g for g, f in zip(_U_ITEM_GENRES, flags) if f == "1")
    return genres


def _read_movies_dat(path: Path) -> dict[int, tuple[str, ...]]:
    genres = {}
    for lineno, fields in _rows(path, "::", skip_header=False):
        if len(fields) != 3:
            raise DataError(f"{path}:{lineno}: expected movie::title::genres, got {len(fields)} fields")
        genres[int(fields[0])] = tuple(fields[2].split("|"))
    return genres
