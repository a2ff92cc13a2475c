"""Benchmark: durable ``update_profile`` writes against bare SQLite and bare SQLCipher.

Measured in one run, medians over repeats, each repeat on a fresh database in a
temporary directory (warm page cache, the machine's real disk):

Per call (one transaction each):

- ``sqlite3``: stdlib ``sqlite3``, ``BEGIN; INSERT one row; COMMIT`` into a table of the
  same shape as the engine's window (``id, user_id, item_id, event, ts, value`` plus the
  ``user_id`` index), with the engine's pragmas (WAL, ``synchronous=NORMAL``,
  ``secure_delete=ON``, ``temp_store=MEMORY``).
- ``sqlite3, no index``: the same without the ``user_id`` index (one page per commit
  instead of two): the harshest reading of "a bare insert", shown for comparison.
- ``sqlcipher``: the same as ``sqlite3`` with ``sqlcipher3`` and a raw 256-bit key: the
  cost of the encryption alone.
- ``engine``: ``PersonalizationEngine.update_profile(user, interaction)``, privacy level
  ``behavioral``, :class:`~ondevice.RawKey`, a few users, distinct items. This does more
  than the bare insert by design: validation, the user row, the rolling window (a full
  window recycles its oldest row in place) and, at most once a minute per user, the
  retention purge, all in the same transaction.

The first table is the default workload: 2,000 calls over 4 users, so each window fills
(100 inserts) and then recycles (400 calls each), as for an app's user after the first
hundred interactions. The second spreads the same calls over enough users that no
window fills: every call is an insert, the engine's slower case. The third is the first
workload with two engines (two connections for the bare variants) on one profile taking
turns, as when two processes of an app record into one profile: each engine must read
the window again after the other's commit.

Batch (one transaction):

- ``engine.update_profile_many(records)``: ``--batch`` records over ``--batch-users``
  users (default 200,000 over 2,000: 100 each, the default window) on a fresh profile;
- ``sqlcipher executemany`` of the same rows in one transaction (same pragmas, raw key),
  and the same with stdlib ``sqlite3``.

Targets: engine per call >= 0.5 x bare sqlite3 (recording an interaction costs at most
twice a bare durable insert); batch >= 100,000 interactions/s (importing 100,000
interactions takes at most a second).
Nothing is asserted: the script prints the numbers and the ratios.

``--profile`` additionally runs each engine path once under cProfile and prints where
the time goes. ``--breakdown`` times every SQL statement the engine issues on the
per-call path (by wrapping the connection the engine gets from ``ondevice._db.connect``).

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
from _timing import TimedConnection

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
    "CREATE INDEX IF NOT EXISTS interactions_user ON interactions(user_id)",
)
INSERT = "INSERT INTO interactions(user_id, item_id, event, ts, value) VALUES (?, ?, ?, ?, ?)"

Row = tuple[str, str, str, float, float]


def rows_for(n: int, users: int, start: float) -> list[Row]:
    """``n`` distinct interactions spread round-robin over ``users`` users, recent
    timestamps one millisecond apart (well inside the 90-day retention)."""
    return [
        (f"user-{i % users:05d}", f"item-{i:07d}", "view", start + i * 0.001, 1.0) for i in range(n)
    ]


def bare_connect(module: Any, path: Path, key: bytes | None, *, index: bool = True) -> Any:
    """A bare connection with the engine's pragmas (and the raw key for SQLCipher);
    ``index=False`` leaves the table without its ``user_id`` index."""
    conn = module.connect(str(path), isolation_level=None)
    if key is not None:
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    for pragma in PRAGMAS:
        conn.execute(pragma).fetchall()
    for statement in SCHEMA if index else SCHEMA[:1]:
        conn.execute(statement)
    return conn


def time_bare_calls(
    module: Any,
    path: Path,
    key: bytes | None,
    rows: list[Row],
    *,
    connections: int = 1,
    index: bool = True,
) -> float:
    """Seconds for one ``BEGIN; INSERT; COMMIT`` per row (the connections take turns)."""
    conns = [bare_connect(module, path, key, index=index) for _ in range(connections)]
    try:
        t0 = time.perf_counter()
        for n, row in enumerate(rows):
            conn = conns[n % connections]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(INSERT, row)
            conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        for conn in conns:
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


def time_engine_calls(
    path: Path, key: bytes, records: list[tuple[str, dict[str, Any]]], *, engines: int = 1
) -> float:
    """Seconds for one ``update_profile`` per record (the engines take turns)."""
    opened = [open_engine(path, key) for _ in range(engines)]
    try:
        updates = [engine.update_profile for engine in opened]
        t0 = time.perf_counter()
        for n, (user, interaction) in enumerate(records):
            updates[n % engines](user, interaction)
        return time.perf_counter() - t0
    finally:
        for engine in opened:
            engine.close()


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


def statement_times(root: Path, key: bytes, records: list[tuple[str, dict[str, Any]]]) -> None:
    """Time each statement of the engine's per-call path."""
    totals: dict[str, list[float]] = collections.defaultdict(list)
    real_connect = _db.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        return TimedConnection(real_connect(*args, **kwargs), totals)

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


