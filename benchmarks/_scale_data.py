"""Synthetic catalogs of millions of items for ``bench_scale.py`` (not part of the package).

The structure is that of a real shop's catalog after the operator's build, because what
a bundle compresses to and how approximate search behaves depend on it:

- **clusters**: ``n / 1000`` clusters (at least 8, at most 4096) of uneven, Zipf-like
  sizes (share ~ ``rank ** -0.6`` plus a floor: the largest is 15x the smallest at 100k
  items, 60x at 1M, 140x at 10M; none under ~400 items), grouped into ``sqrt(C)`` topics: a
  cluster's centre is its topic's direction plus noise, so clusters of one topic are
  related. Cluster labels are scattered over the item indices (a catalog is ordered by
  insertion, not by taste).
- **popularity**: Zipf, ``popularity = 1e6 * rank ** -0.9`` over a random ranking.
- **item factors** ``float32[n, 64]``: direction = cluster centre + per-cluster spread of
  Gaussian noise + a shared "popular" direction for the most popular items, norm =
  ``0.15 * (popularity / median) ** 0.2`` times log-normal noise (implicit ALS gives
  popular items larger factors: the head's norms are ~10x the tail's at 1M items).
  ``gram = Y.T @ Y`` accumulated in float64, stored as float32.
- **neighbours**: 20 per item (as the 1M measurement of ``bench_engine_recommend.py``),
  most from the item's own cluster and 1-4 from related clusters (the nearest cluster
  centres), candidates drawn with a bias to the popular (popular items sit in many
  lists, as in real item-item graphs); the weight is the cosine of the two items'
  factors plus co-occurrence noise, clipped to ``[0.001, 1]``, sorted descending.
- **ids**: ``"sku-"`` + base36 of a shuffled number (1-7 digits); **titles**: a brand of
  the item's cluster, 0-10 descriptors and a noun, 10-60 characters, about one in seven
  with non-ASCII letters (Latin accents, Greek, CJK); **categories**: 1-3 of 50 per
  item (the cluster's main one, often its second, sometimes a random one).
- **segments**: 10 behaviour segments (groups of clusters), each with a unit centroid
  in factor space and its 200 most popular items; one rule over the signal ``plan``
  (declared by ``ondevice.sample.sample_policy``).

Everything is vectorised and generated in chunks (factors and strings in chunks of
2**16 rows, neighbours of 2**13, scratch buffers reused: fresh memory is slow to touch
in a VM), so 10M items need about 4.5 GB for the arrays plus the Python strings, and the
time goes to gathering neighbour factors and to ``write_bundle``. Each chunk has its own
seeded generator: the same ``(n, seed)`` always gives the same catalog. (Run through
``bench_scale.py``, the generator gets one BLAS thread: on two shared cores a second one
only waits.)

:func:`ensure_bundle` writes the bundle once into a cache directory, keyed by size, seed,
generator version and a digest of the bundle reader and writer sources (a format change
in ``ondevice`` invalidates the cache), with a JSON sidecar holding the public key, a few
sample users' windows and the generation times. Run as a script it does only that::

    .venv/bin/python benchmarks/_scale_data.py --items 1000000 [--seed 0] [--cache DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ondevice.catalog import AlsParams, Catalog, Segment, SegmentRule
from ondevice.operator.bundle_writer import (
    public_key_bytes,
    signing_key_from_bytes,
    write_bundle,
)

GEN_VERSION = 2
"""Bump when the generator's output changes (part of the cache key)."""
FACTORS = 64
NEIGHBOURS = 20
N_SEGMENTS = 10
SEGMENT_TOP = 200
MAX_CLUSTERS = 4096
ROW_CHUNK = 1 << 16
NBR_CHUNK = 1 << 13
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "ondevice-bench-scale"

_OWN_CANDIDATES = 30
_REL_CANDIDATES = 6
_RELATED = 8
_GAMMA = 2.0  # candidate position = size * u ** gamma: biased to the cluster's popular

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

