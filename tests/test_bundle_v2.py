"""Bundle format 2: compact encodings, string tables and chunked verification.

Round trips are exact where the format is exact (ids, titles, categories, popularity,
neighbour lists, segments) and within the stated quantization error elsewhere (item
factors: half a step of each item's int8 scale; neighbour weights: 1.6% relative).
Tampering with any chunk is refused before any byte of the file is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_bundle import make_catalog

from ondevice import _bundle2, scoring
from ondevice._bundle2 import ItemIndex, StringTable
from ondevice.bundle import (
    MAGIC,
    PREFIX,
    SIGNATURE_CONTEXT_V2,
    SIGNATURE_SIZE,
    load_bundle,
    load_bundle_with_info,
    verify_bundle,
)
from ondevice.catalog import AlsParams, Catalog
from ondevice.errors import BundleError
from ondevice.levels.base import CatalogRuntime
from ondevice.operator import bundle_writer
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def pinned(key: Ed25519PrivateKey) -> bytes:
    return public_key_bytes(key)


def _with_unicode_ids(catalog: Catalog) -> Catalog:
    """Ids and titles with multi-byte characters, empty titles and unsorted order."""
    n = catalog.n_items
    ids = tuple(f"{['zé', 'a', 'Ω', 'b', '日本'][i % 5]}-{n - i}" for i in range(n))
    titles = tuple("" if i % 7 == 0 else f"Tïtle {i} \N{BLACK STAR}" for i in range(n))
    return _replace(catalog, item_ids=ids, titles=titles)


def _replace(catalog: Catalog, **fields: Any) -> Catalog:
    values = {name: getattr(catalog, name) for name in Catalog.__dataclass_fields__}
    values.update(fields)
    return Catalog(**values)


@pytest.mark.parametrize("factors", [True, False])
@pytest.mark.parametrize("categories", [True, False])
def test_round_trip_exact_where_exact_and_within_the_stated_error_elsewhere(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes, factors: bool, categories: bool
) -> None:
    want = _with_unicode_ids(make_catalog(3, n=60, factors=factors, categories=categories))
    info = write_bundle(want, tmp_path / "c.odb", private_key=key)
    got, loaded = load_bundle_with_info(tmp_path / "c.odb", public_key=pinned)
    assert info.format_version == loaded.format_version == 2
    assert info.sha256 == loaded.sha256 and info.size == (tmp_path / "c.odb").stat().st_size

    assert list(got.item_ids) == list(want.item_ids)
    assert list(got.titles) == list(want.titles)
    if categories:
        assert got.categories is not None and want.categories is not None
        assert [tuple(sorted(set(c))) for c in want.categories] == list(got.categories)
    else:
        assert got.categories is None
    np.testing.assert_array_equal(got.popularity, want.popularity)
    np.testing.assert_array_equal(got.nbr_indptr, want.nbr_indptr)
    np.testing.assert_array_equal(got.nbr_indices, want.nbr_indices)
    # one byte per weight: at most exp(step / 2) - 1 = 1.6% off, never zero, order kept
    bound = np.exp(_bundle2.WEIGHT_STEP / 2) - 1
    rel = np.abs(got.nbr_weights - want.nbr_weights) / want.nbr_weights
    assert rel.max() <= bound + 1e-6 and (got.nbr_weights > 0).all()
    for i in range(want.n_items):
        _, w = got.neighbours_of(i)
        assert (np.diff(w) <= 0).all()
    assert [s.id for s in got.segments] == [s.id for s in want.segments]
    for gs, ws in zip(got.segments, want.segments, strict=True):
        np.testing.assert_array_equal(gs.top_items, ws.top_items)
        if ws.centroid is None:
            assert gs.centroid is None
        else:
            np.testing.assert_array_equal(gs.centroid, ws.centroid)
    assert (got.segment_rules, got.default_segment, got.als, got.name, got.created_at) == (
        want.segment_rules, want.default_segment, want.als, want.name, want.created_at
    )
    assert dict(got.extra) == dict(want.extra)

    if not factors:
        assert got.item_factors is None and got.gram is None
        return
    assert got.item_factors is not None and want.item_factors is not None and got.gram is not None
    scale = np.abs(want.item_factors).max(axis=1) / 127
    err = np.abs(got.item_factors - want.item_factors)
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert err.max() > 0  # it really is quantized
    # scores of any user vector stay within sum_j (scale_i / 2) |x_j| of full precision
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.standard_normal(want.item_factors.shape[1]).astype(np.float32)
        diff = np.abs(got.item_factors @ x - want.item_factors @ x)
        assert (diff <= scale * np.abs(x).sum() / 2 + 1e-5).all()
    # the Gram matrix is that of the quantized factors: the device's fold-in is exact
    y = got.item_factors.astype(np.float64)
    np.testing.assert_allclose(got.gram, y.T @ y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 3, 1 << 14])
@pytest.mark.parametrize("prefix", ["", "sku-", "日-"])
def test_iterating_a_string_table_gives_what_indexing_gives(
    block: int, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bundle2, "_ITER_BLOCK", block)
    strings = ["a", "", "zé", "日本", "x" * 40, "", "b\x00c", "é"]
    encoded = [t.encode("utf-8") for t in strings]
    offsets = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    monkeypatch.setattr(_bundle2, "_STRING_MEMO", 3)  # the memo of decoded strings fills
    table = StringTable(offsets, blob, prefix=prefix)
    want = [prefix + t for t in strings]
    assert list(table) == want == [table[i] for i in range(len(table))]
    rng = np.random.default_rng(block)
    for i in rng.integers(-len(want), len(want), size=60).tolist():
        assert table[i] == want[i] and table[np.int64(i)] == want[i]
    with pytest.raises(IndexError):
        table[len(want)]
    empty = StringTable(np.zeros(1, np.int64), np.zeros(0, np.uint8), prefix=prefix)
    assert list(empty) == []


@pytest.mark.parametrize("search", [True, False], ids=["binary-search", "dictionary"])
def test_the_runtime_finds_every_id_and_nothing_else(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes, monkeypatch: pytest.MonkeyPatch,
    search: bool,
) -> None:
    if search:  # as if the catalog had millions of items
        monkeypatch.setattr(_bundle2, "INDEX_DICT_LIMIT", 0)
    monkeypatch.setattr(_bundle2, "_ITER_BLOCK", 7)  # the dictionary is built across blocks
    want = _with_unicode_ids(make_catalog(5, n=200))
    write_bundle(want, tmp_path / "c.odb", private_key=key)
    got = load_bundle(tmp_path / "c.odb", public_key=pinned)
    assert isinstance(got.item_ids, StringTable)
    rt = CatalogRuntime(got, "fp")
    assert (rt.index._table is not None) == search
    for _ in range(2):  # the second pass answers from the memo
        for i, item in enumerate(want.item_ids):
            assert rt.index.get(item) == i and item in rt.index and rt.index[item] == i
        for missing in ("", "zé", "zé-0", "item-1", "\udcff", "日本-999"):
            assert rt.index.get(missing) is None and missing not in rt.index
    assert 3 not in rt.index  # not a string
    with pytest.raises(KeyError):
        rt.index["nope"]
    # the same answers as the dictionary a format 1 catalog gets
    assert all(ItemIndex(want.item_ids).get(i) == rt.index.get(i) for i in want.item_ids)
    # the precomputed popularity order is the one the runtime would compute
    pop = want.popularity.astype(np.float64)
    np.testing.assert_array_equal(
        rt.pop_order, np.lexsort((np.arange(want.n_items), -pop)).astype(np.int32)
    )
    names, indptr, indices = scoring.category_index(want.categories, want.n_items)
    assert rt.cat_names == names
    rows = rt.category_rows(np.arange(want.n_items))
    if rt.cat_set_of is not None:  # few distinct sets: one row per set
        assert rt.cat_indptr.size - 1 < want.n_items
    for i, r in enumerate(rows.tolist()):
        np.testing.assert_array_equal(
            rt.cat_indices[rt.cat_indptr[r] : rt.cat_indptr[r + 1]],
            indices[indptr[i] : indptr[i + 1]],
        )


def test_the_compact_format_is_smaller(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    catalog = _wide(2_000, factors=32)
    v1 = write_bundle(catalog, tmp_path / "v1.odb", private_key=key, format_version=1)
    v2 = write_bundle(catalog, tmp_path / "v2.odb", private_key=key)
    assert v2.size < 0.5 * v1.size, (v1.size, v2.size)
    assert verify_bundle(tmp_path / "v1.odb", public_key=pinned).format_version == 1


def test_a_string_that_is_not_unicode_text_is_refused_by_the_writer(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    catalog = make_catalog(1, n=5)
    bad = _replace(catalog, titles=("ok", "\udcff", "ok", "ok", "ok"))
    with pytest.raises(BundleError, match="surrogate"):
        write_bundle(bad, tmp_path / "c.odb", private_key=key)
    assert not (tmp_path / "c.odb").exists()


def _wide(n: int, *, factors: int, degree: int = 10, seed: int = 0) -> Catalog:
    """A catalog big enough to span several chunks."""
    rng = np.random.default_rng(seed)
    indptr = np.arange(0, (n + 1) * degree, degree, dtype=np.int64)
    weights = -np.sort(-rng.random((n, degree)), axis=1).astype(np.float32).ravel() + 1e-3
    y = rng.standard_normal((n, factors)).astype(np.float32)
    return Catalog(
        item_ids=tuple(f"sku-{i:07d}" for i in range(n)),
        titles=tuple(f"A title of item {i}" for i in range(n)),
        popularity=rng.random(n).astype(np.float32),
        nbr_indptr=indptr,
        nbr_indices=rng.integers(0, n, size=n * degree).astype(np.int32),
        nbr_weights=weights,
        item_factors=y,
        gram=(y.astype(np.float64).T @ y).astype(np.float32),
        als=AlsParams(factors=factors, regularization=0.1, alpha=2.0),
        created_at=1_800_000_000.0,
    )


@pytest.fixture(scope="module")
def multi_chunk(tmp_path_factory: pytest.TempPathFactory, key: Ed25519PrivateKey) -> bytes:
    path = tmp_path_factory.mktemp("chunks") / "big.odb"
    write_bundle(_wide(20_000, factors=64, degree=20), path, private_key=key)
    data = path.read_bytes()
    assert _bundle2.chunk_count(_content_end(data)) >= 3
    return data


def _content_end(data: bytes) -> int:
    _, _, _, _, start, length = PREFIX.unpack(data[: PREFIX.size])
    return int(start + length)


def _refused(tmp_path: Path, data: bytes, pinned: bytes) -> str:
    path = tmp_path / "bad.odb"
    path.write_bytes(data)
    with pytest.raises(BundleError) as caught:
        load_bundle(path, public_key=pinned)
    return str(caught.value)


def test_a_changed_byte_in_any_chunk_is_refused_naming_the_chunk(
    multi_chunk: bytes, tmp_path: Path, pinned: bytes
) -> None:
    end = _content_end(multi_chunk)
    chunks = _bundle2.chunk_count(end)
    for i in range(chunks):
        lo, hi = i * _bundle2.CHUNK_SIZE, min((i + 1) * _bundle2.CHUNK_SIZE, end)
        for where in (lo if i else PREFIX.size + 5, (lo + hi) // 2, hi - 1):
            bad = bytearray(multi_chunk)
            bad[where] ^= 0x01
            message = _refused(tmp_path, bytes(bad), pinned)
            assert f"chunk {i} " in message and "signed digest" in message, (i, where)


def test_the_chunk_table_and_the_signature_are_covered(
    multi_chunk: bytes, tmp_path: Path, pinned: bytes
) -> None:
    end = _content_end(multi_chunk)
    for where in (end, end + 40, len(multi_chunk) - SIGNATURE_SIZE, len(multi_chunk) - 1):
        bad = bytearray(multi_chunk)
        bad[where] ^= 0x80
        assert "does not verify" in _refused(tmp_path, bytes(bad), pinned)
    # a prefix that moves the table is caught by the signature too
    bad = bytearray(multi_chunk)
    _, _, _, _, start, length = PREFIX.unpack(multi_chunk[: PREFIX.size])
    bad[: PREFIX.size] = PREFIX.pack(MAGIC, 2, 0, 0, start, length - 64)
    assert "bundle" in _refused(tmp_path, bytes(bad), pinned)


def test_truncated_unsigned_and_padded_files_are_refused(
    multi_chunk: bytes, tmp_path: Path, pinned: bytes
) -> None:
    end = _content_end(multi_chunk)
    assert "truncated" in _refused(tmp_path, multi_chunk[:-1], pinned)
    assert "truncated" in _refused(tmp_path, multi_chunk[: end + 10], pinned)
    assert "not signed" in _refused(tmp_path, multi_chunk[:end], pinned)
    assert "unexpected bytes" in _refused(tmp_path, multi_chunk + b"\0", pinned)
    zeroed = multi_chunk[:-SIGNATURE_SIZE] + bytes(SIGNATURE_SIZE)
    assert "empty signature" in _refused(tmp_path, zeroed, pinned)
    other = public_key_bytes(generate_signing_key())
    assert "does not verify" in _refused(tmp_path, multi_chunk, other)


# --- signed by the right key, but wrong inside ------------------------------------


def _signed(
    catalog: Catalog,
    key: Ed25519PrivateKey,
    *,
    arrays: dict[str, np.ndarray] | None = None,
    header: dict[str, Any] | None = None,
) -> bytes:
    """A correctly signed format 2 file for ``catalog`` with some arrays or header
    fields replaced: what a careless (or hostile) operator could publish."""
    planned, _, head = bundle_writer._plan_v2(catalog)
    named = [(p.name, (arrays or {}).get(p.name, p.array)) for p in planned]
    planned, region_len = bundle_writer._layout(named)
    fields = json.loads(head)
    fields["arrays"] = [
        {"name": p.name, "dtype": p.array.dtype.str, "shape": list(p.array.shape),
         "offset": p.offset, "length": p.array.nbytes}
        for p in planned
    ]
    fields.update(header or {})
    head = json.dumps(fields).encode()
    start = -(-(PREFIX.size + len(head)) // 64) * 64
    body = bytearray(PREFIX.pack(MAGIC, 2, 0, len(head), start, region_len) + head)
    body += bytes(start - len(body))
    region = bytearray(region_len)
    for p in planned:
        raw = p.array.tobytes()
        region[p.offset : p.offset + len(raw)] = raw
    body += region
    table = b"".join(
        hashlib.sha256(body[i : i + _bundle2.CHUNK_SIZE]).digest()
        for i in range(0, len(body), _bundle2.CHUNK_SIZE)
    )
    digest = hashlib.sha256(bytes(body[: PREFIX.size]) + table).digest()
    return bytes(body) + table + key.sign(SIGNATURE_CONTEXT_V2 + digest)


def test_the_signed_helper_alone_yields_a_loadable_bundle(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    catalog = make_catalog(2, n=40)
    (tmp_path / "ok.odb").write_bytes(_signed(catalog, key))
    assert list(load_bundle(tmp_path / "ok.odb", public_key=pinned).item_ids) == list(
        catalog.item_ids
    )


BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "offsets-not-monotone": (
        {"arrays": {"title_offsets": np.array([0, 5, 3] + [3] * 38, np.int32)}},
        "monotone",
    ),
    "offsets-past-the-blob": (
        {"arrays": {"item_id_offsets": np.arange(41, dtype=np.int32) * 1000}},
        "end at the blob",
    ),
    "invalid-utf8": ({"arrays": {"title_bytes": None}}, "UTF-8"),
    "order-not-a-permutation": (
        {"arrays": {"item_id_order": np.zeros(40, np.int32)}},
        "not a permutation",
    ),
    "popularity-order-unsorted": (
        {"arrays": {"popularity_order": np.arange(40, dtype=np.int32)}},
        "popularity_order",
    ),
    "neighbour-out-of-range": ({"arrays": {"nbr_indices": None}}, "out of range"),
    "weight-table-rising": (
        {"arrays": {"nbr_weight_table": np.linspace(0.1, 1, 256).astype(np.float32)}},
        "descending",
    ),
    "weight-table-nan": (
        {"arrays": {"nbr_weight_table": np.full(256, np.nan, np.float32)}},
        "finite",
    ),
    "negative-scale": ({"arrays": {"item_factor_scales": None}}, "between 0 and"),
    "format-1-dtype": (
        {"arrays": {"nbr_indices": None, "_as": "<i4"}},
        "must be",
    ),
    "format-1-header": ({"header": {"item_ids": []}}, "unknown ['item_ids']"),
    "category-out-of-range": ({"arrays": {"category_indices": None}}, "out of range"),
    # offsets whose differences wrap around int64: without the range check first, the
    # lengths telescope back to the right total and np.repeat writes out of bounds
    "category-indptr-wraps": ({"arrays": {"category_indptr": "wrap"}}, "stay between"),
    "nbr-indptr-wraps": ({"arrays": {"nbr_indptr": "wrap"}}, "stay between"),
    "title-offsets-wrap": ({"arrays": {"title_offsets": "wrap"}}, "monotone"),
    # values checked before they size an allocation (bincount of 2**31 - 1: 16 GiB)
    "id-order-negative": ({"arrays": {"item_id_order": np.full(40, -1, np.int32)}},
                          "not a permutation"),
    "id-order-huge": ({"arrays": {"item_id_order": np.full(40, 2**31 - 1, np.int32)}},
                      "not a permutation"),
    "popularity-order-negative": (
        {"arrays": {"popularity_order": np.full(40, -1, np.int32)}}, "out of range"
    ),
    "popularity-order-repeats": (
        {"arrays": {"popularity_order": np.zeros(40, np.int32)}}, "twice"
    ),
    # a permutation that does not sort the ids: every lookup would miss
    "ids-unsorted": ({"arrays": {"item_id_order": np.arange(40, dtype=np.int32)[::-1].copy()}},
                     "not sorted"),
    "scale-overflows": ({"arrays": {"item_factor_scales": np.full(40, 1e37, np.float32)}},
                        "between 0 and"),
    "weight-table-huge": (
        {"arrays": {"nbr_weight_table": np.geomspace(1e38, 1e30, 256).astype(np.float32)}},
        "beyond",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_signed_but_inconsistent_files_are_refused_clearly(
    case: str, tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    catalog = make_catalog(2, n=40)
    change, expected = BROKEN[case]
    planned, _, _ = bundle_writer._plan_v2(catalog)
    current = {p.name: p.array for p in planned}
    arrays = dict(change.get("arrays", {}))
    as_dtype = arrays.pop("_as", None)
    for name, value in list(arrays.items()):
        if isinstance(value, str):  # "wrap"
            end = int(current[name][-1])
            wrapped = np.full(current[name].shape, end, dtype=np.int64)
            info = np.iinfo(np.int64)
            wrapped[0], wrapped[1], wrapped[2] = 0, info.max // 4 * 3, info.min // 2
            arrays[name] = wrapped
            continue
        if value is not None:
            continue
        original = current[name].copy()
        if name == "title_bytes":
            original[:2] = [0xC3, 0x28]  # an invalid two-byte sequence
        elif name in ("nbr_indices", "category_indices"):
            if as_dtype:
                original = original.astype(as_dtype)
            else:
                original[0] = 60_000
        elif name == "item_factor_scales":
            original[3] = -1.0
        arrays[name] = original
    message = _refused(
        tmp_path, _signed(catalog, key, arrays=arrays, header=change.get("header")), pinned
    )
    assert expected in message, message


# --- large catalogs stay compact in memory ------------------------------------------


def _users(engine: Any) -> None:
    rng = np.random.default_rng(4)
    for u in range(4):
        for n, item in enumerate(rng.choice(400, size=12, replace=False)):
            engine.update_profile(
                f"u{u}", {"item_id": f"sku-{int(item):07d}", "event": "click",
                          "timestamp": engine.now() - 3600 + n},
            )


@pytest.mark.parametrize("level", ["segment", "behavioral", "contextual", "individual"])
def test_a_compact_catalog_answers_as_the_decoded_one(
    level: str, tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ondevice import PersonalizationEngine, RawKey
    from ondevice import bundle as bundle_module

    catalog = _wide(400, factors=16, degree=8)
    write_bundle(catalog, tmp_path / "c.odb", private_key=key)
    decoded = load_bundle(tmp_path / "c.odb", public_key=pinned)
    monkeypatch.setattr(bundle_module, "DECODE_LIMIT", 0)  # as if it were millions of items
    compact = load_bundle(tmp_path / "c.odb", public_key=pinned)
    assert compact.item_factors is not None and compact.item_factors.dtype == np.int8
    assert compact.nbr_weights.dtype == np.uint8 and compact.nbr_weight_table is not None
    assert compact.nbr_indices.dtype == np.uint16
    assert decoded.item_factors is not None and decoded.item_factors.dtype == np.float32

    rng = np.random.default_rng(1)
    x = rng.standard_normal(16).astype(np.float32)
    np.testing.assert_allclose(compact.factor_scores(x), decoded.factor_scores(x), rtol=1e-5,
                               atol=1e-6)
    rows = rng.integers(0, 400, size=30)
    np.testing.assert_array_equal(compact.factor_rows(rows), decoded.factor_rows(rows))
    np.testing.assert_array_equal(compact.decoded_weights(), decoded.nbr_weights)
    for i in (0, 17, 399):
        for a, b in zip(compact.neighbours_of(i), decoded.neighbours_of(i), strict=True):
            np.testing.assert_array_equal(a, b)

    answers = []
    for limit, name in ((0, "compact"), (1 << 40, "decoded")):
        monkeypatch.setattr(bundle_module, "DECODE_LIMIT", limit)
        with PersonalizationEngine(
            tmp_path / name, key=RawKey(bytes(32)), privacy_level=level,
            bundle=tmp_path / "c.odb", bundle_public_key=pinned,
        ) as engine:
            assert (engine.catalog.item_factor_scales is not None) == (name == "compact")
            _users(engine)
            answers.append(
                [list(engine.get_recommendations(f"u{u}", k=10)) for u in range(4)]
            )
    for got, want in zip(*answers, strict=True):
        assert len(got) == len(want) == 10
        assert [(r.item_id, r.explanation) for r in got] == [
            (r.item_id, r.explanation) for r in want
        ]
        np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-5,
                                   atol=1e-6)


def test_duplicate_ids_are_refused_in_format_2_as_in_format_1(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    catalog = make_catalog(2, n=40)
    ids = [f"item-{i}" for i in range(40)]
    ids[7] = ids[8]  # what a buggy (or hostile) signer could publish
    offsets, blob = _bundle2.encode_strings(ids)
    order = np.asarray(sorted(range(40), key=ids.__getitem__), dtype=np.int32)
    arrays = {"item_id_offsets": offsets, "item_id_bytes": blob, "item_id_order": order}
    message = _refused(tmp_path, _signed(catalog, key, arrays=arrays), pinned)
    assert "not unique" in message


def test_a_zero_length_array_cannot_declare_a_huge_dimension(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes
) -> None:
    catalog = make_catalog(2, n=40)
    data = _signed(catalog, key)
    header_len = PREFIX.unpack(data[: PREFIX.size])[3]
    fields = json.loads(data[PREFIX.size : PREFIX.size + header_len])
    # re-declare a segment's top items as [0, 2**62]: zero bytes, so the length agrees
    for entry in fields["arrays"]:
        if entry["name"] == "segments/0/top_items":
            entry["shape"], entry["length"] = [0, 2**62], 0
    message = _refused(tmp_path, _signed(catalog, key, header={"arrays": fields["arrays"]}),
                       pinned)
    assert "invalid shape" in message


def test_a_fifo_in_place_of_the_bundle_is_refused_at_once(tmp_path: Path, pinned: bytes) -> None:
    import os
    import threading

    fifo = tmp_path / "c.odb"
    os.mkfifo(fifo)
    outcome: list[str] = []

    def load() -> None:
        try:
            load_bundle(fifo, public_key=pinned)
        except BundleError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "load_bundle blocked on a FIFO"
    assert outcome and "not a regular file" in outcome[0]


def test_magnitudes_that_would_overflow_scores_are_refused_by_writer_and_reader(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    base = make_catalog(2, n=40)
    huge_weights = _replace(base, nbr_weights=base.nbr_weights * np.float32(1e37))
    with pytest.raises(BundleError, match="beyond"):
        write_bundle(huge_weights, tmp_path / "w.odb", private_key=key)
    assert base.als is not None
    for als in (AlsParams(base.als.factors, 0.1, 1e308), AlsParams(base.als.factors, -1.0, 2.0)):
        with pytest.raises(BundleError, match="alpha in"):
            write_bundle(_replace(base, als=als), tmp_path / "a.odb", private_key=key)
    # a scoring knob beyond MAX_KNOB keeps its default instead
    assert scoring.ScoringParams.from_extra({"scoring.session_boost": "1e300"}).session_boost == (
        scoring.ScoringParams().session_boost
    )


def test_a_level_whose_scores_overflow_gives_way_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ondevice import levels
    from ondevice.levels.base import Answer, Request, UserState
    from ondevice.policy import PrivacyLevel

    rt = CatalogRuntime(make_catalog(2, n=40), "fp")
    overflowing = Answer(items=[1, 2], scores=[float("inf"), 1.0], explanations=["x", "y"])
    chain = [
        (level, (lambda *_: overflowing) if level is PrivacyLevel.INDIVIDUAL else fn)
        for level, fn in levels.CHAIN
    ]
    monkeypatch.setattr(levels, "CHAIN", chain)
    answer = levels.recommend(PrivacyLevel.INDIVIDUAL, rt, UserState("u"), Request(k=3, now=0.0))
    assert answer.level is not PrivacyLevel.INDIVIDUAL
    assert any("out of range" in f for f in answer.fallbacks)
    assert all(np.isfinite(r.score) for r in answer)


def test_a_shared_id_prefix_is_stored_once_and_lookups_stay_exact(
    tmp_path: Path, key: Ed25519PrivateKey, pinned: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bundle2, "INDEX_DICT_LIMIT", 0)  # the sorted-table search
    base = make_catalog(6, n=50)
    ids = (*(f"shop-ß-{i:03d}" for i in range(49)), "shop-ß-")  # one id IS the prefix
    catalog = _replace(base, item_ids=ids)
    write_bundle(catalog, tmp_path / "p.odb", private_key=key)
    got = load_bundle(tmp_path / "p.odb", public_key=pinned)
    assert list(got.item_ids) == list(ids)
    assert isinstance(got.item_ids, StringTable)
    prefix = len("shop-ß-".encode())
    assert got.item_ids._blob.size == sum(len(i.encode()) - prefix for i in ids)  # once
    rt = CatalogRuntime(got, "fp")
    for i, item in enumerate(ids):
        assert rt.index.get(item) == i
    for missing in ("shop-ß", "shop-", "", "shop-ß-0499", "other-001", "shop-ß-049x"):
        assert rt.index.get(missing) is None
    bad = _signed(catalog, key, header={"item_id_prefix": "\ud800"})
    assert "prefix" in _refused(tmp_path, bad, pinned)
