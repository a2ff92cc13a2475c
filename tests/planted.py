"""A catalog whose right answers are planted by hand, shared by the level and sync
tests: 30 items in three clusters (a: i0-i9, b: i10-i19, c: i20-i29), popularity
falling with the index, and i15 the planted best next item for a user of cluster b."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ondevice import ContextField, PersonalizationEngine, Policy, RawKey, Signal
from ondevice.catalog import AlsParams, Catalog, Segment, SegmentRule
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle

N = 30  # items i0..i29; clusters a: 0-9, b: 10-19, c: 20-29
PLANTED = "i15"
HISTORY = ["i10", "i11", "i12", "i13", "i14"]  # cluster b, i15 not yet seen
F = 3


def planted_catalog(*, factors: bool = True) -> Catalog:
    rng = np.random.default_rng(7)
    popularity = np.linspace(1.0, 0.1, N).astype(np.float32)  # i0 most popular
    indptr, indices, weights = [0], [], []
    for i in range(N):
        base = (i // 10) * 10
        nbrs = [(j, 0.2 + 0.01 * rng.random()) for j in range(base, base + 10) if j != i]
        nbrs = [(j, 0.95) if j == 15 and base == 10 else (j, w) for j, w in nbrs]
        nbrs.sort(key=lambda t: -t[1])
        indices += [j for j, _ in nbrs]
        weights += [w for _, w in nbrs]
        indptr.append(len(indices))
    y = np.zeros((N, F), dtype=np.float32)
    for i in range(N):
        y[i, i // 10] = 1.0
        y[i] += 0.05 * rng.standard_normal(F).astype(np.float32)
    y[15, 1] = 1.6  # the planted item is the strongest of its cluster
    centroids = np.eye(F, dtype=np.float32)
    segments = tuple(
        Segment(
            id=s,
            name=f"cluster-{'abc'[s]}",
            panel_users=60,
            top_items=np.asarray(
                ([15] if s == 1 else []) + [j for j in range(s * 10, s * 10 + 10) if j != 15],
                dtype=np.int32,
            ),
            centroid=centroids[s] if factors else None,
        )
        for s in range(3)
    )
    return Catalog(
        item_ids=tuple(f"i{i}" for i in range(N)),
        titles=tuple(f"Item {i}" for i in range(N)),
        popularity=popularity,
        nbr_indptr=np.asarray(indptr, dtype=np.int64),
        nbr_indices=np.asarray(indices, dtype=np.int32),
        nbr_weights=np.asarray(weights, dtype=np.float32),
        segments=segments,
        segment_rules=(SegmentRule(segment=1, when={"plan": ("pro",)}),),
        default_segment=0,
        categories=tuple((f"cat-{'abc'[i // 10]}",) for i in range(N)),
        item_factors=y if factors else None,
        gram=(y.T @ y).astype(np.float32) if factors else None,
        als=AlsParams(factors=F, regularization=0.1, alpha=5.0) if factors else None,
        name="planted",
    )


@pytest.fixture(scope="module")
def signer():
    return generate_signing_key()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, signer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    out = {"full": root / "full.bundle", "no_vectors": root / "novec.bundle"}
    write_bundle(planted_catalog(), out["full"], private_key=signer)
    write_bundle(planted_catalog(factors=False), out["no_vectors"], private_key=signer)
    return out


POLICY = Policy(
    signals=(Signal("plan", "str", "choose a segment", 365, choices=("free", "pro")),),
    context=(ContextField("daypart", "str", "learn when you like what", 30),),
)


@pytest.fixture
def open_engine(tmp_path, raw_key, bundles, signer, clock):
    opened = []

    def make(level: str, bundle: str = "full", **kw):
        engine = PersonalizationEngine(
            kw.pop("path", tmp_path / f"profile-{level}-{len(opened)}"),
            key=RawKey(raw_key),
            privacy_level=level,
            policy=kw.pop("policy", POLICY),
            clock=kw.pop("clock", clock),
            bundle=bundles[bundle] if bundle else None,
            bundle_public_key=public_key_bytes(signer),
            **kw,
        )
        opened.append(engine)
        return engine

    yield make
    for e in opened:
        e.close()


