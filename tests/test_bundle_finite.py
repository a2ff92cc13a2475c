"""Issue 10, item 10: NaN or infinity in a signed array is refused at build and at load.

The device must refuse such a bundle even when it carries a valid signature (another
writer, an old writer, a signing service fed by something else): before the fix it was
accepted and produced NaN scores.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_bundle import make_catalog, resign, write_bundle  # format 1

from ondevice import PersonalizationEngine, RawKey
from ondevice.bundle import load_bundle, validate_catalog
from ondevice.catalog import Catalog
from ondevice.errors import BundleError
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes

from planted import HISTORY, planted_catalog

BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
FLOAT_ARRAYS = ["popularity", "nbr_weights", "item_factors", "gram", "segments/0/centroid"]


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def good(key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("finite") / "good.odb"
    write_bundle(make_catalog(7, n=12), path, private_key=key)
    return path.read_bytes()


def _poison(name: str, value: float, index: int = -1) -> Any:
    """A region mutation for ``resign``: one element of one float32 array set to ``value``."""

    def mutate(region: bytearray, table: dict[str, dict[str, Any]]) -> None:
        entry = table[name]
        array = np.frombuffer(
            region, "<f4", offset=entry["offset"], count=int(np.prod(entry["shape"]))
        )
        array[index] = value

    return mutate


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("name", FLOAT_ARRAYS)
def test_a_signed_bundle_with_a_non_finite_value_is_refused_at_load(
    tmp_path: Path, good: bytes, key: Ed25519PrivateKey, name: str, bad: str
) -> None:
    path = tmp_path / "c.odb"
    path.write_bytes(resign(good, key, region=_poison(name, BAD[bad])))
    with pytest.raises(BundleError, match="NaN or infinite"):
        load_bundle(path, public_key=public_key_bytes(key))


def test_the_engine_refuses_it_and_keeps_answering_from_the_previous_bundle(
    tmp_path: Path, raw_key: bytes
) -> None:
    key = generate_signing_key()
    good, poisoned = tmp_path / "good.bundle", tmp_path / "nan.bundle"
    write_bundle(planted_catalog(), good, private_key=key)
    # Item i10 (in the user's history) gets a NaN factor: before the fix every score was NaN.
    nan_factor = _poison("item_factors", np.nan, 30)
    poisoned.write_bytes(resign(good.read_bytes(), key, region=nan_factor))
    with PersonalizationEngine(
        tmp_path / "p",
        key=RawKey(raw_key),
        privacy_level="individual",
        bundle=good,
        bundle_public_key=public_key_bytes(key),
    ) as engine:
        for n, item in enumerate(HISTORY):
            engine.update_profile("u", {"item_id": item, "timestamp": engine.now() - 60 + n})
        before = engine.get_recommendations("u", k=5)
        with pytest.raises(BundleError, match="item_factors holds NaN"):
            engine.load_bundle(poisoned)
        after = engine.get_recommendations("u", k=5)
        assert after.item_ids == before.item_ids
        assert all(np.isfinite(r.score) for r in after)


def _with_bad(catalog: Catalog, name: str, value: float) -> Catalog:
    if name.startswith("segments/"):
        seg = catalog.segments[0]
        assert seg.centroid is not None
        centroid = seg.centroid.copy()
        centroid[-1] = value
        segments = (dataclasses.replace(seg, centroid=centroid), *catalog.segments[1:])
        return dataclasses.replace(catalog, segments=segments)
    array = getattr(catalog, name).copy()
    array.reshape(-1)[-1] = value
    return dataclasses.replace(catalog, **{name: array})


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("name", FLOAT_ARRAYS)
def test_non_finite_values_are_refused_at_build_and_by_the_shared_check(
    tmp_path: Path, key: Ed25519PrivateKey, name: str, bad: str
) -> None:
    catalog = _with_bad(make_catalog(3), name, BAD[bad])
    with pytest.raises(BundleError, match="NaN or infinite"):
        validate_catalog(catalog)  # the very check the device runs at load
    with pytest.raises(BundleError, match="NaN or infinite"):
        write_bundle(catalog, tmp_path / "c.odb", private_key=key)
    assert os.listdir(tmp_path) == []


def test_the_check_covers_large_arrays_chunk_by_chunk() -> None:
    from ondevice import bundle

    n = bundle._FINITE_CHUNK * 2 + 5  # spans three chunks
    values = np.ones(n, dtype=np.float32)
    bundle._check_finite(values, "x")
    for position in (0, bundle._FINITE_CHUNK - 1, bundle._FINITE_CHUNK, n - 1):
        poisoned = values.copy()
        poisoned[position] = np.inf
        with pytest.raises(BundleError, match=f"first at flat index {position}"):
            bundle._check_finite(poisoned, "x")
    bundle._check_finite(np.zeros((0, 4), dtype=np.float32), "empty")
