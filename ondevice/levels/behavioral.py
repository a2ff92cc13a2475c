"""Level ``behavioral``: item-item neighbours of the user's rolling window, weighted
toward recent items (exponential decay by position) and strong events (a purchase
weighs more than a view)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .. import scoring
from .base import VERBS, Answer, CatalogRuntime, Request, UserState
from .popularity import POPULAR


def position_weights(rt: CatalogRuntime, state: UserState) -> npt.NDArray[np.float32]:
    """Decay by position (newest first) times event strength."""
    decay = scoring.decay_weights(state.window.size, rt.params.half_life)
    return (decay * state.strengths).astype(np.float32)


def window_scores(
    rt: CatalogRuntime, state: UserState, weights: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Neighbour scores of the window with the given per-position weights."""
    cat = rt.catalog
    return scoring.neighbour_scores(
        cat.nbr_indptr,
        cat.nbr_indices,
        cat.nbr_weights,
        state.window,
        n_items=rt.n,
        half_life=float("inf"),
        position_weights=weights,
        weight_table=cat.nbr_weight_table,
    )


def evidence(
    rt: CatalogRuntime,
    state: UserState,
    items: Sequence[int],
    weights: npt.NDArray[np.float32],
    *,
    per_item: int = 2,
) -> dict[int, list[int]]:
    """For each recommended item, the window positions that contributed most to its
    neighbour score (at most ``per_item`` distinct source items), in one vectorized
    pass over the window's neighbour lists."""
    if not items or state.window.size == 0:
        return {}
    cat = rt.catalog
    win = state.window
    starts = cat.nbr_indptr[win]
    lens = cat.nbr_indptr[win + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return {}
    run_start = np.cumsum(lens) - lens
    offs = np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)
    pos = np.repeat(np.arange(win.size), lens)
    targets = cat.nbr_indices[offs]
    hit = np.isin(targets, np.asarray(items, dtype=targets.dtype))
    if not hit.any():
        return {}
    pos, targets = pos[hit], targets[hit]
    contrib = cat.weights_at(offs[hit]) * weights[pos]
    keep = contrib > 0
    pos, targets, contrib = pos[keep], targets[keep], contrib[keep]
    # Best contributions first per target; ties by the more recent position.
    order = np.lexsort((pos, -contrib, targets))
    out: dict[int, list[int]] = {}
    used: dict[int, set[int]] = {}
    for t, p in zip(targets[order].tolist(), pos[order].tolist(), strict=True):
        chosen = out.setdefault(t, [])
        sources = used.setdefault(t, set())
        src = int(win[p])
        if len(chosen) < per_item and src not in sources:
            chosen.append(p)
            sources.add(src)
    return out


def explain(rt: CatalogRuntime, state: UserState, positions: list[int]) -> str:
    """'because you viewed “X” and “Y”' (or 'viewed “X” and bought “Y”')."""
    by_verb: dict[str, list[int]] = {}
    for pos in positions:
        verb = VERBS.get(state.events[pos], "used")
        by_verb.setdefault(verb, []).append(int(state.window[pos]))
    parts = [f"{verb} {rt.titles(items)}" for verb, items in by_verb.items()]
    return "because you " + " and ".join(parts)


def answer_from_scores(
    rt: CatalogRuntime,
    state: UserState,
    req: Request,
    scores: npt.NDArray[np.float32],
    weights: npt.NDArray[np.float32],
) -> Answer | str:
    """Rank neighbour scores, complete with popular items, explain each."""
    if not (scores > 0).any():
        return "the catalog lists no neighbours of the items in the window"
    ranked = scoring.rank_sparse(scores, req.k, exclude=state.excluded, fallback=rt.pop_order)
    items = [int(i) for i in ranked]
    why = evidence(rt, state, [i for i in items if scores[i] > 0], weights)
    return Answer(
        items=items,
        scores=[float(scores[i]) for i in items],
        explanations=[explain(rt, state, why[i]) if i in why else POPULAR for i in items],
    )


def recommend(rt: CatalogRuntime, state: UserState, req: Request) -> Answer | str:
    """Decayed item-item neighbours of the window."""
    if state.window.size == 0:
        return "no interactions with catalog items in the window yet"
    weights = position_weights(rt, state)
    return answer_from_scores(rt, state, req, window_scores(rt, state, weights), weights)
