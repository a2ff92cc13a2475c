"""The operator's catalog build at scale: time and peak memory of every stage.

Generates a synthetic panel (not part of the package) with the structure that drives
the build's cost, then runs :mod:`ondevice.operator.build` stage by stage:

- **items**: ``--items`` items in ``items / 1000`` taste clusters (8 to 4096) of random
  membership; popularity is Zipf, ``weight = rank ** -zipf`` over a random ranking;
- **users**: ``--users`` panel users, each with a history length drawn log-normal
  (``sigma`` 1, so a long tail of heavy users; mean ``interactions / users``, at most
  ``--max-length``), one to three favourite clusters from which 70% of the history is
  drawn (by popularity within the cluster), the rest by global popularity. Repeated
  pairs count once, so the panel holds a little fewer distinct interactions than asked.

Stages (each: wall seconds, and the process's peak resident memory during the stage,
``VmHWM`` reset before it through ``/proc/self/clear_refs``):

1. ``matrix``: :func:`interaction_matrix` from the integer-coded arrays (the ingestion
   of :func:`build_catalog_from_arrays`);
2. ``popularity``;
3. ``neighbours``: :func:`item_neighbours` (the sparse top-k product, with a ``tqdm``
   bar). Baselines in the same run: a bare ``scipy.sparse`` product ``X_b.T @ X`` over
   the same item blocks with nothing done to its result, on a ``--baseline-share`` of
   the blocks (every k-th block; its time is divided by the share of work those blocks
   hold, and labelled as such); and the previous bincount path of
   ``item_neighbours`` (a dense ``block x n_items`` count array per block) on its first
   ``--old-blocks`` blocks, scaled per item (labelled as an extrapolation);
4. ``als``: :func:`train_als` (``implicit``'s fit, then the exact user step). Baseline:
   ``implicit``'s fit alone, same matrix and parameters, ``--baseline-iterations``
   iterations; compared per iteration;
5. ``segments``: :func:`make_segments` (k-means over the user factors, top items);
6. ``write_bundle``: the signed format 2 bundle to a temporary file.

Run from the repository root::

    .venv/bin/python benchmarks/bench_build.py                       # 300k items, ~5 min
    .venv/bin/python benchmarks/bench_build.py --items 100000 --users 50000 \\
        --interactions 5000000                                       # quick, ~1 min
    .venv/bin/python benchmarks/bench_build.py --items 1000000 --users 200000 \\
        --interactions 30000000                                      # 1M items, ~20 min

The machine is shared and noisy: every time is one run of a minutes-long stage; the
ratios printed compare stages measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ondevice.operator import build
from ondevice.operator._progress import TqdmProgress
from ondevice.operator.bundle_writer import generate_signing_key, write_bundle

I64 = npt.NDArray[np.int64]


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in kB (0 if unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


RESULTS: list[tuple[str, float, float, float]] = []


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage (wall and process CPU seconds: on a shared machine the CPU time is
    the steadier figure) and record its peak resident memory (MB) and the RSS after it."""
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status("VmHWM") / 1024 or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss = _status("VmRSS") / 1024
    RESULTS.append((name, dt, peak, rss))
    print(
        f"  {name:<28} {dt:9.1f} s  (CPU {cpu:7.1f} s)   peak RSS {peak:7.0f} MB   "
        f"RSS after {rss:7.0f} MB",
        flush=True,
    )


