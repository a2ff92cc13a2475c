"""Benchmark: durable ``update_profile`` writes against bare SQLite and bare SQLCipher.

Measured in one run, medians over repeats, each repeat on a fresh database in a
temporary directory (warm page cache, the machine's real disk):

Per call (one transaction each):

- ``sqlite3``: stdlib ``sqlite3``, ``BEGIN; INSERT one row; COMMIT`` into a table of the
  same shape as the engine's window (``id, user_id, item_id, event, ts, value`` plus the
  ``(user_id, ts)`` index), with the engine's pragmas (WAL, ``synchronous=NORMAL``,
  ``secure_delete=ON``, ``temp_store=MEMORY``).
- ``sqlcipher``: the same with ``sqlcipher3`` and a raw 256-bit key: the cost of the
  encryption alone.
- ``engine``: ``PersonalizationEngine.update_profile(user, interaction)``, privacy level
  ``behavioral``, :class:`~ondevice.RawKey`, a few users, distinct items. This does more
  than the bare insert by design: validation, the user row, the per-day activity
  counter, the rolling-window eviction (with ``secure_delete``) and the retention purge,
  all in the same transaction.

Batch (one transaction):

- ``engine.update_profile_many(records)``: ``--batch`` records over ``--batch-users``
  users (default 200,000 over 2,000: 100 each, the default window) on a fresh profile;
- ``sqlcipher executemany`` of the same rows in one transaction (same pragmas, raw key),
  and the same with stdlib ``sqlite3``.

Targets (issue 2): engine per call >= 0.5 x bare sqlite3; batch >= 100,000 interactions/s.
Nothing is asserted: the script prints the numbers and the ratios.

``--profile`` additionally runs each engine path once under cProfile and prints where
the time goes. ``--breakdown`` times every SQL statement the engine issues on the
per-call path (by wrapping the connection the engine gets from ``ondevice._db.connect``),
then replays the same statement sequence on a bare ``sqlcipher3`` connection to the
engine's own schema, with one piece left out at a time: what each piece costs in SQL
alone, and (by difference with the engine) what the Python layer costs. The replay is a
copy of the statements ``ondevice/store.py`` runs for one ``update_profile`` call at
level ``behavioral`` with the default policy; if store.py changes, update it. A last
row, ``sketch: ring-buffer window``, is not the engine but a measured design
alternative: the same work with the window kept as a per-user ring of slots overwritten
in place (see :func:`ring_calls`).

Run: ``.venv/bin/python benchmarks/bench_profile.py [--calls 2000] [--repeats 5]
[--batch 200000] [--batch-users 2000] [--batch-repeats 3] [--profile] [--breakdown]``
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import os
import pstats
import secrets
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlcipher3

from ondevice import PersonalizationEngine, RawKey, _db

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA secure_delete = ON",
    "PRAGMA temp_store = MEMORY",
)
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS interactions(id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, "
    "item_id TEXT NOT NULL, event TEXT NOT NULL, ts REAL NOT NULL, value REAL)",
    "CREATE INDEX IF NOT EXISTS interactions_user_ts ON interactions(user_id, ts)",
)
INSERT = "INSERT INTO interactions(user_id, item_id, event, ts, value) VALUES (?, ?, ?, ?, ?)"

Row = tuple[str, str, str, float, float]


def rows_for(n: int, users: int, start: float) -> list[Row]:
    """``n`` distinct interactions spread round-robin over ``users`` users, recent
    timestamps one millisecond apart (well inside the 90-day retention)."""
    return [
        (f"user-{i % users:05d}", f"item-{i:07d}", "view", start + i * 0.001, 1.0) for i in range(n)
    ]


def bare_connect(module: Any, path: Path, key: bytes | None) -> Any:
    """A bare connection with the engine's pragmas (and the raw key for SQLCipher)."""
    conn = module.connect(str(path), isolation_level=None)
    if key is not None:
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    for pragma in PRAGMAS:
        conn.execute(pragma).fetchall()
    for statement in SCHEMA:
        conn.execute(statement)
    return conn