def compare(
    title: str,
    variants: dict[str, Callable[[Path], float]],
    n: int,
    unit: str,
    root: Path,
    repeats: int,
) -> dict[str, float]:
    """Time the variants (the engine's last), print them and the engine's ratios to
    each baseline, and the baselines' ratio to each other."""
    *bases, engine = variants
    ratios = [(engine, base) for base in bases] + [(base, bases[0]) for base in bases[1:]]
    return report(title, measure(variants, root, repeats), n, unit, ratios)


def per_call_table(
    title: str, rows: list[Row], key: bytes, root: Path, repeats: int, *, writers: int = 1
) -> float:
    """Time the three per-call variants on ``rows`` with ``writers`` connections (or
    engines) taking turns, print them; return engine / sqlite3."""
    records = as_records(rows)
    rates = compare(
        title,
        {
            "sqlite3 insert+commit": lambda p: time_bare_calls(
                sqlite3, p, None, rows, connections=writers
            ),
            "sqlite3, no index": lambda p: time_bare_calls(
                sqlite3, p, None, rows, connections=writers, index=False
            ),
            "sqlcipher insert+commit": lambda p: time_bare_calls(
                sqlcipher3, p, key, rows, connections=writers
            ),
            "engine.update_profile": lambda p: time_engine_calls(
                p, key, records, engines=writers
            ),
        },
        len(rows),
        "calls/s",
        root,
        repeats,
    )
    return rates["engine.update_profile"] / rates["sqlite3 insert+commit"]


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
        help="also time each SQL statement of the engine's per-call path",
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
        ratio = per_call_table(
            f"\nPer-call durable writes: {args.calls} calls over {args.users} users, "
            f"{args.repeats} repeats (windows fill, then recycle)",
            rows,
            key,
            root,
            args.repeats,
        )
        print(
            f"  target engine >= 0.5 x sqlite3: {'met' if ratio >= 0.5 else 'MISSED'} ({ratio:.2f})"
        )
        fill_users = max(1, -(-args.calls // 50))
        per_call_table(
            f"\nPer-call, windows still filling: {args.calls} calls over {fill_users} users "
            "(at most 50 each: every call inserts, nothing recycles)",
            rows_for(args.calls, fill_users, start),
            key,
            root,
            args.repeats,
        )

        per_call_table(
            f"\nPer-call, two engines on one profile taking turns: {args.calls} calls over "
            f"{args.users} users (each engine rereads the window the other changed)",
            rows,
            key,
            root,
            args.repeats,
            writers=2,
        )

        brows = rows_for(args.batch, args.batch_users, start)
        brecords = as_records(brows)
        rates = compare(
            f"\nBatch, one transaction: {args.batch:,} records over {args.batch_users:,} users, "
            f"{args.batch_repeats} repeats",
            {
                "sqlite3 executemany": lambda p: time_bare_batch(sqlite3, p, None, brows),
                "sqlcipher executemany": lambda p: time_bare_batch(sqlcipher3, p, key, brows),
                "engine.update_profile_many": lambda p: time_engine_batch(p, key, brecords),
            },
            args.batch,
            "interactions/s",
            root,
            args.batch_repeats,
        )
        brate = rates["engine.update_profile_many"]
        print(
            f"  target engine batch >= 100,000/s: {'met' if brate >= 100_000 else 'MISSED'} "
            f"({brate:,.0f}/s)"
        )

        if args.breakdown:
            statement_times(root, key, records)

        if args.profile:
            print("\ncProfile, engine.update_profile per call (top by own time):")
            profile_engine(root, key, records, batch=False)
            print("cProfile, engine.update_profile_many (top by own time):")
            profile_engine(root, key, brecords, batch=True)


if __name__ == "__main__":
    main()
