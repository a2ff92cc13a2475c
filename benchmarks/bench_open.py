"""Benchmark: opening a ~10 MB encrypted profile.

Builds a profile with a raw key (many users, each with a full 100-interaction window
spread over recent days, two declared signals and their activity counters) until the
database file reaches ``--mb`` megabytes, closes it, and copies it to a second profile
re-keyed under a passphrase. Then times, in the same run, median over repeats (warm
page cache):

- ``engine open+close, RawKey``: ``PersonalizationEngine(path, key=RawKey(...))`` then
  ``close()``; also the construction alone and the close alone;
- ``engine open+close, Passphrase``: the same with a :class:`~ondevice.Passphrase`
  (one Argon2id derivation per open, reported separately), and the derivation alone;
- the floors: a bare ``sqlcipher3`` connect + raw key + ``SELECT count(*) FROM
  sqlite_master`` + close on the same file, and ``ondevice._db.connect`` + close (the
  SDK's connection with every pragma, without the open-time pass of the engine).

The keychain open cannot run here (no Secret Service in this machine): it is the raw
open plus one keychain lookup.

Target: raw-key open of a 10 MB profile <= 20 ms median, so that opening the profile when
the app starts goes unnoticed.

``--breakdown`` also times every SQL statement the engine runs while opening (by
wrapping the connection the engine gets from ``ondevice._db.connect``) and prints a
cProfile of one open: where the open-time time goes.

Run: ``.venv/bin/python benchmarks/bench_open.py [--mb 10] [--repeats 25]
[--kdf-repeats 7] [--breakdown]``
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import io
import os
import pstats
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlcipher3
from _timing import TimedConnection

from ondevice import Passphrase, PersonalizationEngine, Policy, RawKey, Signal, _db
from ondevice.keys import Argon2Params

POLICY = Policy(
    signals=(
        Signal(
            "plan",
            "str",
            "pick plan-specific tips",
            retention_days=365,
            choices=("free", "pro", "team"),
        ),
        Signal("industry", "str", "show examples from your field", retention_days=365),
    ),
)
PASSPHRASE = "correct horse battery staple"
DAY = 86400.0


def build_profile(path: Path, key: bytes, target_mb: float, seed: int = 0) -> tuple[int, int]:
    """Fill a new profile until ``profile.db`` reaches ``target_mb``; return (users,
    interactions)."""
    rng = random.Random(seed)
    now = time.time()
    users = 0
    chunk = 200
    while True:
        with PersonalizationEngine(
            path, key=RawKey(key), policy=POLICY, privacy_level="behavioral"
        ) as engine:
            records = []
            for u in range(users, users + chunk):
                uid = f"user-{u:06d}"
                engine.set_signals(
                    uid,
                    {
                        "plan": rng.choice(("free", "pro", "team")),
                        "industry": f"industry-{rng.randrange(40)}",
                    },
                )
                for _ in range(100):
                    records.append(
                        (
                            uid,
                            {
                                "item_id": f"item-{rng.randrange(100_000):06d}",
                                "event": rng.choice(("view", "view", "view", "click", "purchase")),
                                "timestamp": now - rng.uniform(60.0, 30 * DAY),
                                "value": round(rng.uniform(0.0, 5.0), 2),
                            },
                        )
                    )
            engine.update_profile_many(records)
        users += chunk
        size = (path / "profile.db").stat().st_size
        if size >= target_mb * 1e6:
            return users, users * 100
        # Extrapolate the remaining users from the size so far (at most 5x per step).
        per_user = size / users
        chunk = max(50, min(5 * users, int((target_mb * 1e6 - size) / per_user) + 1))


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def repeat(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def breakdown(path: Path, key: bytes, runs: int) -> None:
    """Per-statement times of the engine's open (median over ``runs``), then cProfile."""
    totals: dict[str, list[float]] = collections.defaultdict(list)
    real_connect = _db.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        conn = real_connect(*args, **kwargs)
        totals["(ondevice._db.connect: key check + pragmas)"].append(time.perf_counter() - t0)
        return TimedConnection(conn, totals)

    _db.connect = connect
    try:
        for _ in range(runs):
            PersonalizationEngine(path, key=RawKey(key)).close()
    finally:
        _db.connect = real_connect
    print(f"\nOpen-time statements (RawKey, median per open over {runs} opens, total per open):")
    rows = []
    for sql, ts in totals.items():
        per_open = len(ts) / runs
        rows.append((statistics.median(ts) * per_open, per_open, sql))
    for total, per_open, sql in sorted(rows, reverse=True)[:14]:
        print(f"  {total * 1e3:8.2f} ms  x{per_open:<6g} {sql}")

    prof = cProfile.Profile()
    prof.runcall(lambda: PersonalizationEngine(path, key=RawKey(key)).close())
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    text = out.getvalue()
    print("\ncProfile of one RawKey open+close (top by own time):")
    print(text[text.find("   ncalls") :].rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=10.0, help="profile size to build")
    parser.add_argument("--repeats", type=int, default=25, help="raw-key opens (>= 20)")
    parser.add_argument("--kdf-repeats", type=int, default=7, help="passphrase opens")
    parser.add_argument("--dir", type=Path, default=None, help="where the profiles go")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time each open-time statement and cProfile one open",
    )
    args = parser.parse_args()

    key = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="bench-open-", dir=args.dir) as tmp:
        raw_dir = Path(tmp) / "raw"
        t0 = time.perf_counter()
        users, interactions = build_profile(raw_dir, key, args.mb)
        build_s = time.perf_counter() - t0
        db = raw_dir / "profile.db"
        size = db.stat().st_size
        print(
            f"profile: {size / 1e6:.1f} MB, {users:,} users, {interactions:,} interactions "
            f"(window 100), 2 signals each; built in {build_s:.1f} s; "
            f"sqlcipher3 SQLite {sqlcipher3.sqlite_version}, {os.cpu_count()} CPUs"
        )

        pass_dir = Path(tmp) / "pass"
        shutil.copytree(raw_dir, pass_dir)
        with PersonalizationEngine(pass_dir, key=RawKey(key)) as engine:
            engine.rekey(Passphrase(PASSPHRASE))

        def bare() -> None:
            conn = sqlcipher3.connect(str(db), isolation_level=None)
            conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            conn.close()

        def sdk_connect() -> None:
            _db.connect(db, key, busy_timeout=10.0).close()

        def engine_raw() -> None:
            PersonalizationEngine(raw_dir, key=RawKey(key)).close()

        construct: list[float] = []
        close: list[float] = []

        def engine_raw_split() -> None:
            t0 = time.perf_counter()
            engine = PersonalizationEngine(raw_dir, key=RawKey(key))
            t1 = time.perf_counter()
            engine.close()
            construct.append(t1 - t0)
            close.append(time.perf_counter() - t1)

        hours = [0]

        def engine_raw_purge_due() -> None:
            # The first open in an hour also runs the full retention pass over every
            # user: a clock two hours further on at each open makes it due every time.
            hours[0] += 2
            later = time.time() + hours[0] * 3600.0
            PersonalizationEngine(raw_dir, key=RawKey(key), clock=lambda: later).close()

        def engine_pass() -> None:
            PersonalizationEngine(pass_dir, key=Passphrase(PASSPHRASE)).close()

        salt = secrets.token_bytes(16)

        def kdf() -> None:
            Argon2Params().derive(PASSPHRASE.encode(), salt)

        # Warm-up: page cache, imports, the process-wide SQLCipher log silencing.
        engine_raw()
        bare()

        results: dict[str, list[float]] = {"bare": [], "sdk": [], "raw": [], "due": []}
        for _ in range(args.repeats):  # interleaved, so noise hits every variant alike
            results["bare"] += repeat(bare, 1)
            results["sdk"] += repeat(sdk_connect, 1)
            results["raw"] += repeat(engine_raw, 1)
            results["due"] += repeat(engine_raw_purge_due, 1)
            engine_raw_split()
        pass_times: list[float] = []
        kdf_times: list[float] = []
        for _ in range(args.kdf_repeats):  # interleaved, so the difference is meaningful
            pass_times += repeat(engine_pass, 1)
            kdf_times += repeat(kdf, 1)

        bare_ms, sdk_ms, raw_ms = (median_ms(results[k]) for k in ("bare", "sdk", "raw"))
        pass_ms, kdf_ms = median_ms(pass_times), median_ms(kdf_times)
        n = args.repeats
        print(f"\nOpen + close, median of {n} (passphrase: of {args.kdf_repeats}):")
        print(f"  bare sqlcipher3 connect+key+count(sqlite_master)  {bare_ms:8.2f} ms")
        print(f"  ondevice._db.connect (key check + pragmas)         {sdk_ms:8.2f} ms")
        print(
            f"  engine open+close, RawKey                          {raw_ms:8.2f} ms"
            f"  (range {min(results['raw']) * 1e3:.2f}..{max(results['raw']) * 1e3:.2f})"
        )
        print(
            f"    of which construction                            {median_ms(construct):8.2f} ms"
        )
        print(f"    of which close                                   {median_ms(close):8.2f} ms")
        due_ms = median_ms(results["due"])
        print(f"  engine open+close, RawKey, hourly retention pass   {due_ms:8.2f} ms")
        print(f"  engine open+close, Passphrase                      {pass_ms:8.2f} ms")
        print(f"    Argon2id derivation alone (64 MiB, t=3, p=4)     {kdf_ms:8.2f} ms")
        print(
            "  engine open+close, Keychain: not measurable here (no Secret Service); "
            "it is the RawKey open + one keychain lookup"
        )
        print(f"  ratio engine RawKey / bare sqlcipher: {raw_ms / bare_ms:.1f}")
        print(f"  ratio engine RawKey / _db.connect:    {raw_ms / sdk_ms:.1f}")
        print(f"  passphrase open - KDF alone:          {pass_ms - kdf_ms:.2f} ms")
        verdict = "met" if raw_ms <= 20.0 else "MISSED"
        print(f"  target RawKey open <= 20 ms median: {verdict} ({raw_ms:.2f} ms)")
        verdict = "met" if due_ms <= 20.0 else "MISSED"
        print(f"  ... and with the retention pass due: {verdict} ({due_ms:.2f} ms)")

        if args.breakdown:
            breakdown(raw_dir, key, max(5, n // 4))


if __name__ == "__main__":
    main()
