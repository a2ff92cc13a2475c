"""Oblivious HTTP end to end on loopback, with a recording TCP proxy on each hop:

    device (OhttpTransport) -> proxy A -> relay (ondevice_sync.relay) -> proxy B -> gateway server

The gateway server is a tiny test-only HTTP server that mounts ``OhttpGateway`` in front
of a real ``ReportHandler`` with a temporary count store (so these tests do not depend
on ``ondevice_sync.server`` mounting the gateway). Proxy A connects to the relay from
127.0.0.3, which is therefore "the device's address" as the relay sees it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ondevice_sync import ohttp
from ondevice_sync.client import SyncClient
from ondevice_sync.errors import (
    KeyConfigPinError,
    ServerUnavailableError,
    UnknownKeyIdError,
)
from ondevice_sync.gateway import OhttpGateway
from ondevice_sync.ohttp import GatewayKey, OhttpTransport, fetch_key_config
from ondevice_sync.protocol import (
    CONTENT_TABLE_VERSION,
    REPORT_PATH,
    REQUEST_HEADERS,
    WEEK_SECONDS,
    Report,
    encode_report,
)
from ondevice_sync.relay import OhttpRelay, RelayConfig
from ondevice_sync.relay import main as relay_main
from ondevice_sync.server import CountStore, ReportHandler, ServerConfig

from .conftest import EPOCH, NOW, stored_counts

DEVICE_ADDRESS = "127.0.0.3"
TARGET = "https://ondevice.example"

Router = Callable[[str, str, Mapping[str, str], bytes], tuple[int, Any, bytes]]


# --------------------------------------------------------------------------- test servers


@dataclass
class Flow:
    """One connection through a recording proxy: who connected, and every byte."""

    peer: str
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 recording every byte both ways, connection by connection.

    ``source`` binds the proxy's upstream connections to that local address.
    """

    def __init__(self, upstream: tuple[str, int], *, source: str | None = None) -> None:
        self._upstream = upstream
        self._source = source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.flows: list[Flow] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            flow = Flow(peer[0])
            self.flows.append(flow)
            thread = threading.Thread(target=self._flow, args=(client, flow), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _flow(self, client: socket.socket, flow: Flow) -> None:
        with client:
            source = None if self._source is None else (self._source, 0)
            try:
                upstream = socket.create_connection(self._upstream, 10, source)
            except OSError:
                return
            with upstream:
                pipes = [
                    threading.Thread(target=self._pipe, args=(client, upstream, flow.to_upstream)),
                    threading.Thread(target=self._pipe, args=(upstream, client, flow.to_client)),
                ]
                for pipe in pipes:
                    pipe.start()
                for pipe in pipes:
                    pipe.join()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket, record: bytearray) -> None:
        source.settimeout(10)
        try:
            while chunk := source.recv(65536):
                record += chunk
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

    def settle(self) -> None:
        for thread in list(self._threads):
            thread.join(timeout=10)

    def close(self) -> None:
        self._closed.set()
        self._acceptor.join()
        self._listener.close()
        self.settle()


