"""Shared types of the personalization levels: what a level reads, what it answers.

A level is a function ``(runtime, state, request) -> Answer | str``: it returns ranked
items with explanations, or a string saying why it cannot answer (cold start, no item
vectors...), and the chain falls back to the next level down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from .._bundle2 import ItemIndex
from ..catalog import Catalog
from ..policy import SignalValue
from ..results import Recommendation, Recommendations
from ..scoring import ScoringParams, category_index

__all__ = [
    "EVENT_WEIGHTS",
    "Answer",
    "CatalogRuntime",
    "Recommendation",
    "Recommendations",
    "Request",
    "UserState",
]

#: Implicit-feedback strength of each event type (the confidence of implicit ALS and
#: the weight of a window position). ``dismiss`` is negative feedback: never evidence,
#: always excluded.
EVENT_WEIGHTS: Final[Mapping[str, float]] = {
    "view": 1.0,
    "click": 2.0,
    "add_to_cart": 3.0,
    "rate": 3.0,
    "like": 4.0,
    "purchase": 5.0,
    "dismiss": 0.0,
}

VERBS: Final[Mapping[str, str]] = {
    "view": "viewed",
    "click": "opened",
    "add_to_cart": "saved",
    "purchase": "bought",
    "like": "liked",
    "rate": "rated",
}


class CatalogRuntime:
    """A loaded catalog plus what every request reuses: the id index, the popularity
    order (the fallback of every ranking) and the category index."""

    def __init__(self, catalog: Catalog, fingerprint: str) -> None:
        self.catalog = catalog
        self.fingerprint = fingerprint
        self.n = catalog.n_items
        #: item id -> index: a dictionary, or a binary search over a format 2 id table
        self.index = ItemIndex(catalog.item_ids)
        if catalog.popularity_order is not None:
            self.pop_order: npt.NDArray[np.int32] = catalog.popularity_order
        else:
            pop = np.asarray(catalog.popularity, dtype=np.float64)
            self.pop_order = np.lexsort((np.arange(self.n), -pop)).astype(np.int32)
        table = catalog.category_table
        #: item -> row of ``cat_indptr`` (the item's category set), or None: row = item
        self.cat_set_of: npt.NDArray[np.integer] | None = None
        if table is not None:
            self.cat_names: tuple[str, ...] = table.names
            self.cat_indptr = table.indptr.astype(np.int64)
            self.cat_indices = table.indices.astype(np.int32)
            self.cat_set_of = table.item_set
        else:
            self.cat_names, self.cat_indptr, self.cat_indices = category_index(
                catalog.categories, self.n
            )
        self._last_window: (
            tuple[
                bytes,
                tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]],
            ]
            | None
        ) = None
        #: The operator's tuned device knobs, shipped in the bundle (``scoring.*``).
        self.params = ScoringParams.from_extra(catalog.extra)
        #: Featured items per segment id (catalog indices), from the sync server's
        #: content table: the same table for every device, chosen from locally.
        self.featured: dict[int, list[int]] = {}
        self.has_factors = (
            catalog.item_factors is not None
            and catalog.gram is not None
            and catalog.als is not None
        )

    def factors_for(
        self, items: npt.NDArray[np.integer]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``(Y, items)`` for the scoring functions that read factor rows of ``items``:
        the catalog's own matrix when it is float32, else just the dequantized rows of
        those items and the items renumbered into them (int8 factors are never
        dequantized whole)."""
        cat = self.catalog
        assert cat.item_factors is not None
        idx = np.asarray(items, dtype=np.int64).ravel()
        if cat.item_factor_scales is None:
            return cat.item_factors, idx
        uniq, local = np.unique(idx, return_inverse=True)
        return cat.factor_rows(uniq), local.astype(np.int64)

    def window_neighbours(
        self, window: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """:meth:`Catalog.gather_neighbours` of a window, remembered for the last window
        asked (a request reads them twice: for its scores and for its explanations; a
        large catalog decodes them from bit-packed rows)."""
        key = window.tobytes()
        last = self._last_window
        if last is not None and last[0] == key:
            return last[1]
        got = self.catalog.gather_neighbours(window)
        self._last_window = (key, got)  # one tuple, replaced whole: safe across threads
        return got

    def category_rows(self, items: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
        """The rows of ``cat_indptr`` holding the categories of ``items``."""
        return items if self.cat_set_of is None else self.cat_set_of[items]

    def title(self, index: int) -> str:
        """The display title of an item (its id when the catalog has no title)."""
        title = self.catalog.titles[index]
        return title or self.catalog.item_ids[index]

    def titles(self, indices: Sequence[int]) -> str:
        """'X', 'X and Y' or 'X, Y and Z'."""
        names = [f"“{self.title(i)}”" for i in indices]
        if len(names) <= 1:
            return "".join(names)
        return ", ".join(names[:-1]) + " and " + names[-1]


@dataclass(slots=True)
class UserState:
    """What the current privacy level lets the levels read about one user.

    Window arrays are newest first and hold only items the catalog knows.
    """

    user_id: str
    signals: Mapping[str, SignalValue] = field(default_factory=dict)
    window: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    times: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0, np.float64))
    strengths: npt.NDArray[np.float32] = field(default_factory=lambda: np.empty(0, np.float32))
    events: list[str] = field(default_factory=list)
    contexts: list[Mapping[str, SignalValue]] = field(default_factory=list)
    unknown_items: int = 0
    excluded: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    aggregates: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
    user_vector: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """One call of ``get_recommendations``: how many, the now, and real-time context."""

    k: int
    now: float
    context: Mapping[str, SignalValue] = field(default_factory=dict)
    current_item: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A level's ranked items (catalog indices), scores and explanations."""

    items: Sequence[int]
    scores: Sequence[float]
    explanations: Sequence[str]
