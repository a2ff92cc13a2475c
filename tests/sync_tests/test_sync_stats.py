"""Publication of ``/v1/stats``: nothing before an epoch closes, central noise drawn once
and frozen, no report counted for a published epoch, the count store's migration from
version 1, version 1 reports, and the per-address rate limit. (The attacks on the
publication: test_sync_stats_attacks.py.)"""

from __future__ import annotations

import json
import logging
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ondevice_sync import errors
from ondevice_sync.client import SyncClient
from ondevice_sync.privacy import DEFAULT_CENTRAL_EPSILON, Channel, estimate_noisy
from ondevice_sync.protocol import REPORT_CONTENT_TYPE, WEEK_SECONDS, epoch_start, shift_epoch
from ondevice_sync.server import (
    STATS_VERSION,
    STORE_VERSION,
    ServerConfig,
    SyncServer,
    closes_at,
    draw_noisy_counts,
)

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

DAY = 86400.0
PREVIOUS = shift_epoch(EPOCH, -1)  # the store's first epoch: EPOCH minus the window (1)
DOCUMENT_FIELDS = {
    "version", "epoch", "k", "epsilon_inf", "epsilon_1", "report_epsilon", "central_epsilon",
    "noise_standard_deviation", "k_threshold", "closed_at", "noisy_total", "segments",
    "suppressed",
}


def post(server: SyncServer, segment: int, epoch: str = EPOCH, source: str | None = None) -> int:
    """POST one report over HTTP; the status."""
    return request(server, "POST", "/v1/report", report_body(segment, epoch), source=source)[0]


def stats(server: SyncServer, epoch: str = EPOCH) -> tuple[int, dict[str, str], bytes]:
    return request(server, "GET", f"/v1/stats?epoch={epoch}", headers={})


def listing(server: SyncServer) -> list[str]:
    status, _, body = request(server, "GET", "/v1/stats", headers={})
    assert status == 200
    document = json.loads(body)
    assert document["version"] == STATS_VERSION == 2
    return list(document["epochs"])


def test_an_epoch_closes_when_no_report_can_arrive_plus_the_grace() -> None:
    # With epoch_window = 1 a report for EPOCH is accepted until the end of the week after
    # it: two weeks after its start. The default grace adds one day.
    start = epoch_start(EPOCH)
    assert closes_at(EPOCH, epoch_window=1, grace=DAY) == start + 2 * WEEK_SECONDS + DAY
    assert closes_at(EPOCH, epoch_window=1, grace=DAY) == EPOCH_CLOSES
    assert closes_at(EPOCH, epoch_window=0, grace=0.0) == epoch_start(shift_epoch(EPOCH, 1))
    assert closes_at(EPOCH, epoch_window=3, grace=60.0) == start + 4 * WEEK_SECONDS + 60


def test_nothing_is_published_before_the_epoch_closes_and_the_answer_says_when(
    start_server: Callable[..., SyncServer],
) -> None:
    clock = Clock()
    server = start_server(k=2, k_threshold=1, clock=clock, rng=random.Random(1))
    for segment in (0, 0, 1):
        assert post(server, segment) == 200
    last_accepted = epoch_start(EPOCH) + 2 * WEEK_SECONDS - 1
    clock.now = last_accepted
    assert post(server, 1) == 200  # the last second a report for EPOCH is counted
    for moment in (NOW, last_accepted, last_accepted + 1, EPOCH_CLOSES - 1):
        clock.now = moment
        answer = stats(server)
        assert assert_json_error(answer, 425) == "not_published"
        document = json.loads(answer[2])
        assert document["available_at"] == EPOCH_CLOSES
        assert "2026-12-08T00:00:00Z" in document["message"]
        assert int(answer[1]["retry-after"]) == math.ceil(EPOCH_CLOSES - moment)
        assert EPOCH not in listing(server)
        assert set(document) == {"error", "message", "available_at"}  # no numbers at all
    # During the grace period the epoch no longer takes reports, and is not published yet.
    clock.now = last_accepted + 1
    assert post(server, 0) == 400
    assert stored_total(server.handler.config.db_path) == 4
    # A future epoch is not published either.
    assert stats(server, shift_epoch(EPOCH, 5))[0] == 425
    clock.now = EPOCH_CLOSES
    status, _, body = stats(server)
    document = json.loads(body)
    assert status == 200 and set(document) == DOCUMENT_FIELDS
    assert document["version"] == STATS_VERSION and document["closed_at"] == EPOCH_CLOSES
    alpha = math.exp(-document["central_epsilon"])  # sqrt(2 alpha) / (1 - alpha)
    assert document["noise_standard_deviation"] == pytest.approx(
        math.sqrt(2 * alpha) / (1 - alpha)
    )
    assert listing(server) == [PREVIOUS, EPOCH]


