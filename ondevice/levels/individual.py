"""Level ``individual``: the user vector folded in on the device (implicit ALS, full
weighted solve against the bundle's item factors and their Gram matrix), scores
``Y @ x``, fused by reciprocal rank with the recency-weighted neighbours."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .. import scoring
from .base import Answer, CatalogRuntime, Request, UserState
from .behavioral import evidence, explain, position_weights, window_scores
from .contextual import with_current_item


def fold_in(rt: CatalogRuntime, state: UserState) -> npt.NDArray[np.float32]:
    """The user vector of the window (strength-weighted confidences)."""
    cat = rt.catalog
    assert cat.item_factors is not None and cat.gram is not None and cat.als is not None
    half_life = rt.params.foldin_half_life
    recency = None if np.isinf(half_life) else scoring.decay_weights(state.window.size, half_life)
    factors, window = rt.factors_for(state.window)
    return scoring.fold_in(
        factors,
        cat.gram,
        window,
        regularization=cat.als.regularization,
        alpha=cat.als.alpha,
        values=state.strengths,
        weights=recency,
    )


def recommend(rt: CatalogRuntime, state: UserState, req: Request) -> Answer | str:
    """Fold-in scores fused with decayed neighbours."""
    if not rt.has_factors:
        return "the catalog has no item vectors"
    cached = state.user_vector if req.current_item is None else None
    state = with_current_item(state, req)
    if state.window.size == 0:
        return "no interactions with catalog items in the window yet"
    cat = rt.catalog
    assert cat.item_factors is not None
    x = cached if cached is not None else fold_in(rt, state)
    weights = position_weights(rt, state)
    neighbours = window_scores(rt, state, weights)
    depth = max(rt.params.fusion_depth, req.k)
    candidates = scores = None
    if cat.ann is not None:  # approximate: score the probed clusters only
        want = depth + int(state.excluded.size)  # enough left after the exclusions
        candidates = cat.ann.candidates(cat.ann.probe(x, want))
        scores = cat.scores_of(candidates, x)
    elif cat.item_factor_scales is not None:
        scores = cat.factor_scores(x)
    ranked = scoring.individual_ranking(
        cat.item_factors,
        x,
        neighbours,
        req.k,
        exclude=state.excluded,
        depth=depth,
        neighbour_weight=rt.params.fusion_weight,
        c=rt.params.fusion_c,
        scores=scores,
        candidates=candidates,
    )
    items = [int(i) for i in ranked]
    sub = cat.scores_of(ranked, x) if items else np.empty(0, np.float32)
    why = evidence(
        rt, state, [i for i, s in zip(items, neighbours.at(ranked), strict=True) if s > 0], weights
    )
    taste = (
        f"matches your taste profile, computed on this device from your "
        f"{state.window.size} recent interactions"
    )
    return Answer(
        items=items,
        scores=[float(s) for s in sub],
        explanations=[
            explain(rt, state, why[i]) + "; and it matches your taste profile"
            if i in why
            else taste
            for i in items
        ],
    )
