"""Attacks on the published statistics (``/v1/stats``): the old exact publication
against the new one (closed epochs only, central geometric noise drawn once and frozen).

What it simulates
-----------------
``--epochs`` (500) weekly epochs for each K in 2, 3 and 8, each with ``--devices``
(10,000) devices whose segments follow fixed shares that leave some cells near the
k threshold (50): K = 2 ``[0.995, 0.005]``, K = 3 ``[0.6, 0.395, 0.005]``, K = 8
``[0.3, 0.25, 0.2, 0.12, 0.08, 0.04, 0.01, 0]``. Each device reports once per epoch
through the default two-layer channel (memo at ``epsilon_inf = ln 3``, report at
``epsilon_1 = ln 9``); with one report per device in an epoch the reported counts are a
sum of multinomials over the composed channel (``ondevice_sync.privacy.Channel.two_layer``).

The new publication runs through the real server code in process: a
``ondevice_sync.server.ReportHandler`` on a ``CountStore`` in a temporary directory, with a
settable clock. The honest reports' counts are written into the store's ``counts``
table directly (standing in for 10,000 POSTs per epoch, which the handler would count
identically); the victim's and the attacker's reports are real ``POST /v1/report``
requests through ``ReportHandler.handle``; every statistic is a real
``GET /v1/stats?epoch=`` answer. The central noise comes from a ``random.Random`` seeded
from ``--seed`` (the production server draws it from the OS CSPRNG), so runs repeat.

The old publication is ``ondevice_sync.privacy.estimate`` of the same exact counts with the exact
total, which is what the version 1 server published at any time.

The attacks
-----------
- subtraction: the published total minus every published cell (each cell's count is
  ``estimate * (P - Q) + total * Q``) = the sum of the suppressed cells. Target: that
  sum's true value (the exact counts of the suppressed cells). Cases: epochs with at
  least one suppressed cell.
- before/after: query the epoch, let a victim report, query again; the difference
  locates the victim's report. New: both queries fall before the epoch closes and get
  ``425`` (no numbers); after the close two queries are compared, with a second victim
  report (refused) between them. Old: the exact difference names the victim's cell
  (when it is published or the only suppressed one), or shows exactly one more report
  among the suppressed cells.
- injection: the attacker POSTs 120 reports of the smallest segment in an epoch where
  it would be suppressed (decided on the honest publication), which lifts it over the
  threshold, then subtracts its 120. Target: the honest count. The injected epochs run
  on a second store with the same honest counts (and independent noise).

For each attack the table prints the attacker's error on its target: RMSE, median
absolute error, the share of cases recovered exactly, and the standard deviation of the
noise the server states (``noise_standard_deviation``, times ``sqrt(m)`` for the sum of
``m`` suppressed cells).

The operator's side
-------------------
The RMSE of the per-segment estimates for ``--devices`` devices over ``--reps`` (2,000)
repetitions, K = 3 and K = 8, uniform-ish shares: the old one-layer randomized response
at ln 3 with exact counts (``debias``) against the new two-layer channel with the central
noise added once per cell (``estimate_noisy``'s estimator), with the ratio and the share
of the new error that is central noise.

Run::

    .venv/bin/python benchmarks/attack_statistics.py              # ~30 s
    .venv/bin/python benchmarks/attack_statistics.py --epochs 1000 --seed 7
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from ondevice_sync import privacy
from ondevice_sync.protocol import (
    REPORT_CONTENT_TYPE,
    Report,
    encode_report,
    epoch_start,
    shift_epoch,
)
from ondevice_sync.server import CountStore, ReportHandler, ServerConfig

SHARES: Final = {
    2: [0.995, 0.005],
    3: [0.6, 0.395, 0.005],
    8: [0.3, 0.25, 0.2, 0.12, 0.08, 0.04, 0.01, 0.0],
}
UTILITY_SHARES: Final = {
    3: [0.5, 0.3, 0.2],
    8: [0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04],
}
INJECTED: Final = 120
FIRST_EPOCH: Final = "2026-W01"
DAY: Final = 86400.0


class Clock:
    """The server's settable clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Errors:
    """One (attack, K, scheme) row: errors on the target and the stated noise SDs."""

    errors: list[float] = field(default_factory=list)
    stated: list[float] = field(default_factory=list)

    def add(self, error: float, stated: float) -> None:
        self.errors.append(error)
        self.stated.append(stated)


