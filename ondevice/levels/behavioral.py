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
) -> scoring.SparseScores:
    """Neighbour scores of the window with the given per-position weights:
    ``score[j] = sum_p weights[p] * sim(window[p], j)``, for the few items that have one
    (no array as long as the catalog: at 10M items that alone took tens of ms)."""
    if state.window.size == 0:
        return scoring.SparseScores(np.empty(0, np.int64), np.empty(0, np.float32), rt.n)
    owner, targets, sims = rt.window_neighbours(state.window)
    contrib = sims.astype(np.float64) * weights[owner].astype(np.float64)
    items, where = np.unique(targets, return_inverse=True)
    sums = np.bincount(where, weights=contrib, minlength=items.size)
    return scoring.SparseScores(items, sums.astype(np.float32), rt.n)


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
    win = state.window
    pos, targets, sims = rt.window_neighbours(win)
    hit = np.isin(targets, np.asarray(items, dtype=targets.dtype))
    if not hit.any():
        return {}
    pos, targets = pos[hit], targets[hit]
    contrib = sims[hit] * weights[pos]
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
    scores: scoring.SparseScores,
    weights: npt.NDArray[np.float32],
) -> Answer | str:
    """Rank neighbour scores, complete with popular items, explain each."""
    if not (scores.values > 0).any():
        return "the catalog lists no neighbours of the items in the window"
    ranked = scoring.rank_sparse(scores, req.k, exclude=state.excluded, fallback=rt.pop_order)
    items = [int(i) for i in ranked]
    got = scores.at(ranked).tolist()
    why = evidence(rt, state, [i for i, s in zip(items, got, strict=True) if s > 0], weights)
    return Answer(
        items=items,
        scores=[float(s) for s in got],
        explanations=[explain(rt, state, why[i]) if i in why else POPULAR for i in items],
    )


def recommend(rt: CatalogRuntime, state: UserState, req: Request) -> Answer | str:
    """Decayed item-item neighbours of the window."""
    if state.window.size == 0:
        return "no interactions with catalog items in the window yet"
    weights = position_weights(rt, state)
    return answer_from_scores(rt, state, req, window_scores(rt, state, weights), weights)
