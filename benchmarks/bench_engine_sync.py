"""``PersonalizationEngine.sync()`` latency with the server stub on loopback, next to
the bare ``SyncClient.send_report`` of the same message in the same run.

``sync()`` does more than send: it moves the reporting clock, checks the week's ledger,
assigns the segment locally, looks up its memo (drawing it on the first call), randomizes
the memo again, writes the report to the encrypted egress log and the budget ledger
before sending (one transaction), sends, and records the answer (a second transaction).
Each call is a new epoch: the engine's and the server's shared clock moves a week per
call. The schedule is off (``schedule=False``): this measures the send, not the wait for
the week's random moment.

Run: ``.venv/bin/python benchmarks/bench_engine_sync.py [--calls 200]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from ondevice import PersonalizationEngine, RawKey, SyncSettings
from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY, sample_policy
from ondevice_sync.client import SyncClient
from ondevice_sync.protocol import epoch_of
from ondevice_sync.server import ServerConfig, SyncServer


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    now = [time.time()]

    def clock() -> float:
        return now[0]

    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        server = SyncServer(
            config=ServerConfig(k=8, db_path=Path(tmp) / "counts.db", port=0, rate_limit=0),
            clock=clock,
        ).start()
        try:
            engine = PersonalizationEngine(
                Path(tmp) / "profile",
                key=RawKey(os.urandom(32)),
                policy=sample_policy(),
                privacy_level="segment",
                clock=clock,
                bundle=SAMPLE_BUNDLE,
                bundle_public_key=SAMPLE_PUBLIC_KEY,
                sync=SyncSettings(server_url=server.url, schedule=False, min_gap=0.0),
            )
            engine.set_signals("me", {"plan": "pro"})
            client = SyncClient(base_url=server.url, k=8)
            engine_times: list[float] = []
            bare_times: list[float] = []
            for _ in range(args.calls):
                now[0] += 7 * 86400.0
                t0 = time.perf_counter()
                outcome = engine.sync("me")
                engine_times.append(time.perf_counter() - t0)
                assert outcome.status == "sent", outcome
                t0 = time.perf_counter()
                client.send_report(3, epoch_of(now[0]))
                bare_times.append(time.perf_counter() - t0)
            engine.close()
        finally:
            server.close()
    e50, b50 = statistics.median(engine_times) * 1e3, statistics.median(bare_times) * 1e3
    print(f"sync() on loopback, {args.calls} calls, one epoch each")
    print(f"  engine.sync()        p50 {e50:6.2f} ms   p99 {pct(engine_times, 0.99) * 1e3:6.2f} ms")
    print(f"  client.send_report   p50 {b50:6.2f} ms   p99 {pct(bare_times, 0.99) * 1e3:6.2f} ms")
    print(f"  ratio engine/bare p50: {e50 / b50:.2f}")


if __name__ == "__main__":
    main()
