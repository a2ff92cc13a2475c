"""Local differential privacy for segment reports: randomized response, debiasing, budget.

Randomized response
-------------------
Before a report is built, the device replaces its true segment ``s`` (one of ``K``) by
:func:`randomize`: k-ary (generalized) randomized response. It keeps ``s`` with
probability ``p = e^eps / (e^eps + K - 1)`` and otherwise reports one of the other
``K - 1`` segments uniformly, each with ``q = 1 / (e^eps + K - 1)``. Since ``p / q = e^eps``,
one report is ``eps``-locally differentially private: whatever the server (or anyone on
the wire) sees, the odds between any two true segments move by at most ``e^eps``.
Randomness is fresh for every report, drawn from :class:`secrets.SystemRandom` (the OS
CSPRNG). Never memoize the noise across epochs: a fixed noisy answer becomes a stable
pseudonym that lets a server link a device's reports (the RAPPOR lesson). Retrying the
*same* report of the *same* epoch (after a network failure) is not a new draw and does
not spend budget again.

Default epsilon: ln 3
---------------------
``DEFAULT_EPSILON = ln 3 ≈ 1.0986``: the observed report changes the odds about the true
segment by at most a factor of 3. For ``K = 2`` it is exactly Warner's original coin
(tell the truth with probability 3/4), the most common reference point in the local DP
literature and in deployed systems that use per-report epsilons around 1 or below. At
this epsilon a single report is weak evidence (with ``K = 8`` the true segment is sent
with ``p = 0.3``, any given other one with ``0.1``), while the operator's aggregate over a
few thousand devices is still accurate to a few percent of the population (see
:func:`standard_errors`). Larger epsilons buy accuracy at a real privacy cost; smaller
ones make the per-segment estimates useless at the population sizes a small operator
has. The device also caps the *total*: see below.

Estimation
----------
With ``n`` reports and ``c_i`` of them for segment ``i``, ``E[c_i] = n q + (p - q) f_i``
where ``f_i`` is the true count, so :func:`debias` returns the unbiased
``(c_i - n q) / (p - q)``; :func:`standard_errors` returns
``sqrt(n * pi * (1 - pi)) / (p - q)`` with ``pi = c_i / n`` (the plug-in estimate of the
binomial variance of ``c_i``). :func:`estimate` adds k-threshold suppression: a cell
whose raw count *or* estimate is below ``k_threshold`` is not published, and neither is
the total when it is below ``k_threshold``.

Budget
------
:class:`BudgetAccountant` is a pure accountant over past spends ``(time, epsilon)``: the
sum of epsilons spent in any rolling ``period`` must not exceed ``cap``. By basic
composition, a device's reports within any such period are together ``cap``-DP. The
default is ``5 * ln 3`` over 28 days: one report per ISO week always fits (a 28-day window
touches at most 5 ISO weeks) while anything more is refused.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from sync.errors import BudgetExhausted, ConfigurationError

__all__ = [
    "DEFAULT_BUDGET_CAP",
    "DEFAULT_BUDGET_PERIOD",
    "DEFAULT_EPSILON",
    "DEFAULT_K_THRESHOLD",
    "MAX_EPSILON",
    "BudgetAccountant",
    "Estimates",
    "SegmentEstimate",
    "check_epsilon",
    "debias",
    "estimate",
    "keep_probability",
    "other_probability",
    "randomize",
    "standard_errors",
]

DEFAULT_EPSILON: Final = math.log(3)
"""Per-report epsilon: ln 3 (see the module docstring for why)."""

MAX_EPSILON: Final = 20.0
"""The largest per-report epsilon accepted (beyond it the report is essentially raw)."""

DEFAULT_BUDGET_PERIOD: Final = 28 * 24 * 3600.0
"""The rolling period of the budget cap, in seconds (28 days)."""

DEFAULT_BUDGET_CAP: Final = 5 * DEFAULT_EPSILON
"""Total epsilon allowed in any rolling period: five weekly reports at ln 3."""

DEFAULT_K_THRESHOLD: Final = 50
"""Cells (raw or estimated count) below this are never published."""

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
    """``p``: the probability that the true segment is reported."""
    e = math.exp(check_epsilon(epsilon))
    return e / (e + _check_k(k) - 1)


def other_probability(epsilon: float, k: int) -> float:
    """``q``: the probability that one given *other* segment is reported."""
    e = math.exp(check_epsilon(epsilon))
    return 1.0 / (e + _check_k(k) - 1)


def randomize(
    segment: int,
    *,
    k: int,
    epsilon: float = DEFAULT_EPSILON,
    rng: random.Random | None = None,
) -> int:
    """The segment to report for true ``segment`` under k-ary randomized response.

    Draws fresh randomness on every call from ``rng`` (tests inject a seeded
    :class:`random.Random`), by default from the OS CSPRNG.
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


