"""The server under abusive connections (issue 10, item 14): idle and slow connections
hold no thread, every request has one deadline, connections are capped, files stream.

Everything runs on 127.0.0.1 against a real :class:`SyncServer` in this process, so
its threads can be counted with :func:`threading.active_count`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ondevice_sync.client import SyncClient
from ondevice_sync.protocol import REPORT_CONTENT_TYPE
from ondevice_sync.server import SyncServer

from .conftest import EPOCH, report_body, stored_total


def report_request(segment: int, *, close: bool = True) -> bytes:
    body = report_body(segment)
    return (
        b"POST /v1/report HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + REPORT_CONTENT_TYPE.encode()
        + b"\r\nContent-Length: %d\r\n" % len(body)
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )


def read_all(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything until the server closes (or ``limit`` s pass)."""
    sock.settimeout(limit)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds``, and what it sent."""
    sock.settimeout(0.05)
    data = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


@contextlib.contextmanager
def connections(server: SyncServer, n: int) -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for _ in range(n):
            opened.append(socket.create_connection(server.address, timeout=5))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_idle_and_slow_connections_hold_no_thread_and_reports_still_pass(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(workers=4, capture_raw=False)
    time.sleep(0.1)
    before = threading.active_count()
    with connections(server, 400) as held:
        for sock in held[::2]:  # half idle, half stuck in the middle of a request head
            sock.sendall(b"POST /v1/report HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        during = threading.active_count()
        started = time.monotonic()
        for segment in range(8):
            assert SyncClient(base_url=server.url, k=8, timeout=5).send_report(
                segment, EPOCH
            ).status == 200
        took = time.monotonic() - started
    # One thread per connection (the old server) would be ~400 more threads here.
    assert during - before <= 2, f"{during - before} threads for 400 idle connections"
    assert took < 2.0
    assert stored_total(server.handler.config.db_path) == 8
    assert wait_for(lambda: threading.active_count() <= before + 2)


def test_a_request_has_one_deadline_however_slowly_its_bytes_trickle(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(request_timeout=1.0, capture_raw=False)
    with socket.create_connection(server.address, timeout=5) as slow:
        opened = time.monotonic()
        slow.sendall(b"POST /v1/report HTTP/1.1\r\n")
        answer = b""
        closed = False
        for n in range(40):  # a header line every 0.1 s: each read alone is quick
            closed, data = closed_within(slow, 0.1)
            answer += data
            if closed:
                break
            with contextlib.suppress(OSError):
                slow.sendall(b"X-Line-%d: y\r\n" % n)
        lifetime = time.monotonic() - opened
    assert closed, "the connection was still open after 4 s"
    assert 0.9 <= lifetime < 1.8, lifetime
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
    # An idle connection is closed at its deadline too, without an answer.
    with socket.create_connection(server.address, timeout=5) as idle:
        closed, data = closed_within(idle, 2.0)
    assert closed and data == b""
    assert stored_total(server.handler.config.db_path) == 0


def test_a_keep_alive_connection_gets_a_fresh_deadline_per_request(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(request_timeout=1.0, capture_raw=False)
    with socket.create_connection(server.address, timeout=5) as sock:
        for segment in range(3):  # 3 requests over ~1.8 s on one connection
            time.sleep(0.6)
            sock.sendall(report_request(segment, close=False))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert stored_total(server.handler.config.db_path) == 3


def test_connections_over_the_cap_are_answered_503_at_once(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(max_connections=20, capture_raw=False)
    assert server.max_connections == 20
    with connections(server, 20):
        assert wait_for(lambda: server.open_connections == 20)
        with socket.create_connection(server.address, timeout=5) as extra:
            started = time.monotonic()
            answer = read_all(extra, 2.0)
            assert time.monotonic() - started < 1.0
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
        assert b"Retry-After: 1\r\n" in answer and b"Connection: close\r\n" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "overloaded"
    assert wait_for(lambda: server.open_connections == 0)
    assert SyncClient(base_url=server.url, k=8).send_report(1, EPOCH).status == 200


@pytest.fixture
def big_bundle(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.bundle"
    path.write_bytes(os.urandom(16 * 1024 * 1024))
    return path


def test_the_bundle_is_streamed_and_clients_that_never_read_are_dropped(
    start_server: Callable[..., SyncServer], big_bundle: Path
) -> None:
    server = start_server(bundle_path=big_bundle, request_timeout=1.0, capture_raw=False)
    size = big_bundle.stat().st_size
    request = b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\n\r\n"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        with connections(server, 8) as stuck:
            for sock in stuck:  # ask for 8 x 16 MiB and never read a byte
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(request)
            time.sleep(1.0)
            # Reading the file whole per request (the old server) means >= 128 MiB here.
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"
            # Nothing taken for request_timeout: each is dropped, its file closed.
            assert wait_for(lambda: server.open_connections == 0, 6.0)
    finally:
        tracemalloc.stop()
    # A client that reads gets every byte, in order.
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"GET /v1/bundle HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % size in head
    assert hashlib.sha256(body).digest() == hashlib.sha256(big_bundle.read_bytes()).digest()
    assert SyncClient(base_url=server.url, k=8).fetch_bundle() == big_bundle.read_bytes()


def test_pipelined_requests_are_answered_in_order_and_each_is_captured(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(
            report_request(1, close=False)
            + b"GET /nope HTTP/1.1\r\n\r\n"
            + report_request(2, close=True)
        )
        answer = read_all(sock)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"404", b"200"]
    assert len(server.captured_requests()) == 3
    assert stored_total(server.handler.config.db_path) == 2


def test_expect_100_continue_gets_an_interim_answer_before_the_body(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(capture_raw=False)
    body = report_body(4)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(
            b"POST /v1/report HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Type: "
            + REPORT_CONTENT_TYPE.encode()
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert read_all(sock).startswith(b"HTTP/1.1 200 ")
    assert stored_total(server.handler.config.db_path) == 1


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/2.0\r\n\r\n", b"505"),
        (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", b"400"),
        (b"GET  / HTTP/1.1\r\n\r\n", b"400"),
    ],
)
def test_malformed_heads_get_a_json_error_and_a_closed_connection(
    start_server: Callable[..., SyncServer], raw: bytes, status: bytes
) -> None:
    server = start_server(capture_raw=False)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(raw)
        answer = read_all(sock, 5.0)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b" "), answer[:80]
    assert b"Connection: close" in head
    document = json.loads(body)
    assert document["error"] and document["message"]
