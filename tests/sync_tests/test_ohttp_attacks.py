"""Attacks on the Oblivious HTTP path by a malicious relay, gateway or client.

Each test is a concrete attack; the ones marked *regression* failed before the fix they
name. Everything runs in process or on loopback and takes well under ten seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from ondevice_sync import ohttp
from ondevice_sync.client import InProcessTransport, SyncClient
from ondevice_sync.errors import ConfigurationError, OhttpRejectedError, ResponseDecryptionError
from ondevice_sync.gateway import REPLAYED_CODE, OhttpGateway, ReplayCache
from ondevice_sync.ohttp import GatewayKey, OhttpTransport
from ondevice_sync.protocol import REPORT_PATH, REQUEST_HEADERS, WEEK_SECONDS, Report, encode_report
from ondevice_sync.relay import OhttpRelay, RelayConfig
from ondevice_sync.server import CountStore, ReportHandler, ServerConfig

from .conftest import EPOCH, NOW, stored_counts

TARGET = "https://ondevice.example"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> GatewayKey:
    return GatewayKey.generate(1)


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[ReportHandler]:
    config = ServerConfig(k=8, db_path=tmp_path / "counts.db", port=0)
    store = CountStore(path=config.db_path, synchronous="NORMAL")
    yield ReportHandler(config=config, store=store, clock=lambda: NOW)
    store.close()


def _transport(key: GatewayKey, inner: Any = None) -> OhttpTransport:
    return OhttpTransport(relay_url="https://relay.example/v1/ohttp", key_config=key.config,
                          key_config_pin=key.config.digest(), inner_transport=inner)


def _report(key: GatewayKey, segment: int) -> tuple[bytes, ohttp.ClientContext]:
    return _transport(key).encapsulate(
        "POST", TARGET + REPORT_PATH, dict(REQUEST_HEADERS[REPORT_PATH]),
        encode_report(Report(epoch=EPOCH, segment=segment)),
    )


def _post(gateway: OhttpGateway, body: bytes) -> tuple[int, dict[str, str], bytes]:
    status, headers, answer = gateway.handle_encapsulated(ohttp.REQUEST_CONTENT_TYPE, body)
    return status, dict(headers), answer


# --------------------------------------------------------------------------- malicious relay


def test_a_replayed_request_is_refused_and_never_counted(
    handler: ReportHandler, key: GatewayKey
) -> None:
    """Regression: the relay posting one captured report N times got it counted N times
    (and could then read the device's report off the cell that grew by N)."""
    calls = []

    def inner(method: str, path: str, headers: Mapping[str, str], body: bytes) -> Any:
        calls.append(path)
        return handler.handle(method, path, headers, body)

    gateway = OhttpGateway(key, inner, clock=Clock())
    enc_request, context = _report(key, 3)
    status, headers, sealed = _post(gateway, enc_request)
    assert status == 200 and headers["Content-Type"] == ohttp.RESPONSE_CONTENT_TYPE
    assert ohttp.decode_bhttp_response(context.open_response(sealed)).status == 200
    replays = [_post(gateway, enc_request) for _ in range(20)]
    assert stored_counts(handler.config.db_path) == {(EPOCH, 3): 1}
    assert calls == [REPORT_PATH]  # the handler never saw a copy
    for status, headers, body in replays:
        assert status == 400 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["error"] == REPLAYED_CODE == "replayed_request"
    # The answer to a replay says nothing about the report: the same bytes for another
    # report, another segment, and whatever the first copy was answered.
    other, _ = _report(key, 5)
    assert _post(gateway, other)[0] == 200
    assert _post(gateway, other) == replays[0]
    refused = encode_report(Report(epoch="2020-W01", segment=1))
    stale, _ = _transport(key).encapsulate(
        "POST", TARGET + REPORT_PATH, dict(REQUEST_HEADERS[REPORT_PATH]), refused
    )
    assert _post(gateway, stale)[0] == 200  # answered (inside: 400 out of window)
    assert _post(gateway, stale) == replays[0]


def test_the_device_is_told_clearly_when_its_request_was_replayed(
    handler: ReportHandler, key: GatewayKey
) -> None:
    gateway = OhttpGateway(key, handler.handle, clock=Clock())
    seen: list[bytes] = []

    class ReplayingRelay(InProcessTransport):
        """Forwards every request twice and hands the device the second answer."""

        def request(self, method: str, url: str, headers: Mapping[str, str], body: bytes,
                    timeout: float) -> Any:
            seen.append(body)
            super().request(method, url, headers, body, timeout)
            return super().request(method, url, headers, body, timeout)

    client = SyncClient(base_url=TARGET, transport=_transport(key, ReplayingRelay(gateway.handle)),
                        k=8)
    with pytest.raises(OhttpRejectedError, match="replayed_request") as caught:
        client.send_report(2, EPOCH)
    assert caught.value.code == REPLAYED_CODE and caught.value.status == 400
    assert stored_counts(handler.config.db_path) == {(EPOCH, 2): 1}


def test_tampered_copies_do_not_poison_the_replay_cache(
    handler: ReportHandler, key: GatewayKey
) -> None:
    gateway = OhttpGateway(key, handler.handle, clock=Clock())
    enc_request, _ = _report(key, 4)
    # X25519 ignores the top bit of a public key: a relay flipping it gets a different
    # `enc` for the same Diffie-Hellman value. HPKE binds the exact bytes, so it fails.
    malleated = bytearray(enc_request)
    malleated[7 + 31] ^= 0x80
    truncated = enc_request[:-1]
    flipped = bytearray(enc_request)
    flipped[-1] ^= 1
    for copy in (bytes(malleated), truncated, bytes(flipped)):
        status, _, body = _post(gateway, copy)
        assert (status, json.loads(body)["error"]) == (400, "decapsulation_failed")
    assert len(gateway.replay_cache) == 0  # only requests that decrypt are recorded
    assert _post(gateway, enc_request)[0] == 200  # the genuine request still counts
    assert stored_counts(handler.config.db_path) == {(EPOCH, 4): 1}


def test_replays_are_refused_for_the_whole_retention_then_forgotten() -> None:
    clock = Clock()
    cache = ReplayCache(retention=3 * WEEK_SECONDS, capacity=10, clock=clock)
    assert cache.admit(b"a" * 32) == "fresh"
    for elapsed in (1.0, WEEK_SECONDS, 3 * WEEK_SECONDS - 1):
        clock.now = NOW + elapsed
        assert cache.admit(b"a" * 32) == "replayed"
    clock.now = NOW + 3 * WEEK_SECONDS + 3 * WEEK_SECONDS / 21 + 1  # retention + one slice
    assert len(cache) == 0
    assert cache.admit(b"a" * 32) == "fresh"
    # A clock that goes back never drops anything early.
    clock.now = NOW
    assert cache.admit(b"a" * 32) == "replayed"


def test_a_full_replay_cache_fails_closed_with_a_clear_retryable_status(
    handler: ReportHandler, key: GatewayKey, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    gateway = OhttpGateway(key, handler.handle, replay_capacity=2, clock=clock)
    first, _ = _report(key, 1)
    assert _post(gateway, first)[0] == 200
    assert _post(gateway, _report(key, 1)[0])[0] == 200
    with caplog.at_level(logging.WARNING):
        status, headers, body = _post(gateway, _report(key, 1)[0])
        assert _post(gateway, _report(key, 1)[0])[0] == 503
    assert (status, json.loads(body)["error"]) == (503, "replay_cache_full")
    assert 0 < int(headers["Retry-After"]) <= 3 * WEEK_SECONDS + WEEK_SECONDS
    assert sum("replay cache" in r.getMessage() for r in caplog.records) == 1  # once
    assert _post(gateway, first)[1] != headers and json.loads(_post(gateway, first)[2])[
        "error"] == REPLAYED_CODE  # a full cache still refuses the replays it holds
    assert stored_counts(handler.config.db_path) == {(EPOCH, 1): 2}
    clock.now += 4 * WEEK_SECONDS  # everything expired: room again
    assert _post(gateway, _report(key, 1)[0])[0] == 200


def test_concurrent_copies_of_one_request_are_counted_once(
    handler: ReportHandler, key: GatewayKey
) -> None:
    gateway = OhttpGateway(key, handler.handle)
    enc_request, _ = _report(key, 6)
    statuses: list[int] = []
    start = threading.Barrier(8)

    def post() -> None:
        start.wait()
        statuses.append(_post(gateway, enc_request)[0])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] + [400] * 7
    assert stored_counts(handler.config.db_path) == {(EPOCH, 6): 1}


def test_answers_swapped_between_two_devices_do_not_open(key: GatewayKey) -> None:
    gateway = OhttpGateway(key, lambda *args: (200, [("Content-Type", "text/plain")], b"ok"))
    request_a, context_a = _report(key, 1)
    request_b, context_b = _report(key, 2)
    _, _, answer_a = _post(gateway, request_a)
    _, _, answer_b = _post(gateway, request_b)
    assert len(answer_a) == len(answer_b)
    with pytest.raises(ResponseDecryptionError, match="not the answer to this request"):
        context_a.open_response(answer_b)
    with pytest.raises(ResponseDecryptionError):
        context_b.open_response(answer_a)
    assert ohttp.decode_bhttp_response(context_a.open_response(answer_a)).content == b"ok"


def test_the_replay_cache_settings_are_checked() -> None:
    for retention in (0, -1, float("nan"), float("inf"), True, 53 * WEEK_SECONDS):
        with pytest.raises(ConfigurationError, match="retention"):
            ReplayCache(retention=retention)
    for capacity in (0, -5, True, 1.5):
        with pytest.raises(ConfigurationError, match="capacity"):
            ReplayCache(capacity=capacity)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- skipping the relay


def test_only_the_configured_relays_may_post_encapsulated_requests(
    handler: ReportHandler, key: GatewayKey
) -> None:
    """Regression: a device posting straight to the gateway skipped the relay's
    per-address limit (and the server's, which never applies behind the gateway)."""
    gateway = OhttpGateway(key, handler.handle, relays=["192.0.2.7", "2001:db8:1::/64"])

    def post(client: str | None) -> tuple[int, str]:
        enc_request, _ = _report(key, 0)
        status, _, body = gateway.handle(
            "POST", ohttp.OHTTP_PATH, {"content-type": ohttp.REQUEST_CONTENT_TYPE},
            enc_request, client=client,
        )
        return status, ("" if status == 200 else json.loads(body)["error"])

    assert post("192.0.2.7") == (200, "")
    assert post("::ffff:192.0.2.7") == (200, "")
    assert post("2001:db8:1::99") == (200, "")
    for stranger in ("198.51.100.7", "2001:db8:2::1", None, "relay.example", ""):
        assert post(stranger) == (403, "not_a_relay")
    assert gateway.handle("GET", ohttp.OHTTP_KEYS_PATH, {}, b"", client="198.51.100.7")[0] == 200
    assert stored_counts(handler.config.db_path) == {(EPOCH, 0): 3}
    with pytest.raises(ConfigurationError):
        OhttpGateway(key, handler.handle, relays=["not an address"])
    with pytest.raises(ConfigurationError):
        OhttpGateway(key, handler.handle, relays="192.0.2.7")  # a string, not a list
    with pytest.raises(ConfigurationError):
        OhttpGateway(key, handler.handle, relays=[])


# ------------------------------------------------------------------- hostile clients at the relay


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


class _Gateway:
    """A loopback stand-in for the gateway: counts requests, answers a fixed 200."""

    def __init__(self) -> None:
        self.requests = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with sock:
                sock.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.requests += 1
                    body = b"sealed"
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: message/ohttp-res\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                                 + body)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{ohttp.OHTTP_PATH}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()


