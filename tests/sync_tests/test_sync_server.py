"""The real server stub on 127.0.0.1: strict input, counts only, noisy k-suppressed
statistics (publication timing, freezing and the attacks: test_sync_stats*.py)."""

from __future__ import annotations

import json
import logging
import math
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondevice_sync import errors
from ondevice_sync.client import SyncClient
from ondevice_sync.protocol import (
    MAX_BODY_SIZE,
    REPORT_CONTENT_TYPE,
    shift_epoch,
)
from ondevice_sync.server import ServerConfig, SyncServer

from .conftest import (
    EPOCH,
    EPOCH_CLOSES,
    NOW,
    Clock,
    assert_json_error,
    report_body,
    request,
    stored_counts,
    stored_total,
)


def test_valid_report_is_counted_once_committed(start_server: Callable[..., SyncServer]) -> None:
    server = start_server()
    status, _, body = request(server, "POST", "/v1/report", report_body(3))
    assert status == 200 and json.loads(body) == {"status": "counted"}
    assert stored_counts(server.handler.config.db_path) == {(EPOCH, 3): 1}


VALID = {report_body(s, shift_epoch(EPOCH, w)) for s in range(8) for w in (-1, 0, 1)}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
field_values = st.sampled_from(["2026-W48", "03", 1, "1", 3, None, "2026-W60", "99", "2026-W45"])


@st.composite
def malformed_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        body = draw(st.binary(max_size=MAX_BODY_SIZE))
    elif kind == 1:
        body = json.dumps(draw(json_values)).encode()
    elif kind == 2:  # the right keys (maybe plus one) with values of any type
        document = {name: draw(field_values | json_values) for name in
                    draw(st.lists(st.sampled_from(["version", "epoch", "segment", "user_id"]),
                                  unique=True, min_size=1))}
        body = json.dumps(document, separators=(",", ":")).encode()
    else:  # a valid report with bytes flipped, inserted or deleted
        mutated = bytearray(report_body(draw(st.integers(0, 7))))
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(mutated) - 1))
            action = draw(st.sampled_from(["flip", "insert", "delete"]))
            if action == "flip":
                mutated[at] = draw(st.integers(0, 255))
            elif action == "insert":
                mutated.insert(at, draw(st.integers(0, 255)))
            else:
                del mutated[at]
        body = bytes(mutated)
    if body in VALID:  # the oracle: the finite set of acceptable messages
        body = body + b" "
    return body[:MAX_BODY_SIZE]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=malformed_bodies())
def test_malformed_bodies_get_4xx_store_nothing_and_the_server_keeps_serving(
    shared_server: SyncServer, body: bytes
) -> None:
    db = shared_server.handler.config.db_path
    before = stored_total(db)
    status, _headers, answer = request(shared_server, "POST", "/v1/report", body)
    assert 400 <= status < 500
    assert json.loads(answer)["error"]
    assert stored_total(db) == before
    assert request(shared_server, "GET", "/v1/stats", headers={})[0] == 200


def test_server_still_counts_after_malformed_traffic(shared_server: SyncServer) -> None:
    db = shared_server.handler.config.db_path
    before = stored_total(db)
    assert request(shared_server, "POST", "/v1/report", report_body(1))[0] == 200
    assert stored_total(db) == before + 1


def test_oversized_content_length_is_refused_before_the_body_is_read(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(
            b"POST /v1/report HTTP/1.1\r\nHost: x\r\nContent-Type: "
            + REPORT_CONTENT_TYPE.encode()
            + b"\r\nContent-Length: 10000000\r\n\r\n"
            + b"x" * 100
        )
        # Only 100 of the announced 10 MB were sent: the answer must come anyway.
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in answer
    assert stored_total(server.handler.config.db_path) == 0
    assert request(server, "POST", "/v1/report", report_body(0))[0] == 200


def test_body_over_the_limit_gets_413(start_server: Callable[..., SyncServer]) -> None:
    server = start_server()
    code = assert_json_error(request(server, "POST", "/v1/report", b"{" * 2000), 413)
    assert code == errors.MessageSizeError.code


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "application/json"}, {"Content-Type": "text/plain"}, {}],
)
def test_wrong_or_missing_content_type_gets_415(
    start_server: Callable[..., SyncServer], headers: dict[str, str]
) -> None:
    server = start_server()
    assert_json_error(request(server, "POST", "/v1/report", report_body(1), headers), 415)
    assert stored_total(server.handler.config.db_path) == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/reports", 404),
        ("POST", "/", 404),
        ("GET", "/v1/report", 405),
        ("PUT", "/v1/report", 405),
        ("DELETE", "/v1/stats", 405),
        ("BREW", "/v1/report", 405),
        ("POST", "/v1/content", 405),
        ("POST", "/v1/report?user=1", 400),
    ],
)
def test_unknown_path_or_wrong_method_gets_a_4xx_json_error(
    start_server: Callable[..., SyncServer], method: str, path: str, status: int
) -> None:
    server = start_server()
    assert_json_error(request(server, method, path, report_body(2)), status)
    assert stored_total(server.handler.config.db_path) == 0


