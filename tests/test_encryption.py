"""Nothing readable on disk without the key; wrong keys and damage fail closed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ondevice import (
    KeyProviderError,
    Passphrase,
    PersonalizationEngine,
    ProfileNotFoundError,
    ProfileUnreadableError,
    ProfileVersionError,
    RawKey,
)
from ondevice.keys import UNREADABLE
from ondevice.store import SCHEMA_VERSION

from conftest import FAST_KDF, T0, disk_bytes, snapshot
from sqlcipher_pages import page1_is_sqlite, plaintext_of_profile

MARKER = "QX7-distinctive-marker"


def _fill(engine: PersonalizationEngine, n: int = 20) -> None:
    for i in range(n):
        engine.update_profile(
            f"user-{MARKER}",
            {
                "item_id": f"{MARKER}-item-{i}",
                "timestamp": T0 - 1000 + i,
                "value": 4.5,
                "context": {"daypart": "morning"},
            },
        )
    engine.set_signals(f"user-{MARKER}", {"plan": "pro"})


def test_markers_never_reach_any_file_of_the_profile(make_engine, profile_dir, raw_key):
    engine = make_engine(privacy_level="contextual")
    _fill(engine)
    assert MARKER.encode() not in disk_bytes(profile_dir)
    # ...but they are in the encrypted pages: the check above is not vacuous.
    assert page1_is_sqlite(profile_dir, raw_key)
    assert MARKER.encode() in plaintext_of_profile(profile_dir, raw_key)
    engine.close()
    assert MARKER.encode() not in disk_bytes(profile_dir)


def test_markers_stay_encrypted_while_a_write_transaction_is_open(make_engine, profile_dir):
    engine = make_engine()
    _fill(engine, 5)
    with engine._store.write() as conn:
        conn.execute(
            "INSERT INTO interactions(user_id, item_id, event, ts, value) VALUES (?,?,?,?,?)",
            ("u", f"{MARKER}-uncommitted" * 200, "view", T0, None),
        )
        # Force the pager to spill: many pages dirty inside one transaction.
        for i in range(2000):
            conn.execute(
                "INSERT INTO interactions(user_id, item_id, event, ts, value) VALUES (?,?,?,?,?)",
                (f"bulk-{i}", f"{MARKER}-{i}" * 10, "view", T0, None),
            )
        assert MARKER.encode() not in disk_bytes(profile_dir)
        assert {p.name for p in profile_dir.iterdir()} <= {
            "profile.db",
            "profile.db-wal",
            "profile.db-shm",
            "key.json",
            "profile.lock",  # empty: an advisory lock for key changes
        }


def test_passphrase_key_file_holds_only_a_wrapped_key(tmp_path):
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("correct horse", kdf=FAST_KDF)) as engine:
        engine.update_profile("u", {"item_id": MARKER})
    key_file = json.loads((path / "key.json").read_bytes())
    assert key_file["provider"] == "passphrase"
    assert key_file["kdf"]["name"] == "argon2id"
    assert set(key_file["wrapped_key"]) == {"salt", "nonce", "ciphertext"}
    assert MARKER.encode() not in disk_bytes(path)


def _closed_profile(tmp_path: Path, raw_key: bytes) -> Path:
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        for i in range(300):
            engine.update_profile(f"user-{i % 7}", {"item_id": f"item-{i}"})
    return path


def test_wrong_raw_key_is_refused_and_changes_nothing(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    before = snapshot(path)
    with pytest.raises(ProfileUnreadableError):
        PersonalizationEngine(path, key=RawKey(bytes(32)))
    assert snapshot(path) == before


def test_wrong_passphrase_is_refused_with_the_same_error_and_changes_nothing(tmp_path):
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("right", kdf=FAST_KDF)) as engine:
        engine.update_profile("u", {"item_id": "x"})
    before = snapshot(path)
    with pytest.raises(ProfileUnreadableError) as wrong:
        PersonalizationEngine(path, key=Passphrase("wrong"))
    assert snapshot(path) == before
    # Fail closed, reveal nothing: the message is the same as for a damaged file.
    assert str(wrong.value) == UNREADABLE


def _read_everything(path: Path, raw_key: bytes) -> None:
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        engine.export_profile()
        engine.verify()  # reads every page, also those no export touches


@pytest.mark.parametrize("where", ["first page", "middle", "last page"])
def test_one_flipped_byte_is_detected_and_the_file_left_alone(tmp_path, raw_key, where):
    path = _closed_profile(tmp_path, raw_key)
    db = path / "profile.db"
    data = bytearray(db.read_bytes())
    offset = {"first page": 100, "middle": len(data) // 2 + 7, "last page": len(data) - 200}[where]
    data[offset] ^= 0x01
    db.write_bytes(bytes(data))
    before = snapshot(path)
    with pytest.raises(ProfileUnreadableError):
        _read_everything(path, raw_key)
    assert snapshot(path) == before


def test_verify_detects_a_flipped_byte_in_every_single_page(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    db = path / "profile.db"
    original = db.read_bytes()
    pages = len(original) // 4096
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        assert engine.verify() == pages
    unnoticed_by_reads = []
    for page in range(pages):
        data = bytearray(original)
        data[page * 4096 + 2000] ^= 0x01
        db.write_bytes(bytes(data))
        before = snapshot(path)
        try:  # ordinary reads check only the pages they touch...
            with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
                engine.export_profile()
            unnoticed_by_reads.append(page)
        except ProfileUnreadableError:
            pass
        with pytest.raises(ProfileUnreadableError):  # ...verify() checks every one
            _read_everything(path, raw_key)
        assert snapshot(path) == before
    db.write_bytes(original)
    assert unnoticed_by_reads, "the profile should have pages no export reads (empty tables)"


@pytest.mark.parametrize("keep", [0, 100, 4096, 4096 * 3 + 5])
def test_truncated_database_is_detected_and_left_alone(tmp_path, raw_key, keep):
    path = _closed_profile(tmp_path, raw_key)
    db = path / "profile.db"
    db.write_bytes(db.read_bytes()[:keep])
    before = snapshot(path)
    with pytest.raises(ProfileUnreadableError):
        _read_everything(path, raw_key)
    assert snapshot(path) == before


def test_tampered_key_file_is_refused(tmp_path):
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF)) as engine:
        engine.update_profile("u", {"item_id": "x"})
    key_file = path / "key.json"
    doc = json.loads(key_file.read_bytes())
    doc["kdf"]["iterations"] = 2  # authenticated as associated data
    key_file.write_text(json.dumps(doc))
    with pytest.raises(ProfileUnreadableError):
        PersonalizationEngine(path, key=Passphrase("pw"))


def test_key_provider_mismatch_is_a_clear_error(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    with pytest.raises(KeyProviderError, match="'raw' key"):
        PersonalizationEngine(path, key=Passphrase("pw"))


def test_missing_profile_with_create_false_creates_nothing(tmp_path, raw_key):
    with pytest.raises(ProfileNotFoundError):
        PersonalizationEngine(tmp_path / "nope", key=RawKey(raw_key), create=False)
    assert not (tmp_path / "nope").exists()


def test_profile_from_a_newer_schema_is_refused_untouched(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine, engine._store.write() as c:
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = snapshot(path)
    with pytest.raises(ProfileVersionError, match="newer"):
        PersonalizationEngine(path, key=RawKey(raw_key))
    assert snapshot(path) == before


def test_change_passphrase_rewraps_without_reencrypting(tmp_path):
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("old", kdf=FAST_KDF)) as engine:
        engine.update_profile("u", {"item_id": "x"})
        db_before = (path / "profile.db").read_bytes()
        engine.change_passphrase("new")
        assert (path / "profile.db").read_bytes() == db_before
    with pytest.raises(ProfileUnreadableError):
        PersonalizationEngine(path, key=Passphrase("old"))
    with PersonalizationEngine(path, key=Passphrase("new")) as engine:
        assert engine.users() == ["u"]


def test_rekey_reencrypts_under_a_new_key(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    old_copy = tmp_path / "old.db"
    new_key = bytes(range(32))
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        engine.rekey(RawKey(new_key))
        shutil.copy(path / "profile.db", old_copy)
        users = engine.users()
    with pytest.raises(ProfileUnreadableError):
        PersonalizationEngine(path, key=RawKey(raw_key))
    with PersonalizationEngine(path, key=RawKey(new_key)) as engine:
        assert engine.users() == users
    assert not (path / "key.json.pending").exists()


def test_rekey_from_raw_key_to_passphrase(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        engine.rekey(Passphrase("now a passphrase", kdf=FAST_KDF))
    with PersonalizationEngine(path, key=Passphrase("now a passphrase")) as engine:
        assert len(engine.users()) == 7


def test_interrupted_rotation_is_finished_at_next_open(tmp_path, raw_key):
    """A crash after the database was re-keyed but before key.json was switched."""
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF)) as engine:
        engine.update_profile("u", {"item_id": "x"})
        provider = Passphrase("pw", kdf=FAST_KDF)
        new_key = bytes(range(32))
        provider.store(path, new_key, pending=True)
        with engine._store.write():
            pass
        engine._store.conn.execute(f"PRAGMA rekey = \"x'{new_key.hex()}'\"")
    assert (path / "key.json.pending").exists()
    with PersonalizationEngine(path, key=Passphrase("pw")) as engine:
        assert engine.users() == ["u"]
    assert not (path / "key.json.pending").exists()
    with PersonalizationEngine(path, key=Passphrase("pw")) as engine:
        assert engine.users() == ["u"]


def test_crypto_shred_leaves_nothing_that_opens_a_copy(tmp_path):
    path = tmp_path / "p"
    engine = PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF))
    engine.update_profile("u", {"item_id": MARKER})
    engine.close()
    stash = tmp_path / "stash"
    stash.mkdir()
    shutil.copy(path / "profile.db", stash / "profile.db")
    engine = PersonalizationEngine(path, key=Passphrase("pw"))
    engine.wipe()
    assert engine.closed
    assert not path.exists()  # db, wal, shm and key file all gone, dir removed
    # Put back everything the SDK left behind (nothing) next to the copy: no key.
    with pytest.raises(KeyProviderError, match=r"no key\.json"):
        PersonalizationEngine(stash, key=Passphrase("pw"))
    # And the copy's bytes are unchanged and still encrypted.
    assert MARKER.encode() not in (stash / "profile.db").read_bytes()


def test_interrupted_move_to_another_kind_of_key_opens_with_the_new_one(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    new_key = bytes(range(32))
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        Passphrase("moved", kdf=FAST_KDF).store(path, new_key, pending=True)
        engine._store.conn.execute(f"PRAGMA rekey = \"x'{new_key.hex()}'\"")
    # Crashed before key.json was switched: key.json says raw, the pending says passphrase.
    with PersonalizationEngine(path, key=Passphrase("moved")) as engine:
        assert len(engine.users()) == 7
    assert json.loads((path / "key.json").read_bytes())["provider"] == "passphrase"
    assert not (path / "key.json.pending").exists()


def test_interrupted_rotation_that_never_reached_the_database_is_discarded(tmp_path, raw_key):
    path = _closed_profile(tmp_path, raw_key)
    Passphrase("never used", kdf=FAST_KDF).store(path, bytes(range(32)), pending=True)
    with PersonalizationEngine(path, key=RawKey(raw_key)) as engine:
        assert len(engine.users()) == 7
    assert not (path / "key.json.pending").exists()
