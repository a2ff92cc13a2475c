"""Several threads and processes on one profile; a process killed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ondevice import PersonalizationEngine, Policy, RawKey, _db
from ondevice.store import Store

from conftest import T0, disk_bytes

WRITER = Path(__file__).with_name("profile_writer.py")


def _spawn(
    path: Path, key: bytes, name: str, count: int, *shared: object
) -> subprocess.Popen[str]:
    env = {**os.environ, "ONDEVICE_TEST_KEY": key.hex()}
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(path), name, str(count), *map(str, shared)],
        stdin=subprocess.PIPE if shared else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _integrity(engine: PersonalizationEngine) -> tuple[list[str], list[str]]:
    conn = engine._store.conn
    cipher = [r[0] for r in conn.execute("PRAGMA cipher_integrity_check")]
    plain = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    return cipher, plain


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_nothing(tmp_path, raw_key):
    path = tmp_path / "p"
    PersonalizationEngine(path, key=RawKey(raw_key), policy=Policy(window=100_000)).close()
    procs = [_spawn(path, raw_key, name, 500) for name in ("a", "b")]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in err.lower()
        assert out.strip().splitlines()[-1] == "committed 500"
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        with engine._store.read() as conn:
            assert Store.count_rows(conn)["interactions"] == 1000
        assert _integrity(engine) == ([], ["ok"])


@pytest.mark.slow
def test_two_processes_recycling_one_window_keep_the_newest(tmp_path, raw_key):
    # Each engine remembers the window between its own writes; the other process's
    # commits must make it read the window again, or it would count or overwrite rows
    # as if it were alone (and the file would hold the wrong rows). The two writers
    # take turns, one interaction each.
    path = tmp_path / "p"
    PersonalizationEngine(path, key=RawKey(raw_key), policy=Policy(window=50)).close()
    base, count = time.time() - 86400.0, 150
    procs = [
        _spawn(path, raw_key, name, count, 50, base, parity)
        for parity, name in enumerate(("a", "b"))
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for i in range(count):
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == f"committed {i + 1}"
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    every = sorted(
        (base + 2 * i + parity, f"{name}-{i}")
        for parity, name in enumerate(("a", "b"))
        for i in range(count)
    )
    # Read the file as the writers left it (an engine's open would trim the window).
    conn = _db.connect(path / "profile.db", raw_key, busy_timeout=5)
    try:
        rows = conn.execute(
            "SELECT item_id FROM interactions WHERE user_id = 'shared' ORDER BY ts"
        ).fetchall()
    finally:
        conn.close()
    assert [item for (item,) in rows] == [item for _, item in every[-50:]]
    with PersonalizationEngine(path, key=RawKey(raw_key), policy=Policy(window=50)) as engine:
        window = engine.export_profile("shared")["users"][0]["interactions"]
        assert [w["item_id"] for w in window] == [item for _, item in every[-50:]]
        assert _integrity(engine) == ([], ["ok"])


def test_threads_sharing_one_engine_lose_nothing(make_engine):
    engine = make_engine(policy=Policy(window=100_000))
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(100):
                engine.update_profile(f"t{n}", {"item_id": f"i{i}"})
                engine.report(f"t{n}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with engine._store.read() as conn:
        assert Store.count_rows(conn)["interactions"] == 400


@pytest.mark.slow
def test_sigkill_mid_write_loses_no_committed_interaction(tmp_path, raw_key):
    path = tmp_path / "p"
    PersonalizationEngine(path, key=RawKey(raw_key), policy=Policy(window=100_000)).close()
    proc = _spawn(path, raw_key, "k", 100_000)
    assert proc.stdout is not None
    acknowledged = 0
    for line in proc.stdout:
        if line.startswith("committed"):
            acknowledged = int(line.split()[1])
            if acknowledged >= 300:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The child may have committed (and said so) a few more while the signal was on its
    # way: every line it printed before it died counts as acknowledged too.
    printed = acknowledged
    for line in proc.stdout:
        if line.startswith("committed"):
            printed = int(line.split()[1])
    proc.stdout.close()
    assert proc.stderr is not None
    proc.stderr.close()
    # The WAL is still there, unchecked-pointed: and still encrypted.
    assert (path / "profile.db-wal").exists()
    assert b"CRASH-marker" not in disk_bytes(path)
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        with engine._store.read() as conn:
            stored = Store.count_rows(conn)["interactions"]
        assert stored >= printed  # nothing acknowledged is lost
        assert stored <= printed + 1  # at most the one in flight when killed
        assert _integrity(engine) == ([], ["ok"])


def test_a_write_racing_a_lowered_level_stores_only_what_the_new_level_allows(make_engine):
    engine = make_engine(privacy_level="contextual")
    store_lock = engine._store.lock
    store_lock.acquire()  # the writer below validates, then waits for the store
    writer = threading.Thread(
        target=engine.update_profile,
        args=("u", {"item_id": "x", "timestamp": T0 - 5, "context": {"device": "phone"}}),
    )
    writer.start()
    time.sleep(0.2)  # let it get as far as the store lock
    engine.set_privacy_level("behavioral")  # this thread holds the (re-entrant) lock
    store_lock.release()
    writer.join()
    user = engine.export_profile("u")["users"][0]
    assert [(i["item_id"], i["context"]) for i in user["interactions"]] == [("x", {})]
    with engine._store.read() as conn:
        assert Store.count_rows(conn)["context"] == 0


def test_an_engine_collects_no_more_than_a_level_another_engine_lowered(make_engine):
    app = make_engine(privacy_level="contextual")
    app.update_profile("u", {"item_id": "a", "timestamp": T0 - 9, "context": {"device": "pc"}})
    settings = make_engine(privacy_level="contextual")
    settings.set_privacy_level("behavioral")  # the user lowers it in another window
    app.update_profile("u", {"item_id": "b", "timestamp": T0 - 5, "context": {"device": "pc"}})
    assert app.privacy_level.value == "behavioral"
    window = app.export_profile("u")["users"][0]["interactions"]
    assert [(i["item_id"], i["context"]) for i in window] == [("a", {}), ("b", {})]
    settings.set_privacy_level("none")
    assert app.set_signals("u", {"plan": "pro"}) is False
    assert app.update_profile("u", {"item_id": "c", "timestamp": T0 - 1}) is False
    with app._store.read() as conn:
        assert all(n == 0 for n in Store.count_rows(conn).values())
