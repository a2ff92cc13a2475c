"""The five personalization levels and the fallback chain.

One module per level, one shared interface (:mod:`ondevice.levels.base`): a level
returns an :class:`~ondevice.levels.base.Answer` or a reason it cannot answer, and the
chain (individual, contextual, behavioral, segment, none) falls back to the next level
down, recording why. ``none`` always answers (with an empty list only if every item
is excluded or the catalog is empty).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

from ..policy import PrivacyLevel
from . import behavioral, contextual, individual, popularity, segment
from .base import (
    Answer,
    CatalogRuntime,
    Recommendation,
    Recommendations,
    Request,
    UserState,
)

__all__ = [
    "CHAIN",
    "Answer",
    "CatalogRuntime",
    "Recommendation",
    "Recommendations",
    "Request",
    "UserState",
    "recommend",
]

Level = Callable[[CatalogRuntime, UserState, Request], Answer | str]

CHAIN: Final[tuple[tuple[PrivacyLevel, Level], ...]] = (
    (PrivacyLevel.INDIVIDUAL, individual.recommend),
    (PrivacyLevel.CONTEXTUAL, contextual.recommend),
    (PrivacyLevel.BEHAVIORAL, behavioral.recommend),
    (PrivacyLevel.SEGMENT, segment.recommend),
    (PrivacyLevel.NONE, popularity.recommend),
)


def recommend(
    requested: PrivacyLevel, rt: CatalogRuntime, state: UserState, req: Request
) -> Recommendations:
    """Answer at ``requested`` or the first level below it that can."""
    fallbacks: list[str] = []
    for level, fn in CHAIN:
        if not requested.allows(level):
            continue
        answer = fn(rt, state, req)
        if not isinstance(answer, str) and not all(map(math.isfinite, answer.scores)):
            # a last guard: the bundle's values are bounded, but no ranking built on an
            # overflowed score is shown; the next level answers instead
            answer = "scores out of range (the catalog's values overflow)"
        if isinstance(answer, str):
            fallbacks.append(f"{level.value}: {answer}")
            continue
        items = tuple(
            Recommendation(
                item_id=rt.catalog.item_ids[i],
                title=rt.title(i),
                score=s,
                level=level,
                explanation=e,
            )
            for i, s, e in zip(answer.items, answer.scores, answer.explanations, strict=True)
        )
        return Recommendations(items, level, requested, tuple(fallbacks))
    return Recommendations((), PrivacyLevel.NONE, requested, tuple(fallbacks))