def make_panel(
    n_items: int, n_users: int, n_interactions: int, *, zipf: float, max_length: int, seed: int
) -> tuple[I64, I64]:
    """``(user codes, item codes)`` of a synthetic panel (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_clusters = int(min(4096, max(8, n_items // 1000)))
    cluster = rng.integers(0, n_clusters, n_items)
    weight = np.empty(n_items, dtype=np.float64)
    weight[rng.permutation(n_items)] = np.arange(1, n_items + 1, dtype=np.float64) ** -zipf
    by_cluster = np.argsort(cluster, kind="stable")
    cum = np.cumsum(weight[by_cluster])
    c_end = np.cumsum(np.bincount(cluster, minlength=n_clusters))
    c_start = np.concatenate(([0], c_end[:-1]))
    c_lo = np.where(c_start > 0, cum[np.maximum(c_start - 1, 0)], 0.0)
    c_w = cum[c_end - 1] - c_lo
    g_cum = np.cumsum(weight)
    mean = n_interactions / n_users
    sigma = 1.0
    drawn = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n_users)
    lengths = np.clip(np.rint(drawn), 1, max_length).astype(np.int64)
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    fav = rng.integers(0, n_clusters, (n_users, 3))
    n_fav = rng.integers(1, 4, n_users)
    items = np.empty(users.size, dtype=np.int64)
    chunk = 1 << 22
    for lo in range(0, users.size, chunk):
        u = users[lo : lo + chunk]
        local = rng.random(u.size) < 0.7
        pick = fav[u, (rng.random(u.size) * n_fav[u]).astype(np.int64)]
        r = rng.random(u.size)
        out = np.empty(u.size, dtype=np.int64)
        c = pick[local]
        pos = np.searchsorted(cum, c_lo[c] + r[local] * c_w[c], side="right")
        out[local] = by_cluster[np.minimum(pos, np.maximum(c_end[c] - 1, 0))]
        g = np.searchsorted(g_cum, r[~local] * g_cum[-1], side="right")
        out[~local] = np.minimum(g, n_items - 1)
        items[lo : lo + chunk] = out
    return users, items


def _old_bincount_blocks(x: build.Csr, n_blocks: int, block_cells: int = 20_000_000) -> int:
    """The previous ``item_neighbours`` sparse path (a bincount of every (block item, user,
    item) triple into a dense ``block x n_items`` array, dense top-k), on its first
    ``n_blocks`` blocks; returns how many items it covered."""
    n_items = x.shape[1]
    xt = x.transpose()
    counts = np.diff(xt.indptr).astype(np.float64)
    norm = np.sqrt(np.maximum(counts, 1.0))
    block = max(1, min(n_items, block_cells // max(n_items, 1)))
    u_lens = np.diff(x.indptr)
    hi = 0
    for lo in range(0, min(n_items, n_blocks * block), block):
        hi = min(n_items, lo + block)
        a_starts, a_lens = xt.indptr[lo:hi], np.diff(xt.indptr[lo : hi + 1])
        a_offs = build._gather(a_starts, a_lens)
        a_item = np.repeat(np.arange(lo, hi, dtype=np.int64), a_lens)
        a_user = xt.indices[a_offs].astype(np.int64)
        b_offs = build._gather(x.indptr[a_user], u_lens[a_user])
        b_item = x.indices[b_offs].astype(np.int64)
        a_rep = np.repeat(a_item - lo, u_lens[a_user])
        cnt = np.bincount(a_rep * n_items + b_item, minlength=(hi - lo) * n_items)
        co = cnt.reshape(hi - lo, n_items).astype(np.float64)
        sim = co / norm[lo:hi, None] / norm[None, :]
        sim[np.arange(hi - lo), np.arange(lo, hi)] = 0.0
        np.argpartition(-sim, 99, axis=1)
    return hi


def _bare_products(x: build.Csr, share: float, block_cells: int) -> tuple[float, float]:
    """A bare scipy ``X_b.T @ X`` over every k-th block of ``item_neighbours``'s blocks;
    returns ``(seconds, share of the total work covered)``."""
    import scipy.sparse  # type: ignore[import-untyped]

    xs = scipy.sparse.csr_matrix(
        (np.ones(x.indices.size, dtype=np.int32), x.indices, x.indptr), shape=x.shape
    )
    xt = xs.T.tocsr()
    per_entry = np.diff(xs.indptr).astype(np.int64)[xt.indices]
    cum = np.concatenate(([0], np.cumsum(per_entry)))
    work = cum[xt.indptr[1:]] - cum[xt.indptr[:-1]]
    blocks = build._item_blocks(work, block_cells)
    step = max(1, round(1 / share))
    done = 0
    t0 = time.perf_counter()
    for lo, hi in blocks[::step]:
        _ = xt[lo:hi] @ xs
        done += int(work[lo:hi].sum())
    return time.perf_counter() - t0, done / max(int(work.sum()), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=300_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--zipf", type=float, default=0.9)
    p.add_argument("--max-length", type=int, default=20_000)
    p.add_argument("--factors", type=int, default=64)
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--neighbours", type=int, default=100)
    p.add_argument("--max-user-items", type=int, default=0, help="heavy-user cap (0: off)")
    p.add_argument("--baseline-share", type=float, default=0.1)
    p.add_argument("--baseline-iterations", type=int, default=2)
    p.add_argument("--old-blocks", type=int, default=3)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    print(
        f"panel: {args.items:,} items, {args.users:,} users, ~{args.interactions:,} "
        f"interactions, Zipf {args.zipf}; {os.cpu_count()} CPUs",
        flush=True,
    )
    t0 = time.perf_counter()
    users, items = make_panel(
        args.items,
        args.users,
        args.interactions,
        zipf=args.zipf,
        max_length=args.max_length,
        seed=args.seed,
    )
    print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
    settings = build.BuildSettings(
        factors=args.factors,
        iterations=args.iterations,
        neighbours=args.neighbours,
        max_user_items=args.max_user_items,
        segments=10,
        seed=args.seed,
    )
    with stage("matrix (ingestion)"):
        x = build.interaction_matrix(users, items, args.users, args.items)
    del users, items
    lens = np.diff(x.indptr)
    pairs = float(np.sum(lens.astype(np.float64) ** 2))
    print(
        f"  distinct interactions {x.indices.size:,}; user length median "
        f"{int(np.median(lens))}, max {int(lens.max())}; sum |items_u|^2 = {pairs:.3g}; "
        f"items with no user {int((np.bincount(x.indices, minlength=x.shape[1]) == 0).sum()):,}",
        flush=True,
    )
    with stage("popularity"):
        pop = build.item_popularity(x)
    with stage("neighbours"), TqdmProgress() as bar:
        nbr = build.item_neighbours(
            x,
            top_n=settings.neighbours,
            progress=bar,
            max_user_items=settings.max_user_items,
            seed=settings.seed,
        )
    t_nbr = RESULTS[-1][1]
    print(
        f"  neighbour edges {nbr[1].size:,} ({nbr[1].size / x.shape[1]:.1f} per item)", flush=True
    )
    iter_times: list[float] = []

    def note(done: int, total: int, stage_name: str) -> None:
        iter_times.append(time.perf_counter())
        bar(done, total, stage_name)

    with stage("als (fit + exact user step)"), TqdmProgress() as bar:
        t_start = time.perf_counter()
        user_f, item_f = build.train_als(
            x,
            factors=settings.factors,
            regularization=settings.regularization,
            alpha=settings.alpha,
            iterations=settings.iterations,
            seed=settings.seed,
            progress=note,
            threads=settings.threads,
            cg_steps=settings.als_cg_steps,
        )
    t_als = RESULTS[-1][1]
    fit_end = iter_times[-1] if iter_times else t_start
    per_iter = (fit_end - t_start) / max(len(iter_times), 1)
    print(
        f"  fit {fit_end - t_start:.1f} s ({per_iter:.1f} s/iteration, median "
        f"{float(np.median(np.diff([t_start, *iter_times]))):.1f}); exact user step "
        f"{t_als - (fit_end - t_start):.1f} s",
        flush=True,
    )
    with stage("segments"):
        segs, rules, default = build.make_segments(
            x, user_f, [None] * x.shape[0], settings=settings
        )
    gram = (item_f.astype(np.float64).T @ item_f.astype(np.float64)).astype(np.float32)
    from ondevice.catalog import AlsParams, Catalog

    ids = tuple(f"item-{i}" for i in range(x.shape[1]))
    catalog = Catalog(
        item_ids=ids,
        titles=ids,
        popularity=pop,
        nbr_indptr=nbr[0],
        nbr_indices=nbr[1],
        nbr_weights=nbr[2],
        segments=tuple(segs),
        segment_rules=tuple(rules),
        default_segment=default,
        item_factors=item_f,
        gram=gram,
        als=AlsParams(settings.factors, settings.regularization, settings.alpha),
        name="bench",
        created_at=0.0,
        extra=settings.scoring.to_extra(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        with stage("write_bundle (format 2)"):
            info = write_bundle(catalog, Path(tmp) / "c.bundle", private_key=generate_signing_key())
        size = (Path(tmp) / "c.bundle").stat().st_size
    print(
        f"  bundle {size / 1e6:.1f} MB, {info.n_items:,} items, {info.n_segments} segments",
        flush=True,
    )
    total = sum(r[1] for r in RESULTS)
    peak = max(r[2] for r in RESULTS)
    print(
        f"build total {total:.1f} s, peak RSS {peak:.0f} MB (whole process, max over stages)",
        flush=True,
    )
    if args.no_baselines:
        return
    del catalog, user_f, segs
    print("baselines (same run):", flush=True)
    with stage("bare scipy product (share)"):
        t_bare, share = _bare_products(x, args.baseline_share, 20_000_000)
    print(
        f"  bare X_b.T @ X on {share:.1%} of the work: {t_bare:.1f} s -> all blocks "
        f"~{t_bare / max(share, 1e-9):.1f} s (scaled); neighbours / bare product = "
        f"{t_nbr / (t_bare / max(share, 1e-9)):.2f}",
        flush=True,
    )
    if args.old_blocks > 0:
        with stage("old bincount path (blocks)"):
            covered = _old_bincount_blocks(x, args.old_blocks)
        t_old = RESULTS[-1][1]
        est = t_old / max(covered, 1) * x.shape[1]
        print(
            f"  old path: {covered:,} items in {t_old:.1f} s -> all {x.shape[1]:,} items "
            f"~{est:,.0f} s (extrapolated per item); old / new ~{est / t_nbr:,.0f}x",
            flush=True,
        )
    conf = build.confidence_matrix(x, settings.alpha)
    with build.single_threaded_blas():
        model: Any = build._als_model(
            factors=settings.factors,
            regularization=settings.regularization,
            iterations=args.baseline_iterations,
            seed=settings.seed,
            threads=settings.threads,
            cg_steps=settings.als_cg_steps,
        )
        with stage("implicit fit alone"):
            model.fit(conf, show_progress=False)
    t_fit = RESULTS[-1][1] / max(args.baseline_iterations, 1)
    print(
        f"  implicit fit alone: {t_fit:.1f} s/iteration; ours {per_iter:.1f} s/iteration "
        f"(ratio {per_iter / t_fit:.2f})",
        flush=True,
    )


if __name__ == "__main__":
    main()
