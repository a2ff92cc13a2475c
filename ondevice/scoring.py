"""Device-side recommendation mathematics: pure numpy, no state, no I/O.

These are the functions the personalization levels call on the device and the very
same functions the evaluation harness (``ondevice.eval``) measures, so the published
table describes the product, not a re-implementation.

Conventions:

- items are integer indices into the catalog (``0 <= i < n_items``);
- a user's *window* is passed **newest first** (position 0 is the latest interaction);
- every ranking is an ``int32`` array of item indices, best first;
- ties are broken deterministically by the lower item index;
- *exclude* (already seen, blocked) is an index array or a boolean mask of length
  ``n_items``; an excluded item is never returned, and asking for more items than can be
  returned yields a shorter ranking rather than an error.

Levels and their functions:

- ``none``: :func:`popularity_ranking`;
- ``segment``: :func:`segment_ranking` (the segment itself comes from
  :mod:`ondevice.segments`), with the user vector folded in from aggregates
  (:func:`aggregates`, :func:`update_aggregates`, :func:`fold_in_aggregates`) so that
  the profile keeps no item IDs;
- ``behavioral``: :func:`decay_weights` and :func:`neighbour_scores`, ranked by
  :func:`rank_sparse`;
- ``contextual``: the above plus :func:`session_weights`, :func:`context_affinity`
  and :func:`category_boost`;
- ``individual``: :func:`fold_in` (the full weighted implicit-ALS solve),
  :func:`factor_scores`, and :func:`rank_fusion` with the decayed neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .ann import ItemRuns

__all__ = [
    "ScoringParams",
    "aggregates",
    "category_boost",
    "category_index",
    "context_affinity",
    "contextual_scores",
    "decay_weights",
    "factor_scores",
    "fold_in",
    "fold_in_aggregates",
    "individual_ranking",
    "neighbour_scores",
    "popularity_ranking",
    "rank_fusion",
    "rank_sparse",
    "segment_ranking",
    "session_weights",
    "top_k",
    "update_aggregates",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Exclude = npt.NDArray[np.bool_] | npt.NDArray[np.integer] | Sequence[int] | None


class SparseScores(NamedTuple):
    """Scores that are zero but for a few items: ``items`` (increasing, int64) and their
    ``values``; ``n`` items in all. A request's neighbour scores at 10M items, without a
    10M-long array."""

    items: npt.NDArray[np.int64]
    values: npt.NDArray[np.float32]
    n: int

    def dense(self) -> npt.NDArray[np.float32]:
        """The same scores as a ``float32[n]`` array."""
        out = np.zeros(self.n, dtype=np.float32)
        out[self.items] = self.values
        return out

    def at(self, items: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        """The scores of ``items`` (0 for the items not listed)."""
        idx = np.asarray(items, dtype=np.int64)
        out = np.zeros(idx.size, dtype=np.float32)
        if self.items.size == 0 or idx.size == 0:
            return out
        pos = np.minimum(np.searchsorted(self.items, idx), self.items.size - 1)
        found = self.items[pos] == idx
        out[found] = self.values[pos[found]]
        return out


_EMPTY = np.empty(0, dtype=np.int32)


MAX_KNOB = 1e6
"""The largest finite value a scoring knob from a bundle may take (larger ones keep their
default): every knob multiplies or exponentiates scores, which must stay finite."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoringParams:
    """The device-side knobs of the levels, shipped in the bundle (``Catalog.extra``,
    keys ``"scoring.<name>"``) so the operator's tuning reaches the device.

    The defaults are the values most often chosen on the inner validation split of
    MovieLens-100K by ``python -m ondevice.eval``.
    """

    half_life: float = 2.0
    """Neighbour recency half-life, in window positions (behavioral, contextual,
    individual)."""
    foldin_half_life: float = 10.0
    """Recency half-life of the individual level's fold-in weights (``inf``: none)."""
    segment_half_life: float = 10.0
    """Recency half-life of the segment level's aggregates, in interactions."""
    fusion_weight: float = 1.0
    """Weight of the neighbour ranking against the fold-in ranking in the fusion."""
    fusion_c: float = 60.0
    """The reciprocal-rank-fusion constant."""
    fusion_depth: int = 100
    """How deep each ranking goes into the fusion."""
    session_gap: float = 3600.0
    """Seconds between two interactions that end a session."""
    session_boost: float = 1.0
    """Extra weight of the current session's window positions (contextual)."""
    context_strength: float = 0.0
    """Exponent of the category-affinity boost in the declared context (contextual);
    0 turns it off. MovieLens' time of day never earned a non-zero value."""

    def to_extra(self) -> dict[str, str]:
        """The ``Catalog.extra`` entries that carry these parameters."""
        return {f"scoring.{f.name}": repr(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_extra(cls, extra: Mapping[str, str]) -> ScoringParams:
        """Read the parameters from ``Catalog.extra``; missing or malformed entries keep
        their defaults (a bundle never breaks recommendations for a bad knob)."""
        may_be_inf = {"half_life", "foldin_half_life", "segment_half_life"}
        must_be_positive = may_be_inf | {"fusion_c", "fusion_depth", "session_gap"}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = extra.get(f"scoring.{f.name}")
            if raw is None:
                continue
            try:
                v = float(raw)
            except ValueError:
                continue
            if (
                math.isnan(v)
                or v < 0
                or (v == 0 and f.name in must_be_positive)
                or (math.isinf(v) and f.name not in may_be_inf)
                or (math.isfinite(v) and v > MAX_KNOB)  # products must stay finite
            ):
                continue
            values[f.name] = int(v) if f.name == "fusion_depth" else v
        return cls(**values)


def _exclusion_mask(exclude: Exclude, n: int) -> BoolArray | None:
    """A boolean mask of length ``n`` (``True`` = excluded), or ``None`` if nothing is."""
    if exclude is None:
        return None
    arr = np.asarray(exclude)
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise ValueError(f"exclusion mask must have shape ({n},), got {arr.shape}")
        return arr
    if arr.size == 0:
        return None
    idx = arr.astype(np.int64, copy=False).ravel()
    idx = idx[(idx >= 0) & (idx < n)]
    mask = np.zeros(n, dtype=np.bool_)
    mask[idx] = True
    return mask


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def top_k(scores: npt.NDArray[np.floating], k: int, *, exclude: Exclude = None) -> IntArray:
    """The ``k`` best items of a dense score vector, best first.

    Uses ``argpartition`` (linear time) and sorts only the selected items. Excluded items
    and items with a NaN or ``-inf`` score are never returned; ties are broken by the
    lower item index, so the result is deterministic. ``scores`` is not modified.
    """
    k = _check_k(k)
    mask = _exclusion_mask(exclude, scores.shape[0])
    if mask is not None:
        scores = scores.copy()
        scores[mask] = -np.inf
    return _top_k(scores, k)


def _prefilter(scores: npt.NDArray[np.floating], k: int) -> npt.NDArray[np.intp] | None:
    """Indices (ascending) of a superset of the top ``k`` found from a strided sample's
    quantile, or ``None`` when the array is small or the sample is not conclusive.

    Selecting from the few thousand survivors instead of all ``n`` scores makes the top-k
    of a large catalog several times cheaper than one ``argpartition`` over everything;
    the result is still exact, because every item scoring at least the k-th best score
    passes the filter.
    """
    n = scores.shape[0]
    if n < 50_000 or k * 64 > n:
        return None
    step = max(1, n // 4096)
    sample = scores[::step]
    m = sample.shape[0]
    need = min(m, 2 * ((k * m) // n + 1) + 16)
    threshold = np.partition(sample, m - need)[m - need]
    if not np.isfinite(threshold):
        return None
    cand = np.flatnonzero(scores >= threshold)
    return cand if cand.size >= k else None


def _top_k(scores: npt.NDArray[np.floating], k: int) -> IntArray:
    n = scores.shape[0]
    if k >= n:
        order = np.lexsort((np.arange(n), -scores.astype(np.float64)))
        ranked = scores[order]
        keep: IntArray = order[np.isfinite(ranked) | (ranked == np.inf)].astype(np.int32)
        return keep
    cand = _prefilter(scores, k)
    sub = scores if cand is None else scores[cand]
    m = sub.shape[0]
    part = np.argpartition(sub, m - k)[m - k :]
    kth = sub[part].min()
    if not np.isfinite(kth) and kth != np.inf:
        # fewer than k valid items (or NaN): the exact path over the valid items
        valid = np.flatnonzero(scores > -np.inf)
        if valid.size == 0:
            return _EMPTY.copy()
        vals = scores[valid]
        order = np.lexsort((valid, -vals.astype(np.float64)))
        return valid[order[:k]].astype(np.int32)
    chosen = np.flatnonzero(sub >= kth)
    if chosen.size != k:
        # ties at the boundary: keep every item above kth, then the lowest-index ties
        above = np.flatnonzero(sub > kth)
        ties = np.flatnonzero(sub == kth)[: k - above.size]
        chosen = np.concatenate((above, ties))
    idx = chosen if cand is None else cand[chosen]
    picked = scores[idx]
    order = np.lexsort((idx, -picked.astype(np.float64)))
    return idx[order].astype(np.int32)


def popularity_ranking(
    popularity: npt.NDArray[np.floating], k: int, *, exclude: Exclude = None
) -> IntArray:
    """The ``none`` level: the ``k`` globally most popular items not excluded."""
    return top_k(popularity, k, exclude=exclude)


def segment_ranking(
    top_items: IntArray,
    k: int,
    *,
    n_items: int,
    exclude: Exclude = None,
    fallback: IntArray | None = None,
) -> IntArray:
    """The ``segment`` level: the segment's top items in order, minus excluded ones,
    completed from ``fallback`` (usually the global popularity order) if too short."""
    k = _check_k(k)
    excl = _excluded_items(exclude, n_items)
    items = np.asarray(top_items, dtype=np.int32)
    if excl.size:
        items = items[~np.isin(items, excl)]
    return _fill_from(items[:k], fallback, k, excl)


def decay_weights(n: int, half_life: float) -> FloatArray:
    """Exponential position weights, newest first: ``w[p] = 0.5 ** (p / half_life)``.

    ``half_life = inf`` gives a flat window (every position weighs 1).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if not half_life > 0:
        raise ValueError(f"half_life must be > 0, got {half_life!r}")
    if np.isinf(half_life):
        return np.ones(n, dtype=np.float32)
    return np.exp2(-np.arange(n, dtype=np.float64) / half_life).astype(np.float32)


def session_weights(
    times: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    now: float,
    *,
    gap: float,
    boost: float,
) -> FloatArray:
    """Multiplicative weights ``1 + boost`` for the window positions in the current
    session (the run of interactions, newest first, each within ``gap`` of the next
    one, the first within ``gap`` of ``now``), 1 elsewhere."""
    t = np.asarray(times, dtype=np.float64)
    out = np.ones(t.size, dtype=np.float32)
    if t.size == 0 or boost == 0.0:
        return out
    prev = np.concatenate(([float(now)], t[:-1]))
    breaks = np.flatnonzero((prev - t) > gap)
    end = int(breaks[0]) if breaks.size else t.size
    out[:end] = 1.0 + boost
    return out


def neighbour_scores(
    indptr: npt.NDArray[np.integer],
    indices: npt.NDArray[np.integer],
    weights: npt.NDArray[Any],
    window: npt.NDArray[np.integer],
    *,
    n_items: int,
    half_life: float = 5.0,
    position_weights: npt.NDArray[np.floating] | None = None,
    max_window: int | None = None,
    weight_table: FloatArray | None = None,
) -> FloatArray:
    """Recency-decayed item-item scores of a user's window (newest first).

    ``score[j] = sum_p w[p] * sim(window[p], j)`` over the window positions ``p``, with
    ``w = decay_weights(len(window), half_life)`` (times ``position_weights`` if given)
    and ``sim`` the catalog's sparse neighbour graph in CSR form. Items outside the
    catalog (negative or ``>= n_items``) are ignored. Returns ``float32[n_items]``.
    With a ``weight_table``, ``weights`` are one-byte codes into it (bundle format 2).
    """
    win = np.asarray(window, dtype=np.int64).ravel()
    if max_window is not None:
        win = win[:max_window]
    w = decay_weights(win.size, half_life)
    if position_weights is not None:
        pw = np.asarray(position_weights, dtype=np.float32).ravel()[: win.size]
        if pw.size != win.size:
            raise ValueError("position_weights must have one weight per window position")
        w = w * pw
    ok = (win >= 0) & (win < n_items)
    if not ok.all():
        win, w = win[ok], w[ok]
    if win.size == 0:
        return np.zeros(n_items, dtype=np.float32)
    starts = indptr[win]
    lens = indptr[win + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(n_items, dtype=np.float32)
    # positions of every neighbour entry of every window item, without a Python loop
    run_start = np.cumsum(lens) - lens
    offs = np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)
    picked = weights[offs] if weight_table is None else weight_table[weights[offs]]
    contrib = picked * np.repeat(w, lens)
    out = np.bincount(indices[offs], weights=contrib, minlength=n_items)
    return out.astype(np.float32)


def rank_sparse(
    scores: npt.NDArray[np.floating] | SparseScores,
    k: int,
    *,
    exclude: Exclude = None,
    fallback: IntArray | None = None,
) -> IntArray:
    """Rank the items with a positive score, then complete from ``fallback``.

    Used for neighbour scores, where most items score exactly zero: those are ordered by
    ``fallback`` (usually global popularity) rather than by index. ``scores`` may be a
    :class:`SparseScores` (the same ranking, without arrays as long as the catalog).
    """
    k = _check_k(k)
    if isinstance(scores, SparseScores):
        n = scores.n
        keep = scores.values > 0
        cand, values = scores.items[keep], scores.values[keep]
    else:
        n = scores.shape[0]
        cand = np.flatnonzero(scores > 0)
        values = scores[cand]
    excl = _excluded_items(exclude, n)
    if excl.size and cand.size:
        keep = ~np.isin(cand, excl)
        cand, values = cand[keep], values[keep]
    if cand.size:
        sub = values
        if cand.size > k:
            part = np.argpartition(sub, cand.size - k)[cand.size - k :]
            kth = sub[part].min()
            sel = np.flatnonzero(sub >= kth)
            if sel.size != k:
                above = np.flatnonzero(sub > kth)
                ties = np.flatnonzero(sub == kth)[: k - above.size]
                sel = np.concatenate((above, ties))
            cand, sub = cand[sel], sub[sel]
        order = np.lexsort((cand, -sub.astype(np.float64)))
        head = cand[order].astype(np.int32)
    else:
        head = _EMPTY
    return _fill_from(head, fallback, k, excl)


def _excluded_items(exclude: Exclude, n: int) -> npt.NDArray[np.int64]:
    """The excluded item indices in ``[0, n)``, sorted (a mask becomes its indices)."""
    if exclude is None:
        return np.empty(0, dtype=np.int64)
    arr = np.asarray(exclude)
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise ValueError(f"exclusion mask must have shape ({n},), got {arr.shape}")
        return np.flatnonzero(arr).astype(np.int64)
    idx = arr.astype(np.int64, copy=False).ravel()
    return np.unique(idx[(idx >= 0) & (idx < n)])


def _fill_from(
    head: IntArray, fallback: IntArray | None, k: int, excluded: npt.NDArray[np.int64]
) -> IntArray:
    """Complete ``head`` to ``k`` items from ``fallback``, skipping the excluded and the
    chosen, with arrays as long as the few items involved (not the catalog)."""
    if head.size >= k or fallback is None or fallback.size == 0:
        return head[:k].astype(np.int32, copy=False)
    need = k - head.size
    skip = np.union1d(head.astype(np.int64), excluded)
    start, step, extra = 0, max(need * 2, 64), []
    while need > 0 and start < fallback.size:
        chunk = fallback[start : start + step]
        chunk = chunk[~np.isin(chunk, skip)][:need]  # a fallback lists each item once
        if chunk.size:
            extra.append(chunk)
            need -= chunk.size
        start += step
        step *= 2
    if not extra:
        return head.astype(np.int32, copy=False)
    return np.concatenate([head, *extra]).astype(np.int32)


def aggregates(
    item_factors: FloatArray,
    items: npt.NDArray[np.integer],
    *,
    alpha: float,
    values: npt.NDArray[np.floating] | None = None,
    weights: npt.NDArray[np.floating] | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The fold-in sufficient statistics of a set of interactions, in factor space.

    Returns ``(b, A)`` with ``b = sum_i w_i c_i y_i`` (``float64[f]``) and
    ``A = sum_i w_i (c_i - 1) y_i y_i^T`` (``float64[f, f]``), where the confidence is
    ``c_i = 1 + alpha * r_i`` (``r_i`` = ``values``, default 1) and ``w_i`` = ``weights``
    (a recency decay such as :func:`decay_weights`, default 1) scales the item's whole
    contribution, exactly as :func:`update_aggregates` decays old interactions. Repeated
    items are merged into one interaction (values summed, weights taken at the newest,
    i.e. the largest). Together with the catalog's Gram matrix these are all
    :func:`fold_in_aggregates` needs: no item ID is kept.
    """
    idx = np.asarray(items, dtype=np.int64).ravel()
    r = np.ones(idx.size) if values is None else np.asarray(values, dtype=np.float64).ravel()
    f = item_factors.shape[1]
    if idx.size == 0:
        return np.zeros(f), np.zeros((f, f))
    uniq, inv = np.unique(idx, return_inverse=True)
    if uniq.size == idx.size:
        order = np.argsort(inv)  # unique items: just sort the inputs
        r_sum = r[order]
        w = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()[order]
    else:
        r_sum = np.bincount(inv, weights=r, minlength=uniq.size).astype(np.float64)
        w = None
        if weights is not None:
            w = np.zeros(uniq.size)
            np.maximum.at(w, inv, np.asarray(weights, dtype=np.float64).ravel())
    yu = item_factors[uniq].astype(np.float64)
    c = 1.0 + alpha * r_sum
    if w is None:
        b = yu.T @ c
        a = (yu * (c - 1.0)[:, None]).T @ yu
    else:
        b = yu.T @ (w * c)
        a = (yu * (w * (c - 1.0))[:, None]).T @ yu
    return b, a


def update_aggregates(
    b: npt.NDArray[np.float64],
    a: npt.NDArray[np.float64],
    item_vector: npt.NDArray[np.floating],
    *,
    alpha: float,
    value: float = 1.0,
    decay: float = 1.0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Add one interaction to the aggregates, after multiplying the old ones by
    ``decay`` (``0 < decay <= 1``; e.g. ``0.5 ** (elapsed / half_life)``).

    Returns new arrays. Note: unlike :func:`aggregates`, a repeated item is added as a
    separate interaction (the aggregates cannot know it was seen before).
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay!r}")
    y = np.asarray(item_vector, dtype=np.float64).ravel()
    c = 1.0 + alpha * value
    return b * decay + c * y, a * decay + (c - 1.0) * np.outer(y, y)


def fold_in_aggregates(
    gram: npt.NDArray[np.floating],
    b: npt.NDArray[np.float64],
    a: npt.NDArray[np.float64],
    *,
    regularization: float,
) -> FloatArray:
    """Solve ``(YtY + A + lambda I) x = b`` for the user vector ``x`` (``float32[f]``)."""
    f = gram.shape[0]
    m = gram.astype(np.float64) + a
    m[np.diag_indices(f)] += regularization
    try:
        x = np.linalg.solve(m, b)
    except np.linalg.LinAlgError:
        x = np.linalg.lstsq(m, b, rcond=None)[0]
    return x.astype(np.float32)


def fold_in(
    item_factors: FloatArray,
    gram: npt.NDArray[np.floating],
    items: npt.NDArray[np.integer],
    *,
    regularization: float,
    alpha: float,
    values: npt.NDArray[np.floating] | None = None,
    weights: npt.NDArray[np.floating] | None = None,
) -> FloatArray:
    """The implicit-ALS user vector of a set of interactions: the full weighted solve

    ``(YtY + Y_u^T (C_u - I) Y_u + lambda I) x = Y_u^T C_u p_u``

    with ``C_u = 1 + alpha * r`` on the user's items and ``p_u = 1`` there (Hu, Koren and
    Volinsky, 2008). Optional ``weights`` (e.g. :func:`decay_weights` over a newest-first
    window) scale each item's contribution, as in :func:`aggregates`. Without weights
    this is exactly the user step of ``ondevice.operator.build.train_als``, so a device
    user's vector is what the operator's training would have given that user. Items
    outside the catalog are ignored. An empty set gives zeros.
    """
    idx = np.asarray(items, dtype=np.int64).ravel()
    ok = (idx >= 0) & (idx < item_factors.shape[0])
    vals = None if values is None else np.asarray(values).ravel()[ok]
    wts = None if weights is None else np.asarray(weights).ravel()[ok]
    idx = idx[ok]
    if idx.size == 0:
        return np.zeros(item_factors.shape[1], dtype=np.float32)
    b, a = aggregates(item_factors, idx, alpha=alpha, values=vals, weights=wts)
    return fold_in_aggregates(gram, b, a, regularization=regularization)


def factor_scores(item_factors: FloatArray, user_vector: FloatArray) -> FloatArray:
    """``Y @ x``: the score of every item for a user vector (``float32[n]``)."""
    return item_factors @ np.asarray(user_vector, dtype=item_factors.dtype)


def rank_fusion(
    rankings: Sequence[npt.NDArray[np.integer]],
    k: int,
    *,
    weights: Sequence[float] | None = None,
    c: float = 60.0,
) -> IntArray:
    """Weighted reciprocal rank fusion (Cormack et al., 2009) of several rankings.

    ``score(i) = sum_l weights[l] / (c + rank_l(i))`` with ranks from 1; an item absent
    from a list gets nothing from it. Returns the ``k`` best, ties by lower index.
    """
    k = _check_k(k)
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError("one weight per ranking")
    items_parts, score_parts = [], []
    for ranking, wt in zip(rankings, weights, strict=True):
        r = np.asarray(ranking, dtype=np.int64).ravel()
        if r.size == 0 or wt == 0:
            continue
        items_parts.append(r)
        score_parts.append(wt / (c + np.arange(1, r.size + 1, dtype=np.float64)))
    if not items_parts:
        return _EMPTY.copy()
    items = np.concatenate(items_parts)
    contrib = np.concatenate(score_parts)
    uniq, inv = np.unique(items, return_inverse=True)
    fused = np.bincount(inv, weights=contrib, minlength=uniq.size)
    order = np.lexsort((uniq, -fused))[:k]
    return uniq[order].astype(np.int32)


def category_index(
    categories: Sequence[Sequence[str]] | None, n_items: int
) -> tuple[tuple[str, ...], Int64Array, IntArray]:
    """CSR form of per-item categories: ``(names, indptr, indices)``. Built once per
    catalog; ``None`` gives no categories at all."""
    if categories is None:
        return (), np.zeros(n_items + 1, dtype=np.int64), _EMPTY.copy()
    names = tuple(sorted({c for cats in categories for c in cats}))
    pos = {name: i for i, name in enumerate(names)}
    lens = np.fromiter((len(set(c)) for c in categories), dtype=np.int64, count=n_items)
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    flat = [pos[c] for cats in categories for c in sorted(set(cats))]
    return names, indptr, np.asarray(flat, dtype=np.int32)


def context_affinity(
    cat_indptr: Int64Array,
    cat_indices: IntArray,
    n_categories: int,
    items: npt.NDArray[np.integer],
    context_values: Sequence[str],
    *,
    smoothing: float = 5.0,
) -> dict[str, FloatArray]:
    """Per context value, the user's distribution over item categories, learned from
    the user's own history only.

    ``items[j]`` was consumed in context ``context_values[j]``. Each value's category
    counts are shrunk toward the user's overall distribution with ``smoothing``
    pseudo-interactions, then normalised to sum to 1. The key ``""`` holds the overall
    distribution (used for context values never seen before).
    """
    idx = np.asarray(items, dtype=np.int64).ravel()
    if idx.size != len(context_values):
        raise ValueError("one context value per item")
    out: dict[str, FloatArray] = {}
    if n_categories == 0:
        return out

    def counts(sel: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        starts = cat_indptr[sel]
        lens = cat_indptr[sel + 1] - starts
        total = int(lens.sum())
        if total == 0:
            return np.zeros(n_categories)
        run_start = np.cumsum(lens) - lens
        offs = np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)
        per = np.repeat(1.0 / np.maximum(lens, 1), lens)
        got: npt.NDArray[np.float64] = np.bincount(
            cat_indices[offs], weights=per, minlength=n_categories
        ).astype(np.float64)
        return got

    overall = counts(idx)
    base = (
        overall / overall.sum() if overall.sum() > 0 else np.full(n_categories, 1.0 / n_categories)
    )
    out[""] = base.astype(np.float32)
    ctx = np.asarray(context_values, dtype=object)
    for value in sorted(set(context_values)):
        if value == "":
            continue
        cnt = counts(idx[ctx == value])
        dist = (cnt + smoothing * base) / (cnt.sum() + smoothing)
        out[value] = dist.astype(np.float32)
    return out


def category_boost(
    cat_indptr: Int64Array,
    cat_indices: IntArray,
    affinity: Mapping[str, FloatArray] | FloatArray,
    items: npt.NDArray[np.integer],
    *,
    context: str = "",
) -> FloatArray:
    """The mean affinity of each of ``items``' categories in the given context, scaled
    so that a uniform affinity gives 1 (items without categories get 1)."""
    aff = affinity.get(context, affinity.get("")) if isinstance(affinity, Mapping) else affinity
    idx = np.asarray(items, dtype=np.int64).ravel()
    if aff is None or aff.size == 0 or idx.size == 0:
        return np.ones(idx.size, dtype=np.float32)
    scaled = aff.astype(np.float64) * aff.size
    starts = cat_indptr[idx]
    lens = cat_indptr[idx + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.ones(idx.size, dtype=np.float32)
    run_start = np.cumsum(lens) - lens
    offs = np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)
    row = np.repeat(np.arange(idx.size), lens)
    sums = np.bincount(row, weights=scaled[cat_indices[offs]], minlength=idx.size)
    out = np.where(lens > 0, sums / np.maximum(lens, 1), 1.0)
    return out.astype(np.float32)


def contextual_scores(
    indptr: Int64Array,
    indices: IntArray,
    weights: FloatArray,
    window: npt.NDArray[np.integer],
    times: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    *,
    n_items: int,
    now: float,
    half_life: float = 5.0,
    session_gap: float = 3600.0,
    session_boost: float = 0.0,
    cat_indptr: Int64Array | None = None,
    cat_indices: IntArray | None = None,
    affinity: Mapping[str, FloatArray] | None = None,
    context: str = "",
    strength: float = 0.0,
) -> FloatArray:
    """The ``contextual`` level's scores: decayed neighbours of the window (newest
    first, with ``times`` per position) where the current session's positions weigh
    ``1 + session_boost``, then each candidate multiplied by its category affinity in
    the current declared ``context`` raised to ``strength`` (0 turns it off).

    The affinity comes from :func:`context_affinity` over the user's own history.
    """
    pw = session_weights(times, now, gap=session_gap, boost=session_boost)
    scores = neighbour_scores(
        indptr, indices, weights, window, n_items=n_items, half_life=half_life, position_weights=pw
    )
    if strength != 0.0 and affinity and cat_indptr is not None and cat_indices is not None:
        cand = np.flatnonzero(scores > 0)
        if cand.size:
            boost = category_boost(cat_indptr, cat_indices, affinity, cand, context=context)
            scores[cand] *= np.power(np.maximum(boost, 1e-6), strength, dtype=np.float32)
    return scores


def individual_ranking(
    item_factors: FloatArray,
    user_vector: FloatArray,
    neighbour: npt.NDArray[np.floating] | SparseScores | None,
    k: int,
    *,
    exclude: Exclude = None,
    depth: int = 100,
    neighbour_weight: float = 1.0,
    c: float = 60.0,
    scores: FloatArray | None = None,
    candidates: ItemRuns | npt.NDArray[np.int64] | None = None,
) -> IntArray:
    """The ``individual`` level: ``Y @ x`` ranked by :func:`top_k` (to ``depth``),
    fused by :func:`rank_fusion` with the ranking of the decayed ``neighbour`` scores
    (weight ``neighbour_weight``; ``None`` or weight 0 gives the fold-in alone).
    ``scores``, if given, is ``Y @ x`` computed by the caller (a fresh array this
    function may overwrite), e.g. from int8 factors. With ``candidates`` (the items of
    the clusters an approximate index probed, as :class:`~ondevice.ann.ItemRuns` or
    increasing item indices), ``scores`` holds their scores only, in that order, and the
    fold-in ranking is taken among them."""
    k = _check_k(k)
    n = item_factors.shape[0]
    if scores is None:
        if candidates is not None:
            raise ValueError("candidates need their scores")
        scores = factor_scores(item_factors, user_vector)  # a fresh array: safe to edit
    excl = None if exclude is None else np.asarray(exclude)
    if excl is not None and excl.dtype != np.bool_:
        idx = excl.astype(np.int64, copy=False).ravel()
        excl = idx[(idx >= 0) & (idx < n)]
    runs = None
    if candidates is not None:
        runs = candidates if isinstance(candidates, ItemRuns) else ItemRuns.of_items(candidates)
        if scores.shape[0] != runs.size:
            raise ValueError("scores must hold one score per candidate")
    if excl is not None and excl.size:
        if runs is None:
            scores[excl] = -np.inf  # index or mask assignment, no copy of the scores
        else:
            items = np.flatnonzero(excl) if excl.dtype == np.bool_ else excl
            scores[runs.positions_of(items)] = -np.inf

    def fold_in_top(m: int) -> IntArray:
        if runs is None:
            return _top_k(scores, m)
        ranked: IntArray = runs.items_at(_top_k(scores, m)).astype(np.int32)
        return ranked

    if neighbour is None or neighbour_weight == 0.0:
        return fold_in_top(k)
    d = max(depth, k)
    first = fold_in_top(d)
    second = rank_sparse(neighbour, d, exclude=excl)
    return rank_fusion([first, second], k, weights=[1.0, neighbour_weight], c=c)
