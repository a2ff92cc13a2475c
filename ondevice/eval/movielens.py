"""MovieLens-100K loader: ``u.data`` (interactions), ``u.user`` (declared signals) and
``u.item`` (titles and genres, used as item categories).

The files are read in place; nothing is copied. Every rating counts as one binary
implicit interaction. Declared signals per user: ``age`` (a band: under 18, 18-24,
25-34, 35-44, 45-49, 50-55, 56+), ``gender`` and ``occupation``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ondevice.errors import InvalidInputError
from ondevice.eval.harness import Dataset

__all__ = ["GENRES", "age_band", "load_movielens"]

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


def load_movielens(path: str | os.PathLike[str]) -> Dataset:
    """Load an ML-100K directory (``u.data``, ``u.user``, optionally ``u.item``)."""
    root = Path(path)
    try:
        raw = np.loadtxt(root / "u.data", dtype=np.int64, ndmin=2)
        user_lines = (root / "u.user").read_text(encoding="latin-1").splitlines()
        item_file = root / "u.item"
        item_lines = (
            item_file.read_text(encoding="latin-1").splitlines() if item_file.exists() else []
        )
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read MovieLens data in {root}: {exc}") from exc
    if raw.shape[1] < 4:
        raise InvalidInputError("u.data needs user, item, rating, timestamp columns")
    user_raw, item_raw = raw[:, 0], raw[:, 1]
    u_ids = np.unique(user_raw)
    i_ids = np.unique(item_raw)
    titles: dict[int, str] = {}
    genres: dict[int, tuple[str, ...]] = {}
    for line in item_lines:
        parts = line.split("|")
        if len(parts) < 5 + len(GENRES):
            continue
        iid = int(parts[0])
        titles[iid] = parts[1]
        flags = parts[5 : 5 + len(GENRES)]
        genres[iid] = tuple(g for g, flag in zip(GENRES, flags, strict=True) if flag == "1")
    if titles:
        i_ids = np.union1d(i_ids, np.asarray(sorted(titles), dtype=np.int64))
    signals_by_id: dict[int, dict[str, str]] = {}
    for line in user_lines:
        parts = line.split("|")
        if len(parts) >= 4:
            signals_by_id[int(parts[0])] = {
                "age": age_band(int(parts[1])),
                "gender": parts[2],
                "occupation": parts[3],
            }
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
