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


def evidence(
    rt: CatalogRuntime,
    state: UserState,
    items: Sequence[int],
    weights: npt.NDArray[np.float32],
    *,
    per_item: int = 2,
) -> dict[int, list[int]]:
    """For each recommended item, the window positions that contributed most to its
    neighbour score (at most ``per_item`` distinct source items)."""
    targets = np.asarray(items, dtype=np.int64)
    found: dict[int, dict[int, tuple[float, int]]] = {}
    for pos, src in enumerate(state.window):
        if weights[pos] <= 0:
            continue
        nbr, sim = rt.catalog.neighbours_of(int(src))
        hit = np.isin(nbr, targets)
        if not hit.any():
            continue
        for j, s in zip(nbr[hit], sim[hit], strict=True):
            contrib = float(weights[pos] * s)
            slot = found.setdefault(int(j), {})
            prev = slot.get(int(src))
            if prev is None or contrib > prev[0]:
                slot[int(src)] = (contrib, pos)
    out: dict[int, list[int]] = {}
    for j, by_src in found.items():
        best = sorted(by_src.values(), key=lambda t: (-t[0], t[1]))[:per_item]
        out[j] = [pos for _, pos in best]
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
    cat = rt.catalog
    scores = scoring.neighbour_scores(
        cat.nbr_indptr,
        cat.nbr_indices,
        cat.nbr_weights,
        state.window,
        n_items=rt.n,
        half_life=float("inf"),
        position_weights=weights,
    )
    return answer_from_scores(rt, state, req, scores, weights)
