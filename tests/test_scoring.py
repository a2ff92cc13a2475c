"""The device-side scoring functions: exact references on small random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ondevice import scoring


def _random_factors(n: int = 40, f: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, f)).astype(np.float32)


def _weighted_lstsq(y: np.ndarray, items: np.ndarray, conf: np.ndarray, reg: float) -> np.ndarray:
    """argmin_x sum_i c_i (p_i - y_i.x)^2 + reg |x|^2 over ALL items, by least squares."""
    n, f = y.shape
    c = np.ones(n)
    p = np.zeros(n)
    c[items] = conf
    p[items] = 1.0
    a = np.vstack([np.sqrt(c)[:, None] * y.astype(np.float64), math.sqrt(reg) * np.eye(f)])
    b = np.concatenate([np.sqrt(c) * p, np.zeros(f)])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def test_fold_in_matches_weighted_least_squares_reference() -> None:
    y = _random_factors()
    gram = y.T.astype(np.float64) @ y
    items = np.array([3, 7, 8, 21, 30])
    for alpha, reg in ((1.0, 0.1), (10.0, 2.0), (40.0, 0.5)):
        got = scoring.fold_in(y, gram, items, regularization=reg, alpha=alpha)
        want = _weighted_lstsq(y, items, np.full(items.size, 1 + alpha), reg)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_fold_in_with_values_uses_confidence_one_plus_alpha_r() -> None:
    y = _random_factors(seed=1)
    gram = y.T.astype(np.float64) @ y
    items = np.array([0, 5, 9])
    values = np.array([1.0, 3.0, 0.5])
    got = scoring.fold_in(y, gram, items, regularization=1.0, alpha=4.0, values=values)
    want = _weighted_lstsq(y, items, 1 + 4.0 * values, 1.0)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_fold_in_from_aggregates_equals_full_solve() -> None:
    y = _random_factors(seed=2)
    gram = y.T.astype(np.float64) @ y
    items = np.array([1, 4, 4, 17, 33])  # a repeat is one interaction of strength 2
    b, a = scoring.aggregates(y, items, alpha=3.0)
    via_agg = scoring.fold_in_aggregates(gram, b, a, regularization=0.7)
    full = scoring.fold_in(y, gram, items, regularization=0.7, alpha=3.0)
    np.testing.assert_allclose(via_agg, full, rtol=1e-5, atol=1e-6)
    conf = np.array([1 + 3.0, 1 + 6.0, 1 + 3.0, 1 + 3.0])
    want = _weighted_lstsq(y, np.array([1, 4, 17, 33]), conf, 0.7)
    np.testing.assert_allclose(via_agg, want, rtol=2e-4, atol=2e-5)


def test_incremental_aggregates_match_batch_and_decay_weights_old_items() -> None:
    y = _random_factors(seed=3)
    f = y.shape[1]
    seq = [2, 11, 19, 25]
    b, a = np.zeros(f), np.zeros((f, f))
    for i in seq:
        b, a = scoring.update_aggregates(b, a, y[i], alpha=2.0)
    b_ref, a_ref = scoring.aggregates(y, np.array(seq), alpha=2.0)
    np.testing.assert_allclose(b, b_ref, rtol=1e-10)
    np.testing.assert_allclose(a, a_ref, rtol=1e-10)
    # with decay d per step, the item added k steps ago weighs d**k in both b and A
    b, a = np.zeros(f), np.zeros((f, f))
    for i in seq:
        b, a = scoring.update_aggregates(b, a, y[i], alpha=2.0, decay=0.5)
    ages = np.array([3, 2, 1, 0])
    yy = y[seq].astype(np.float64)
    w = 0.5 ** ages
    np.testing.assert_allclose(b, (yy * (3.0 * w)[:, None]).sum(0), rtol=1e-10)
    np.testing.assert_allclose(a, (yy * (2.0 * w)[:, None]).T @ yy, rtol=1e-10)
    # the batch form with position weights gives the same decayed aggregates
    b_w, a_w = scoring.aggregates(y, np.array(seq[::-1]), alpha=2.0,
                                  weights=scoring.decay_weights(4, 1.0))
    np.testing.assert_allclose(b_w, b, rtol=1e-6)
    np.testing.assert_allclose(a_w, a, rtol=1e-6)
    with pytest.raises(ValueError):
        scoring.update_aggregates(b, a, y[0], alpha=2.0, decay=0.0)


def test_fold_in_of_empty_window_is_zero_and_unknown_items_are_ignored() -> None:
    y = _random_factors()
    gram = y.T @ y
    assert not scoring.fold_in(y, gram, np.array([], dtype=np.int64), regularization=1.0,
                               alpha=1.0).any()
    with_bad = scoring.fold_in(y, gram, np.array([3, -1, 999]), regularization=1.0, alpha=1.0)
    only_good = scoring.fold_in(y, gram, np.array([3]), regularization=1.0, alpha=1.0)
    np.testing.assert_array_equal(with_bad, only_good)


def test_top_k_matches_a_full_sort_and_breaks_ties_by_lower_index() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 6, size=n).astype(np.float32)  # many ties
        k = int(rng.integers(1, n + 3))
        excl = rng.choice(n, size=int(rng.integers(0, n)), replace=False)
        got = scoring.top_k(scores, k, exclude=excl)
        valid = np.setdiff1d(np.arange(n), excl)
        want = valid[np.lexsort((valid, -scores[valid]))][:k]
        np.testing.assert_array_equal(got, want)


def test_top_k_on_a_large_catalog_is_exact_with_ties_and_exclusions() -> None:
    rng = np.random.default_rng(9)
    n = 120_000
    for trial in range(4):
        scores = rng.integers(0, 2_000, size=n).astype(np.float32)  # ties everywhere
        if trial == 3:
            scores[rng.random(n) < 0.999] = -np.inf  # few valid items
        excl = rng.choice(n, size=300, replace=False)
        for k in (1, 10, 100):
            got = scoring.top_k(scores, k, exclude=excl)
            valid = np.setdiff1d(np.flatnonzero(np.isfinite(scores)), excl)
            want = valid[np.lexsort((valid, -scores[valid]))][:k]
            np.testing.assert_array_equal(got, want)


def test_top_k_excludes_by_mask_and_never_returns_minus_inf_or_nan() -> None:
    scores = np.array([5.0, -np.inf, np.nan, 3.0, 4.0], dtype=np.float32)
    mask = np.array([True, False, False, False, False])
    np.testing.assert_array_equal(scoring.top_k(scores, 10, exclude=mask), [4, 3])
    np.testing.assert_array_equal(scoring.top_k(scores, 1), [0])
    assert scoring.top_k(scores, 2).tolist() == [0, 4]


def test_top_k_leaves_the_input_untouched_and_refuses_bad_k() -> None:
    scores = np.arange(5, dtype=np.float32)
    scoring.top_k(scores, 2, exclude=[4])
    assert scores[4] == 4.0
    for bad in (0, -1):
        with pytest.raises(ValueError):
            scoring.top_k(scores, bad)


def test_top_k_is_deterministic_across_calls() -> None:
    scores = np.zeros(1000, dtype=np.float32)
    first = scoring.top_k(scores, 10)
    np.testing.assert_array_equal(first, np.arange(10))
    for _ in range(5):
        np.testing.assert_array_equal(scoring.top_k(scores, 10), first)


def _csr(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indptr = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    idx, w = [], []
    for i, row in enumerate(dense):
        nz = np.flatnonzero(row)
        nz = nz[np.lexsort((nz, -row[nz]))]
        idx.extend(nz.tolist())
        w.extend(row[nz].tolist())
        indptr[i + 1] = len(idx)
    return indptr, np.asarray(idx, dtype=np.int32), np.asarray(w, dtype=np.float32)


def test_neighbour_scores_equal_the_decayed_dense_sum() -> None:
    rng = np.random.default_rng(5)
    n = 25
    dense = rng.random((n, n)) * (rng.random((n, n)) < 0.3)
    np.fill_diagonal(dense, 0.0)
    ip, ix, w = _csr(dense)
    window = np.array([4, 9, 4, 0, 17])  # newest first, with a repeat
    got = scoring.neighbour_scores(ip, ix, w, window, n_items=n, half_life=2.0)
    weights = 0.5 ** (np.arange(window.size) / 2.0)
    want = (weights[:, None] * dense[window]).sum(0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    flat = scoring.neighbour_scores(ip, ix, w, window, n_items=n, half_life=math.inf,
                                    max_window=2)
    np.testing.assert_allclose(flat, dense[4] + dense[9], rtol=1e-5)


def test_decay_weights_halve_every_half_life() -> None:
    w = scoring.decay_weights(10, 3.0)
    assert w[0] == 1.0
    assert w[3] == pytest.approx(0.5)
    assert w[6] == pytest.approx(0.25)
    assert (scoring.decay_weights(4, math.inf) == 1.0).all()
    with pytest.raises(ValueError):
        scoring.decay_weights(3, 0.0)


def test_rank_sparse_ranks_positive_scores_then_fills_from_fallback() -> None:
    scores = np.array([0.0, 0.5, 0.0, 2.0, 0.5, 0.0], dtype=np.float32)
    fallback = np.array([5, 0, 3, 2, 1, 4], dtype=np.int32)
    got = scoring.rank_sparse(scores, 5, exclude=[4], fallback=fallback)
    np.testing.assert_array_equal(got, [3, 1, 5, 0, 2])
    assert scoring.rank_sparse(scores, 10, fallback=fallback).size == 6


def test_segment_ranking_skips_excluded_and_completes_from_popularity() -> None:
    top = np.array([7, 2, 9], dtype=np.int32)
    pop_order = np.array([2, 0, 1, 3, 4, 5, 6, 7, 8, 9], dtype=np.int32)
    got = scoring.segment_ranking(top, 4, n_items=10, exclude=[2], fallback=pop_order)
    np.testing.assert_array_equal(got, [7, 9, 0, 1])


def test_rank_fusion_follows_the_reciprocal_rank_formula() -> None:
    a = np.array([1, 2, 3])
    b = np.array([3, 4])
    got = scoring.rank_fusion([a, b], 4, weights=[1.0, 2.0], c=1.0)
    # scores: 1: 1/2, 2: 1/3, 3: 1/4 + 2/2, 4: 2/3
    np.testing.assert_array_equal(got, [3, 4, 1, 2])


def test_individual_ranking_with_no_neighbours_is_the_factor_top_k() -> None:
    y = _random_factors(n=200, f=8, seed=6)
    x = np.random.default_rng(7).normal(size=8).astype(np.float32)
    seen = np.array([0, 5, 10])
    got = scoring.individual_ranking(y, x, None, 10, exclude=seen)
    np.testing.assert_array_equal(got, scoring.top_k(y @ x, 10, exclude=seen))
    nb = np.zeros(200, dtype=np.float32)
    nb[[5, 150, 151]] = [9.0, 1.0, 2.0]
    fused = scoring.individual_ranking(y, x, nb, 10, exclude=seen, neighbour_weight=5.0, c=1.0)
    assert not set(fused.tolist()) & {0, 5, 10}
    assert fused[0] == 151 and fused[1] == 150
    mask = np.zeros(200, dtype=bool)
    mask[[0, 5, 10]] = True
    by_mask = scoring.individual_ranking(y, x, nb, 10, exclude=mask, neighbour_weight=5.0,
                                         c=1.0)
    np.testing.assert_array_equal(by_mask, fused)


def test_session_weights_boost_only_the_current_session() -> None:
    times = np.array([1000, 900, 850, 100, 50])  # newest first
    w = scoring.session_weights(times, 1100, gap=120, boost=2.0)
    np.testing.assert_array_equal(w, [3.0, 3.0, 3.0, 1.0, 1.0])
    w2 = scoring.session_weights(times, 5000, gap=120, boost=2.0)
    np.testing.assert_array_equal(w2, np.ones(5))


def test_context_affinity_is_a_distribution_learned_per_context_value() -> None:
    names, ip, ix = scoring.category_index([("a",), ("b",), ("a", "b"), ()], 4)
    assert names == ("a", "b")
    aff = scoring.context_affinity(ip, ix, 2, np.array([0, 0, 1, 3]),
                                   ["night", "night", "day", "day"], smoothing=0.0)
    np.testing.assert_allclose(aff["night"], [1.0, 0.0])
    np.testing.assert_allclose(aff["day"], [0.0, 1.0])
    np.testing.assert_allclose(aff[""].sum(), 1.0)
    boost = scoring.category_boost(ip, ix, aff, np.array([0, 1, 2, 3]), context="night")
    np.testing.assert_allclose(boost, [2.0, 0.0, 1.0, 1.0])


def test_contextual_scores_reduce_to_neighbour_scores_when_context_is_off() -> None:
    dense = np.random.default_rng(8).random((12, 12))
    np.fill_diagonal(dense, 0.0)
    ip, ix, w = _csr(dense)
    window = np.array([3, 1, 7])
    times = np.array([300, 200, 100])
    plain = scoring.neighbour_scores(ip, ix, w, window, n_items=12, half_life=2.0)
    ctx = scoring.contextual_scores(ip, ix, w, window, times, n_items=12, now=400,
                                    half_life=2.0)
    np.testing.assert_array_equal(plain, ctx)


def test_popularity_ranking_excludes_seen_items() -> None:
    pop = np.array([3.0, 9.0, 1.0, 9.0], dtype=np.float32)
    np.testing.assert_array_equal(scoring.popularity_ranking(pop, 3, exclude=[1]), [3, 0, 2])


def test_scoring_params_round_trip_through_catalog_extra_and_ignore_bad_values() -> None:
    params = scoring.ScoringParams(half_life=3.0, foldin_half_life=math.inf, fusion_depth=50)
    assert scoring.ScoringParams.from_extra(params.to_extra()) == params
    bad = {"scoring.half_life": "-1", "scoring.fusion_c": "nan", "scoring.fusion_depth": "x",
           "scoring.session_gap": "inf"}
    assert scoring.ScoringParams.from_extra(bad) == scoring.ScoringParams()


def test_sparse_neighbour_scores_rank_as_the_dense_ones() -> None:
    # the levels keep neighbour scores sparse (a 10M-long array per request cost tens of
    # ms); every ranking must be the dense one's, exclusions and fallback included
    from ondevice.scoring import SparseScores, rank_sparse

    rng = np.random.default_rng(3)
    n = 500
    for trial in range(200):
        items = np.unique(rng.integers(0, n, size=int(rng.integers(0, 60))))
        values = rng.choice([0.0, 0.25, 0.5, 1.0, 2.0], size=items.size).astype(np.float32)
        sparse = SparseScores(items.astype(np.int64), values, n)
        dense = sparse.dense()
        excl = rng.integers(0, n, size=int(rng.integers(0, 40)))
        mask = np.zeros(n, dtype=np.bool_)
        mask[excl] = True
        fallback = rng.permutation(n).astype(np.int32)
        k = int(rng.integers(1, 30))
        for exclude in (None, excl, mask):
            want = rank_sparse(dense, k, exclude=exclude, fallback=fallback)
            got = rank_sparse(sparse, k, exclude=exclude, fallback=fallback)
            np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
        probe = rng.integers(0, n, size=50)
        np.testing.assert_array_equal(sparse.at(probe), dense[probe])
