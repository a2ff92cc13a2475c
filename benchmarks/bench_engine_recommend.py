"""``PersonalizationEngine.get_recommendations`` end to end, every level, against the
bare numpy floor in the same run.

For each catalog size (1.7k, 100k and 1M items; 64 float32 factors; synthetic arrays,
signed and written as a real bundle), the script loads the bundle into an engine at
each privacy level on a real SQLCipher profile holding one user with a full window of
100 interactions (with declared context), then times ``get_recommendations(user,
context, k=10)``: profile read, state, scoring, ranking and explanations included.

The floor is what any recommender over these arrays must at least do: ``Y @ x`` and
``argpartition`` for the top 10, on the same arrays, in the same process. Loading each
bundle (signature check included) is timed too. Medians and p99 of ``--reps`` calls.

Targets: individual at 100k items p50 <= 1.5 x the floor (personalizing costs at most
half again the bare scoring any recommender does); every level p99 <= 20 ms at 100k
items (an answer within one UI interaction); loading a 100k-item bundle <= 200 ms (an
app can load its catalog at start-up). Nothing is asserted.

Run: ``.venv/bin/python benchmarks/bench_engine_recommend.py [--reps 200] [--sizes
1700,100000,1000000]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ondevice import ContextField, PersonalizationEngine, Policy, RawKey
from ondevice.catalog import AlsParams, Catalog, Segment
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle

F = 64
LEVELS = ("none", "segment", "behavioral", "contextual", "individual")
POLICY = Policy(context=(ContextField("daypart", "str", "time of day affinities", 30),))


def synthetic_catalog(n: int, seed: int = 0) -> Catalog:
    """A catalog of ``n`` items with random (but well-formed) arrays."""
    rng = np.random.default_rng(seed)
    top_n = 50 if n <= 200_000 else 20
    top_n = min(top_n, n - 1)
    y = (rng.standard_normal((n, F)) / 8).astype(np.float32)
    gram = (y.astype(np.float64).T @ y.astype(np.float64)).astype(np.float32)
    indices = rng.integers(0, n, size=(n, top_n), dtype=np.int64)
    self_hit = indices == np.arange(n)[:, None]
    indices[self_hit] = (indices[self_hit] + 1) % n
    weights = -np.sort(-rng.random((n, top_n), dtype=np.float32), axis=1)
    segments = []
    for s in range(10):
        c = rng.standard_normal(F).astype(np.float32)
        segments.append(
            Segment(
                id=s,
                name=f"segment {s}",
                panel_users=100,
                top_items=rng.choice(n, size=min(300, n), replace=False).astype(np.int32),
                centroid=c / np.linalg.norm(c),
            )
        )
    cats = tuple((f"c{i % 20}",) for i in range(n))
    return Catalog(
        item_ids=tuple(f"i{i}" for i in range(n)),
        titles=tuple(f"Item {i}" for i in range(n)),
        popularity=rng.random(n, dtype=np.float32),
        nbr_indptr=np.arange(0, n * top_n + 1, top_n, dtype=np.int64),
        nbr_indices=indices.astype(np.int32).ravel(),
        nbr_weights=weights.ravel(),
        segments=tuple(segments),
        categories=cats,
        item_factors=y,
        gram=gram,
        als=AlsParams(factors=F, regularization=2.0, alpha=2.0),
        name=f"synthetic-{n}",
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--sizes", default="1700,100000,1000000")
    args = parser.parse_args()
    key = generate_signing_key()
    raw = os.urandom(32)
    with tempfile.TemporaryDirectory(prefix="bench-rec-") as tmp:
        root = Path(tmp)
        for n in (int(s) for s in args.sizes.split(",")):
            catalog = synthetic_catalog(n)
            bundle = root / f"b{n}.bundle"
            write_bundle(catalog, bundle, private_key=key)
            size_mb = bundle.stat().st_size / 1e6
            y = catalog.item_factors
            assert y is not None
            del catalog
            rng = np.random.default_rng(1)
            x = rng.standard_normal(F).astype(np.float32)
            floor: list[float] = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                scores = y @ x
                top = np.argpartition(scores, n - 10)[n - 10 :]
                top[np.argsort(-scores[top])]
                floor.append(time.perf_counter() - t0)
            f50, f99 = statistics.median(floor) * 1e3, pct(floor, 0.99) * 1e3
            print(f"\n{n:,} items, {F} factors (bundle {size_mb:.1f} MB)")
            print(f"  floor: Y @ x + argpartition        p50 {f50:7.2f} ms   p99 {f99:7.2f} ms")
            loads: list[float] = []
            window = [f"i{i}" for i in rng.choice(n, size=100, replace=False)]
            for level in LEVELS:
                t0 = time.perf_counter()
                engine = PersonalizationEngine(
                    root / f"p-{n}-{level}",
                    key=RawKey(raw),
                    policy=POLICY,
                    privacy_level=level,
                    bundle=bundle,
                    bundle_public_key=public_key_bytes(key),
                )
                loads.append(time.perf_counter() - t0)
                now = engine.now()
                engine.update_profile_many(
                    [
                        (
                            "u",
                            {
                                "item_id": item,
                                "event": "click",
                                "timestamp": now - 1000 + j,
                                "context": {"daypart": "evening"},
                            },
                        )
                        for j, item in enumerate(window)
                    ]
                )
                engine.get_recommendations("u", {"daypart": "evening"}, k=10)  # warm, cache
                times: list[float] = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    recs = engine.get_recommendations("u", {"daypart": "evening"}, k=10)
                    times.append(time.perf_counter() - t0)
                assert recs.level.value == level, (level, recs.fallbacks)
                p50, p99 = statistics.median(times) * 1e3, pct(times, 0.99) * 1e3
                print(
                    f"  get_recommendations {level:<11}   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms"
                    f"   p50/floor {p50 / f50:5.2f}"
                )
                engine.close()
            print(
                f"  engine open + bundle load (signature checked): median "
                f"{statistics.median(loads) * 1e3:.1f} ms over {len(loads)} opens"
            )


if __name__ == "__main__":
    main()