def test_chunked_missing_or_malformed_content_length_is_refused(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"POST /v1/report HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 411 ")
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"POST /v1/report HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 411 ")
    for length in ("4\u00b2".encode(), b"-1", b"1e3", b"47, 47"):
        with socket.create_connection(server.address, timeout=5) as sock:
            sock.sendall(b"POST /v1/report HTTP/1.1\r\nHost: x\r\nContent-Length: " + length
                         + b"\r\n\r\n" + report_body(1))
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 "), length
    assert request(server, "POST", "/v1/report", report_body(1))[0] == 200
    assert stored_total(server.handler.config.db_path) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (report_body(1, shift_epoch(EPOCH, 2)), "epoch_out_of_window"),
        (report_body(1, shift_epoch(EPOCH, -2)), "epoch_out_of_window"),
        (report_body(5), "segment_out_of_range"),
    ],
)
def test_far_epoch_or_segment_outside_k_is_refused(
    start_server: Callable[..., SyncServer], body: bytes, code: str
) -> None:
    server = start_server(k=5)
    assert assert_json_error(request(server, "POST", "/v1/report", body), 400) == code
    assert stored_total(server.handler.config.db_path) == 0
    for weeks in (-1, 0, 1):  # neighbouring weeks are fine
        assert request(server, "POST", "/v1/report", report_body(4, shift_epoch(EPOCH, weeks)))[
            0
        ] == 200


def test_twenty_concurrent_clients_times_200_reports_count_exactly(
    start_server: Callable[..., SyncServer],
) -> None:
    # All clients share 127.0.0.1: the per-address limit is off for this load test.
    server = start_server(capture_raw=False, rate_limit=0)
    clients, per_client = 20, 200
    failures: list[BaseException] = []

    def run(index: int) -> None:
        client = SyncClient(base_url=server.url, k=8, timeout=30)
        try:
            for i in range(per_client):
                client.send_report((index + i) % 8, EPOCH)
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    expected = Counter((EPOCH, (n + i) % 8) for n in range(clients) for i in range(per_client))
    assert stored_counts(server.handler.config.db_path) == dict(expected)


def test_stats_publish_debiased_cells_and_suppress_those_under_k(
    start_server: Callable[..., SyncServer],
) -> None:
    clock = Clock()
    server = start_server(k=3, k_threshold=20, capture_raw=False, rate_limit=0, clock=clock,
                          rng=random.Random(155))
    client = SyncClient(base_url=server.url, k=3)
    for segment, n in ((0, 120), (1, 30), (2, 5)):
        for _ in range(n):
            client.send_report(segment, EPOCH)
    clock.now = EPOCH_CLOSES
    status, _, body = request(server, "GET", f"/v1/stats?epoch={EPOCH}", headers={})
    stats = json.loads(body)
    assert status == 200 and stats["version"] == 2 and stats["k_threshold"] == 20
    # No exact total is published: only the sum of the noisy counts, labelled as such.
    assert "total" not in stats
    assert abs(stats["noisy_total"] - 155) <= 6 * math.sqrt(3 * 1.5)  # 6 SD of 3 noises
    published = {cell["segment"]: cell for cell in stats["segments"]}
    assert set(published) == {0} and stats["suppressed"] == [1, 2]
    assert published[0]["estimate"] > 120 and published[0]["standard_error"] > 0
    _, _, listing = request(server, "GET", "/v1/stats", headers={})
    assert json.loads(listing) == {"version": 2, "epochs": ["2026-W47", EPOCH]}
    before_store = request(server, "GET", "/v1/stats?epoch=2026-W40", headers={})
    assert assert_json_error(before_store, 404) == "no_data"
    assert request(server, "GET", "/v1/stats?epoch=soon", headers={})[0] == 400
    assert request(server, "GET", "/v1/stats?epoch=2026-W48&x=1", headers={})[0] == 400


def test_content_is_the_same_bytes_for_everyone_and_the_bundle_is_served_as_is(
    start_server: Callable[..., SyncServer], tmp_path: Path
) -> None:
    content = tmp_path / "content.json"
    content.write_text(json.dumps({"version": 2, "segments": [["a", "b"], [], ["c"]]}, indent=2))
    bundle = tmp_path / "catalog.bundle"
    bundle.write_bytes(bytes(range(256)) * 10)
    server = start_server(k=3, content_path=content, bundle_path=bundle)
    first = request(server, "GET", "/v1/content", headers={})
    second = request(server, "GET", "/v1/content", headers={"Accept": "*/*"})
    assert first[0] == 200 and first[2] == second[2]
    table = SyncClient(base_url=server.url, k=3).fetch_content()
    assert table.rows == (("a", "b"), (), ("c",)) and table.k == 3
    config = server.handler.config
    assert (table.epsilon_inf, table.epsilon_1) == (config.epsilon_inf, config.epsilon_1)
    assert request(server, "GET", "/v1/bundle", headers={})[2] == bundle.read_bytes()


