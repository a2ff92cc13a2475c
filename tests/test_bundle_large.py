"""The encodings format 2 uses for large catalogs, exercised at a small size.

From :data:`ondevice._bundle2.LARGE_ITEMS` items the writer stores titles as deflated
blocks and neighbour lists as bit-packed rows, and ships only the head of the popularity
ranking (:data:`ondevice._bundle2.POPULAR_PREFIX`). The thresholds are lowered here so a
300-item catalog takes those paths: what is read back must answer exactly as the plain
encoding does, and a signed file whose encoded parts are nonsense gets a clear
:class:`BundleError`, when loaded or, for the parts decoded per request, when used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_ann import _state, clustered
from test_bundle_v2 import _refused, _signed

from ondevice import _bundle2, _codecs, levels
from ondevice.bundle import load_bundle
from ondevice.catalog import Catalog
from ondevice.errors import BundleError
from ondevice.levels.base import CatalogRuntime, Request
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle
from ondevice.policy import PrivacyLevel

N = 300


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bundle2, "LARGE_ITEMS", 100)
    monkeypatch.setattr(_bundle2, "POPULAR_PREFIX", 16)


def _catalog() -> Catalog:
    catalog = clustered(N, seed=11)
    titles = [f"Titre n°{i} — {'ab' * (i % 7)}" for i in range(N)]
    titles[5] = ""
    cats = tuple((f"c{i % 7}",) if i % 3 else (f"c{i % 7}", "sale") for i in range(N))
    from dataclasses import replace

    return replace(catalog, titles=tuple(titles), categories=cats)


def _load(path: Path, key: Ed25519PrivateKey) -> Catalog:
    return load_bundle(path, public_key=public_key_bytes(key))


def _answers(catalog: Catalog, window: list[str]) -> dict[str, list[str]]:
    rt = CatalogRuntime(catalog, "t")
    out = {}
    for level in ("none", "behavioral", "contextual", "individual"):
        rec = levels.recommend(PrivacyLevel(level), rt, _state(rt, window), Request(k=10, now=9.0))
        assert rec.level == PrivacyLevel(level)
        out[level] = [r.item_id for r in rec]
    return out


def test_large_encodings_read_back_and_answer_as_the_plain_ones(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = _catalog()
    write_bundle(catalog, tmp_path / "plain.odb", private_key=key)
    plain = _load(tmp_path / "plain.odb", key)
    assert plain.nbr_store is None and plain.popularity_order.size == N  # type: ignore[union-attr]

    monkeypatch.setattr(_bundle2, "LARGE_ITEMS", 100)
    monkeypatch.setattr(_bundle2, "POPULAR_PREFIX", 16)
    write_bundle(catalog, tmp_path / "large.odb", private_key=key)
    got = _load(tmp_path / "large.odb", key)
    assert isinstance(got.titles, _codecs.BlockStringTable)
    assert got.nbr_store is not None and got.nbr_indices.size == 0
    assert list(got.titles) == list(catalog.titles)  # exact, unicode and empty included
    assert list(got.categories or ()) == list(catalog.categories or ())
    # 14 distinct category sets among 300 items: stored once each
    assert got.category_table is not None and got.category_table.item_set is not None
    assert got.category_table.indptr.size == 15
    # the neighbour lists: same targets in the same order, the same one-byte weights
    p_indptr, p_indices, p_weights = plain.neighbours_csr()
    g_indptr, g_indices, g_weights = got.neighbours_csr()
    np.testing.assert_array_equal(g_indptr, p_indptr)
    np.testing.assert_array_equal(g_indices, p_indices)
    np.testing.assert_array_equal(g_weights, p_weights)
    # the head of the popularity ranking is the plain ranking's head
    assert got.popularity_order is not None and got.popularity_order.size == 16
    np.testing.assert_array_equal(got.popularity_order, plain.popularity_order[:16])  # type: ignore[index]
    rng = np.random.default_rng(3)
    for _ in range(3):
        window = [str(i) for i in rng.choice(list(catalog.item_ids), size=15, replace=False)]
        assert _answers(got, window) == _answers(plain, window)


def _large_signed(key: Ed25519PrivateKey, arrays: dict[str, np.ndarray]) -> bytes:
    return _signed(_catalog(), key, arrays=arrays)


def test_a_signed_popularity_head_that_skips_a_more_popular_item_is_refused(
    tmp_path: Path, key: Ed25519PrivateKey, large: None
) -> None:
    catalog = _catalog()
    pop = catalog.popularity.astype(np.float64)
    ranking = np.lexsort((np.arange(N), -pop)).astype(np.int32)
    skips_the_top = ranking[1:17].copy()  # sorted, distinct, but the best item left out
    message = _refused(
        tmp_path, _large_signed(key, {"popularity_order": skips_the_top}), public_key_bytes(key)
    )
    assert "left out of popularity_order ranks above it" in message


def test_corrupt_encoded_neighbours_and_titles_give_a_clear_error_when_used(
    tmp_path: Path, key: Ed25519PrivateKey, large: None
) -> None:
    catalog = _catalog()
    packed, _ = _codecs.encode_neighbours_packed(*_plain_neighbours(catalog))
    bad_payload = packed["payload"].copy()
    start = (int(packed["block_bits"][0]) + int(packed["row_bits"][7])) // 8
    bad_payload[start : start + 2] = 0xFF  # item 7's row: a count that runs past its end
    data = _large_signed(key, {"nbr_packed_payload": bad_payload})
    (tmp_path / "n.odb").write_bytes(data)
    loaded = _load(tmp_path / "n.odb", key)  # rows are checked as they are decoded
    rt = CatalogRuntime(loaded, "t")
    state = _state(rt, [loaded.item_ids[7], loaded.item_ids[9]])
    with pytest.raises(BundleError, match="neighbour lists are corrupt"):
        levels.recommend(PrivacyLevel.BEHAVIORAL, rt, state, Request(k=5, now=1.0))

    blocks, blob = _codecs.encode_block_strings(list(catalog.titles))
    bad_blob = blob.copy()
    bad_blob[int(blocks[1]) : int(blocks[2])] = 0x00  # the first title block (0 is the dictionary)
    (tmp_path / "t.odb").write_bytes(_large_signed(key, {"title_data": bad_blob}))
    loaded = _load(tmp_path / "t.odb", key)
    with pytest.raises(BundleError, match="titles are corrupt"):
        loaded.titles[0]
    assert loaded.titles[N - 1] == catalog.titles[N - 1]  # other blocks still read

    # structure that is wrong before any row is read is refused at load
    falling = packed["block_bits"][::-1].copy()
    message = _refused(
        tmp_path, _large_signed(key, {"nbr_packed_block_bits": falling}), public_key_bytes(key)
    )
    assert "neighbours" in message


def _plain_neighbours(catalog: Catalog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr, indices, weights = catalog.neighbours_csr()
    codes, _ = _bundle2.encode_weights(weights)
    return indptr, indices, codes


def test_categories_with_few_repeats_stay_one_row_per_item(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    from dataclasses import replace

    unique = tuple((f"c{i}", f"d{i % 3}") for i in range(N))  # every item its own set
    catalog = replace(_catalog(), categories=unique)
    write_bundle(catalog, tmp_path / "u.odb", private_key=key)
    got = _load(tmp_path / "u.odb", key)
    assert got.category_table is not None and got.category_table.item_set is None
    assert list(got.categories or ()) == [tuple(sorted(c)) for c in unique]


def test_a_full_popularity_ranking_is_still_read(
    tmp_path: Path, key: Ed25519PrivateKey, large: None
) -> None:
    # bundles written before the head-only ranking list every item: still valid
    catalog = _catalog()
    full = np.lexsort((np.arange(N), -catalog.popularity.astype(np.float64))).astype(np.int32)
    (tmp_path / "f.odb").write_bytes(_large_signed(key, {"popularity_order": full}))
    loaded = _load(tmp_path / "f.odb", key)
    np.testing.assert_array_equal(loaded.popularity_order, full)  # type: ignore[arg-type]
    too_short = full[:10].copy()  # fewer than the head
    message = _refused(
        tmp_path, _large_signed(key, {"popularity_order": too_short}), public_key_bytes(key)
    )
    assert "between 16 and 300" in message


@pytest.mark.parametrize(
    ("head", "ok"),
    [
        ([0, 1], True),
        ([0, 1, 2], True),
        ([0, 1, 2, 3, 4], True),
        ([0, 2], False),  # item 1 ties with item 2 and has the lower index: ranks above
        ([0, 1, 3], False),  # item 2 left out, tied with 3, lower index
        ([1, 2], False),  # the most popular item left out
        ([0, 2, 1], False),  # ties not by index
    ],
)
def test_a_popularity_head_must_be_the_top_of_the_ranking_ties_by_index(
    head: list[int], ok: bool
) -> None:
    from ondevice.bundle import _check_popular_prefix

    popularity = np.array([5, 3, 3, 3, 1], dtype=np.float32)
    order = np.array(head, dtype=np.int32)
    if ok:
        _check_popular_prefix(popularity, order, "t")
    else:
        with pytest.raises(BundleError, match="popularity_order"):
            _check_popular_prefix(popularity, order, "t")