def test_published_statistics_are_identical_on_every_query_and_after_a_restart(
    start_server: Callable[..., SyncServer], tmp_path: Path
) -> None:
    clock = Clock()
    db = tmp_path / "frozen.db"
    server = start_server(k=3, k_threshold=5, clock=clock, rng=random.Random(7), db_path=db,
                          rate_limit=0)
    for segment, n in ((0, 40), (1, 25), (2, 3)):
        for _ in range(n):
            assert post(server, segment) == 200
    clock.now = EPOCH_CLOSES
    first = stats(server)
    assert first[0] == 200
    for _ in range(20):  # repeating the query cannot average the noise away
        assert stats(server)[2] == first[2]
    clock.now = EPOCH_CLOSES + 30 * WEEK_SECONDS
    assert stats(server)[2] == first[2]
    assert stats(server, PREVIOUS)[0] == 200
    server.close()
    # Another process, another noise source, another central epsilon: the same bytes.
    restarted = start_server(k=3, k_threshold=5, clock=clock, rng=random.Random(999),
                             db_path=db, central_epsilon=2.0)
    assert stats(restarted)[2] == first[2]
    assert json.loads(first[2])["central_epsilon"] == pytest.approx(DEFAULT_CENTRAL_EPSILON)


def test_noise_is_drawn_once_per_cell_and_everything_published_follows_from_it(
    start_server: Callable[..., SyncServer],
) -> None:
    clock = Clock()
    server = start_server(k=4, k_threshold=10, clock=clock, rng=random.Random(2024),
                          rate_limit=0)
    truth = [90, 60, 12, 0]
    for segment, n in enumerate(truth):
        for _ in range(n):
            assert post(server, segment) == 200
    clock.now = EPOCH_CLOSES
    document = json.loads(stats(server)[2])
    publication = server.store.publication(EPOCH)
    assert publication is not None
    config = server.handler.config
    # The same seeded source, replayed: one draw per cell, in segment order, nothing more.
    expected = draw_noisy_counts(truth, central_epsilon=config.central_epsilon,
                                 rng=random.Random(2024))
    assert list(publication.noisy_counts) == expected
    assert server.store.counts(EPOCH, k=4) == truth  # the exact counts stay unpublished
    result = estimate_noisy(expected, channel=config.channel,
                            central_epsilon=config.central_epsilon, k_threshold=10)
    assert document["noisy_total"] == sum(expected)
    assert document["segments"] == [
        {"segment": c.segment, "estimate": c.estimate, "standard_error": c.standard_error}
        for c in result.cells
    ]
    assert document["suppressed"] == list(result.suppressed)
    assert document["report_epsilon"] == Channel.two_layer(
        config.epsilon_inf, config.epsilon_1, 4).epsilon


def test_reports_for_a_published_epoch_are_never_counted_whatever_the_window_or_clock(
    start_server: Callable[..., SyncServer], tmp_path: Path
) -> None:
    clock = Clock()
    db = tmp_path / "closed.db"
    server = start_server(k=2, clock=clock, db_path=db, rng=random.Random(3))
    assert post(server, 1) == 200
    clock.now = EPOCH_CLOSES
    published = stats(server)[2]
    code = assert_json_error(
        request(server, "POST", "/v1/report", report_body(1)), 400
    )
    assert code == "epoch_out_of_window"  # the window already refuses it
    server.close()
    # Restarted with a wider window, the window would accept EPOCH: the store refuses.
    wide = start_server(k=2, clock=clock, db_path=db, epoch_window=4)
    answer = request(wide, "POST", "/v1/report", report_body(1))
    assert assert_json_error(answer, 400) == "epoch_out_of_window"
    assert "published" in json.loads(answer[2])["message"]
    assert wide.store.add(EPOCH, 0) is False
    current = shift_epoch(EPOCH, 2)  # the server's week at EPOCH_CLOSES
    assert post(wide, 0, current) == 200
    wide.close()
    # A clock that went back to the epoch itself: still refused.
    clock.now = NOW
    back = start_server(k=2, clock=clock, db_path=db)
    assert assert_json_error(request(back, "POST", "/v1/report", report_body(0)), 400) == (
        "epoch_out_of_window"
    )
    assert stats(back)[2] == published
    assert stored_counts(db) == {(EPOCH, 1): 1, (current, 0): 1}


