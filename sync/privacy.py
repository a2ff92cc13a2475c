"""Local differential privacy for segment reports: two-layer randomized response, the
composed channel's estimator, central noise for publication, and the budgets.

The threat
----------
The server sees every report and, in the worst case, knows which reports came from one
device (the same address, timing, or anything else). With *fresh* randomized response
every week, a device's reports of an unchanged segment are independent noisy copies of
it: a majority vote over a year recovers the true segment of 96% of devices at K = 8.
Repeated reports of one value must not add up. The cure (RAPPOR's) is two layers.

Layer 1: the memo (permanent randomized response, ``epsilon_inf``)
-------------------------------------------------------------------
For each true segment value ``s`` a device holds, it draws *once*
``m = randomize(s, epsilon_inf)`` (:func:`draw_memo`) and keeps ``m`` in its encrypted
profile. k-ary (generalized) randomized response keeps ``s`` with probability
``p = e^eps / (e^eps + K - 1)`` and otherwise picks one of the other ``K - 1`` segments
uniformly (each with ``q = 1 / (e^eps + K - 1)``), so ``p / q = e^eps``. Everything the
server can ever see about ``s`` is a function of ``m`` plus fresh noise, so however
many reports it links, it learns at most ``epsilon_inf`` about ``s``: the lifetime
bound for an unchanged segment.

Layer 2: the report (instantaneous randomized response, ``epsilon_1``)
-----------------------------------------------------------------------
Each report sends ``r = randomize(m, epsilon_1)`` (:func:`report_from_memo`), fresh
randomness every time, so the memo is not sent verbatim and is not a stable pseudonym
that would let reports be linked by their value. One report reveals at most
``epsilon_1`` about the memo, and (composed with layer 1) less than ``epsilon_inf``
about the true segment (:meth:`Channel.epsilon`).

Defaults, and why
-----------------
- ``DEFAULT_EPSILON_INF = ln 3``: the lifetime bound for an unchanged segment. A server
  that links every report of a device ends up at the odds of one classic Warner coin:
  the true segment is at most 3 times likelier than any other. For K = 8 and uniform
  segments, its best guess is right 30% of the time (12.5% by chance), however long
  it watches.
- ``DEFAULT_EPSILON_1 = 2 ln 3 = ln 9``: the second layer's only job is to keep reports
  from repeating the memo verbatim. Its cost is accuracy: the composed channel's signal
  ``p - q`` is the product of the two layers' signals, so the operator's standard errors
  grow by ``1 / (p_1 - q_1)``. At ``ln 9`` that factor is 1.25 (K = 2), 1.38 (K = 3),
  2.0 (K = 8) and 3.0 (K = 16); at ``ln 3`` it would be 2.0, 2.5, 5.0 and 9.0, which
  makes the per-segment estimates of a K = 8 operator with 10,000 devices useless. A
  report still matches the memo only 56% of the time at K = 8 (82% at K = 3), and the
  composed per-report epsilon about the true segment is 0.64 at K = 8 and 0.80 at K = 3,
  below ``epsilon_inf`` either way.
- ``DEFAULT_LIFETIME_CAP = 4 ln 3`` over ``LIFETIME_PERIOD = 365`` days: each *new* memo
  (the true segment changed to a value without a memo) spends ``epsilon_inf``: at most four
  distinct segment values a year get a fresh memo (over its whole life a device reveals
  at most ``epsilon_inf`` about each distinct segment it ever held, so the total grows
  by at most the cap per year); beyond that
  the device keeps reporting randomizations of a memo it already has (or nothing, as
  configured). Changing back to a value with a memo reuses it and spends nothing.

Estimation
----------
Both layers together are one symmetric channel (:meth:`Channel.two_layer`): the report
equals the true segment with ``P = p_inf p_1 + (K - 1) q_inf q_1`` and each other one
with ``Q = (1 - P) / (K - 1)``. With ``n`` reports and ``c_i`` of them for ``i``,
``E[c_i] = n Q + (P - Q) f_i``, so :func:`debias` returns ``(c_i - n Q) / (P - Q)``
and :func:`standard_errors` the plug-in ``sqrt(n pi (1 - pi)) / (P - Q)``. Across a
population, devices' memos are independent, so this is unbiased for the population's
segment counts; one device's successive reports are correlated (they share a memo),
which is exactly what stops them from adding up.

Publication (central noise, for the server)
-------------------------------------------
Raw counts are never published. For a closed epoch the server adds two-sided geometric
noise (the discrete Laplace mechanism, :func:`geometric_noise`) at ``central_epsilon``
to every cell once, stores the noisy counts, and publishes only values computed from
them (:func:`estimate_noisy`). Adding or removing one report changes one cell by 1, so
the published numbers are ``central_epsilon``-DP with respect to any single report, on
top of the local randomization; subtracting published cells from a total, querying
before and after a report, or injecting reports into a cell recover a count only up to
that noise (:func:`geometric_variance`).

Budget accounting
-----------------
:class:`BudgetAccountant` is a pure accountant over past spends ``(time, epsilon)``: the
sum spent in any rolling ``period`` must not exceed ``cap``. The device uses it for the
lifetime budget of memo draws.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ondevice_sync.errors import BudgetExhausted, ConfigurationError

__all__ = [
    "DEFAULT_CENTRAL_EPSILON",
    "DEFAULT_EPSILON",
    "DEFAULT_EPSILON_1",
    "DEFAULT_EPSILON_INF",
    "DEFAULT_K_THRESHOLD",
    "DEFAULT_LIFETIME_CAP",
    "LIFETIME_PERIOD",
    "MAX_EPSILON",
    "BudgetAccountant",
    "Channel",
    "Estimates",
    "SegmentEstimate",
    "check_epsilon",
    "debias",
    "draw_memo",
    "estimate",
    "estimate_noisy",
    "geometric_noise",
    "geometric_variance",
    "keep_probability",
    "other_probability",
    "randomize",
    "report_from_memo",
    "standard_errors",
]

DEFAULT_EPSILON_INF: Final = math.log(3)
"""Lifetime epsilon of one memo (layer 1): ln 3 (see the module docstring)."""

DEFAULT_EPSILON_1: Final = 2 * math.log(3)
"""Per-report epsilon about the memo (layer 2): ln 9 (see the module docstring)."""

DEFAULT_EPSILON: Final = DEFAULT_EPSILON_INF
"""The epsilon of a one-layer randomized response where none is given: ln 3."""

MAX_EPSILON: Final = 20.0
"""The largest epsilon accepted (beyond it a randomized value is essentially raw)."""

LIFETIME_PERIOD: Final = 365 * 24 * 3600.0
"""The rolling period of the lifetime budget, in seconds (365 days)."""

DEFAULT_LIFETIME_CAP: Final = 4 * DEFAULT_EPSILON_INF
"""Epsilon allowed for new memos in any 365 days: four memo draws at ln 3."""

DEFAULT_K_THRESHOLD: Final = 50
"""Cells whose noisy count or estimate is below this are never published."""

DEFAULT_CENTRAL_EPSILON: Final = 0.5
"""Epsilon of the central geometric noise the server adds before it publishes: 0.5, a
standard deviation of 2.8 reports per cell. It hides one report's contribution to a
published cell (the local layers already protect each device's segment); at ln 3 the
noise would be zero half the time, so an attacker subtracting injected reports would
read the exact honest count in about half the epochs. At 0.5 the noise adds about 0.6%
to the variance of a K = 8 operator's estimates with 10,000 devices."""

_TOLERANCE: Final = 1e-9
_SYSTEM_RANDOM: Final = secrets.SystemRandom()


def check_epsilon(epsilon: float) -> float:
    """Return ``epsilon`` as a float, or raise ConfigurationError unless in (0, MAX]."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not math.isfinite(epsilon)
        or not 0 < epsilon <= MAX_EPSILON
    ):
        raise ConfigurationError(f"epsilon must be a number in (0, {MAX_EPSILON}]")
    return float(epsilon)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"K must be an integer >= 1, got {k!r}")
    return k


def keep_probability(epsilon: float, k: int) -> float:
    """``p``: the probability that one randomized response keeps the true value."""
    e = math.exp(check_epsilon(epsilon))
    return e / (e + _check_k(k) - 1)


def other_probability(epsilon: float, k: int) -> float:
    """``q``: the probability that one given *other* value is reported."""
    e = math.exp(check_epsilon(epsilon))
    return 1.0 / (e + _check_k(k) - 1)


@dataclass(frozen=True, slots=True)
class Channel:
    """A symmetric K-ary channel from the true segment to the reported one.

    ``keep`` is the probability that the report equals the true segment, ``other`` the
    probability of each given other segment (``keep + (k - 1) * other == 1``). Build
    one with :meth:`randomized_response` (one layer) or :meth:`two_layer` (a memo at
    ``epsilon_inf``, then a report at ``epsilon_1``); the estimators take it.
    """

    k: int
    keep: float
    other: float

    def __post_init__(self) -> None:
        _check_k(self.k)
        if not (0.0 <= self.other <= self.keep <= 1.0) or not math.isclose(
            self.keep + (self.k - 1) * self.other, 1.0, abs_tol=1e-9
        ):
            raise ConfigurationError("a channel needs 0 <= other <= keep and rows summing to 1")

    @classmethod
    def randomized_response(cls, epsilon: float, k: int) -> Channel:
        """One layer of k-ary randomized response at ``epsilon``."""
        if k == 1:
            return cls(k=1, keep=1.0, other=0.0)
        return cls(k=k, keep=keep_probability(epsilon, k), other=other_probability(epsilon, k))

    @classmethod
    def two_layer(cls, epsilon_inf: float, epsilon_1: float, k: int) -> Channel:
        """The memo at ``epsilon_inf`` followed by a report at ``epsilon_1``, composed."""
        first = cls.randomized_response(epsilon_inf, k)
        second = cls.randomized_response(epsilon_1, k)
        if k == 1:
            return first
        keep = first.keep * second.keep + (k - 1) * first.other * second.other
        return cls(k=k, keep=keep, other=(1.0 - keep) / (k - 1))

    @property
    def signal(self) -> float:
        """``keep - other``: how much of a count is signal (standard errors scale by its
        inverse)."""
        return self.keep - self.other

    @property
    def epsilon(self) -> float:
        """The local-DP epsilon of one use of the channel (``inf`` for K = 1)."""
        return math.inf if self.other == 0 else math.log(self.keep / self.other)


def randomize(
    segment: int,
    *,
    k: int,
    epsilon: float = DEFAULT_EPSILON,
    rng: random.Random | None = None,
) -> int:
    """One k-ary randomized response of ``segment`` at ``epsilon``.

    Draws fresh randomness on every call from ``rng`` (tests inject a seeded
    :class:`random.Random`), by default from the OS CSPRNG. On its own, repeated calls
    for the same value *add up* over time: devices use :func:`draw_memo` once per true
    value and :func:`report_from_memo` per report.
    """
    _check_k(k)
    if isinstance(segment, bool) or not isinstance(segment, int) or not 0 <= segment < k:
        raise ConfigurationError(f"segment must be an integer in 0..{k - 1}")
    p = keep_probability(epsilon, k)
    source = _SYSTEM_RANDOM if rng is None else rng
    if k == 1 or source.random() < p:
        return segment
    other = source.randrange(k - 1)
    return other if other < segment else other + 1


def draw_memo(
    segment: int,
    *,
    k: int,
    epsilon_inf: float = DEFAULT_EPSILON_INF,
    rng: random.Random | None = None,
) -> int:
    """Layer 1: the permanent noisy value of true ``segment``, drawn once and kept.

    The caller stores the result and never draws again for the same true value (that
    would spend ``epsilon_inf`` again)."""
    return randomize(segment, k=k, epsilon=epsilon_inf, rng=rng)


def report_from_memo(
    memo: int,
    *,
    k: int,
    epsilon_1: float = DEFAULT_EPSILON_1,
    rng: random.Random | None = None,
) -> int:
    """Layer 2: the segment one report carries, a fresh randomization of ``memo``."""
    return randomize(memo, k=k, epsilon=epsilon_1, rng=rng)


def _check_counts(counts: Sequence[int]) -> list[int]:
    checked = list(counts)
    if not checked:
        raise ConfigurationError("counts must list one count per segment")
    for count in checked:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError("counts must be non-negative integers")
    return checked


def _channel_for(k: int, channel: Channel | None, epsilon: float | None) -> Channel:
    if (channel is None) == (epsilon is None):
        raise ConfigurationError("pass exactly one of channel= or epsilon=")
    if channel is None:
        assert epsilon is not None
        return Channel.randomized_response(epsilon, k)
    if channel.k != k:
        raise ConfigurationError(f"the channel has K={channel.k} but there are {k} counts")
    return channel


def debias(
    counts: Sequence[int], *, channel: Channel | None = None, epsilon: float | None = None
) -> list[float]:
    """Unbiased estimates of the true per-segment counts from reported counts.

    ``counts[i]`` is the number of reports of segment ``i``; ``K = len(counts)``. Give
    the ``channel`` the reports went through, or ``epsilon`` for one layer.
    """
    values = _check_counts(counts)
    ch = _channel_for(len(values), channel, epsilon)
    n = sum(values)
    if ch.k == 1:
        return [float(n)]
    return [(c - n * ch.other) / ch.signal for c in values]


def standard_errors(
    counts: Sequence[int], *, channel: Channel | None = None, epsilon: float | None = None
) -> list[float]:
    """Plug-in standard error of each :func:`debias` estimate."""
    values = _check_counts(counts)
    ch = _channel_for(len(values), channel, epsilon)
    n = sum(values)
    if ch.k == 1 or n == 0:
        return [0.0] * ch.k
    return [math.sqrt(n * (c / n) * (1 - c / n)) / ch.signal for c in values]


def geometric_noise(epsilon: float, *, rng: random.Random | None = None) -> int:
    """One draw of two-sided geometric noise (the discrete Laplace mechanism).

    ``P(Z = z)`` is proportional to ``alpha ** |z|`` with ``alpha = e^-epsilon``: added to
    a count whose sensitivity is 1, the result is ``epsilon``-DP. Drawn as the
    difference of two geometric variables by inversion, from the OS CSPRNG by default.
    """
    alpha = math.exp(-check_epsilon(epsilon))
    source = _SYSTEM_RANDOM if rng is None else rng
    log_alpha = math.log(alpha)

    def one() -> int:
        u = 1.0 - source.random()  # in (0, 1]
        return math.floor(math.log(u) / log_alpha)

    return one() - one()


def geometric_variance(epsilon: float) -> float:
    """Variance of :func:`geometric_noise`: ``2 alpha / (1 - alpha)^2``."""
    alpha = math.exp(-check_epsilon(epsilon))
    return 2 * alpha / (1 - alpha) ** 2


@dataclass(frozen=True, slots=True)
class SegmentEstimate:
    """One published cell: the debiased count of a segment and its standard error.

    ``raw_count`` is what the estimate was computed from: the exact count for
    :func:`estimate`, the noisy count for :func:`estimate_noisy` (the server never
    publishes it).
    """

    segment: int
    raw_count: int
    estimate: float
    standard_error: float


@dataclass(frozen=True, slots=True)
class Estimates:
    """Debiased counts with k-threshold suppression applied.

    ``cells`` holds only the segments whose count and estimate are both at least
    ``k_threshold``; ``suppressed`` lists the others (with no numbers); ``total`` is the
    number of reports it was computed from (noisy for :func:`estimate_noisy`), or
    ``None`` when it is below ``k_threshold``. ``epsilon`` is the channel's per-report
    epsilon; ``central_epsilon`` the central noise's (``None`` without central noise).
    """

    cells: tuple[SegmentEstimate, ...]
    suppressed: tuple[int, ...]
    total: int | None
    k: int
    epsilon: float
    k_threshold: int
    central_epsilon: float | None = None


def _check_threshold(k_threshold: int) -> None:
    if isinstance(k_threshold, bool) or not isinstance(k_threshold, int) or k_threshold < 1:
        raise ConfigurationError("k_threshold must be an integer >= 1")


def estimate(
    counts: Sequence[int],
    *,
    channel: Channel | None = None,
    epsilon: float | None = None,
    k_threshold: int = DEFAULT_K_THRESHOLD,
) -> Estimates:
    """Debias exact ``counts`` and suppress every cell under ``k_threshold``.

    For analysis and tests: exact counts must not be published (subtraction recovers
    suppressed cells); the server publishes :func:`estimate_noisy` of noisy counts.
    """
    _check_threshold(k_threshold)
    values = _check_counts(counts)
    ch = _channel_for(len(values), channel, epsilon)
    estimates = debias(values, channel=ch)
    errors = standard_errors(values, channel=ch)
    cells: list[SegmentEstimate] = []
    suppressed: list[int] = []
    for segment, (raw, est, err) in enumerate(zip(values, estimates, errors, strict=True)):
        if raw < k_threshold or est < k_threshold:
            suppressed.append(segment)
        else:
            cells.append(SegmentEstimate(segment, raw, est, err))
    total = sum(values)
    return Estimates(
        cells=tuple(cells),
        suppressed=tuple(suppressed),
        total=total if total >= k_threshold else None,
        k=len(values),
        epsilon=ch.epsilon,
        k_threshold=k_threshold,
    )


def estimate_noisy(
    noisy_counts: Sequence[int],
    *,
    channel: Channel,
    central_epsilon: float,
    k_threshold: int = DEFAULT_K_THRESHOLD,
) -> Estimates:
    """Debias counts that already carry central geometric noise at ``central_epsilon``.

    ``noisy_counts[i]`` is the count of segment ``i`` plus one draw of
    :func:`geometric_noise` (it may be negative). The report total is taken as the sum
    of the noisy counts, so nothing exact enters. A cell is published when its noisy
    count and its estimate are both at least ``k_threshold``. The standard error adds
    the central noise's variance to the sampling variance: the estimate's numerator
    ``c_i - Q * n`` carries ``z_i (1 - Q) - Q * sum(z_j, j != i)``.
    """
    _check_threshold(k_threshold)
    values = list(noisy_counts)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ConfigurationError("noisy counts must list one integer per segment")
    k = len(values)
    if channel.k != k:
        raise ConfigurationError(f"the channel has K={channel.k} but there are {k} counts")
    variance = geometric_variance(central_epsilon)
    n = sum(values)
    cells: list[SegmentEstimate] = []
    suppressed: list[int] = []
    for segment, count in enumerate(values):
        if k == 1:
            est, err = float(count), math.sqrt(variance)
        else:
            est = (count - n * channel.other) / channel.signal
            share = min(max(count / n, 0.0), 1.0) if n > 0 else 0.0
            sampling = max(n, 0) * share * (1 - share)
            noise = variance * ((1 - channel.other) ** 2 + (k - 1) * channel.other**2)
            err = math.sqrt(sampling + noise) / channel.signal
        if count < k_threshold or est < k_threshold:
            suppressed.append(segment)
        else:
            cells.append(SegmentEstimate(segment, count, est, err))
    return Estimates(
        cells=tuple(cells),
        suppressed=tuple(suppressed),
        total=n if n >= k_threshold else None,
        k=k,
        epsilon=channel.epsilon,
        k_threshold=k_threshold,
        central_epsilon=float(central_epsilon),
    )


@dataclass(frozen=True, slots=True)
class BudgetAccountant:
    """A pure privacy-budget accountant over past spends ``(unix_time, epsilon)``.

    The epsilons spent in any rolling window ``(now - period, now]`` must sum to at most
    ``cap``. Spends stamped in the future (a clock that went back) count as in the
    window. The engine keeps the spends (memo draws, in its encrypted budget ledger)
    and builds an accountant from them; :meth:`record` returns a new accountant and never mutates.
    """

    spends: tuple[tuple[float, float], ...] = ()
    cap: float = DEFAULT_LIFETIME_CAP
    period: float = LIFETIME_PERIOD

    def __post_init__(self) -> None:
        for value, name in ((self.cap, "cap"), (self.period, "period")):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigurationError(f"budget {name} must be a finite number > 0")
        for spend in self.spends:
            if (
                len(spend) != 2
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in spend)
                or spend[1] < 0
            ):
                raise ConfigurationError("spends must be (time, epsilon >= 0) pairs")

    def spent(self, now: float) -> float:
        """Epsilon spent in the window ``(now - period, now]`` (and any future spends)."""
        start = now - self.period
        return math.fsum(eps for when, eps in self.spends if when > start)

    def remaining(self, now: float) -> float:
        """Epsilon still available at ``now`` (never negative)."""
        return max(0.0, self.cap - self.spent(now))

    def available_at(self, now: float, epsilon: float) -> float:
        """The earliest time ``>= now`` at which spending ``epsilon`` fits (``inf`` if
        ``epsilon`` exceeds the cap itself)."""
        if epsilon > self.cap + _TOLERANCE:
            return math.inf
        candidates = sorted({now, *(when + self.period for when, _ in self.spends)})
        for moment in candidates:
            if moment >= now and self.spent(moment) + epsilon <= self.cap + _TOLERANCE:
                return moment
        return math.inf  # pragma: no cover - the last candidate empties the window

    def check(self, now: float, epsilon: float) -> None:
        """Raise :class:`~ondevice_sync.errors.BudgetExhausted` unless ``epsilon`` fits."""
        check_epsilon(epsilon)
        remaining = self.remaining(now)
        if epsilon > remaining + _TOLERANCE:
            raise BudgetExhausted(
                f"privacy budget spent: {self.spent(now):.4f} of {self.cap:.4f} used in the "
                f"last {self.period / 86400:g} days; this report needs {epsilon:.4f}",
                remaining=remaining,
                available_at=self.available_at(now, epsilon),
            )

    def record(self, now: float, epsilon: float) -> BudgetAccountant:
        """:meth:`check`, then a new accountant with the spend ``(now, epsilon)`` added."""
        self.check(now, epsilon)
        return BudgetAccountant(
            spends=(*self.spends, (float(now), float(epsilon))), cap=self.cap, period=self.period
        )
