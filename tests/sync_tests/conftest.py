"""Fixtures for the sync tests: a real server stub on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import http.client
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ondevice_sync.protocol import REPORT_CONTENT_TYPE, Report, encode_report, epoch_of
from ondevice_sync.server import DEFAULT_GRACE, ServerConfig, SyncServer, closes_at

#: A fixed server "now": 2026-11-25T12:00:00Z, a Wednesday in ISO week 2026-W48.
NOW = 1_795_608_000.0
EPOCH = epoch_of(NOW)
#: When EPOCH closes with the default epoch window (1) and grace (one day): its
#: statistics are published from then on.
EPOCH_CLOSES = closes_at(EPOCH, epoch_window=1, grace=DEFAULT_GRACE)


class Clock:
    """A settable server clock: ``clock()`` returns ``clock.now``."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Answer = tuple[int, dict[str, str], bytes]


def request(
    server: SyncServer,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    source: str | None = None,
) -> Answer:
    """One raw request through http.client (not the project's client), optionally from
    another loopback source address such as ``127.0.0.2``."""
    host, port = server.address
    connection = http.client.HTTPConnection(
        host, port, timeout=5, source_address=None if source is None else (source, 0)
    )
    try:
        sent = {"Content-Type": REPORT_CONTENT_TYPE} if headers is None else headers
        connection.request(method, path, body=body, headers=sent)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def report_body(segment: int, epoch: str = EPOCH) -> bytes:
    """The canonical bytes of a report of ``segment`` for ``epoch``."""
    return encode_report(Report(epoch=epoch, segment=segment))


def assert_json_error(answer: Answer, status: int) -> str:
    """Check ``answer`` is a JSON error with ``status``; return its error code."""
    code, headers, body = answer
    assert code == status, body
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    assert document["message"]
    return str(document["error"])


def stored_total(db_path: Path) -> int:
    """Every count in a count store, read straight from SQLite."""
    connection = sqlite3.connect(db_path)
    try:
        row = connection.execute("SELECT COALESCE(SUM(n), 0) FROM counts").fetchone()
    finally:
        connection.close()
    return int(row[0])


def stored_counts(db_path: Path) -> dict[tuple[str, int], int]:
    """The count store's rows as {(epoch, segment): n}."""
    connection = sqlite3.connect(db_path)
    try:
        rows = connection.execute("SELECT epoch, segment, n FROM counts").fetchall()
    finally:
        connection.close()
    return {(epoch, segment): n for epoch, segment, n in rows}


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., SyncServer]]:
    """Start real servers on 127.0.0.1:0 with a fixed clock; all closed at teardown."""
    started: list[SyncServer] = []

    def start(**overrides: Any) -> SyncServer:
        clock = overrides.pop("clock", lambda: NOW)
        rng = overrides.pop("rng", None)
        settings: dict[str, Any] = {
            "k": 8,
            "db_path": tmp_path / f"counts{len(started)}.db",
            "port": 0,
            "capture_raw": True,
        }
        settings.update(overrides)
        server = SyncServer(config=ServerConfig(**settings), clock=clock, rng=rng).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SyncServer]:
    """One server for a whole module (hypothesis tests reuse it across examples)."""
    directory = tmp_path_factory.mktemp("shared")
    config = ServerConfig(k=8, db_path=directory / "counts.db", port=0, synchronous="NORMAL")
    server = SyncServer(config=config, clock=lambda: NOW).start()
    yield server
    server.close()