def test_a_report_racing_the_publication_is_either_in_it_or_refused(
    start_server: Callable[..., SyncServer],
) -> None:
    # Publication draws the noise inside the write transaction that reads the counts;
    # the count insert checks for a publication in its own transaction. Race them.
    server = start_server(k=2, capture_raw=False, synchronous="NORMAL")
    handler, store = server.handler, server.store
    acknowledged = [0, 0]
    refused: list[int] = []
    lock = threading.Lock()
    started = threading.Barrier(5)
    deadline = time.monotonic() + 30

    def report(segment: int) -> None:
        started.wait()
        while time.monotonic() < deadline:
            status, _, _ = handler.handle(
                "POST", "/v1/report", {"Content-Type": REPORT_CONTENT_TYPE},
                report_body(segment),
            )
            if status != 200:
                with lock:
                    refused.append(status)
                return
            with lock:
                acknowledged[segment] += 1

    threads = [threading.Thread(target=report, args=(n % 2,)) for n in range(4)]
    for thread in threads:
        thread.start()
    started.wait()
    while sum(acknowledged) < 300:
        time.sleep(0.001)
    publication = store.publish(EPOCH, config=handler.config, closed_at=NOW, now=NOW,
                                rng=random.Random(5))
    for thread in threads:
        thread.join(timeout=60)
    assert refused == [400] * 4  # every reporter was stopped by the publication
    noise = draw_noisy_counts([0, 0], central_epsilon=handler.config.central_epsilon,
                              rng=random.Random(5))
    at_publication = [n - z for n, z in zip(publication.noisy_counts, noise, strict=True)]
    assert at_publication == acknowledged
    assert store.counts(EPOCH, k=2) == acknowledged


def test_the_listing_names_every_closed_epoch_since_the_first_and_nothing_open(
    start_server: Callable[..., SyncServer],
) -> None:
    clock = Clock()
    server = start_server(k=2, clock=clock)
    assert server.handler.first_epoch == PREVIOUS
    assert listing(server) == []
    assert post(server, 0) == 200
    clock.now = EPOCH_CLOSES - 1
    assert listing(server) == [PREVIOUS]  # closed, though nothing was reported for it
    clock.now = EPOCH_CLOSES + 3 * WEEK_SECONDS
    listed = listing(server)
    assert listed == [shift_epoch(PREVIOUS, n) for n in range(5)]
    assert server.store.published_epochs() == listed
    for epoch in listed:
        assert stats(server, epoch)[0] == 200
    assert stats(server, shift_epoch(listed[-1], 1))[0] == 425
    before = stats(server, shift_epoch(PREVIOUS, -1))
    assert assert_json_error(before, 404) == "no_data"


