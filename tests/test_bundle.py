"""The signed catalog bundle: round trips, and every way a bundle must be refused."""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondevice.bundle import (
    ALIGNMENT,
    MAGIC,
    PREFIX,
    SIGNATURE_CONTEXT,
    SIGNATURE_SIZE,
    load_bundle,
    verify_bundle,
)
from ondevice.catalog import AlsParams, Catalog, Segment, SegmentRule
from ondevice.errors import BundleError
from ondevice.operator.bundle_writer import (
    generate_signing_key,
    private_key_bytes,
    public_key_bytes,
    signing_key_from_bytes,
)
from ondevice.operator.bundle_writer import write_bundle as _write_any_format

# This module pins format 1 (full precision, JSON string lists), which devices still
# read; tests/test_bundle_v2.py covers format 2, the writer's default.
write_bundle = functools.partial(_write_any_format, format_version=1)

N_FACTORS = 4


def make_catalog(
    seed: int = 0,
    *,
    n: int = 30,
    factors: bool = True,
    segments: bool = True,
    categories: bool = True,
) -> Catalog:
    """A small random catalog that satisfies every invariant."""
    rng = np.random.default_rng(seed)
    degrees = rng.integers(0, 6, size=n)
    indptr = np.concatenate([[0], np.cumsum(degrees)]).astype(np.int64)
    indices = rng.integers(0, n, size=int(indptr[-1])).astype(np.int32)
    weights = np.concatenate(
        [np.sort(rng.random(d))[::-1] for d in degrees] + [np.zeros(0)]
    ).astype(np.float32)
    y = rng.standard_normal((n, N_FACTORS)).astype(np.float32) if factors else None
    segs: tuple[Segment, ...] = ()
    rules: tuple[SegmentRule, ...] = ()
    if segments:
        segs = tuple(
            Segment(
                id=10 + s,
                name=f"segment {s}",
                panel_users=50 + s,
                top_items=rng.choice(n, size=min(n, 5), replace=False).astype(np.int32),
                centroid=rng.standard_normal(N_FACTORS).astype(np.float32)
                if factors and s != 1
                else None,
            )
            for s in range(3)
        )
        rules = (
            SegmentRule(segment=11, when={"plan": ("pro", "team"), "usage": ("daily",)}),
            SegmentRule(segment=12, when={"industry": ("retail",)}),
        )
    cats = None
    if categories:
        names = ("drama", "comedy", "thriller", "documentary")
        cats = tuple(
            tuple(names[j] for j in sorted(rng.choice(4, size=i % 3, replace=False)))
            for i in range(n)
        )
    return Catalog(
        item_ids=tuple(f"item-{i}" for i in range(n)),
        titles=tuple(f"Title {i} \N{BLACK STAR}" for i in range(n)),
        popularity=rng.random(n).astype(np.float32),
        nbr_indptr=indptr,
        nbr_indices=indices,
        nbr_weights=weights,
        segments=segs,
        segment_rules=rules,
        default_segment=10 if segments else 0,
        categories=cats,
        item_factors=y,
        gram=None if y is None else y.T @ y,
        als=AlsParams(factors=N_FACTORS, regularization=0.1, alpha=4.0) if factors else None,
        name=f"test catalog {seed}",
        created_at=1_700_000_000.5 + seed,
        extra={"source": "synthetic", "seed": str(seed)},
    )


def assert_same_catalog(got: Catalog, want: Catalog) -> None:
    """Field by field: arrays equal with the same dtype, everything else equal."""

    def same_array(a: Any, b: Any) -> None:
        if b is None:
            assert a is None
            return
        assert isinstance(a, np.ndarray)
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)

    for name in ("popularity", "nbr_indptr", "nbr_indices", "nbr_weights", "item_factors", "gram"):
        same_array(getattr(got, name), getattr(want, name))
    for name in (
        "item_ids",
        "titles",
        "categories",
        "segment_rules",
        "default_segment",
        "als",
        "name",
        "created_at",
        "extra",
    ):
        assert getattr(got, name) == getattr(want, name), name
    assert len(got.segments) == len(want.segments)
    for gs, ws in zip(got.segments, want.segments, strict=True):
        assert (gs.id, gs.name, gs.panel_users) == (ws.id, ws.name, ws.panel_users)
        same_array(gs.top_items, ws.top_items)
        same_array(gs.centroid, ws.centroid)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def pinned(key: Ed25519PrivateKey) -> bytes:
    return public_key_bytes(key)