def time_bare_calls(module: Any, path: Path, key: bytes | None, rows: list[Row]) -> float:
    """Seconds for one ``BEGIN; INSERT; COMMIT`` per row."""
    conn = bare_connect(module, path, key)
    try:
        t0 = time.perf_counter()
        for row in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(INSERT, row)
            conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


def time_bare_batch(module: Any, path: Path, key: bytes | None, rows: list[Row]) -> float:
    """Seconds for one ``executemany`` of every row in one transaction."""
    conn = bare_connect(module, path, key)
    try:
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, rows)
        conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


def as_records(rows: list[Row]) -> list[tuple[str, dict[str, Any]]]:
    """The rows as ``(user_id, interaction mapping)`` pairs, as a host app sends them."""
    return [
        (user, {"item_id": item, "event": event, "timestamp": ts, "value": value})
        for user, item, event, ts, value in rows
    ]


def open_engine(path: Path, key: bytes) -> PersonalizationEngine:
    return PersonalizationEngine(path, privacy_level="behavioral", key=RawKey(key))


def time_engine_calls(path: Path, key: bytes, records: list[tuple[str, dict[str, Any]]]) -> float:
    with open_engine(path, key) as engine:
        update = engine.update_profile
        t0 = time.perf_counter()
        for user, interaction in records:
            update(user, interaction)
        return time.perf_counter() - t0


def time_engine_batch(path: Path, key: bytes, records: list[tuple[str, dict[str, Any]]]) -> float:
    with open_engine(path, key) as engine:
        t0 = time.perf_counter()
        engine.update_profile_many(records)
        return time.perf_counter() - t0


def fresh(root: Path, name: str) -> Path:
    """A new empty directory (or file path) under ``root`` for one measurement."""
    path = root / f"{name}-{secrets.token_hex(4)}"
    return path


def cleanup(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def measure(
    variants: dict[str, Callable[[Path], float]], root: Path, repeats: int
) -> dict[str, list[float]]:
    """Run every variant ``repeats`` times, rotating the order each round so that slow
    phases of a noisy machine do not all land on one variant."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            path = fresh(root, name)
            gc.collect()
            try:
                times[name].append(variants[name](path))
            finally:
                cleanup(path)
    return times


def report(
    title: str,
    times: dict[str, list[float]],
    n: int,
    unit: str,
    ratios: list[tuple[str, str]],
) -> dict[str, float]:
    print(title)
    rates: dict[str, float] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rates[name] = n / med
        spread = f"{n / max(ts):,.0f}..{n / min(ts):,.0f}"
        print(f"  {name:<28} {rates[name]:>12,.0f} {unit}  (median of {len(ts)}; range {spread})")
    for a, b in ratios:
        print(f"  ratio {a} / {b}: {rates[a] / rates[b]:.2f}")
    return rates


def profile_engine(
    root: Path, key: bytes, records: list[tuple[str, dict[str, Any]]], *, batch: bool
) -> None:
    path = fresh(root, "prof")
    try:
        with open_engine(path, key) as engine:
            prof = cProfile.Profile()
            if batch:
                prof.runcall(engine.update_profile_many, records)
            else:
                update = engine.update_profile

                def run() -> None:
                    for user, interaction in records:
                        update(user, interaction)

                prof.runcall(run)
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(14)
        print(
            out.getvalue().split("Ordered by")[1]
            if "Ordered by" in out.getvalue()
            else out.getvalue()
        )
    finally:
        cleanup(path)


class _TimedConnection:
    """Wraps a connection and adds up the time of every statement (for --breakdown)."""

    def __init__(self, conn: Any, totals: dict[str, list[float]]) -> None:
        self._conn = conn
        self._totals = totals

    def _timed(self, method: str, sql: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(self._conn, method)(sql, *args)
        finally:
            key = ("many: " if method == "executemany" else "") + " ".join(sql.split())
            self._totals[key[:96]].append(time.perf_counter() - t0)

    def execute(self, sql: str, *args: Any) -> Any:
        return self._timed("execute", sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self._timed("executemany", sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def statement_times(root: Path, key: bytes, records: list[tuple[str, dict[str, Any]]]) -> None:
    """Time each statement of the engine's per-call path."""
    totals: dict[str, list[float]] = collections.defaultdict(list)
    real_connect = _db.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        return _TimedConnection(real_connect(*args, **kwargs), totals)

    path = fresh(root, "stmts")
    _db.connect = connect
    try:
        with open_engine(path, key) as engine:
            for sql in list(totals):
                del totals[sql]  # keep the writes only, not the open
            t0 = time.perf_counter()
            for user, interaction in records:
                engine.update_profile(user, interaction)
            elapsed = time.perf_counter() - t0
    finally:
        _db.connect = real_connect
        cleanup(path)
    n = len(records)
    in_sql = sum(sum(ts) for ts in totals.values())
    print(
        f"\nEngine per-call path, {n} calls: {elapsed / n * 1e6:.0f} us per call (timing "
        f"wrapper included), of which {in_sql / n * 1e6:.0f} us inside SQL statements:"
    )
    for sql, ts in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(ts) / n * 1e6:7.1f} us/call  x{len(ts) / n:<5.2f} {sql}")


