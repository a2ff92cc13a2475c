"""Glue between the profile store and the levels: what each level may read, and the
derived state kept for the segment and individual levels. Internal."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from . import _aggblob, _db
from .levels.base import EVENT_WEIGHTS, CatalogRuntime, UserState
from .policy import Interaction, PrivacyLevel, SignalValue
from .store import Store

__all__ = [
    "AGGREGATES",
    "USER_VECTOR",
    "add_to_aggregates",
    "cached_vector",
    "encode_vector",
    "load_state",
    "window_digest",
]

AGGREGATES: Final = "taste_aggregates"
USER_VECTOR: Final = "user_vector"
_VEC_MAGIC: Final = b"ODUV1"
DAY: Final = 86400.0


def _strength(event: str) -> float:
    return EVENT_WEIGHTS.get(event, 1.0)


def load_state(
    conn: _db.Connection,
    user_id: str,
    level: PrivacyLevel,
    rt: CatalogRuntime,
    *,
    exclude_seen: bool,
    now: float,
    retention_days: float,
) -> tuple[UserState, list[Interaction]]:
    """Read what ``level`` may read about ``user_id``; also return the raw window."""
    state = UserState(user_id=user_id)
    window: list[Interaction] = []
    if level is PrivacyLevel.NONE:
        return state, window
    state.signals = {n: v for n, v, _ in Store.signals(conn, user_id)}
    derived = {n: blob for n, blob, _ in Store.derived(conn, user_id)}
    if level is PrivacyLevel.SEGMENT:
        cutoff_day = int((now - retention_days * DAY) // DAY)
        state.aggregates = _decode_aggregates(derived.get(AGGREGATES), rt, cutoff_day)
        return state, window
    # Context is read only where a level that may answer uses it.
    with_context = level is PrivacyLevel.CONTEXTUAL or (
        level is PrivacyLevel.INDIVIDUAL and not rt.has_factors
    )
    window = Store.interactions(conn, user_id, with_context=with_context)
    excluded: set[int] = set()
    items: list[int] = []
    times: list[float] = []
    strengths: list[float] = []
    events: list[str] = []
    contexts: list[Mapping[str, SignalValue]] = []
    unknown = 0
    for it in reversed(window):  # newest first
        idx = rt.index.get(it.item_id)
        if idx is None:
            unknown += 1
            continue
        strength = _strength(it.event)
        if exclude_seen or strength == 0.0:
            excluded.add(idx)
        if strength == 0.0:
            continue  # negative feedback is never evidence
        items.append(idx)
        times.append(float(it.timestamp or 0.0))
        strengths.append(strength)
        events.append(it.event)
        contexts.append(it.context)
    for item_id, _ in Store.blocks(conn, user_id):
        idx = rt.index.get(item_id)
        if idx is not None:
            excluded.add(idx)
    state.window = np.asarray(items, dtype=np.int64)
    state.times = np.asarray(times, dtype=np.float64)
    state.strengths = np.asarray(strengths, dtype=np.float32)
    state.events = events
    state.contexts = contexts
    state.unknown_items = unknown
    state.excluded = np.fromiter(sorted(excluded), dtype=np.int64, count=len(excluded))
    if level is PrivacyLevel.INDIVIDUAL:
        state.user_vector = cached_vector(
            derived.get(USER_VECTOR), window_digest(rt, window), _factors(rt)
        )
    return state, window


# -- the individual level's cached user vector --------------------------------------------


def window_digest(rt: CatalogRuntime, window: Sequence[Interaction]) -> bytes:
    """Identifies the inputs of a fold-in: the catalog and the window's contents."""
    h = hashlib.sha256(rt.fingerprint.encode("ascii"))
    for it in window:
        h.update(f"\0{it.item_id}\0{it.event}\0{it.timestamp!r}\0{it.value!r}".encode())
    return h.digest()


def encode_vector(vector: npt.NDArray[np.float32], digest: bytes) -> bytes:
    """Blob of a cached user vector, tagged with what it was computed from."""
    return _VEC_MAGIC + digest + np.asarray(vector, dtype="<f4").tobytes()


def cached_vector(
    blob: bytes | None, digest: bytes, dim: int
) -> npt.NDArray[np.float32] | None:
    """The cached vector if it was computed from exactly these inputs and fits the
    catalog (``dim`` factors, every value finite), else None: the caller folds it in
    again, so a stored vector (an import, a damaged row) can never break a
    recommendation."""
    head = len(_VEC_MAGIC) + 32
    if blob is None or len(blob) <= head or not blob.startswith(_VEC_MAGIC):
        return None
    if blob[len(_VEC_MAGIC) : head] != digest or len(blob) - head != 4 * dim:
        return None
    vector = np.frombuffer(blob[head:], dtype="<f4").astype(np.float32)
    return vector if bool(np.isfinite(vector).all()) else None


# -- the segment level's factor-space sums (no item ids) ----------------------------------


