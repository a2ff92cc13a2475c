"""Server stub throughput and latency on loopback, against a bare stdlib floor.

Compares, in the same run and under the same load:

- ``real``: ``python -m sync.server`` (strict validation, group commit, SQLite WAL,
  ``synchronous=FULL``, answer only after the commit);
- ``floor``: a bare :class:`http.server.ThreadingHTTPServer` that parses the body and
  upserts the count with one commit per request (same pragmas, same durability: commit
  before answer, same listen backlog), and nothing else;
- ``pooled``: the same floor, but with 32 pre-started worker threads instead of a thread
  per connection (the real server does that too), so the table shows how much of the
  gain is the pool and how much is group commit minus validation.

Each server runs in its own process; the load comes from a third process with 1, 8 or 32
client threads sending prebuilt requests over raw sockets, one connection per request
(``Connection: close``, like the real client). After each run the stored counts are
compared with the acknowledged reports: ``lost`` must be 0.

Run::

    .venv/bin/python benchmarks/bench_server.py            # 3 repeats x 3 s per cell
    .venv/bin/python benchmarks/bench_server.py --repeats 5 --duration 5
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sync.protocol import REPORT_CONTENT_TYPE, Report, encode_report, epoch_of


# --------------------------------------------------------------------------- floor server
def run_floor_server(db: Path, ready: Path, pooled: bool) -> None:
    """A bare ThreadingHTTPServer: parse the body, upsert, commit, answer.

    With ``pooled``, connections go to 32 pre-started threads instead of a new thread
    each (what the real server does), to separate that gain from the rest.
    """
    connection = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute(
        "CREATE TABLE IF NOT EXISTS counts (epoch TEXT NOT NULL, segment INTEGER NOT NULL,"
        " n INTEGER NOT NULL, PRIMARY KEY (epoch, segment)) WITHOUT ROWID"
    )
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            report = json.loads(body)
            with lock:
                connection.execute(
                    "INSERT INTO counts VALUES (?, ?, 1) ON CONFLICT (epoch, segment) "
                    "DO UPDATE SET n = n + 1",
                    (report["epoch"], int(report["segment"])),
                )
            answer = b'{"status":"counted"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512

    class PooledServer(Server):
        jobs: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()

        def process_request(self, request: Any, client_address: Any) -> None:
            self.jobs.put((request, client_address))

        def work(self) -> None:
            while True:
                self.process_request_thread(*self.jobs.get())

    server = (PooledServer if pooled else Server)(("127.0.0.1", 0), Handler)
    if isinstance(server, PooledServer):
        for _ in range(32):
            threading.Thread(target=server.work, daemon=True).start()
    ready.write_text(str(server.server_address[1]))
    server.serve_forever()


# --------------------------------------------------------------------------- load
def run_load(port: int, threads: int, duration: float) -> None:
    """Send reports from ``threads`` threads for ``duration`` s; print JSON results."""
    epoch = epoch_of(time.time())
    requests = []
    for segment in range(8):
        body = encode_report(Report(epoch=epoch, segment=segment))
        requests.append(
            (
                f"POST /v1/report HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: {REPORT_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n"
                "Accept: application/json\r\nConnection: close\r\n\r\n"
            ).encode()
            + body
        )
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    start_gate = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        mine, n = latencies[index], index
        start_gate.wait()
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                    sock.sendall(requests[n % 8])
                    answer = b""
                    while chunk := sock.recv(4096):
                        answer += chunk
            except OSError:
                failures[index] += 1
                continue
            if answer.startswith(b"HTTP/1.1 200"):
                mine.append(time.perf_counter() - started)
            else:
                failures[index] += 1
            n += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    begin = time.perf_counter()
    stop_at[0] = begin + duration
    start_gate.wait()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - begin
    flat = sorted(x for per in latencies for x in per)
    print(
        json.dumps(
            {
                "ok": len(flat),
                "failed": sum(failures),
                "wall": wall,
                "p50": flat[len(flat) // 2] if flat else float("nan"),
                "p99": flat[min(len(flat) - 1, int(len(flat) * 0.99))] if flat else float("nan"),
            }
        )
    )


# --------------------------------------------------------------------------- driver
def stored_total(db: Path) -> int:
    connection = sqlite3.connect(db)
    try:
        return int(connection.execute("SELECT COALESCE(SUM(n), 0) FROM counts").fetchone()[0])
    finally:
        connection.close()


def start(kind: str, directory: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    db, ready = directory / f"{kind}.db", directory / f"{kind}.port"
    if kind == "real":
        command = [
            sys.executable,
            "-m",
            "sync.server",
            "--k",
            "8",
            "--db",
            str(db),
            "--port",
            "0",
            "--ready-file",
            str(ready),
            # The load comes from one address (127.0.0.1): the per-address limit is off.
            "--rate-limit",
            "0",
        ]
    else:
        command = [sys.executable, __file__, "--floor-server", str(db), str(ready), kind]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{kind} server did not start")
        time.sleep(0.02)
    time.sleep(0.2)
    return process, int(ready.read_text()), db


def load(port: int, threads: int, duration: float) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--load", str(port), str(threads), str(duration)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_server_"))
    kinds = ("floor", "pooled", "real")
    servers = {kind: start(kind, directory) for kind in kinds}
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for clients in args.clients:
            for repeat in range(args.repeats):
                order = kinds if repeat % 2 == 0 else kinds[::-1]
                for kind in order:
                    process, port, db = servers[kind]
                    before = stored_total(db)
                    result = load(port, clients, args.duration)
                    time.sleep(0.1)
                    result["lost"] = result["ok"] - (stored_total(db) - before)
                    results.setdefault((kind, clients), []).append(result)
    finally:
        for process, _, _ in servers.values():
            process.terminate()
            process.wait()

    print(
        f"loopback, Connection: close, {args.repeats} repeats x {args.duration:g} s, "
        "medians; synchronous=FULL for both"
    )
    print("floor = bare ThreadingHTTPServer (thread per connection), commit per request;")
    print("pooled = the same floor with 32 pre-started threads; ratios are real/floor and")
    print("real/pooled")
    print(
        f"{'clients':>7} {'server':>6} {'reports/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'failed':>6} {'lost':>5} {'real/floor':>10} {'real/pooled':>11}"
    )
    for clients in args.clients:
        rates = {}
        for kind in kinds:
            runs = results[(kind, clients)]
            rate = statistics.median(r["ok"] / r["wall"] for r in runs)
            rates[kind] = rate
            ratios = (
                f"{rates['real'] / rates['floor']:>10.2f} {rates['real'] / rates['pooled']:>11.2f}"
                if kind == "real"
                else ""
            )
            print(
                f"{clients:>7} {kind:>6} {rate:>10.0f} "
                f"{statistics.median(r['p50'] for r in runs) * 1e3:>8.2f} "
                f"{statistics.median(r['p99'] for r in runs) * 1e3:>8.2f} "
                f"{sum(int(r['failed']) for r in runs):>6} "
                f"{sum(int(r['lost']) for r in runs):>5} {ratios}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--floor-server":
        run_floor_server(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "pooled")
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        run_load(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
