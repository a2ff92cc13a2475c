"""Randomized response (one and two layers), the estimators, the central noise, and the
privacy-budget accountant."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from ondevice_sync import errors
from ondevice_sync.privacy import (
    DEFAULT_CENTRAL_EPSILON,
    DEFAULT_EPSILON,
    DEFAULT_EPSILON_1,
    DEFAULT_EPSILON_INF,
    DEFAULT_LIFETIME_CAP,
    LIFETIME_PERIOD,
    BudgetAccountant,
    Channel,
    debias,
    draw_memo,
    estimate,
    estimate_noisy,
    geometric_noise,
    geometric_variance,
    keep_probability,
    other_probability,
    randomize,
    report_from_memo,
    standard_errors,
)

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


def test_default_lifetime_budget_allows_four_memos_a_year_and_refuses_a_fifth() -> None:
    assert pytest.approx(4 * DEFAULT_EPSILON_INF) == DEFAULT_LIFETIME_CAP
    assert LIFETIME_PERIOD == 365 * DAY
    accountant = BudgetAccountant()
    for month in range(4):  # four new memos within one year
        accountant = accountant.record(T0 + month * 30 * DAY, DEFAULT_EPSILON_INF)
    with pytest.raises(errors.BudgetExhausted) as caught:
        accountant.record(T0 + 364 * DAY, DEFAULT_EPSILON_INF)
    assert caught.value.available_at == pytest.approx(T0 + 365 * DAY)
    accountant.record(T0 + 365 * DAY, DEFAULT_EPSILON_INF)  # the first memo's spend expired


def test_two_layer_channel_is_the_composition_of_its_layers() -> None:
    for k in (2, 3, 8, 64):
        first = Channel.randomized_response(DEFAULT_EPSILON_INF, k)
        second = Channel.randomized_response(DEFAULT_EPSILON_1, k)
        both = Channel.two_layer(DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1, k)
        assert both.keep == pytest.approx(
            first.keep * second.keep + (k - 1) * first.other * second.other
        )
        assert both.keep + (k - 1) * both.other == pytest.approx(1.0)
        assert both.signal == pytest.approx(first.signal * second.signal)
        # One report says less about the true segment than the memo does.
        assert 0 < both.epsilon < DEFAULT_EPSILON_INF
    # The figures the module docstring quotes.
    growth = {k: 1 / Channel.randomized_response(DEFAULT_EPSILON_1, k).signal
              for k in (2, 3, 8, 16)}
    assert growth == pytest.approx({2: 1.25, 3: 1.375, 8: 2.0, 16: 3.0})
    assert Channel.two_layer(DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1, 8).epsilon == (
        pytest.approx(0.636, abs=0.001)
    )
    assert Channel.two_layer(DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1, 3).epsilon == (
        pytest.approx(0.802, abs=0.001)
    )
    assert Channel.two_layer(1.0, 2.0, 1) == Channel(k=1, keep=1.0, other=0.0)


def test_memo_then_report_has_the_two_layer_channels_distribution() -> None:
    rng = random.Random(2)
    k, n, true_segment = 4, 40_000, 1
    channel = Channel.two_layer(DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1, k)
    seen = Counter(
        report_from_memo(draw_memo(true_segment, k=k, rng=rng), k=k, rng=rng) for _ in range(n)
    )
    for segment in range(k):
        expected = channel.keep if segment == true_segment else channel.other
        assert abs(seen[segment] / n - expected) < 5 * math.sqrt(expected * (1 - expected) / n)


def test_a_years_linked_reports_of_one_memo_reveal_no_more_than_the_memo() -> None:
    # The threat the memo answers: a server that links 52 weekly reports per device and
    # takes a majority vote. With fresh one-layer noise it recovers most true segments;
    # with a memo it recovers the memo, which is the truth only with p_inf = 0.3 (K=8).
    rng = random.Random(52)
    k, devices, weeks = 8, 2000, 52
    fresh_hits = memo_hits = 0
    for _ in range(devices):
        truth = rng.randrange(k)
        fresh = Counter(randomize(truth, k=k, epsilon=DEFAULT_EPSILON, rng=rng)
                        for _ in range(weeks))
        fresh_hits += fresh.most_common(1)[0][0] == truth
        memo = draw_memo(truth, k=k, rng=rng)
        linked = Counter(report_from_memo(memo, k=k, rng=rng) for _ in range(weeks))
        memo_hits += linked.most_common(1)[0][0] == truth
    p_inf = keep_probability(DEFAULT_EPSILON_INF, k)
    assert fresh_hits / devices > 0.9
    assert memo_hits / devices < p_inf + 4 * math.sqrt(p_inf * (1 - p_inf) / devices)


def test_geometric_noise_is_centred_with_the_stated_variance() -> None:
    rng = random.Random(1795608000)
    n = 60_000
    eps = math.log(3)  # alpha = 1/3 makes the expected values easy to state exactly
    draws = [geometric_noise(eps, rng=rng) for _ in range(n)]
    variance = geometric_variance(eps)
    assert variance == pytest.approx(1.5)  # alpha = 1/3: 2 alpha / (1 - alpha)^2
    assert all(isinstance(z, int) for z in draws)
    assert abs(sum(draws) / n) < 5 * math.sqrt(variance / n)
    assert float(np.var(draws)) == pytest.approx(variance, rel=0.05)
    # P(Z = z) is proportional to alpha^|z|: P(0) = (1 - alpha) / (1 + alpha) = 1/2 and
    # P(z + 1) / P(z) = 1/3 on each side.
    counts = Counter(draws)
    assert counts[0] / n == pytest.approx(0.5, abs=0.01)
    for z in (1, -1):
        assert counts[2 * z] / counts[z] == pytest.approx(1 / 3, abs=0.03)
    # The default source is the OS CSPRNG: draws vary.
    assert len({geometric_noise(DEFAULT_CENTRAL_EPSILON) for _ in range(200)}) > 1


def test_estimate_noisy_is_unbiased_and_its_standard_error_matches_the_spread() -> None:
    rng = np.random.default_rng(11)
    noise_rng = random.Random(11)
    k, n, runs = 3, 3000, 400
    channel = Channel.two_layer(DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1, k)
    truth = np.array([0.6, 0.3, 0.1])
    reported = channel.other + channel.signal * truth
    estimates, errors_ = [], []
    for _ in range(runs):
        counts = [int(c) + geometric_noise(DEFAULT_CENTRAL_EPSILON, rng=noise_rng)
                  for c in rng.multinomial(n, reported)]
        result = estimate_noisy(counts, channel=channel, central_epsilon=DEFAULT_CENTRAL_EPSILON,
                                k_threshold=1)
        cells = {cell.segment: cell for cell in result.cells}
        if len(cells) < k:
            continue
        estimates.append([cells[s].estimate for s in range(k)])
        errors_.append([cells[s].standard_error for s in range(k)])
        assert result.total == sum(counts)
        assert result.central_epsilon == DEFAULT_CENTRAL_EPSILON
    assert len(estimates) == runs
    empirical = np.std(np.array(estimates), axis=0, ddof=1)
    assert np.allclose(np.mean(estimates, axis=0), truth * n, atol=4 * empirical / math.sqrt(runs))
    assert np.allclose(np.mean(np.array(errors_), axis=0), empirical, rtol=0.15)


def test_estimate_noisy_suppresses_on_the_noisy_count_and_the_estimate() -> None:
    channel = Channel.two_layer(DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1, 2)
    # Noisy counts may be negative; the total is their sum, nothing exact.
    result = estimate_noisy([400, -2], channel=channel, central_epsilon=1.0, k_threshold=50)
    assert result.total == 398 and result.suppressed == (1,)
    assert [cell.segment for cell in result.cells] == [0]
    tiny = estimate_noisy([30, 5], channel=channel, central_epsilon=1.0, k_threshold=50)
    assert tiny.cells == () and tiny.total is None
    with pytest.raises(errors.ConfigurationError):
        estimate_noisy([1, 2, 3], channel=channel, central_epsilon=1.0)
    with pytest.raises(errors.ConfigurationError):
        estimate_noisy([1, 2], channel=channel, central_epsilon=0.0)


@pytest.mark.parametrize(
    "kwargs", [{"cap": 0.0}, {"period": -1.0}, {"spends": ((0.0, -1.0),)}, {"cap": math.nan}]
)
def test_budget_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(errors.ConfigurationError):
        BudgetAccountant(**kwargs)  # type: ignore[arg-type]