def test_a_version_1_report_is_refused_over_http_and_nothing_is_counted(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server()
    answer = request(server, "POST", "/v1/report",
                     b'{"version":1,"epoch":"2026-W48","segment":"01"}')
    assert assert_json_error(answer, 400) == errors.UnsupportedVersionError.code
    assert "single-layer" in json.loads(answer[2])["message"]
    assert stored_total(server.handler.config.db_path) == 0
    assert post(server, 1) == 200


def make_v1_store(path: Path, rows: list[tuple[str, int, int]]) -> None:
    """A count store as the version 1 server left it."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(
            "CREATE TABLE counts (epoch TEXT NOT NULL, segment INTEGER NOT NULL,"
            " n INTEGER NOT NULL, PRIMARY KEY (epoch, segment)) WITHOUT ROWID"
        )
        connection.executemany("INSERT INTO counts VALUES (?, ?, ?)", rows)
        connection.execute("PRAGMA user_version=1")
        connection.commit()
    finally:
        connection.close()


def test_a_version_1_store_is_migrated_and_its_single_layer_counts_never_published(
    start_server: Callable[..., SyncServer], tmp_path: Path
) -> None:
    db = tmp_path / "v1.db"
    old = [(EPOCH, 0, 500), (EPOCH, 1, 300), (PREVIOUS, 1, 40)]
    make_v1_store(db, old)
    clock = Clock()
    server = start_server(k=2, k_threshold=1, clock=clock, db_path=db, rng=random.Random(8))
    connection = sqlite3.connect(db)
    try:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == STORE_VERSION == 2
        tables = {row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"counts", "counts_v1", "publications", "noisy_counts", "meta"}
        assert sorted(connection.execute("SELECT * FROM counts_v1")) == sorted(old)
    finally:
        connection.close()
    assert stored_total(db) == 0  # the two-layer counts start empty
    for segment in (0, 1, 1):
        assert post(server, segment) == 200
    assert stored_counts(db) == {(EPOCH, 0): 1, (EPOCH, 1): 2}
    clock.now = EPOCH_CLOSES
    document = json.loads(stats(server)[2])
    # The three two-layer reports plus one draw of noise per cell: the 800 old
    # (single-layer) reports are not in it.
    publication = server.store.publication(EPOCH)
    assert publication is not None
    noise = draw_noisy_counts([0, 0], central_epsilon=server.handler.config.central_epsilon,
                              rng=random.Random(8))
    assert [n - z for n, z in zip(publication.noisy_counts, noise, strict=True)] == [1, 2]
    server.close()
    # Opening it again changes nothing.
    again = start_server(k=2, k_threshold=1, clock=clock, db_path=db)
    assert stored_counts(db) == {(EPOCH, 0): 1, (EPOCH, 1): 2}
    assert json.loads(stats(again)[2]) == document


def test_a_store_newer_than_the_server_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    connection = sqlite3.connect(db)
    connection.execute(f"PRAGMA user_version={STORE_VERSION + 1}")
    connection.close()
    with pytest.raises(errors.ConfigurationError, match="newer"):
        SyncServer(config=ServerConfig(k=2, db_path=db, port=0))


def test_the_rate_limit_answers_429_after_n_reports_from_one_address_until_the_next_epoch(
    start_server: Callable[..., SyncServer],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    server = start_server(k=2, rate_limit=3, clock=clock, capture_raw=False)
    db = server.handler.config.db_path
    for _ in range(3):
        assert post(server, 1) == 200
    refused = request(server, "POST", "/v1/report", report_body(1))
    assert assert_json_error(refused, 429) == "rate_limited"
    next_epoch = epoch_start(shift_epoch(EPOCH, 1))
    assert int(refused[1]["retry-after"]) == math.ceil(next_epoch - NOW)
    with pytest.raises(errors.ServerUnavailableError) as caught:  # the client retries later
        SyncClient(base_url=server.url, k=2).send_report(0, EPOCH)
    assert caught.value.status == 429 and caught.value.retryable
    assert stored_total(db) == 3
    # Another address is counted on its own.
    for _ in range(3):
        assert post(server, 0, source="127.0.0.2") == 200
    assert post(server, 0, source="127.0.0.2") == 429
    # The in-process handler has no address and is not limited.
    status, _, _ = server.handler.handle(
        "POST", "/v1/report", {"Content-Type": REPORT_CONTENT_TYPE}, report_body(0)
    )
    assert status == 200
    # The next epoch starts every address afresh (reports for the last week too).
    clock.now = next_epoch
    assert post(server, 1, shift_epoch(EPOCH, 1)) == 200
    assert post(server, 1, EPOCH) == 200
    assert stored_counts(db) == {(EPOCH, 1): 4, (EPOCH, 0): 4, (shift_epoch(EPOCH, 1), 1): 1}
    out, err = capfd.readouterr()
    assert "127.0.0.2" not in caplog.text + out + err


def test_a_rate_limit_of_zero_is_off(start_server: Callable[..., SyncServer]) -> None:
    server = start_server(k=2, rate_limit=0, capture_raw=False)
    for _ in range(40):
        assert post(server, 1) == 200
    assert stored_total(server.handler.config.db_path) == 40


def test_malformed_reports_do_not_use_up_the_rate_limit(
    start_server: Callable[..., SyncServer],
) -> None:
    server = start_server(k=2, rate_limit=2, capture_raw=False)
    for _ in range(5):
        assert request(server, "POST", "/v1/report", b"{}")[0] == 400
        assert post(server, 1, shift_epoch(EPOCH, 3)) == 400
    assert post(server, 1) == 200 and post(server, 0) == 200
    assert post(server, 0) == 429


def test_the_first_epoch_only_moves_back_so_a_clock_ahead_at_the_first_start_heals(
    start_server: Callable[..., SyncServer], tmp_path: Path
) -> None:
    db = tmp_path / "ahead.db"
    ahead = Clock(NOW + 10 * WEEK_SECONDS)
    server = start_server(k=2, clock=ahead, db_path=db)
    assert server.handler.first_epoch == shift_epoch(EPOCH, 9)
    assert assert_json_error(stats(server, EPOCH), 404) == "no_data"
    server.close()
    fixed = start_server(k=2, clock=Clock(), db_path=db)
    assert fixed.handler.first_epoch == PREVIOUS
    assert post(fixed, 1) == 200
    assert stats(fixed, EPOCH)[0] == 425
    fixed.close()
    again = start_server(k=2, clock=ahead, db_path=db)  # a later start never moves it on
    assert again.handler.first_epoch == PREVIOUS