CATEGORIES: tuple[str, ...] = (
    "Kitchen", "Garden", "Books", "Music", "Film", "Games", "Toys", "Baby", "Beauty",
    "Health", "Sports", "Outdoor", "Camping", "Cycling", "Running", "Fitness", "Fashion",
    "Shoes", "Bags", "Jewellery", "Watches", "Home", "Furniture", "Lighting", "Bedding",
    "Bath", "Tools", "Hardware", "Automotive", "Electronics", "Computers", "Phones",
    "Audio", "Cameras", "Office", "Stationery", "Art", "Crafts", "Pets", "Grocery",
    "Café & Tee", "Wine", "Travel", "Luggage", "Party", "Seasonal", "Smart Home",
    "Software", "Collectibles", "Éco",
)  # fmt: skip
BRANDS: tuple[str, ...] = (
    "Acme", "Nordvik", "Müller", "Søren & Co", "Hartwell", "Bellamy", "Kestrel",
    "Ōkami", "Lumière", "Fjällräven Lab", "Castellan", "Brightwater", "Zephyr",
    "Łódź Works", "Verdant", "Halcyon", "Ironbark", "Marlowe", "Quillon", "Tidewell",
    "Crèmerie", "Oakhurst", "Pemberton", "Solano", "北辰", "Vantage", "Wrenfield",
    "Ystad", "Ελαιών", "Copperline", "Dunmore", "Evergreen",
)  # fmt: skip
NOUNS: tuple[str, ...] = (
    "mug", "kettle", "lamp", "chair", "table", "backpack", "jacket", "sneakers",
    "headphones", "speaker", "charger", "cable", "notebook", "pen set", "blanket",
    "pillow", "towel", "drill", "wrench", "tent", "sleeping bag", "bottle", "helmet",
    "gloves", "scarf", "wallet", "watch", "ring", "necklace", "puzzle", "board game",
    "novel", "cookbook", "vinyl", "blu-ray", "camera", "tripod", "keyboard", "mouse",
    "monitor", "router", "phone case", "plant pot", "shampoo", "serum", "candle",
    "Kaffeebecher", "théière", "tabouret", "cuaderno", "急須", "Τσάντα",
)  # fmt: skip
DESCRIPTORS: tuple[str, ...] = (
    "classic", "premium", "compact", "large", "small", "black", "white", "blue", "red",
    "green", "grey", "wooden", "steel", "ceramic", "organic", "cotton", "wool", "leather",
    "waterproof", "wireless", "portable", "foldable", "vintage", "modern", "deluxe",
    "limited", "edition", "set", "pack", "of", "2", "3", "4", "XL", "S", "M", "L",
    "2024", "v2", "pro", "mini", "max", "ultra", "lightweight", "heavy-duty", "kids",
    "men's", "women's", "travel", "home", "eco", "recycled", "handmade", "naïve", "crème",
    "déjà-vu", "Größe", "señorial", "über", "café", "fjörd", "édition", "smørrebrød",
    "日本製", "北欧", "限定", "Ελληνικό", "ÖKO", "½-inch", "Ø25", "№5",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Layout:
    """The catalog's global structure (everything but the per-item arrays)."""

    centres: F32  # (C, f) unit cluster centres
    weights: F64  # (C,) cluster size shares
    spread: F32  # (C,) noise norm per cluster
    related: I64  # (C, R) nearest other clusters
    topic: I64  # (C,) topic of each cluster
    category: I64  # (C, 2) main and second category of each cluster
    brands: I64  # (C, 3) brands of each cluster
    nouns: I64  # (C, 2) nouns of each cluster
    segment: I64  # (C,) behaviour segment of each cluster
    shared: F32  # (f,) the direction popular items share


@dataclass(frozen=True, slots=True)
class SampleUser:
    """A user's window, newest first: item ids, events, ages in seconds, dayparts."""

    items: tuple[str, ...]
    events: tuple[str, ...]
    ages: tuple[float, ...]
    dayparts: tuple[str, ...]
    clusters: tuple[int, ...]


def n_clusters_for(n: int) -> int:
    """About one cluster per thousand items, at least 8 and at most 4096."""
    return int(min(MAX_CLUSTERS, max(8, n // 1000)))


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, *parts])


def make_layout(n: int, seed: int, f: int = FACTORS) -> Layout:
    """Clusters, their sizes, centres, related clusters, categories, brands, segments."""
    c = n_clusters_for(n)
    rng = _rng(seed, 0)
    n_topics = max(2, round(math.sqrt(c)))
    topics = rng.standard_normal((n_topics, f))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    topic = rng.integers(0, n_topics, c)
    centres = topics[topic] + 0.8 * rng.standard_normal((c, f)) / math.sqrt(f)
    shared = rng.standard_normal(f)
    shared /= np.linalg.norm(shared)
    centres += 0.25 * shared
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = 1.0 / np.arange(1, c + 1) ** 0.6
    rng.shuffle(sizes)
    sizes += 0.03 * sizes.mean()
    weights = sizes / sizes.sum()
    spread = rng.uniform(0.55, 1.0, c)
    sim = centres @ centres.T
    np.fill_diagonal(sim, -np.inf)
    r = min(_RELATED, c - 1)
    related = np.argsort(-sim, axis=1)[:, :r]
    topic_cat = rng.integers(0, len(CATEGORIES), (n_topics, 2))
    category = topic_cat[topic].copy()
    # A quarter of the clusters take their own second category.
    own = rng.random(c) < 0.25
    category[own, 1] = rng.integers(0, len(CATEGORIES), int(own.sum()))
    same = category[:, 1] == category[:, 0]
    category[same, 1] = (category[same, 0] + 1) % len(CATEGORIES)
    plain = np.array([b.isascii() for b in BRANDS], dtype=np.float64)
    brand_p = (plain + 0.1 * (1.0 - plain)) / (plain + 0.1 * (1.0 - plain)).sum()
    brands = rng.choice(len(BRANDS), size=(c, 3), p=brand_p)
    nouns = rng.integers(0, len(NOUNS), (c, 2))
    # Segments: every cluster joins the nearest of 10 seed clusters (its own, for those).
    seeds = rng.choice(c, size=min(N_SEGMENTS, c), replace=False)
    segment = np.argmax(centres @ centres[seeds].T, axis=1)
    segment[seeds] = np.arange(len(seeds))
    return Layout(
        centres=centres.astype(np.float32),
        weights=weights,
        spread=spread.astype(np.float32),
        related=related.astype(np.int64),
        topic=topic.astype(np.int64),
        category=category.astype(np.int64),
        brands=brands.astype(np.int64),
        nouns=nouns.astype(np.int64),
        segment=segment.astype(np.int64),
        shared=shared.astype(np.float32),
    )


def make_labels(n: int, seed: int, layout: Layout) -> I64:
    """Each item's cluster, scattered over the indices."""
    labels = np.empty(n, dtype=np.int64)
    for k, a in enumerate(range(0, n, ROW_CHUNK)):
        b = min(n, a + ROW_CHUNK)
        labels[a:b] = _rng(seed, 1, k).choice(len(layout.weights), size=b - a, p=layout.weights)
    return labels


def make_popularity(n: int, seed: int) -> F32:
    """Zipf popularity over a random ranking (rank 1 is 1e6)."""
    rank = _rng(seed, 2).permutation(n).astype(np.float64) + 1.0
    return (1e6 * rank**-0.9).astype(np.float32)


def make_factors(labels: I64, popularity: F32, seed: int, layout: Layout) -> tuple[F32, F32, F64]:
    """Item factors, their norms and ``Y.T @ Y`` (float64), chunk by chunk, in place
    (fresh memory is slow to touch in a VM: scratch buffers are reused)."""
    n, f = labels.size, layout.centres.shape[1]
    y = np.empty((n, f), dtype=np.float32)
    norms = np.empty(n, dtype=np.float32)
    gram = np.zeros((f, f), dtype=np.float64)
    median = float(np.median(popularity)) if n else 1.0
    top = float(np.quantile(popularity, 0.99)) if n else 1.0
    scratch = np.empty((min(n, ROW_CHUNK), f), dtype=np.float32)
    wide = np.empty((min(n, ROW_CHUNK), f), dtype=np.float64)
    for k, a in enumerate(range(0, n, ROW_CHUNK)):
        b = min(n, a + ROW_CHUNK)
        m = b - a
        rng = _rng(seed, 3, k)
        lab = labels[a:b]
        pop = popularity[a:b].astype(np.float64)
        block = y[a:b]
        rng.standard_normal(out=block, dtype=np.float32)
        block *= (layout.spread[lab] / np.float32(math.sqrt(f)))[:, None]
        np.take(layout.centres, lab, axis=0, out=scratch[:m])
        block += scratch[:m]
        head = np.clip(np.log(pop / top) / 3.0 + 1.0, 0.0, 1.0).astype(np.float32)
        np.multiply((0.4 * head)[:, None], layout.shared[None, :], out=scratch[:m])
        block += scratch[:m]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        norm = 0.15 * (pop / median) ** 0.2 * np.exp(rng.normal(0.0, 0.2, m))
        block *= norm.astype(np.float32)[:, None]
        norms[a:b] = np.linalg.norm(block, axis=1)
        np.copyto(wide[:m], block)
        gram += wide[:m].T @ wide[:m]
    return y, norms, gram


def _cluster_members(labels: I64, popularity: F32, c: int) -> tuple[I64, I64, I64]:
    """Items grouped by cluster, most popular first; each cluster's start and size."""
    order = np.lexsort((-popularity, labels))
    sizes = np.bincount(labels, minlength=c).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return order.astype(np.int64), starts, sizes


def _draw(rng: np.random.Generator, clusters: I64, members: I64, starts: I64, sizes: I64) -> I64:
    """One member of each given cluster, biased to the cluster's popular items."""
    size = sizes[clusters]
    pos = np.minimum((size * rng.random(clusters.shape) ** _GAMMA).astype(np.int64), size - 1)
    return members[starts[clusters] + np.maximum(pos, 0)]


def make_neighbours(
    y: F32, norms: F32, labels: I64, popularity: F32, seed: int, layout: Layout
) -> tuple[I64, I32, F32]:
    """CSR item-item neighbours: most from the own cluster, 1-4 from related ones."""
    n = labels.size
    c = len(layout.weights)
    members, starts, sizes = _cluster_members(labels, popularity, c)
    has_related = layout.related.shape[1] > 0
    counts = np.empty(n, dtype=np.int64)
    width = _OWN_CANDIDATES + (_REL_CANDIDATES if has_related else 0)
    gathered = np.empty((min(n, NBR_CHUNK), width, y.shape[1]), dtype=np.float32)
    dots = np.empty((min(n, NBR_CHUNK), width), dtype=np.float32)
    idx_parts: list[I32] = []
    w_parts: list[F32] = []
    for k, a in enumerate(range(0, n, NBR_CHUNK)):
        b = min(n, a + NBR_CHUNK)
        m = b - a
        rng = _rng(seed, 4, k)
        lab = labels[a:b]
        own = _draw(rng, np.repeat(lab[:, None], _OWN_CANDIDATES, axis=1), members, starts, sizes)
        if has_related:
            pick = rng.integers(0, layout.related.shape[1], (m, _REL_CANDIDATES))
            rel = _draw(rng, layout.related[lab[:, None], pick], members, starts, sizes)
        else:
            rel = np.empty((m, 0), dtype=np.int64)
        cand = np.concatenate((own, rel), axis=1)
        is_own = np.zeros(cand.shape[1], dtype=np.bool_)
        is_own[:_OWN_CANDIDATES] = True
        rows = np.arange(a, b, dtype=np.int64)
        np.take(y, cand, axis=0, out=gathered[:m])
        np.einsum("mjk,mk->mj", gathered[:m], y[a:b], out=dots[:m])
        score = dots[:m] / (norms[cand] * norms[a:b, None] + np.float32(1e-12))
        score += rng.standard_normal(score.shape, dtype=np.float32) * np.float32(0.05)
        valid = cand != rows[:, None]
        order = np.argsort(cand, axis=1, kind="stable")
        sorted_cand = np.take_along_axis(cand, order, axis=1)
        dup_sorted = np.zeros_like(valid)
        dup_sorted[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        dup = np.empty_like(valid)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        valid &= ~dup
        want_rel = rng.integers(1, 5, m) if has_related else np.zeros(m, dtype=np.int64)
        own_key = np.where(valid & is_own, score, -np.inf)
        rel_key = np.where(valid & ~is_own, score, -np.inf)
        own_order = np.argsort(-own_key, axis=1)
        rel_order = np.argsort(-rel_key, axis=1)
        n_own = (valid & is_own).sum(axis=1)
        n_rel = (valid & ~is_own).sum(axis=1)
        take_rel = np.minimum(want_rel, n_rel)
        take_own = np.minimum(NEIGHBOURS - take_rel, n_own)
        take_rel = np.minimum(NEIGHBOURS - take_own, n_rel)
        own_cols = np.arange(own_order.shape[1])[None, :] < take_own[:, None]
        rel_cols = np.arange(rel_order.shape[1])[None, :] < take_rel[:, None]
        chosen_own = np.where(own_cols, own_order, -1)
        chosen_rel = np.where(rel_cols, rel_order, -1)
        chosen = np.concatenate((chosen_own, chosen_rel), axis=1)
        keep = chosen >= 0
        col = np.where(keep, chosen, 0)
        w = np.where(keep, np.take_along_axis(score, col, axis=1), -np.inf)
        by_weight = np.argsort(-w, axis=1, kind="stable")[:, :NEIGHBOURS]
        w_sorted = np.take_along_axis(w, by_weight, axis=1)
        col_sorted = np.take_along_axis(col, by_weight, axis=1)
        items = np.take_along_axis(cand, col_sorted, axis=1)
        live = np.isfinite(w_sorted)
        counts[a:b] = live.sum(axis=1)
        idx_parts.append(items[live].astype(np.int32))
        w_parts.append(np.clip(w_sorted[live], 0.001, 1.0).astype(np.float32))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(idx_parts) if idx_parts else np.empty(0, np.int32)
    weights = np.concatenate(w_parts) if w_parts else np.empty(0, np.float32)
    return indptr, indices, weights


def _strings(tokens: I64, table: Sequence[bytes]) -> list[str]:
    """Rows of token ids (``-1`` = nothing) joined into strings, at numpy speed.

    Each token is a UTF-8 byte string; the rows are concatenated with a newline after
    each, decoded once and split (no per-item Python work besides the split).
    """
    width = max(len(t) for t in table) + 1
    lookup = np.zeros((len(table) + 1, width), dtype=np.uint8)
    lengths = np.zeros(len(table) + 1, dtype=np.int64)
    for i, t in enumerate(table):
        lookup[i, : len(t)] = np.frombuffer(t, dtype=np.uint8)
        lengths[i] = len(t)
    newline = len(table)
    lookup[newline, 0] = ord("\n")
    lengths[newline] = 1
    m, w = tokens.shape
    # Put the newline right after each row's last token.
    last = (tokens >= 0).sum(axis=1)
    grid = np.full((m, w + 1), -1, dtype=np.int64)
    grid[:, :w] = tokens
    grid[np.arange(m), last] = newline
    safe = np.where(grid >= 0, grid, 0)
    nbytes = np.where(grid >= 0, lengths[safe], 0)
    data = lookup[safe]  # (m, w + 1, width)
    mask = np.arange(width)[None, None, :] < nbytes[:, :, None]
    text = data[mask].tobytes().decode("utf-8")
    out = text.split("\n")
    out.pop()
    return out


def make_item_ids(n: int, seed: int) -> list[str]:
    """``"sku-"`` + base36 of a shuffled number: unique, 1-7 digits."""
    rng = _rng(seed, 5)
    perm = rng.permutation(n).astype(np.int64)
    number = perm * 1009 + rng.integers(0, 1009, n)
    # Some old SKUs have short numbers: divide a tenth of them down (still unique:
    # the quotient keeps perm's order within each band and the bands are disjoint).
    short = rng.random(n) < 0.1
    number[short] = perm[short]
    number[~short] += n  # bands: [0, n) for short ones, [n, ...) for the rest
    table = [b"sku-", *(bytes([ch]) for ch in b"0123456789abcdefghijklmnopqrstuvwxyz")]
    out: list[str] = []
    for a in range(0, n, ROW_CHUNK):
        num = number[a : a + ROW_CHUNK].copy()
        digits = np.full((num.size, 8), -1, dtype=np.int64)
        for d in range(7, -1, -1):
            live = (num > 0) | (d == 7)
            digits[:, d] = np.where(live, num % 36 + 1, -1)
            num //= 36
        # left-align the digits after the "sku-" token
        width = (digits >= 0).sum(axis=1)
        tokens = np.full((digits.shape[0], 9), -1, dtype=np.int64)
        tokens[:, 0] = 0
        cols = np.arange(8)[None, :] < width[:, None]
        shift = np.argsort(digits < 0, axis=1, kind="stable")
        tokens[:, 1:] = np.where(cols, np.take_along_axis(digits, shift, axis=1), -1)
        out.extend(_strings(tokens, table))
    return out


def make_titles(labels: I64, seed: int, layout: Layout) -> list[str]:
    """Brand, 0-10 descriptors and a noun; 10-60 characters."""
    brands = [b.encode() for b in BRANDS]
    descs = [(" " + d).encode() for d in DESCRIPTORS]
    nouns = [(" " + d).encode() for d in NOUNS]
    table = brands + descs + nouns
    d0, n0 = len(brands), len(brands) + len(descs)
    char_len = np.array(
        [len(t.decode()) for t in table], dtype=np.int64
    )  # characters, spaces included
    max_desc = 10
    zipf = 1.0 / np.arange(1, len(DESCRIPTORS) + 1) ** 0.8
    zipf *= np.array([1.0 if d.isascii() else 0.2 for d in DESCRIPTORS])
    zipf /= zipf.sum()
    out: list[str] = []
    for k, a in enumerate(range(0, labels.size, ROW_CHUNK)):
        lab = labels[a : a + ROW_CHUNK]
        m = lab.size
        rng = _rng(seed, 6, k)
        brand = layout.brands[lab, rng.integers(0, 3, m)]
        noun = n0 + layout.nouns[lab, rng.integers(0, 2, m)]
        desc = d0 + rng.choice(len(DESCRIPTORS), size=(m, max_desc), p=zipf)
        target = rng.integers(10, 61, m)
        base = char_len[brand] + char_len[noun]
        cum = base[:, None] + np.cumsum(char_len[desc], axis=1)
        n_desc = (cum <= target[:, None]).sum(axis=1)
        # At least 10 characters: as many descriptors as it takes (rare: short names).
        n_min = np.where(base < 10, (cum < 10).sum(axis=1) + 1, 0)
        n_desc = np.maximum(n_desc, n_min)
        tokens = np.full((m, max_desc + 2), -1, dtype=np.int64)
        tokens[:, 0] = brand
        cols = np.arange(max_desc)[None, :]
        tokens[:, 1:-1] = np.where(cols < n_desc[:, None], desc, -1)
        tokens[np.arange(m), 1 + n_desc] = noun
        out.extend(_strings(tokens, table))
    return out


def make_categories(labels: I64, seed: int, layout: Layout) -> tuple[tuple[str, ...], ...]:
    """1-3 categories per item: the cluster's main one, often its second, sometimes a
    random one; the tuples are shared between items with the same set."""
    rng = _rng(seed, 7)
    n, k = labels.size, len(CATEGORIES)
    main = layout.category[labels, 0]
    second = np.where(rng.random(n) < 0.5, layout.category[labels, 1], -1)
    extra = np.where(rng.random(n) < 0.15, rng.integers(0, k, n), -1)
    extra = np.where((extra == main) | (extra == second), -1, extra)
    code = (main * (k + 1) + (second + 1)) * (k + 1) + (extra + 1)
    uniq, inverse = np.unique(code, return_inverse=True)
    sets = np.empty(uniq.size, dtype=object)
    for j, cd in enumerate(uniq.tolist()):
        e, rest = cd % (k + 1) - 1, cd // (k + 1)
        s, mn = rest % (k + 1) - 1, rest // (k + 1)
        sets[j] = tuple(CATEGORIES[x] for x in (mn, s, e) if x >= 0)
    return tuple(sets[inverse.ravel()].tolist())


def make_segments(labels: I64, popularity: F32, layout: Layout) -> tuple[Segment, ...]:
    """Behaviour segments: groups of clusters, their centroid and top items."""
    segments = []
    sizes = np.bincount(labels, minlength=len(layout.weights))
    seg_of_item = layout.segment[labels]
    total = max(int(labels.size), 1)
    for s in range(int(layout.segment.max()) + 1 if labels.size else 0):
        clusters = np.flatnonzero(layout.segment == s)
        mass = sizes[clusters].astype(np.float64)
        centroid = (mass[:, None] * layout.centres[clusters]).sum(axis=0) + 0.25 * layout.shared
        centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
        mine = np.flatnonzero(seg_of_item == s)
        top_n = min(SEGMENT_TOP, mine.size)
        best = mine[np.argpartition(-popularity[mine], top_n - 1)[:top_n]] if top_n else mine
        best = best[np.argsort(-popularity[best], kind="stable")]
        share = mine.size / total
        segments.append(
            Segment(
                id=s,
                name=f"segment {s}",
                panel_users=int(200 + 20_000 * share),
                top_items=best.astype(np.int32),
                centroid=centroid.astype(np.float32),
            )
        )
    return tuple(segments)


def sample_users(
    n_users: int,
    labels: I64,
    popularity: F32,
    item_ids: Sequence[str],
    seed: int,
    layout: Layout,
    *,
    window: int = 50,
) -> list[SampleUser]:
    """Users with ``window`` interactions from 1-2 clusters, newest first: a session of
    the last ten in the last 20 minutes, the rest over the previous two weeks."""
    c = len(layout.weights)
    members, starts, sizes = _cluster_members(labels, popularity, c)
    users = []
    for u in range(n_users):
        rng = _rng(seed, 8, u)
        k = int(rng.integers(1, 3))
        clusters = rng.choice(c, size=k, replace=False, p=layout.weights)
        share = np.array([1.0] if k == 1 else [0.7, 0.3])
        picked: list[int] = []
        seen: set[int] = set()
        while len(picked) < window:
            which = clusters[rng.choice(k, size=4 * window, p=share)]
            for item in _draw(rng, which.astype(np.int64), members, starts, sizes).tolist():
                if item not in seen and len(picked) < window:
                    seen.add(item)
                    picked.append(item)
        events = rng.choice(
            ["view", "click", "add_to_cart", "purchase", "like"],
            size=window,
            p=[0.6, 0.25, 0.08, 0.04, 0.03],
        )
        session = np.sort(rng.uniform(0, 1200, min(10, window)))
        rest = np.sort(rng.uniform(1800, 14 * 86400, window - session.size))
        dayparts = rng.choice(
            ["morning", "afternoon", "evening", "night"], size=window, p=[0.15, 0.2, 0.5, 0.15]
        )
        users.append(
            SampleUser(
                items=tuple(item_ids[i] for i in picked),
                events=tuple(str(e) for e in events),
                ages=tuple(float(t) for t in np.concatenate((session, rest))),
                dayparts=tuple(str(d) for d in dayparts),
                clusters=tuple(int(x) for x in clusters),
            )
        )
    return users


def make_catalog(
    n: int, seed: int = 0, *, n_users: int = 4, timings: dict[str, float] | None = None
) -> tuple[Catalog, list[SampleUser]]:
    """The synthetic catalog of ``n`` items and a few sample users' windows.

    ``timings``, if given, receives the seconds each phase took.
    """
    times = timings if timings is not None else {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        times[name] = now - t0
        t0 = now

    layout = make_layout(n, seed)
    labels = make_labels(n, seed, layout)
    popularity = make_popularity(n, seed)
    lap("layout, labels, popularity")
    y, norms, gram = make_factors(labels, popularity, seed, layout)
    lap("factors + gram")
    indptr, indices, weights = make_neighbours(y, norms, labels, popularity, seed, layout)
    del norms
    lap("neighbours")
    item_ids = make_item_ids(n, seed)
    titles = make_titles(labels, seed, layout)
    categories = make_categories(labels, seed, layout)
    lap("ids, titles, categories")
    segments = make_segments(labels, popularity, layout)
    users = sample_users(n_users, labels, popularity, item_ids, seed, layout)
    lap("segments, users")
    catalog = Catalog(
        item_ids=tuple(item_ids),
        titles=tuple(titles),
        popularity=popularity,
        nbr_indptr=indptr,
        nbr_indices=indices,
        nbr_weights=weights,
        segments=segments,
        segment_rules=(SegmentRule(segment=1 % max(len(segments), 1), when={"plan": ("team",)}),),
        default_segment=0,
        categories=categories,
        item_factors=y,
        gram=gram.astype(np.float32),
        als=AlsParams(factors=y.shape[1], regularization=0.05, alpha=15.0),
        name=f"bench-scale-{n}",
        created_at=1_700_000_000.0 + seed,
        extra={"generator": f"bench_scale v{GEN_VERSION}"},
    )
    del item_ids, titles
    lap("catalog")
    return catalog, users


# -- the cache -------------------------------------------------------------------------


def signing_key_bytes(seed: int) -> bytes:
    """The benchmark's signing key for ``seed`` (derived, so a cached bundle's key is
    known without storing a secret)."""
    return hashlib.sha256(b"ondevice bench_scale signing key %d" % seed).digest()


def public_key(seed: int) -> bytes:
    """The raw public key that verifies bundles written for ``seed``."""
    return public_key_bytes(signing_key_from_bytes(signing_key_bytes(seed)))


def format_digest() -> str:
    """A digest of the bundle code's sources (every ``*bundle*.py``, ``ann*.py`` and
    ``_codecs.py`` of ``ondevice`` and ``ondevice.operator``): a cached bundle is
    rewritten when any of them changes (the format may have)."""
    h = hashlib.sha256(b"gen %d" % GEN_VERSION)
    spec = importlib.util.find_spec("ondevice")
    for root in spec.submodule_search_locations or [] if spec is not None else []:
        base = Path(root)
        sources = [*base.glob("*bundle*.py"), *base.glob("ann*.py"), *base.glob("_codecs.py")]
        sources += [*base.glob("operator/*bundle*.py"), *base.glob("operator/ann*.py")]
        for path in sorted(sources):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def cache_paths(n: int, seed: int, cache: Path) -> tuple[Path, Path]:
    """The bundle file and its JSON sidecar for ``(n, seed)`` in ``cache``."""
    stem = f"scale-n{n}-s{seed}-g{GEN_VERSION}-{format_digest()}"
    return cache / f"{stem}.bundle", cache / f"{stem}.json"


def source_catalog(
    n: int,
    seed: int,
    cache: Path,
    *,
    timings: dict[str, float] | None = None,
    log: Any = None,
) -> tuple[Catalog, list[SampleUser]]:
    """The generated catalog for ``(n, seed)``, kept in ``cache`` as a full-precision
    (format 1, float32, no index) bundle whose format does not change when the compact
    format does: a change of the bundle code rewrites the measured bundle from it in
    minutes instead of generating 10M items again."""
    from ondevice.bundle import load_bundle

    stem = cache / f"source-n{n}-s{seed}-g{GEN_VERSION}"
    bundle, sidecar = stem.with_suffix(".v1bundle"), stem.with_suffix(".json")
    if bundle.exists() and sidecar.exists():
        t0 = time.perf_counter()
        catalog = load_bundle(bundle, public_key=public_key(seed))
        users = [SampleUser(**{k: tuple(v) for k, v in u.items()}) for u in
                 json.loads(sidecar.read_text("utf-8"))]
        if timings is not None:
            timings["source (cached, format 1)"] = time.perf_counter() - t0
        return catalog, users
    catalog, users = make_catalog(n, seed, timings=timings)
    write_bundle(
        catalog, bundle, private_key=signing_key_bytes(seed), format_version=1, ann="off"
    )
    tmp = sidecar.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([dataclasses.asdict(u) for u in users]), "utf-8")
    os.replace(tmp, sidecar)
    if log is not None:
        log(f"generated {n:,} items, kept as {bundle}")
    return catalog, users


def ensure_bundle(
    n: int, seed: int, cache: Path, *, regenerate: bool = False, log: Any = None
) -> dict[str, Any]:
    """Write the bundle for ``(n, seed)`` into ``cache`` unless it is there; return its
    sidecar (path, public key, sample users, generation times)."""
    cache.mkdir(parents=True, exist_ok=True)
    bundle, sidecar = cache_paths(n, seed, cache)
    if not regenerate and bundle.exists() and sidecar.exists():
        meta: dict[str, Any] = json.loads(sidecar.read_text("utf-8"))
        if meta.get("size") == bundle.stat().st_size:
            meta["cached"] = True
            return meta
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    catalog, users = source_catalog(n, seed, cache, timings=timings, log=log)
    gc.collect()
    t0 = time.perf_counter()
    info = write_bundle(catalog, bundle, private_key=signing_key_bytes(seed))
    timings["write_bundle"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    stats = _catalog_stats(catalog)
    meta = {
        "n_items": n,
        "seed": seed,
        "path": str(bundle),
        "size": bundle.stat().st_size,
        "public_key": public_key(seed).hex(),
        "sha256": info.sha256,
        "timings": timings,
        "stats": stats,
        "users": [
            {
                "items": list(u.items),
                "events": list(u.events),
                "ages": list(u.ages),
                "dayparts": list(u.dayparts),
                "clusters": list(u.clusters),
            }
            for u in users
        ],
    }
    tmp = sidecar.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, ensure_ascii=False), "utf-8")
    os.replace(tmp, sidecar)
    meta["cached"] = False
    if log is not None:
        log(f"generated {n:,} items in {timings['total']:.1f} s: {bundle}")
    return meta


def _catalog_stats(catalog: Catalog) -> dict[str, Any]:
    """Shape statistics, to check the structure is what the docstring says."""
    y = catalog.item_factors
    assert y is not None
    norms = np.linalg.norm(y[: min(len(y), 200_000)], axis=1)
    lens = np.diff(catalog.nbr_indptr)
    ids = catalog.item_ids[:100_000]
    titles = catalog.titles[:100_000]
    cats = catalog.categories[:100_000] if catalog.categories is not None else ()
    return {
        "n_clusters": n_clusters_for(catalog.n_items),
        "neighbours_per_item": [int(lens.min()), float(lens.mean()), int(lens.max())],
        "weights_min_median_max": [
            float(catalog.nbr_weights.min()),
            float(np.median(catalog.nbr_weights[:2_000_000])),
            float(catalog.nbr_weights.max()),
        ],
        "norm_p1_p50_p99_max": [float(np.quantile(norms, q)) for q in (0.01, 0.5, 0.99, 1.0)],
        "id_len_min_max": [min(map(len, ids)), max(map(len, ids))],
        "title_len_min_mean_max": [
            min(map(len, titles)),
            sum(map(len, titles)) / max(len(titles), 1),
            max(map(len, titles)),
        ],
        "titles_non_ascii": sum(not t.isascii() for t in titles) / max(len(titles), 1),
        "categories_per_item_mean": sum(map(len, cats)) / max(len(cats), 1),
        "distinct_category_sets": len(set(catalog.categories or ())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the sidecar as JSON")
    parser.add_argument(
        "--source-only", action="store_true", help="only generate the full-precision source"
    )
    args = parser.parse_args()
    if args.source_only:
        args.cache.mkdir(parents=True, exist_ok=True)
        timings: dict[str, float] = {}
        path = args.cache / f"source-n{args.items}-s{args.seed}-g{GEN_VERSION}.v1bundle"
        sidecar = path.with_suffix(".json")
        if not (path.exists() and sidecar.exists()):  # else: no need to load it here
            source_catalog(
                args.items, args.seed, args.cache, timings=timings,
                log=lambda s: print(s, file=sys.stderr),
            )
        users = [SampleUser(**{k: tuple(v) for k, v in u.items()})
                 for u in json.loads(sidecar.read_text("utf-8"))]
        source_meta = {
            "n_items": args.items,
            "seed": args.seed,
            "path": str(path),
            "size": path.stat().st_size,
            "public_key": public_key(args.seed).hex(),
            "timings": timings,
            "format_version": 1,
            "users": [dataclasses.asdict(u) for u in users],
        }
        if args.json:
            print(json.dumps(source_meta, ensure_ascii=False))
        return
    meta = ensure_bundle(
        args.items,
        args.seed,
        args.cache,
        regenerate=args.regenerate,
        log=lambda s: print(s, file=sys.stderr),
    )
    import ondevice
    import ondevice.bundle

    meta["ondevice"] = str(Path(ondevice.__file__).resolve().parent)
    meta["format_version"] = getattr(ondevice.bundle, "FORMAT_VERSION", None)
    if args.json:
        print(json.dumps(meta, ensure_ascii=False))
    else:
        print(json.dumps({k: v for k, v in meta.items() if k != "users"}, indent=1))


if __name__ == "__main__":
    main()
