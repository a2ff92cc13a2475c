"""Build a :class:`~ondevice.catalog.Catalog` from a consenting panel's interaction log.

Operator-side only: the device runtime never imports this module. It is numpy, plus
``implicit`` (with ``scipy`` and ``threadpoolctl``) for the ALS model: the ``operator``
extra.

The pieces, each usable on its own (the evaluation harness reuses them):

- :func:`interaction_matrix`: the panel's user x item matrix in CSR form;
- :func:`item_popularity`: how many panel users interacted with each item;
- :func:`item_neighbours`: cosine similarity on co-occurrence, top-N per item (CSR), by
  sparse products over blocks of items (:func:`cap_user_items` optionally samples
  heavy users first);
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
- :func:`build_catalog`: all of the above from a CSV file or an iterable of rows;
- :func:`build_catalog_from_arrays`: the same from integer-coded arrays (large panels);
- :func:`assemble_catalog` (with :func:`neighbours_from_pairs`): a catalog from arrays
  computed elsewhere, e.g. by Spark (``docs/operator-scale.md``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    "NeighbourMethod",
    "Progress",
    "assemble_catalog",
    "build_catalog",
    "build_catalog_from_arrays",
    "cap_user_items",
    "confidence_matrix",
    "interaction_matrix",
    "item_neighbours",
    "item_popularity",
    "make_segments",
    "neighbours_from_pairs",
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
    max_user_items: int = 0
    """Cap on a panel user's items in the neighbour computation: a heavier user counts
    with a seeded random sample of this many (:func:`cap_user_items`); 0: no cap (the
    default). Popularity, ALS and segments always see every interaction."""
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
        if self.als_cg_steps < 0 or self.threads < 0 or self.max_user_items < 0:
            raise InvalidInputError("als_cg_steps, threads and max_user_items must be >= 0")
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
    """The user x item matrix; repeated pairs are summed, or set to 1 if ``binary``.

    The binary matrix is made by one sort of ``user * n_items + item`` keys (tens of
    millions of interactions take seconds); indices must be in range.
    """
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    if binary:
        key = np.sort(u * np.int64(n_items) + i)
        if key.size:
            key = key[np.concatenate(([True], key[1:] != key[:-1]))]
        rows = key // max(n_items, 1)
        cols = (key - rows * n_items).astype(np.int32)
        del key
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
        return Csr(indptr, cols, np.ones(cols.size, dtype=np.float32), (n_users, n_items))
    v = np.ones(u.size, dtype=np.float32) if values is None else np.asarray(values)
    return _coo_to_csr(u, i, v, (n_users, n_items))


def item_popularity(x: Csr) -> F32:
    """How many users interacted with each item (``float32[n_items]``)."""
    return np.bincount(x.indices, minlength=x.shape[1]).astype(np.float32)


def _gather(starts: I64, lens: I64) -> I64:
    """Concatenated ``arange(start, start + len)`` for every pair, without a loop."""
    total = int(lens.sum())
    run_start = np.cumsum(lens) - lens
    return np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)


NeighbourMethod = Literal["auto", "dense", "sparse"]


def cap_user_items(x: Csr, max_items: int, *, seed: int = 0) -> Csr:
    """``x`` with every row longer than ``max_items`` cut to a uniform random sample of
    ``max_items`` of its entries (seeded; columns stay sorted; other rows unchanged).

    The classic guard of item-item co-occurrence: a user with ``n`` items adds ``n^2``
    pairs to the neighbour computation, so a few very heavy users (bots, resellers,
    shared accounts) can dominate its cost and its result. Off unless asked for
    (``BuildSettings.max_user_items``); used for the neighbours only.
    """
    if max_items <= 0:
        raise InvalidInputError("max_items must be > 0")
    lens = np.diff(x.indptr)
    heavy = np.flatnonzero(lens > max_items)
    if heavy.size == 0:
        return x
    offs = _gather(x.indptr[heavy], lens[heavy])
    owner = np.repeat(np.arange(heavy.size, dtype=np.int64), lens[heavy])
    order = np.lexsort((np.random.default_rng(seed).random(offs.size), owner))
    rank = np.empty(offs.size, dtype=np.int64)
    starts = np.cumsum(lens[heavy]) - lens[heavy]
    rank[order] = np.arange(offs.size, dtype=np.int64) - np.repeat(starts, lens[heavy])
    keep = np.ones(x.indices.size, dtype=np.bool_)
    keep[offs[rank >= max_items]] = False
    new_lens = np.minimum(lens, max_items)
    indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
    np.cumsum(new_lens, out=indptr[1:])
    return Csr(indptr, x.indices[keep], x.data[keep], x.shape)


def item_neighbours(
    x: Csr,
    *,
    top_n: int = 100,
    progress: Progress | None = None,
    block_cells: int = 20_000_000,
    method: NeighbourMethod = "auto",
    max_user_items: int = 0,
    seed: int = 0,
) -> tuple[I64, I32, F32]:
    """Cosine similarity on binary co-occurrence, the ``top_n`` best per item.

    ``sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|)`` over the users ``U`` of each item.
    Returns CSR arrays ``(indptr int64[n+1], indices int32, weights float32)`` with each
    row sorted by weight descending (ties by lower index; the weights are compared in
    float64, before rounding to float32), no self-loops and no zero weights.

    Two paths give the same arrays bit for bit (``method``; ``"auto"`` picks dense when
    the dense user x item matrix holds at most ``block_cells`` cells):

    - ``"dense"``: the whole matrix as a dense array, blocks of items multiplied by it.
      For small panels, and the reference the sparse path is tested against.
    - ``"sparse"``: ``scipy.sparse`` products ``X[:, block].T @ X`` (items x users times
      users x items) over blocks of items, each block holding at most about
      ``block_cells`` multiply-adds (so at most that many co-occurring pairs), then the
      top ``top_n`` of every row of the sparse result; nothing of size ``block x n_items``
      is ever dense. Cost: ``sum over users of |items_u|^2`` multiply-adds, memory
      about ``20 * block_cells`` bytes beyond the matrix.

    ``max_user_items`` > 0 first cuts every panel user with more items to a seeded
    random sample of that many (:func:`cap_user_items`); 0 (the default) uses every
    interaction.
    """
    if top_n <= 0:
        raise InvalidInputError("top_n must be > 0")
    if block_cells <= 0:
        raise InvalidInputError("block_cells must be > 0")
    if method not in ("auto", "dense", "sparse"):
        raise InvalidInputError(f"unknown neighbour method {method!r}")
    if max_user_items > 0:
        x = cap_user_items(x, max_user_items, seed=seed)
    if method == "auto":
        method = "dense" if x.shape[0] * x.shape[1] <= block_cells else "sparse"
    if method == "dense":
        return _neighbours_dense(x, top_n=top_n, progress=progress, block_cells=block_cells)
    return _neighbours_sparse(x, top_n=top_n, progress=progress, block_cells=block_cells)


def _finish_rows(rows: I64, cols: I64, sims: F64, n_rows: int) -> tuple[I32, F32, I64]:
    """Selected ``(row, col, sim)`` entries in CSR order: by row, weight descending,
    ties by lower column. Returns ``(indices, weights, row lengths)``."""
    order = np.lexsort((cols, -sims, rows))
    lens = np.bincount(rows, minlength=n_rows).astype(np.int64)
    return cols[order].astype(np.int32), sims[order].astype(np.float32), lens


def _assemble(
    n_items: int, lens: I64, out_idx: list[I32], out_w: list[F32]
) -> tuple[I64, I32, F32]:
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    indices = np.concatenate(out_idx) if out_idx else np.empty(0, dtype=np.int32)
    weights = np.concatenate(out_w) if out_w else np.empty(0, dtype=np.float32)
    return indptr, indices.astype(np.int32, copy=False), weights.astype(np.float32, copy=False)


def _neighbours_dense(
    x: Csr, *, top_n: int, progress: Progress | None, block_cells: int
) -> tuple[I64, I32, F32]:
    """The dense path of :func:`item_neighbours` (the whole matrix in memory)."""
    n_users, n_items = x.shape
    norm = np.sqrt(np.maximum(np.bincount(x.indices, minlength=n_items).astype(np.float64), 1.0))
    xd = np.zeros(x.shape, dtype=np.float32)
    xd[np.repeat(np.arange(n_users), np.diff(x.indptr)), x.indices] = 1.0
    block = max(1, min(n_items, block_cells // max(n_items, 1)))
    keep = min(top_n, n_items)
    lens = np.zeros(n_items, dtype=np.int64)
    out_idx: list[I32] = []
    out_w: list[F32] = []
    for lo in range(0, n_items, block):
        hi = min(n_items, lo + block)
        co = (xd[:, lo:hi].T @ xd).astype(np.float64)
        sim = co / norm[lo:hi, None] / norm[None, :]
        sim[np.arange(hi - lo), np.arange(lo, hi)] = 0.0
        if keep < n_items:
            # the keep-th largest value of each row; every larger value is kept, and of
            # the values equal to it, those of the lowest columns
            part = np.argpartition(-sim, keep - 1, axis=1)[:, keep - 1 : keep]
            kth = np.take_along_axis(sim, part, axis=1)
            above = sim > kth
            tie = sim == kth
            room = keep - above.sum(axis=1, keepdims=True)
            chosen = above | (tie & (np.cumsum(tie, axis=1) <= room))
        else:
            chosen = np.ones(sim.shape, dtype=np.bool_)
        chosen &= sim > 0
        r, c = np.nonzero(chosen)
        idx, w, ln = _finish_rows(r.astype(np.int64), c.astype(np.int64), sim[r, c], hi - lo)
        out_idx.append(idx)
        out_w.append(w)
        lens[lo:hi] = ln
        if progress is not None:
            progress(hi, n_items, "neighbours")
    return _assemble(n_items, lens, out_idx, out_w)


def _item_blocks(work: I64, budget: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of items, each with at most ``budget`` work (or a
    single item)."""
    n = work.size
    cum = np.concatenate(([0], np.cumsum(work)))
    out: list[tuple[int, int]] = []
    lo = 0
    while lo < n:
        hi = int(np.searchsorted(cum, cum[lo] + budget, side="right")) - 1
        hi = min(n, max(hi, lo + 1))
        out.append((lo, hi))
        lo = hi
    return out


