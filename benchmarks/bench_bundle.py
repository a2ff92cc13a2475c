"""Benchmark: load and verify a 100k-item signed catalog bundle.

Builds a synthetic catalog (100k items, 64 float32 factors, 50 neighbours per item,
10 segments), writes it as a signed bundle, then times, median over repeats (warm page
cache, same run):

- ``load_bundle`` (mmap, signature check and every structural check included), and
  ``load_bundle(in_memory=True)``;
- the floors: ``np.load`` of the same arrays from an uncompressed ``.npz``, ``np.load``
  of ``.npy`` files memory-mapped, reading the bundle file, and a bare SHA-256 of it;
- the parts: JSON header decode, and SHA-256 / SHA-512 / BLAKE2b of the same bytes (why
  the format hashes with SHA-256).

Target: load_bundle of a 100k-item bundle, signature included, <= 200 ms, so that an app
can load its catalog at start-up without keeping the user waiting.

Run: ``.venv/bin/python benchmarks/bench_bundle.py [--items 100000] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ondevice.bundle import PREFIX, load_bundle
from ondevice.catalog import AlsParams, Catalog, Segment, SegmentRule
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle


def synthetic_catalog(n: int, f: int, n_nbrs: int, n_segments: int, seed: int = 0) -> Catalog:
    """A catalog shaped like a real one, with random content."""
    rng = np.random.default_rng(seed)
    factors = (rng.standard_normal((n, f)) * 0.1).astype(np.float32)
    gram = (factors.astype(np.float64).T @ factors.astype(np.float64)).astype(np.float32)
    indptr = np.arange(0, (n + 1) * n_nbrs, n_nbrs, dtype=np.int64)
    indices = rng.integers(0, n, size=n * n_nbrs, dtype=np.int32)
    weights = -np.sort(-rng.random((n, n_nbrs), dtype=np.float32), axis=1).ravel()
    genres = [f"genre-{g}" for g in range(20)]
    categories = tuple(
        tuple(genres[g] for g in rng.choice(20, size=1 + i % 3, replace=False)) for i in range(n)
    )
    segments = []
    for s in range(n_segments):
        centroid = rng.standard_normal(f).astype(np.float32)
        segments.append(
            Segment(
                id=s,
                name=f"segment {s}",
                panel_users=50 + s,
                top_items=rng.choice(n, size=200, replace=False).astype(np.int32),
                centroid=centroid / np.linalg.norm(centroid),
            )
        )
    return Catalog(
        item_ids=tuple(f"item-{i:06d}" for i in range(n)),
        titles=tuple(f"Synthetic title number {i}" for i in range(n)),
        popularity=rng.random(n, dtype=np.float32),
        nbr_indptr=indptr,
        nbr_indices=indices,
        nbr_weights=weights,
        segments=tuple(segments),
        segment_rules=(SegmentRule(segment=1, when={"plan": ("pro", "team")}),),
        default_segment=0,
        categories=categories,
        item_factors=factors,
        gram=gram,
        als=AlsParams(factors=f, regularization=0.05, alpha=10.0),
        name="bench",
        created_at=1_700_000_000.0,
    )


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        del result
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--neighbours", type=int, default=50)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    catalog = synthetic_catalog(args.items, args.factors, args.neighbours, args.segments)
    key = generate_signing_key()
    pinned = public_key_bytes(key)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.odb"
        t0 = time.perf_counter()
        info = write_bundle(catalog, path, private_key=key)
        write_ms = (time.perf_counter() - t0) * 1e3
        assert catalog.item_factors is not None and catalog.gram is not None
        arrays: dict[str, np.ndarray[Any, Any]] = {
            "popularity": catalog.popularity,
            "nbr_indptr": catalog.nbr_indptr,
            "nbr_indices": catalog.nbr_indices,
            "nbr_weights": catalog.nbr_weights,
            "item_factors": catalog.item_factors,
            "gram": catalog.gram,
        }
        npz = Path(tmp) / "arrays.npz"
        np.savez(npz, allow_pickle=False, **arrays)
        for name, array in arrays.items():
            np.save(Path(tmp) / f"{name}.npy", array)
        data = path.read_bytes()
        header_len = PREFIX.unpack_from(data, 0)[3]
        header_bytes = data[PREFIX.size : PREFIX.size + header_len]

        def load_npz() -> dict[str, Any]:
            with np.load(npz) as z:
                return {k: z[k] for k in z.files}

        def load_npy_mmap() -> list[Any]:
            return [np.load(Path(tmp) / f"{k}.npy", mmap_mode="r") for k in arrays]

        def read_and_sha256() -> bytes:
            return hashlib.sha256(path.read_bytes()).digest()

        timings = {
            "load_bundle (mmap, verified)": median_ms(
                lambda: load_bundle(path, public_key=pinned), args.repeats
            ),
            "load_bundle (in_memory, verified)": median_ms(
                lambda: load_bundle(path, public_key=pinned, in_memory=True), args.repeats
            ),
            "floor: np.load .npz (arrays only)": median_ms(load_npz, args.repeats),
            "floor: np.load .npy mmap_mode=r": median_ms(load_npy_mmap, args.repeats),
            "floor: read file + sha256": median_ms(read_and_sha256, args.repeats),
            "floor: read file": median_ms(path.read_bytes, args.repeats),
            "part: sha256 of bytes": median_ms(lambda: hashlib.sha256(data).digest(), args.repeats),
            "part: sha512 of bytes": median_ms(lambda: hashlib.sha512(data).digest(), args.repeats),
            "part: blake2b of bytes": median_ms(
                lambda: hashlib.blake2b(data).digest(), args.repeats
            ),
            "part: json header decode": median_ms(lambda: json.loads(header_bytes), args.repeats),
        }

    print(
        f"catalog: {args.items} items, {args.factors} factors, {args.neighbours} neighbours/item, "
        f"{args.segments} segments; bundle {info.size / 1e6:.1f} MB "
        f"(header {header_len / 1e6:.1f} MB); write_bundle {write_ms:.0f} ms"
    )
    base = timings["load_bundle (mmap, verified)"]
    npz_ms = timings["floor: np.load .npz (arrays only)"]
    sha_ms = timings["floor: read file + sha256"]
    print(f"{'operation':40s} {'median ms':>10s} {'x npz':>7s} {'x read+sha':>10s}")
    for label, ms in timings.items():
        print(f"{label:40s} {ms:10.1f} {ms / npz_ms:7.2f} {ms / sha_ms:10.2f}")
    verdict = "OK" if base <= 200 else "MISSED"
    print(f"target load_bundle <= 200 ms: {base:.1f} ms {verdict}")


if __name__ == "__main__":
    main()
