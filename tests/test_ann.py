"""The approximate top-k index (an inverted file) of large catalogs.

- Below the automatic size the writer builds no index and the device scores exactly.
- Reordering a catalog into clusters changes no answer, by id, at any level.
- Probing every cluster gives exactly the exact ranking; the calibrated ``nprobe``
  reaches the stated recall@10 on queries it was not calibrated on.
- A signed bundle whose index lies is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from test_bundle import make_catalog
from test_bundle_v2 import _refused, _signed

from ondevice import levels, scoring
from ondevice.ann import ItemRuns, IvfIndex
from ondevice.bundle import load_bundle, validate_catalog
from ondevice.catalog import AlsParams, Catalog
from ondevice.errors import BundleError
from ondevice.levels.base import CatalogRuntime, Request, UserState
from ondevice.operator import ann_build
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle
from ondevice.policy import PrivacyLevel


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_signing_key()


def clustered(n: int, *, factors: int = 16, clusters: int = 40, seed: int = 0) -> Catalog:
    """Item factors in ``clusters`` groups (a centre plus noise, lognormal norms, as
    ALS factors look), neighbours drawn mostly from the item's own group; items listed
    in random order (as a shop lists them)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, factors))
    label = rng.integers(0, clusters, size=n)
    y = centres[label] + 0.6 * rng.standard_normal((n, factors))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    y *= rng.lognormal(0.0, 0.4, size=(n, 1))
    y = y.astype(np.float32)
    members = [np.flatnonzero(label == c) for c in range(clusters)]
    degree = 8
    nbrs = np.empty((n, degree), dtype=np.int32)
    for i in range(n):
        pool = members[label[i]]
        pick = rng.choice(pool, size=degree, replace=pool.size < degree + 1)
        pick[pick == i] = (i + 1) % n
        nbrs[i] = pick
    weights = -np.sort(-rng.random((n, degree)), axis=1).astype(np.float32) + 1e-3
    return Catalog(
        item_ids=tuple(f"sku-{k:06d}" for k in rng.permutation(n)),
        titles=tuple(f"item {k}" for k in range(n)),
        popularity=rng.pareto(1.2, size=n).astype(np.float32),
        nbr_indptr=np.arange(0, (n + 1) * degree, degree, dtype=np.int64),
        nbr_indices=nbrs.ravel(),
        nbr_weights=weights.ravel(),
        item_factors=y,
        gram=(y.astype(np.float64).T @ y).astype(np.float32),
        als=AlsParams(factors=factors, regularization=0.5, alpha=2.0),
    )


def _state(rt: CatalogRuntime, window_ids: list[str]) -> UserState:
    window = np.array([rt.index.get(i) for i in window_ids], dtype=np.int64)
    return UserState(
        user_id="u",
        window=window,
        times=np.arange(window.size, 0, -1, dtype=np.float64),
        strengths=np.ones(window.size, dtype=np.float32),
        events=["view"] * window.size,
        contexts=[{}] * window.size,
        excluded=window.copy(),
    )


def _answers(catalog: Catalog, window_ids: list[str], level: str) -> list[str]:
    rt = CatalogRuntime(catalog, "test")
    answer = levels.recommend(
        PrivacyLevel(level), rt, _state(rt, window_ids), Request(k=10, now=100.0)
    )
    assert answer.level == PrivacyLevel(level), answer.fallbacks
    return [r.item_id for r in answer]


