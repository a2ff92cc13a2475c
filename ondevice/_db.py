"""The one module that imports the database driver.

It opens SQLCipher connections with the raw data key, sets every pragma in one place,
and translates driver exceptions into the :mod:`ondevice.errors` tree. The rest of the
package never imports ``sqlcipher3``.

Pragmas, and why:

- ``key = "x'<hex>'"``: a raw 256-bit key, so opening costs no key derivation.
- ``journal_mode = WAL`` and ``synchronous = NORMAL``: readers do not block the writer,
  and a commit survives a killed process (WAL frames are encrypted like pages).
- ``secure_delete = ON``: deleted rows are overwritten with zeros in their pages.
- ``temp_store = MEMORY``: no temporary file (sort spill, temp table) ever hits disk.
- ``busy_timeout``: another process's write waits instead of "database is locked".
- ``foreign_keys = ON``.
- SQLCipher's own logging is silenced process-wide (``cipher_log_level = NONE``): it
  otherwise prints "hmac check failed" lines to stderr on every wrong key.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import sqlcipher3

from .errors import (
    OndeviceError,
    ProfileBusyError,
    ProfileError,
    ProfileUnreadableError,
    StorageError,
)
from .keys import UNREADABLE

__all__ = ["Connection", "DriverError", "connect", "translate", "translating"]

log = logging.getLogger(__name__)

Connection = Any  # sqlcipher3 ships no type information
DriverError: Final = sqlcipher3.Error

_silenced = False
_silence_lock = threading.Lock()

_UNREADABLE_CODES: Final = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})
_BUSY_CODES: Final = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
_STORAGE_CODES: Final = frozenset(
    {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"}
)


def _silence_sqlcipher_logging() -> None:
    global _silenced
    with _silence_lock:
        if _silenced:
            return
        conn = sqlcipher3.connect(":memory:")
        try:
            conn.execute("PRAGMA cipher_log_level = NONE").fetchall()
        finally:
            conn.close()
        _silenced = True


def _code(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        # Extended codes look like SQLITE_IOERR_WRITE: keep the primary part.
        parts = name.split("_")
        return "_".join(parts[:2])
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text:
        return "SQLITE_NOTADB"
    if "locked" in text or "busy" in text:
        return "SQLITE_BUSY"
    if "disk is full" in text or "disk i/o" in text:
        return "SQLITE_FULL"
    return ""


def translate(exc: BaseException) -> OndeviceError:
    """Map a driver exception onto the ondevice error tree (never loses the cause)."""
    code = _code(exc)
    err: OndeviceError
    if code in _UNREADABLE_CODES:
        err = ProfileUnreadableError(UNREADABLE)
    elif code in _BUSY_CODES:
        err = ProfileBusyError(
            "another connection held the profile's lock past the busy timeout; try again"
        )
    elif code in _STORAGE_CODES:
        err = StorageError(f"the disk refused the write ({code}: {exc}); nothing was stored")
    else:
        err = ProfileError(f"profile database error: {exc}")
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """Run a block, turning driver exceptions into ondevice errors."""
    try:
        yield
    except sqlcipher3.Error as exc:
        raise translate(exc) from exc


def connect(path: Path, key: bytes, *, busy_timeout: float) -> Connection:
    """Open (or create) the SQLCipher database at ``path`` with the raw ``key``.

    The key is verified by reading the schema before anything is written: a wrong key
    or a damaged first page raises :class:`ProfileUnreadableError` and leaves the files
    as they were.
    """
    _silence_sqlcipher_logging()
    if len(key) != 32:
        raise ProfileUnreadableError(UNREADABLE)
    conn = None
    try:
        conn = sqlcipher3.connect(
            str(path),
            timeout=busy_timeout,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # the store serializes access with a lock
            cached_statements=256,
        )
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        # Verifies the key: page 1 is decrypted and its HMAC checked here.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn
    except sqlcipher3.Error as exc:
        if conn is not None:
            with contextlib.suppress(sqlcipher3.Error):
                conn.close()
        raise translate(exc) from exc
