"""Client ``send_report`` latency on loopback, against a bare ``http.client`` POST.

Both send the same bytes (the same fixed headers and body, one connection per request)
to the same real server stub (``python -m ondevice_sync.server``, ``synchronous=FULL``, in its own
process), in interleaved blocks, so the difference is the client's own cost: building
and re-validating the report, the header check and the response handling.

Run::

    .venv/bin/python benchmarks/bench_sync_client.py
    .venv/bin/python benchmarks/bench_sync_client.py --requests 1000 --repeats 5
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ondevice_sync.client import SyncClient
from ondevice_sync.protocol import REPORT_PATH, REQUEST_HEADERS, Report, encode_report, epoch_of


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per block")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_client_"))
    ready = directory / "port"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ondevice_sync.server",
            "--k",
            "8",
            "--db",
            str(directory / "c.db"),
            "--port",
            "0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not ready.exists():
            if server.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.02)
        port = int(ready.read_text())
        epoch = epoch_of(time.time())
        client = SyncClient(base_url=f"http://127.0.0.1:{port}", k=8, timeout=5.0)
        headers = dict(REQUEST_HEADERS[REPORT_PATH])

        def via_client(segment: int) -> None:
            client.send_report(segment, epoch)

        def bare(segment: int) -> None:
            body = encode_report(Report(epoch=epoch, segment=segment))
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
            try:
                connection.request("POST", REPORT_PATH, body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
                if answer.status != 200:
                    raise SystemExit(f"bare POST got {answer.status}")
            finally:
                connection.close()

        runs: dict[str, list[list[float]]] = {"client": [], "bare": []}
        senders: dict[str, Callable[[int], None]] = {"client": via_client, "bare": bare}
        for _ in range(20):  # warm up both paths
            via_client(0)
            bare(0)
        for repeat in range(args.repeats):
            order = ("bare", "client") if repeat % 2 == 0 else ("client", "bare")
            for name in order:
                send = senders[name]
                latencies = []
                for i in range(args.requests):
                    started = time.perf_counter()
                    send(i % 8)
                    latencies.append(time.perf_counter() - started)
                runs[name].append(latencies)
    finally:
        server.terminate()
        server.wait()

    print(
        f"send_report latency on loopback, {args.repeats} blocks x {args.requests} "
        "sequential requests, medians over blocks"
    )
    print(f"{'path':>8} {'p50 ms':>8} {'p99 ms':>8} {'reports/s':>10}")
    p50s = {}
    for name in ("bare", "client"):
        blocks = runs[name]
        p50s[name] = statistics.median(percentile(b, 0.5) for b in blocks)
        p99 = statistics.median(percentile(b, 0.99) for b in blocks)
        rate = statistics.median(len(b) / sum(b) for b in blocks)
        print(f"{name:>8} {p50s[name] * 1e3:>8.3f} {p99 * 1e3:>8.3f} {rate:>10.0f}")
    print(f"client/bare p50 ratio: {p50s['client'] / p50s['bare']:.2f}")


if __name__ == "__main__":
    main()