def test_small_catalogs_get_no_index_and_score_exactly(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    catalog = clustered(2_000)
    write_bundle(catalog, tmp_path / "small.odb", private_key=key)
    loaded = load_bundle(tmp_path / "small.odb", public_key=public_key_bytes(key))
    assert catalog.n_items < ann_build.AUTO_MIN_ITEMS
    assert loaded.ann is None
    assert list(loaded.item_ids) == list(catalog.item_ids)  # not reordered


def test_cluster_order_changes_no_answer_at_any_level(tmp_path: Path) -> None:
    # An irrational fusion weight: with the default 1.0 an item ranked r by the fold-in
    # alone ties one ranked r by the neighbours alone, and ties go to the lower index,
    # which a reorder changes. Every other answer must be the same, by id.
    weight = {"scoring.fusion_weight": repr(2**-0.5)}
    catalog = replace(clustered(3_000, seed=1), extra=weight)
    permuted = ann_build.permute_catalog(catalog, np.random.default_rng(2).permutation(3_000))
    validate_catalog(permuted)
    assert list(permuted.item_ids) != list(catalog.item_ids)
    window = list(catalog.item_ids[:30:3])
    for level in ("none", "behavioral", "contextual", "individual"):
        assert _answers(permuted, window, level) == _answers(catalog, window, level), level


def test_probing_every_cluster_is_the_exact_ranking(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    catalog = clustered(4_000, seed=3)
    indexed = ann_build.build_ivf(catalog, clusters=32)
    assert indexed.ann is not None
    full = replace(indexed, ann=replace(indexed.ann, nprobe=32))
    exact = replace(indexed, ann=None)
    rng = np.random.default_rng(4)
    for _ in range(5):
        window = [str(s) for s in rng.choice(list(catalog.item_ids), size=12, replace=False)]
        assert _answers(full, window, "individual") == _answers(exact, window, "individual")


def test_the_calibrated_index_reaches_the_stated_recall_on_fresh_queries(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    catalog = clustered(12_000, factors=16, clusters=40, seed=5)
    write_bundle(catalog, tmp_path / "ivf.odb", private_key=key, ann=64)
    loaded = load_bundle(tmp_path / "ivf.odb", public_key=public_key_bytes(key))
    index = loaded.ann
    assert index is not None and index.n_clusters == 64
    assert index.recall >= ann_build.DEFAULT_TARGET_RECALL
    assert index.nprobe < 64  # it does approximate: fewer than every cluster
    offsets = index.offsets
    assert offsets[0] == 0 and offsets[-1] == 12_000 and (np.diff(offsets) >= 0).all()
    y = loaded.decoded_factors()
    assert y is not None
    # queries the writer never saw: another seed, a fold-in of related items each
    queries = ann_build.calibration_queries(
        y, loaded.nbr_indptr, loaded.nbr_indices, loaded.popularity, 300, seed=99
    )
    truth = ann_build.exact_top(y, queries, 10)
    got = ann_build.recall_at(index, y, queries, truth)
    assert got >= 0.95, got
    # the items of a probe are what the level scores: a probe's candidates hold the
    # approximate top 10 and are a small part of the catalog
    cand = index.candidates(index.probe(queries[0], 110)).items()
    assert 110 <= cand.size < 12_000 // 4
    assert (np.diff(cand) > 0).all()


def test_the_level_uses_the_index_and_still_answers_with_exclusions(
    key: Ed25519PrivateKey,
) -> None:
    catalog = ann_build.build_ivf(clustered(6_000, seed=6), clusters=48)
    assert catalog.ann is not None
    rt = CatalogRuntime(catalog, "test")
    rng = np.random.default_rng(7)
    ids = [str(i) for i in rng.choice(list(catalog.item_ids), size=100, replace=False)]
    state = _state(rt, ids)
    window = state.window
    answer = levels.recommend(PrivacyLevel.INDIVIDUAL, rt, state, Request(k=10, now=100.0))
    assert answer.level == PrivacyLevel.INDIVIDUAL and len(answer) == 10
    assert not {r.item_id for r in answer} & set(ids)
    # the fold-in part of the ranking came from the probed clusters only
    x = levels.individual.fold_in(rt, state)
    probed = set(catalog.ann.candidates(catalog.ann.probe(x, 200)).items().tolist())
    fold_only = scoring.individual_ranking(
        catalog.item_factors,  # type: ignore[arg-type]
        x,
        None,
        10,
        exclude=window,
        scores=catalog.factor_rows(np.array(sorted(probed))) @ x,
        candidates=np.array(sorted(probed)),
    )
    assert set(fold_only.tolist()) <= probed


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 300), max_size=120), st.lists(st.integers(-5, 310), max_size=40))
def test_item_runs_address_the_items_they_hold(held: set[int], asked: list[int]) -> None:
    items = np.array(sorted(held), dtype=np.int64)
    runs = ItemRuns.of_items(items)
    assert runs.size == items.size
    np.testing.assert_array_equal(runs.items(), items)
    # runs are maximal: no two touch
    assert (runs.starts[1:] > runs.ends[:-1]).all() and (runs.ends > runs.starts).all()
    np.testing.assert_array_equal(runs.items_at(np.arange(items.size)), items)
    # positions_of keeps the asked items that are held, in the asked order
    want = [int(np.searchsorted(items, a)) for a in asked if a in held]
    np.testing.assert_array_equal(runs.positions_of(np.array(asked, dtype=np.int64)), want)


def test_item_runs_refuse_items_out_of_order() -> None:
    with pytest.raises(ValueError, match="increasing"):
        ItemRuns.of_items(np.array([3, 2]))
    with pytest.raises(ValueError, match="increasing"):
        ItemRuns.of_items(np.array([2, 2]))


def test_a_probe_is_its_clusters_items_as_merged_runs() -> None:
    # clusters 1 and 2 are adjacent, 3 is empty, 4 follows it: one run 2..9 and one 9..12
    offsets = np.array([0, 2, 5, 9, 9, 12, 20], dtype=np.int64)
    index = IvfIndex(np.zeros((6, 2), np.float32), offsets, nprobe=1, recall=1.0)
    runs = index.candidates(np.array([1, 2, 3, 4], dtype=np.int64))
    assert runs.starts.tolist() == [2] and runs.ends.tolist() == [12]
    runs = index.candidates(np.array([0, 2, 5], dtype=np.int64))
    assert runs.starts.tolist() == [0, 5, 12] and runs.ends.tolist() == [2, 9, 20]
    assert index.candidates(np.array([3], dtype=np.int64)).size == 0


