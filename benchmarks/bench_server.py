"""Server stub throughput and latency on loopback, against a bare stdlib floor.

Compares, in the same run and under the same load:

- ``real``: ``python -m ondevice_sync.server`` (strict validation, group commit, SQLite WAL,
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

Slow connections (``--slow``)
-----------------------------
Only the real server, in four phases, each bounded in time, all on 127.0.0.1:

1. ``baseline``: real reports from ``--clients`` threads (default 4) for ``--duration``
   s, nothing else;
2. ``slow``: the same load while ``--slow-connections`` (default 10,000) connections
   each send one byte of a request head every 8 s (the server closes each at its
   request deadline, 10 s; the attacker reconnects at once, so the number stays
   up); the server's resident memory, threads and open descriptors are sampled every
   0.25 s;
3. ``lines``: 500 connections sending a header line every 5 s: how long each stays open;
4. ``bundle``: 20 clients ask for a 30 MB bundle and never read: the server's memory.

Run::

    .venv/bin/python benchmarks/bench_server.py --slow
    .venv/bin/python benchmarks/bench_server.py --slow --slow-connections 2000 --duration 5

10,000 connections need about 10,100 descriptors in the attacking process and as many in
the server: the benchmark raises its soft ``RLIMIT_NOFILE`` to the hard limit (children
inherit it; the server's command line raises its own too) and stops with a message if
the hard limit is too low (``ulimit -Hn``; raise it in limits.conf or as root). It
closes every socket it opened, stops both processes and deletes its directory.
``--server-tree DIR`` runs ``python -m ondevice_sync.server`` from another source tree (an older
checkout, say) to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import queue
import resource
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ondevice_sync.protocol import REPORT_CONTENT_TYPE, Report, encode_report, epoch_of


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


def start(
    kind: str, directory: Path, extra: list[str] | None = None, tree: Path | None = None
) -> tuple[subprocess.Popen[bytes], int, Path]:
    db, ready = directory / f"{kind}.db", directory / f"{kind}.port"
    if kind == "real":
        command = [
            sys.executable,
            "-m",
            "ondevice_sync.server",
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
            *(extra or []),
        ]
    else:
        command = [sys.executable, __file__, "--floor-server", str(db), str(ready), kind]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=None if tree is None else tree,
    )
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


# --------------------------------------------------------------------------- slow clients
def raise_open_file_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(
            f"need {needed} open files, the hard limit is {hard}: raise it (ulimit -Hn) "
            "or ask for fewer --slow-connections"
        )
    return int(soft)


SLOW_HEAD = (
    b"POST /v1/report HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
    + REPORT_CONTENT_TYPE.encode() + b"\r\n" + b"X-Slow: " + b"s" * 4000
)


def run_slow(port: int, count: int, interval: float, duration: float, mode: str) -> None:
    """Keep ``count`` connections open for ``duration`` s, each sending one byte of a
    request head (``mode`` "bytes") or one header line ("lines") every ``interval`` s,
    reconnecting as soon as the server closes one. Prints "ready" once all are open,
    then one JSON summary."""
    raise_open_file_limit(count + 256)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    selector = selectors.DefaultSelector()
    opened_at: dict[socket.socket, float] = {}
    sent: dict[socket.socket, int] = {}
    due: deque[tuple[float, socket.socket]] = deque()
    lifetimes: list[float] = []
    answered_408 = 0
    failures = 0
    end = time.monotonic() + duration

    def open_one(now: float, spread: float) -> None:
        nonlocal failures
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            failures += 1
            return
        opened_at[sock] = now
        sent[sock] = 0
        selector.register(sock, selectors.EVENT_READ)
        due.append((now + spread * (len(opened_at) % 1000) / 1000, sock))

    def drop(sock: socket.socket, now: float) -> None:
        lifetimes.append(now - opened_at.pop(sock))  # closed by the server
        sent.pop(sock, None)
        selector.unregister(sock)
        sock.close()

    start = time.monotonic()
    while len(opened_at) < count and time.monotonic() < end and not stop.is_set():
        # open them, 200 at a time
        now = time.monotonic()
        for _ in range(min(200, count - len(opened_at))):
            open_one(now, interval)
        time.sleep(0.01)
    print(json.dumps({"ready": len(opened_at), "seconds": time.monotonic() - start}),
          flush=True)
    lifetimes.clear()
    reopen = 0
    while (now := time.monotonic()) < end and not stop.is_set():
        for key, _ in selector.select(0.05):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 408 "):
                answered_408 += 1
            drop(sock, now)  # closed, or answered (and so about to be closed)
            reopen += 1
        for _ in range(min(reopen, 500)):  # keep the number up
            open_one(now, 0.0)
            reopen -= 1
        while due and due[0][0] <= now:
            _, sock = due.popleft()
            if sock not in opened_at:
                continue
            n = sent[sock]
            if mode == "bytes":
                piece = SLOW_HEAD[n % len(SLOW_HEAD) : n % len(SLOW_HEAD) + 1]
            else:
                piece = b"POST /v1/report HTTP/1.1\r\n" if n == 0 else b"X-Line-%d: y\r\n" % n
            with contextlib.suppress(OSError):  # not connected yet, or being closed
                sock.send(piece)
                sent[sock] = n + 1
            due.append((now + interval, sock))
    closed = sorted(lifetimes)
    still_open = len(opened_at)
    for sock in list(opened_at):
        drop(sock, time.monotonic())
    selector.close()
    print(json.dumps({
        "open_at_end": still_open,
        "closed_by_server": len(closed),
        "answered_408": answered_408,
        "connect_failures": failures,
        "lifetime_p50": closed[len(closed) // 2] if closed else None,
        "lifetime_max": closed[-1] if closed else None,
    }), flush=True)


def proc_status(pid: int) -> dict[str, int]:
    """Resident memory (KiB), its peak, threads and open descriptors of process ``pid``."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                values[name] = int(value.split()[0])
        values["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return values


class Sampler:
    """Samples a process every 0.25 s in a thread; keeps the maxima."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.maxima: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for name, value in proc_status(self.pid).items():
                self.maxima[name] = max(self.maxima.get(name, 0), value)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.maxima


def start_slow(port: int, count: int, interval: float, duration: float,
               mode: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--slow-load", str(port), str(count), str(interval),
         str(duration), mode],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise SystemExit("the slow-connection process did not start")
    return process, json.loads(line)


def finish_slow(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    lines = [line for line in output.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return result


def wait_for_fds(pid: int, at_least: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    fds = 0
    while time.monotonic() < end:
        fds = proc_status(pid).get("fds", 0)
        if fds >= at_least:
            break
        time.sleep(0.2)
    return fds


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f} MiB"


def slow_main(args: argparse.Namespace) -> None:
    count = args.slow_connections
    raise_open_file_limit(count + 1024)
    directory = Path(tempfile.mkdtemp(prefix="bench_server_slow_"))
    processes: list[subprocess.Popen[Any]] = []
    held: list[socket.socket] = []
    try:
        bundle = directory / "catalog.bundle"
        with bundle.open("wb") as out:
            for _ in range(30):
                out.write(os.urandom(1024 * 1024))
        tree = None if args.server_tree is None else Path(args.server_tree).resolve()
        help_text = subprocess.run(
            [sys.executable, "-m", "ondevice_sync.server", "--help"],
            capture_output=True, text=True,
            cwd=tree, check=True,
        ).stdout
        extra = ["--bundle", str(bundle)]
        if "--max-connections" in help_text:
            extra += ["--max-connections", str(count + 2000)]
        server, port, _ = start("real", directory, extra, tree)
        processes.append(server)
        idle = proc_status(server.pid)
        print(f"server pid {server.pid}: idle {mib(idle.get('VmRSS'))}, "
              f"{idle.get('Threads')} threads, {idle.get('fds')} descriptors")

        base = load(port, args.clients, args.duration)
        print(f"baseline: {args.clients} clients, {base['ok'] / base['wall']:.0f} reports/s, "
              f"p50 {base['p50'] * 1e3:.2f} ms, p99 {base['p99'] * 1e3:.2f} ms, "
              f"failed {base['failed']}")

        # Phase 2: slow connections, then the same load.
        slow_for = 60 + args.duration + 30
        slow, ready = start_slow(port, count, 8.0, slow_for, "bytes")
        processes.append(slow)
        fds = wait_for_fds(server.pid, idle.get("fds", 0) + int(count * 0.95), 60)
        sampler = Sampler(server.pid)
        time.sleep(2.0)
        before = proc_status(server.pid)
        result = load(port, args.clients, args.duration)
        during = sampler.stop()
        print(
            f"slow: {count} connections opened in {ready['seconds']:.1f} s, server holding "
            f"{fds - idle.get('fds', 0)} of them when the load started; each sends a byte "
            "every 8 s"
        )
        print(
            f"  reports: {args.clients} clients, {result['ok'] / result['wall']:.0f} reports/s, "
            f"p50 {result['p50'] * 1e3:.2f} ms, p99 {result['p99'] * 1e3:.2f} ms, "
            f"failed {result['failed']}"
        )
        print(
            f"  server: resident {mib(before.get('VmRSS'))} at the start, max "
            f"{mib(during.get('VmRSS'))} during the load; threads max {during.get('Threads')}; "
            f"descriptors max {during.get('fds')}"
        )
        slow.terminate()
        summary = finish_slow(slow, 30)
        processes.remove(slow)
        print(f"  attacker: {summary}")
        time.sleep(1.0)
        after = proc_status(server.pid)
        print(f"  after the attacker left: {mib(after.get('VmRSS'))}, {after.get('Threads')} "
              f"threads, {after.get('fds')} descriptors")

        # Phase 3: 500 clients sending a header line every 5 s.
        lines, _ = start_slow(port, 500, 5.0, 25.0, "lines")
        processes.append(lines)
        summary = finish_slow(lines, 60)
        processes.remove(lines)
        if summary.get("closed_by_server"):
            print(
                "lines: 500 connections, a header line every 5 s for 25 s: closed by the "
                f"server after {summary['lifetime_p50']:.1f} s (median), "
                f"{summary['lifetime_max']:.1f} s (max); {summary['answered_408']} answered "
                f"408, {summary['open_at_end']} open at the end"
            )
        else:
            print("lines: 500 connections, a header line every 5 s for 25 s: none was closed "
                  f"by the server ({summary.get('open_at_end')} open at the end)")

        # Phase 4: 20 clients ask for the 30 MB bundle and never read.
        start_rss = proc_status(server.pid).get("VmRSS")
        sampler = Sampler(server.pid)
        try:
            for _ in range(20):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(b"GET /v1/bundle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        except OSError as exc:
            print(f"bundle: could not connect ({exc}) after {len(held)} connections")
        time.sleep(5.0)
        peak = sampler.stop()
        for sock in held:
            sock.close()
        print(f"bundle: {len(held)} clients never reading a 30 MB bundle: server resident "
              f"{mib(start_rss)} before, max {mib(peak.get('VmRSS'))}, threads max "
              f"{peak.get('Threads')}")
        held.clear()
        time.sleep(1.0)
        final = proc_status(server.pid)
        print(f"end: {mib(final.get('VmRSS'))} resident, {final.get('Threads')} threads, "
              f"{final.get('fds')} descriptors, peak resident {mib(final.get('VmHWM'))}")
    finally:
        for sock in held:
            sock.close()
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per load run (default 3; 15 with --slow)")
    parser.add_argument("--clients", type=int, nargs="+", default=None,
                        help="client threads per run (default 1 8 32; 4 with --slow)")
    parser.add_argument("--slow", action="store_true",
                        help="the slow-connection phases instead of the comparison")
    parser.add_argument("--slow-connections", type=int, default=10_000)
    parser.add_argument("--server-tree", help="run python -m ondevice_sync.server from this tree")
    args = parser.parse_args()
    if args.slow:
        args.duration = 15.0 if args.duration is None else args.duration
        args.clients = 4 if args.clients is None else args.clients[0]
        slow_main(args)
        return
    args.duration = 3.0 if args.duration is None else args.duration
    args.clients = [1, 8, 32] if args.clients is None else args.clients
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
    elif len(sys.argv) > 1 and sys.argv[1] == "--slow-load":
        run_slow(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]),
                 sys.argv[6])
    else:
        main()