def _neighbours_sparse(
    x: Csr, *, top_n: int, progress: Progress | None, block_cells: int
) -> tuple[I64, I32, F32]:
    """The sparse path of :func:`item_neighbours`: a sparse product per block of items,
    then an exact top-``top_n`` of each row of its sparse result."""
    import scipy.sparse  # type: ignore[import-untyped]

    n_items = x.shape[1]
    xs = scipy.sparse.csr_matrix(
        (np.ones(x.indices.size, dtype=np.int32), x.indices, x.indptr), shape=x.shape
    )
    xt = xs.T.tocsr()  # item -> users
    counts = np.diff(xt.indptr).astype(np.int64)
    norm = np.sqrt(np.maximum(counts.astype(np.float64), 1.0))
    # an item's row of the product has at most sum over its users of |items_u| entries
    per_entry = np.diff(xs.indptr).astype(np.int64)[xt.indices]
    cum = np.concatenate(([0], np.cumsum(per_entry)))
    del per_entry
    work = cum[xt.indptr[1:]] - cum[xt.indptr[:-1]]
    del cum
    lens = np.zeros(n_items, dtype=np.int64)
    out_idx: list[I32] = []
    out_w: list[F32] = []
    for lo, hi in _item_blocks(work, block_cells):
        if int(work[lo:hi].sum()) > 0:
            idx, w, ln = _block_top_k(xt[lo:hi] @ xs, lo, norm, counts[lo:hi] > 0, top_n)
            out_idx.append(idx)
            out_w.append(w)
            lens[lo:hi] = ln
        if progress is not None:
            progress(hi, n_items, "neighbours")
    return _assemble(n_items, lens, out_idx, out_w)


