"""Scoring latency of every level against the bare numpy floor, measured in one run.

For 1.7k, 100k and 1M items (64 float32 factors, 50 neighbours per item, synthetic
random arrays), times one recommendation request (k = 10, a 200-item window that is
also excluded as "seen") per level, with the very functions the device levels call
(``ondevice.scoring`` / ``ondevice.segments``), and the floor: ``Y @ x`` plus
``np.argpartition`` over the same arrays. Prints p50 / p99 in milliseconds and the
p50 ratio to the floor.

    .venv/bin/python benchmarks/bench_recommend.py [--sizes 1700,100000,1000000] [--reps 200]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import numpy as np

from ondevice import scoring
from ondevice.catalog import Catalog, Segment
from ondevice.segments import assign_segment, segment_by_id

F = 64
NEIGHBOURS = 50
WINDOW = 200
K = 10


def _arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((n, F), dtype=np.float32) * 0.1).astype(np.float32)
    nbr = min(NEIGHBOURS, n - 1)
    indptr = np.arange(0, (n + 1) * nbr, nbr, dtype=np.int64)
    indices = rng.integers(0, n, size=n * nbr, dtype=np.int32)
    weights = np.sort(rng.random(n * nbr, dtype=np.float32).reshape(n, nbr), axis=1)[:, ::-1]
    return {
        "y": y,
        "gram": (y.T.astype(np.float64) @ y).astype(np.float32),
        "pop": rng.pareto(1.5, size=n).astype(np.float32),
        "indptr": indptr,
        "indices": indices,
        "weights": np.ascontiguousarray(weights).ravel(),
    }


def _time_all(fns: list[Callable[[], object]], reps: int) -> list[tuple[float, float]]:
    """p50 and p99 (ms) of each function, timed round-robin so that noise from the shared
    machine hits the floor and the levels alike."""
    for fn in fns:
        for _ in range(min(10, reps)):
            fn()
    out = np.empty((len(fns), reps))
    gc.disable()
    try:
        for r in range(reps):
            for j, fn in enumerate(fns):
                t0 = time.perf_counter()
                fn()
                out[j, r] = time.perf_counter() - t0
    finally:
        gc.enable()
    return [
        (float(np.percentile(row, 50)) * 1e3, float(np.percentile(row, 99)) * 1e3) for row in out
    ]


def bench(n: int, reps: int) -> list[tuple[str, float, float]]:
    """``(name, p50 ms, p99 ms)`` for the floor and every level at ``n`` items."""
    a = _arrays(n)
    rng = np.random.default_rng(1)
    y, gram = a["y"], a["gram"]
    window = rng.choice(n, size=min(WINDOW, n // 2), replace=False).astype(np.int64)
    times = np.sort(rng.integers(0, 86_400 * 30, size=window.size))[::-1]
    now = float(times[0] + 60)
    reg, alpha = 5.0, 5.0
    x = scoring.fold_in(y, gram, window, regularization=reg, alpha=alpha)
    b, big_a = scoring.aggregates(y, window, alpha=alpha)
    pop_order = np.lexsort((np.arange(n), -a["pop"].astype(np.float64))).astype(np.int32)
    cents = rng.standard_normal((10, F)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    segs = tuple(
        Segment(
            id=i,
            name=f"s{i}",
            panel_users=50,
            top_items=rng.choice(n, size=min(300, n), replace=False).astype(np.int32),
            centroid=cents[i],
        )
        for i in range(10)
    )
    cat = Catalog(
        item_ids=(),
        titles=(),
        popularity=a["pop"],
        nbr_indptr=a["indptr"],
        nbr_indices=a["indices"],
        nbr_weights=a["weights"],
        segments=segs,
    )
    cat_indptr = np.arange(0, 2 * (n + 1), 2, dtype=np.int64)
    cat_indices = rng.integers(0, 19, size=2 * n, dtype=np.int32)
    aff = scoring.context_affinity(
        cat_indptr,
        cat_indices,
        19,
        window,
        [("morning", "evening")[i % 2] for i in range(window.size)],
    )
    ip, ix, w = a["indptr"], a["indices"], a["weights"]

    def floor() -> object:
        s = y @ x
        return np.argpartition(s, n - K)[n - K :]

    def none() -> object:
        return scoring.popularity_ranking(a["pop"], K, exclude=window)

    def segment() -> object:
        vec = scoring.fold_in_aggregates(gram, b, big_a, regularization=reg)
        seg = segment_by_id(cat, assign_segment(cat, user_vector=vec))
        assert seg is not None
        return scoring.segment_ranking(
            seg.top_items, K, n_items=n, exclude=window, fallback=pop_order
        )

    def behavioral() -> object:
        s = scoring.neighbour_scores(ip, ix, w, window, n_items=n, half_life=5.0)
        return scoring.rank_sparse(s, K, exclude=window, fallback=pop_order)

    def contextual() -> object:
        s = scoring.contextual_scores(
            ip,
            ix,
            w,
            window,
            times,
            n_items=n,
            now=now,
            half_life=5.0,
            session_boost=1.0,
            cat_indptr=cat_indptr,
            cat_indices=cat_indices,
            affinity=aff,
            context="morning",
            strength=1.0,
        )
        return scoring.rank_sparse(s, K, exclude=window, fallback=pop_order)

    def individual() -> object:
        nb = scoring.neighbour_scores(ip, ix, w, window, n_items=n, half_life=5.0)
        return scoring.individual_ranking(y, x, nb, K, exclude=window)

    def individual_refresh() -> object:
        xx = scoring.fold_in(y, gram, window, regularization=reg, alpha=alpha)
        nb = scoring.neighbour_scores(ip, ix, w, window, n_items=n, half_life=5.0)
        return scoring.individual_ranking(y, xx, nb, K, exclude=window)

    def foldin_only() -> object:
        return scoring.individual_ranking(y, x, None, K, exclude=window)

    named: list[tuple[str, Callable[[], object]]] = [
        ("floor: Y@x + argpartition", floor),
        ("none", none),
        ("segment (aggregates fold-in)", segment),
        ("behavioral", behavioral),
        ("contextual", contextual),
        ("individual: fold-in only", foldin_only),
        ("individual (cached vector)", individual),
        ("individual (+ fold-in refresh)", individual_refresh),
    ]
    timed = _time_all([fn for _, fn in named], reps if n < 1_000_000 else max(20, reps // 4))
    return [(name, p50, p99) for (name, _), (p50, p99) in zip(named, timed, strict=True)]


def main() -> None:
    """Run the benchmark and print a table per catalog size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1700,100000,1000000")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    for n in (int(v) for v in args.sizes.split(",")):
        rows = bench(n, args.reps)
        floor50 = rows[0][1]
        print(
            f"\n{n:,} items x {F} factors (float32), k={K}, window={WINDOW}, "
            f"{NEIGHBOURS} neighbours/item"
        )
        print(f"{'level':<32}{'p50 ms':>9}{'p99 ms':>9}{'p50/floor':>11}")
        for name, p50, p99 in rows:
            print(f"{name:<32}{p50:>9.3f}{p99:>9.3f}{p50 / floor50:>10.2f}x")


if __name__ == "__main__":
    main()
