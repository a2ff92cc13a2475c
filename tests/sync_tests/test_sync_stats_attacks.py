"""The attacks on ``/v1/stats`` from the review, run against the real server.

- subtraction: the noisy total minus the published cells gives the suppressed cells'
  count *plus the sum of their noises*, never the exact count;
- before/after: nothing is published before an epoch closes, and nothing changes after,
  so no two publications differ by one report;
- injection: reports injected into a suppressed cell shift it by exactly their number,
  so subtracting them gives the honest count plus that cell's noise.

Each attack is also run against the old publication (exact counts through
``ondevice_sync.privacy.estimate`` and the exact total), where it recovers the count exactly: the
contrast is what these tests would catch if exact numbers ever leaked again.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from ondevice_sync.client import SyncClient
from ondevice_sync.privacy import Channel, estimate
from ondevice_sync.protocol import REPORT_CONTENT_TYPE, epoch_start, shift_epoch
from ondevice_sync.server import ReportHandler, SyncServer

from .conftest import EPOCH, EPOCH_CLOSES, NOW, Clock, report_body, request

K_THRESHOLD = 50
INJECTED = 120


def noisy_count(document: dict[str, Any], cell: dict[str, Any]) -> float:
    """What an attacker computes from a published cell: its noisy count, exactly."""
    channel = Channel.two_layer(document["epsilon_inf"], document["epsilon_1"], document["k"])
    return float(cell["estimate"] * channel.signal + document["noisy_total"] * channel.other)


def subtraction(document: dict[str, Any]) -> float:
    """The subtraction attack: total minus every published cell = the suppressed cells."""
    return float(document["noisy_total"]) - sum(
        noisy_count(document, cell) for cell in document["segments"]
    )


def old_publication_subtraction(counts: Sequence[int], channel: Channel) -> float:
    """The same attack on the old (version 1) publication: exact estimates and total."""
    old = estimate(list(counts), channel=channel, k_threshold=K_THRESHOLD)
    assert old.total is not None
    return old.total - sum(
        cell.estimate * channel.signal + old.total * channel.other for cell in old.cells
    )


def post_in_process(handler: ReportHandler, epoch: str, segment: int, times: int) -> None:
    for _ in range(times):
        status, _, body = handler.handle(
            "POST", "/v1/report", {"Content-Type": REPORT_CONTENT_TYPE},
            report_body(segment, epoch),
        )
        assert status == 200, body


def run_epochs(
    server: SyncServer, clock: Clock, count: int, reports: Sequence[int], injected: int = 0
) -> list[tuple[str, dict[str, Any]]]:
    """``count`` consecutive weeks with ``reports[s]`` honest reports of each segment
    (plus ``injected`` into the last segment), then every week's publication."""
    epochs = [shift_epoch(EPOCH, week) for week in range(count)]
    for epoch in epochs:
        clock.now = epoch_start(epoch) + 86400.0
        for segment, n in enumerate(reports):
            post_in_process(server.handler, epoch, segment, n)
        post_in_process(server.handler, epoch, len(reports) - 1, injected)
    clock.now = server.handler.closes_at(epochs[-1])
    published = []
    for epoch in epochs:
        status, _, body = server.handler.handle("GET", f"/v1/stats?epoch={epoch}", {}, b"")
        assert status == 200, body
        published.append((epoch, json.loads(body)))
    return published


def zero_share(central_epsilon: float, cells: int) -> float:
    """P(the sum of ``cells`` independent noise draws is 0): the share of epochs in which
    an attacker's arithmetic happens to land on the exact count. One draw:
    (1 - a) / (1 + a); two: its square times (1 + a^2) / (1 - a^2), with a = e^-eps."""
    a = math.exp(-central_epsilon)
    one = (1 - a) / (1 + a)
    if cells == 1:
        return one
    assert cells == 2
    return one**2 * (1 + a**2) / (1 - a**2)


def check_noise(errors: Sequence[float], variance: float, exact_share: float) -> None:
    """``errors`` look like draws of the stated noise: integers, centred, with the
    stated variance (a generous 0.5..1.5 band: about 3 standard errors of the sample
    variance at these sizes) and not exact more often than the noise allows."""
    n = len(errors)
    assert all(abs(e - round(e)) < 1e-6 for e in errors)  # truth + integer noise, exactly
    assert any(round(e) != 0 for e in errors)
    assert abs(statistics.fmean(errors)) < 4 * math.sqrt(variance / n)
    assert 0.5 * variance < statistics.pvariance(errors) < 1.5 * variance
    exact = sum(round(e) == 0 for e in errors) / n
    assert abs(exact - exact_share) < 4 * math.sqrt(exact_share * (1 - exact_share) / n)


