"""The operator-side catalog builder on synthetic data with a planted structure."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ondevice import scoring, synthetic
from ondevice.catalog import Catalog
from ondevice.errors import InvalidInputError
from ondevice.operator import build


@pytest.fixture(scope="module")
def data() -> synthetic.SyntheticData:
    return synthetic.generate(n_users=240, n_items=120, n_clusters=4, mean_length=25, seed=3)


@pytest.fixture(scope="module")
def matrix(data: synthetic.SyntheticData) -> build.Csr:
    return build.interaction_matrix(data.users, data.items, data.n_users, data.n_items)


def _dense(x: build.Csr) -> np.ndarray:
    d = np.zeros(x.shape)
    for r in range(x.shape[0]):
        d[r, x.row(r)] = 1.0
    return d


def test_neighbour_graph_is_a_valid_sorted_top_n_csr(matrix: build.Csr) -> None:
    ip, ix, w = build.item_neighbours(matrix, top_n=15)
    n = matrix.shape[1]
    assert ip.dtype == np.int64 and ix.dtype == np.int32 and w.dtype == np.float32
    assert ip.shape == (n + 1,) and ip[0] == 0 and ip[-1] == ix.size == w.size
    assert (np.diff(ip) >= 0).all() and (np.diff(ip) <= 15).all()
    d = _dense(matrix)
    co = d.T @ d
    cnt = d.sum(0)
    cos = co / np.sqrt(np.outer(np.maximum(cnt, 1), np.maximum(cnt, 1)))
    np.fill_diagonal(cos, 0.0)
    for i in range(n):
        nbrs, wts = ix[ip[i] : ip[i + 1]], w[ip[i] : ip[i + 1]]
        assert i not in nbrs
        assert (wts > 0).all() and (np.diff(wts) <= 0).all()
        np.testing.assert_allclose(wts, cos[i, nbrs], rtol=1e-5)
        # nothing left out scores higher than the weakest neighbour kept
        rest = np.setdiff1d(np.arange(n), np.append(nbrs, i))
        if nbrs.size == 15 and rest.size:
            assert cos[i, rest].max() <= wts[-1] + 1e-6


def test_sparse_and_dense_neighbour_paths_agree(matrix: build.Csr) -> None:
    dense = build.item_neighbours(matrix, top_n=10)
    sparse = build.item_neighbours(matrix, top_n=10, block_cells=1000)
    for a, b in zip(dense, sparse, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_als_recovers_the_planted_clusters_on_held_out_items(
    data: synthetic.SyntheticData,
) -> None:
    # hold out each user's last item; train on the rest
    last = np.r_[np.flatnonzero(np.diff(data.users)), data.users.size - 1]
    keep = np.ones(data.users.size, dtype=bool)
    keep[last] = False
    x = build.interaction_matrix(data.users[keep], data.items[keep], data.n_users, data.n_items)
    u, y = build.train_als(x, factors=8, regularization=1.0, alpha=5.0, iterations=10)
    ranks = []
    home_share = []
    for user, item in zip(data.users[last], data.items[last], strict=True):
        s = y @ u[user]
        s[x.row(user)] = -np.inf
        ranks.append((s > s[item]).sum() / data.n_items)
        top = scoring.top_k(s, 10)
        home_share.append(np.mean(data.item_cluster[top] == data.user_home[user]))
    assert np.mean(ranks) < 0.2  # random would be about 0.5
    assert np.mean(home_share) > 0.7  # recommendations stay in the user's home cluster


@pytest.mark.parametrize("cg_steps", [0, build.ALS_CG_STEPS])
def test_als_user_factors_are_exact_fold_ins(matrix: build.Csr, cg_steps: int) -> None:
    # whatever the solver of the training steps, the last user step is exact
    u, y = build.train_als(matrix, factors=6, regularization=2.0, alpha=3.0, iterations=3,
                           cg_steps=cg_steps)
    gram = y.astype(np.float64).T @ y
    for user in (0, 17, 101):
        x = scoring.fold_in(y, gram, matrix.row(user), regularization=2.0, alpha=3.0)
        np.testing.assert_allclose(x, u[user], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(
        build.user_vectors(matrix, y, regularization=2.0, alpha=3.0), u, rtol=1e-6, atol=1e-7)


def test_confidences_reach_implicit_as_1_plus_alpha_r(matrix: build.Csr) -> None:
    graded = build.Csr(matrix.indptr, matrix.indices,
                       np.arange(matrix.data.size, dtype=np.float32) % 3, matrix.shape)
    conf = build.confidence_matrix(graded, 2.5)
    np.testing.assert_array_equal(conf.indptr, graded.indptr)
    np.testing.assert_array_equal(conf.indices, graded.indices)
    np.testing.assert_allclose(conf.data, 1.0 + 2.5 * graded.data)
    with pytest.raises(InvalidInputError):
        build.confidence_matrix(graded, -1.0)


def test_spherical_kmeans_clusters_all_hold_the_minimum() -> None:
    rng = np.random.default_rng(0)
    centres = 5.0 * np.eye(4)[:3]
    pts = np.vstack([rng.normal(size=(m, 4)) + centres[c]
                     for c, m in enumerate((60, 50, 8))])
    cents, labels = build.spherical_kmeans(pts, 3, min_size=20, seed=1)
    assert cents.shape[0] <= 3
    sizes = np.bincount(labels, minlength=cents.shape[0])
    assert (sizes >= 20).all() and sizes.sum() == pts.shape[0]
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, rtol=1e-5)
    none, lab = build.spherical_kmeans(pts[:5], 3, min_size=20)
    assert none.shape[0] == 0 and (lab == -1).all()


def _catalog(data: synthetic.SyntheticData, **kw: Any) -> Catalog:
    settings = build.BuildSettings(factors=8, iterations=6, neighbours=20, **kw)
    cats = dict(zip(data.item_ids, data.categories, strict=True))
    return build.build_catalog(data.interactions(), signals=data.signals, settings=settings,
                               items=data.item_ids, categories=cats)


def test_built_segments_respect_the_minimum_and_the_maximum(
    data: synthetic.SyntheticData,
) -> None:
    for min_users, wanted in ((30, 8), (70, 8), (100, 3)):
        cat = _catalog(data, segments=wanted, min_segment_users=min_users, max_segments=6)
        segs = cat.segments
        assert 0 < len(segs) <= 6
        assert all(s.panel_users >= min_users for s in segs)
        assert [s.id for s in segs] == list(range(len(segs)))
        assert cat.default_segment in {s.id for s in segs}


def test_rule_segments_drop_combinations_with_too_few_users(
    data: synthetic.SyntheticData,
) -> None:
    cat = _catalog(data, segments=0, rule_signals=("plan", "region"), min_segment_users=25)
    counts: dict[tuple[str, str], int] = {}
    for sig in data.signals.values():
        key = (sig["plan"], sig["region"])
        counts[key] = counts.get(key, 0) + 1
    rules = cat.segment_rules
    big = {k for k, c in counts.items() if c >= 25}
    got = {(r.when["plan"][0], r.when["region"][0]) for r in rules}
    assert got <= big and len(got) == min(len(big), 9)
    assert cat.segments[-1].name == "everyone"


def test_large_shrinkage_turns_segment_lists_into_global_popularity(
    data: synthetic.SyntheticData,
) -> None:
    cat = _catalog(data, segments=4, min_segment_users=30, shrinkage=1e9, segment_top_n=20)
    pop_order = np.lexsort((np.arange(data.n_items), -cat.popularity))[:20]
    pop = cat.popularity
    for seg in cat.segments:
        # the same popularity profile; the segment's own counts only break global ties
        np.testing.assert_array_equal(pop[seg.top_items], pop[pop_order])
    sharp = _catalog(data, segments=4, min_segment_users=30, shrinkage=0.0, segment_top_n=20)
    assert any(not np.array_equal(s.top_items, pop_order)
               for s in sharp.segments)


def test_catalog_arrays_follow_the_contract(data: synthetic.SyntheticData) -> None:
    cat = _catalog(data, segments=3, min_segment_users=30)
    y = cat.item_factors
    assert y.dtype == np.float32 and y.shape == (data.n_items, 8)
    np.testing.assert_allclose(cat.gram, y.astype(np.float64).T @ y, rtol=1e-4,
                               atol=1e-4)
    counts = np.bincount(data.items, minlength=data.n_items)
    np.testing.assert_array_equal(cat.popularity, counts)
    assert cat.als.factors == 8
    assert cat.categories[0] == ("c0",)
    assert scoring.ScoringParams.from_extra(cat.extra) == scoring.ScoringParams()


def test_csv_log_and_iterable_build_the_same_catalog(
    data: synthetic.SyntheticData, tmp_path: Path,
) -> None:
    path = tmp_path / "log.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user", "item", "timestamp"])
        w.writerows(data.interactions())
    s = build.BuildSettings(factors=4, iterations=3, neighbours=10, segments=2,
                            min_segment_users=40)
    a = build.build_catalog(path, settings=s, created_at=1.0)
    b = build.build_catalog(data.interactions(), settings=s, created_at=1.0)
    assert a.item_ids == b.item_ids
    np.testing.assert_array_equal(a.nbr_indices, b.nbr_indices)
    np.testing.assert_array_equal(a.item_factors, b.item_factors)


def test_build_reports_progress_and_refuses_bad_input(data: synthetic.SyntheticData) -> None:
    stages: list[str] = []
    build.build_catalog(list(data.interactions())[:600],
                        settings=build.BuildSettings(factors=4, iterations=2, segments=0),
                        progress=lambda d, t, s: stages.append(s))
    assert {"neighbours", "als", "segments"} <= set(stages)
    with pytest.raises(InvalidInputError):
        build.BuildSettings(als_cg_steps=-1)
    with pytest.raises(InvalidInputError):
        build.build_catalog([])
    with pytest.raises(InvalidInputError):
        build.build_catalog([("u", "x", 1)], items=["y"])
    with pytest.raises(InvalidInputError):
        build.BuildSettings(factors=0)
