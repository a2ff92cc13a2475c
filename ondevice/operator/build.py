"""Build a :class:`~ondevice.catalog.Catalog` from a consenting panel's interaction log.

Operator-side only: the device runtime never imports this module. It is numpy, plus
``implicit`` (with ``scipy`` and ``threadpoolctl``) for the ALS model: the ``operator``
extra.

The pieces, each usable on its own (the evaluation harness reuses them):

- :func:`interaction_matrix`: the panel's user x item matrix in CSR form;
- :func:`item_popularity`: how many panel users interacted with each item;
- :func:`item_neighbours`: cosine similarity on co-occurrence, top-N per item (CSR);
- :func:`train_als`: implicit-feedback ALS (Hu, Koren and Volinsky, 2008) trained by
  the ``implicit`` library, confidence ``1 + alpha * r`` (:func:`confidence_matrix`
  maps it onto ``implicit``'s convention), ending with an exact user step so the user
  factors are the device's fold-ins;
- :func:`user_vectors`: the exact ALS user step for many users at once (the batch twin
  of :func:`ondevice.scoring.fold_in`);
- :func:`spherical_kmeans`: cosine k-means whose clusters all hold at least
  ``min_size`` users (smaller ones are merged into their nearest neighbour);
- :func:`segment_top_items`: a segment's top items, shrunk toward global popularity;
- :func:`rule_segments`: segments from the cross product of declared signals, each
  from at least ``min_segment_users`` panel users;
- :func:`build_catalog`: all of the above from a CSV file or an iterable of rows.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from ondevice.catalog import AlsParams, Catalog, Segment, SegmentRule
from ondevice.errors import InvalidInputError
from ondevice.scoring import ScoringParams

__all__ = [
    "ALS_CG_STEPS",
    "BuildSettings",
    "Csr",
    "Progress",
    "build_catalog",
    "confidence_matrix",
    "interaction_matrix",
    "item_neighbours",
    "item_popularity",
    "make_segments",
    "read_interactions",
    "rule_segments",
    "segment_top_items",
    "single_threaded_blas",
    "spherical_kmeans",
    "train_als",
    "user_vectors",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
"""A progress callback: ``progress(done, total, stage)``."""

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

Row = tuple[str, str, float] | tuple[str, str, float, float]

ALS_CG_STEPS = 6
"""Conjugate-gradient steps per row and half-step of the ALS training (0: an exact
Cholesky solve per row). Measured on MovieLens-100K (64 factors, the evaluation's three
(regularization, alpha) pairs, ``benchmarks/bench_eval_als.py``): after 8 iterations, 6
steps end within 0.03% of the exact solver's objective (3, ``implicit``'s default:
0.22%; 10: 0.002%), after 15 within 0.01%, in 40% of its CPU time. The last user step is
always exact (see :func:`train_als`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildSettings:
    """How a catalog is built. The defaults suit a panel of hundreds to thousands."""

    factors: int = 64
    regularization: float = 2.0
    alpha: float = 2.0
    iterations: int = 15
    als_cg_steps: int = ALS_CG_STEPS
    """Conjugate-gradient steps of the ALS training (0: exact solves)."""
    threads: int = 0
    """Threads of the ALS training (``implicit``'s OpenMP loop); 0: every core."""
    neighbours: int = 100
    segments: int = 10
    """Behaviour segments (spherical k-means clusters); 0 for none."""
    rule_signals: tuple[str, ...] = ()
    """Declared signals whose value combinations become rule segments (tried first)."""
    max_segments: int = 10
    min_segment_users: int = 50
    shrinkage: float = 50.0
    """Pseudo-users of global popularity mixed into each segment's item counts."""
    segment_top_n: int = 300
    seed: int = 0
    name: str = "catalog"
    scoring: ScoringParams = field(default_factory=ScoringParams)
    """Device-side knobs shipped in ``Catalog.extra`` (see ``ScoringParams``)."""

    def __post_init__(self) -> None:
        if self.factors <= 0 or self.iterations < 0 or self.neighbours <= 0:
            raise InvalidInputError("factors and neighbours must be > 0, iterations >= 0")
        if self.als_cg_steps < 0 or self.threads < 0:
            raise InvalidInputError("als_cg_steps and threads must be >= 0")
        if self.regularization < 0 or self.alpha < 0 or self.shrinkage < 0:
            raise InvalidInputError("regularization, alpha and shrinkage must be >= 0")
        if self.min_segment_users < 1 or self.segments < 0 or self.max_segments < 1:
            raise InvalidInputError("bad segment settings")


@dataclass(frozen=True, slots=True)
class Csr:
    """A sparse matrix in compressed-row form (rows sorted, column indices sorted)."""

    indptr: I64
    indices: I32
    data: F32
    shape: tuple[int, int]

    def row(self, r: int) -> I32:
        """Column indices of row ``r``."""
        return self.indices[self.indptr[r] : self.indptr[r + 1]]

    def row_lengths(self) -> I64:
        """How many entries each row holds."""
        return np.diff(self.indptr)

    def transpose(self) -> Csr:
        """The transpose, also in CSR form."""
        n_rows, n_cols = self.shape
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(self.indptr))
        return _coo_to_csr(self.indices.astype(np.int64), rows, self.data, (n_cols, n_rows))

    def select_rows(self, rows: npt.NDArray[np.integer]) -> Csr:
        """A new matrix keeping only ``rows`` (other rows become empty)."""
        keep = np.zeros(self.shape[0], dtype=np.bool_)
        keep[np.asarray(rows, dtype=np.int64)] = True
        lens = np.where(keep, np.diff(self.indptr), 0)
        indptr = np.zeros(self.shape[0] + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        mask = np.repeat(keep, np.diff(self.indptr))
        return Csr(indptr, self.indices[mask], self.data[mask], self.shape)


def _coo_to_csr(
    rows: I64, cols: I64, vals: npt.NDArray[np.floating], shape: tuple[int, int]
) -> Csr:
    order = np.lexsort((cols, rows))
    rows, cols, v = rows[order], cols[order], np.asarray(vals, dtype=np.float32)[order]
    if rows.size:
        # merge duplicates (same row and column) by summing their values
        new = np.ones(rows.size, dtype=np.bool_)
        new[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        group = np.cumsum(new) - 1
        v = np.bincount(group, weights=v).astype(np.float32)
        rows, cols = rows[new], cols[new]
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return Csr(indptr, cols.astype(np.int32), v, shape)


def interaction_matrix(
    users: npt.NDArray[np.integer],
    items: npt.NDArray[np.integer],
    n_users: int,
    n_items: int,
    values: npt.NDArray[np.floating] | None = None,
    *,
    binary: bool = True,
) -> Csr:
    """The user x item matrix; repeated pairs are summed, or set to 1 if ``binary``."""
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    v = np.ones(u.size, dtype=np.float32) if values is None else np.asarray(values)
    m = _coo_to_csr(u, i, v, (n_users, n_items))
    if binary:
        return Csr(m.indptr, m.indices, np.ones(m.indices.size, dtype=np.float32), m.shape)
    return m


def item_popularity(x: Csr) -> F32:
    """How many users interacted with each item (``float32[n_items]``)."""
    return np.bincount(x.indices, minlength=x.shape[1]).astype(np.float32)


def _gather(starts: I64, lens: I64) -> I64:
    """Concatenated ``arange(start, start + len)`` for every pair, without a loop."""
    total = int(lens.sum())
    run_start = np.cumsum(lens) - lens
    return np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)


def item_neighbours(
    x: Csr,
    *,
    top_n: int = 100,
    progress: Progress | None = None,
    block_cells: int = 20_000_000,
) -> tuple[I64, I32, F32]:
    """Cosine similarity on binary co-occurrence, the ``top_n`` best per item.

    ``sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|)`` over the users ``U`` of each item.
    Returns CSR arrays ``(indptr int64[n+1], indices int32, weights float32)`` with each
    row sorted by weight descending (ties by lower index), no self-loops and no zero
    weights. Works in blocks of items so memory stays near ``block_cells`` floats.
    """
    n_items = x.shape[1]
    xt = x.transpose()  # item -> users
    counts = np.diff(xt.indptr).astype(np.float64)
    norm = np.sqrt(np.maximum(counts, 1.0))
    block = max(1, min(n_items, block_cells // max(n_items, 1)))
    out_idx: list[I32] = []
    out_w: list[F32] = []
    lens = np.zeros(n_items, dtype=np.int64)
    u_lens = np.diff(x.indptr)
    dense = x.shape[0] * n_items <= block_cells
    xd: F32 | None = None
    if dense:
        xd = np.zeros(x.shape, dtype=np.float32)
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        xd[rows, x.indices] = 1.0
    for lo in range(0, n_items, block):
        hi = min(n_items, lo + block)
        if xd is not None:
            co = (xd[:, lo:hi].T @ xd).astype(np.float64)
        else:
            # every (item a in block, user u of a, item b of u) triple, as flat arrays
            a_starts, a_lens = xt.indptr[lo:hi], np.diff(xt.indptr[lo : hi + 1])
            a_offs = _gather(a_starts, a_lens)
            a_item = np.repeat(np.arange(lo, hi, dtype=np.int64), a_lens)
            a_user = xt.indices[a_offs].astype(np.int64)
            b_offs = _gather(x.indptr[a_user], u_lens[a_user])
            b_item = x.indices[b_offs].astype(np.int64)
            a_rep = np.repeat(a_item - lo, u_lens[a_user])
            cnt = np.bincount(a_rep * n_items + b_item, minlength=(hi - lo) * n_items)
            co = cnt.reshape(hi - lo, n_items).astype(np.float64)
        sim = co / norm[lo:hi, None] / norm[None, :]
        sim[np.arange(hi - lo), np.arange(lo, hi)] = 0.0
        keep = min(top_n, n_items)
        if keep < n_items:
            part = np.argpartition(-sim, keep - 1, axis=1)[:, :keep]
        else:
            part = np.broadcast_to(np.arange(n_items), sim.shape).copy()
        vals = np.take_along_axis(sim, part, axis=1)
        row_id = np.repeat(np.arange(hi - lo), part.shape[1])
        flat_i, flat_v = part.ravel(), vals.ravel()
        order = np.lexsort((flat_i, -flat_v, row_id))
        flat_i, flat_v, row_id = flat_i[order], flat_v[order], row_id[order]
        pos = flat_v > 0
        flat_i, flat_v, row_id = flat_i[pos], flat_v[pos], row_id[pos]
        out_idx.append(flat_i.astype(np.int32))
        out_w.append(flat_v.astype(np.float32))
        lens[lo:hi] = np.bincount(row_id, minlength=hi - lo)
        if progress is not None:
            progress(hi, n_items, "neighbours")
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    indices = np.concatenate(out_idx) if out_idx else np.empty(0, dtype=np.int32)
    weights = np.concatenate(out_w) if out_w else np.empty(0, dtype=np.float32)
    return indptr, indices.astype(np.int32), weights.astype(np.float32)


def confidence_matrix(x: Csr, alpha: float) -> Any:
    """``x`` as the ``scipy.sparse.csr_matrix`` of confidences ``implicit`` trains on.

    ``implicit`` reads a stored value ``v`` as the confidence ``c = alpha_implicit * v``
    of a positive pair (an absent pair has confidence 1 and preference 0). With
    ``alpha_implicit = 1`` and ``v = 1 + alpha * r`` this is exactly this project's
    ``c = 1 + alpha * r`` (Hu, Koren and Volinsky, 2008), so the bundle's ``alpha`` keeps
    its meaning and the device's :func:`ondevice.scoring.fold_in` solves the same system.
    """
    import scipy.sparse  # type: ignore[import-untyped]

    if alpha < 0 or np.any(x.data < 0):
        raise InvalidInputError("alpha and the interaction values must be >= 0")
    values = (1.0 + alpha * x.data.astype(np.float64)).astype(np.float32)
    return scipy.sparse.csr_matrix(
        (values, x.indices.copy(), x.indptr.copy()), shape=x.shape, dtype=np.float32
    )


def _als_class() -> Any:
    """``implicit``'s CPU ALS class, imported on first use (half a second).

    Import it *before* entering ``threadpool_limits``: the limits reach only the BLAS
    libraries already loaded, and importing ``implicit`` loads SciPy's own OpenBLAS.
    """
    from implicit.cpu.als import AlternatingLeastSquares  # type: ignore[import-untyped]

    return AlternatingLeastSquares


def single_threaded_blas() -> Any:
    """A context manager that holds every loaded BLAS library (numpy's, and SciPy's,
    which ``implicit`` uses) to one thread, as ``implicit`` asks.

    Small matrix products in a loop gain nothing from BLAS threads, and on a busy
    machine the threads waiting for each other cost far more CPU than the work: the
    hand-written numpy ALS this module used before spent 8 to 16 times the CPU time with
    two OpenBLAS threads as with one on a loaded two-core machine
    (``benchmarks/bench_eval_als.py``). Parallel work runs in ``implicit``'s OpenMP loop
    over rows instead.
    """
    _als_class()  # loaded first: the limits reach only libraries already loaded
    return threadpool_limits(limits=1, user_api="blas")


def _als_model(
    *,
    factors: int,
    regularization: float,
    iterations: int,
    seed: int,
    threads: int,
    cg_steps: int,
    dtype: type[np.floating[Any]] = np.float32,
) -> Any:
    """An ``implicit`` CPU ALS model with this project's conventions (alpha 1: the
    confidences are in the matrix, see :func:`confidence_matrix`)."""
    model = _als_class()(
        factors=factors,
        regularization=regularization,
        alpha=1.0,
        dtype=dtype,
        use_cg=cg_steps > 0,
        iterations=iterations,
        calculate_training_loss=False,
        num_threads=threads,
        random_state=seed,
    )
    if cg_steps > 0:
        model.cg_steps = cg_steps
    return model


def _exact_user_step(conf: Any, item_factors: F32, *, regularization: float, threads: int) -> F32:
    """The exact ALS user step (a Cholesky solve per user, in float64) of every row of
    ``conf`` against ``item_factors``, with ``implicit``'s own solver."""
    with single_threaded_blas():
        model = _als_model(
            factors=item_factors.shape[1],
            regularization=regularization,
            iterations=0,
            seed=0,
            threads=threads,
            cg_steps=0,
            dtype=np.float64,
        )
        model.item_factors = item_factors.astype(np.float64)
        out = model.recalculate_user(np.arange(conf.shape[0]), conf)
    return np.asarray(out, dtype=np.float32).reshape(conf.shape[0], item_factors.shape[1])


def train_als(
    x: Csr,
    *,
    factors: int = 64,
    regularization: float = 2.0,
    alpha: float = 2.0,
    iterations: int = 15,
    seed: int = 0,
    progress: Progress | None = None,
    threads: int = 0,
    cg_steps: int = ALS_CG_STEPS,
) -> tuple[F32, F32]:
    """Implicit-feedback ALS trained by ``implicit``: returns ``(user_factors,
    item_factors)`` (``float32``).

    Minimises ``sum_ui c_ui (p_ui - x_u . y_i)^2 + lambda (|X|^2 + |Y|^2)`` with
    ``p_ui = 1`` on observed pairs (0 elsewhere), ``c_ui = 1 + alpha * r_ui`` there and 1
    elsewhere, and ``lambda = regularization`` (plain, not scaled by counts): exactly
    ``implicit``'s objective once its matrix holds ``1 + alpha * r`` and its own alpha
    is 1 (:func:`confidence_matrix`). ``iterations`` alternating steps (users, then
    items) run in ``implicit`` with ``cg_steps`` conjugate-gradient steps per row and
    step (0: exact Cholesky solves). Then the item factors are rounded to ``float32``,
    as the bundle ships them, and one last *exact* user step against those very factors
    gives the user factors: every returned user vector is what the device's
    :func:`ondevice.scoring.fold_in` computes from that user's items (to rounding).

    BLAS is held to one thread while ``implicit`` runs (its own OpenMP loop over rows
    is the parallel part; ``threads`` = 0 uses every core).
    """
    if factors <= 0 or iterations < 0 or cg_steps < 0:
        raise InvalidInputError("factors must be > 0, iterations and cg_steps >= 0")
    conf = confidence_matrix(x, alpha)

    def step(iteration: int, _elapsed: float, _loss: object) -> None:
        if progress is not None:
            progress(iteration + 1, iterations, "als")

    # implicit checks BLAS threads when a model is made (and warns if more than one)
    with single_threaded_blas():
        model = _als_model(
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            seed=seed,
            threads=threads,
            cg_steps=cg_steps,
        )
        # the start ondevice has always used: small zero-mean item factors, users at zero
        # (implicit's own start, uniform in [0, 0.01), reaches other local optima)
        start = np.random.default_rng(seed).normal(
            0.0, 0.1 / math.sqrt(factors), (x.shape[1], factors)
        )
        model.item_factors = start.astype(np.float32)
        model.user_factors = np.zeros((x.shape[0], factors), dtype=np.float32)
        model.fit(conf, show_progress=False, callback=step)
    y = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    u = _exact_user_step(conf, y, regularization=regularization, threads=threads)
    return u, y


def user_vectors(
    x: Csr, item_factors: F32, *, regularization: float, alpha: float, threads: int = 0
) -> F32:
    """The exact ALS user vector of every row of ``x`` against ``item_factors`` (the
    batch twin of :func:`ondevice.scoring.fold_in`, solved by ``implicit``)."""
    conf = confidence_matrix(x, alpha)
    return _exact_user_step(conf, item_factors, regularization=regularization, threads=threads)


def _normalise(v: npt.NDArray[np.floating]) -> F64:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    out: F64 = v / np.where(n > 0, n, 1.0)
    return out


def spherical_kmeans(
    vectors: npt.NDArray[np.floating],
    k: int,
    *,
    min_size: int = 1,
    iterations: int = 30,
    seed: int = 0,
) -> tuple[F32, I64]:
    """Cosine k-means: returns ``(centroids float32[k', f], labels int64[n])``.

    Centroids are unit vectors; every point goes to the centroid of highest cosine.
    k-means++ seeding on cosine distance. After convergence, while some cluster holds
    fewer than ``min_size`` points, the smallest one is dissolved (its points go to their
    next-best cluster) and the centroids are recomputed; so ``k' <= k`` and every cluster
    has at least ``min_size`` points. If fewer than ``min_size`` points exist in total,
    returns no cluster (``k' = 0``, labels all -1).
    """
    pts = _normalise(vectors)
    n = pts.shape[0]
    if n == 0 or n < min_size or k <= 0:
        return np.zeros((0, pts.shape[1] if pts.ndim == 2 else 0), np.float32), np.full(
            n, -1, dtype=np.int64
        )
    k = min(k, n)
    rng = np.random.default_rng(seed)
    cents = [pts[int(rng.integers(n))]]
    for _ in range(1, k):
        d = 1.0 - np.max(pts @ np.asarray(cents).T, axis=1)
        d = np.maximum(d, 0.0)
        total = d.sum()
        nxt = int(rng.integers(n)) if total <= 0 else int(rng.choice(n, p=d / total))
        cents.append(pts[nxt])
    c = np.asarray(cents)
    labels = np.zeros(n, dtype=np.int64)

    def recompute(c: F64, labels: I64) -> F64:
        new = np.zeros_like(c)
        np.add.at(new, labels, pts)
        empty = np.linalg.norm(new, axis=1) == 0
        new[empty] = c[empty]
        return _normalise(new)

    for _ in range(iterations):
        new_labels = np.argmax(pts @ c.T, axis=1)
        if np.array_equal(new_labels, labels) and _ > 0:
            break
        labels = new_labels
        c = recompute(c, labels)
    labels = np.argmax(pts @ c.T, axis=1)
    while c.shape[0] > 0:
        sizes = np.bincount(labels, minlength=c.shape[0])
        small = np.flatnonzero(sizes < min_size)
        if small.size == 0:
            break
        drop = int(small[np.argmin(sizes[small])])
        c = np.delete(c, drop, axis=0)
        if c.shape[0] == 0:
            break
        labels = np.argmax(pts @ c.T, axis=1)
        for _ in range(5):
            c = recompute(c, labels)
            labels = np.argmax(pts @ c.T, axis=1)
    if c.shape[0] == 0:
        return np.zeros((0, pts.shape[1]), np.float32), np.full(n, -1, dtype=np.int64)
    return c.astype(np.float32), labels.astype(np.int64)


def segment_top_items(
    x: Csr,
    members: npt.NDArray[np.integer],
    *,
    shrinkage: float,
    top_n: int,
    global_share: F64 | None = None,
) -> I32:
    """A segment's top items: the share of its users who took each item, shrunk toward
    the global share with ``shrinkage`` pseudo-users:
    ``(count_s(i) + m * share(i)) / (|s| + m)``. Ties by global share, then index."""
    n_users, n_items = x.shape
    if global_share is None:
        global_share = item_popularity(x).astype(np.float64) / max(n_users, 1)
    mem = np.asarray(members, dtype=np.int64)
    offs = _gather(x.indptr[mem], np.diff(x.indptr)[mem])
    cnt = np.bincount(x.indices[offs], minlength=n_items).astype(np.float64)
    score = (cnt + shrinkage * global_share) / (mem.size + shrinkage)
    order = np.lexsort((np.arange(n_items), -global_share, -score))
    order = order[score[order] > 0][:top_n]
    return order.astype(np.int32)


def rule_segments(
    user_signals: Sequence[Mapping[str, str] | None],
    signal_names: Sequence[str],
    *,
    min_users: int,
    max_segments: int,
) -> list[tuple[dict[str, tuple[str, ...]], I64]]:
    """Segments from the cross product of the named declared signals.

    Returns ``(when, member_rows)`` pairs, largest first, each with at least
    ``min_users`` members and at most ``max_segments`` of them. Combinations too small
    (or beyond the limit) are dropped: their users fall through to the next rule, to the
    centroids or to the default segment.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, sig in enumerate(user_signals):
        if sig is None or any(name not in sig for name in signal_names):
            continue
        groups.setdefault(tuple(sig[name] for name in signal_names), []).append(row)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    out: list[tuple[dict[str, tuple[str, ...]], I64]] = []
    for values, rows in ranked:
        if len(rows) < min_users or len(out) >= max_segments:
            continue
        when: dict[str, tuple[str, ...]] = {
            name: (v,) for name, v in zip(signal_names, values, strict=True)
        }
        out.append((when, np.asarray(rows, dtype=np.int64)))
    return out


def read_interactions(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a CSV interaction log with columns ``user,item,timestamp[,value]``.

    A header line is skipped when its third field is not a number.
    """
    rows: list[Row] = []
    try:
        with Path(path).open(newline="", encoding="utf-8") as fh:
            for n, rec in enumerate(csv.reader(fh)):
                if not rec:
                    continue
                if len(rec) < 3:
                    raise InvalidInputError(f"{path}:{n + 1}: need user,item,timestamp")
                try:
                    ts = float(rec[2])
                    val = float(rec[3]) if len(rec) > 3 and rec[3] != "" else None
                except ValueError:
                    if n == 0:
                        continue
                    raise InvalidInputError(f"{path}:{n + 1}: bad number") from None
                rows.append((rec[0], rec[1], ts) if val is None else (rec[0], rec[1], ts, val))
    except OSError as exc:
        raise InvalidInputError(f"cannot read interaction log {path}: {exc}") from exc
    return rows


def build_catalog(
    interactions: str | os.PathLike[str] | Iterable[Sequence[object]],
    *,
    settings: BuildSettings | None = None,
    signals: Mapping[str, Mapping[str, str]] | None = None,
    items: Sequence[str] | None = None,
    titles: Mapping[str, str] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    progress: Progress | None = None,
    created_at: float | None = None,
) -> Catalog:
    """Build a catalog from a panel's interactions.

    ``interactions``: a CSV path (``user,item,timestamp[,value]``) or an iterable of
    ``(user, item, timestamp[, value])``; feedback is treated as binary implicit.
    ``signals``: the panel users' declared signals (user id -> {signal: value}), used
    for the rule segments named in ``settings.rule_signals``. ``items``: the full item
    list (items the panel never touched get zero popularity, no neighbours and zero
    factors); by default the items seen in the log, sorted. ``progress(done, total,
    stage)`` is called during the long stages.
    """
    s = settings or BuildSettings()
    rows = (
        read_interactions(interactions)
        if isinstance(interactions, (str, os.PathLike))
        else list(interactions)
    )
    if not rows:
        raise InvalidInputError("the interaction log is empty")
    u_names: list[str] = []
    i_names: list[str] = []
    for n, row in enumerate(rows):
        if len(row) < 3:
            raise InvalidInputError(f"row {n}: need (user, item, timestamp[, value])")
        u_names.append(str(row[0]))
        i_names.append(str(row[1]))
    item_list = list(items) if items is not None else sorted(set(i_names))
    item_pos = {name: i for i, name in enumerate(item_list)}
    if len(item_pos) != len(item_list):
        raise InvalidInputError("duplicate item ids")
    unknown = {name for name in i_names if name not in item_pos}
    if unknown:
        raise InvalidInputError(f"{len(unknown)} logged items are not in the item list")
    user_list = sorted(set(u_names))
    user_pos = {name: i for i, name in enumerate(user_list)}
    uu = np.fromiter((user_pos[n] for n in u_names), dtype=np.int64, count=len(rows))
    ii = np.fromiter((item_pos[n] for n in i_names), dtype=np.int64, count=len(rows))
    x = interaction_matrix(uu, ii, len(user_list), len(item_list))
    t0 = time.perf_counter()
    log.info(
        "building catalog: %d panel users, %d items, %d interactions",
        x.shape[0],
        x.shape[1],
        x.indices.size,
    )

    pop = item_popularity(x)
    nbr_indptr, nbr_indices, nbr_weights = item_neighbours(x, top_n=s.neighbours, progress=progress)
    user_f, item_f = train_als(
        x,
        factors=s.factors,
        regularization=s.regularization,
        alpha=s.alpha,
        iterations=s.iterations,
        seed=s.seed,
        progress=progress,
        threads=s.threads,
        cg_steps=s.als_cg_steps,
    )
    gram = (item_f.astype(np.float64).T @ item_f.astype(np.float64)).astype(np.float32)
    user_sig = [signals.get(name) if signals else None for name in user_list]
    segs, rules, default = make_segments(x, user_f, user_sig, settings=s)
    if progress is not None:
        progress(1, 1, "segments")
    log.info("catalog built in %.1f s: %d segments", time.perf_counter() - t0, len(segs))
    return Catalog(
        item_ids=tuple(item_list),
        titles=tuple((titles or {}).get(name, name) for name in item_list),
        popularity=pop,
        nbr_indptr=nbr_indptr,
        nbr_indices=nbr_indices,
        nbr_weights=nbr_weights,
        segments=tuple(segs),
        segment_rules=tuple(rules),
        default_segment=default,
        categories=None
        if categories is None
        else tuple(tuple(categories.get(name, ())) for name in item_list),
        item_factors=item_f,
        gram=gram,
        als=AlsParams(factors=s.factors, regularization=s.regularization, alpha=s.alpha),
        name=s.name,
        created_at=time.time() if created_at is None else created_at,
        extra=s.scoring.to_extra(),
    )


def make_segments(
    x: Csr,
    user_factors: F32 | None,
    user_signals: Sequence[Mapping[str, str] | None],
    *,
    settings: BuildSettings,
) -> tuple[list[Segment], list[SegmentRule], int]:
    """Rule segments (from ``settings.rule_signals``) then behaviour segments (spherical
    k-means over ``user_factors``), at most ``settings.max_segments`` in all, each from
    at least ``settings.min_segment_users`` panel users. Returns ``(segments, rules,
    default_segment)``; the default is the largest segment (or a whole-panel one)."""
    s = settings
    share = item_popularity(x).astype(np.float64) / max(x.shape[0], 1)
    segs: list[Segment] = []
    rules: list[SegmentRule] = []
    behaviour = s.segments > 0 and user_factors is not None
    # rules alone keep one slot for the catch-all "everyone" segment
    rule_room = s.max_segments - (min(s.segments, s.max_segments - 1) if behaviour else 1)
    if s.rule_signals and rule_room > 0:
        for when, members in rule_segments(
            user_signals, s.rule_signals, min_users=s.min_segment_users, max_segments=rule_room
        ):
            sid = len(segs)
            name = " & ".join(f"{k}={v[0]}" for k, v in when.items())
            segs.append(
                Segment(
                    id=sid,
                    name=name,
                    panel_users=int(members.size),
                    top_items=segment_top_items(
                        x, members, shrinkage=s.shrinkage, top_n=s.segment_top_n, global_share=share
                    ),
                )
            )
            rules.append(SegmentRule(segment=sid, when=when))
    room = s.max_segments - len(segs)
    if behaviour and room > 0 and user_factors is not None:
        active = np.flatnonzero(np.diff(x.indptr) > 0)
        cents, labels = spherical_kmeans(
            user_factors[active], min(s.segments, room), min_size=s.min_segment_users, seed=s.seed
        )
        for c in range(cents.shape[0]):
            members = active[labels == c]
            sid = len(segs)
            segs.append(
                Segment(
                    id=sid,
                    name=f"behaviour {c}",
                    panel_users=int(members.size),
                    top_items=segment_top_items(
                        x, members, shrinkage=s.shrinkage, top_n=s.segment_top_n, global_share=share
                    ),
                    centroid=cents[c],
                )
            )
    if not segs or (not any(g.centroid is not None for g in segs) and len(segs) < s.max_segments):
        # users matching no rule need a segment too: the whole panel, if large enough
        n_active = int((np.diff(x.indptr) > 0).sum())
        if n_active >= s.min_segment_users:
            sid = len(segs)
            order = np.lexsort((np.arange(x.shape[1]), -share))
            top: I32 = order[share[order] > 0][: s.segment_top_n].astype(np.int32)
            segs.append(Segment(id=sid, name="everyone", panel_users=n_active, top_items=top))
    if not segs:
        return [], [], 0
    default = max(segs, key=lambda g: (g.panel_users, -g.id)).id
    if segs[-1].name == "everyone":
        default = segs[-1].id
    return segs, rules, default
