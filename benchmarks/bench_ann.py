"""The approximate index on the device: exact against approximate ``individual``, one run.

For each catalog size (``_scale_data.py``'s realistic catalogs) the same catalog is
written twice, with ``ann="off"`` (exact scoring) and with an index (``ann=<clusters>``,
``nprobe`` calibrated by the writer), both loaded with ``load_bundle``; then, for the
generator's sample users and users made from random neighbourhoods, interleaved:

- **latency** of the ``individual`` level (``ondevice.levels.recommend`` on a
  ``CatalogRuntime``, the engine's path without the profile read), p50 and p99, exact
  and approximate, and their ratio;
- **recall@10 of the fold-in top 10**: the approximate path's top 10 by ``Y @ x`` among
  the probed clusters against the exact top 10 over every item (same user vector);
- **overlap@10 of the answers**: the share of the exact level's 10 answers (fold-in
  fused with the neighbours) that the approximate level also gives.

The crossover (where the index stops paying) sets ``ann="auto"``'s threshold
(``ondevice.operator.ann_build.AUTO_MIN_ITEMS``)::

    .venv/bin/python benchmarks/bench_ann.py                       # 100k, 250k, 1M
    .venv/bin/python benchmarks/bench_ann.py --items 100000,250000 --requests 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _scale_data

from ondevice import levels
from ondevice.bundle import load_bundle
from ondevice.catalog import Catalog
from ondevice.levels.base import CatalogRuntime, Request, UserState
from ondevice.operator import ann_build
from ondevice.operator.bundle_writer import write_bundle
from ondevice.policy import PrivacyLevel


def _state(rt: CatalogRuntime, items: list[int]) -> UserState:
    window = np.asarray(items, dtype=np.int64)
    return UserState(
        user_id="u",
        window=window,
        times=np.arange(window.size, 0, -1, dtype=np.float64) * 600.0,
        strengths=np.ones(window.size, dtype=np.float32),
        events=["view"] * window.size,
        contexts=[{}] * window.size,
        excluded=window.copy(),
    )


def _users(catalog: Catalog, sample: list[list[str]], extra: int, seed: int) -> list[list[str]]:
    """The generator's sample windows plus ``extra`` windows of 30 items: a random item's
    neighbourhood, half of them mixed with a second one (two tastes)."""
    rng = np.random.default_rng(seed)
    out = [list(u) for u in sample]
    for k in range(extra):
        picks: list[int] = []
        for _ in range(2 if k % 2 else 1):
            i = int(rng.integers(catalog.n_items))
            nbrs, _ = catalog.neighbours_of(i)
            picks += [i, *nbrs[:14].tolist()]
        out.append([catalog.item_ids[j] for j in dict.fromkeys(picks)])
    return out


def _measure(n: int, args: argparse.Namespace, tmp: Path) -> None:
    catalog, sample = _scale_data.source_catalog(n, args.seed, args.cache)
    key = _scale_data.signing_key_bytes(args.seed)
    clusters = ann_build.default_clusters(n)
    t0 = time.perf_counter()
    write_bundle(catalog, tmp / "exact.odb", private_key=key, ann="off")
    t1 = time.perf_counter()
    write_bundle(catalog, tmp / "ann.odb", private_key=key, ann=clusters)
    t2 = time.perf_counter()
    pk = _scale_data.public_key(args.seed)
    exact = load_bundle(tmp / "exact.odb", public_key=pk)
    approx = load_bundle(tmp / "ann.odb", public_key=pk)
    assert approx.ann is not None
    index = approx.ann
    rt_e, rt_a = CatalogRuntime(exact, "e"), CatalogRuntime(approx, "a")
    users = _users(exact, [list(u.items) for u in sample], args.users, args.seed)
    lat: dict[str, list[float]] = {"exact": [], "approx": []}
    recall, overlap, cands = [], [], []
    for ids in users:
        st_e = _state(rt_e, [i for i in (rt_e.index.get(x) for x in ids) if i is not None])
        st_a = _state(rt_a, [i for i in (rt_a.index.get(x) for x in ids) if i is not None])
        req = Request(k=10, now=1e9)
        for _ in range(args.requests):  # interleaved, so load hits both alike
            for name, rt, st in (("exact", rt_e, st_e), ("approx", rt_a, st_a)):
                t = time.perf_counter()
                levels.recommend(PrivacyLevel.INDIVIDUAL, rt, st, req)
                lat[name].append(time.perf_counter() - t)
        got_e = [r.item_id for r in levels.recommend(PrivacyLevel.INDIVIDUAL, rt_e, st_e, req)]
        got_a = [r.item_id for r in levels.recommend(PrivacyLevel.INDIVIDUAL, rt_a, st_a, req)]
        overlap.append(len(set(got_e) & set(got_a)) / 10)
        x = levels.individual.fold_in(rt_a, st_a)
        cand = index.candidates(index.probe(x, 110 + st_a.window.size)).items()
        cands.append(cand.size)
        full = approx.factor_scores(x) if approx.item_factor_scales is not None else (
            approx.item_factors @ x  # type: ignore[operator]
        )
        full[st_a.window] = -np.inf
        top_exact = set(np.argsort(-full, kind="stable")[:10].tolist())
        sub = approx.scores_of(cand, x)
        sub[np.isin(cand, st_a.window)] = -np.inf
        top_approx = set(cand[np.argsort(-sub, kind="stable")[:10]].tolist())
        recall.append(len(top_exact & top_approx) / 10)

    def ms(v: list[float], q: float) -> float:
        return 1000 * float(np.quantile(v, q))

    e50, a50 = ms(lat["exact"], 0.5), ms(lat["approx"], 0.5)
    print(
        f"{n:>10,}  clusters {clusters:>5}  nprobe {index.nprobe:>3}  "
        f"candidates {int(statistics.median(cands)):>7,} ({statistics.median(cands) / n:.1%})  "
        f"writer recall {index.recall:.3f}"
    )
    print(
        f"{'':>10}  individual p50 exact {e50:7.2f} ms  approx {a50:7.2f} ms  "
        f"ratio {a50 / e50:5.2f}   p99 exact {ms(lat['exact'], 0.99):7.2f} ms  "
        f"approx {ms(lat['approx'], 0.99):7.2f} ms"
    )
    print(
        f"{'':>10}  recall@10 of the fold-in top 10 {np.mean(recall):.3f} "
        f"(min {min(recall):.1f}); overlap@10 of the answers {np.mean(overlap):.3f}; "
        f"{len(users)} users x {args.requests} requests; write exact {t1 - t0:.0f} s, "
        f"with index {t2 - t1:.0f} s"
    )
    del exact, approx, rt_e, rt_a, catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", default="100000,250000,1000000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=_scale_data.DEFAULT_CACHE)
    ap.add_argument("--users", type=int, default=40, help="windows made from neighbourhoods")
    ap.add_argument("--requests", type=int, default=20, help="timed requests per user")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.items.split(",")):
            _measure(n, args, Path(tmp))


if __name__ == "__main__":
    main()
