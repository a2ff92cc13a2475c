"""Level ``segment``: the top items of the user's segment, shrunk toward popularity by
the operator. The segment comes from the bundle's rules over declared signals, or from
the nearest behaviour centroid to a vector folded in from factor-space sums (no item
ids are kept at this level)."""

from __future__ import annotations

import numpy as np

from .. import scoring
from ..catalog import Segment
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
        factors, window = rt.factors_for(state.window)
        b, a = scoring.aggregates(
            factors,
            window,
            alpha=cat.als.alpha,
            values=state.strengths,
            weights=scoring.decay_weights(state.window.size, rt.params.segment_half_life),
        )
    else:
        return None
    return scoring.fold_in_aggregates(cat.gram, b, a, regularization=cat.als.regularization)


def choose_segment(rt: CatalogRuntime, state: UserState) -> tuple[Segment, str] | None:
    """The user's true segment and how it was chosen: the bundle's rules over declared
    signals first, else the behaviour centroid nearest the folded-in taste; None when
    there is nothing to choose from (no signals, no taste yet)."""
    cat = rt.catalog
    if not cat.segments:
        return None
    signals = {k: str(v) for k, v in state.signals.items()}
    seg_id = match_rules(cat.segment_rules, signals)
    if seg_id is not None:
        segment = segment_by_id(cat, seg_id)
        if segment is not None:
            return segment, "people with the same profile settings"
    seg_id = nearest_centroid(cat.segments, user_vector_from_state(rt, state))
    segment = segment_by_id(cat, seg_id) if seg_id is not None else None
    return None if segment is None else (segment, "people with similar tastes")


def recommend(rt: CatalogRuntime, state: UserState, req: Request) -> Answer | str:
    """The segment's list (with the server's featured items for that segment blended
    in first, when the device fetched the content table), completed with popular items."""
    if not rt.catalog.segments:
        return "the catalog defines no segments"
    chosen = choose_segment(rt, state)
    if chosen is None:
        return "no declared signals or taste summary to choose a segment yet"
    segment, how = chosen
    featured = [i for i in rt.featured.get(segment.id, ()) if 0 <= i < rt.n]
    head = np.asarray(featured[: max(req.k // 2, 1)], dtype=np.int32)
    rest = segment.top_items[~np.isin(segment.top_items, head)].astype(np.int32)
    ranked = scoring.segment_ranking(
        np.concatenate((head, rest)),
        req.k,
        n_items=rt.n,
        exclude=state.excluded,
        fallback=rt.pop_order,
    )
    why = f"popular with {how} (segment “{segment.name}”)"
    pick = f"featured for {how} (segment “{segment.name}”)"
    n_top = len(segment.top_items)
    rank_of = {int(item): r for r, item in enumerate(segment.top_items)}
    in_head = {int(i) for i in head}
    return Answer(
        items=[int(i) for i in ranked],
        scores=[
            1.0 - rank_of[int(i)] / max(n_top, 1) if int(i) in rank_of else 0.0 for i in ranked
        ],
        explanations=[
            pick if int(i) in in_head else why if int(i) in rank_of else POPULAR for i in ranked
        ],
    )
