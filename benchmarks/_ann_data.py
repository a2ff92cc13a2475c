"""Synthetic ALS-like item factors and user vectors for ``bench_ann_select.py``
(not part of the package).

Items: a mixture of ``n_clusters`` Gaussian clusters in ``dim`` dimensions with uneven
(Zipf-like) cluster sizes and per-cluster spreads; an item's *direction* is its cluster
centre plus Gaussian noise, its *norm* grows with its popularity (Pareto-distributed
popularity, ``norm ~ popularity ** 0.25`` times log-normal noise), so norms are
long-tailed as implicit-ALS gives popular items larger factors. Generated in chunks of
``CHUNK`` rows, each from its own seeded generator: the first million items of the
10M catalog are the 1M catalog, and memory stays at the output arrays plus one chunk.

Users: the device's own fold-in (:func:`ondevice.scoring.fold_in`, the full implicit-ALS
user step with the Gram matrix) of 20-60 interactions drawn from 1-3 clusters (chosen by
cluster size), items within a cluster drawn by popularity, plus a few random items as
noise. ``kind="sum"`` instead sums the same items' vectors and adds Gaussian noise.

Also here: the per-row symmetric int8 quantization the exact-int8 baseline and the
numpy IVF use, and the exact float32 top-k ground truth (chunked, batched).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

CHUNK = 1_000_000
DIM = 64
N_CLUSTERS = 200
SEED = 20240611


@dataclass
class Items:
    y: npt.NDArray[np.float32]  # (n, dim) float32 item factors
    labels: npt.NDArray[np.int16]  # generating cluster of each item
    popularity: npt.NDArray[np.float32]
    gram: npt.NDArray[np.float64]  # Y^T Y


def _globals(dim: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # A shared "popularity" direction, as ALS factors of popular items share one.
    shared = rng.standard_normal(dim)
    shared /= np.linalg.norm(shared)
    centres = centres + 0.3 * shared
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = 1.0 / np.arange(1, n_clusters + 1) ** 0.8
    rng.shuffle(sizes)
    weights = sizes / sizes.sum()
    spread = rng.uniform(0.45, 0.9, n_clusters)  # per-dimension noise x sqrt(dim)
    return centres, weights, spread


def make_items(n: int, *, dim: int = DIM, n_clusters: int = N_CLUSTERS, seed: int = SEED) -> Items:
    centres, weights, spread = _globals(dim, n_clusters, seed)
    y = np.empty((n, dim), dtype=np.float32)
    labels = np.empty(n, dtype=np.int16)
    pop = np.empty(n, dtype=np.float32)
    gram = np.zeros((dim, dim), dtype=np.float64)
    for c, a in enumerate(range(0, n, CHUNK)):
        b = min(n, a + CHUNK)
        m = b - a
        rng = np.random.default_rng([seed, 1, c])
        lab = rng.choice(n_clusters, size=m, p=weights)
        direction = rng.standard_normal((m, dim), dtype=np.float32)
        direction *= (spread[lab] / np.sqrt(dim)).astype(np.float32)[:, None]
        direction += centres[lab].astype(np.float32)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        p = rng.pareto(1.16, m) + 1.0  # long-tailed popularity
        norm = 0.35 * p**0.25 * np.exp(rng.normal(0.0, 0.25, m))
        direction *= norm.astype(np.float32)[:, None]
        block = direction
        y[a:b] = block
        labels[a:b] = lab
        pop[a:b] = p
        gram += block.T.astype(np.float64) @ block.astype(np.float64)
    return Items(y=y, labels=labels, popularity=pop, gram=gram)


def make_queries(
    items: Items,
    n_queries: int,
    *,
    seed: int = SEED,
    kind: str = "foldin",
    regularization: float = 2.0,
    alpha: float = 2.0,
) -> npt.NDArray[np.float32]:
    from ondevice.scoring import fold_in

    n_clusters = int(items.labels.max()) + 1
    sizes = np.bincount(items.labels, minlength=n_clusters).astype(np.float64)
    members = _members(items.labels, n_clusters)
    rng = np.random.default_rng([seed, 2])
    out = np.empty((n_queries, items.y.shape[1]), dtype=np.float32)
    n = items.y.shape[0]
    for qi in range(n_queries):
        n_c = int(rng.integers(1, 4))
        clusters = rng.choice(n_clusters, size=n_c, replace=False, p=sizes / sizes.sum())
        n_items = int(rng.integers(20, 61))
        share = rng.dirichlet(np.ones(n_c))
        picked = []
        for cl, s in zip(clusters, share, strict=True):
            mem = members[cl]
            w = items.popularity[mem].astype(np.float64)
            cnt = max(1, round(s * n_items))
            picked.append(rng.choice(mem, size=min(cnt, mem.size), replace=False, p=w / w.sum()))
        picked.append(rng.integers(0, n, size=max(1, n_items // 10)))  # off-taste noise
        idx = np.unique(np.concatenate(picked))
        if kind == "foldin":
            x = fold_in(items.y, items.gram, idx, regularization=regularization, alpha=alpha)
        elif kind == "sum":
            s = items.y[idx].astype(np.float64).sum(axis=0)
            x = s + rng.standard_normal(s.shape) * (0.3 * np.linalg.norm(s) / np.sqrt(s.size))
        else:
            raise ValueError(kind)
        out[qi] = x
    return out


def _members(labels: np.ndarray, n_clusters: int) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_clusters + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(n_clusters)]


def quantize_int8(
    y: npt.NDArray[np.float32], chunk: int = CHUNK
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Per-row symmetric int8: ``y ~= q * scale[:, None]``, ``scale = max|y_row| / 127``."""
    q = np.empty(y.shape, dtype=np.int8)
    scale = np.empty(y.shape[0], dtype=np.float32)
    for a in range(0, y.shape[0], chunk):
        b = min(y.shape[0], a + chunk)
        s = np.abs(y[a:b]).max(axis=1) / 127.0
        s[s == 0] = 1.0
        scale[a:b] = s
        q[a:b] = np.clip(np.rint(y[a:b] / s[:, None]), -127, 127).astype(np.int8)
    return q, scale


def exact_topk(
    y: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int, chunk: int = 500_000
) -> npt.NDArray[np.int64]:
    """Exact inner-product top-k (float32 scores), best first, for every query."""
    nq = queries.shape[0]
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    qt = np.ascontiguousarray(queries.T)
    for a in range(0, y.shape[0], chunk):
        s = y[a : a + chunk] @ qt  # (m, nq)
        kk = min(k, s.shape[0])
        part = np.argpartition(s, s.shape[0] - kk, axis=0)[-kk:]  # (kk, nq)
        ps = np.take_along_axis(s, part, axis=0).T
        best_s = np.concatenate([best_s, ps], axis=1)
        best_i = np.concatenate([best_i, part.T.astype(np.int64) + a], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
    return best_i
