"""Fixtures for the sync tests: a real server stub on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sync.protocol import epoch_of
from sync.server import ServerConfig, SyncServer

#: A fixed server "now": 2026-11-25T12:00:00Z, a Wednesday in ISO week 2026-W48.
NOW = 1_795_608_000.0
EPOCH = epoch_of(NOW)


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
        settings: dict[str, Any] = {
            "k": 8,
            "db_path": tmp_path / f"counts{len(started)}.db",
            "port": 0,
            "capture_raw": True,
        }
        settings.update(overrides)
        server = SyncServer(config=ServerConfig(**settings), clock=clock).start()
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
