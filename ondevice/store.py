"""The encrypted profile store: schema, migrations, retention, purges and row access.

One SQLCipher database per profile directory. Every write runs in one ``BEGIN
IMMEDIATE`` transaction, so a refused or failed call writes nothing and two processes
never interleave half-writes. The connection is shared by the engine's threads behind
a lock (SQLite serializes writers anyway).

Schema (``PRAGMA user_version`` is the schema version; :data:`MIGRATIONS` lists the
forward steps):

- ``meta(key, value)``: the privacy level, the stored policy, the profile id.
- ``users(user_id, created_at)``.
- ``signals(user_id, name, value, updated_at)``: declared signals, JSON values.
- ``interactions(id, user_id, item_id, event, ts, value)``: the rolling window, indexed
  by user only (v5): the per-call write path keeps each user's window order in memory.
- ``context(interaction_id, name, value)``: declared context of an interaction.
- ``activity(user_id, day, event, count)``: per-day event counts (no item ids).
- ``derived(user_id, name, value, updated_at)``: derived state (blobs).
- ``blocks(user_id, item_id, created_at)``: items the user asked never to see (v2).
- ``egress(user_id, epoch, body, epsilon, status, ...)``: every segment report, logged
  before it is sent (v3).
- ``budget_ledger(tag, epoch, epsilon, created_at)``: one row per reported epoch and
  keyed tag of a user, with the lifetime epsilon that report spent (v4); survives
  ``wipe_profile`` and level changes.
- ``report_memos(user_id, k, epsilon_inf, segment, memo, ...)``: the memoized noisy
  value of each true segment a user held (v6).
- ``report_schedule(tag, epoch, due_at)``: when the week's report may leave, keyed and
  kept like the ledger (v6).

``meta`` also holds ``last_report_at`` (when this profile last sent a report, for
``min_gap``) and ``report_clock``, the reporting path's high-water mark of time (both
declared as ``report_clock.times``):
the largest clock reading any ``sync`` has seen. Reporting uses
``max(clock, report_clock)``, so setting the clock back never reopens a reported week,
and the ledger and the egress log expire on this clock, never on a wall clock read at
open (a clock far in the future at open purges neither).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import operator
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from . import _db
from .errors import (
    ProfileClosedError,
    ProfileError,
    ProfileGoneError,
    ProfileVersionError,
    StorageError,
)
from .policy import Interaction, Policy, PrivacyLevel, SignalValue

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Store"]

log = logging.getLogger(__name__)

DAY: Final = 86400.0

MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        "CREATE TABLE users(user_id TEXT PRIMARY KEY, created_at REAL NOT NULL) WITHOUT ROWID",
        """CREATE TABLE signals(
            user_id TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
            updated_at REAL NOT NULL, PRIMARY KEY(user_id, name)) WITHOUT ROWID""",
        """CREATE TABLE interactions(
            id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, item_id TEXT NOT NULL,
            event TEXT NOT NULL, ts REAL NOT NULL, value REAL)""",
        "CREATE INDEX interactions_user_ts ON interactions(user_id, ts)",  # dropped in v5
        """CREATE TABLE context(
            interaction_id INTEGER NOT NULL REFERENCES interactions(id) ON DELETE CASCADE,
            name TEXT NOT NULL, value TEXT NOT NULL,
            PRIMARY KEY(interaction_id, name)) WITHOUT ROWID""",
        """CREATE TABLE activity(
            user_id TEXT NOT NULL, day INTEGER NOT NULL, event TEXT NOT NULL,
            count INTEGER NOT NULL, PRIMARY KEY(user_id, day, event)) WITHOUT ROWID""",
        """CREATE TABLE derived(
            user_id TEXT NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL,
            updated_at REAL NOT NULL, PRIMARY KEY(user_id, name)) WITHOUT ROWID""",
    ),
    2: (
        """CREATE TABLE blocks(
            user_id TEXT NOT NULL, item_id TEXT NOT NULL, created_at REAL NOT NULL,
            PRIMARY KEY(user_id, item_id)) WITHOUT ROWID""",
    ),
    3: (
        # The egress log: every report, written before it is sent. `body` holds the
        # exact bytes that leave the device.
        """CREATE TABLE egress(
            id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, epoch TEXT NOT NULL,
            body BLOB NOT NULL, epsilon REAL NOT NULL, created_at REAL NOT NULL,
            status TEXT NOT NULL, sent_at REAL, answer TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL,
            UNIQUE(user_id, epoch))""",
    ),
    4: (
        # The privacy-budget ledger: what was spent, per keyed tag of a local user (no
        # user id, no segment). It outlives wipe_profile() and level changes, so that
        # forgetting a user or lowering the level cannot reset the budget or allow a
        # second report in the same epoch.
        """CREATE TABLE budget_ledger(
            tag BLOB NOT NULL, epoch TEXT NOT NULL, epsilon REAL NOT NULL,
            created_at REAL NOT NULL, PRIMARY KEY(tag, epoch)) WITHOUT ROWID""",
    ),
    5: (
        # Index the window by user only. An index on (user_id, ts) made every recycled
        # row (a new timestamp written over the oldest) rewrite index pages as well as
        # the table page, and SQLCipher encrypts and authenticates every page a commit
        # writes. The window order now comes from the store's cache or a sort of the
        # user's few rows.
        "DROP INDEX interactions_user_ts",
        "CREATE INDEX interactions_user ON interactions(user_id)",
    ),
    6: (
        # Two-layer randomized response: one memo per (user, segmentation, true value).
        """CREATE TABLE report_memos(
            user_id TEXT NOT NULL, k INTEGER NOT NULL, epsilon_inf REAL NOT NULL,
            segment INTEGER NOT NULL, memo INTEGER NOT NULL, created_at REAL NOT NULL,
            used_at REAL NOT NULL,
            PRIMARY KEY(user_id, k, epsilon_inf, segment)) WITHOUT ROWID""",
        # Keyed like the ledger (no user id) and kept like it: forgetting a user, a level
        # change or an import must not let the week's random moment be drawn again.
        """CREATE TABLE report_schedule(
            tag BLOB PRIMARY KEY, epoch TEXT NOT NULL, due_at REAL NOT NULL)
            WITHOUT ROWID""",
        # The per-report layer's epsilon (NULL for single-layer reports of v0.1).
        "ALTER TABLE egress ADD COLUMN epsilon_1 REAL",
        # 0.1's reports not delivered yet can never be: the server takes version 2 only.
        "UPDATE egress SET status = 'unsent', next_attempt = NULL "
        "WHERE status IN ('pending', 'failed')",
        # 0.1 kept the server's error text; keep only the status code.
        "UPDATE egress SET answer = substr(answer, 1, 3) || CASE status "
        "WHEN 'sent' THEN ' counted' WHEN 'refused' THEN ' refused' ELSE '' END "
        "WHERE answer IS NOT NULL AND answer GLOB '[0-9][0-9][0-9]*'",
        "UPDATE egress SET answer = NULL "
        "WHERE answer IS NOT NULL AND NOT answer GLOB '[0-9][0-9][0-9]*'",
    ),
}
SCHEMA_VERSION: Final = max(MIGRATIONS)

#: Tables holding a user's data, in the order they are deleted.
USER_TABLES: Final = (
    "signals",
    "activity",
    "derived",
    "blocks",
    "egress",
    "report_memos",
    "interactions",
    "users",
)

#: Derived state kept only at the individual level (everything else in ``derived``
#: is aggregate state kept from the segment level up).
INDIVIDUAL_DERIVED: Final = ("user_vector",)
#: Derived state kept only at the segment level.
SEGMENT_DERIVED: Final = "taste_aggregates"


#: The egress log is kept a year: long enough to show the user every report and to
#: account for the privacy budget's rolling period.
EGRESS_RETENTION_DAYS: Final = 365.0


def _damaged(what: str) -> ProfileError:
    """The error for a stored value that cannot be what this version wrote (only code
    holding the key can write one): clear, and never the driver's or Python's own."""
    log.error("the profile holds a damaged %s", what)
    return ProfileError(f"the profile holds a damaged {what}; run 'ondevice verify', or "
                        "restore an export")


def _int(value: Any, what: str, low: int = 0, high: int = 2**62) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _damaged(what)
    return value


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _damaged(what) from None
    if not math.isfinite(number):
        raise _damaged(what)
    return number


def _ascii(value: Any, what: str) -> str:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _damaged(what)
    try:
        return bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise _damaged(what) from None


#: Window order of ``(id, item_id, event, ts, value)`` rows: by timestamp, then id.
_WINDOW_ORDER: Final = operator.itemgetter(3, 0)


def _day(ts: float) -> int:
    return int(ts // DAY)


#: At most this many users' windows stay in a connection's write cache (about 12 kB
#: each at the default window of 100), and at most this many user ids.
CACHED_WINDOWS: Final = 128
CACHED_USERS: Final = 100_000


class _Window:
    """One user's window as this connection last committed it: ``(ts, id)`` pairs in
    window order (oldest first, ties by id), and the ids that have context rows."""

    __slots__ = ("order", "with_context")

    def __init__(self, order: list[tuple[float, int]], with_context: set[int]) -> None:
        self.order = order
        self.with_context = with_context


class _WriteCache:
    """What the per-call write path would otherwise read back on every call: which
    users have a row, each recently written user's window order, and the stored lower
    bound of all timestamps.

    It is only trusted inside a ``write(cached=True)`` transaction, and only while
    ``PRAGMA data_version`` (read under the write lock) shows that no other connection
    committed since this one last did. Every other write transaction, and every
    rollback, empties it.
    """

    __slots__ = ("bound", "bound_known", "data_version", "users", "windows")

    def __init__(self) -> None:
        self.data_version: int | None = None
        self.users: set[str] = set()
        self.windows: dict[str, _Window] = {}
        self.bound: float | None = None  # Store.oldest_bound, once read
        self.bound_known = False

    def clear(self) -> None:
        self.users.clear()
        self.windows.clear()
        self.bound_known = False


def _secret(text: str) -> bytes:
    try:
        secret = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise _damaged("ledger secret") from None
    if len(secret) != 32:
        raise _damaged("ledger secret")
    return secret


class _Transaction:
    """The context manager behind :meth:`Store.write` (a class rather than a generator:
    this runs on every recorded interaction)."""

    __slots__ = ("_cached", "_conn", "_store")

    def __init__(self, store: Store, cached: bool) -> None:
        self._store = store
        self._cached = cached
        self._conn: _db.Connection | None = None

    def __enter__(self) -> _db.Connection:
        store = self._store
        store._lock.acquire()
        entered = False
        try:
            conn = store.conn
            cache = store._cache
            conn.execute("BEGIN IMMEDIATE")
            store.check_identity()  # under the write lock: the file we write is the profile
            if self._cached:
                # Under the write lock: no other connection can commit until we do.
                (version,) = conn.execute("PRAGMA data_version").fetchone()
                store.changed_elsewhere = version != cache.data_version
                if store.changed_elsewhere:
                    cache.clear()
                    cache.data_version = version
            else:
                cache.clear()
            self._conn = conn
            entered = True
            return conn
        except _db.DriverError as exc:
            raise _db.translate(exc) from exc
        finally:
            if not entered:
                # Whatever stopped us (a KeyboardInterrupt included): no transaction
                # may stay open, holding the database's write lock, nor the store lock.
                try:
                    store._abandon()
                finally:
                    store._lock.release()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        store = self._store
        committed = False
        try:
            if exc is None:
                assert self._conn is not None
                self._conn.execute("COMMIT")
                committed = True
                if store._truncate_pending:
                    store.retry_truncate()
            elif isinstance(exc, _db.DriverError):
                raise _db.translate(exc) from exc
        except _db.DriverError as failed:  # the COMMIT
            raise _db.translate(failed) from failed
        finally:
            try:
                if not committed:
                    store._abandon()  # also after an interrupt: no transaction left open
            finally:
                store._lock.release()


class Store:
    """Row access to one open profile database. Not part of the public API.

    With ``path``, every transaction first checks that ``path`` is still the file this
    connection opened (same device and inode): a profile deleted or replaced under an
    open engine raises ProfileGoneError instead of taking writes into an unlinked file.
    One ``stat`` per transaction, about a microsecond.
    """

    def __init__(self, conn: _db.Connection, path: Path | None = None) -> None:
        self._conn: _db.Connection | None = conn
        self._path = path
        self._identity: tuple[int, int] | None = None
        if path is not None:
            st = os.stat(path)
            self._identity = (st.st_dev, st.st_ino)
        self._lock = threading.RLock()
        self._cache = _WriteCache()
        #: Set by each ``write(cached=True)``: whether another connection committed
        #: since this connection's previous cached write (True before the first one).
        self.changed_elsewhere = True
        #: A TRUNCATE checkpoint that readers blocked, to be retried (see checkpoint()).
        self._truncate_pending = False
        (busy_ms,) = conn.execute("PRAGMA busy_timeout").fetchone()
        self._busy_ms = int(busy_ms)

    # -- connection and transactions ------------------------------------------------

    def check_identity(self) -> None:
        """Raise ProfileGoneError if the profile file is gone or is another file now."""
        if self._path is None:
            return
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            found = None
        except OSError as exc:
            raise StorageError(f"cannot check the profile file: {exc.strerror}") from exc
        else:
            found = (st.st_dev, st.st_ino)
        if found != self._identity:
            log.warning("the profile file was deleted or replaced under an open engine")
            raise ProfileGoneError(
                "the profile's database was deleted or replaced while this engine had it "
                "open (a wipe elsewhere?); nothing was stored: close this engine"
            )

    @property
    def lock(self) -> threading.RLock:
        """The store's (re-entrant) lock, held by every transaction: hold it to make
        a transaction and a change of engine state one step for other threads."""
        return self._lock

    def _abandon(self) -> None:
        """After a failed or interrupted write: forget the cache, roll back if the
        connection is still in the transaction."""
        self._cache.clear()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(_db.DriverError):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    @property
    def conn(self) -> _db.Connection:
        """The live connection (ProfileClosedError after close)."""
        if self._conn is None:
            raise ProfileClosedError("the profile is closed")
        return self._conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(_db.DriverError):
                    self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._conn is None

    def write(self, *, cached: bool = False) -> _Transaction:
        """One ``BEGIN IMMEDIATE`` transaction, as a context manager yielding the
        connection: committed on success, rolled back on any exception (including a
        refused validation inside the block).

        ``cached=True`` is for the interaction write path only: inside it,
        :meth:`ensure_user_cached` and :meth:`add_to_window` may rely on what this
        connection knows from its own earlier commits. Any other write forgets it."""
        return _Transaction(self, cached)

    @contextlib.contextmanager
    def read(self) -> Iterator[_db.Connection]:
        """A consistent read snapshot (deferred transaction)."""
        with self._lock:
            conn = self.conn
            with _db.translating():
                conn.execute("BEGIN")
            try:
                self.check_identity()
                with _db.translating():
                    yield conn
            finally:
                with contextlib.suppress(_db.DriverError):
                    if conn.in_transaction:
                        conn.execute("COMMIT")
                if self._truncate_pending:
                    self.retry_truncate()

    def checkpoint(self) -> bool:
        """Move the WAL into the database and truncate it, so old page images of
        deleted rows do not linger in the WAL file. SQLite waits (up to the busy
        timeout) for other connections' read transactions to end first. Returns True
        when the WAL was emptied; otherwise the store retries, without waiting, after
        each of its later transactions until it succeeds (:meth:`retry_truncate`)."""
        with self._lock, _db.translating():
            busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            self._truncate_pending = True
            log.warning(
                "WAL checkpoint could not complete (another connection is reading); deleted "
                "rows stay in the encrypted WAL until that read ends and this engine's next "
                "transaction truncates it"
            )
            return False
        self._truncate_pending = False
        return True

    def retry_truncate(self) -> None:
        """After a checkpoint that readers blocked: try again now, without waiting (a
        busy timeout of zero), and stop trying once it succeeds. The caller holds the
        store lock, outside any transaction."""
        conn = self.conn
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        except _db.DriverError:
            return  # still blocked or busy: the next transaction tries again
        if not busy:
            self._truncate_pending = False
            log.info("WAL truncated: the rows deleted earlier are gone from it")

    # -- schema ---------------------------------------------------------------------

    def schema_version(self) -> int:
        """``PRAGMA user_version``."""
        with self._lock, _db.translating():
            version: int = self.conn.execute("PRAGMA user_version").fetchone()[0]
            return int(version)

    def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Bring the schema forward to ``target`` (each step in its own transaction).

        A database written by a newer schema raises ProfileVersionError untouched.
        """
        with self.write() as conn:
            current = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if current > SCHEMA_VERSION:
                raise ProfileVersionError(
                    f"this profile was written by a newer ondevice (schema {current}; this "
                    f"version reads up to {SCHEMA_VERSION}); upgrade ondevice to open it"
                )
            for version in range(current + 1, target + 1):
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                if version == 4:
                    # Spends recorded before the ledger existed stay spent.
                    for (user_id,) in conn.execute(
                        "SELECT DISTINCT user_id FROM egress"
                    ).fetchall():
                        tag = Store.ledger_tag(conn, user_id)
                        for epoch, epsilon, created in conn.execute(
                            "SELECT epoch, epsilon, created_at FROM egress WHERE user_id = ?",
                            (user_id,),
                        ).fetchall():
                            Store.spend(conn, tag, epoch, epsilon, created)
                if version == 6:
                    # The reporting clock starts at the newest report already made.
                    (newest,) = conn.execute(
                        "SELECT max(created_at) FROM budget_ledger"
                    ).fetchone()
                    if newest is not None:
                        Store.advance_report_clock(conn, float(newest))
                conn.execute(f"PRAGMA user_version = {version}")
                log.info("profile schema migrated to version %d", version)

    # -- meta -----------------------------------------------------------------------

    @staticmethod
    def get_meta(conn: _db.Connection, key: str) -> str | None:
        """A meta value, or None."""
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def set_meta(conn: _db.Connection, key: str, value: str) -> None:
        """Set a meta value."""
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- writes ---------------------------------------------------------------------

    @staticmethod
    def ensure_user(conn: _db.Connection, user_id: str, now: float) -> None:
        """Create the user row if missing."""
        conn.execute(
            "INSERT OR IGNORE INTO users(user_id, created_at) VALUES (?, ?)", (user_id, now)
        )

    @staticmethod
    def count_activity(
        conn: _db.Connection, user_id: str, interactions: Sequence[Interaction]
    ) -> None:
        """Add interactions to the per-day event counters (no item ids)."""
        counts: dict[tuple[int, str], int] = {}
        for it in interactions:
            assert it.timestamp is not None
            key = (_day(it.timestamp), it.event)
            counts[key] = counts.get(key, 0) + 1
        Store.restore_activity(conn, user_id, [(d, e, n) for (d, e), n in counts.items()])

    @staticmethod
    def restore_activity(
        conn: _db.Connection, user_id: str, rows: Sequence[tuple[int, str, int]]
    ) -> None:
        """Add (day, event, count) rows to the activity counters."""
        conn.executemany(
            "INSERT INTO activity(user_id, day, event, count) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(user_id, day, event) DO UPDATE SET count = count + excluded.count",
            [(user_id, day, event, n) for day, event, n in rows],
        )

    @staticmethod
    def insert_interactions(
        conn: _db.Connection,
        user_id: str,
        interactions: Sequence[Interaction],
        *,
        keep_context: bool,
    ) -> None:
        """Insert interaction rows, with their context when ``keep_context``."""
        if interactions:
            Store.lower_oldest_bound(conn, min(float(it.timestamp or 0.0) for it in interactions))
        if not keep_context or not any(it.context for it in interactions):
            conn.executemany(
                "INSERT INTO interactions(user_id, item_id, event, ts, value) "
                "VALUES (?, ?, ?, ?, ?)",
                [(user_id, it.item_id, it.event, it.timestamp, it.value) for it in interactions],
            )
            return
        for it in interactions:
            Store._insert_row(conn, user_id, it, keep_context=True)

    @staticmethod
    def _insert_row(
        conn: _db.Connection, user_id: str, it: Interaction, *, keep_context: bool
    ) -> int:
        """Insert one interaction row (and its context when ``keep_context``); its id.
        The caller keeps the timestamp bound (:meth:`lower_oldest_bound`)."""
        iid = int(
            conn.execute(
                "INSERT INTO interactions(user_id, item_id, event, ts, value) "
                "VALUES (?, ?, ?, ?, ?)",
                (user_id, it.item_id, it.event, it.timestamp, it.value),
            ).lastrowid
        )
        if keep_context and it.context:
            Store._insert_context(conn, iid, it)
        return iid

    @staticmethod
    def _insert_context(conn: _db.Connection, iid: int, it: Interaction) -> None:
        conn.executemany(
            "INSERT INTO context(interaction_id, name, value) VALUES (?, ?, ?)",
            [(iid, k, json.dumps(v)) for k, v in it.context.items()],
        )

    @staticmethod
    def restore_blocks(
        conn: _db.Connection, user_id: str, rows: Sequence[tuple[str, float]]
    ) -> None:
        """Insert (item_id, created_at) block rows."""
        conn.executemany(
            "INSERT OR IGNORE INTO blocks(user_id, item_id, created_at) VALUES (?, ?, ?)",
            [(user_id, item, ts) for item, ts in rows],
        )

    def ensure_user_cached(self, conn: _db.Connection, user_id: str, now: float) -> None:
        """:meth:`ensure_user`, skipped when this connection knows the row exists (only
        inside ``write(cached=True)``)."""
        users = self._cache.users
        if user_id not in users:
            Store.ensure_user(conn, user_id, now)
            if len(users) >= CACHED_USERS:
                users.clear()
            users.add(user_id)

    def forget_window(self, user_id: str) -> None:
        """Drop what the cache holds about ``user_id``'s window, and the timestamp
        bound, before or after a write that bypassed :meth:`add_to_window`."""
        self._cache.windows.pop(user_id, None)
        self._cache.bound_known = False

    @staticmethod
    def _load_window(conn: _db.Connection, user_id: str) -> _Window:
        order = conn.execute(
            "SELECT ts, id FROM interactions WHERE user_id = ?", (user_id,)
        ).fetchall()
        order.sort()  # window order: (ts, id)
        with_context = conn.execute(
            "SELECT c.interaction_id FROM context c JOIN interactions i "
            "ON i.id = c.interaction_id WHERE i.user_id = ?",
            (user_id,),
        ).fetchall()
        return _Window(order, {int(iid) for (iid,) in with_context})

    def add_to_window(
        self,
        conn: _db.Connection,
        user_id: str,
        it: Interaction,
        window: int,
        *,
        keep_context: bool,
    ) -> bool:
        """Add one interaction to a user's rolling window; False if it was not kept.
        Only inside ``write(cached=True)``.

        When the window is full and the interaction is strictly the newest, the oldest
        row is overwritten in place: its table page is the only page the commit
        rewrites (no index holds the timestamp), where an insert plus a delete would
        touch several; ``secure_delete`` overwrites the old values. An interaction older
        than everything in a full window is not stored: it would be evicted at once."""
        assert it.timestamp is not None
        ts = float(it.timestamp)
        windows = self._cache.windows
        w = windows.get(user_id)
        if w is None:
            if len(windows) >= CACHED_WINDOWS:
                del windows[next(iter(windows))]  # the one loaded longest ago
            w = windows[user_id] = Store._load_window(conn, user_id)
        order = w.order
        count = len(order)
        if count >= window and ts < order[0][0]:
            return False
        if count < window or ts <= order[-1][0]:
            # Not strictly the newest: a fresh row (a larger id) keeps arrival order
            # among equal timestamps, which an overwritten old row would not.
            cache = self._cache
            if not cache.bound_known:
                cache.bound, cache.bound_known = Store.oldest_bound(conn), True
            if cache.bound is not None and ts < cache.bound:
                Store.set_meta(conn, "oldest_ts", repr(ts))
                cache.bound = ts
            iid = Store._insert_row(conn, user_id, it, keep_context=keep_context)
            bisect.insort(order, (ts, iid))
            if keep_context and it.context:
                w.with_context.add(iid)
        else:
            # Strictly newer than the user's newest row, so not older than the stored
            # lower bound of all timestamps: the bound needs no update.
            _, iid = order.pop(0)
            conn.execute(
                "UPDATE interactions SET item_id = ?, event = ?, ts = ?, value = ? WHERE id = ?",
                (it.item_id, it.event, ts, it.value, iid),
            )
            if iid in w.with_context:
                conn.execute("DELETE FROM context WHERE interaction_id = ?", (iid,))
                w.with_context.discard(iid)
            if keep_context and it.context:
                Store._insert_context(conn, iid, it)
                w.with_context.add(iid)
            order.append((ts, iid))
        excess = len(order) - window  # a full window, a shrunk one, or a raced writer
        if excess > 0:
            evicted = [iid for _, iid in order[:excess]]
            del order[:excess]
            conn.executemany("DELETE FROM interactions WHERE id = ?", [(i,) for i in evicted])
            w.with_context.difference_update(evicted)
        return True

    @staticmethod
    def enforce_window(conn: _db.Connection, user_id: str, window: int) -> int:
        """Evict the user's oldest interactions beyond ``window``; return how many."""
        (count,) = conn.execute(
            "SELECT count(*) FROM interactions WHERE user_id = ?", (user_id,)
        ).fetchone()
        excess = int(count) - window
        if excess <= 0:
            return 0
        conn.execute(
            "DELETE FROM interactions WHERE id IN (SELECT id FROM interactions "
            "WHERE user_id = ? ORDER BY ts, id LIMIT ?)",
            (user_id, excess),
        )
        return excess

    @staticmethod
    def set_signals(
        conn: _db.Connection, user_id: str, signals: dict[str, SignalValue], now: float
    ) -> None:
        """Upsert declared signal values."""
        conn.executemany(
            "INSERT INTO signals(user_id, name, value, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(user_id, name) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at",
            [(user_id, k, json.dumps(v), now) for k, v in signals.items()],
        )

    @staticmethod
    def delete_signals(conn: _db.Connection, user_id: str, names: Iterable[str]) -> int:
        """Delete some of a user's signals; return how many rows went."""
        total = 0
        for name in names:
            total += conn.execute(
                "DELETE FROM signals WHERE user_id = ? AND name = ?", (user_id, name)
            ).rowcount
        return total

    @staticmethod
    def set_derived(
        conn: _db.Connection, user_id: str, name: str, value: bytes, now: float
    ) -> None:
        """Upsert one piece of derived state."""
        conn.execute(
            "INSERT INTO derived(user_id, name, value, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(user_id, name) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at",
            (user_id, name, value, now),
        )

    @staticmethod
    def delete_block(conn: _db.Connection, user_id: str, item_id: str) -> bool:
        """Remove one block; True if it existed."""
        cur = conn.execute(
            "DELETE FROM blocks WHERE user_id = ? AND item_id = ?", (user_id, item_id)
        )
        return bool(cur.rowcount)

    @staticmethod
    def delete_user(conn: _db.Connection, user_id: str) -> int:
        """Delete every row of one user; return how many rows went."""
        total = 0
        for table in USER_TABLES:
            total += conn.execute(f"DELETE FROM {table} WHERE user_id = ?", (user_id,)).rowcount
        # The timestamp bound may be this user's first interaction: forget it too (the
        # next full retention pass recomputes it).
        conn.execute("DELETE FROM meta WHERE key = 'oldest_ts'")
        return total

    # -- minimization ---------------------------------------------------------------

    @staticmethod
    def purge_expired(
        conn: _db.Connection, policy: Policy, now: float, user_id: str | None = None
    ) -> int:
        """Delete what outlived its retention: interactions and activity past the
        profile's retention, context and signals past their field's retention, stale
        derived state, and users left with nothing. ``user_id`` limits it to one user."""
        cutoff = now - policy.retention_seconds
        who, args = ("AND user_id = ?", (user_id,)) if user_id is not None else ("", ())
        total = 0

        def run(sql: str, *params: Any) -> None:
            nonlocal total
            total += conn.execute(sql, (*params, *args)).rowcount

        # A full pass skips the interaction scan when the stored lower bound of every
        # interaction's timestamp says nothing can have expired yet (at open, a scan
        # would decrypt every page of the window).
        oldest = Store.oldest_bound(conn) if user_id is None else None
        shortest = min([policy.retention_days] + [c.retention_days for c in policy.context])
        scan = oldest is None or oldest < now - shortest * DAY
        if scan:
            run(f"DELETE FROM interactions WHERE ts < ? {who}", cutoff)
        run(f"DELETE FROM activity WHERE day < ? {who}", _day(cutoff))
        run(f"DELETE FROM derived WHERE updated_at < ? {who}", cutoff)
        total += Store._trim_taste_sums(conn, _day(cutoff), user_id)
        # The egress log and the ledger expire on the reporting clock, which only a sync
        # moves and which never goes back: an open under a clock far in the future must
        # not forget which weeks were reported or what the budget spent.
        clock = Store.report_clock(conn)
        if clock is not None:
            expired = min(now, clock) - EGRESS_RETENTION_DAYS * DAY
            run(f"DELETE FROM egress WHERE created_at < ? {who}", expired)
            if user_id is None:
                total += conn.execute(
                    "DELETE FROM budget_ledger WHERE created_at < ?", (expired,)
                ).rowcount
        if user_id is None:
            # On the reporting clock too: an open under a clock far ahead must not let
            # the week's moment be drawn again.
            seen = now if clock is None else min(now, clock)
            total += conn.execute(
                "DELETE FROM report_schedule WHERE due_at < ?", (seen - 8 * DAY,)
            ).rowcount
        for field in policy.context if scan else ():
            if field.retention_days < policy.retention_days:
                run(
                    "DELETE FROM context WHERE name = ? AND interaction_id IN (SELECT id FROM "
                    f"interactions WHERE ts < ? {who})",
                    field.name,
                    now - field.retention_days * DAY,
                )
        for signal in policy.signals:
            run(
                f"DELETE FROM signals WHERE name = ? AND updated_at < ? {who}",
                signal.name,
                now - signal.retention_days * DAY,
            )
        if user_id is None:
            if scan:
                (low,) = conn.execute("SELECT min(ts) FROM interactions").fetchone()
                Store.set_meta(conn, "oldest_ts", repr(float("inf") if low is None else low))
            if total:
                total += Store.drop_empty_users(conn)
        return total

    @staticmethod
    def _trim_taste_sums(conn: _db.Connection, cutoff_day: int, user_id: str | None) -> int:
        """Drop the segment level's taste-sum buckets that started before retention."""
        from . import _aggblob

        who, args = ("AND user_id = ?", (user_id,)) if user_id is not None else ("", ())
        rows = conn.execute(
            f"SELECT user_id, value FROM derived WHERE name = ? {who}", (SEGMENT_DERIVED, *args)
        ).fetchall()
        changed = 0
        for uid, blob in rows:
            trimmed = _aggblob.trim(bytes(blob), cutoff_day)
            if trimmed is None:
                conn.execute(
                    "DELETE FROM derived WHERE user_id = ? AND name = ?", (uid, SEGMENT_DERIVED)
                )
                changed += 1
            elif trimmed != bytes(blob):
                conn.execute(
                    "UPDATE derived SET value = ? WHERE user_id = ? AND name = ?",
                    (trimmed, uid, SEGMENT_DERIVED),
                )
                changed += 1
        return changed

    @staticmethod
    def drop_empty_users(conn: _db.Connection) -> int:
        """Delete user rows that have nothing left in any table."""
        return int(
            conn.execute(
                "DELETE FROM users WHERE "
                + " AND ".join(
                    f"NOT EXISTS (SELECT 1 FROM {t} WHERE {t}.user_id = users.user_id)"
                    for t in USER_TABLES[:-1]
                )
            ).rowcount
        )

    @staticmethod
    def oldest_bound(conn: _db.Connection) -> float | None:
        """A lower bound of every stored interaction's timestamp (None: unknown)."""
        value = Store.get_meta(conn, "oldest_ts")
        return None if value is None else float(value)

    @staticmethod
    def lower_oldest_bound(conn: _db.Connection, ts: float) -> None:
        """Keep :meth:`oldest_bound` a lower bound after storing an interaction at ``ts``
        (a write only when ``ts`` is older than the bound: a backfill or an import)."""
        bound = Store.oldest_bound(conn)
        if bound is not None and ts < bound:
            Store.set_meta(conn, "oldest_ts", repr(ts))

    @staticmethod
    def purge_undeclared(conn: _db.Connection, policy: Policy) -> int:
        """Delete signal and context values whose field is no longer declared."""
        total = 0
        signals = [s.name for s in policy.signals]
        fields = [c.name for c in policy.context]
        total += conn.execute(
            f"DELETE FROM signals WHERE name NOT IN ({','.join('?' * len(signals))})", signals
        ).rowcount
        total += conn.execute(
            f"DELETE FROM context WHERE name NOT IN ({','.join('?' * len(fields))})", fields
        ).rowcount
        events = list(policy.events)
        for table in ("interactions", "activity"):
            total += conn.execute(
                f"DELETE FROM {table} WHERE event NOT IN ({','.join('?' * len(events))})",
                events,
            ).rowcount
        return int(total)

    @staticmethod
    def purge_for_level(conn: _db.Connection, level: PrivacyLevel) -> int:
        """Delete everything the given level does not keep."""
        total = 0
        if level.allows(PrivacyLevel.BEHAVIORAL):
            # The segment level's stand-ins for the window: counters and taste sums.
            total += conn.execute("DELETE FROM activity").rowcount
            total += conn.execute("DELETE FROM derived WHERE name = ?", (SEGMENT_DERIVED,)).rowcount
        if not level.allows(PrivacyLevel.INDIVIDUAL):
            marks = ",".join("?" * len(INDIVIDUAL_DERIVED))
            total += conn.execute(
                f"DELETE FROM derived WHERE name IN ({marks})", INDIVIDUAL_DERIVED
            ).rowcount
        if not level.allows(PrivacyLevel.CONTEXTUAL):
            total += conn.execute("DELETE FROM context").rowcount
        if not level.allows(PrivacyLevel.BEHAVIORAL):
            total += conn.execute("DELETE FROM interactions").rowcount
            total += conn.execute("DELETE FROM blocks").rowcount
        if not level.allows(PrivacyLevel.SEGMENT):
            for table in USER_TABLES:
                total += conn.execute(f"DELETE FROM {table}").rowcount
        if total:
            total += Store.drop_empty_users(conn)
            conn.execute("DELETE FROM meta WHERE key = 'oldest_ts'")
        return total

    # -- reads ----------------------------------------------------------------------

    @staticmethod
    def user_ids(conn: _db.Connection) -> list[str]:
        """Every user with a profile, sorted."""
        return [r[0] for r in conn.execute("SELECT user_id FROM users ORDER BY user_id")]

    @staticmethod
    def user_row(conn: _db.Connection, user_id: str) -> tuple[str, float] | None:
        """(user_id, created_at) or None."""
        row = conn.execute(
            "SELECT user_id, created_at FROM users WHERE user_id = ?", (user_id,)
        ).fetchone()
        return None if row is None else (str(row[0]), float(row[1]))

    @staticmethod
    def signals(conn: _db.Connection, user_id: str) -> list[tuple[str, SignalValue, float]]:
        """(name, value, updated_at) for each stored signal, by name."""
        rows = conn.execute(
            "SELECT name, value, updated_at FROM signals WHERE user_id = ? ORDER BY name",
            (user_id,),
        )
        return [(str(n), json.loads(v), float(t)) for n, v, t in rows]

    @staticmethod
    def interactions(
        conn: _db.Connection, user_id: str, *, with_context: bool = True
    ) -> list[Interaction]:
        """The user's window, oldest first (with context unless told otherwise)."""
        rows = conn.execute(
            "SELECT id, item_id, event, ts, value FROM interactions WHERE user_id = ?",
            (user_id,),
        ).fetchall()
        rows.sort(key=_WINDOW_ORDER)  # (ts, id): cheaper here than SQLite's sorter
        ctx: dict[int, dict[str, SignalValue]] = {}
        if not with_context:
            return [Interaction(item, event, ts, value, {}) for _, item, event, ts, value in rows]
        for iid, name, value in conn.execute(
            "SELECT c.interaction_id, c.name, c.value FROM context c JOIN interactions i "
            "ON i.id = c.interaction_id WHERE i.user_id = ? ORDER BY c.name",
            (user_id,),
        ):
            ctx.setdefault(int(iid), {})[str(name)] = json.loads(value)
        return [
            Interaction(str(item), str(event), float(ts), value, ctx.get(int(iid), {}))
            for iid, item, event, ts, value in rows
        ]

    @staticmethod
    def activity(conn: _db.Connection, user_id: str) -> list[tuple[int, str, int]]:
        """(day number, event, count) rows, oldest first."""
        rows = conn.execute(
            "SELECT day, event, count FROM activity WHERE user_id = ? ORDER BY day, event",
            (user_id,),
        )
        return [(int(d), str(e), int(c)) for d, e, c in rows]

    @staticmethod
    def derived(conn: _db.Connection, user_id: str) -> list[tuple[str, bytes, float]]:
        """(name, value, updated_at) rows."""
        rows = conn.execute(
            "SELECT name, value, updated_at FROM derived WHERE user_id = ? ORDER BY name",
            (user_id,),
        )
        return [(str(n), bytes(v), float(t)) for n, v, t in rows]

    @staticmethod
    def blocks(conn: _db.Connection, user_id: str) -> list[tuple[str, float]]:
        """(item_id, created_at) of blocked items."""
        rows = conn.execute(
            "SELECT item_id, created_at FROM blocks WHERE user_id = ? ORDER BY item_id",
            (user_id,),
        )
        return [(str(i), float(t)) for i, t in rows]

    @staticmethod
    def egress(conn: _db.Connection, user_id: str) -> list[dict[str, Any]]:
        """The user's egress log, oldest first."""
        rows = conn.execute(
            "SELECT epoch, body, epsilon, epsilon_1, created_at, status, sent_at, answer, "
            "attempts, next_attempt FROM egress WHERE user_id = ? ORDER BY created_at, id",
            (user_id,),
        ).fetchall()
        names = (
            "epoch",
            "body",
            "epsilon",
            "epsilon_1",
            "created_at",
            "status",
            "sent_at",
            "answer",
            "attempts",
            "next_attempt",
        )
        out = []
        for row in rows:
            entry = dict(zip(names, row, strict=True))
            entry["body"] = _ascii(entry["body"], "report in the egress log")
            out.append(entry)
        return out

    @staticmethod
    def egress_entry(conn: _db.Connection, user_id: str, epoch: str) -> dict[str, Any] | None:
        """The user's egress-log entry for ``epoch``, or None."""
        row = conn.execute(
            "SELECT body, epsilon, epsilon_1, status, answer, attempts, next_attempt "
            "FROM egress WHERE user_id = ? AND epoch = ?",
            (user_id, epoch),
        ).fetchone()
        if row is None:
            return None
        names = ("body", "epsilon", "epsilon_1", "status", "answer", "attempts", "next_attempt")
        entry = dict(zip(names, row, strict=True))
        entry["body"] = _ascii(entry["body"], "report in the egress log")
        entry["epoch"] = epoch
        return entry

    @staticmethod
    def latest_reported_epoch(conn: _db.Connection, tag: bytes) -> str | None:
        """The latest epoch the ledger holds for ``tag`` (epochs sort chronologically)."""
        (latest,) = conn.execute(
            "SELECT max(epoch) FROM budget_ledger WHERE tag = ?", (tag,)
        ).fetchone()
        return None if latest is None else str(latest)

    @staticmethod
    def log_egress(
        conn: _db.Connection,
        user_id: str,
        epoch: str,
        body: bytes,
        epsilon: float,
        now: float,
        *,
        epsilon_1: float | None,
        lease_until: float,
    ) -> None:
        """Append a report to the egress log, before it is sent, leased to the caller
        until ``lease_until`` (a concurrent sync waits instead of sending it too).
        ``epsilon`` is the lifetime epsilon the report spent, ``epsilon_1`` the per-report
        layer's."""
        conn.execute(
            "INSERT INTO egress(user_id, epoch, body, epsilon, epsilon_1, created_at, status, "
            "next_attempt) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
            (user_id, epoch, body, epsilon, epsilon_1, now, lease_until),
        )

    @staticmethod
    def lease_egress(conn: _db.Connection, user_id: str, epoch: str, until: float) -> None:
        """Take a logged report for sending until ``until``."""
        conn.execute(
            "UPDATE egress SET next_attempt = ? WHERE user_id = ? AND epoch = ?",
            (until, user_id, epoch),
        )

    @staticmethod
    def ledger_tag(conn: _db.Connection, user_id: str) -> bytes:
        """The budget ledger's tag of a user: HMAC-SHA256 under a random secret kept in
        the (encrypted) profile, so the ledger holds no user id."""
        import hashlib
        import hmac
        import secrets

        secret = Store.get_meta(conn, "ledger_secret")
        if secret is None:
            secret = secrets.token_hex(32)
            Store.set_meta(conn, "ledger_secret", secret)
        return hmac.new(_secret(secret), user_id.encode(), hashlib.sha256).digest()

    @staticmethod
    def ledger_tag_if_any(conn: _db.Connection, user_id: str) -> bytes:
        """The user's ledger tag, or ``b""`` (matching nothing) if nothing was ever
        spent in this profile; never writes (for read transactions)."""
        import hashlib
        import hmac

        secret = Store.get_meta(conn, "ledger_secret")
        if secret is None:
            return b""
        return hmac.new(_secret(secret), user_id.encode(), hashlib.sha256).digest()

    @staticmethod
    def ledger(conn: _db.Connection, tag: bytes) -> list[tuple[str, float, float]]:
        """(epoch, epsilon, created_at) spent under ``tag``, oldest first."""
        rows = conn.execute(
            "SELECT epoch, epsilon, created_at FROM budget_ledger WHERE tag = ? "
            "ORDER BY created_at",
            (tag,),
        )
        return [
            (str(e), float(x), float(t))
            for e, x, t in rows
            if isinstance(x, float) and 0.0 <= x <= 20.0 and isinstance(t, float)
        ]

    @staticmethod
    def spend(conn: _db.Connection, tag: bytes, epoch: str, epsilon: float, now: float) -> None:
        """Record a report's epsilon in the ledger."""
        conn.execute(
            "INSERT OR IGNORE INTO budget_ledger(tag, epoch, epsilon, created_at) "
            "VALUES (?, ?, ?, ?)",
            (tag, epoch, epsilon, now),
        )

    @staticmethod
    def settle_egress(
        conn: _db.Connection,
        user_id: str,
        epoch: str,
        *,
        status: str,
        now: float,
        answer: str,
        next_attempt: float | None,
    ) -> None:
        """Record the outcome of sending a logged report."""
        conn.execute(
            "UPDATE egress SET status = ?, sent_at = CASE WHEN ? = 'sent' THEN ? END, "
            "answer = ?, attempts = attempts + 1, next_attempt = ? "
            "WHERE user_id = ? AND epoch = ?",
            (status, status, now, answer, next_attempt, user_id, epoch),
        )

    @staticmethod
    def restore_egress(conn: _db.Connection, user_id: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert exported egress rows back."""
        conn.executemany(
            "INSERT OR REPLACE INTO egress(user_id, epoch, body, epsilon, epsilon_1, created_at, "
            "status, sent_at, answer, attempts, next_attempt) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    user_id,
                    r["epoch"],
                    r["body"].encode("ascii"),
                    r["epsilon"],
                    r.get("epsilon_1"),
                    r["created_at"],
                    r["status"],
                    r["sent_at"],
                    r["answer"],
                    r["attempts"],
                    r["next_attempt"],
                )
                for r in rows
            ],
        )

    # -- reporting ------------------------------------------------------------------

    @staticmethod
    def report_clock(conn: _db.Connection) -> float | None:
        """The reporting path's high-water mark of time, or None before any sync."""
        value = Store.get_meta(conn, "report_clock")
        return _finite(value, "reporting clock") if value is not None else None

    @staticmethod
    def advance_report_clock(conn: _db.Connection, now: float) -> float:
        """Raise the reporting clock to ``now`` if it is behind; return the clock (never
        less than before: a clock set back does not move it)."""
        current = Store.report_clock(conn)
        if current is None or now > current:
            Store.set_meta(conn, "report_clock", repr(float(now)))
            return float(now)
        return current

    @staticmethod
    def memos(conn: _db.Connection, user_id: str) -> list[dict[str, Any]]:
        """Every memo of ``user_id`` (one per segmentation and true segment held)."""
        rows = conn.execute(
            "SELECT k, epsilon_inf, segment, memo, created_at, used_at FROM report_memos "
            "WHERE user_id = ? ORDER BY created_at, k, segment",
            (user_id,),
        ).fetchall()
        names = ("k", "epsilon_inf", "segment", "memo", "created_at", "used_at")
        memos = [dict(zip(names, row, strict=True)) for row in rows]
        for memo in memos:
            k = _int(memo["k"], "memo", 1, 64)
            _int(memo["segment"], "memo", 0, k - 1)
            _int(memo["memo"], "memo", 0, k - 1)
        return memos

    @staticmethod
    def memo(
        conn: _db.Connection, user_id: str, k: int, epsilon_inf: float, segment: int
    ) -> int | None:
        """The memo of true ``segment`` under (``k``, ``epsilon_inf``), or None."""
        row = conn.execute(
            "SELECT memo FROM report_memos WHERE user_id = ? AND k = ? AND epsilon_inf = ? "
            "AND segment = ?",
            (user_id, k, epsilon_inf, segment),
        ).fetchone()
        return None if row is None else _int(row[0], "memo", 0, k - 1)

    @staticmethod
    def last_used_memo(
        conn: _db.Connection, user_id: str, k: int, epsilon_inf: float
    ) -> int | None:
        """The memo (under ``k``, ``epsilon_inf``) a report used most recently, or None."""
        row = conn.execute(
            "SELECT memo FROM report_memos WHERE user_id = ? AND k = ? AND epsilon_inf = ? "
            "ORDER BY used_at DESC, created_at DESC LIMIT 1",
            (user_id, k, epsilon_inf),
        ).fetchone()
        return None if row is None else _int(row[0], "memo", 0, k - 1)

    @staticmethod
    def save_memo(
        conn: _db.Connection,
        user_id: str,
        *,
        k: int,
        epsilon_inf: float,
        segment: int,
        memo: int,
        created_at: float,
        used_at: float,
    ) -> None:
        """Store a memo (an existing one for the same key is kept: never redrawn)."""
        conn.execute(
            "INSERT OR IGNORE INTO report_memos(user_id, k, epsilon_inf, segment, memo, "
            "created_at, used_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (user_id, k, epsilon_inf, segment, memo, created_at, used_at),
        )

    @staticmethod
    def touch_memo(
        conn: _db.Connection, user_id: str, k: int, epsilon_inf: float, segment: int, now: float
    ) -> None:
        """Mark the memo of true ``segment`` as the last used."""
        conn.execute(
            "UPDATE report_memos SET used_at = max(used_at, ?) WHERE user_id = ? AND k = ? "
            "AND epsilon_inf = ? AND segment = ?",
            (now, user_id, k, epsilon_inf, segment),
        )

    @staticmethod
    def schedule(conn: _db.Connection, tag: bytes) -> tuple[str, float] | None:
        """``(epoch, due_at)`` of the scheduled report of ledger tag ``tag``, or None."""
        row = conn.execute(
            "SELECT epoch, due_at FROM report_schedule WHERE tag = ?", (tag,)
        ).fetchone()
        if row is None:
            return None
        return str(row[0]), _finite(row[1], "report schedule")

    @staticmethod
    def set_schedule(conn: _db.Connection, tag: bytes, epoch: str, due_at: float) -> None:
        """Schedule the report of ``epoch`` of ledger tag ``tag`` for ``due_at``."""
        conn.execute(
            "INSERT INTO report_schedule(tag, epoch, due_at) VALUES (?, ?, ?) "
            "ON CONFLICT(tag) DO UPDATE SET epoch = excluded.epoch, due_at = excluded.due_at",
            (tag, epoch, due_at),
        )

    @staticmethod
    def count_rows(conn: _db.Connection) -> dict[str, int]:
        """Row count of every data table (for tests and diagnostics)."""
        tables = (
            "users",
            "signals",
            "interactions",
            "context",
            "activity",
            "derived",
            "blocks",
            "egress",
            "budget_ledger",
            "report_memos",
            "report_schedule",
        )
        return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}