class Server:
    """A real ReportHandler + CountStore in process, with a settable clock."""

    def __init__(self, directory: Path, name: str, k: int, seed: int) -> None:
        self.clock = Clock(epoch_start(FIRST_EPOCH) + DAY)
        self.config = ServerConfig(k=k, db_path=directory / f"{name}.db", synchronous="NORMAL")
        self.store = CountStore(path=self.config.db_path, synchronous="NORMAL")
        self.handler = ReportHandler(config=self.config, store=self.store, clock=self.clock,
                                     rng=random.Random(seed))

    def add_counts(self, epoch: str, counts: Sequence[int]) -> None:
        """Honest reports' counts, written as the handler would have counted them."""
        connection = sqlite3.connect(self.config.db_path)
        try:
            connection.executemany(
                "INSERT INTO counts (epoch, segment, n) VALUES (?, ?, ?) "
                "ON CONFLICT (epoch, segment) DO UPDATE SET n = n + excluded.n",
                [(epoch, s, int(n)) for s, n in enumerate(counts) if n],
            )
            connection.commit()
        finally:
            connection.close()

    def post(self, epoch: str, segment: int) -> int:
        body = encode_report(Report(epoch=epoch, segment=segment))
        status, _, _ = self.handler.handle(
            "POST", "/v1/report", {"Content-Type": REPORT_CONTENT_TYPE}, body
        )
        return status

    def stats(self, epoch: str) -> tuple[int, bytes]:
        status, _, body = self.handler.handle("GET", f"/v1/stats?epoch={epoch}", {}, b"")
        return status, body

    def close(self) -> None:
        self.store.close()


def reported_counts(
    rng: np.random.Generator, truth: Sequence[int], channel: privacy.Channel
) -> list[int]:
    """One report per device through ``channel``: a sum of multinomials."""
    k = len(truth)
    total = np.zeros(k, dtype=np.int64)
    for segment, n in enumerate(truth):
        row = np.full(k, channel.other)
        row[segment] = channel.keep
        total += rng.multinomial(n, row / row.sum())
    return [int(c) for c in total]


def cell_count(document: dict[str, Any], cell: dict[str, Any]) -> float:
    """The count an attacker derives from a published cell."""
    channel = privacy.Channel.two_layer(document["epsilon_inf"], document["epsilon_1"],
                                        document["k"])
    return float(cell["estimate"] * channel.signal + document["noisy_total"] * channel.other)


def old_counts(counts: Sequence[int], channel: privacy.Channel) -> dict[int, float]:
    """Per published cell, the count an attacker derives from the old publication, and
    the total under key -1."""
    old = privacy.estimate(list(counts), channel=channel)
    assert old.total is not None
    derived = {c.segment: c.estimate * channel.signal + old.total * channel.other
               for c in old.cells}
    derived[-1] = float(old.total)
    return derived


