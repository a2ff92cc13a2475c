"""10,000 simulated devices: two-layer randomized response on the device; counted,
noised once at publication, debiased and suppressed by the server."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

from ondevice_sync.client import InProcessTransport, SyncClient
from ondevice_sync.privacy import (
    DEFAULT_CENTRAL_EPSILON,
    DEFAULT_EPSILON_1,
    DEFAULT_EPSILON_INF,
    Channel,
    draw_memo,
    geometric_variance,
    report_from_memo,
)
from ondevice_sync.server import SyncServer

from .conftest import EPOCH, EPOCH_CLOSES, Clock

K = 8
# Known truth: 10,000 devices over K = 8 segments; segment 3 has 100, 4..7 nobody.
TRUTH = [4500, 3000, 2400, 100, 0, 0, 0, 0]
K_THRESHOLD = 1100
CHANNEL = Channel.two_layer(DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1, K)
# The composed channel keeps the true segment with P = 0.2125 and sends each other one
# with Q = 0.1125 (signal P - Q = 0.1, half the one-layer signal at ln 3), so one
# standard error is about 320 to 370 devices here: the published cells (>= 2400) sit
# more than 3.5 SE above the threshold and the others (<= 100) about 3 SE or more below
# it. (Every cell's raw count is near n * Q = 1125 or above: a threshold must stay
# below that, or the raw-count test alone suppresses everything.)
MAX_ERROR_IN_SE = 4.0


def expected_standard_error(true_count: int) -> float:
    """The standard error of one cell at the truth: sampling plus central noise."""
    n = sum(TRUTH)
    share = CHANNEL.other + CHANNEL.signal * true_count / n
    noise = geometric_variance(DEFAULT_CENTRAL_EPSILON) * (
        (1 - CHANNEL.other) ** 2 + (K - 1) * CHANNEL.other**2
    )
    return math.sqrt(n * share * (1 - share) + noise) / CHANNEL.signal


def test_published_estimates_are_within_4_standard_errors_and_small_cells_are_absent(
    start_server: Callable[..., SyncServer],
) -> None:
    clock = Clock()
    server = start_server(k=K, k_threshold=K_THRESHOLD, synchronous="NORMAL", capture_raw=False,
                          clock=clock, rng=random.Random(48))
    client = SyncClient(base_url="http://in-process.invalid",
                        transport=InProcessTransport(server.handler.handle), k=K)
    rng = random.Random(10_000)
    devices = [segment for segment, n in enumerate(TRUTH) for _ in range(n)]
    rng.shuffle(devices)
    # Each simulated device draws its memo once (layer 1), then reports a fresh
    # randomization of the memo (layer 2), as the engine does.
    memos = [draw_memo(true_segment, k=K, epsilon_inf=DEFAULT_EPSILON_INF, rng=rng)
             for true_segment in devices]
    for memo in memos:
        client.send_report(report_from_memo(memo, k=K, epsilon_1=DEFAULT_EPSILON_1, rng=rng),
                           EPOCH)
    exact = server.store.counts(EPOCH, k=K)
    assert sum(exact) == sum(TRUTH)

    clock.now = EPOCH_CLOSES
    status, _, body = server.handler.handle("GET", f"/v1/stats?epoch={EPOCH}", {}, b"")
    stats = json.loads(body)
    assert status == 200
    assert abs(stats["noisy_total"] - sum(TRUTH)) <= 6 * math.sqrt(K * 1.5)
    assert (stats["epsilon_inf"], stats["epsilon_1"]) == (DEFAULT_EPSILON_INF, DEFAULT_EPSILON_1)
    assert stats["report_epsilon"] == CHANNEL.epsilon
    assert stats["central_epsilon"] == DEFAULT_CENTRAL_EPSILON
    published = {cell["segment"]: cell for cell in stats["segments"]}
    assert set(published) == {0, 1, 2}
    assert stats["suppressed"] == [3, 4, 5, 6, 7]  # the small cell 3 and the empty ones
    for segment, cell in published.items():
        assert cell["estimate"] >= K_THRESHOLD
        error = abs(cell["estimate"] - TRUTH[segment])
        assert error <= MAX_ERROR_IN_SE * cell["standard_error"], (segment, cell)
        expected = expected_standard_error(TRUTH[segment])
        assert 0.9 * expected < cell["standard_error"] < 1.1 * expected, (segment, cell)