def _block_top_k(
    prod: Any, lo: int, norm: F64, has_self: npt.NDArray[np.bool_], k: int
) -> tuple[I32, F32, I64]:
    """The top ``k`` of every row of one block's co-occurrence counts ``prod`` (rows:
    items ``lo...``, a scipy CSR matrix of unsorted columns), as CSR pieces
    ``(indices, weights, row lengths)``: weights descending (compared in float64),
    ties by lower column, no self-loops. Rows with more than ``k`` entries go through
    ``argpartition`` one at a time (with an exact tie rule at the cut); the rest are
    sorted together."""
    indptr = prod.indptr.astype(np.int64)
    rl = np.diff(indptr)
    cols = prod.indices
    rows = np.repeat(np.arange(lo, lo + rl.size, dtype=cols.dtype), rl)
    # the same float64 operations, in the same order, as the dense path: co / n_a / n_b
    sim = np.take(norm, rows)
    np.divide(prod.data, sim, out=sim)
    del prod
    sim /= np.take(norm, cols)
    own = cols == rows
    sim[own] = 0.0
    # the product's only zero-weight entry of a row is the item itself
    avail = rl - has_self
    row_len = np.minimum(avail, k)
    off = np.concatenate(([0], np.cumsum(row_len)))
    out_c = np.empty(int(off[-1]), dtype=np.int32)
    out_w = np.empty(int(off[-1]), dtype=np.float64)
    short = avail <= k
    e = np.flatnonzero(np.repeat(short, rl) & ~own)
    del own
    order = np.lexsort((cols[e], -sim[e], rows[e]))
    e = e[order]
    dest = _gather(off[:-1][short], row_len[short])
    out_c[dest] = cols[e]
    out_w[dest] = sim[e]
    del e, order, dest, rows
    for r in np.flatnonzero(~short).tolist():
        a, b = int(indptr[r]), int(indptr[r + 1])
        v = sim[a:b]
        c = cols[a:b]
        part = np.argpartition(v, v.size - k)[v.size - k :]
        kth = v[part].min()
        if int(np.count_nonzero(v >= kth)) != k:
            # values equal to the k-th straddle the cut: keep those of the lowest columns
            above = np.flatnonzero(v > kth)
            tie = np.flatnonzero(v == kth)
            tie = tie[np.argsort(c[tie], kind="stable")[: k - above.size]]
            part = np.concatenate((above, tie))
        cv, vv = c[part], v[part]
        o = np.lexsort((cv, -vv))
        out_c[off[r] : off[r + 1]] = cv[o]
        out_w[off[r] : off[r + 1]] = vv[o]
    return out_c, out_w.astype(np.float32), row_len.astype(np.int64)