REPLAY_PIECES = ("users", "activity", "window", "retention")


def replay_calls(path: Path, key: bytes, rows: list[Row], without: str | None) -> float:
    """The engine's per-call statements on a bare connection, optionally without one
    piece: ``users`` (INSERT OR IGNORE of the user row), ``activity`` (the per-day
    counter upsert), ``window`` (count + eviction of the oldest), ``retention`` (the
    per-user retention deletes: interactions, activity, derived, egress); ``everything``
    keeps only the INSERT."""
    with PersonalizationEngine(path, key=RawKey(key)):
        pass  # the engine's own schema and pragmas in the file
    conn = _db.connect(path / "profile.db", key, busy_timeout=10.0)
    day = 86400.0
    now = time.time()
    cutoff = now - 90 * day
    keep = {p: without not in (p, "everything") for p in REPLAY_PIECES}
    try:
        t0 = time.perf_counter()
        for user, item, event, ts, value in rows:
            conn.execute("BEGIN IMMEDIATE")
            if keep["users"]:
                conn.execute(
                    "INSERT OR IGNORE INTO users(user_id, created_at) VALUES (?, ?)", (user, now)
                )
            if keep["activity"]:
                conn.executemany(
                    "INSERT INTO activity(user_id, day, event, count) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(user_id, day, event) DO UPDATE SET count = count + "
                    "excluded.count",
                    [(user, int(ts // day), event, 1)],
                )
            conn.executemany(INSERT, [(user, item, event, ts, value)])
            if keep["window"]:
                (count,) = conn.execute(
                    "SELECT count(*) FROM interactions WHERE user_id = ?", (user,)
                ).fetchone()
                if count > 100:
                    conn.execute(
                        "DELETE FROM interactions WHERE id IN (SELECT id FROM interactions "
                        "WHERE user_id = ? ORDER BY ts, id LIMIT ?)",
                        (user, count - 100),
                    )
            if keep["retention"]:
                conn.execute(
                    "DELETE FROM interactions WHERE ts < ? AND user_id = ?", (cutoff, user)
                )
                conn.execute(
                    "DELETE FROM activity WHERE day < ? AND user_id = ?", (int(cutoff // day), user)
                )
                conn.execute(
                    "DELETE FROM derived WHERE updated_at < ? AND user_id = ?", (cutoff, user)
                )
                conn.execute(
                    "DELETE FROM egress WHERE created_at < ? AND user_id = ?",
                    (now - 365 * day, user),
                )
            conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


RING_SCHEMA = (
    "CREATE TABLE users(user_id TEXT PRIMARY KEY, created_at REAL NOT NULL, "
    "seq INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE TABLE ring(user_id TEXT NOT NULL, slot INTEGER NOT NULL, item_id TEXT NOT NULL, "
    "event TEXT NOT NULL, ts REAL NOT NULL, value REAL, PRIMARY KEY(user_id, slot)) WITHOUT ROWID",
    "CREATE TABLE activity(user_id TEXT NOT NULL, day INTEGER NOT NULL, event TEXT NOT NULL, "
    "count INTEGER NOT NULL, PRIMARY KEY(user_id, day, event)) WITHOUT ROWID",
    "CREATE TABLE derived(user_id TEXT NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL, "
    "updated_at REAL NOT NULL, PRIMARY KEY(user_id, name)) WITHOUT ROWID",
    "CREATE TABLE egress(id INTEGER PRIMARY KEY, user_id TEXT NOT NULL, epoch TEXT NOT NULL, "
    "created_at REAL NOT NULL, UNIQUE(user_id, epoch))",
)


def ring_calls(path: Path, key: bytes, rows: list[Row]) -> float:
    """A design sketch, not the engine: the window as a per-user ring of ``window`` slots
    (``PRIMARY KEY(user_id, slot)``, WITHOUT ROWID) overwritten in place, so a write
    touches the user's few window pages instead of inserting at the table's end and
    deleting from an old page plus two index entries. Same counter and retention work."""
    conn = sqlcipher3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    for pragma in (*PRAGMAS, "PRAGMA foreign_keys = ON"):
        conn.execute(pragma).fetchall()
    for statement in RING_SCHEMA:
        conn.execute(statement)
    day = 86400.0
    now = time.time()
    cutoff = now - 90 * day
    try:
        t0 = time.perf_counter()
        for user, item, event, ts, value in rows:
            conn.execute("BEGIN IMMEDIATE")
            (seq,) = conn.execute(
                "INSERT INTO users(user_id, created_at, seq) VALUES (?, ?, 1) "
                "ON CONFLICT(user_id) DO UPDATE SET seq = seq + 1 RETURNING seq",
                (user, now),
            ).fetchone()
            conn.execute(
                "INSERT INTO activity(user_id, day, event, count) VALUES (?, ?, ?, 1) "
                "ON CONFLICT(user_id, day, event) DO UPDATE SET count = count + 1",
                (user, int(ts // day), event),
            )
            conn.execute(
                "INSERT INTO ring(user_id, slot, item_id, event, ts, value) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(user_id, slot) DO UPDATE SET "
                "item_id = excluded.item_id, event = excluded.event, ts = excluded.ts, "
                "value = excluded.value",
                (user, seq % 100, item, event, ts, value),
            )
            conn.execute("DELETE FROM ring WHERE user_id = ? AND ts < ?", (user, cutoff))
            conn.execute(
                "DELETE FROM activity WHERE user_id = ? AND day < ?", (user, int(cutoff // day))
            )
            conn.execute("DELETE FROM derived WHERE user_id = ? AND updated_at < ?", (user, cutoff))
            conn.execute(
                "DELETE FROM egress WHERE created_at < ? AND user_id = ?", (now - 365 * day, user)
            )
            conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


def replay(
    root: Path, key: bytes, rows: list[Row], records: list[tuple[str, dict[str, Any]]], repeats: int
) -> None:
    variants: dict[str, Callable[[Path], float]] = {
        "engine.update_profile": lambda p: time_engine_calls(p, key, records),
        "replay: all statements": lambda p: replay_calls(p, key, rows, None),
    }
    for piece in REPLAY_PIECES:
        variants[f"replay without {piece}"] = (
            lambda p, piece=piece: replay_calls(p, key, rows, piece)  # type: ignore[misc]
        )
    variants["replay: INSERT only"] = lambda p: replay_calls(p, key, rows, "everything")
    variants["sketch: ring-buffer window"] = lambda p: ring_calls(p, key, rows)
    variants["sqlcipher insert+commit"] = lambda p: time_bare_calls(sqlcipher3, p, key, rows)
    times = measure(variants, root, repeats)
    n = len(rows)
    print(
        f"\nReplay of the engine's per-call SQL on bare sqlcipher3 ({n} calls, "
        f"median of {repeats}):"
    )
    per_call = {name: statistics.median(ts) / n * 1e6 for name, ts in times.items()}
    full = per_call["replay: all statements"]
    for name, us in per_call.items():
        if name.startswith("replay without "):
            note = f"-> the {name.split()[-1]} piece costs {full - us:5.1f} us/call"
        elif name == "engine.update_profile":
            note = f"-> Python layer (engine - replay) {us - full:5.1f} us/call"
        else:
            note = ""
        print(f"  {name:<30} {1e6 / us:>9,.0f} calls/s  {us:7.1f} us/call  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="per-call writes per repeat")
    parser.add_argument("--users", type=int, default=4, help="users for the per-call test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=200_000, help="records per batch")
    parser.add_argument("--batch-users", type=int, default=2000)
    parser.add_argument("--batch-repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    parser.add_argument("--profile", action="store_true", help="also cProfile the engine")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time each statement and replay the SQL without each piece",
    )
    args = parser.parse_args()

    key = secrets.token_bytes(32)
    start = time.time() - 3600.0
    with tempfile.TemporaryDirectory(prefix="bench-profile-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(
            f"sqlite3 {sqlite3.sqlite_version}, sqlcipher3 (SQLite {sqlcipher3.sqlite_version}), "
            f"{os.cpu_count()} CPUs, databases in {root}"
        )

        rows = rows_for(args.calls, args.users, start)
        records = as_records(rows)
        per_call = measure(
            {
                "sqlite3 insert+commit": lambda p: time_bare_calls(sqlite3, p, None, rows),
                "sqlcipher insert+commit": lambda p: time_bare_calls(sqlcipher3, p, key, rows),
                "engine.update_profile": lambda p: time_engine_calls(p, key, records),
            },
            root,
            args.repeats,
        )
        rates = report(
            f"\nPer-call durable writes: {args.calls} calls over {args.users} users, "
            f"{args.repeats} repeats",
            per_call,
            args.calls,
            "calls/s",
            [
                ("engine.update_profile", "sqlite3 insert+commit"),
                ("engine.update_profile", "sqlcipher insert+commit"),
                ("sqlcipher insert+commit", "sqlite3 insert+commit"),
            ],
        )
        ratio = rates["engine.update_profile"] / rates["sqlite3 insert+commit"]
        print(
            f"  target engine >= 0.5 x sqlite3: {'met' if ratio >= 0.5 else 'MISSED'} ({ratio:.2f})"
        )

        brows = rows_for(args.batch, args.batch_users, start)
        brecords = as_records(brows)
        batch = measure(
            {
                "sqlite3 executemany": lambda p: time_bare_batch(sqlite3, p, None, brows),
                "sqlcipher executemany": lambda p: time_bare_batch(sqlcipher3, p, key, brows),
                "engine.update_profile_many": lambda p: time_engine_batch(p, key, brecords),
            },
            root,
            args.batch_repeats,
        )
        rates = report(
            f"\nBatch, one transaction: {args.batch:,} records over {args.batch_users:,} users, "
            f"{args.batch_repeats} repeats",
            batch,
            args.batch,
            "interactions/s",
            [
                ("engine.update_profile_many", "sqlcipher executemany"),
                ("engine.update_profile_many", "sqlite3 executemany"),
            ],
        )
        brate = rates["engine.update_profile_many"]
        print(
            f"  target engine batch >= 100,000/s: {'met' if brate >= 100_000 else 'MISSED'} "
            f"({brate:,.0f}/s)"
        )

        if args.breakdown:
            statement_times(root, key, records)
            replay(root, key, rows, records, args.repeats)

        if args.profile:
            print("\ncProfile, engine.update_profile per call (top by own time):")
            profile_engine(root, key, records, batch=False)
            print("cProfile, engine.update_profile_many (top by own time):")
            profile_engine(root, key, brecords, batch=True)


if __name__ == "__main__":
    main()