class GatewayServer:
    """A test-only HTTP server: every request goes to ``router`` (replaceable)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                outer.requests += 1
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, answer_headers, answer = outer.router(
                    self.command, self.path, headers, body
                )
                self.send_response(status)
                for name, value in answer_headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(answer)
                self.close_connection = True

            do_GET = do_POST = _serve

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.address[1]}{path}"

    def close(self) -> None:
        self._http.shutdown()
        self._thread.join()
        self._http.server_close()


class Mount:
    """Routes the OHTTP paths to a gateway (replaceable: key rotation) and the rest plain."""

    def __init__(self, gateway: OhttpGateway, plain: Router) -> None:
        self.gateway = gateway
        self.plain = plain

    def __call__(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any, bytes]:
        if path.startswith(ohttp.OHTTP_PATH):
            return self.gateway.handle(method, path, headers, body)
        return self.plain(method, path, headers, body)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Stack:
    key: GatewayKey
    handler: ReportHandler
    mount: Mount
    gateway_server: GatewayServer
    relay: OhttpRelay
    proxy_a: RecordingProxy
    proxy_b: RecordingProxy
    relay_clock: Clock

    def transport(self, key: GatewayKey | None = None) -> OhttpTransport:
        config = (key or self.key).config
        return OhttpTransport(relay_url=self.proxy_a.url(ohttp.OHTTP_PATH),
                              key_config=config.encode(), key_config_pin=config.digest())

    def client(self, key: GatewayKey | None = None) -> SyncClient:
        return SyncClient(base_url=TARGET, transport=self.transport(key), k=8)


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[ReportHandler]:
    content = tmp_path / "content.json"
    content.write_text(json.dumps(
        {"version": CONTENT_TABLE_VERSION, "segments": [[f"i{s}"] for s in range(8)]}
    ))
    config = ServerConfig(k=8, db_path=tmp_path / "counts.db", port=0, content_path=content)
    store = CountStore(path=config.db_path, synchronous="NORMAL")
    yield ReportHandler(config=config, store=store, clock=lambda: NOW)
    store.close()


@pytest.fixture
def stack(handler: ReportHandler) -> Iterator[Stack]:
    if not _can_bind(DEVICE_ADDRESS):
        pytest.skip(f"cannot bind {DEVICE_ADDRESS} on this machine")
    key = GatewayKey.generate(1)
    mount = Mount(OhttpGateway(key, handler.handle), handler.handle)
    gateway_server = GatewayServer(mount)
    proxy_b = RecordingProxy(gateway_server.address)
    clock = Clock()
    relay = OhttpRelay(
        RelayConfig(gateway_url=proxy_b.url(ohttp.OHTTP_PATH), port=0, per_epoch=100),
        clock=clock,
    ).start()
    proxy_a = RecordingProxy(relay.address, source=DEVICE_ADDRESS)
    yield Stack(key, handler, mount, gateway_server, relay, proxy_a, proxy_b, clock)
    proxy_a.close()
    relay.close()
    proxy_b.close()
    gateway_server.close()


def split_http(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, headers, body


# --------------------------------------------------------------------------- the path


def test_reports_arrive_and_neither_side_sees_both_who_and_what(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    client = stack.client()
    with caplog.at_level(logging.DEBUG):
        for segment in range(8):
            assert client.send_report(segment, EPOCH).summary == "200 counted"
        table = client.fetch_content()
    assert table.items_for(6) == ("i6",)
    assert stored_counts(stack.handler.config.db_path) == {(EPOCH, s): 1 for s in range(8)}
    stack.proxy_a.settle()
    stack.proxy_b.settle()
    device_side, gateway_side = stack.proxy_a.flows, stack.proxy_b.flows
    assert len(device_side) == len(gateway_side) == 9

    # The relay never sees the report: no plaintext in either direction on either hop.
    plaintexts = [encode_report(Report(epoch=EPOCH, segment=s)) for s in range(8)]
    secrets_ = [*plaintexts, b"/v1/report", b"/v1/content", EPOCH.encode(), b"segment",
                b"vnd.ondevice", b"counted", b'"segments"', b"ondevice.example"]
    for flow in [*device_side, *gateway_side]:
        for secret in secrets_:
            assert secret not in flow.to_upstream and secret not in flow.to_client

    # Every encapsulated request is the same size: reports and the content fetch alike.
    requests = [split_http(bytes(flow.to_upstream)) for flow in device_side]
    assert {len(body) for _, _, body in requests} == {ohttp.REPORT_ENCAPSULATED_SIZE}
    assert len({len(flow.to_upstream) for flow in device_side}) == 1
    for first, headers, _ in requests:
        assert first == "POST /v1/ohttp HTTP/1.1"
        assert set(headers) == {"host", "content-type", "content-length", "accept", "connection"}
    # ...and every answer to a report is the same size too.
    assert len({len(flow.to_client) for flow in device_side[:8]}) == 1

    # The gateway never sees the device's address: the relay connects from its own
    # socket, forwards the same opaque bytes and adds no forwarding header.
    assert {flow.peer for flow in device_side} == {"127.0.0.1"}
    assert {flow.peer for flow in gateway_side} == {"127.0.0.1"} != {DEVICE_ADDRESS}
    forwarded = [split_http(bytes(flow.to_upstream)) for flow in gateway_side]
    assert sorted(body for *_, body in forwarded) == sorted(body for *_, body in requests)
    for first, headers, _ in forwarded:
        assert first == "POST /v1/ohttp HTTP/1.1"
        assert set(headers) == {"host", "content-type", "content-length"}
    for flow in gateway_side:
        raw = bytes(flow.to_upstream).lower()
        for marker in (DEVICE_ADDRESS.encode(), b"forwarded", b"via:", b"x-real-ip"):
            assert marker not in raw
    # The relay answers with the gateway's bytes and nothing about the gateway.
    for flow in device_side:
        first, headers, _ = split_http(bytes(flow.to_client))
        assert first == "HTTP/1.1 200 OK"
        assert set(headers) == {"content-type", "content-length", "cache-control", "connection"}
    # Nothing logged names the device.
    assert all(DEVICE_ADDRESS not in record.getMessage() for record in caplog.records)


def test_a_stale_key_config_is_refused_with_a_clear_error(stack: Stack) -> None:
    client = stack.client()
    assert client.send_report(1, EPOCH).summary == "200 counted"
    rotated = GatewayKey.generate(2)
    stack.mount.gateway = OhttpGateway(rotated, stack.handler.handle)
    with pytest.raises(UnknownKeyIdError, match="key configuration is stale"):
        client.send_report(2, EPOCH)
    assert stored_counts(stack.handler.config.db_path) == {(EPOCH, 1): 1}
    # The old pin no longer matches what the gateway serves; the new pin does.
    keys_url = stack.gateway_server.url(ohttp.OHTTP_KEYS_PATH)
    with pytest.raises(KeyConfigPinError, match="matches the pinned digest"):
        fetch_key_config(keys_url, stack.key.config.digest())
    fresh = fetch_key_config(keys_url, rotated.config.digest())
    assert fresh == rotated.config
    assert stack.client(rotated).send_report(2, EPOCH).summary == "200 counted"


def test_a_wrong_key_config_is_refused_before_anything_is_sent(stack: Stack) -> None:
    attacker = GatewayKey.generate(1)
    pin = stack.key.config.digest()
    with pytest.raises(KeyConfigPinError, match="refusing"):
        OhttpTransport(relay_url=stack.proxy_a.url(ohttp.OHTTP_PATH),
                       key_config=attacker.config, key_config_pin=pin)
    impostor = GatewayServer(OhttpGateway(attacker, stack.handler.handle).handle)
    try:
        with pytest.raises(KeyConfigPinError, match="refusing to use them"):
            fetch_key_config(impostor.url(ohttp.OHTTP_KEYS_PATH), pin)
    finally:
        impostor.close()
    assert stack.proxy_a.flows == [] and stack.gateway_server.requests == 0


# --------------------------------------------------------------------------- the relay


def _post(address: tuple[str, int], body: bytes, *, source: str = "127.0.0.1",
          headers: dict[str, str] | None = None, method: str = "POST",
          path: str = ohttp.OHTTP_PATH) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*address, timeout=10, source_address=(source, 0))
    try:
        sent = {"Content-Type": ohttp.REQUEST_CONTENT_TYPE} if headers is None else headers
        connection.request(method, path, body=body, headers=sent)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def _report_request(transport: OhttpTransport, segment: int) -> bytes:
    enc_request, _ = transport.encapsulate(
        "POST", TARGET + REPORT_PATH, dict(REQUEST_HEADERS[REPORT_PATH]),
        encode_report(Report(epoch=EPOCH, segment=segment)),
    )
    return enc_request


@pytest.fixture
def gateway(handler: ReportHandler) -> Iterator[tuple[GatewayKey, GatewayServer]]:
    key = GatewayKey.generate(1)
    server = GatewayServer(Mount(OhttpGateway(key, handler.handle), handler.handle))
    yield key, server
    server.close()


def test_the_relay_limits_each_address_per_epoch(
    handler: ReportHandler, gateway: tuple[GatewayKey, GatewayServer]
) -> None:
    if not (_can_bind("127.0.0.2") and _can_bind("127.0.0.4")):
        pytest.skip("cannot bind extra loopback addresses")
    key, server = gateway
    clock = Clock()
    config = RelayConfig(gateway_url=server.url(ohttp.OHTTP_PATH), port=0, per_epoch=3)
    transport = OhttpTransport(relay_url="http://unused.example/v1/ohttp",
                               key_config=key.config, key_config_pin=key.config.digest())
    with OhttpRelay(config, clock=clock).start() as relay:
        statuses = [_post(relay.address, _report_request(transport, 0), source="127.0.0.2")[0]
                    for _ in range(3)]
        assert statuses == [200, 200, 200]
        status, headers, body = _post(relay.address, _report_request(transport, 0),
                                      source="127.0.0.2")
        assert status == 429 and json.loads(body)["error"] == "rate_limited"
        assert 0 < int(headers["retry-after"]) <= WEEK_SECONDS
        assert server.requests == 3  # the refused request never reached the gateway
        assert _post(relay.address, _report_request(transport, 1), source="127.0.0.4")[0] == 200
        clock.now += WEEK_SECONDS  # the next epoch: a fresh allowance
        assert _post(relay.address, _report_request(transport, 2), source="127.0.0.2")[0] == 200
        # Through the client, the relay's 429 is "unavailable, retry later".
        for _ in range(3):
            _post(relay.address, _report_request(transport, 0))
        client = SyncClient(base_url=TARGET, transport=OhttpTransport(
            relay_url=relay.url, key_config=key.config, key_config_pin=key.config.digest()))
        with pytest.raises(ServerUnavailableError, match="429") as caught:
            client.send_report(3, EPOCH)
        assert caught.value.retryable
    assert sum(stored_counts(handler.config.db_path).values()) == 8


def test_the_relay_refuses_what_it_must_not_forward(
    gateway: tuple[GatewayKey, GatewayServer],
) -> None:
    _, server = gateway
    config = RelayConfig(gateway_url=server.url(ohttp.OHTTP_PATH), port=0, per_epoch=100)
    with OhttpRelay(config).start() as relay:
        status, headers, _ = _post(relay.address, b"", method="GET", headers={})
        assert (status, headers["allow"]) == (405, "POST")
        assert _post(relay.address, b"x", path="/elsewhere")[0] == 404
        status, _, body = _post(relay.address, b"x", headers={"Content-Type": "text/plain"})
        assert (status, json.loads(body)["error"]) == (415, "unsupported_media_type")
        assert _post(relay.address, b"")[0] == 400
        status, headers, body = _post(relay.address, bytes(2000))
        assert (status, json.loads(body)["error"]) == (413, "too_large")
        assert set(headers) == {"content-type", "content-length", "cache-control", "connection"}
        with socket.create_connection(relay.address, timeout=10) as sock:
            sock.sendall(b"POST /v1/ohttp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: message/ohttp-req\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 411 ")
        with socket.create_connection(relay.address, timeout=10) as sock:
            sock.sendall(b"POST /v1/ohttp HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: message/ohttp-req\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 411 ")
        with socket.create_connection(relay.address, timeout=10) as sock:
            sock.sendall(b"POST /v1/ohttp HTTP/1.1\r\n" + b"X: " + b"a" * 9000 + b"\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 431 ")
        assert server.requests == 0
        # Garbage that is well framed goes through: only the gateway can judge it.
        status, _, body = _post(relay.address, b"\x01\x00\x20\x00\x01\x00\x01" + bytes(60))
        assert (status, json.loads(body)["error"]) == (400, "decapsulation_failed")
        assert server.requests == 1


def test_each_request_has_one_deadline(gateway: tuple[GatewayKey, GatewayServer]) -> None:
    _, server = gateway
    config = RelayConfig(gateway_url=server.url(ohttp.OHTTP_PATH), port=0, deadline=1.0)
    with OhttpRelay(config).start() as relay, \
            socket.create_connection(relay.address, timeout=10) as sock:
        started = time.monotonic()
        # A client dripping its head byte by byte for 0.8 s: a timeout per read would
        # let it hold the worker until 1.8 s; the one deadline answers at 1.0 s.
        for byte in b"POST /v1/ohttp HTTP/1.1\r\n"[:20]:
            sock.sendall(bytes((byte,)))
            time.sleep(0.04)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 1.5

    def slow(method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[
        int, list[tuple[str, str]], bytes
    ]:
        time.sleep(1.5)
        return 200, [("Content-Type", ohttp.RESPONSE_CONTENT_TYPE)], b"late"

    sleepy = GatewayServer(slow)
    try:
        config = RelayConfig(gateway_url=sleepy.url(ohttp.OHTTP_PATH), port=0, deadline=0.5)
        with OhttpRelay(config).start() as relay:
            started = time.monotonic()
            status, _, body = _post(relay.address, b"\x01" * 60)
            assert (status, json.loads(body)["error"]) == (504, "gateway_timeout")
            assert time.monotonic() - started < 1.4
    finally:
        sleepy.close()


def test_an_unreachable_gateway_is_a_502_and_a_busy_relay_a_503() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]
    config = RelayConfig(gateway_url=f"http://127.0.0.1:{dead_port}/v1/ohttp", port=0,
                         workers=1, backlog=1, deadline=2.0)
    with OhttpRelay(config).start() as relay:
        status, _, body = _post(relay.address, b"\x01" * 60)
        assert (status, json.loads(body)["error"]) == (502, "bad_gateway")
        with socket.create_connection(relay.address, timeout=10) as busy:
            busy.sendall(b"POST /v1/ohttp HTTP/1.1\r\n")  # holds the only worker
            time.sleep(0.3)
            with socket.create_connection(relay.address, timeout=10) as waiting:
                waiting.sendall(b"POST /v1/ohttp HTTP/1.1\r\n")  # fills the backlog of one
                time.sleep(0.3)
                with socket.create_connection(relay.address, timeout=10) as third:
                    assert third.recv(4096).startswith(b"HTTP/1.1 503 ")
                assert waiting.recv(4096).startswith(b"HTTP/1.1 408 ")  # served, later


def test_the_relay_command_line(
    handler: ReportHandler, gateway: tuple[GatewayKey, GatewayServer], tmp_path: Path
) -> None:
    assert relay_main(["--gateway", "ftp://example/v1/ohttp", "--port", "0"]) == 2
    key, server = gateway
    ready = tmp_path / "relay.port"
    process = subprocess.Popen(
        [sys.executable, "-m", "ondevice_sync.relay", "--gateway", server.url(ohttp.OHTTP_PATH),
         "--port", "0", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        relay_url = f"http://127.0.0.1:{int(ready.read_text())}{ohttp.OHTTP_PATH}"
        client = SyncClient(base_url=TARGET, transport=OhttpTransport(
            relay_url=relay_url, key_config=key.config, key_config_pin=key.config.digest()))
        assert client.send_report(4, EPOCH).summary == "200 counted"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "relaying POST /v1/ohttp" in stderr
    assert stored_counts(handler.config.db_path) == {(EPOCH, 4): 1}