def confidence_matrix(x: Csr, alpha: float) -> Any:
    """``x`` as the ``scipy.sparse.csr_matrix`` of confidences ``implicit`` trains on.

    ``implicit`` reads a stored value ``v`` as the confidence ``c = alpha_implicit * v``
    of a positive pair (an absent pair has confidence 1 and preference 0). With
    ``alpha_implicit = 1`` and ``v = 1 + alpha * r`` this is exactly this project's
    ``c = 1 + alpha * r`` (Hu, Koren and Volinsky, 2008), so the bundle's ``alpha`` keeps
    its meaning and the device's :func:`ondevice.scoring.fold_in` solves the same system.
    """
    import scipy.sparse

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


def _iter_csv(path: str | os.PathLike[str]) -> Iterator[Row]:
    """The rows of :func:`read_interactions`, one at a time."""
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
                yield (rec[0], rec[1], ts) if val is None else (rec[0], rec[1], ts, val)
    except OSError as exc:
        raise InvalidInputError(f"cannot read interaction log {path}: {exc}") from exc


def read_interactions(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a CSV interaction log with columns ``user,item,timestamp[,value]``.

    A header line is skipped when its third field is not a number.
    """
    return list(_iter_csv(path))


def _sorted_codes(codes: I64, names: dict[str, int]) -> tuple[I64, list[str]]:
    """Codes given in order of first appearance, renumbered so the names are sorted."""
    ordered = sorted(names)
    remap = np.empty(len(names), dtype=np.int64)
    remap[[names[n] for n in ordered]] = np.arange(len(ordered), dtype=np.int64)
    return remap[codes], ordered


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

    The rows are read once, as they come (nothing but two integer codes is kept per
    row); for tens of millions of interactions, integer-coded arrays through
    :func:`build_catalog_from_arrays` skip the per-row Python work altogether.
    """
    s = settings or BuildSettings()
    rows: Iterable[Sequence[object]] = (
        _iter_csv(interactions) if isinstance(interactions, (str, os.PathLike)) else interactions
    )
    item_list = list(items) if items is not None else None
    item_pos: dict[str, int] = {}
    if item_list is not None:
        item_pos = {name: i for i, name in enumerate(item_list)}
        if len(item_pos) != len(item_list):
            raise InvalidInputError("duplicate item ids")
    user_pos: dict[str, int] = {}
    uc: array[int] = array("q")
    ic: array[int] = array("q")
    unknown: set[str] = set()
    for n, row in enumerate(rows):
        if len(row) < 3:
            raise InvalidInputError(f"row {n}: need (user, item, timestamp[, value])")
        uname, iname = str(row[0]), str(row[1])
        u = user_pos.get(uname)
        if u is None:
            u = user_pos[uname] = len(user_pos)
        i = item_pos.get(iname)
        if i is None:
            if item_list is not None:
                unknown.add(iname)
                i = 0
            else:
                i = item_pos[iname] = len(item_pos)
        uc.append(u)
        ic.append(i)
    if not uc:
        raise InvalidInputError("the interaction log is empty")
    if unknown:
        raise InvalidInputError(f"{len(unknown)} logged items are not in the item list")
    uu, user_list = _sorted_codes(np.frombuffer(uc, dtype=np.int64), user_pos)
    del uc
    if item_list is None:
        ii, item_list = _sorted_codes(np.frombuffer(ic, dtype=np.int64), item_pos)
    else:
        ii = np.frombuffer(ic, dtype=np.int64)
    del item_pos
    x = interaction_matrix(uu, ii, len(user_list), len(item_list))
    del uu, ii, ic
    user_sig = [signals.get(name) if signals else None for name in user_list]
    return _catalog_from_matrix(
        x,
        item_list,
        user_sig,
        settings=s,
        titles=titles,
        categories=categories,
        progress=progress,
        created_at=created_at,
    )


def _codes(a: npt.ArrayLike, name: str, bound: int | None) -> I64:
    """A 1-D array of integer codes in ``[0, bound)`` (``bound`` None: any >= 0)."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D array, not {arr.ndim}-D")
    if arr.size and arr.dtype.kind not in "iu":
        raise InvalidInputError(f"{name} must hold integers, not {arr.dtype}")
    out = arr.astype(np.int64, copy=False)
    if out.size and int(out.min()) < 0:
        raise InvalidInputError(f"{name} holds a negative index")
    if out.size and bound is not None and int(out.max()) >= bound:
        raise InvalidInputError(f"{name} holds an index >= {bound}")
    return out


def build_catalog_from_arrays(
    users: npt.ArrayLike,
    items: npt.ArrayLike,
    item_ids: Sequence[str],
    *,
    n_users: int | None = None,
    user_signals: Sequence[Mapping[str, str] | None] | None = None,
    settings: BuildSettings | None = None,
    titles: Mapping[str, str] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    progress: Progress | None = None,
    created_at: float | None = None,
) -> Catalog:
    """Build a catalog from integer-coded interactions: the scalable twin of
    :func:`build_catalog`.

    Interaction ``k`` is panel user ``users[k]`` (a code in ``[0, n_users)``) with item
    ``item_ids[items[k]]``; repeats count once (binary implicit feedback). ``n_users``
    defaults to ``max(users) + 1``; ``user_signals[u]`` are user ``u``'s declared
    signals (for ``settings.rule_signals``). ``titles`` and ``categories`` are keyed by
    item id, as in :func:`build_catalog`. Nothing is done per row in Python: a panel of
    tens of millions of interactions is two ``int32``/``int64`` arrays (read them with
    ``numpy`` or ``pandas``; see ``docs/operator-scale.md``).
    """
    s = settings or BuildSettings()
    ids = list(item_ids)
    if not ids or not all(isinstance(i, str) for i in ids):
        raise InvalidInputError("item_ids must be a non-empty sequence of strings")
    if len(set(ids)) != len(ids):
        raise InvalidInputError("duplicate item ids")
    uu = _codes(users, "users", n_users)
    ii = _codes(items, "items", len(ids))
    if uu.size != ii.size:
        raise InvalidInputError(f"users and items differ in length ({uu.size} != {ii.size})")
    if uu.size == 0:
        raise InvalidInputError("the interaction log is empty")
    n_u = int(uu.max()) + 1 if n_users is None else int(n_users)
    if user_signals is not None and len(user_signals) != n_u:
        raise InvalidInputError(f"user_signals must have one entry per user ({n_u})")
    x = interaction_matrix(uu, ii, n_u, len(ids))
    sig = list(user_signals) if user_signals is not None else [None] * n_u
    return _catalog_from_matrix(
        x,
        ids,
        sig,
        settings=s,
        titles=titles,
        categories=categories,
        progress=progress,
        created_at=created_at,
    )


def _catalog_from_matrix(
    x: Csr,
    item_list: Sequence[str],
    user_sig: Sequence[Mapping[str, str] | None],
    *,
    settings: BuildSettings,
    titles: Mapping[str, str] | None,
    categories: Mapping[str, Sequence[str]] | None,
    progress: Progress | None,
    created_at: float | None,
) -> Catalog:
    """Every stage of the build on the binary panel matrix ``x``."""
    s = settings
    t0 = time.perf_counter()
    log.info(
        "building catalog: %d panel users, %d items, %d interactions",
        x.shape[0],
        x.shape[1],
        x.indices.size,
    )
    pop = item_popularity(x)
    nbr_indptr, nbr_indices, nbr_weights = item_neighbours(
        x,
        top_n=s.neighbours,
        progress=progress,
        max_user_items=s.max_user_items,
        seed=s.seed,
    )
    log.info("neighbours in %.1f s", time.perf_counter() - t0)
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
    log.info("ALS done at %.1f s", time.perf_counter() - t0)
    gram = (item_f.astype(np.float64).T @ item_f.astype(np.float64)).astype(np.float32)
    segs, rules, default = make_segments(x, user_f, user_sig, settings=s)
    if progress is not None:
        progress(1, 1, "segments")
    log.info("catalog built in %.1f s: %d segments", time.perf_counter() - t0, len(segs))
    return _make_catalog(
        item_list,
        titles,
        categories,
        s,
        pop=pop,
        nbr=(nbr_indptr, nbr_indices, nbr_weights),
        factors=(item_f, gram, AlsParams(s.factors, s.regularization, s.alpha)),
        segments=(segs, rules, default),
        created_at=created_at,
    )


def _make_catalog(
    item_ids: Sequence[str],
    titles: Mapping[str, str] | None,
    categories: Mapping[str, Sequence[str]] | None,
    s: BuildSettings,
    *,
    pop: F32,
    nbr: tuple[I64, I32, F32],
    factors: tuple[F32, F32, AlsParams],
    segments: tuple[Sequence[Segment], Sequence[SegmentRule], int],
    created_at: float | None,
) -> Catalog:
    """The catalog of the built or assembled pieces (titles default to the ids)."""
    y, gram, als = factors
    segs, rules, default = segments
    return Catalog(
        item_ids=tuple(item_ids),
        titles=tuple((titles or {}).get(name, name) for name in item_ids),
        popularity=pop,
        nbr_indptr=nbr[0],
        nbr_indices=nbr[1],
        nbr_weights=nbr[2],
        segments=tuple(segs),
        segment_rules=tuple(rules),
        default_segment=default,
        categories=None
        if categories is None
        else tuple(tuple(categories.get(name, ())) for name in item_ids),
        item_factors=y,
        gram=gram,
        als=als,
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


def _float_array(a: npt.ArrayLike, name: str, shape: tuple[int | None, ...]) -> F32:
    """``a`` as a finite ``float32`` array of the given shape (None: any length)."""
    arr = np.asarray(a)
    if arr.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(arr.shape, shape, strict=True)
    ):
        want_s = "x".join("*" if w is None else str(w) for w in shape)
        raise InvalidInputError(f"{name} must have shape {want_s}, not {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise InvalidInputError(f"{name} must hold numbers, not {arr.dtype}")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidInputError(f"{name} holds NaN or infinite values (or overflows float32)")
    return out


def neighbours_from_pairs(
    items: npt.ArrayLike,
    neighbours: npt.ArrayLike,
    weights: npt.ArrayLike,
    n_items: int,
    *,
    top_n: int | None = None,
) -> tuple[I64, I32, F32]:
    """Neighbour lists given as ``(item, neighbour, weight)`` triples (one row per edge,
    any order, as a Spark job writes them) in the catalog's CSR form: rows sorted by
    weight descending (ties by lower index), at most ``top_n`` per item (all if None).

    Raises :class:`InvalidInputError` for an index out of ``[0, n_items)``, a self-loop,
    an edge given twice, or a weight that is not finite and > 0.
    """
    a = _codes(items, "neighbour items", n_items)
    b = _codes(neighbours, "neighbour indices", n_items)
    w = np.asarray(weights)
    if a.size != b.size or w.shape != (a.size,):
        raise InvalidInputError(
            f"items, neighbours and weights differ in length ({a.size}, {b.size}, {w.shape})"
        )
    if w.size and w.dtype.kind not in "fiu":
        raise InvalidInputError(f"neighbour weights must be numbers, not {w.dtype}")
    w64 = w.astype(np.float64)
    if not (np.isfinite(w64).all() and (w64 > 0).all()):
        raise InvalidInputError("neighbour weights must be finite and > 0")
    if (a == b).any():
        raise InvalidInputError(f"item {int(a[a == b][0])} is its own neighbour")
    order = np.lexsort((b, -w64, a))
    a, b, w64 = a[order], b[order], w64[order]
    pair = a * np.int64(n_items) + b
    if np.unique(pair).size != pair.size:
        raise InvalidInputError("an (item, neighbour) edge is given more than once")
    lens = np.bincount(a, minlength=n_items).astype(np.int64)
    if top_n is not None:
        if top_n <= 0:
            raise InvalidInputError("top_n must be > 0")
        starts = np.cumsum(lens) - lens
        rank = np.arange(a.size, dtype=np.int64) - np.repeat(starts, lens)
        keep = rank < top_n
        b, w64 = b[keep], w64[keep]
        lens = np.minimum(lens, top_n)
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    return indptr, b.astype(np.int32), w64.astype(np.float32)


def _check_neighbour_csr(
    indptr: npt.ArrayLike, indices: npt.ArrayLike, weights: npt.ArrayLike, n_items: int
) -> tuple[I64, I32, F32]:
    """Validate neighbour CSR arrays; if a row's weights are not in descending order,
    the rows are sorted (weight descending, ties by lower index)."""
    ptr = _codes(indptr, "nbr_indptr", None)
    if ptr.shape != (n_items + 1,):
        raise InvalidInputError(f"nbr_indptr must have {n_items + 1} entries, not {ptr.size}")
    idx = _codes(indices, "nbr_indices", n_items)
    w = _float_array(weights, "nbr_weights", (idx.size,))
    if ptr[0] != 0 or ptr[-1] != idx.size or (np.diff(ptr) < 0).any():
        raise InvalidInputError(
            f"nbr_indptr must rise from 0 to the number of neighbours ({idx.size})"
        )
    if (w <= 0).any():
        raise InvalidInputError("neighbour weights must be > 0")
    rows = np.repeat(np.arange(n_items, dtype=np.int64), np.diff(ptr))
    if (rows == idx).any():
        raise InvalidInputError(f"item {int(rows[rows == idx][0])} is its own neighbour")
    pair = np.sort(rows * np.int64(n_items) + idx)
    twice = pair[1:] == pair[:-1]
    if twice.any():
        first = int(pair[1:][twice][0] // n_items)
        raise InvalidInputError(f"item {first} lists a neighbour twice")
    del pair, twice
    same_row = rows[1:] == rows[:-1]
    # equal weights may come in any order (the builder orders them in float64)
    if not ((w[:-1] >= w[1:]) | ~same_row).all():
        order = np.lexsort((idx, -w, rows))
        idx, w = idx[order], w[order]
    return ptr, idx.astype(np.int32), w


def assemble_catalog(
    item_ids: Sequence[str],
    *,
    popularity: npt.ArrayLike,
    nbr_indptr: npt.ArrayLike,
    nbr_indices: npt.ArrayLike,
    nbr_weights: npt.ArrayLike,
    item_factors: npt.ArrayLike,
    regularization: float,
    alpha: float,
    panel_users: npt.ArrayLike | None = None,
    panel_items: npt.ArrayLike | None = None,
    user_signals: Sequence[Mapping[str, str] | None] | None = None,
    settings: BuildSettings | None = None,
    titles: Mapping[str, str] | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
    progress: Progress | None = None,
    created_at: float | None = None,
) -> Catalog:
    """A catalog from outputs computed elsewhere (a Spark job: see
    ``docs/operator-scale.md``): the hand-off from a distributed build to the bundle.

    ``popularity`` ``[n]`` (panel users per item), the neighbour lists in CSR form
    (``nbr_indptr [n+1]``, ``nbr_indices``, ``nbr_weights``; triples convert with
    :func:`neighbours_from_pairs`), the ALS ``item_factors [n, f]`` with the
    ``regularization`` and ``alpha`` the *device* must fold in with (plain lambda,
    confidence ``1 + alpha * r``: Spark's count-scaled ``regParam`` is not this lambda).
    Every array is checked (shape, dtype, finite values, indices in range, no
    self-loops or repeated neighbours, weights > 0) and converted to the bundle's
    dtypes; neighbour rows whose weights do not descend are sorted (ties by lower
    index), and every row is cut to ``settings.neighbours``. The Gram matrix
    ``Y.T @ Y`` is computed here.

    Segments need panel users: ``panel_users``/``panel_items`` (integer codes, item codes
    index ``item_ids``; a sample of the panel is enough) give every user's exact fold-in
    against these factors (:func:`user_vectors`), then :func:`make_segments` with
    ``settings`` (``user_signals[u]`` for rule segments). Without a panel the catalog has
    no segments. ``settings.factors``, ``regularization``, ``alpha`` and ``iterations``
    are not used (the arrays and arguments say them).

    Raises :class:`InvalidInputError` with the offending array's name; the result is a
    :class:`Catalog` that ``write_bundle`` accepts.
    """
    s = settings or BuildSettings()
    ids = list(item_ids)
    if not ids or not all(isinstance(i, str) for i in ids):
        raise InvalidInputError("item_ids must be a non-empty sequence of strings")
    if len(set(ids)) != len(ids):
        raise InvalidInputError("duplicate item ids")
    n = len(ids)
    for name, value in (("regularization", regularization), ("alpha", alpha)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise InvalidInputError(f"{name} must be a finite number >= 0, not {value!r}")
    pop = _float_array(popularity, "popularity", (n,))
    if (pop < 0).any():
        raise InvalidInputError("popularity must be >= 0")
    y = _float_array(item_factors, "item_factors", (n, None))
    if y.shape[1] < 1:
        raise InvalidInputError("item_factors must have at least one column")
    ptr, idx, w = _check_neighbour_csr(nbr_indptr, nbr_indices, nbr_weights, n)
    lens = np.diff(ptr)
    if (lens > s.neighbours).any():
        starts = ptr[:-1]
        rank = np.arange(idx.size, dtype=np.int64) - np.repeat(starts, lens)
        keep = rank < s.neighbours
        idx, w = idx[keep], w[keep]
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.minimum(lens, s.neighbours), out=ptr[1:])
    y64 = y.astype(np.float64)
    gram = (y64.T @ y64).astype(np.float32)
    del y64
    segs: list[Segment] = []
    rules: list[SegmentRule] = []
    default = 0
    if (panel_users is None) != (panel_items is None):
        raise InvalidInputError("give both panel_users and panel_items, or neither")
    if panel_users is not None and panel_items is not None:
        uu = _codes(panel_users, "panel_users", None)
        ii = _codes(panel_items, "panel_items", n)
        if uu.size != ii.size or uu.size == 0:
            raise InvalidInputError("panel_users and panel_items must be non-empty, same length")
        n_u = int(uu.max()) + 1
        if user_signals is not None and len(user_signals) < n_u:
            raise InvalidInputError(f"user_signals must have one entry per panel user ({n_u})")
        x = interaction_matrix(uu, ii, n_u, n)
        del uu, ii
        user_f = (
            user_vectors(x, y, regularization=regularization, alpha=alpha, threads=s.threads)
            if s.segments > 0
            else None
        )
        sig = list(user_signals)[:n_u] if user_signals is not None else [None] * n_u
        segs, rules, default = make_segments(x, user_f, sig, settings=s)
        if progress is not None:
            progress(1, 1, "segments")
    else:
        log.warning("no panel given: the catalog has no segments")
    return _make_catalog(
        ids,
        titles,
        categories,
        s,
        pop=pop,
        nbr=(ptr, idx, w),
        factors=(y, gram, AlsParams(int(y.shape[1]), float(regularization), float(alpha))),
        segments=(segs, rules, default),
        created_at=created_at,
    )