def _decode_aggregates(
    blob: bytes | None, rt: CatalogRuntime, cutoff_day: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    """``(b, A)`` for :func:`ondevice.scoring.fold_in_aggregates`: the sums of every
    bucket still within retention (``b = S + D``)."""
    buckets = _buckets(blob, rt, cutoff_day)
    if not buckets:
        return None
    f = _factors(rt)
    s = sum((parts[0] for parts in buckets.values()), np.zeros(f))
    d = sum((parts[1] for parts in buckets.values()), np.zeros(f))
    a = sum((parts[2] for parts in buckets.values()), np.zeros((f, f)))
    return s + d, a


_Parts = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]


def _buckets(blob: bytes | None, rt: CatalogRuntime, cutoff_day: int) -> dict[int, _Parts]:
    f = _factors(rt)
    parsed = _aggblob.unpack(blob) if blob is not None and f else None
    if parsed is None:
        return {}
    digest, _, stored_f, _, raw = parsed
    if digest != _catalog_digest(rt) or stored_f != f:
        return {}  # computed against another catalog's factors: meaningless here
    out: dict[int, _Parts] = {}
    for day, data in raw:
        if day < cutoff_day:
            continue  # past retention: never used, dropped at the next write
        body = np.frombuffer(data, dtype="<f4").astype(np.float64)
        out[day] = (body[:f].copy(), body[f : 2 * f].copy(), body[2 * f :].reshape(f, f).copy())
    return out


def _catalog_digest(rt: CatalogRuntime) -> bytes:
    return hashlib.sha256(rt.fingerprint.encode("ascii")).digest()


def _factors(rt: CatalogRuntime) -> int:
    y = rt.catalog.item_factors
    return 0 if y is None or not rt.has_factors else int(y.shape[1])


def add_to_aggregates(
    conn: _db.Connection,
    user_id: str,
    rt: CatalogRuntime,
    interactions: Sequence[Interaction],
    now: float,
    *,
    retention_days: float,
) -> None:
    """Fold new interactions into the user's factor-space sums: the only taste state the
    segment level keeps (no item ids).

    With confidence ``c_i = 1 + alpha * r_i * w_i`` and recency weights ``w_i`` halving
    every ``segment_half_life`` interactions (as :func:`ondevice.scoring.aggregates`
    weighs a window, newest first: the weight scales the whole contribution), the
    fold-in needs ``b = sum w_i c_i y_i`` and ``A = sum w_i (c_i - 1) y_i y_i^T``. They
    are kept as three sums per bucket of days (:mod:`ondevice._aggblob`): ``S = sum w_i
    y_i``, ``D = sum alpha r_i w_i y_i`` and ``A``, all decayed by one step per new
    interaction; ``b = S + D``.
    Buckets that start before the retention period are dropped, so the sums forget what
    retention deletes. The one difference from the window form: an item seen twice
    counts twice, since no item ids are kept to notice it.
    """
    f = _factors(rt)
    cat = rt.catalog
    if f == 0 or cat.item_factors is None or cat.als is None:
        return
    known = [(it, rt.index[it.item_id]) for it in interactions if it.item_id in rt.index]
    if not known:
        return
    cutoff_day = int((now - retention_days * DAY) // DAY)
    span = _aggblob.span_days(retention_days)
    row = {n: blob for n, blob, _ in Store.derived(conn, user_id)}.get(AGGREGATES)
    buckets = _buckets(row, rt, cutoff_day)
    half_life = rt.params.segment_half_life
    step = 1.0 if np.isinf(half_life) else 0.5 ** (1.0 / half_life)
    alpha = cat.als.alpha
    last = now
    for it, idx in sorted(known, key=lambda pair: pair[0].timestamp or 0.0):
        strength = _strength(it.event)
        ts = float(it.timestamp or now)
        day = _aggblob.bucket_day(int(ts // DAY), span)
        if strength == 0.0 or day < cutoff_day:
            continue
        y = cat.factor_rows(np.array([idx]))[0].astype(np.float64)
        for key, (s, d, a) in list(buckets.items()):
            buckets[key] = (s * step, d * step, a * step)
        s, d, a = buckets.get(day, (np.zeros(f), np.zeros(f), np.zeros((f, f))))
        buckets[day] = (s + y, d + alpha * strength * y, a + alpha * strength * np.outer(y, y))
        last = max(last, ts)
    raw = [
        (day, np.concatenate((s, d, a.ravel())).astype("<f4").tobytes())
        for day, (s, d, a) in sorted(buckets.items())
    ]
    if raw:
        blob = _aggblob.pack(_catalog_digest(rt), last, f, span, raw)
        Store.set_derived(conn, user_id, AGGREGATES, blob, now)


def aggregates_from_window(
    conn: _db.Connection, user_id: str, rt: CatalogRuntime, now: float, *, retention_days: float
) -> None:
    """Before the window is purged (level lowered to ``segment``), keep its taste as
    factor-space sums so the segment level still knows the user's tastes."""
    window = Store.interactions(conn, user_id, with_context=False)
    if window:
        add_to_aggregates(conn, user_id, rt, window, now, retention_days=retention_days)
