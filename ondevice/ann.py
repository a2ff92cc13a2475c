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
(``benchmarks/bench_ann_select.py``), against a 150 MB budget for the whole bundle; the
inverted file needs no copy (the bundle's int8 factors *are* the index, reordered) and
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

__all__ = ["IvfIndex"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


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

    def candidates(self, clusters: I64) -> I64:
        """Every item of ``clusters`` (increasing cluster ids give increasing items)."""
        starts = self.offsets[clusters]
        lens = self.offsets[clusters + 1] - starts
        total = int(lens.sum())
        run_start = np.cumsum(lens) - lens
        out: I64 = np.repeat(starts - run_start, lens) + np.arange(total, dtype=np.int64)
        return out