@pytest.mark.parametrize("compact", [False, True])
def test_runs_score_as_the_items_they_hold(compact: bool) -> None:
    """A probe's runs are scored in place, block by block (int8 codes through float32
    scratch); every score equals the one computed for the item alone, at both
    precisions, across runs longer than a scratch block."""
    from ondevice import _bundle2
    from ondevice.catalog import SCORE_BLOCK

    catalog = clustered(3 * SCORE_BLOCK, seed=5)
    if compact:
        assert catalog.item_factors is not None
        codes, scales = _bundle2.quantize_rows(catalog.item_factors)
        catalog = replace(catalog, item_factors=codes, item_factor_scales=scales)
    rng = np.random.default_rng(1)
    held = np.flatnonzero(rng.random(catalog.n_items) < 0.5)
    held = np.union1d(held, np.arange(100, 100 + 2 * SCORE_BLOCK + 7))  # a long run
    runs = ItemRuns.of_items(held)
    x = rng.standard_normal(16).astype(np.float32)
    by_runs = catalog.scores_of(runs, x)
    np.testing.assert_allclose(by_runs, catalog.scores_of(held, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(by_runs, catalog.factor_scores(x)[held], rtol=1e-6, atol=1e-6)
    y = catalog.decoded_factors()
    assert y is not None
    np.testing.assert_allclose(by_runs, y[held] @ x, rtol=1e-4, atol=1e-4)


def _index_lie(catalog: Catalog) -> Catalog:
    return ann_build.build_ivf(catalog, clusters=4)


LIES = {
    "offsets past the items": ({"ann_offsets": np.array([0, 10, 20, 30, 99], np.int32)}, {},
                               "ann_offsets"),
    "offsets falling": ({"ann_offsets": np.array([0, 30, 10, 35, 40], np.int32)}, {},
                        "monotone"),
    "nprobe zero": ({}, {"ann": {"kind": "ivf", "nprobe": 0, "recall_at_10": 1.0}}, "nprobe"),
    "nprobe too many": ({}, {"ann": {"kind": "ivf", "nprobe": 5, "recall_at_10": 1.0}},
                        "nprobe"),
    "unknown kind": ({}, {"ann": {"kind": "hnsw", "nprobe": 1, "recall_at_10": 1.0}}, "kind"),
    "extra field": ({}, {"ann": {"kind": "ivf", "nprobe": 1, "recall_at_10": 1, "x": 1}}, "ann"),
    "centroid not finite": ({"ann_centroids": None}, {}, "finite"),
    "centroids of another width": ({"ann_centroids": np.zeros((4, 3), np.float32)}, {},
                                   "ann_centroids"),
}


@pytest.mark.parametrize("name", sorted(LIES))
def test_a_signed_bundle_whose_index_lies_is_refused(
    name: str, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    arrays, header, expected = LIES[name]
    catalog = _index_lie(make_catalog(2, n=40))
    assert catalog.ann is not None
    arrays = dict(arrays)
    if "ann_centroids" in arrays and arrays["ann_centroids"] is None:
        bad = catalog.ann.centroids.copy()
        bad[1, 0] = np.nan
        arrays["ann_centroids"] = bad
    data = _signed(catalog, key, arrays=arrays, header=header)
    message = _refused(tmp_path, data, public_key_bytes(key))
    assert expected in message, message


def test_the_writer_refuses_bad_settings(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    catalog = clustered(500)
    for bad in (0, -3, "always", 2.5, np.array([1, 2]), None):
        with pytest.raises(BundleError, match="ann must be"):
            write_bundle(catalog, tmp_path / "x.odb", private_key=key, ann=bad)  # type: ignore[arg-type]
    with pytest.raises(BundleError, match="format 1"):
        write_bundle(catalog, tmp_path / "x.odb", private_key=key, ann=8, format_version=1)
    no_factors = replace(catalog, item_factors=None, gram=None, als=None)
    with pytest.raises(BundleError, match="item factors"):
        write_bundle(no_factors, tmp_path / "x.odb", private_key=key, ann=8)
    assert not (tmp_path / "x.odb").exists()


def test_an_index_round_trips(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    catalog = ann_build.build_ivf(clustered(2_500, seed=8), clusters=16)
    assert isinstance(catalog.ann, IvfIndex)
    write_bundle(catalog, tmp_path / "rt.odb", private_key=key)
    loaded = load_bundle(tmp_path / "rt.odb", public_key=public_key_bytes(key))
    assert loaded.ann is not None
    assert list(loaded.item_ids) == list(catalog.item_ids)
    np.testing.assert_array_equal(loaded.ann.offsets, catalog.ann.offsets)
    np.testing.assert_array_equal(loaded.ann.centroids, catalog.ann.centroids)
    assert (loaded.ann.nprobe, loaded.ann.recall) == (catalog.ann.nprobe, catalog.ann.recall)


def test_ann_off_drops_an_index_the_catalog_already_has(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    indexed = ann_build.build_ivf(clustered(1_000, seed=9), clusters=8)
    write_bundle(indexed, tmp_path / "off.odb", private_key=key, ann="off")
    loaded = load_bundle(tmp_path / "off.odb", public_key=public_key_bytes(key))
    assert loaded.ann is None
    assert list(loaded.item_ids) == list(indexed.item_ids)  # the order stays
