"""Level ``contextual``: the behavioural neighbours, plus real-time context: the current
item (if the app passes one), the current session (recent interactions weigh more), and
declared context such as the time of day, with category affinities learned from the
user's own history only."""

from __future__ import annotations

import numpy as np

from .. import scoring
from .base import Answer, CatalogRuntime, Request, UserState
from .behavioral import answer_from_scores, position_weights, window_scores


def with_current_item(state: UserState, req: Request) -> UserState:
    """The state with the current item (not stored) at the head of the window."""
    if req.current_item is None:
        return state
    return type(state)(
        user_id=state.user_id,
        signals=state.signals,
        window=np.concatenate(([req.current_item], state.window)).astype(np.int64),
        times=np.concatenate(([req.now], state.times)),
        strengths=np.concatenate(
            ([state.strengths.max() if state.strengths.size else 1.0], state.strengths)
        ).astype(np.float32),
        events=["view", *state.events],
        contexts=[dict(req.context), *state.contexts],
        unknown_items=state.unknown_items,
        excluded=np.concatenate((state.excluded, [req.current_item])).astype(np.int64),
        aggregates=state.aggregates,
        user_vector=state.user_vector,
    )


def recommend(rt: CatalogRuntime, state: UserState, req: Request) -> Answer | str:
    """Session- and context-aware neighbours of the window."""
    state = with_current_item(state, req)
    if state.window.size == 0:
        return "no interactions with catalog items in the window yet"
    p = rt.params
    weights = position_weights(rt, state) * scoring.session_weights(
        state.times, req.now, gap=p.session_gap, boost=p.session_boost
    )
    scores = window_scores(rt, state, weights)
    notes: dict[int, str] = {}
    if rt.cat_names and p.context_strength > 0:
        positive = scores.values > 0
        cand = scores.items[positive]
        for field, value in sorted(req.context.items()):
            if not isinstance(value, str) or cand.size == 0:
                continue
            history = [str(c.get(field, "")) for c in state.contexts]
            if value not in history:
                continue  # never seen in this context: nothing learned to apply
            affinity = scoring.context_affinity(
                rt.cat_indptr,
                rt.cat_indices,
                len(rt.cat_names),
                rt.category_rows(state.window),
                history,
            )
            boost = scoring.category_boost(
                rt.cat_indptr, rt.cat_indices, affinity, rt.category_rows(cand), context=value
            )
            scores.values[positive] *= np.power(np.maximum(boost, 1e-6), p.context_strength).astype(
                np.float32
            )
            # Say so only where this context really differs from the user's overall
            # taste: the favourite category here beats its overall share by 10%.
            here, overall = affinity[value], affinity[""]
            fav = int(np.argmax(here))
            if here[fav] > 1.1 * overall[fav]:
                favourite = rt.cat_names[fav]
                for j, b in zip(cand, boost, strict=True):
                    if b > 1.05:
                        notes[int(j)] = f"; you often pick {favourite} when {field} is {value}"
    answer = answer_from_scores(rt, state, req, scores, weights)
    if isinstance(answer, str) or not notes:
        return answer
    return Answer(
        answer.items,
        answer.scores,
        [e + notes.get(i, "") for i, e in zip(answer.items, answer.explanations, strict=True)],
    )
