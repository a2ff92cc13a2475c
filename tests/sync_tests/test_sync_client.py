"""The client: fixed headers, self-validation, transports, error mapping, backoff."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence

import pytest

from sync import errors
from sync.client import Backoff, HttpTransport, InProcessTransport, SyncClient
from sync.protocol import ALLOWED_REQUEST_HEADER_NAMES, MESSAGE_SIZE, REQUEST_HEADERS
from sync.server import SyncServer

from .conftest import EPOCH, stored_counts

HandlerResult = tuple[int, Sequence[tuple[str, str]], bytes]


def split_request(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value.strip()) for name, _, value in (ln.partition(":") for ln in lines[1:])]
    return lines[0], headers, body


def test_http_transport_sends_exactly_the_fixed_headers_and_nothing_else(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    client = SyncClient(base_url=server.url, k=8)
    for segment in (0, 7, 3):
        assert client.send_report(segment, EPOCH).status == 200
    with pytest.raises(errors.ServerRejectedError):
        client.fetch_content()  # none configured: 404, but the request itself is captured
    captured = server.captured_requests()
    assert len(captured) == 4
    host, port = server.address
    bodies = set()
    for raw in captured[:3]:
        line, headers, body = split_request(raw)
        assert line == "POST /v1/report HTTP/1.1"
        assert headers == [("Host", f"{host}:{port}"), *REQUEST_HEADERS["/v1/report"]]
        assert len(body) == MESSAGE_SIZE
        bodies.add(body)
    assert len(bodies) == 3
    line, headers, body = split_request(captured[3])
    assert line == "GET /v1/content HTTP/1.1" and body == b""
    assert headers == [("Host", f"{host}:{port}"), *REQUEST_HEADERS["/v1/content"]]
    for raw in captured:
        names = {name.lower() for name, _ in split_request(raw)[1]}
        assert names <= ALLOWED_REQUEST_HEADER_NAMES


def test_two_reports_of_the_same_segment_are_byte_identical_requests(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    client = SyncClient(base_url=server.url, k=8)
    client.send_report(2, EPOCH)
    SyncClient(base_url=server.url, k=8).send_report(2, EPOCH)
    first, second = server.captured_requests()
    assert first == second


def test_client_refuses_a_segment_outside_k_and_sends_nothing(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    client = SyncClient(base_url=server.url, k=4)
    for segment, epoch in ((4, EPOCH), (-1, EPOCH), (1, "2026-11-27"), (1, "2026-W60")):
        with pytest.raises(errors.ProtocolError):
            client.send_report(segment, epoch)
    with pytest.raises(errors.ProtocolError):
        client.send_report_bytes(b'{"version":2,"epoch":"2026-W48","segment":"01","id":"u"}')
    with pytest.raises(errors.UnsupportedVersionError):  # single-layer, never sent
        client.send_report_bytes(b'{"version":1,"epoch":"2026-W48","segment":"01"}')
    assert server.captured_requests() == []


def test_in_process_transport_drives_the_real_handler(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    client = SyncClient(base_url="http://in-process.invalid",
                        transport=InProcessTransport(server.handler.handle), k=8)
    answer = client.send_report(5, EPOCH)
    assert answer.status == 200 and answer.summary == "200 counted"
    assert stored_counts(server.handler.config.db_path) == {(EPOCH, 5): 1}
    assert server.captured_requests() == []  # no socket was involved


def test_base_url_path_prefix_is_kept_so_a_relay_needs_no_code_change() -> None:
    seen: list[tuple[str, str, dict[str, str]]] = []

    def relay(method: str, target: str, headers: Mapping[str, str], body: bytes) -> HandlerResult:
        seen.append((method, target, dict(headers)))
        return 200, [("Content-Type", "application/json")], b'{"status":"counted"}'

    client = SyncClient(base_url="https://ohttp-relay.example/ondevice/",
                        transport=InProcessTransport(relay))
    client.send_report(1, EPOCH)
    assert seen == [("POST", "/ondevice/v1/report",
                     {"Host": "ohttp-relay.example", **dict(REQUEST_HEADERS["/v1/report"])})]


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (400, errors.ServerRejectedError, False),
        (404, errors.ServerRejectedError, False),
        (429, errors.ServerUnavailableError, True),
        (503, errors.ServerUnavailableError, True),
        (302, errors.ServerRejectedError, False),
    ],
)
def test_error_statuses_map_to_rejected_or_retryable(
    status: int, error: type[errors.ServerError], retryable: bool
) -> None:
    def handler(method: str, target: str, headers: Mapping[str, str], body: bytes) -> HandlerResult:
        return status, [], b'{"error":"some_code","message":"why"}'

    client = SyncClient(base_url="http://stub.invalid", transport=InProcessTransport(handler))
    with pytest.raises(error) as caught:
        client.send_report(0, EPOCH)
    assert caught.value.status == status and caught.value.code == "some_code"
    assert caught.value.retryable is retryable


def test_a_dead_port_raises_a_transport_error_within_the_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = SyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2.0)
    started = time.monotonic()
    with pytest.raises(errors.TransportError) as caught:
        client.send_report(1, EPOCH)
    assert time.monotonic() - started < 2.0
    assert caught.value.retryable and not caught.value.maybe_delivered


def test_a_server_that_never_answers_raises_a_timeout_after_the_request_was_sent() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel accepts the connection; nobody ever reads or answers
        client = SyncClient(base_url=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(errors.TransportTimeout) as caught:
            client.send_report(1, EPOCH)
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3.0
    assert caught.value.maybe_delivered


def test_transports_refuse_headers_outside_the_allowed_set() -> None:
    with pytest.raises(errors.ForbiddenHeaderError):
        HttpTransport().request("GET", "http://127.0.0.1:9/v1/content",
                                {"Cookie": "id=1"}, b"", 1.0)
    with pytest.raises(errors.ForbiddenHeaderError):
        InProcessTransport(lambda *a: (200, [], b"")).request(
            "GET", "http://x/v1/content", {"User-Agent": "me"}, b"", 1.0)


@pytest.mark.parametrize(
    "url", ["ftp://x/", "http://user:pw@host/", "http://host/#frag", "not a url"]
)
def test_client_refuses_unusable_base_urls(url: str) -> None:
    with pytest.raises(errors.ConfigurationError):
        SyncClient(base_url=url)


def test_backoff_grows_exponentially_up_to_the_cap_with_bounded_jitter() -> None:
    backoff = Backoff(base=10.0, factor=2.0, cap=100.0, jitter=0.5)
    rng = random.Random(3)
    for attempt, ceiling in enumerate([10.0, 20.0, 40.0, 80.0, 100.0, 100.0]):
        for _ in range(50):
            delay = backoff.delay(attempt, rng=rng)
            assert ceiling * 0.5 <= delay <= ceiling
    assert backoff.delay(10_000, rng=rng) <= 100.0
    exact = Backoff(base=10.0, cap=100.0, jitter=0.0)
    assert [exact.delay(n) for n in range(5)] == [10.0, 20.0, 40.0, 80.0, 100.0]
    assert exact.next_attempt_at(1000.0, 2) == 1040.0
    assert Backoff().delay(0, rng=random.Random(1)) == Backoff().delay(0, rng=random.Random(1))
    with pytest.raises(errors.ConfigurationError):
        Backoff(base=0.0)
    with pytest.raises(errors.ConfigurationError):
        exact.delay(-1)
