"""How an operator runs the sync server stub and reads its statistics.

In production the operator runs the command line::

    ondevice-sync-server --k 4 --db /var/lib/ondevice/counts.db \\
        --content featured.json --bundle catalog.bundle --port 8080
    # same as: python -m ondevice_sync.server ...; --help lists every option

and reads ``GET /v1/stats`` (the closed, published epochs) and
``GET /v1/stats?epoch=2026-W48`` (that week's noisy, debiased counts). A week's
statistics are published only once no report for it can arrive any more (by default
about two weeks and a day after it began: the next week still accepts its reports, plus
a day of grace); before that the server answers ``425`` and says when. To keep device
addresses away from the operator, put an Oblivious HTTP relay run by someone else in
front of the server, give devices the relay's URL, and start the server with
``--rate-limit 0`` (it then sees only the relay's address; the relay limits devices).

This script does the same in one process on loopback: it writes a content table, starts
the server on a free port with a clock it can move forward, lets 3,000 simulated devices
report a two-layer randomized segment over real HTTP, shows that nothing is published
yet, moves the clock past the week's close, then prints the published statistics next
to the truth.

Run::

    .venv/bin/python examples/server_operator.py
"""

from __future__ import annotations

import json
import random
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ondevice_sync.client import SyncClient
from ondevice_sync.privacy import draw_memo, report_from_memo
from ondevice_sync.protocol import epoch_of
from ondevice_sync.server import ServerConfig, SyncServer

K = 4
# Segment 3 has almost nobody: its estimate is usually under the k threshold and then
# suppressed; at 3,000 devices one standard error is about 100 here, so when the noise
# lifts it over 50 it is published with an error bar that says how little it means.
TRUE_SHARES = [0.55, 0.30, 0.14, 0.01]
DEVICES = 3000


class SimulatedClock:
    """The server's clock for this demonstration: real time plus a jump forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ondevice_operator_") as tmp:
        run(Path(tmp))


def run(directory: Path) -> None:
    """Run the demonstration with its files (content table, count store) in ``directory``."""
    featured = directory / "featured.json"
    featured.write_text(json.dumps({
        "version": 2,
        "segments": [["film-12", "film-7"], ["film-3"], ["film-40", "film-41"], []],
    }))
    config = ServerConfig(
        k=K,
        db_path=directory / "counts.db",
        content_path=featured,
        port=0,  # any free port
        synchronous="NORMAL",  # FULL (the default) also survives power loss
        rate_limit=0,  # every simulated device here shares 127.0.0.1
    )
    clock = SimulatedClock()
    epoch = epoch_of(clock())
    rng = random.Random(2026)
    truth = [round(share * DEVICES) for share in TRUE_SHARES]
    devices = [segment for segment, n in enumerate(truth) for _ in range(n)]

    with SyncServer(config=config, clock=clock).start() as server:
        print(
            f"server stub listening on {server.url} (K={K}, epsilon_inf=ln 3, epsilon_1=ln 9, "
            f"central epsilon ln 3, k threshold {config.k_threshold})"
        )

        def one_device(true_segment: int) -> None:
            # What the engine does on each device: a memo drawn once per true segment
            # and kept, then a fresh randomization of it for each report.
            memo = draw_memo(true_segment, k=K)
            reported = report_from_memo(memo, k=K)
            SyncClient(base_url=server.url, k=K).send_report(reported, epoch)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one_device, rng.sample(devices, len(devices))))
        print(f"{DEVICES} reports in {time.perf_counter() - started:.1f} s")

        try:
            urllib.request.urlopen(f"{server.url}/v1/stats?epoch={epoch}")
        except urllib.error.HTTPError as refused:
            print(f"not published yet: {refused.code} {json.load(refused)['message']}")
            refused.close()
        clock.offset = server.handler.closes_at(epoch) - time.time()
        print(f"(the server's clock moves on to {epoch}'s close)")

        with urllib.request.urlopen(f"{server.url}/v1/stats?epoch={epoch}") as answer:
            stats = json.load(answer)
        with urllib.request.urlopen(f"{server.url}/v1/content") as answer:
            print("content table served to every device:", answer.read().decode())

    print(f"\nstatistics for {stats['epoch']} (noisy total {stats['noisy_total']}):")
    published = {cell["segment"]: cell for cell in stats["segments"]}
    for segment in range(K):
        cell = published.get(segment)
        shown = (
            f"{cell['estimate']:7.0f} ± {cell['standard_error']:.0f}"
            if cell is not None
            else "suppressed (under the k threshold)"
        )
        print(f"  segment {segment}: true {truth[segment]:5d}   published {shown}")


if __name__ == "__main__":
    main()
