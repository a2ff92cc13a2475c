"""10,000 simulated devices: randomized on the device, debiased and suppressed by the server."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from sync.client import InProcessTransport, SyncClient
from sync.privacy import DEFAULT_EPSILON, randomize
from sync.server import SyncServer

from .conftest import EPOCH

# Known truth: 10,000 devices over K = 8 segments; segments 4..7 have nobody.
TRUTH = [4500, 3000, 2000, 500, 0, 0, 0, 0]
K_THRESHOLD = 1000
# At epsilon = ln 3 and K = 8 one standard error is about 150 to 190 devices here, so the
# published cells (>= 2000) sit more than 5 SE above the threshold and the others
# (<= 500) about 3 SE below it.
MAX_ERROR_IN_SE = 4.0


def test_published_estimates_are_within_4_standard_errors_and_small_cells_are_absent(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(k=8, k_threshold=K_THRESHOLD, synchronous="NORMAL", capture_raw=False)
    client = SyncClient(base_url="http://in-process.invalid",
                        transport=InProcessTransport(server.handler.handle), k=8)
    rng = random.Random(10_000)
    devices = [segment for segment, n in enumerate(TRUTH) for _ in range(n)]
    rng.shuffle(devices)
    for true_segment in devices:
        client.send_report(randomize(true_segment, k=8, epsilon=DEFAULT_EPSILON, rng=rng), EPOCH)

    status, _, body = server.handler.handle("GET", f"/v1/stats?epoch={EPOCH}", {}, b"")
    stats = json.loads(body)
    assert status == 200
    assert stats["total"] == sum(TRUTH)
    assert stats["epsilon"] == DEFAULT_EPSILON
    published = {cell["segment"]: cell for cell in stats["segments"]}
    assert set(published) == {s for s, n in enumerate(TRUTH) if n >= 2 * K_THRESHOLD}
    assert stats["suppressed"] == [s for s in range(8) if s not in published]
    for segment, cell in published.items():
        assert cell["estimate"] >= K_THRESHOLD
        error = abs(cell["estimate"] - TRUTH[segment])
        assert error <= MAX_ERROR_IN_SE * cell["standard_error"], (segment, cell)
        assert 100 < cell["standard_error"] < 250
