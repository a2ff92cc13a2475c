"""Randomized response, its debiasing estimator, and the privacy-budget accountant."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from sync import errors
from sync.privacy import (
    DEFAULT_BUDGET_CAP,
    DEFAULT_BUDGET_PERIOD,
    DEFAULT_EPSILON,
    BudgetAccountant,
    debias,
    estimate,
    keep_probability,
    other_probability,
    randomize,
    standard_errors,
)
from sync.protocol import epoch_start

DAY = 86400.0
T0 = 1_795_608_000.0


def test_probabilities_form_a_distribution_with_ratio_e_to_the_epsilon() -> None:
    for k in (2, 5, 64):
        for eps in (0.1, DEFAULT_EPSILON, 3.0):
            p, q = keep_probability(eps, k), other_probability(eps, k)
            assert p + (k - 1) * q == pytest.approx(1.0)
            assert p / q == pytest.approx(math.exp(eps))
    assert keep_probability(DEFAULT_EPSILON, 2) == pytest.approx(0.75)


def test_randomize_reports_truth_with_p_and_each_other_segment_with_q() -> None:
    rng = random.Random(20261127)
    k, n, true_segment = 4, 40_000, 2
    seen = Counter(randomize(true_segment, k=k, rng=rng) for _ in range(n))
    p, q = keep_probability(DEFAULT_EPSILON, k), other_probability(DEFAULT_EPSILON, k)
    for segment in range(k):
        expected = p if segment == true_segment else q
        tolerance = 5 * math.sqrt(expected * (1 - expected) / n)
        assert abs(seen[segment] / n - expected) < tolerance


def test_randomize_draws_fresh_noise_on_every_call() -> None:
    # Default source: the OS CSPRNG. 100 reports of one true segment at K=8 keep it with
    # p = 0.3 each, so identical answers every time would mean memoized noise.
    answers = {randomize(3, k=8) for _ in range(100)}
    assert len(answers) > 1
    assert answers <= set(range(8))


def test_randomize_with_one_segment_always_reports_it() -> None:
    assert {randomize(0, k=1, rng=random.Random(1)) for _ in range(20)} == {0}


@pytest.mark.parametrize(
    "kwargs",
    [{"segment": 8, "k": 8}, {"segment": -1, "k": 8}, {"segment": 0, "k": 0},
     {"segment": 0, "k": 8, "epsilon": 0.0}, {"segment": 0, "k": 8, "epsilon": math.inf}],
)
def test_randomize_refuses_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(errors.ConfigurationError):
        randomize(**kwargs)  # type: ignore[arg-type]


def test_debias_inverts_the_expected_counts_exactly() -> None:
    eps, truth = DEFAULT_EPSILON, [600, 300, 100, 0]
    k, n = len(truth), sum(truth)
    p, q = keep_probability(eps, k), other_probability(eps, k)
    expected = [n * q + (p - q) * f for f in truth]
    # debias is linear in the counts; feed it integer multiples to stay in integers.
    scale = 1000
    counts = [round(c * scale) for c in expected]
    assert [x / scale for x in debias(counts, epsilon=eps)] == pytest.approx(truth, abs=0.01)


def test_standard_error_matches_the_spread_over_repeated_simulations() -> None:
    rng = np.random.default_rng(7)
    eps, truth = DEFAULT_EPSILON, np.array([0.5, 0.3, 0.15, 0.05])
    k, n, runs = len(truth), 4000, 400
    p, q = keep_probability(eps, k), other_probability(eps, k)
    reported = q + (p - q) * truth  # probability of each reported segment
    estimates, errors_ = [], []
    for _ in range(runs):
        counts = rng.multinomial(n, reported).tolist()
        estimates.append(debias(counts, epsilon=eps))
        errors_.append(standard_errors(counts, epsilon=eps))
    empirical = np.std(np.array(estimates), axis=0, ddof=1)
    predicted = np.mean(np.array(errors_), axis=0)
    assert np.allclose(np.mean(estimates, axis=0), truth * n, atol=4 * empirical / math.sqrt(runs))
    assert np.allclose(predicted, empirical, rtol=0.15)


def test_estimate_suppresses_every_cell_under_the_threshold_and_a_small_total() -> None:
    result = estimate([500, 60, 40, 700], epsilon=DEFAULT_EPSILON, k_threshold=50)
    published = {cell.segment: cell for cell in result.cells}
    assert result.total == 1300
    for segment in range(4):
        cell = published.get(segment)
        if cell is None:
            assert segment in result.suppressed
        else:
            assert cell.raw_count >= 50 and cell.estimate >= 50
    assert 2 in result.suppressed  # raw 40 < 50
    assert set(published) | set(result.suppressed) == {0, 1, 2, 3}
    tiny = estimate([10, 5, 3], epsilon=DEFAULT_EPSILON, k_threshold=50)
    assert tiny.cells == () and tiny.total is None and tiny.suppressed == (0, 1, 2)
    with pytest.raises(errors.ConfigurationError):
        estimate([1, 2], epsilon=DEFAULT_EPSILON, k_threshold=0)


def test_budget_refuses_after_the_cap_and_frees_after_the_rolling_period() -> None:
    eps = DEFAULT_EPSILON
    accountant = BudgetAccountant(cap=3 * eps, period=28 * DAY)
    now = T0
    for _ in range(3):
        accountant = accountant.record(now, eps)
        now += 7 * DAY
    # Three weekly reports spent the cap: the fourth, at T0 + 21 days, is refused.
    assert accountant.remaining(now) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(errors.BudgetExhausted) as caught:
        accountant.check(now, eps)
    assert isinstance(caught.value, errors.SyncError)
    assert caught.value.available_at == pytest.approx(T0 + 28 * DAY)
    with pytest.raises(errors.BudgetExhausted):
        accountant.record(T0 + 28 * DAY - 1, eps)
    # Once the first spend leaves the 28-day window, one report fits again.
    freed = T0 + 28 * DAY
    assert accountant.remaining(freed) == pytest.approx(eps)
    accountant = accountant.record(freed, eps)
    with pytest.raises(errors.BudgetExhausted):
        accountant.check(freed + DAY, eps)


def test_budget_is_pure_and_counts_future_spends() -> None:
    base = BudgetAccountant(cap=1.0, period=10.0)
    after = base.record(100.0, 0.6)
    assert base.spends == () and base.remaining(100.0) == 1.0
    assert after.remaining(100.0) == pytest.approx(0.4)
    # A spend stamped later than "now" (clock went back) still counts.
    assert after.remaining(50.0) == pytest.approx(0.4)
    assert after.remaining(110.0) == 1.0
    assert after.available_at(100.0, 2.0) == math.inf


def test_default_budget_allows_one_report_per_iso_week_and_refuses_a_sixth_in_28_days() -> None:
    assert pytest.approx(5 * DEFAULT_EPSILON) == DEFAULT_BUDGET_CAP
    assert DEFAULT_BUDGET_PERIOD == 28 * DAY
    rng = random.Random(48)
    week_start = epoch_start("2026-W01")
    accountant = BudgetAccountant()
    for week in range(40):  # one report per ISO week, at any moment of the week
        accountant = accountant.record(
            week_start + week * 7 * DAY + rng.uniform(0, 7 * DAY - 1), DEFAULT_EPSILON
        )
    burst = BudgetAccountant()
    for _ in range(5):
        burst = burst.record(T0, DEFAULT_EPSILON)
    with pytest.raises(errors.BudgetExhausted):
        burst.record(T0 + 27 * DAY, DEFAULT_EPSILON)


@pytest.mark.parametrize(
    "kwargs", [{"cap": 0.0}, {"period": -1.0}, {"spends": ((0.0, -1.0),)}, {"cap": math.nan}]
)
def test_budget_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(errors.ConfigurationError):
        BudgetAccountant(**kwargs)  # type: ignore[arg-type]
