"""MovieLens-100K loader: ``u.data`` (interactions), ``u.user`` (declared signals) and
``u.item`` (titles and genres, used as item categories).

Where it comes from: GroupLens Research (University of Minnesota) publishes it at
https://grouplens.org/datasets/movielens/100k/ as ``ml-100k.zip``; unzip it and pass the
``ml-100k`` directory (or the zip file itself). Its README sets the terms: research use
only, no redistribution without GroupLens' permission, no commercial or revenue-bearing
use without their permission, no claim of endorsement by the University or GroupLens,
and publications that use it acknowledge it (cite Harper and Konstan, "The MovieLens
Datasets: History and Context", ACM TiiS 5(4), 2015). That is why this project never
ships or copies it: the files are read in place.

Every rating counts as one binary implicit interaction. Declared signals per user:
``age`` (a band: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``gender`` and
``occupation``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ondevice.errors import InvalidInputError
from ondevice.eval.harness import Dataset

__all__ = [
    "GENRES",
    "ML100K_ITEMS",
    "ML100K_RATINGS",
    "ML100K_URL",
    "ML100K_USERS",
    "age_band",
    "is_published_ml100k",
    "load_movielens",
]

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


def age_band(age: int) -> str:
    """The MovieLens-1M age bands, used as a coarse declared signal."""
    for upper, name in (
        (18, "<18"),
        (25, "18-24"),
        (35, "25-34"),
        (45, "35-44"),
        (50, "45-49"),
        (56, "50-55"),
    ):
        if age < upper:
            return name
    return "56+"


ML100K_URL = "https://grouplens.org/datasets/movielens/100k/"
ML100K_RATINGS, ML100K_USERS, ML100K_ITEMS = 100_000, 943, 1682
"""The size of the published ML-100K (``u.data``, ``u.user``, ``u.item``)."""

_HOW_TO_GET = (
    f"get ml-100k.zip from GroupLens ({ML100K_URL}; research use, no redistribution, "
    "see its README), unzip it and pass the ml-100k directory or the zip file"
)


_FILES = ("u.data", "u.user", "u.item")


def _find(root: Path) -> tuple[Callable[[str], bytes | None], str]:
    """A reader of the ML-100K member files under ``root`` (a directory, its parent, or
    ``ml-100k.zip``) and a description of where they are."""
    if root.is_file() and zipfile.is_zipfile(root):
        with zipfile.ZipFile(root) as zf:
            names = {Path(n).name: n for n in zf.namelist() if Path(n).parent.name == "ml-100k"}
            if not names:
                names = {n: n for n in zf.namelist() if "/" not in n}
            blobs = {short: zf.read(full) for short, full in names.items() if short in _FILES}
        return blobs.get, f"{root} (zip)"
    for folder in (root, root / "ml-100k"):
        if (folder / "u.data").is_file():

            def read(name: str, folder: Path = folder) -> bytes | None:
                f = folder / name
                return f.read_bytes() if f.is_file() else None

            return read, str(folder)
    if not root.exists():
        raise InvalidInputError(
            f"no MovieLens-100K at {root}: the path does not exist; {_HOW_TO_GET}"
        )
    others = {
        "ratings.dat": "MovieLens 1M or 10M",
        "ratings.csv": "a MovieLens 'latest', 20M or 25M release",
    }
    for name, what in others.items():
        if (root / name).is_file():
            raise InvalidInputError(
                f"{root} holds {what} ({name}), not MovieLens-100K; {_HOW_TO_GET}"
            )
    raise InvalidInputError(f"{root} is not a MovieLens-100K directory (no u.data); {_HOW_TO_GET}")


def _table(blob: bytes, sep: str, width: int, name: str, where: str) -> list[list[str]]:
    rows = []
    for n, line in enumerate(blob.decode("latin-1").splitlines()):
        if not line.strip():
            continue
        parts = line.split(sep)
        if len(parts) < width:
            raise InvalidInputError(
                f"{where}: {name} line {n + 1} is not in the ML-100K format "
                f"({width} {sep!r}-separated fields expected); {_HOW_TO_GET}"
            )
        rows.append(parts)
    return rows


def load_movielens(path: str | os.PathLike[str]) -> Dataset:
    """Load ML-100K from a directory (``u.data``, ``u.user``, optionally ``u.item``),
    its parent, or the ``ml-100k.zip`` GroupLens publishes.

    Raises :class:`~ondevice.errors.InvalidInputError` naming where to get the data
    when the path does not exist or does not hold ML-100K files in their format. A
    smaller or modified copy in the same format loads: :func:`is_published_ml100k` tells
    whether its size is the published one.
    """
    root = Path(path)
    try:
        read, where = _find(root)
        data_blob, user_blob, item_blob = (read(name) for name in _FILES)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InvalidInputError(f"cannot read MovieLens data in {root}: {exc}") from exc
    if data_blob is None or user_blob is None:
        missing = " and ".join(
            n for n, b in zip(_FILES, (data_blob, user_blob), strict=False) if b is None
        )
        raise InvalidInputError(f"{where}: {missing} missing; {_HOW_TO_GET}")
    try:
        raw = np.asarray(
            [[int(v) for v in r[:4]] for r in _table(data_blob, "\t", 4, "u.data", where)],
            dtype=np.int64,
        ).reshape(-1, 4)
    except ValueError as exc:
        raise InvalidInputError(
            f"{where}: u.data must hold user, item, rating, timestamp integers "
            f"separated by tabs ({exc}); {_HOW_TO_GET}"
        ) from exc
    if raw.shape[0] == 0:
        raise InvalidInputError(f"{where}: u.data is empty; {_HOW_TO_GET}")
    user_rows = _table(user_blob, "|", 5, "u.user", where)
    item_rows = (
        [] if item_blob is None else _table(item_blob, "|", 5 + len(GENRES), "u.item", where)
    )
    user_raw, item_raw = raw[:, 0], raw[:, 1]
    u_ids = np.unique(user_raw)
    i_ids = np.unique(item_raw)
    titles: dict[int, str] = {}
    genres: dict[int, tuple[str, ...]] = {}
    try:
        for parts in item_rows:
            iid = int(parts[0])
            titles[iid] = parts[1]
            flags = parts[5 : 5 + len(GENRES)]
            genres[iid] = tuple(g for g, flag in zip(GENRES, flags, strict=True) if flag == "1")
        signals_by_id: dict[int, dict[str, str]] = {}
        for parts in user_rows:
            signals_by_id[int(parts[0])] = {
                "age": age_band(int(parts[1])),
                "gender": parts[2],
                "occupation": parts[3],
            }
    except ValueError as exc:
        raise InvalidInputError(
            f"{where}: u.user or u.item is not in the ML-100K format ({exc}); {_HOW_TO_GET}"
        ) from exc
    if titles:
        i_ids = np.union1d(i_ids, np.asarray(sorted(titles), dtype=np.int64))
    users = np.searchsorted(u_ids, user_raw)
    items = np.searchsorted(i_ids, item_raw)
    return Dataset.from_arrays(
        "MovieLens-100K",
        users,
        items,
        raw[:, 3],
        n_users=u_ids.size,
        n_items=i_ids.size,
        item_ids=[str(i) for i in i_ids.tolist()],
        titles=[titles.get(i, str(i)) for i in i_ids.tolist()],
        categories=[genres.get(i, ()) for i in i_ids.tolist()],
        signals=[signals_by_id.get(u, {}) for u in u_ids.tolist()],
        rule_signals=("age", "gender"),
    )


def is_published_ml100k(data: Dataset) -> bool:
    """Whether ``data`` has the published ML-100K's size (100,000 ratings by 943 users
    on 1,682 films), so its results are comparable with docs/evaluation.md."""
    ratings = sum(int(s.size) for s in data.sequences)
    return (ratings, data.n_users, data.n_items) == (ML100K_RATINGS, ML100K_USERS, ML100K_ITEMS)
