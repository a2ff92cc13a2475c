"""Level ``segment``: the top items of the user's segment, shrunk toward popularity by
the operator. The segment comes from the bundle's rules over declared signals, or from
the nearest behaviour centroid to a vector folded in from factor-space sums (no item
ids are kept at this level)."""

from __future__ import annotations

import numpy as np

from .. import scoring
from ..segments import match_rules, nearest_centroid, segment_by_id
from .base import Answer, CatalogRuntime, Request, UserState
from .popularity import POPULAR


def user_vector_from_state(rt: CatalogRuntime, state: UserState) -> np.ndarray | None:
    """The fold-in vector the segment level may use: from the stored aggregates, or
    (at higher levels) from the window's own sums."""
    cat = rt.catalog
    if not rt.has_factors or cat.gram is None or cat.als is None or cat.item_factors is None:
        return None
    if state.aggregates is not None:
        b, a = state.aggregates
    elif state.window.size:
        b, a = scoring.aggregates(
            cat.item_factors, state.window, alpha=cat.als.alpha, values=state.strengths
        )
    else:
        return None
    return scoring.fold_in_aggregates(cat.gram, b, a, regularization=cat.als.regularization)


def recommend(rt: CatalogRuntime, state: UserState, req: Request) -> Answer | str:
    """The segment's list, completed with popular items."""
    cat = rt.catalog
    if not cat.segments:
        return "the catalog defines no segments"
    signals = {k: str(v) for k, v in state.signals.items()}
    seg_id = match_rules(cat.segment_rules, signals)
    how = "people with the same profile settings"
    if seg_id is None or segment_by_id(cat, seg_id) is None:
        seg_id = nearest_centroid(cat.segments, user_vector_from_state(rt, state))
        how = "people with similar tastes"
    segment = segment_by_id(cat, seg_id) if seg_id is not None else None
    if segment is None:
        return "no declared signals or taste summary to choose a segment yet"
    ranked = scoring.segment_ranking(
        segment.top_items, req.k, n_items=rt.n, exclude=state.excluded, fallback=rt.pop_order
    )
    why = f"popular with {how} (segment “{segment.name}”)"
    n_top = len(segment.top_items)
    rank_of = {int(item): r for r, item in enumerate(segment.top_items)}
    return Answer(
        items=[int(i) for i in ranked],
        scores=[
            1.0 - rank_of[int(i)] / max(n_top, 1) if int(i) in rank_of else 0.0 for i in ranked
        ],
        explanations=[why if int(i) in rank_of else POPULAR for i in ranked],
    )