@pytest.fixture
def fake_gateway() -> Iterator[_Gateway]:
    gateway = _Gateway()
    yield gateway
    gateway.close()


def _raw(address: tuple[str, int], data: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(address, timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(data)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
    return answer


def test_one_address_cannot_hold_every_worker(fake_gateway: _Gateway) -> None:
    """Regression: one client opening workers + backlog idle connections (slowloris)
    locked every other device out of the relay."""
    if not (_can_bind("127.0.0.2") and _can_bind("127.0.0.3")):
        pytest.skip("cannot bind extra loopback addresses")
    config = RelayConfig(gateway_url=fake_gateway.url, port=0, workers=3, backlog=3,
                         connections_per_address=2, deadline=2.0)
    with OhttpRelay(config).start() as relay:
        hostile = []
        try:
            for _ in range(8):
                sock = socket.create_connection(relay.address, timeout=5,
                                                source_address=("127.0.0.2", 0))
                sock.sendall(b"POST /v1/ohttp HTTP/1.1\r\n")
                hostile.append(sock)
            time.sleep(0.2)
            refused = 0
            for sock in hostile[2:]:
                sock.settimeout(2)
                with contextlib.suppress(OSError):
                    refused += sock.recv(4096).startswith(b"HTTP/1.1 429 ")
            assert refused == 6
            started = time.monotonic()
            answer = _raw(relay.address, b"POST /v1/ohttp HTTP/1.1\r\nContent-Type: "
                          b"message/ohttp-req\r\nContent-Length: 3\r\n\r\nabc", "127.0.0.3")
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"sealed")
            assert time.monotonic() - started < 1.0  # not after the hostile deadlines
        finally:
            for sock in hostile:
                sock.close()
        # Closed connections are forgotten: the address may connect again.
        time.sleep(0.1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            answer = _raw(relay.address, b"POST /v1/ohttp HTTP/1.1\r\nContent-Type: "
                          b"message/ohttp-req\r\nContent-Length: 1\r\n\r\nx", "127.0.0.2")
            if not answer.startswith(b"HTTP/1.1 429 "):
                break
            time.sleep(0.1)
        assert answer.startswith(b"HTTP/1.1 200 ")
        # Nothing kept once every connection closed (the last one's handler thread may
        # still be finishing: give it a moment).
        deadline = time.monotonic() + 3
        while relay._server._open and time.monotonic() < deadline:
            time.sleep(0.02)
        assert relay._server._open == {}


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # Request smuggling: both framings, or a disguised Transfer-Encoding.
        (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 411),
        (b"Transfer-Encoding : chunked\r\nContent-Length: 3\r\n", 400),
        (b"Content-Length: 3\r\nContent-Length: 3\r\n", 411),
        (b"Content-Length: 3, 3\r\n", 400),
        (b"Content-Length: +3\r\n", 400),
        (b"Content-Length: \xd9\xa3\r\n", 400),  # a non-ASCII digit
        (b"Content-Length: 3\r\n Transfer-Encoding: chunked\r\n", 400),  # obs-fold
        (b"Content-Length: 3\nTransfer-Encoding: chunked\r\n", 400),  # bare LF
        (b"X: a\r\nTransfer-Encoding:\x0bchunked\r\nContent-Length: 3\r\n", 411),
    ],
)
def test_smuggling_attempts_are_refused_and_nothing_is_forwarded(
    fake_gateway: _Gateway, head: bytes, status: int
) -> None:
    config = RelayConfig(gateway_url=fake_gateway.url, port=0, deadline=2.0)
    with OhttpRelay(config).start() as relay:
        answer = _raw(relay.address, b"POST /v1/ohttp HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"message/ohttp-req\r\n" + head + b"\r\nabc")
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:60]
    assert fake_gateway.requests == 0