def run_k(k: int, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed * 1000 + k)
    truth = [round(share * args.devices) for share in SHARES[k]]
    truth[0] += args.devices - sum(truth)
    honest_server = Server(directory, f"honest{k}", k, args.seed * 1000 + k)
    injected_server = Server(directory, f"injected{k}", k, args.seed * 1000 + k + 500)
    channel = honest_server.config.channel
    target = k - 1  # the smallest segment
    rows = {name: Errors() for name in
            ("subtraction old", "subtraction new", "injection old", "injection new")}
    before_after = {"cases": 0, "numbers_before_close": 0, "changed_after_close": 0,
                    "late_counted": 0, "old_cell": 0, "old_set": 0}
    victim_rng = random.Random(args.seed + k)
    for week in range(args.epochs):
        epoch = shift_epoch(FIRST_EPOCH, week)
        moment = epoch_start(epoch) + DAY
        honest_server.clock.now = injected_server.clock.now = moment
        counts = reported_counts(rng, truth, channel)

        # before/after, new: query, a victim reports, query again: all before the close.
        first = honest_server.stats(epoch)
        victim = victim_rng.randrange(k)
        assert honest_server.post(epoch, victim) == 200
        second = honest_server.stats(epoch)
        before_after["cases"] += 1
        before_after["numbers_before_close"] += (first[0] == 200) + (second[0] == 200)
        assert first == second and first[0] == 425
        # before/after, old: the exact publications without and with the victim.
        with_victim = list(counts)
        with_victim[victim] += 1
        before, after = old_counts(counts, channel), old_counts(with_victim, channel)
        changed = [s for s in after if s >= 0 and s in before and round(after[s] - before[s]) == 1]
        suppressed_sum_change = (after[-1] - sum(v for s, v in after.items() if s >= 0)) - (
            before[-1] - sum(v for s, v in before.items() if s >= 0))
        into_suppressed = victim not in after and round(suppressed_sum_change) == 1
        suppressed_cells = sum(1 for s in range(k) if s not in after)
        # A cell published only after the report: its estimate rose, so the report is its.
        newly = [s for s in after if s >= 0 and s not in before]
        if changed == [victim] or newly == [victim] or (into_suppressed and suppressed_cells == 1):
            before_after["old_cell"] += 1  # the victim's cell, exactly
        elif into_suppressed:
            before_after["old_set"] += 1  # one report more, exactly, among the suppressed

        honest_server.add_counts(epoch, counts)
        injected_server.add_counts(epoch, counts)
        for _ in range(INJECTED):
            assert injected_server.post(epoch, target) == 200

        close = honest_server.handler.closes_at(epoch)
        honest_server.clock.now = injected_server.clock.now = close
        status, body = honest_server.stats(epoch)
        assert status == 200
        assert honest_server.post(epoch, victim) != 200  # too late: not counted
        again = honest_server.stats(epoch)
        before_after["changed_after_close"] += again != (status, body)
        exact = honest_server.store.counts(epoch, k=k)
        before_after["late_counted"] += exact != with_victim
        document = json.loads(body)
        sd = float(document["noise_standard_deviation"])

        # subtraction
        suppressed = document["suppressed"]
        if suppressed and document["noisy_total"] is not None:
            recovered = document["noisy_total"] - sum(
                cell_count(document, cell) for cell in document["segments"])
            true_sum = sum(exact[s] for s in suppressed)
            rows["subtraction new"].add(recovered - true_sum, sd * math.sqrt(len(suppressed)))
        old = old_counts(exact, channel)
        old_suppressed = [s for s in range(k) if s not in old]
        if old_suppressed:
            recovered_old = old[-1] - sum(v for s, v in old.items() if s >= 0)
            rows["subtraction old"].add(
                recovered_old - sum(exact[s] for s in old_suppressed), 0.0)

        # injection: worth it when the target is suppressed in the honest publication
        injected_status, injected_body = injected_server.stats(epoch)
        assert injected_status == 200
        lifted = injected_server.store.counts(epoch, k=k)
        honest_target = lifted[target] - INJECTED
        poisoned = json.loads(injected_body)
        cells = {cell["segment"]: cell for cell in poisoned["segments"]}
        if target in suppressed and target in cells:
            recovered = cell_count(poisoned, cells[target]) - INJECTED
            rows["injection new"].add(recovered - honest_target, sd)
        old_lifted = old_counts(lifted, channel)
        if target in old_suppressed and target in old_lifted:
            rows["injection old"].add(old_lifted[target] - INJECTED - honest_target, 0.0)
    honest_server.close()
    injected_server.close()
    return {"rows": rows, "before_after": before_after}


