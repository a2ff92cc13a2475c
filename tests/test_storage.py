"""Schema migrations and a disk that refuses writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from ondevice import PersonalizationEngine, RawKey
from ondevice.store import SCHEMA_VERSION, Store

from conftest import T0, write_old_profile


def test_a_version_1_profile_is_migrated_forward_with_its_data(tmp_path, raw_key):
    path = tmp_path / "p"
    write_old_profile(path, raw_key, 1, "old-user", [("item-1", T0 - 5)])
    with PersonalizationEngine(path, key=RawKey(raw_key), clock=lambda: T0) as engine:
        assert engine._store.schema_version() == SCHEMA_VERSION
        user = engine.export_profile("old-user")["users"][0]
        assert [i["item_id"] for i in user["interactions"]] == ["item-1"]
        assert user["blocked_items"] == []  # the v2 table exists and is empty


CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    from ondevice import PersonalizationEngine, Policy, RawKey, StorageError
    path, key = sys.argv[1], bytes.fromhex(sys.argv[2])
    engine = PersonalizationEngine(path, key=RawKey(key), policy=Policy(window=1_000_000))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # The OS refuses to grow any file past this size: a full disk, as SQLite sees it.
    limit = os.path.getsize(os.path.join(path, "profile.db-wal")) + 64 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    batch = [("big", {"item_id": "x" * 200 + str(i)}) for i in range(5000)]
    try:
        engine.update_profile_many(batch)
    except StorageError as exc:
        print("refused:", type(exc).__name__)
    else:
        print("stored")
    engine.update_profile("small", {"item_id": "fits"})
    print("still works")
    engine.close()
    """
)


def test_a_full_disk_refuses_the_write_and_loses_nothing_else(tmp_path, raw_key):
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=RawKey(raw_key), clock=lambda: T0) as engine:
        engine.update_profile("before", {"item_id": "kept", "timestamp": T0 - 1})
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), raw_key.hex()],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused: StorageError", "still works"]
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        assert engine.users() == ["before", "small"]
        with engine._store.read() as conn:
            assert Store.count_rows(conn)["interactions"] == 2