def test_subtraction_over_http_never_returns_the_exact_suppressed_count(
    start_server: Callable[..., SyncServer],
) -> None:
    # K = 2 with one suppressed cell: total minus the published cell would be the
    # suppressed count itself, were the numbers exact.
    clock = Clock()
    server = start_server(k=2, k_threshold=K_THRESHOLD, clock=clock, rate_limit=0,
                          capture_raw=False, rng=random.Random(20261125))
    client = SyncClient(base_url=server.url, k=2)
    truth = [80, 20]
    epochs = [shift_epoch(EPOCH, week) for week in range(6)]
    for epoch in epochs:
        clock.now = epoch_start(epoch) + 3600.0
        for segment, n in enumerate(truth):
            for _ in range(n):
                client.send_report(segment, epoch)
    clock.now = server.handler.closes_at(epochs[-1])
    channel = server.handler.config.channel
    recovered = []
    for epoch in epochs:
        status, _, body = request(server, "GET", f"/v1/stats?epoch={epoch}", headers={})
        document = json.loads(body)
        assert status == 200 and document["suppressed"] == [1]
        assert "total" not in document
        recovered.append(subtraction(document))
        # Against the old publication the same arithmetic is exact.
        assert round(old_publication_subtraction(truth, channel), 6) == truth[1]
    sd = json.loads(body)["noise_standard_deviation"]
    errors = [r - truth[1] for r in recovered]
    assert any(abs(e) > 0.5 for e in errors), errors  # not the exact count
    assert all(abs(e) <= 6 * sd for e in errors), errors  # within the stated noise


def test_subtraction_recovers_the_suppressed_cells_only_up_to_the_sum_of_their_noises(
    start_server: Callable[..., SyncServer],
) -> None:
    for k, truth, epochs, seed in ((2, [80, 20], 200, 1), (4, [120, 90, 15, 5], 150, 2)):
        clock = Clock()
        server = start_server(k=k, k_threshold=K_THRESHOLD, clock=clock, capture_raw=False,
                              synchronous="NORMAL", rng=random.Random(seed))
        suppressed = [s for s in range(k) if s >= 1 and truth[s] < 50]
        published = run_epochs(server, clock, epochs, truth)
        errors = []
        for epoch, document in published:
            assert document["suppressed"] == suppressed
            errors.append(subtraction(document) - sum(truth[s] for s in suppressed))
            exact = server.store.counts(epoch, k=k)
            assert exact == truth
            assert round(old_publication_subtraction(exact, server.handler.config.channel),
                         6) == sum(truth[s] for s in suppressed)
        stated = len(suppressed) * published[0][1]["noise_standard_deviation"] ** 2
        eps = published[0][1]["central_epsilon"]
        check_noise(errors, stated, exact_share=zero_share(eps, len(suppressed)))
        server.close()


def test_injected_reports_lift_a_cell_but_subtracting_them_leaves_its_noise(
    start_server: Callable[..., SyncServer],
) -> None:
    clock = Clock()
    server = start_server(k=2, k_threshold=K_THRESHOLD, clock=clock, capture_raw=False,
                          synchronous="NORMAL", rng=random.Random(120))
    honest = [60, 20]
    channel = server.handler.config.channel
    # Honest alone, segment 1 is under the threshold: the attacker wants its count.
    assert estimate(honest, channel=channel, k_threshold=K_THRESHOLD).suppressed == (1,)
    lifted = [honest[0], honest[1] + INJECTED]
    published = run_epochs(server, clock, 200, honest, injected=INJECTED)
    errors = []
    for epoch, document in published:
        cells = {cell["segment"]: cell for cell in document["segments"]}
        assert 1 in cells  # the injection got the cell published
        recovered = noisy_count(document, cells[1]) - INJECTED
        errors.append(recovered - honest[1])
        publication = server.store.publication(epoch)
        assert publication is not None
        # The error is exactly the cell's own noise draw.
        assert round(errors[-1]) == publication.noisy_counts[1] - lifted[1]
        # With exact numbers (the old publication) the attack is exact.
        old = estimate(lifted, channel=channel, k_threshold=K_THRESHOLD)
        old_cell = next(cell for cell in old.cells if cell.segment == 1)
        assert old.total is not None
        assert round(old_cell.estimate * channel.signal + old.total * channel.other
                     - INJECTED, 6) == honest[1]
    stated = published[0][1]["noise_standard_deviation"] ** 2
    check_noise(errors, stated, exact_share=zero_share(published[0][1]["central_epsilon"], 1))


def test_before_and_after_one_report_there_is_nothing_to_difference(
    start_server: Callable[..., SyncServer],
) -> None:
    clock = Clock()
    server = start_server(k=2, k_threshold=1, clock=clock, rng=random.Random(9), rate_limit=0)
    stats_path = f"/v1/stats?epoch={EPOCH}"
    for _ in range(30):
        assert request(server, "POST", "/v1/report", report_body(0))[0] == 200
    before = request(server, "GET", stats_path, headers={})
    assert request(server, "POST", "/v1/report", report_body(1))[0] == 200  # the victim
    after = request(server, "GET", stats_path, headers={})
    # While the epoch is open both answers are the same refusal, with no numbers.
    assert before[0] == after[0] == 425 and before[2] == after[2]
    clock.now = EPOCH_CLOSES
    published = request(server, "GET", stats_path, headers={})
    assert published[0] == 200
    # After publication a new report is refused, so the numbers cannot move.
    clock.now = NOW  # even if the server's clock went back into the epoch
    assert request(server, "POST", "/v1/report", report_body(1))[0] == 400
    clock.now = EPOCH_CLOSES + 86400.0
    assert request(server, "GET", stats_path, headers={})[2] == published[2]
