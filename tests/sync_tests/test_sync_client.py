"""The client: fixed headers, self-validation, transports, error mapping, backoff, and
the caps on what it reads of an answer (issue 10, item 13)."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from ondevice_sync import errors
from ondevice_sync.client import (
    MAX_REPORT_ANSWER_SIZE,
    Backoff,
    HttpTransport,
    InProcessTransport,
    SyncClient,
)
from ondevice_sync.protocol import (
    ALLOWED_REQUEST_HEADER_NAMES,
    MAX_CONTENT_TABLE_SIZE,
    MESSAGE_SIZE,
    REQUEST_HEADERS,
)
from ondevice_sync.server import SyncServer

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


# --------------------------------------------------------------------------- answer caps


class RawServer:
    """One loopback connection answered with ``head`` and then ``body_size`` bytes (in
    64 KiB writes, until the client hangs up); ``sent`` counts what got out."""

    def __init__(self, head: bytes, body_size: int) -> None:
        self.head = head
        self.body_size = body_size
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def serve(self) -> None:
        sock, _ = self.listener.accept()
        with sock:
            sock.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                request += sock.recv(4096)
            head, _, body = request.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
            while length and len(body) < int(length.group(1)):  # read it all: no reset
                body += sock.recv(4096)
            chunk = b"x" * 65536
            try:
                sock.sendall(self.head)
                self.sent += len(self.head)
                while self.sent < len(self.head) + self.body_size:
                    self.sent += sock.send(chunk)
            except OSError:
                return  # the client hung up

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.listener.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[bytes, int], RawServer]]:
    made: list[RawServer] = []

    def make(head: bytes, body_size: int) -> RawServer:
        made.append(RawServer(head, body_size))
        return made[-1]

    yield make
    for server in made:
        server.close()


def test_an_endless_report_answer_is_cut_off_after_a_few_hundred_bytes(
    raw_server: Callable[[bytes, int], RawServer],
) -> None:
    # No Content-Length: the body runs until the server closes, here after 512 MiB. A 503
    # is a failure to retry; a 200 was counted, so it is an answer however long.
    server = raw_server(b"HTTP/1.1 503 Busy\r\nContent-Type: application/json\r\n\r\n", 512 << 20)
    with pytest.raises(errors.AnswerTooLargeError) as caught:
        SyncClient(base_url=server.url, k=8, timeout=10).send_report(1, EPOCH)
    assert caught.value.maybe_delivered and caught.value.status == 503
    server.close()
    # Reading up to 256 MiB (the old cap) would let the server push that much; now the
    # client stops after MAX_REPORT_ANSWER_SIZE and what sits in socket buffers is all.
    assert server.sent < 16 << 20, f"the server got {server.sent >> 20} MiB out"


def test_an_announced_length_over_the_cap_is_refused_before_the_body_is_read(
    raw_server: Callable[[bytes, int], RawServer],
) -> None:
    head = b"HTTP/1.1 502 Bad\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    server = raw_server(head % (MAX_REPORT_ANSWER_SIZE + 1), MAX_REPORT_ANSWER_SIZE + 1)
    with pytest.raises(errors.TransportError, match="over 1024 bytes"):
        SyncClient(base_url=server.url, k=8).send_report(1, EPOCH)


def test_a_huge_answer_head_is_refused(raw_server: Callable[[bytes, int], RawServer]) -> None:
    # 90 header fields of 60 KB: each within http.client's own limits, 5.4 MB in all.
    fields = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 60_000) for n in range(90))
    server = raw_server(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\n{}", 0)
    with pytest.raises(errors.TransportError) as caught:
        SyncClient(base_url=server.url, k=8).send_report(1, EPOCH)
    assert caught.value.maybe_delivered


def test_caps_are_per_request_kind_on_the_real_server(
    start_server: Callable[..., SyncServer], tmp_path: Path
) -> None:
    bundle = tmp_path / "catalog.bundle"
    bundle.write_bytes(bytes(range(256)) * 12)  # 3072 bytes
    server = start_server(bundle_path=bundle)
    assert SyncClient(base_url=server.url, max_bundle_bytes=3072).fetch_bundle() == (
        bundle.read_bytes()
    )
    with pytest.raises(errors.TransportError, match="over 3071 bytes"):
        SyncClient(base_url=server.url, max_bundle_bytes=3071).fetch_bundle()
    with pytest.raises(errors.ConfigurationError):
        SyncClient(base_url=server.url, max_bundle_bytes=0)


@pytest.mark.parametrize(
    ("path", "size", "kwargs"),
    [
        ("/v1/report", MAX_REPORT_ANSWER_SIZE + 1, {}),
        ("/v1/content", MAX_CONTENT_TABLE_SIZE + 1, {}),
        ("/v1/bundle", 2049, {"max_bundle_bytes": 2048}),
    ],
)
def test_answers_of_any_transport_are_checked_against_their_kinds_cap(
    path: str, size: int, kwargs: dict[str, int]
) -> None:
    # A report's 200 is an answer however long (it was counted): a 502 shows the cap.
    status = 502 if path == "/v1/report" else 200

    def handler(method: str, target: str, headers: Mapping[str, str], body: bytes) -> HandlerResult:
        assert target == path
        return status, [("Content-Type", "application/json")], b" " * size

    client = SyncClient(base_url="http://stub.invalid", transport=InProcessTransport(handler),
                        **kwargs)
    call = {
        "/v1/report": lambda: client.send_report(1, EPOCH),
        "/v1/content": client.fetch_content,
        "/v1/bundle": client.fetch_bundle,
    }[path]
    with pytest.raises(errors.TransportError) as caught:
        call()
    assert caught.value.maybe_delivered


HOSTILE = "<img src=x onerror=alert(1)>\n\x1b[31mcall +1-555-0100\x00"


def test_nothing_the_server_writes_reaches_a_report_answer_or_an_error_code() -> None:
    answers = iter([
        (200, json.dumps({"status": HOSTILE}).encode()),
        (403, json.dumps({"error": HOSTILE, "message": HOSTILE}).encode()),
        (503, json.dumps({"error": "store_unavailable", "message": "retry"}).encode()),
    ])

    def handler(method: str, target: str, headers: Mapping[str, str], body: bytes) -> HandlerResult:
        status, answer = next(answers)
        return status, [("Content-Type", "application/json")], answer

    client = SyncClient(base_url="http://stub.invalid", transport=InProcessTransport(handler))
    counted = client.send_report(1, EPOCH)
    assert (counted.status, counted.code, counted.summary) == (200, "counted", "200 counted")
    with pytest.raises(errors.ServerRejectedError) as refused:
        client.send_report(1, EPOCH)
    assert refused.value.code == "unknown" and refused.value.status == 403
    assert "<img" in str(refused.value)  # printable text is kept in the message...
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)  # ...no controls
    with pytest.raises(errors.ServerUnavailableError) as unavailable:
        client.send_report(1, EPOCH)
    assert unavailable.value.code == "store_unavailable"  # a well-formed code is kept


def test_a_counted_report_with_an_oversized_body_over_http_is_sent_not_failed() -> None:
    """A 200 whose body passes the report answer's cap (a proxy's banner) was counted:
    resending it would count it again, so it is an answer, not a failure."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from ondevice_sync.client import MAX_REPORT_ANSWER_SIZE, HttpTransport, SyncClient
    from ondevice_sync.protocol import Report, encode_report

    hits: list[bytes] = []

    class Banner(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.rfile.read(int(self.headers["Content-Length"])))
            body = b"<html>" + b"x" * (4 * MAX_REPORT_ANSWER_SIZE) + b"</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = HTTPServer(("127.0.0.1", 0), Banner)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = SyncClient(
            base_url=f"http://127.0.0.1:{server.server_address[1]}",
            transport=HttpTransport(),
            k=8,
        )
        answer = client.send_report_bytes(encode_report(Report(epoch="2026-W48", segment=3)))
        assert answer.status == 200
        assert len(hits) == 1
    finally:
        server.shutdown()
        server.server_close()
