"""The catalog: what the operator knows about items, shipped to the device in a bundle.

A :class:`Catalog` holds nothing about any single user. It is built by the operator from a
consenting panel's interactions (``ondevice.operator``), written and signed as a bundle
file (``ondevice.operator.bundle_writer``) and verified and loaded on the device
(``ondevice.bundle``). The device-side levels read it; they never write it.

Arrays are numpy arrays with fixed dtypes so they can be memory-mapped straight from
the bundle file:

- ``popularity``: ``float32[n]``, global popularity (higher is more popular).
- ``neighbours``: CSR adjacency of the sparse item-item similarity graph: for item ``i``
  its top-N neighbours are ``nbr_indices[nbr_indptr[i]:nbr_indptr[i+1]]`` (``int32``,
  item indices) with similarities ``nbr_weights[...]`` (``float32``), sorted by weight,
  descending. ``nbr_indptr`` is ``int64[n + 1]``.
- ``item_factors``: ``float32[n, f]`` implicit-ALS item factors ``Y`` or ``None``;
  ``gram``: ``float32[f, f]`` equal to ``Y.T @ Y`` (``None`` with the factors).
- each segment's ``top_items``: ``int32`` item indices, best first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import numpy.typing as npt

from ._codecs import PackedNeighbourStore
from .ann import ItemRuns, IvfIndex
from .errors import BundleError

__all__ = ["AlsParams", "Catalog", "CategoryLists", "CategoryTable", "Segment", "SegmentRule"]

FloatArray = npt.NDArray[np.float32]

SCORE_BLOCK = 1 << 13
"""Rows of int8 factors converted to float32 at a time when a run of rows is scored
(:meth:`Catalog.factor_scores`, :meth:`Catalog.scores_of`): 2 MB of scratch at 64
factors, which stays in cache between the conversion and the product."""
DECODE_LIMIT = 1 << 23
"""A format 2 array with at most this many elements (100k items x 64 factors, 400k items
x 20 neighbours) is decoded to float32 when loaded: small enough that speed beats
memory. Larger ones stay compact."""
IntArray = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SegmentRule:
    """Assigns a segment from declared signals: every named signal must take one of the
    listed values (``when={"plan": ("pro", "team")}``). Rules are tried in order; the
    first that matches wins."""

    segment: int
    when: Mapping[str, Sequence[str]]


@dataclass(frozen=True, slots=True, eq=False)
class Segment:
    """One segment: a coarse group of at least ``panel_users`` panel users.

    ``centroid`` (``float32[f]``, unit length, in item-factor space) is set for
    behaviour segments, assigned by cosine to the user's folded-in vector; it is
    ``None`` for rule-only segments.
    """

    id: int
    name: str
    panel_users: int
    top_items: IntArray
    centroid: FloatArray | None = None


@dataclass(frozen=True, slots=True)
class AlsParams:
    """The implicit-ALS hyper-parameters the item factors were trained with; the device
    must fold in with the same ones. Confidence is ``1 + alpha * r``."""

    factors: int
    regularization: float
    alpha: float


@dataclass(frozen=True, slots=True, eq=False)
class CategoryTable:
    """Per-item category lists in CSR form: item ``i`` has the categories
    ``names[indices[indptr[r]:indptr[r + 1]]]`` (each list sorted, without repeats) of
    row ``r = i``, or ``r = item_set[i]`` when ``item_set`` is given: then the rows are
    the distinct category sets and each item names its set (a catalog of millions of
    items has a few thousand distinct sets)."""

    names: tuple[str, ...]
    indptr: npt.NDArray[np.integer]
    indices: npt.NDArray[np.integer]
    item_set: npt.NDArray[np.integer] | None = None

    def rows(self, items: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
        """The CSR rows of ``items``."""
        return items if self.item_set is None else self.item_set[items]


class CategoryLists(Sequence[tuple[str, ...]]):
    """A read-only sequence of per-item category tuples over a :class:`CategoryTable`,
    decoded one item at a time (a bundle of millions of items never builds them all)."""

    __slots__ = ("table",)

    def __init__(self, table: CategoryTable) -> None:
        self.table = table

    def __len__(self) -> int:
        if self.table.item_set is not None:
            return int(self.table.item_set.shape[0])
        return int(self.table.indptr.shape[0]) - 1

    @overload
    def __getitem__(self, index: int) -> tuple[str, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, ...]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, ...] | list[tuple[str, ...]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"item {index} of {n}")
        t = self.table
        r = i if t.item_set is None else int(t.item_set[i])
        lo, hi = int(t.indptr[r]), int(t.indptr[r + 1])
        return tuple(t.names[j] for j in t.indices[lo:hi].tolist())


@dataclass(frozen=True, slots=True, eq=False)
class Catalog:
    """Everything a device needs to recommend, with no user's data in it.

    ``item_ids``, ``titles`` and ``categories`` are sequences: tuples when built in memory
    or read from a format 1 bundle, tables decoded item by item when read from format 2
    (see :mod:`ondevice._bundle2`). ``popularity_order`` (the most popular item
    indices, descending, ties by index: the whole ranking or its head, at most
    :data:`ondevice._bundle2.POPULAR_PREFIX` items) and ``category_table``
    (``categories`` in CSR form) are precomputed by format 2 bundles; the runtime
    computes them otherwise.

    **Compact arrays.** When ``item_factor_scales`` is set, ``item_factors`` holds int8
    codes and row ``i`` stands for ``codes[i] * scales[i]``; when ``nbr_weight_table`` is
    set, ``nbr_weights`` holds one-byte codes into that table. A format 2 bundle keeps
    them that way when they are large (:data:`DECODE_LIMIT`), to hold a quarter of the
    memory; read factors and weights through :meth:`factor_rows`, :meth:`factor_scores`,
    :meth:`weights_at` and :meth:`neighbours_of`, which work for both forms.

    **Encoded neighbour lists.** A large format 2 bundle keeps its neighbour lists as
    bit-packed rows (``nbr_store``, :class:`ondevice._codecs.PackedNeighbourStore`, codes into
    ``nbr_weight_table``), decoded per request for the items asked; the CSR fields are
    then empty (``nbr_indptr`` all zeros). Read neighbours through
    :meth:`gather_neighbours`, :meth:`neighbours_of` or :meth:`neighbours_csr`, which
    work for every form.

    **Approximate top-k.** ``ann`` is an :class:`ondevice.ann.IvfIndex` when the bundle
    was written with one (large catalogs): the items are then stored in cluster order
    and the ``individual`` level scores only the clusters the index probes.
    """

    item_ids: Sequence[str]
    titles: Sequence[str]
    popularity: FloatArray
    nbr_indptr: Int64Array
    nbr_indices: IntArray
    nbr_weights: FloatArray
    segments: tuple[Segment, ...] = ()
    segment_rules: tuple[SegmentRule, ...] = ()
    default_segment: int = 0
    categories: Sequence[tuple[str, ...]] | None = None
    item_factors: FloatArray | None = None
    gram: FloatArray | None = None
    als: AlsParams | None = None
    name: str = "catalog"
    created_at: float = 0.0
    extra: Mapping[str, str] = field(default_factory=dict)
    popularity_order: IntArray | None = None
    category_table: CategoryTable | None = None
    item_factor_scales: FloatArray | None = None
    nbr_weight_table: FloatArray | None = None
    ann: IvfIndex | None = None
    nbr_store: PackedNeighbourStore | None = None

    @property
    def n_items(self) -> int:
        """How many items the catalog holds."""
        return len(self.item_ids)

    def neighbours_of(self, index: int) -> tuple[IntArray, FloatArray]:
        """The top-N neighbours of item ``index`` and their similarities."""
        _, targets, weights = self.gather_neighbours(np.array([index], dtype=np.int64))
        return targets.astype(np.int32), weights

    def gather_neighbours(
        self, items: npt.NDArray[np.integer]
    ) -> tuple[Int64Array, Int64Array, FloatArray]:
        """``(owner, targets, weights)``: the neighbour lists of ``items`` (valid item
        indices), concatenated in request order, each in its stored order (weight
        descending); ``owner[j]`` is the position in ``items`` of entry ``j``'s row.

        Raises :class:`~ondevice.errors.BundleError` if an encoded row is corrupt (a
        signed bundle whose publisher wrote nonsense)."""
        win = np.asarray(items, dtype=np.int64)
        store = self.nbr_store
        if store is not None:
            assert self.nbr_weight_table is not None
            try:
                owner, targets, codes = store.gather(win)
            except ValueError as exc:
                raise BundleError(f"the catalog's neighbour lists are corrupt: {exc}") from None
            weights: FloatArray = self.nbr_weight_table[codes]
            return owner, targets, weights
        starts = self.nbr_indptr[win]
        lens = self.nbr_indptr[win + 1] - starts
        total = int(lens.sum())
        run_start = np.cumsum(lens) - lens
        offs = np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)
        owner = np.repeat(np.arange(win.size, dtype=np.int64), lens)
        return owner, self.nbr_indices[offs].astype(np.int64), self.weights_at(offs)

    def neighbours_csr(self) -> tuple[Int64Array, IntArray, FloatArray]:
        """The whole neighbour graph as CSR ``(indptr, indices, weights)`` with float32
        weights (decoded when the catalog holds codes or encoded rows)."""
        if self.nbr_store is None:
            return self.nbr_indptr, self.nbr_indices.astype(np.int32), self.decoded_weights()
        owner, targets, weights = self.gather_neighbours(np.arange(self.n_items))
        indptr = np.zeros(self.n_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=self.n_items), out=indptr[1:])
        return indptr, targets.astype(np.int32), weights

    def weights_at(self, offsets: npt.NDArray[np.integer]) -> FloatArray:
        """The neighbour weights at positions ``offsets`` of the neighbour arrays."""
        picked: FloatArray
        if self.nbr_weight_table is None:
            picked = self.nbr_weights[offsets]
        else:
            picked = self.nbr_weight_table[self.nbr_weights[offsets]]
        return picked

    def factor_rows(self, items: npt.NDArray[np.integer]) -> FloatArray:
        """The (dequantized) factor rows of ``items``: ``float32[len(items), f]``."""
        assert self.item_factors is not None
        rows: FloatArray = self.item_factors[items]
        if self.item_factor_scales is None:
            return rows
        out: FloatArray = rows.astype(np.float32)
        out *= self.item_factor_scales[items][..., None]
        return out

    def scores_of(
        self, items: npt.NDArray[np.integer] | ItemRuns, x: npt.NDArray[np.floating]
    ) -> FloatArray:
        """``Y[items] @ x`` (a fresh ``float32[len(items)]``, in the order of ``items``),
        computed in numpy's own single-threaded loop: on one request's rows, waking BLAS
        threads on a busy laptop costs more than the product
        (``benchmarks/bench_scale.py``). :class:`ItemRuns` (the items of an index's probe)
        are scored as contiguous rows, converted in cache-sized blocks, never gathered."""
        v = np.asarray(x, dtype=np.float32)
        if isinstance(items, ItemRuns):
            out: FloatArray = np.empty(items.size, dtype=np.float32)
            block = self._score_block(int((items.ends - items.starts).max(initial=0)))
            pos = 0
            for lo, hi in zip(items.starts.tolist(), items.ends.tolist(), strict=True):
                self._score_rows(lo, hi, v, out[pos : pos + hi - lo], block)
                pos += hi - lo
            return out
        assert self.item_factors is not None
        idx = np.asarray(items)
        rows = self.item_factors[idx]
        out = np.einsum("ij,j->i", rows.astype(np.float32, copy=False), v)
        if self.item_factor_scales is not None:  # as _score_rows: scales on the products
            out *= self.item_factor_scales[idx]
        return out

    def factor_scores(self, x: npt.NDArray[np.floating]) -> FloatArray:
        """``Y @ x`` for every item (a fresh ``float32[n]``); int8 factors are scored in
        blocks of :data:`SCORE_BLOCK` rows, never dequantized whole."""
        assert self.item_factors is not None
        v = np.asarray(x, dtype=np.float32)
        if self.item_factor_scales is None:
            out: FloatArray = self.item_factors @ v
            return out
        out = np.empty(self.n_items, dtype=np.float32)
        self._score_rows(0, self.n_items, v, out, self._score_block(self.n_items))
        return out

    def _score_block(self, rows: int) -> FloatArray | None:
        """Scratch for :meth:`_score_rows` (``None`` when the factors are float32)."""
        if self.item_factor_scales is None or self.item_factors is None:
            return None
        return np.empty((min(rows, SCORE_BLOCK), self.item_factors.shape[1]), np.float32)

    def _score_rows(
        self, lo: int, hi: int, v: FloatArray, out: FloatArray, block: FloatArray | None
    ) -> None:
        """``out[:] = Y[lo:hi] @ v``; int8 codes go through ``block`` (cache-sized float32
        scratch) a block of rows at a time, the row scales applied to the products."""
        y, scales = self.item_factors, self.item_factor_scales
        assert y is not None
        if scales is None or block is None:
            np.einsum("ij,j->i", y[lo:hi], v, out=out)
            return
        for a in range(lo, hi, SCORE_BLOCK):
            b = min(a + SCORE_BLOCK, hi)
            np.copyto(block[: b - a], y[a:b], casting="unsafe")
            np.einsum("ij,j->i", block[: b - a], v, out=out[a - lo : b - lo])
        out *= scales[lo:hi]

    def decoded_factors(self) -> FloatArray | None:
        """The item factors as one float32 matrix (a copy when they are int8 codes)."""
        if self.item_factors is None or self.item_factor_scales is None:
            return self.item_factors
        return self.factor_rows(np.arange(self.n_items))

    def decoded_weights(self) -> FloatArray:
        """The neighbour weights as float32 (a copy when they are codes)."""
        if self.nbr_weight_table is None:
            return self.nbr_weights
        out: FloatArray = self.nbr_weight_table[self.nbr_weights]
        return out
