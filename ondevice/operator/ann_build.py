"""Building the inverted-file index (:class:`ondevice.ann.IvfIndex`) of a bundle.

:func:`build_ivf` clusters the item factors by k-means (L2, on a sample, then every item
assigned to its nearest centroid), reorders the whole catalog so each cluster's items are
contiguous (:func:`permute_catalog`), and picks ``nprobe``: the smallest number of
probed clusters whose recall@10 against the exact top 10 reaches ``target_recall`` on
calibration queries built from the catalog itself (:func:`calibration_queries`). Recall
is measured on the int8 factors the device will score with, so it is the loss of the
index alone, not of the quantization.

:func:`ondevice.operator.bundle_writer.write_bundle` calls it for catalogs of at least
:data:`AUTO_MIN_ITEMS` items (``ann="auto"``) or when asked (``ann=<clusters>``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from .. import _bundle2
from ..ann import IvfIndex
from ..catalog import Catalog, Segment
from ..errors import BundleError

__all__ = [
    "AUTO_MIN_ITEMS",
    "DEFAULT_TARGET_RECALL",
    "build_ivf",
    "calibration_queries",
    "default_clusters",
    "exact_top",
    "permute_catalog",
    "recall_at",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

AUTO_MIN_ITEMS = 1 << 17
"""``ann="auto"`` builds an index from this many items (131,072) up: the size above which
a format 2 catalog keeps its factors as int8 in memory and exact scoring goes through
them in blocks. Measured by ``benchmarks/bench_ann.py`` on a busy two-core machine:
exact p50 6.8 ms at 100k items (within budget, and exact), 24.4 ms at 250k, where the
index answers in 6.3 ms with recall@10 0.976."""
DEFAULT_TARGET_RECALL = 0.97
"""Recall@10 the chosen ``nprobe`` must reach on the calibration queries (a margin over
the 0.95 the SDK promises, for users unlike the calibration queries)."""
_NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_SAMPLE_PER_CLUSTER = 64
_ITERATIONS = 12
_CHUNK = 1 << 16


MAX_CLUSTERS = 4096
"""The most clusters :func:`default_clusters` picks: k-means and the assignment of every
item cost ``n x clusters`` products (minutes at 10M items and 4,096 clusters)."""


def default_clusters(n_items: int) -> int:
    """About ``4 sqrt(n)`` clusters, a power of two, at most :data:`MAX_CLUSTERS` (1,024
    at 100k items, 4,096 from 1M). Small clusters pay: at 1M items, 4,096 clusters reach
    recall@10 0.973 scoring 7,700 items a request, 1,024 clusters need 25,000 for 0.965
    (measured on the benchmark catalog of ``benchmarks/bench_scale.py``)."""
    c = 2 ** round(math.log2(max(16.0, 4.0 * math.sqrt(max(n_items, 1)))))
    return int(min(c, MAX_CLUSTERS))


def _assign(y: F32, centroids: F32) -> npt.NDArray[np.int32]:
    """The nearest centroid (L2) of every row, in blocks of rows."""
    cn = np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty(y.shape[0], dtype=np.int32)
    for lo in range(0, y.shape[0], _CHUNK):
        d = y[lo : lo + _CHUNK] @ centroids.T
        d *= -2.0
        d += cn
        out[lo : lo + _CHUNK] = d.argmin(axis=1)
    return out


def _kmeans(x: F32, k: int, rng: np.random.Generator) -> F32:
    """Lloyd's k-means (L2) from ``k`` distinct random rows; an empty cluster is
    re-seeded with a random row."""
    c: F32 = x[rng.choice(x.shape[0], size=k, replace=False)].astype(np.float32)
    for _ in range(_ITERATIONS):
        lab = _assign(x, c)
        counts = np.bincount(lab, minlength=k)
        sums = np.zeros((k, x.shape[1]), dtype=np.float64)
        np.add.at(sums, lab, x)
        c = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        empty = counts == 0
        if empty.any():
            c[empty] = x[rng.choice(x.shape[0], size=int(empty.sum()), replace=False)]
    return c


def _related_first(centroids: F32, rng: np.random.Generator) -> I64:
    """An order of the clusters that puts related ones side by side: the centroids are
    grouped by k-means into about ``sqrt(C)`` groups and listed group by group. Items are
    stored cluster by cluster in this order, so an item's neighbours from related clusters
    sit close to it too (their delta-coded indices take fewer bytes: 10% fewer at 1M)."""
    c = centroids.shape[0]
    groups = math.isqrt(c)
    if groups < 2:
        return np.arange(c, dtype=np.int64)
    group = _assign(centroids, _kmeans(centroids, groups, rng))
    out: I64 = np.lexsort((np.arange(c), group)).astype(np.int64)
    return out


def exact_top(y: F32, queries: F32, k: int) -> I64:
    """The exact top ``k`` items of every query by inner product (``int64[q, k]``, best
    first, ties by lower index), scanning ``y`` in blocks."""
    k = min(k, y.shape[0])
    best_s = np.zeros((queries.shape[0], 0), dtype=np.float32)
    best_i = np.zeros((queries.shape[0], 0), dtype=np.int64)
    qt = np.ascontiguousarray(queries.T, dtype=np.float32)
    for lo in range(0, y.shape[0], _CHUNK):
        s = np.ascontiguousarray((y[lo : lo + _CHUNK] @ qt).T)  # [q, block]
        m = min(k, s.shape[1])
        part = np.sort(np.argpartition(-s, m - 1, axis=1)[:, :m], axis=1)
        all_s = np.concatenate((best_s, np.take_along_axis(s, part, axis=1)), axis=1)
        all_i = np.concatenate((best_i, part + lo), axis=1)
        # ties: earlier columns hold lower indices, and the sort is stable
        keep = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(all_s, keep, axis=1)
        best_i = np.take_along_axis(all_i, keep, axis=1)
    return best_i


def calibration_queries(
    y: F32,
    nbr_indptr: npt.NDArray[np.integer],
    nbr_indices: npt.NDArray[np.integer],
    popularity: F32,
    n_queries: int,
    seed: int,
) -> F32:
    """User-like vectors made from the catalog itself: the sum of the factors of a seed
    item and its first 9 neighbours (a window of related items, as a fold-in sees it);
    every third query adds a second seed's neighbourhood (a user with two tastes). Seeds
    are drawn half uniformly, half in proportion to popularity; zero vectors (items
    nobody touched) are skipped."""
    n = y.shape[0]
    rng = np.random.default_rng(seed)
    weights = np.maximum(popularity.astype(np.float64), 0.0)
    p = weights / weights.sum() if weights.sum() > 0 else None
    out: list[F32] = []
    for attempt in range(n_queries * 4):
        if len(out) == n_queries:
            break
        seeds = 2 if attempt % 3 == 2 else 1
        v = np.zeros(y.shape[1], dtype=np.float32)
        for _ in range(seeds):
            i = int(rng.integers(n)) if (p is None or rng.random() < 0.5) else int(
                rng.choice(n, p=p)
            )
            lo, hi = int(nbr_indptr[i]), int(nbr_indptr[i + 1])
            items = np.concatenate(([i], np.asarray(nbr_indices[lo : min(hi, lo + 9)])))
            v += y[items.astype(np.int64)].sum(axis=0)
        if float(np.abs(v).max()) > 0:
            out.append(v)
    return np.stack(out) if out else np.zeros((0, y.shape[1]), dtype=np.float32)


def recall_at(index: IvfIndex, y: F32, queries: F32, truth: I64, k: int = 10) -> float:
    """Mean recall@k of the index's top ``k`` (after scoring the probed clusters'
    items exactly) against ``truth``."""
    if queries.shape[0] == 0:
        return 1.0
    hits = 0
    for q, want in zip(queries, truth[:, :k], strict=True):
        cand = index.candidates(index.probe(q, k)).items()
        s = y[cand] @ q
        m = min(k, cand.size)
        part = np.argpartition(-s, m - 1)[:m] if m < cand.size else np.arange(cand.size)
        top = cand[part]  # the set of the top k is what recall counts
        hits += int(np.isin(want, top).sum())
    return float(hits / (queries.shape[0] * min(k, truth.shape[1])))


def _reorder(
    categories: Sequence[tuple[str, ...]], order: npt.NDArray[np.integer]
) -> tuple[tuple[str, ...], ...]:
    listed = list(categories)  # a CategoryLists decodes each item once, here
    return tuple(listed[i] for i in order.tolist())


def permute_catalog(catalog: Catalog, order: npt.NDArray[np.integer]) -> Catalog:
    """The same catalog with its items in ``order`` (new item ``r`` is old item
    ``order[r]``): every per-item array, string, neighbour list and segment list moves
    with its items; the Gram matrix does not change. Ids stay the items' identity."""
    n = catalog.n_items
    order = np.asarray(order, dtype=np.int64)
    if not _bundle2.is_permutation(order, n):
        raise BundleError("order must be a permutation of the items")
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n, dtype=np.int64)
    ids, titles = list(catalog.item_ids), list(catalog.titles)
    old_indptr, old_indices, weights = catalog.neighbours_csr()
    lens = np.diff(old_indptr)[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    new_indices = np.empty(int(indptr[-1]), dtype=np.int32)
    new_weights = np.empty(int(indptr[-1]), dtype=np.float32)
    for lo in range(0, n, 1 << 20):  # rows at a time: bounded scratch at 10M items
        hi = min(n, lo + (1 << 20))
        a, b = int(indptr[lo]), int(indptr[hi])
        starts = old_indptr[order[lo:hi]]
        offs = np.repeat(starts - (indptr[lo:hi] - a), lens[lo:hi]) + np.arange(
            a, b, dtype=np.int64
        ) - a
        new_indices[a:b] = inverse[np.asarray(old_indices[offs], dtype=np.int64)]
        new_weights[a:b] = weights[offs]
    categories = catalog.categories
    factors = catalog.decoded_factors()
    return replace(
        catalog,
        item_ids=[ids[i] for i in order.tolist()],
        titles=[titles[i] for i in order.tolist()],
        categories=None if categories is None else _reorder(categories, order),
        popularity=np.asarray(catalog.popularity, dtype=np.float32)[order],
        nbr_indptr=indptr,
        nbr_indices=new_indices,
        nbr_weights=new_weights,
        nbr_weight_table=None,
        nbr_store=None,
        item_factors=None if factors is None else np.ascontiguousarray(factors[order]),
        item_factor_scales=None,
        popularity_order=None,
        category_table=None,
        segments=tuple(
            Segment(
                id=s.id,
                name=s.name,
                panel_users=s.panel_users,
                top_items=inverse[s.top_items.astype(np.int64)].astype(np.int32),
                centroid=s.centroid,
            )
            for s in catalog.segments
        ),
        ann=None,
    )


def build_ivf(
    catalog: Catalog,
    *,
    clusters: int | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    queries: int = 200,
    seed: int = 0,
) -> Catalog:
    """``catalog`` reordered into clusters, with an :class:`IvfIndex` in ``ann``.

    ``clusters``: how many (default :func:`default_clusters`; at most the number of
    items). Raises :class:`BundleError` if the catalog has no item factors."""
    factors = catalog.decoded_factors()
    if factors is None:
        raise BundleError("an approximate index needs item factors")
    n = catalog.n_items
    c = min(clusters or default_clusters(n), n)
    if c < 1:
        raise BundleError("an approximate index needs at least one item and one cluster")
    if not 0.0 < target_recall <= 1.0:
        raise BundleError("target_recall must be in (0, 1]")
    rng = np.random.default_rng(seed)
    y = np.ascontiguousarray(factors, dtype=np.float32)
    sample_size = min(n, _SAMPLE_PER_CLUSTER * c)
    sample = y[np.sort(rng.choice(n, size=sample_size, replace=False))]
    centroids = _kmeans(sample, c, rng)
    centroids = centroids[_related_first(centroids, rng)]
    labels = _assign(y, centroids)
    order = np.argsort(labels, kind="stable")
    offsets = np.searchsorted(labels[order], np.arange(c + 1)).astype(np.int64)
    out = permute_catalog(catalog, order)
    assert out.item_factors is not None
    # recall on what the device scores: the int8 factors, dequantized
    q8, scales = _bundle2.quantize_rows(out.item_factors)
    yq = _bundle2.dequantize_rows(q8, scales)
    qs = calibration_queries(yq, out.nbr_indptr, out.nbr_indices, out.popularity, queries, seed)
    truth = exact_top(yq, qs, 10)
    index = IvfIndex(centroids=centroids, offsets=offsets, nprobe=c, recall=1.0)
    for step in (*(s for s in _NPROBE_STEPS if s < c), c):
        trial = replace(index, nprobe=step)
        got = recall_at(trial, yq, qs, truth)
        if got >= target_recall or step == c:
            index = replace(trial, recall=got)
            break
    sizes = np.diff(offsets)
    log.info(
        "approximate index: %d clusters (sizes %d..%d, median %d), nprobe %d, recall@10 %.3f",
        c,
        int(sizes.min()),
        int(sizes.max()),
        int(np.median(sizes)),
        index.nprobe,
        index.recall,
    )
    return replace(out, ann=index)
