"""Level ``none``: global popularity. Reads nothing about the user."""

from __future__ import annotations

import numpy as np

from .. import scoring
from .base import Answer, CatalogRuntime, Request, UserState

POPULAR = "popular now"


def recommend(rt: CatalogRuntime, state: UserState, req: Request) -> Answer | str:
    """The ``k`` most popular items not excluded."""
    if rt.n == 0:
        return "the catalog is empty"
    ranked = scoring.popularity_ranking(rt.catalog.popularity, req.k, exclude=state.excluded)
    pop = np.asarray(rt.catalog.popularity)
    return Answer(
        items=[int(i) for i in ranked],
        scores=[float(pop[i]) for i in ranked],
        explanations=[POPULAR] * len(ranked),
    )