@pytest.fixture(scope="module")
def bundle_bytes(key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "catalog.odb"
    write_bundle(make_catalog(7, n=12), path, private_key=key)
    return path.read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file path that the property tests overwrite for every example."""
    return tmp_path_factory.mktemp("scratch") / "candidate.odb"


def refuse(path: Path, data: bytes, pinned: bytes) -> BundleError:
    """Write ``data`` to ``path``, load it, and return the BundleError it must raise."""
    path.write_bytes(data)
    with pytest.raises(BundleError) as caught:
        load_bundle(path, public_key=pinned)
    return caught.value


def resign(
    data: bytes,
    key: Ed25519PrivateKey,
    *,
    header: Callable[[dict[str, Any]], None] | None = None,
    region: Callable[[bytearray, dict[str, dict[str, Any]]], None] | None = None,
) -> bytes:
    """Rebuild a bundle with a mutated header and/or array region, correctly signed, so
    that a load gets past the signature and reaches the structural checks."""
    _, version, flags, header_len, data_start, data_len = PREFIX.unpack_from(data, 0)
    head = json.loads(data[PREFIX.size : PREFIX.size + header_len])
    arrays = bytearray(data[data_start : data_start + data_len])
    if region is not None:
        region(arrays, {a["name"]: a for a in head["arrays"]})
    if header is not None:
        header(head)
    new_header = json.dumps(head).encode()
    new_start = -(-(PREFIX.size + len(new_header)) // ALIGNMENT) * ALIGNMENT
    body = (
        PREFIX.pack(MAGIC, version, flags, len(new_header), new_start, len(arrays))
        + new_header
        + bytes(new_start - PREFIX.size - len(new_header))
        + bytes(arrays)
    )
    return body + key.sign(SIGNATURE_CONTEXT + hashlib.sha256(body).digest())


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("factors", [True, False], ids=["factors", "no-factors"])
@pytest.mark.parametrize("segments", [True, False], ids=["segments", "no-segments"])
@pytest.mark.parametrize("categories", [True, False], ids=["categories", "no-categories"])
def test_round_trip_returns_an_equal_catalog(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    pinned: bytes,
    factors: bool,
    segments: bool,
    categories: bool,
) -> None:
    catalog = make_catalog(3, factors=factors, segments=segments, categories=categories)
    path = tmp_path / "catalog.odb"
    write_bundle(catalog, path, private_key=key)
    assert_same_catalog(load_bundle(path, public_key=pinned), catalog)
    assert_same_catalog(load_bundle(path, public_key=pinned, in_memory=True), catalog)


def test_round_trip_of_an_empty_catalog(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    catalog = make_catalog(0, n=0, segments=False)
    path = tmp_path / "empty.odb"
    write_bundle(catalog, path, private_key=key)
    assert_same_catalog(load_bundle(path, public_key=key.public_key()), catalog)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_holds_for_random_catalogs(seed: int, n: int) -> None:
    key = signing_key_from_bytes(bytes(32))
    catalog = make_catalog(seed, n=n, factors=seed % 2 == 0, categories=seed % 3 != 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.odb"
        write_bundle(catalog, path, private_key=key)
        assert_same_catalog(load_bundle(path, public_key=public_key_bytes(key)), catalog)


def test_loaded_arrays_are_read_only(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "c.odb"
    write_bundle(make_catalog(1), path, private_key=key)
    for in_memory in (False, True):
        catalog = load_bundle(path, public_key=key.public_key(), in_memory=in_memory)
        assert catalog.item_factors is not None
        for array in (catalog.popularity, catalog.nbr_indices, catalog.item_factors):
            with pytest.raises(ValueError, match="read-only"):
                array[0] = 0


def test_arrays_stay_valid_after_the_file_is_replaced_and_deleted(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    path = tmp_path / "c.odb"
    original = make_catalog(1)
    write_bundle(original, path, private_key=key)
    loaded = load_bundle(path, public_key=pinned)
    write_bundle(make_catalog(2), path, private_key=key)  # renamed over the mapped file
    assert_same_catalog(load_bundle(path, public_key=pinned), make_catalog(2))
    path.unlink()
    gc.collect()
    assert_same_catalog(loaded, original)


@pytest.mark.parametrize("in_memory", [None, True, False], ids=["default", "True", "False"])
def test_a_load_ignores_later_writes_to_the_same_file(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes, in_memory: bool | None
) -> None:
    # Every load reads into private memory (in_memory is accepted and ignored): see
    # tests/test_bundle_file_changes.py for truncation (SIGBUS) in a child process.
    path = tmp_path / "c.odb"
    original = make_catalog(1)
    write_bundle(original, path, private_key=key)
    kwargs = {} if in_memory is None else {"in_memory": in_memory}
    loaded = load_bundle(path, public_key=pinned, **kwargs)
    with open(path, "r+b") as f:  # overwrite the same inode in place
        f.write(bytes(os.path.getsize(path)))
    assert_same_catalog(loaded, original)


def test_verify_bundle_describes_the_signed_content(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    path = tmp_path / "c.odb"
    catalog = make_catalog(5)
    written = write_bundle(catalog, path, private_key=key)
    info = verify_bundle(path, public_key=pinned)
    data = path.read_bytes()
    assert info == written
    assert info.sha256 == hashlib.sha256(data[:-SIGNATURE_SIZE]).hexdigest()
    assert (info.n_items, info.n_factors, info.n_segments) == (30, N_FACTORS, 3)
    assert info.size == len(data)


def test_layout_aligns_every_array(bundle_bytes: bytes) -> None:
    magic, version, _, header_len, data_start, data_len = PREFIX.unpack_from(bundle_bytes, 0)
    assert (magic, version) == (MAGIC, 1)
    assert data_start % ALIGNMENT == 0 and data_len % ALIGNMENT == 0
    assert len(bundle_bytes) == data_start + data_len + SIGNATURE_SIZE
    header = json.loads(bundle_bytes[PREFIX.size : PREFIX.size + header_len])
    offsets = [a["offset"] for a in header["arrays"]]
    assert all(o % ALIGNMENT == 0 for o in offsets)
    popularity = next(a for a in header["arrays"] if a["name"] == "popularity")
    start = data_start + popularity["offset"]
    raw = np.frombuffer(bundle_bytes, "<f4", count=popularity["shape"][0], offset=start)
    np.testing.assert_array_equal(raw, make_catalog(7, n=12).popularity)


# --- keys ------------------------------------------------------------------------------


def test_raw_key_bytes_round_trip(tmp_path: Path) -> None:
    key = generate_signing_key()
    again = signing_key_from_bytes(private_key_bytes(key))
    assert public_key_bytes(again) == public_key_bytes(key) == public_key_bytes(key.public_key())
    path = tmp_path / "c.odb"
    write_bundle(make_catalog(), path, private_key=private_key_bytes(key))
    load_bundle(path, public_key=public_key_bytes(key))


def test_a_malformed_pinned_key_is_a_bundle_error(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    path = tmp_path / "c.odb"
    write_bundle(make_catalog(), path, private_key=key)
    for bad in (b"", public_key_bytes(key)[:31], "not a key"):
        with pytest.raises(BundleError, match="pinned public key"):
            load_bundle(path, public_key=bad)  # type: ignore[arg-type]


# --- refusals: signature and integrity -------------------------------------------------


def test_every_single_bit_flip_is_refused(
    bundle_bytes: bytes, scratch: Path, pinned: bytes
) -> None:
    for position in range(len(bundle_bytes)):
        damaged = bytearray(bundle_bytes)
        damaged[position] ^= 0x01
        refuse(scratch, bytes(damaged), pinned)


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_flipped_byte_anywhere_is_refused(
    data: st.DataObject, bundle_bytes: bytes, scratch: Path, pinned: bytes
) -> None:
    position = data.draw(st.integers(0, len(bundle_bytes) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    damaged = bytearray(bundle_bytes)
    damaged[position] ^= mask
    refuse(scratch, bytes(damaged), pinned)


@given(data=st.data())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_truncated_bundle_is_refused(
    data: st.DataObject, bundle_bytes: bytes, scratch: Path, pinned: bytes
) -> None:
    length = data.draw(st.integers(0, len(bundle_bytes) - 1), label="length")
    refuse(scratch, bundle_bytes[:length], pinned)


def test_truncated_arrays_are_refused_as_truncated(
    bundle_bytes: bytes, scratch: Path, pinned: bytes
) -> None:
    error = refuse(scratch, bundle_bytes[: len(bundle_bytes) - SIGNATURE_SIZE - 100], pinned)
    assert "truncated" in str(error)


def test_a_bundle_signed_by_another_key_is_refused(tmp_path: Path, pinned: bytes) -> None:
    path = tmp_path / "c.odb"
    write_bundle(make_catalog(), path, private_key=generate_signing_key())
    with pytest.raises(BundleError, match="signature does not verify"):
        load_bundle(path, public_key=pinned)


def test_a_stripped_signature_is_refused(bundle_bytes: bytes, scratch: Path, pinned: bytes) -> None:
    error = refuse(scratch, bundle_bytes[:-SIGNATURE_SIZE], pinned)
    assert "not signed" in str(error)


def test_an_all_zero_signature_is_refused(
    bundle_bytes: bytes, scratch: Path, pinned: bytes
) -> None:
    error = refuse(scratch, bundle_bytes[:-SIGNATURE_SIZE] + bytes(SIGNATURE_SIZE), pinned)
    assert "not signed" in str(error)


def test_bytes_after_the_signature_are_refused(
    bundle_bytes: bytes, scratch: Path, pinned: bytes
) -> None:
    assert "unexpected bytes" in str(refuse(scratch, bundle_bytes + b"\0", pinned))


def test_a_bumped_version_is_refused_naming_the_version(
    bundle_bytes: bytes, scratch: Path, pinned: bytes, key: Ed25519PrivateKey
) -> None:
    bumped = bytearray(bundle_bytes)
    bumped[8:10] = (3).to_bytes(2, "little")
    error = refuse(scratch, bytes(bumped), pinned)
    assert "version 3" in str(error) and "newer ondevice" in str(error)
    # Even correctly signed by the right key, version 3 is not something this code reads.
    body = bytes(bumped[:-SIGNATURE_SIZE])
    signed = body + key.sign(SIGNATURE_CONTEXT + hashlib.sha256(body).digest())
    assert "version 3" in str(refuse(scratch, signed, pinned))
    # A format 1 file relabelled as format 2 is not a format 2 file: refused, not misread.
    relabelled = bytearray(bundle_bytes)
    relabelled[8:10] = (2).to_bytes(2, "little")
    assert "truncated" in str(refuse(scratch, bytes(relabelled), pinned))


def test_wrong_magic_is_refused(bundle_bytes: bytes, scratch: Path, pinned: bytes) -> None:
    error = refuse(scratch, b"PK\x03\x04" + bundle_bytes[4:], pinned)
    assert "magic" in str(error)


def test_a_missing_or_empty_file_is_a_bundle_error(tmp_path: Path, pinned: bytes) -> None:
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path / "absent.odb", public_key=pinned)
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path, public_key=pinned)  # a directory is no bundle
    (tmp_path / "empty.odb").write_bytes(b"")
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(tmp_path / "empty.odb", public_key=pinned)


# --- refusals: structure behind a valid signature -----------------------------------------


def _entry(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda h: next(a for a in h["arrays"] if a["name"] == name)


def _set(name: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda h: _entry(name)(h).update(fields)


def _drop_array(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda h: h["arrays"].remove(_entry(name)(h))


def _duplicate_array(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda h: h["arrays"].append(dict(_entry(name)(h)))


def _overlap(h: dict[str, Any]) -> None:
    _entry("nbr_weights")(h)["offset"] = _entry("nbr_indices")(h)["offset"]


def _gram_reshaped(h: dict[str, Any]) -> None:
    _entry("gram")(h)["shape"] = [N_FACTORS // 2, N_FACTORS * 2]


def _misalign_gram(h: dict[str, Any]) -> None:
    _entry("gram")(h)["offset"] += 4


def _no_category_sets(h: dict[str, Any]) -> None:
    h["category_sets"] = None  # leaves the category_set_index array unreferenced


def _popularity_short(h: dict[str, Any]) -> None:
    _entry("popularity")(h).update(shape=[11], length=44)


STRUCTURAL = {
    "dtype-unsupported": (_set("popularity", dtype="<f8", length=96), "unsupported dtype"),
    "dtype-wrong-for-name": (_set("nbr_indptr", dtype="<f4", length=52), "nbr_indptr"),
    "length-disagrees-with-shape": (_set("popularity", length=40), "needs 48"),
    "offset-out-of-bounds": (_set("gram", offset=1 << 20), "outside"),
    "offset-misaligned": (_misalign_gram, "misaligned"),
    "negative-shape": (_set("popularity", shape=[-12]), "invalid shape"),
    "overlapping-arrays": (_overlap, "overlaps"),
    "missing-array": (_drop_array("nbr_weights"), "'nbr_weights' is missing"),
    "duplicated-array": (_duplicate_array("gram"), "listed twice"),
    "unused-array": (_no_category_sets, "not used"),
    "gram-not-square": (_gram_reshaped, "gram must be float32"),
    "length-not-n-items": (_popularity_short, "popularity must be float32"),
    "n-items-disagrees": (lambda h: h.update(n_items=13), "n_items is 13"),
    "titles-too-few": (lambda h: h["titles"].pop(), "titles must be 12"),
    "duplicate-ids": (lambda h: h["item_ids"].__setitem__(1, h["item_ids"][0]), "not unique"),
    "unknown-header-key": (lambda h: h.update(extra_field=1), "unknown"),
    "missing-header-key": (lambda h: h.pop("als"), "missing"),
    "bad-default-segment": (lambda h: h.update(default_segment=99), "default_segment 99"),
    "rule-unknown-segment": (lambda h: h["segment_rules"][0].update(segment=99), "unknown segment"),
    "factors-without-als": (lambda h: h.update(als=None), "AlsParams"),
    "als-factors-mismatch": (lambda h: h["als"].update(factors=N_FACTORS + 1), "AlsParams"),
    "id-not-a-string": (lambda h: h["item_ids"].__setitem__(0, 5), "strings"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURAL))
def test_a_signed_but_inconsistent_header_is_refused(
    case: str, bundle_bytes: bytes, scratch: Path, pinned: bytes, key: Ed25519PrivateKey
) -> None:
    mutate, message = STRUCTURAL[case]
    error = refuse(scratch, resign(bundle_bytes, key, header=mutate), pinned)
    assert message in str(error)


def _write_array(name: str, dtype: str, index: int, value: int) -> Any:
    def mutate(region: bytearray, table: dict[str, dict[str, Any]]) -> None:
        array = np.frombuffer(
            region, dtype, offset=table[name]["offset"], count=int(np.prod(table[name]["shape"]))
        )
        array[index] = value

    return mutate


REGION = {
    "neighbour-index-too-large": (_write_array("nbr_indices", "<i4", 0, 12), "out of range"),
    "neighbour-index-negative": (_write_array("nbr_indices", "<i4", 1, -1), "out of range"),
    "indptr-not-monotone": (_write_array("nbr_indptr", "<i8", 3, 10**6), "not monotone"),
    "indptr-not-starting-at-zero": (_write_array("nbr_indptr", "<i8", 0, 1), "start at 0"),
    "top-item-out-of-range": (
        _write_array("segments/0/top_items", "<i4", 0, 12),
        "top item is out of range",
    ),
    "category-set-out-of-range": (
        _write_array("category_set_index", "<i4", 0, 1000),
        "category set index",
    ),
}


@pytest.mark.parametrize("case", sorted(REGION))
def test_signed_arrays_that_break_catalog_invariants_are_refused(
    case: str, bundle_bytes: bytes, scratch: Path, pinned: bytes, key: Ed25519PrivateKey
) -> None:
    mutate, message = REGION[case]
    error = refuse(scratch, resign(bundle_bytes, key, region=mutate), pinned)
    assert message in str(error)


def test_the_resign_helper_alone_yields_a_loadable_bundle(
    bundle_bytes: bytes, scratch: Path, pinned: bytes, key: Ed25519PrivateKey
) -> None:
    scratch.write_bytes(resign(bundle_bytes, key, header=lambda h: None))
    assert_same_catalog(load_bundle(scratch, public_key=pinned), make_catalog(7, n=12))


# --- the writer ------------------------------------------------------------------------


def _replace(catalog: Catalog, **fields: Any) -> Catalog:
    values = {name: getattr(catalog, name) for name in Catalog.__dataclass_fields__}
    values.update(fields)
    return Catalog(**values)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"nbr_indptr": np.zeros(31, np.int64)}, "nbr_indptr must start at 0"),
        ({"popularity": np.zeros(30, np.float64)}, "popularity must be float32"),
        ({"gram": None}, "both present"),
        ({"nbr_weights": None}, "nbr_weights must be"),
        ({"default_segment": 3}, "default_segment"),
        ({"categories": (("a",),)}, "categories must be"),
    ],
)
def test_write_refuses_an_invalid_catalog_and_leaves_the_destination_alone(
    tmp_path: Path, key: Ed25519PrivateKey, fields: dict[str, Any], message: str
) -> None:
    path = tmp_path / "c.odb"
    path.write_bytes(b"previous bundle")
    with pytest.raises(BundleError, match=message):
        write_bundle(_replace(make_catalog(), **fields), path, private_key=key)
    assert path.read_bytes() == b"previous bundle"
    assert os.listdir(tmp_path) == ["c.odb"]


def test_write_refuses_values_the_device_would_not_check(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    catalog = make_catalog()
    assert catalog.item_factors is not None and catalog.gram is not None
    nan_pop = catalog.popularity.copy()
    nan_pop[3] = np.nan
    unsorted = catalog.nbr_weights.copy()
    row = int(np.argmax(np.diff(catalog.nbr_indptr)))
    lo = int(catalog.nbr_indptr[row])
    unsorted[lo : lo + 2] = unsorted[lo : lo + 2][::-1]
    cases = [
        (_replace(catalog, popularity=nan_pop), "NaN"),
        (_replace(catalog, nbr_weights=unsorted), "sorted by weight"),
        (_replace(catalog, gram=catalog.gram * 2), "gram is not"),
    ]
    for bad, message in cases:
        with pytest.raises(BundleError, match=message):
            write_bundle(bad, tmp_path / "c.odb", private_key=key)
    assert os.listdir(tmp_path) == []


def test_write_leaves_no_temporary_file_and_replaces_atomically(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    path = tmp_path / "c.odb"
    write_bundle(make_catalog(1), path, private_key=key)
    inode = path.stat().st_ino
    write_bundle(make_catalog(2), path, private_key=key)
    assert os.listdir(tmp_path) == ["c.odb"]
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert_same_catalog(load_bundle(path, public_key=pinned), make_catalog(2))


def test_write_into_a_missing_directory_is_a_bundle_error(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with pytest.raises(BundleError, match="cannot write"):
        write_bundle(make_catalog(), tmp_path / "no" / "c.odb", private_key=key)


def test_the_device_module_does_not_import_operator_code() -> None:
    code = (
        "import sys, ondevice.bundle; "
        "bad = [m for m in sys.modules if m.startswith('ondevice.operator')]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
