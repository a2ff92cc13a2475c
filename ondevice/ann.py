"""Approximate top-k for catalogs of millions of items: an inverted file (IVF).

Scoring every item against a user vector costs ``n x f`` multiply-adds per request:
at 1M items of 64 int8 factors that is a 64 MB pass over memory (tens to hundreds of
milliseconds on a laptop core). A bundle written with an index stores its items **in
cluster order**: k-means in factor space splits them into ``C`` clusters, cluster ``j``
holds the items ``offsets[j]:offsets[j + 1]`` and has the centroid ``centroids[j]``. A
request scores the ``C`` centroids, then only the items of the ``nprobe`` best clusters
(contiguous rows of the factor matrix, read in place).

Why an inverted file written here and not a graph index from a library: at 1M items the
HNSW libraries that can be restored from bytes (``usearch``, ``voyager``) need their own
copy of the vectors plus a graph, 218 to 345 MB at settings that reach recall 0.95
(``benchmarks/bench_ann_select.py``), against a 150 MB budget for the whole bundle;
faiss's inverted file has this one's recall with the same clusters but also keeps its own
copy of the vectors and an int64 id per item (73 MB at the smallest, 8-bit codes); the
inverted file here needs no copy (the bundle's int8 factors *are* the index, reordered) and
adds ``C x f`` floats plus ``C + 1`` offsets (1 MB at 1M items), restored as two array
views of verified bytes. At 1M items with 4,096 clusters a request scores about 2% of
the items for recall@10 0.97 (``docs/scale.md``).

``nprobe`` is chosen by the writer (:func:`ondevice.operator.ann_build.build_ivf`): the
smallest value whose recall@10 against the exact top 10 reaches a target (0.97 by
default) on queries made from the catalog's own neighbourhoods; the measured recall is
stored with it (:attr:`IvfIndex.recall`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["ItemRuns", "IvfIndex"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class ItemRuns:
    """A set of items held as runs of consecutive item indices: run ``r`` is the items
    ``starts[r]:ends[r]``, the runs increasing and disjoint. The items of a probe are a
    few hundred such runs (adjacent probed clusters merged), so they are scored as
    contiguous rows of the factor matrix, read in place, and never listed one by one
    (at 10M items a probe holds about a million of them).

    A *position* counts items across the runs in order: position 0 is ``starts[0]``,
    position ``ends[0] - starts[0]`` is ``starts[1]``, and so on.
    """

    starts: I64
    ends: I64

    @classmethod
    def of_items(cls, items: npt.NDArray[np.integer]) -> ItemRuns:
        """The runs of ``items``, increasing item indices (as :meth:`items` returns)."""
        idx = np.asarray(items, dtype=np.int64).ravel()
        if idx.size and not bool((np.diff(idx) > 0).all()):
            raise ValueError("items must be strictly increasing")
        if idx.size == 0:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        first = np.concatenate(([0], breaks))
        last = np.concatenate((breaks - 1, [idx.size - 1]))
        return cls(idx[first], idx[last] + 1)

    @property
    def size(self) -> int:
        """How many items the runs hold."""
        return int((self.ends - self.starts).sum())

    def _firsts(self) -> I64:
        """The position of every run's first item."""
        lens = self.ends - self.starts
        out: I64 = np.cumsum(lens) - lens
        return out

    def items(self) -> I64:
        """Every item, increasing (``int64[size]``)."""
        lens = self.ends - self.starts
        out: I64 = np.repeat(self.starts - self._firsts(), lens) + np.arange(
            int(lens.sum()), dtype=np.int64
        )
        return out

    def items_at(self, positions: npt.NDArray[np.integer]) -> I64:
        """The items at ``positions`` (each in ``[0, size)``)."""
        pos = np.asarray(positions, dtype=np.int64)
        firsts = self._firsts()
        run = np.searchsorted(firsts, pos, side="right") - 1
        out: I64 = self.starts[run] + (pos - firsts[run])
        return out

    def positions_of(self, items: npt.NDArray[np.integer]) -> I64:
        """The positions of those of ``items`` the runs hold (others are left out)."""
        idx = np.asarray(items, dtype=np.int64).ravel()
        run = np.searchsorted(self.starts, idx, side="right") - 1
        inside = run >= 0
        inside[inside] = idx[inside] < self.ends[run[inside]]
        out: I64 = self._firsts()[run[inside]] + (idx[inside] - self.starts[run[inside]])
        return out


@dataclass(frozen=True, slots=True, eq=False)
class IvfIndex:
    """An inverted file over a catalog whose items are stored in cluster order.

    ``centroids``: ``float32[C, f]``; ``offsets``: ``int64[C + 1]``, from 0 to
    ``n_items``, non-decreasing (cluster ``j`` is the item range
    ``offsets[j]:offsets[j + 1]``); ``nprobe``: clusters scored per request, between 1
    and ``C``; ``recall``: the recall@10 the writer measured at that ``nprobe`` (for
    reports; the device does not use it).
    """

    centroids: F32
    offsets: I64
    nprobe: int
    recall: float

    @property
    def n_clusters(self) -> int:
        """How many clusters the index has."""
        return int(self.centroids.shape[0])

    def probe(self, x: npt.NDArray[np.floating], want: int) -> I64:
        """The clusters to score for user vector ``x``, in increasing order: the
        ``nprobe`` clusters whose centroids score highest, then further ones, best first,
        until together they hold at least ``want`` items (all clusters if the catalog is
        smaller)."""
        c = self.n_clusters
        scores = np.einsum("ij,j->i", self.centroids, np.asarray(x, dtype=np.float32))
        sizes = np.diff(self.offsets)
        m = min(self.nprobe, c)
        best = np.argpartition(-scores, m - 1)[:m] if m < c else np.arange(c)
        if int(sizes[best].sum()) < want and m < c:
            # few candidates (tiny clusters or many exclusions): widen, best first
            ranked = np.lexsort((np.arange(c), -scores.astype(np.float64)))
            cum = np.cumsum(sizes[ranked])
            m = int(np.searchsorted(cum, want)) + 1
            best = ranked[: min(m, c)]
        out: I64 = np.sort(best).astype(np.int64)
        return out

    def candidates(self, clusters: I64) -> ItemRuns:
        """The items of ``clusters`` (increasing cluster ids), as runs: adjacent clusters'
        item ranges are merged, and empty clusters are left out."""
        starts = self.offsets[clusters]
        ends = self.offsets[clusters + 1]
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        if starts.size == 0:
            return ItemRuns(starts.astype(np.int64), ends.astype(np.int64))
        joined = np.flatnonzero(starts[1:] == ends[:-1]) + 1  # run continues the previous
        new = np.ones(starts.size, dtype=bool)
        new[joined] = False
        first = np.flatnonzero(new)
        last = np.concatenate((first[1:] - 1, [starts.size - 1]))
        return ItemRuns(starts[first].astype(np.int64), ends[last].astype(np.int64))