def test_missing_content_and_bundle_answer_404(start_server: Callable[..., SyncServer]) -> None:
    server = start_server()
    assert_json_error(request(server, "GET", "/v1/content", headers={}), 404)
    assert_json_error(request(server, "GET", "/v1/bundle", headers={}), 404)


def test_content_file_with_the_wrong_number_of_segments_is_refused_at_start(
    tmp_path: Path,
) -> None:
    content = tmp_path / "content.json"
    content.write_text(json.dumps({"version": 2, "segments": [["a"], ["b"]]}))
    with pytest.raises(errors.ConfigurationError):
        SyncServer(config=ServerConfig(k=3, db_path=tmp_path / "c.db", port=0,
                                       content_path=content))


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"version": 2, "segments": [["a"]], "epsilon_inf": 2.0}, "epsilon_inf differs"),
        ({"version": 2, "segments": [["a"]], "epsilon_1": 1.0}, "epsilon_1 differs"),
        ({"version": 1, "segments": [["a"]]}, "version 1 is not supported"),
    ],
)
def test_content_file_with_another_channel_or_the_old_version_is_refused_at_start(
    tmp_path: Path, document: dict[str, object], reason: str
) -> None:
    content = tmp_path / "content.json"
    content.write_text(json.dumps(document))
    with pytest.raises(errors.ConfigurationError, match=reason):
        SyncServer(config=ServerConfig(k=1, db_path=tmp_path / "c.db", port=0,
                                       content_path=content))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k_threshold": 0}, {"k": 0}, {"k": 65}, {"max_body": 4096},
        {"epsilon_inf": 0.0}, {"epsilon_1": math.inf}, {"central_epsilon": -1.0},
        {"central_epsilon": math.nan}, {"grace": -1.0}, {"grace": math.inf},
        {"rate_limit": -1}, {"rate_limit": True}, {"rate_limit": 2.5},
        {"rate_limit_tracked": 0},
    ],
)
def test_bad_configuration_is_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    settings_: dict[str, object] = {"k": 8, "db_path": tmp_path / "c.db"}
    settings_.update(kwargs)
    with pytest.raises(errors.ConfigurationError):
        ServerConfig(**settings_)  # type: ignore[arg-type]


def test_nothing_logged_or_stored_carries_the_client_address(
    start_server: Callable[..., SyncServer],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server(capture_raw=False)
    host, port = server.address
    with socket.create_connection((host, port), timeout=5) as sock:
        client_port = str(sock.getsockname()[1])
        body = report_body(1)
        sock.sendall(
            b"POST /v1/report HTTP/1.1\r\nHost: x\r\nContent-Type: "
            + REPORT_CONTENT_TYPE.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")
    out, err = capfd.readouterr()
    assert client_port not in caplog.text + out + err
    db = server.handler.config.db_path
    server.close()
    for path in db.parent.glob(db.name + "*"):
        assert client_port.encode() not in path.read_bytes()
        assert b"127.0.0.1" not in path.read_bytes()


def test_time_passing_moves_the_accepted_epoch_window(
    start_server: Callable[..., SyncServer],
) -> None:
    now = [NOW]
    server = start_server(clock=lambda: now[0])
    assert request(server, "POST", "/v1/report", report_body(1))[0] == 200
    now[0] += 3 * 7 * 86400
    assert request(server, "POST", "/v1/report", report_body(1))[0] == 400


def test_server_keeps_answering_when_keep_alive_connections_hold_every_worker(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(workers=2, capture_raw=False)
    body = report_body(6)
    keep_alive = (
        b"POST /v1/report HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + REPORT_CONTENT_TYPE.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    held = [socket.create_connection(server.address, timeout=5) for _ in range(3)]
    try:
        for sock in held:  # each connection stays open, occupying a worker
            sock.sendall(keep_alive)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert SyncClient(base_url=server.url, k=8, timeout=2).send_report(6, EPOCH).status == 200
        for sock in held:  # and the held connections still work
            sock.sendall(keep_alive)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in held:
            sock.close()
    assert stored_counts(server.handler.config.db_path) == {(EPOCH, 6): 7}


def test_a_store_that_cannot_commit_answers_503_and_the_client_may_retry(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(capture_raw=False)
    server.store.close()
    status, _, body = server.handler.handle(
        "POST", "/v1/report", {"Content-Type": REPORT_CONTENT_TYPE}, report_body(1)
    )
    assert status == 503 and json.loads(body)["error"] == "store_unavailable"
    with pytest.raises(errors.ServerUnavailableError) as caught:
        SyncClient(base_url=server.url, k=8).send_report(1, EPOCH)
    assert caught.value.retryable
    assert stored_total(server.handler.config.db_path) == 0
