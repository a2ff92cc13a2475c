"""Shared fixtures: real SQLCipher profiles in tmp_path, cheap KDFs, a fake clock."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import ondevice.keys
from ondevice import (
    Argon2Params,
    ContextField,
    PersonalizationEngine,
    Policy,
    RawKey,
    Signal,
)

# The SDK refuses to wrap a key or an export under Argon2id parameters below its floor
# (19 MiB, 2 passes). The suite derives hundreds of throwaway keys: lower the floor in
# this test process only, through a private module attribute no argument or environment
# variable reaches (child processes the tests start run with the real floor; they can
# read what was written here, as any ondevice reads an older, weaker key file).
ondevice.keys._write_floor = (1024, 1)

#: Argon2id parameters cheap enough for tests (production default: 64 MiB, 3 passes).
FAST_KDF = Argon2Params(memory_kib=1024, iterations=1, lanes=1)

#: A fixed "now": 2026-11-27T12:00:00Z.
T0 = 1_795_780_800.0


class Clock:
    """A settable clock for retention tests: no sleeping, no lying."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, days: float = 0.0, seconds: float = 0.0) -> None:
        self.now += days * 86400.0 + seconds


def demo_policy(**overrides: Any) -> Policy:
    """A policy with one declared signal and one declared context field."""
    fields: dict[str, Any] = {
        "signals": (
            Signal("plan", "str", "choose plan-specific tips", 365, choices=("free", "pro")),
            Signal("seats", "int", "size the team features", 365),
        ),
        "context": (
            ContextField(
                "daypart", "str", "learn when you like what", 30, choices=("morning", "evening")
            ),
            ContextField("device", "str", "tell the phone from the desktop", 90),
        ),
    }
    fields.update(overrides)
    return Policy(**fields)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def raw_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def profile_dir(tmp_path: Path) -> Path:
    return tmp_path / "profile"


@pytest.fixture
def make_engine(
    profile_dir: Path, raw_key: bytes, clock: Clock
) -> Iterator[Callable[..., PersonalizationEngine]]:
    """Open engines on one profile dir (raw key, fake clock); all closed at teardown."""
    opened: list[PersonalizationEngine] = []

    def make(**kwargs: Any) -> PersonalizationEngine:
        kwargs.setdefault("key", RawKey(raw_key))
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("policy", demo_policy())
        engine = PersonalizationEngine(kwargs.pop("path", profile_dir), **kwargs)
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        engine.close()


def write_old_profile(
    path: Path, key: bytes, version: int, user: str, rows: list[tuple[str, float]]
) -> None:
    """A profile at schema ``version`` (as an older ondevice left it) holding ``user``
    with ``(item_id, timestamp)`` interactions."""
    from ondevice import _db
    from ondevice.store import Store

    path.mkdir()
    RawKey(key).create(path)
    store = Store(_db.connect(path / "profile.db", key, busy_timeout=5))
    store.migrate(target=version)
    with store.write() as conn:
        Store.ensure_user(conn, user, T0)
        conn.executemany(
            "INSERT INTO interactions(user_id, item_id, event, ts, value) VALUES (?,?,?,?,?)",
            [(user, item, "view", ts, None) for item, ts in rows],
        )
    assert store.schema_version() == version
    store.close()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a directory and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def disk_bytes(directory: Path) -> bytes:
    """All bytes of all files of a directory, concatenated."""
    return b"".join(snapshot(directory).values())


# The planted catalog's fixtures (signing key, bundles, engines on them).
from planted import bundles, open_engine, signer  # noqa: E402, F401