def utility(k: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """Per-segment RMSE: old (one layer at ln 3, exact) and new (two layers, central
    noise); the share of the new MSE that is central noise."""
    rng = np.random.default_rng(args.seed * 7 + k)
    noise_rng = random.Random(args.seed * 11 + k)
    truth = [round(share * args.devices) for share in UTILITY_SHARES[k]]
    truth[0] += args.devices - sum(truth)
    old_channel = privacy.Channel.randomized_response(privacy.DEFAULT_EPSILON, k)
    new_channel = privacy.Channel.two_layer(privacy.DEFAULT_EPSILON_INF,
                                            privacy.DEFAULT_EPSILON_1, k)
    central = privacy.DEFAULT_CENTRAL_EPSILON
    old_se: list[float] = []
    new_se: list[float] = []
    for _ in range(args.reps):
        old = privacy.debias(reported_counts(rng, truth, old_channel), channel=old_channel)
        counts = reported_counts(rng, truth, new_channel)
        noisy = [c + privacy.geometric_noise(central, rng=noise_rng) for c in counts]
        result = privacy.estimate_noisy(noisy, channel=new_channel, central_epsilon=central,
                                        k_threshold=1)
        n = sum(noisy)  # the estimator, applied to every cell (suppression aside)
        new = [(c - n * new_channel.other) / new_channel.signal for c in noisy]
        for cell in result.cells:  # the same numbers the server would publish
            assert math.isclose(cell.estimate, new[cell.segment], rel_tol=1e-12)
        old_se += [(e - t) ** 2 for e, t in zip(old, truth, strict=True)]
        new_se += [(e - t) ** 2 for e, t in zip(new, truth, strict=True)]
    noise_variance = privacy.geometric_variance(central) * (
        (1 - new_channel.other) ** 2 + (k - 1) * new_channel.other ** 2
    ) / new_channel.signal ** 2
    new_mse = statistics.fmean(new_se)
    return math.sqrt(statistics.fmean(old_se)), math.sqrt(new_mse), noise_variance / new_mse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=500, help="epochs per K")
    parser.add_argument("--reps", type=int, default=2000, help="repetitions of the RMSE table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="attack_statistics_") as tmp:
        for k in SHARES:
            results[k] = run_k(k, args, Path(tmp))

    print(
        f"{args.devices:,} devices, {args.epochs} epochs per K, two-layer channel "
        f"(epsilon_inf ln 3, epsilon_1 ln 9), k threshold {privacy.DEFAULT_K_THRESHOLD}, "
        f"central epsilon {privacy.DEFAULT_CENTRAL_EPSILON:g} (the server's default), "
        f"seed {args.seed}"
    )
    print("old = exact counts published at any time (version 1); new = published once the "
          "epoch is closed,")
    print("noisy counts drawn once and frozen. error = attacker's value - the true count "
          "it targets")
    print()
    header = (f"{'attack':<13} {'K':>2} {'sch.':<4} {'cases':>6} {'RMSE':>7} "
              f"{'median|err|':>11} {'exact':>6} {'stated SD':>9}")
    print(header)
    print("-" * len(header))
    for attack in ("subtraction", "injection"):
        for k, result in results.items():
            for scheme in ("old", "new"):
                row: Errors = result["rows"][f"{attack} {scheme}"]
                if not row.errors:
                    print(f"{attack:<13} {k:>2} {scheme:<4} {0:>6}")
                    continue
                errors = row.errors
                rmse = math.sqrt(statistics.fmean(e * e for e in errors))
                median = statistics.median(abs(e) for e in errors)
                exact = sum(abs(e) < 0.5 for e in errors) / len(errors)
                stated = math.sqrt(statistics.fmean(s * s for s in row.stated))
                print(f"{attack:<13} {k:>2} {scheme:<4} {len(errors):>6} {rmse:>7.2f} "
                      f"{median:>11.2f} {exact:>6.0%} {stated:>9.2f}")
    for k, result in results.items():
        ba = result["before_after"]
        cases = ba["cases"]
        print(f"{'before/after':<13} {k:>2} {'old':<4} {cases:>6}   victim's cell found "
              f"exactly in {ba['old_cell']}/{cases}, exactly +1 in the suppressed cells in "
              f"{ba['old_set']}/{cases}, other {cases - ba['old_cell'] - ba['old_set']}")
        print(f"{'before/after':<13} {k:>2} {'new':<4} {cases:>6}   numbers before close "
              f"{ba['numbers_before_close']}/{2 * cases} queries; changed after close "
              f"{ba['changed_after_close']}/{cases}; late reports counted "
              f"{ba['late_counted']}/{cases}")
    print()
    print(f"operator's per-segment estimate RMSE, {args.devices:,} devices, {args.reps} "
          "repetitions (same run)")
    print(f"{'K':>2} {'old: 1 layer ln 3, exact':>25} {'new: 2 layers + central':>24} "
          f"{'new/old':>8} {'central noise share of MSE':>27}")
    for k in UTILITY_SHARES:
        old_rmse, new_rmse, share = utility(k, args)
        print(f"{k:>2} {old_rmse:>25.1f} {new_rmse:>24.1f} {new_rmse / old_rmse:>8.2f} "
              f"{share:>27.4%}")
    print()
    print(f"ran in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
