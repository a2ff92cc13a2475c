"""Oblivious HTTP cost on loopback: reports/s through relay + gateway vs plain reports.

Compares, in the same run, against the same server process and count store:

- ``plain``: ``SyncClient.send_report`` straight to the server (``POST /v1/report``);
- ``ohttp``: ``SyncClient.send_report`` through :class:`ondevice_sync.ohttp.OhttpTransport`: HPKE
  encapsulation on the device, ``python -m ondevice_sync.relay`` (its own process), the gateway
  (:class:`ondevice_sync.gateway.OhttpGateway`, in the server process, in front of the same
  ``ReportHandler``), and the encapsulated answer back.

Three processes: the server (``SyncServer`` with the gateway mounted, per-address rate
limit off since every report comes from 127.0.0.1), the relay (rate limit raised out of
the way) and the load (1 or 8 client threads, one connection per request, as the real
client). It also sends one report each way through a byte-counting TCP proxy and prints
what OHTTP adds on the wire, per report, in each direction.

The server mounts the gateway (``ServerConfig.ohttp_keys_path``) and takes encapsulated
requests from the relay's address only; the relay's per-address limits (reports per
week, open connections) are raised out of the way, since every client is 127.0.0.1.

Run::

    .venv/bin/python benchmarks/bench_ohttp.py              # 3 repeats x 3 s per cell
    .venv/bin/python benchmarks/bench_ohttp.py --repeats 5 --duration 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ondevice_sync.client import SyncClient
from ondevice_sync.ohttp import (
    OHTTP_PATH,
    GatewayKey,
    KeyConfig,
    OhttpTransport,
    save_gateway_keys,
)
from ondevice_sync.protocol import epoch_of
from ondevice_sync.server import ServerConfig, SyncServer


# --------------------------------------------------------------------------- server
def run_server(directory: Path, synchronous: str) -> None:
    """Serve plain reports and OHTTP on one port; write the port when ready."""
    server = SyncServer(
        config=ServerConfig(
            k=8,
            db_path=directory / "counts.db",
            port=0,
            synchronous=synchronous,  # type: ignore[arg-type]
            rate_limit=0,  # the plain load comes from 127.0.0.1 only
            ohttp_keys_path=directory / "gateway-keys.json",
            ohttp_relays=("127.0.0.1",),
        )
    )
    (directory / "server.port").write_text(str(server.address[1]))
    server.serve_forever()


# --------------------------------------------------------------------------- load
def run_load(mode: str, directory: Path, threads: int, duration: float) -> None:
    """Send reports from ``threads`` threads for ``duration`` s; print JSON results."""
    server_url = f"http://127.0.0.1:{(directory / 'server.port').read_text().strip()}"
    relay_url = f"http://127.0.0.1:{(directory / 'relay.port').read_text().strip()}{OHTTP_PATH}"
    config = KeyConfig.decode(bytes.fromhex((directory / "config.hex").read_text()))
    epoch = epoch_of(time.time())

    def client() -> SyncClient:
        if mode == "plain":
            return SyncClient(base_url=server_url, k=8)
        transport = OhttpTransport(relay_url=relay_url, key_config=config,
                                   key_config_pin=config.digest())
        return SyncClient(base_url=server_url, transport=transport, k=8)

    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    gate = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        mine, sender, n = latencies[index], client(), index
        gate.wait()
        while time.perf_counter() < stop_at[0]:
            started = time.perf_counter()
            try:
                sender.send_report(n % 8, epoch)
            except Exception:
                failures[index] += 1
                continue
            mine.append(time.perf_counter() - started)
            n += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    begin = time.perf_counter()
    stop_at[0] = begin + duration
    gate.wait()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - begin
    flat = sorted(x for per in latencies for x in per)
    print(json.dumps({
        "ok": len(flat), "failed": sum(failures), "wall": wall,
        "p50": flat[len(flat) // 2] if flat else float("nan"),
        "p99": flat[min(len(flat) - 1, int(len(flat) * 0.99))] if flat else float("nan"),
    }))


# --------------------------------------------------------------------------- wire bytes
class CountingProxy:
    """A loopback TCP proxy that counts the bytes of each direction."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = 0
        self.down = 0
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                thread = threading.Thread(target=self._flow, args=(client,), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _flow(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream) as upstream:
            pipes = [threading.Thread(target=self._pipe, args=(client, upstream, True)),
                     threading.Thread(target=self._pipe, args=(upstream, client, False))]
            for pipe in pipes:
                pipe.start()
            for pipe in pipes:
                pipe.join()

    def _pipe(self, source: socket.socket, target: socket.socket, up: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if up:
                    self.up += len(chunk)
                else:
                    self.down += len(chunk)
                target.sendall(chunk)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def settle(self) -> tuple[int, int]:
        for thread in self.threads:
            thread.join(timeout=10)
        return self.up, self.down

    def close(self) -> None:
        self.listener.close()


def wire_bytes(server_port: int, relay_port: int, config: KeyConfig) -> dict[str, int]:
    """Bytes of one plain report and one OHTTP report, each direction, on each hop."""
    epoch = epoch_of(time.time())
    direct = CountingProxy(("127.0.0.1", server_port))
    device_relay = CountingProxy(("127.0.0.1", relay_port))
    try:
        SyncClient(base_url=f"http://127.0.0.1:{direct.port}", k=8).send_report(1, epoch)
        transport = OhttpTransport(
            relay_url=f"http://127.0.0.1:{device_relay.port}{OHTTP_PATH}",
            key_config=config, key_config_pin=config.digest(),
        )
        SyncClient(base_url=f"http://127.0.0.1:{server_port}", transport=transport,
                   k=8).send_report(1, epoch)
        plain_up, plain_down = direct.settle()
        ohttp_up, ohttp_down = device_relay.settle()
    finally:
        direct.close()
        device_relay.close()
    return {"plain_up": plain_up, "plain_down": plain_down,
            "ohttp_up": ohttp_up, "ohttp_down": ohttp_down}


# --------------------------------------------------------------------------- driver
def _wait_port(process: subprocess.Popen[bytes], path: Path, what: str) -> int:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.02)
    return int(path.read_text())


def load(mode: str, directory: Path, threads: int, duration: float) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--load", mode, str(directory), str(threads), str(duration)],
        capture_output=True, text=True, check=True,
    ).stdout
    result: dict[str, float] = json.loads(output)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_ohttp_"))
    key = GatewayKey.generate(1)
    save_gateway_keys(directory / "gateway-keys.json", [key])
    (directory / "config.hex").write_text(key.config.encode().hex())
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(directory), args.synchronous], **quiet
    )
    processes = [server]
    try:
        server_port = _wait_port(server, directory / "server.port", "the server")
        relay = subprocess.Popen(
            [sys.executable, "-m", "ondevice_sync.relay", "--gateway",
             f"http://127.0.0.1:{server_port}{OHTTP_PATH}", "--port", "0",
             "--per-epoch", str(10**9), "--workers", "32", "--backlog", "512",
             "--connections-per-address", "512",
             "--ready-file", str(directory / "relay.port")], **quiet,
        )
        processes.append(relay)
        relay_port = _wait_port(relay, directory / "relay.port", "the relay")
        time.sleep(0.2)
        wire = wire_bytes(server_port, relay_port, key.config)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        modes = ("plain", "ohttp")
        for clients in args.clients:
            for repeat in range(args.repeats):
                for mode in modes if repeat % 2 == 0 else modes[::-1]:
                    result = load(mode, directory, clients, args.duration)
                    results.setdefault((mode, clients), []).append(result)
    finally:
        for process in processes:
            process.terminate()
            process.wait()

    print(f"loopback, Connection: close, {args.repeats} repeats x {args.duration:g} s, medians; "
          f"synchronous={args.synchronous}; one SyncClient per thread")
    print("plain = POST /v1/report to the server; ohttp = the same report through "
          "OhttpTransport -> relay -> gateway -> the same server; ratio = ohttp/plain")
    print(f"{'clients':>7} {'path':>6} {'reports/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'failed':>6} {'ratio':>6}")
    for clients in args.clients:
        rates = {}
        for mode in modes:
            runs = results[(mode, clients)]
            rates[mode] = statistics.median(r["ok"] / r["wall"] for r in runs)
            ratio = f"{rates['ohttp'] / rates['plain']:>6.2f}" if mode == "ohttp" else ""
            print(f"{clients:>7} {mode:>6} {rates[mode]:>10.0f} "
                  f"{statistics.median(r['p50'] for r in runs) * 1e3:>8.2f} "
                  f"{statistics.median(r['p99'] for r in runs) * 1e3:>8.2f} "
                  f"{sum(int(r['failed']) for r in runs):>6} {ratio}")
    print()
    print("bytes on the wire for one report (HTTP/1.1 head + body, the device's connection):")
    print(f"  plain  device -> server {wire['plain_up']:>5}   server -> device "
          f"{wire['plain_down']:>5}")
    print(f"  ohttp  device -> relay  {wire['ohttp_up']:>5}   relay  -> device "
          f"{wire['ohttp_down']:>5}")
    print(f"  added by OHTTP: request {wire['ohttp_up'] - wire['plain_up']:+d} bytes, "
          f"response {wire['ohttp_down'] - wire['plain_down']:+d} bytes")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        run_server(Path(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--load":
        run_load(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