def test_hostile_input_never_reaches_the_logs_or_the_answers(
    fake_gateway: _Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    if not _can_bind("127.0.0.9"):
        pytest.skip("cannot bind extra loopback addresses")
    marker = b"SECRETMARKER"
    probes = [
        b"GET /v1/\xc3\xa9\xff" + marker + b" HTTP/1.1\r\n\r\n",  # non-ASCII path
        b"POST /v1/ohttp?" + marker + b" HTTP/1.1\r\n\r\n",
        b"POST /v1/ohttp HTTP/1.1\r\nX-" + marker + b": \r\n\x00\r\n\r\n",
        b"POST /v1/ohttp HTTP/9.9\r\n" + marker + b"\r\n\r\n",
        b"POST /v1/ohttp HTTP/1.1\r\nContent-Type: message/ohttp-req\r\nContent-Length: "
        + marker + b"\r\n\r\n",
        b"POST /v1/ohttp HTTP/1.1\r\nContent-Type: " + marker + b"\r\nContent-Length: 1\r\n\r\nx",
        b"POST /v1/ohttp HTTP/1.1\r\nContent-Type: message/ohttp-req\r\nContent-Length: 40"
        b"\r\n\r\n" + marker,  # the body stops short: 408 at the deadline
        b"\x16\x03\x01\x02\x00" + marker + b"\r\n\r\n",  # TLS to a plain port
        b"POST /v1/ohttp HTTP/1.1\r\n" + b"X: " + marker * 900 + b"\r\n\r\n",
    ]
    config = RelayConfig(gateway_url="http://127.0.0.1:9/v1/ohttp", port=0, deadline=1.0)
    with caplog.at_level(logging.DEBUG), OhttpRelay(config).start() as relay:
        answers = [_raw(relay.address, probe, "127.0.0.9") for probe in probes]
        # and an unreachable gateway, which the relay does log
        answers.append(_raw(relay.address, b"POST /v1/ohttp HTTP/1.1\r\nContent-Type: "
                            b"message/ohttp-req\r\nContent-Length: 12\r\n\r\n" + marker,
                            "127.0.0.9"))
    assert answers[-1].startswith(b"HTTP/1.1 502 ")
    statuses = [int(answer[9:12]) for answer in answers]
    assert statuses == [404, 404, 400, 505, 400, 415, 408, 400, 431, 502]
    text = "\n".join(record.getMessage() + str(record.exc_info) for record in caplog.records)
    assert "127.0.0.9" not in text and "SECRETMARKER" not in text
    for answer in answers:
        assert marker not in answer and b"127.0.0.9" not in answer


def test_a_gateway_answer_reaches_the_device_without_the_gateways_headers(
    fake_gateway: _Gateway,
) -> None:
    config = RelayConfig(gateway_url=fake_gateway.url, port=0, deadline=2.0)
    with OhttpRelay(config).start() as relay:
        connection = http.client.HTTPConnection(*relay.address, timeout=5)
        connection.request("POST", ohttp.OHTTP_PATH, body=b"abc",
                           headers={"Content-Type": ohttp.REQUEST_CONTENT_TYPE})
        answer = connection.getresponse()
        headers = {name.lower() for name, _ in answer.getheaders()}
        assert answer.read() == b"sealed"
        connection.close()
    assert headers == {"content-type", "content-length", "cache-control", "connection"}


def test_relay_connection_cap_is_checked() -> None:
    for bad in (0, -1, True, 70000):
        with pytest.raises(ConfigurationError, match="connections_per_address"):
            RelayConfig(gateway_url="http://127.0.0.1:1/v1/ohttp",
                        connections_per_address=bad)


def test_key_id_header_bytes_are_bound(key: GatewayKey) -> None:
    """A relay rewriting the header (another suite, another key id) gets nothing opened."""
    gateway = OhttpGateway(key, lambda *args: (200, [], b""))
    enc_request, _ = _report(key, 1)
    for header in (struct.pack(">BHHH", 1, 0x20, 1, 2), struct.pack(">BHHH", 2, 0x20, 1, 1)):
        status, _, body = _post(gateway, header + enc_request[7:])
        assert status == 400 and json.loads(body)["error"] == "unknown_key_id"
    assert len(gateway.replay_cache) == 0