def _check_counts(counts: Sequence[int]) -> list[int]:
    checked = list(counts)
    if not checked:
        raise ConfigurationError("counts must list one count per segment")
    for count in checked:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError("counts must be non-negative integers")
    return checked


def debias(counts: Sequence[int], *, epsilon: float) -> list[float]:
    """Unbiased estimates of the true per-segment counts from randomized counts.

    ``counts[i]`` is the number of reports of segment ``i``; ``K = len(counts)``.
    """
    values = _check_counts(counts)
    k, n = len(values), sum(values)
    p, q = keep_probability(epsilon, k), other_probability(epsilon, k)
    if k == 1:
        return [float(n)]
    return [(c - n * q) / (p - q) for c in values]


def standard_errors(counts: Sequence[int], *, epsilon: float) -> list[float]:
    """Plug-in standard error of each :func:`debias` estimate."""
    values = _check_counts(counts)
    k, n = len(values), sum(values)
    if k == 1 or n == 0:
        return [0.0] * k
    p, q = keep_probability(epsilon, k), other_probability(epsilon, k)
    return [math.sqrt(n * (c / n) * (1 - c / n)) / (p - q) for c in values]


@dataclass(frozen=True, slots=True)
class SegmentEstimate:
    """One published cell: the debiased count of a segment and its standard error."""

    segment: int
    raw_count: int
    estimate: float
    standard_error: float


@dataclass(frozen=True, slots=True)
class Estimates:
    """Debiased counts with k-threshold suppression applied.

    ``cells`` holds only the segments whose raw count and estimate are both at least
    ``k_threshold``; ``suppressed`` lists the others (with no numbers); ``total`` is the
    number of reports, or ``None`` when it is below ``k_threshold``.
    """

    cells: tuple[SegmentEstimate, ...]
    suppressed: tuple[int, ...]
    total: int | None
    k: int
    epsilon: float
    k_threshold: int


def estimate(
    counts: Sequence[int], *, epsilon: float, k_threshold: int = DEFAULT_K_THRESHOLD
) -> Estimates:
    """Debias ``counts`` and suppress every cell under ``k_threshold`` (raw or estimate)."""
    if isinstance(k_threshold, bool) or not isinstance(k_threshold, int) or k_threshold < 1:
        raise ConfigurationError("k_threshold must be an integer >= 1")
    values = _check_counts(counts)
    estimates = debias(values, epsilon=epsilon)
    errors = standard_errors(values, epsilon=epsilon)
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
        epsilon=float(epsilon),
        k_threshold=k_threshold,
    )


@dataclass(frozen=True, slots=True)
class BudgetAccountant:
    """A pure privacy-budget accountant over past spends ``(unix_time, epsilon)``.

    The epsilons spent in any rolling window ``(now - period, now]`` must sum to at most
    ``cap``. Spends stamped in the future (a clock that went back) count as in the
    window. The engine keeps the spends (in its encrypted egress log) and builds an
    accountant from them; :meth:`record` returns a new accountant and never mutates.
    """

    spends: tuple[tuple[float, float], ...] = ()
    cap: float = DEFAULT_BUDGET_CAP
    period: float = DEFAULT_BUDGET_PERIOD

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
        """Raise :class:`~sync.errors.BudgetExhausted` unless ``epsilon`` fits at ``now``."""
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
