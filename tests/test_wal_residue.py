"""Issue 10, item 11: what a wipe leaves in the WAL while another connection reads, and
for how long (until that read ends and the wiping engine's next transaction)."""

from __future__ import annotations

from conftest import T0
from sqlcipher_pages import page1_is_sqlite, plaintext_of_profile

MARKER = "wiped-marker-7Q4"


def test_a_wipe_during_another_connections_read_is_gone_from_every_frame_after_it(
    make_engine, profile_dir, raw_key
):
    wiper = make_engine(busy_timeout=0.3)
    reader = make_engine()
    for n in range(5):
        wiper.update_profile("u", {"item_id": f"{MARKER}-{n}", "timestamp": T0 - 60 + n})
    wiper.update_profile("v", {"item_id": "kept", "timestamp": T0 - 5})
    assert page1_is_sqlite(profile_dir, raw_key)
    with reader._store.read() as conn:  # another engine (an app window) is reading
        assert conn.execute("SELECT count(*) FROM interactions").fetchone()[0] == 6
        assert wiper.wipe_profile("u")
        # Its read snapshot still needs the old pages: they stay in the WAL meanwhile.
        lingering = MARKER.encode() in plaintext_of_profile(profile_dir, raw_key)
    assert lingering
    assert wiper._store._truncate_pending
    # The read ended; the wiper's next transaction (here a read) truncates the WAL.
    assert wiper.users() == ["v"]
    assert not wiper._store._truncate_pending
    assert MARKER.encode() not in plaintext_of_profile(profile_dir, raw_key)
    assert reader.users() == ["v"]


def test_a_wipe_with_no_other_reader_leaves_nothing_at_once(make_engine, profile_dir, raw_key):
    engine = make_engine()
    other = make_engine()
    other.users()  # another connection, idle: it holds no snapshot
    for n in range(5):
        engine.update_profile("u", {"item_id": f"{MARKER}-{n}", "timestamp": T0 - 60 + n})
    assert engine.wipe_profile("u")
    assert MARKER.encode() not in plaintext_of_profile(profile_dir, raw_key)
    assert not engine._store._truncate_pending


def test_after_rekey_nothing_in_the_files_decrypts_under_the_old_key(
    make_engine, profile_dir, raw_key
):
    from ondevice import RawKey

    engine = make_engine()
    for n in range(5):
        engine.update_profile("u", {"item_id": f"{MARKER}-{n}", "timestamp": T0 - 60 + n})
    assert MARKER.encode() in plaintext_of_profile(profile_dir, raw_key)
    new_key = bytes(range(32))
    engine.rekey(RawKey(new_key))
    assert engine.users() == ["u"]  # the engine goes on, open
    assert MARKER.encode() not in plaintext_of_profile(profile_dir, raw_key)
    assert MARKER.encode() in plaintext_of_profile(profile_dir, new_key)
