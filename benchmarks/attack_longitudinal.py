"""Longitudinal linking attack on weekly segment reports: today's fresh randomized
response against the two-layer (memo + report) scheme of ``ondevice_sync.privacy``.

What it simulates
-----------------
``--devices`` (2,000) devices over ``--weeks`` (52) weekly epochs, K = 3 and K = 8,
with uniform segment shares and with Zipf shares (``share_i`` proportional to
``1 / (i + 1)``). Week 0's segment is drawn from the shares; each later week, with
probability ``--change`` (1.5%), a device's segment changes to a *different* one drawn
from the shares of the other segments. "Stable" devices never change within the run,
"changing" ones change at least once.

- today: every week ``randomize(s, epsilon=ln 3)``, fresh, no memo.
- two-layer, the device's policy: a memo for the current true segment exists -> report
  ``report_from_memo(memo, epsilon_1)``; otherwise, if a new memo fits the lifetime
  budget (``epsilon_inf`` per memo draw, ``DEFAULT_LIFETIME_CAP`` over the rolling
  ``LIFETIME_PERIOD``), ``draw_memo(s, epsilon_inf)``, keep it for ``s`` forever and
  report from it; otherwise (budget spent) ``--policy repeat`` (default) reports a fresh
  randomization of the most recently used memo, ``--policy skip`` sends nothing.

The randomization is re-implemented vectorized here (numpy); before anything else the
script checks that this sampler, and ``ondevice_sync.privacy.randomize`` itself, match the
library's ``Channel`` transition probabilities, and that the vectorized policy makes the
same memo draws and budget refusals as a scalar run of ``draw_memo`` +
``BudgetAccountant``. It exits with an error if either check fails.

The attacker
------------
It links all of a device's reports (worst case) and knows the mechanism, its
parameters and the population's shares. At 4, 12, 26 and 52 weeks it guesses the
device's segment of the last week seen (accuracy = fraction right):

- majority: the most frequent reported segment (ties broken at random);
- MAP: Bayes MAP with the shares as prior, assuming one segment (and, for the two-layer
  scheme, one memo) behind all the reports: ``prod_t P(r_t | s)`` for today,
  ``sum_m P(m | s) prod_t P(r_t | m)`` for the two-layer scheme;
- MAP, knows switches: the same on the last spell only: the attacker is also told
  where the device's reports switched to another memo (two-layer) or another true
  segment (today), and uses the reports since the last switch. It does not pool
  earlier spells of the same memo, nor use that different memos belong to different
  segments;
- sees the memo (two-layer): MAP from the memo in use at the last week itself, as if
  infinitely many reports of it had been linked: the most any report-linking attack can
  learn about one memo.

Reference: the same attacks on *one* report at ``epsilon_inf`` (exact, not simulated).
Target: for stable devices with uniform shares, the two-layer accuracy after 52 weeks
is at most the reference + 2 points (30% at K = 8, 60% at K = 3). After 52 weeks the
memo is recovered almost surely, so the expected accuracy equals the reference and only
sampling noise is left: the verdict uses a separate run of ``--target-devices``
(20,000) devices that never change (binomial SE ~0.35 points), and the stable devices
of the main run are shown beside it.

Also printed: how often the lifetime budget refused a new memo (a device wanted a 5th
memo within 365 days), and the operator's cost: RMSE of the debiased per-segment counts
(``ondevice_sync.privacy.debias``) for ``--cost-devices`` (10,000) devices in one epoch over
``--cost-reps`` (3,000) repetitions, two-layer channel against one layer at ln 3, with
the ratio, the ratio predicted by the binomial variance, and ``1 / (p1 - q1)``.

Run::

    .venv/bin/python benchmarks/attack_longitudinal.py                  # ~15 s
    .venv/bin/python benchmarks/attack_longitudinal.py --policy skip --devices 20000
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from ondevice_sync import privacy
from ondevice_sync.errors import BudgetExhausted

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

WEEK: Final = 7 * 86400.0
HORIZONS: Final = (4, 12, 26, 52)
EPS_OLD: Final = privacy.DEFAULT_EPSILON
EPS_INF: Final = privacy.DEFAULT_EPSILON_INF
EPS_1: Final = privacy.DEFAULT_EPSILON_1
CAP: Final = privacy.DEFAULT_LIFETIME_CAP
PERIOD: Final = privacy.LIFETIME_PERIOD
TOLERANCE: Final = 1e-9  # the accountant's slack for float sums of spends
TARGET_SLACK: Final = 0.02
Z_LIMIT: Final = 5.0


def rr(values: IntArray, k: int, epsilon: float, rng: np.random.Generator) -> IntArray:
    """Vectorized k-ary randomized response: the law of ``privacy.randomize``."""
    keep = rng.random(values.shape) < privacy.keep_probability(epsilon, k)
    other = rng.integers(0, k - 1, size=values.shape, dtype=np.int64)
    other += other >= values
    out: IntArray = np.where(keep, values, other)
    return out


def shares_for(kind: str, k: int) -> FloatArray:
    if kind == "uniform":
        return np.full(k, 1.0 / k)
    weights = 1.0 / np.arange(1, k + 1, dtype=np.float64)
    out: FloatArray = weights / weights.sum()
    return out


def channel_matrix(channel: privacy.Channel) -> FloatArray:
    m = np.full((channel.k, channel.k), channel.other)
    np.fill_diagonal(m, channel.keep)
    return m


# ----------------------------------------------------------------------------- checks


def _max_z(counts: FloatArray, expected: FloatArray) -> float:
    """Largest |z| of the empirical row frequencies of ``counts`` against ``expected``."""
    n = counts.sum(axis=1, keepdims=True)
    freq = counts / n
    se = np.sqrt(expected * (1 - expected) / n)
    return float(np.max(np.abs(freq - expected) / np.where(se > 0, se, 1.0)))


def check_sampler(seed: int) -> list[str]:
    """Compare the vectorized sampler and ``privacy.randomize`` with ``Channel``."""
    rng = np.random.default_rng([seed, 1])
    scalar = random.Random(seed)
    lines: list[str] = []
    failed: list[str] = []
    for k in (3, 8):
        cases: dict[str, tuple[privacy.Channel, float | None]] = {
            "one layer, ln 3 (today)": (privacy.Channel.randomized_response(EPS_OLD, k), EPS_OLD),
            "memo, epsilon_inf": (privacy.Channel.randomized_response(EPS_INF, k), EPS_INF),
            "report, epsilon_1": (privacy.Channel.randomized_response(EPS_1, k), EPS_1),
            "both layers composed": (privacy.Channel.two_layer(EPS_INF, EPS_1, k), None),
        }
        for name, (channel, epsilon) in cases.items():
            expected = channel_matrix(channel)
            n_vec, n_lib = 1_000_000, 40_000
            true = rng.integers(0, k, size=n_vec, dtype=np.int64)
            if epsilon is None:
                got = rr(rr(true, k, EPS_INF, rng), k, EPS_1, rng)
            else:
                got = rr(true, k, epsilon, rng)
            vec = np.bincount(true * k + got, minlength=k * k).reshape(k, k).astype(float)
            lib = np.zeros((k, k))
            for i in range(n_lib):
                s = i % k
                if epsilon is None:
                    memo = privacy.draw_memo(s, k=k, epsilon_inf=EPS_INF, rng=scalar)
                    r = privacy.report_from_memo(memo, k=k, epsilon_1=EPS_1, rng=scalar)
                else:
                    r = privacy.randomize(s, k=k, epsilon=epsilon, rng=scalar)
                lib[s, r] += 1
            z_vec, z_lib = _max_z(vec, expected), _max_z(lib, expected)
            keep_vec = float(np.trace(vec) / vec.sum())
            keep_lib = float(np.trace(lib) / lib.sum())
            lines.append(
                f"  K={k} {name:<28} Channel keep {channel.keep:.4f}  vectorized "
                f"{keep_vec:.4f} (max|z| {z_vec:.1f})  privacy.randomize {keep_lib:.4f} "
                f"(max|z| {z_lib:.1f})"
            )
            if max(z_vec, z_lib) > Z_LIMIT:
                failed.append(f"K={k} {name}")
    if failed:
        raise SystemExit("sampler does not match ondevice_sync.privacy: " + ", ".join(failed))
    return lines


# ------------------------------------------------------------------------- simulation


def simulate_segments(
    n: int, weeks: int, shares: FloatArray, change: float, rng: np.random.Generator
) -> IntArray:
    """True segment of every device each week, shape (n, weeks)."""
    k = len(shares)
    true = np.empty((n, weeks), dtype=np.int64)
    current = rng.choice(k, size=n, p=shares).astype(np.int64)
    for t in range(weeks):
        if t > 0 and change > 0:
            movers = np.flatnonzero(rng.random(n) < change)
            if movers.size:
                weights = np.broadcast_to(shares, (movers.size, k)).copy()
                weights[np.arange(movers.size), current[movers]] = 0.0
                cdf = np.cumsum(weights, axis=1)
                u = rng.random(movers.size) * cdf[:, -1]
                current[movers] = (cdf <= u[:, None]).sum(axis=1)
        true[:, t] = current
    return true


@dataclass(frozen=True)
class Run:
    """One scheme's reports. ``reports`` is -1 where nothing was sent; ``spell`` names
    what the report randomizes (the memo's true segment, or the true segment today);
    ``memo`` the memo in use (two-layer only); ``drawn`` / ``refused`` mark weeks with a
    new memo / a new memo refused by the budget."""

    reports: IntArray
    spell: IntArray
    memo: IntArray | None = None
    drawn: BoolArray | None = None
    refused: BoolArray | None = None


def simulate_today(true: IntArray, k: int, rng: np.random.Generator) -> Run:
    return Run(reports=rr(true, k, EPS_OLD, rng), spell=true)


def simulate_two_layer(true: IntArray, k: int, policy: str, rng: np.random.Generator) -> Run:
    n, weeks = true.shape
    rows = np.arange(n)
    memos = np.full((n, k), -1, dtype=np.int64)
    spends = np.zeros((n, weeks))
    reports = np.full((n, weeks), -1, dtype=np.int64)
    spell = np.empty((n, weeks), dtype=np.int64)
    memo_used = np.empty((n, weeks), dtype=np.int64)
    drawn = np.zeros((n, weeks), dtype=bool)
    refused = np.zeros((n, weeks), dtype=bool)
    last_memo = np.full(n, -1, dtype=np.int64)
    last_key = np.full(n, -1, dtype=np.int64)
    stamps = np.arange(weeks) * WEEK
    for t in range(weeks):
        s = true[:, t]
        in_window = stamps[: t + 1] > stamps[t] - PERIOD
        spent = spends[:, : t + 1][:, in_window].sum(axis=1)
        need = memos[rows, s] < 0
        fits = spent + EPS_INF <= CAP + TOLERANCE
        new = np.flatnonzero(need & fits)
        memos[new, s[new]] = rr(s[new], k, EPS_INF, rng)
        spends[new, t] = EPS_INF
        drawn[new, t] = True
        refused[:, t] = need & ~fits
        use = np.where(refused[:, t], last_memo, memos[rows, s])
        key = np.where(refused[:, t], last_key, s)
        sent = rr(use, k, EPS_1, rng)
        if policy == "skip":
            sent = np.where(refused[:, t], -1, sent)
        reports[:, t] = sent
        spell[:, t] = key
        memo_used[:, t] = use
        last_memo, last_key = use, key
    return Run(reports=reports, spell=spell, memo=memo_used, drawn=drawn, refused=refused)


def check_policy(seed: int, policy: str) -> str:
    """The vectorized policy against ``draw_memo`` + ``BudgetAccountant``, device by
    device, on trajectories that change often and outlive the 365-day window."""
    rng = np.random.default_rng([seed, 2])
    scalar = random.Random(seed)
    devices, weeks, change = 400, 80, 0.25
    refusals = 0
    for k in (3, 8):
        true = simulate_segments(devices, weeks, shares_for("zipf", k), change, rng)
        run = simulate_two_layer(true, k, policy, rng)
        assert run.drawn is not None and run.refused is not None
        for i in range(devices):
            memos: dict[int, int] = {}
            accountant = privacy.BudgetAccountant(cap=CAP, period=PERIOD)
            last: int | None = None
            drawn: list[int] = []
            refused: list[int] = []
            for t in range(weeks):
                s = int(true[i, t])
                if s not in memos:
                    try:
                        accountant = accountant.record(t * WEEK, EPS_INF)
                    except BudgetExhausted:
                        refused.append(t)
                        assert last is not None
                        if policy == "repeat":
                            privacy.report_from_memo(last, k=k, epsilon_1=EPS_1, rng=scalar)
                        continue
                    memos[s] = privacy.draw_memo(s, k=k, epsilon_inf=EPS_INF, rng=scalar)
                    drawn.append(t)
                last = memos[s]
                privacy.report_from_memo(last, k=k, epsilon_1=EPS_1, rng=scalar)
            if (
                drawn != np.flatnonzero(run.drawn[i]).tolist()
                or refused != np.flatnonzero(run.refused[i]).tolist()
            ):
                raise SystemExit(
                    f"policy check: device {i} (K={k}) draws {drawn} refused {refused}, "
                    f"vectorized draws {np.flatnonzero(run.drawn[i]).tolist()} refused "
                    f"{np.flatnonzero(run.refused[i]).tolist()}"
                )
        refusals += int(run.refused.sum())
    return (
        f"  memo draws and budget refusals of {2 * devices} devices x {weeks} weeks "
        f"(change {change:.0%}/week, {refusals} refused weeks) match draw_memo + "
        "BudgetAccountant device by device"
    )


# ----------------------------------------------------------------------------- attack


def pick(scores: FloatArray, rng: np.random.Generator) -> IntArray:
    """Row-wise argmax, ties broken uniformly at random."""
    top = scores.max(axis=1, keepdims=True)
    tied = scores >= top - 1e-9
    keys = np.where(tied, rng.random(scores.shape), -1.0)
    out: IntArray = keys.argmax(axis=1).astype(np.int64)
    return out


def map_scores(
    counts: FloatArray,
    log_prior: FloatArray,
    report: privacy.Channel,
    memo: privacy.Channel | None,
) -> FloatArray:
    """log P(s) + log P(reports | s) up to a per-device constant."""
    ll = counts * math.log(report.keep / report.other)  # log P(reports | value randomized)
    if memo is None:
        out: FloatArray = log_prior + ll
        return out
    x = np.log(channel_matrix(memo))[None, :, :] + ll[:, None, :]
    top = x.max(axis=2, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(x - top).sum(axis=2))
    out = log_prior + lse
    return out


ATTACKS: Final = ("majority", "MAP", "MAP, knows switches", "sees the memo")


def attack(
    run: Run,
    true: IntArray,
    k: int,
    shares: FloatArray,
    two_layer: bool,
    horizons: Sequence[int],
    rng: np.random.Generator,
) -> dict[str, BoolArray]:
    """For each attack, whether each device's guess is right at each horizon (n, H)."""
    n = true.shape[0]
    log_prior = np.log(shares)
    report_ch = privacy.Channel.randomized_response(EPS_1 if two_layer else EPS_OLD, k)
    memo_ch = privacy.Channel.randomized_response(EPS_INF, k) if two_layer else None
    onehot = run.reports[:, :, None] == np.arange(k)[None, None, :]
    cumulative = np.cumsum(onehot, axis=1)
    switched = np.concatenate(
        [np.zeros((n, 1), dtype=bool), run.spell[:, 1:] != run.spell[:, :-1]], axis=1
    )
    spell_id = np.cumsum(switched, axis=1)
    result = {name: np.zeros((n, len(horizons)), dtype=bool) for name in ATTACKS}
    for h, w in enumerate(horizons):
        truth = true[:, w - 1]
        counts = cumulative[:, w - 1, :].astype(np.float64)
        last = (spell_id[:, :w] == spell_id[:, w - 1 : w])[:, :, None]
        spell_counts = (onehot[:, :w, :] & last).sum(axis=1).astype(np.float64)
        result["majority"][:, h] = pick(counts, rng) == truth
        result["MAP"][:, h] = pick(map_scores(counts, log_prior, report_ch, memo_ch), rng) == truth
        guess = pick(map_scores(spell_counts, log_prior, report_ch, memo_ch), rng)
        result["MAP, knows switches"][:, h] = guess == truth
        if run.memo is not None and memo_ch is not None:
            seen = log_prior[None, :] + np.log(channel_matrix(memo_ch))[:, run.memo[:, w - 1]].T
            result["sees the memo"][:, h] = pick(seen, rng) == truth
    if not two_layer:
        del result["sees the memo"]
    return result


def reference(k: int, shares: FloatArray) -> dict[str, float]:
    """Exact accuracy of each attack on one report at epsilon_inf."""
    a = channel_matrix(privacy.Channel.randomized_response(EPS_INF, k))
    joint = shares[:, None] * a  # P(s, r)
    majority = float(np.trace(joint))  # guess = the report
    bayes = float(joint.max(axis=0).sum())  # guess = argmax_s P(s | r)
    return {"majority": majority, "MAP": bayes}


# ------------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Cost:
    k: int
    shares: str
    rmse_old: float
    rmse_two: float
    predicted_ratio: float
    signal_ratio: float


def _predicted_rmse(channel: privacy.Channel, n: int, shares: FloatArray) -> float:
    big_p, big_q = channel.keep, channel.other
    counts = n * shares
    var = (counts * big_p * (1 - big_p) + (n - counts) * big_q * (1 - big_q)) / channel.signal**2
    return float(np.sqrt(var.mean()))


def accuracy_cost(k: int, kind: str, devices: int, reps: int, rng: np.random.Generator) -> Cost:
    shares = shares_for(kind, k)
    old = privacy.Channel.randomized_response(EPS_OLD, k)
    two = privacy.Channel.two_layer(EPS_INF, EPS_1, k)
    err_old: list[float] = []
    err_two: list[float] = []
    chunk = max(1, 1_000_000 // devices)
    done = 0
    while done < reps:
        r = min(chunk, reps - done)
        true = rng.choice(k, size=(r, devices), p=shares).astype(np.int64)
        offset = np.arange(r, dtype=np.int64)[:, None] * k
        real = np.bincount((true + offset).ravel(), minlength=r * k).reshape(r, k)
        sent_old = rr(true, k, EPS_OLD, rng)
        sent_two = rr(rr(true, k, EPS_INF, rng), k, EPS_1, rng)
        for sent, channel, errors in ((sent_old, old, err_old), (sent_two, two, err_two)):
            counts = np.bincount((sent + offset).ravel(), minlength=r * k).reshape(r, k)
            for row in range(r):
                est = privacy.debias(counts[row].tolist(), channel=channel)
                errors.extend(e - float(c) for e, c in zip(est, real[row], strict=True))
        done += r
    rmse_old = math.sqrt(math.fsum(e * e for e in err_old) / len(err_old))
    rmse_two = math.sqrt(math.fsum(e * e for e in err_two) / len(err_two))
    predicted = _predicted_rmse(two, devices, shares) / _predicted_rmse(old, devices, shares)
    first = privacy.Channel.randomized_response(EPS_1, k)
    return Cost(k, kind, rmse_old, rmse_two, predicted, 1.0 / first.signal)


# ------------------------------------------------------------------------------- main


def pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--weeks", type=int, default=52)
    parser.add_argument("--change", type=float, default=0.015, help="weekly change probability")
    parser.add_argument("--policy", choices=("repeat", "skip"), default="repeat")
    parser.add_argument("--target-devices", type=int, default=20_000)
    parser.add_argument("--cost-devices", type=int, default=10_000)
    parser.add_argument("--cost-reps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.devices < 1 or args.weeks < 1 or not 0 <= args.change <= 1:
        parser.error("need --devices >= 1, --weeks >= 1 and 0 <= --change <= 1")
    started = time.perf_counter()
    horizons = [w for w in HORIZONS if w <= args.weeks] or [args.weeks]

    print(
        f"epsilon today {EPS_OLD:.4f} (ln 3); two-layer epsilon_inf {EPS_INF:.4f}, "
        f"epsilon_1 {EPS_1:.4f}, lifetime cap {CAP:.4f} per {PERIOD / 86400:g} days "
        f"({CAP / EPS_INF:g} memos); policy when spent: {args.policy}; seed {args.seed}"
    )
    print("checks (vectorized sampler and policy against ondevice_sync.privacy):")
    for line in check_sampler(args.seed):
        print(line)
    print(check_policy(args.seed, args.policy))

    # Main simulation: both share kinds, both K, both schemes.
    results: dict[tuple[str, int, str], dict[str, BoolArray]] = {}
    groups: dict[tuple[str, int], BoolArray] = {}
    budget_rows: list[str] = []
    for kind_index, kind in enumerate(("uniform", "zipf")):
        for k in (3, 8):
            rng = np.random.default_rng([args.seed, 10, kind_index, k])
            shares = shares_for(kind, k)
            true = simulate_segments(args.devices, args.weeks, shares, args.change, rng)
            changing: BoolArray = np.asarray((true != true[:, :1]).any(axis=1))
            groups[kind, k] = changing
            today = simulate_today(true, k, rng)
            two = simulate_two_layer(true, k, args.policy, rng)
            results[kind, k, "today"] = attack(today, true, k, shares, False, horizons, rng)
            results[kind, k, "two-layer"] = attack(two, true, k, shares, True, horizons, rng)
            assert two.drawn is not None and two.refused is not None
            memos = two.drawn.sum(axis=1)
            hit: BoolArray = np.asarray(two.refused.any(axis=1))
            dist = " ".join(f"{int((memos == m).sum()):>5}" for m in range(2, 5))
            budget_rows.append(
                f"{kind:>8} {k:>2} {int(changing.sum()):>8} {memos.mean():>9.3f} | "
                f"{int((memos == 1).sum()):>6} {dist} | {int(hit.sum()):>7} "
                f"{pct(float(hit.mean())):>6} "
                f"{pct(float(hit[changing].mean()) if changing.any() else 0.0):>6} "
                f"{pct(float(two.refused.mean())):>8}"
            )

    w_labels = [f"{w}w" for w in horizons]
    head = " ".join(f"{x:>5}" for x in w_labels)
    print()
    print(
        f"attack accuracy (%), {args.devices} devices, {args.weeks} weeks, change "
        f"{args.change:.1%}/week; stable = never changed, changing = changed at least once"
    )
    print(f"{'shares':>8} {'K':>2} {'scheme':<9} {'attack':<20} | stable {head} | changing {head}")
    for kind in ("uniform", "zipf"):
        for k in (3, 8):
            changing = groups[kind, k]
            stable = ~changing
            print(
                f"{kind:>8} {k:>2} {'':<9} {'(devices)':<20} | {int(stable.sum()):>6} "
                f"{'':>{6 * len(horizons) - 1}} | {int(changing.sum()):>8}"
            )
            for scheme in ("today", "two-layer"):
                for name, right in results[kind, k, scheme].items():
                    a = " ".join(pct(float(right[stable, h].mean())) for h in range(len(horizons)))
                    b = " ".join(
                        pct(float(right[changing, h].mean())) if changing.any() else "  n/a"
                        for h in range(len(horizons))
                    )
                    print(f"{kind:>8} {k:>2} {scheme:<9} {name:<20} | {'':>6} {a} | {'':>8} {b}")
            for name, value in reference(k, shares_for(kind, k)).items():
                row = " ".join(pct(value) for _ in horizons)
                label = f"{name} (1 report)"
                print(f"{kind:>8} {k:>2} {'reference':<9} {label:<20} | {'':>6} {row} |")

    # Target: stable devices, uniform shares, 52 weeks.
    last = len(horizons) - 1
    print()
    print(
        f"target: stable devices, uniform shares, after {horizons[last]} weeks: every two-layer "
        f"attack <= the same attack on one report at eps_inf + {100 * TARGET_SLACK:g} points"
    )
    print(
        f"{'K':>2} {'run':<19} {'devices':>7} {'SE':>5} | {'today: maj   MAP':>16} | "
        f"{'two-layer maj  MAP  MAP-sw':>26} | {'ref':>5} {'limit':>5}  verdict"
    )
    names = ("majority", "MAP", "MAP, knows switches")
    verdicts: list[str] = []
    for k in (3, 8):
        rng = np.random.default_rng([args.seed, 20, k])
        shares = shares_for("uniform", k)
        true = simulate_segments(args.target_devices, args.weeks, shares, 0.0, rng)
        two = simulate_two_layer(true, k, args.policy, rng)
        big = attack(two, true, k, shares, True, horizons, rng)
        big_today = attack(simulate_today(true, k, rng), true, k, shares, False, horizons, rng)
        ref = max(reference(k, shares).values())
        limit = ref + TARGET_SLACK
        stable = ~groups["uniform", k]
        rows = (
            (
                "main run, stable",
                int(stable.sum()),
                results["uniform", k, "today"],
                results["uniform", k, "two-layer"],
                stable,
            ),
            ("stable-only run", args.target_devices, big_today, big, np.ones(len(true), bool)),
        )
        worst = max(float(big[x][:, last].mean()) for x in names)
        for label, n, today_res, two_res, mask in rows:
            old = [float(today_res[x][mask, last].mean()) for x in names[:2]]
            new = [float(two_res[x][mask, last].mean()) for x in names]
            se = 100 * math.sqrt(ref * (1 - ref) / max(n, 1))
            verdict = ("PASS" if worst <= limit else "FAIL") if mask is not stable else ""
            print(
                f"{k:>2} {label:<19} {n:>7} {se:>5.2f} | {'':>4}{pct(old[0])} {pct(old[1])} | "
                f"{'':>8}{' '.join(pct(x) for x in new)} | {pct(ref)} {pct(limit)}  {verdict}"
            )
        verdicts.append(
            f"K={k}: {'PASS' if worst <= limit else 'FAIL'}: worst two-layer attack on "
            f"{args.target_devices} stable devices after {horizons[last]} weeks "
            f"{100 * worst:.1f}% <= {100 * limit:.1f}% (one report at eps_inf "
            f"{100 * ref:.1f}% + {100 * TARGET_SLACK:g}); today's scheme "
            f"{100 * float(big_today['MAP'][:, last].mean()):.1f}% (MAP)"
        )
    for line in verdicts:
        print(line)

    print()
    print(
        f"lifetime budget: {CAP / EPS_INF:g} memo draws per {PERIOD / 86400:g} days, policy "
        f"{args.policy}; refused = wanted a new memo (a 5th) with the budget spent"
    )
    print(
        f"{'shares':>8} {'K':>2} {'changing':>8} {'memos/dev':>9} | {'1 memo':>6} {'2':>5} "
        f"{'3':>5} {'4':>5} | {'refused':>7} {'% all':>6} {'% chg':>6} {'% weeks':>8}"
    )
    for row in budget_rows:
        print(row)

    print()
    print(
        f"operator's cost: RMSE of debiased per-segment counts, {args.cost_devices} devices, "
        f"one epoch, {args.cost_reps} repetitions"
    )
    print(
        f"{'K':>2} {'shares':>8} {'RMSE today':>11} {'RMSE 2-layer':>13} {'ratio':>6} "
        f"{'predicted':>10} {'1/(p1-q1)':>10} {'RMSE, share points':>22}"
    )
    for kind_index, kind in enumerate(("uniform", "zipf")):
        for k in (3, 8):
            rng = np.random.default_rng([args.seed, 30, kind_index, k])
            c = accuracy_cost(k, kind, args.cost_devices, args.cost_reps, rng)
            pts = f"{100 * c.rmse_old / args.cost_devices:.2f} / "
            pts += f"{100 * c.rmse_two / args.cost_devices:.2f}"
            print(
                f"{k:>2} {kind:>8} {c.rmse_old:>11.1f} {c.rmse_two:>13.1f} "
                f"{c.rmse_two / c.rmse_old:>6.2f} {c.predicted_ratio:>10.2f} "
                f"{c.signal_ratio:>10.2f} {pts:>22}"
            )
    print()
    print(f"ran in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
