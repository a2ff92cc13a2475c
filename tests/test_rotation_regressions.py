"""Regressions of key rotation (issue 10, items 1 and 12), written against the public
API and the on-disk format only, so each can be run against an older ondevice.

- Item 1: a passphrase rotation interrupted after SQLCipher re-encrypted the database
  refused both passphrases. (Every step of every kind of rotation is killed in
  test_rotation_kill_points.py.)
- Item 12: ``change_passphrase`` (and ``rekey``) replaced ``key.json`` by a rename, so
  the old file's blocks kept the data key wrapped under the old passphrase; whoever
  recovered them (simulated by a file descriptor opened before) unwrapped the key and
  decrypted the database even after ``wipe()``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from ondevice import (
    KeyProviderError,
    Passphrase,
    PersonalizationEngine,
    ProfileUnreadableError,
)
from ondevice.keys import KEY_FILE

from conftest import FAST_KDF


def _items(engine: PersonalizationEngine) -> list[str]:
    users = engine.export_profile("alice")["users"]
    return sorted(row["item_id"] for user in users for row in user["interactions"])


def _profile(tmp_path: Path, passphrase: str = "old") -> Path:
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase(passphrase, kdf=FAST_KDF)) as engine:
        engine.update_profile("alice", {"item_id": "secret-item", "event": "view"})
    return path


# -- item 1 ---------------------------------------------------------------------------


def test_passphrase_rekey_interrupted_after_reencryption_opens_with_the_new_passphrase(
    tmp_path: Path,
) -> None:
    path = _profile(tmp_path)
    # The state a process killed right after SQLCipher's rekey returned leaves behind.
    with PersonalizationEngine(path, key=Passphrase("old", kdf=FAST_KDF)) as engine:
        new_key = secrets.token_bytes(32)
        Passphrase("new", kdf=FAST_KDF).store(path, new_key, pending=True)
        engine._store.conn.execute(f"PRAGMA rekey = \"x'{new_key.hex()}'\"")
    with pytest.raises(ProfileUnreadableError):  # the database is under the new key
        PersonalizationEngine(path, key=Passphrase("old", kdf=FAST_KDF))
    with PersonalizationEngine(path, key=Passphrase("new", kdf=FAST_KDF)) as engine:
        assert _items(engine) == ["secret-item"]
    assert not (path / "key.json.pending").exists()
    with PersonalizationEngine(path, key=Passphrase("new", kdf=FAST_KDF)) as engine:
        assert _items(engine) == ["secret-item"]


# -- item 12 --------------------------------------------------------------------------


def _recover(fd: int) -> bytes:
    """The bytes still in the blocks of a replaced file (an open descriptor keeps them
    reachable, as a forensic tool would on a file system that rewrites in place)."""
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)


def _unwraps(recovered: bytes, passphrase: str, tmp_path: Path) -> bool:
    """Whether ``recovered`` is a key file the passphrase unwraps."""
    try:
        descriptor = json.loads(recovered)
        Passphrase(passphrase).load(tmp_path, descriptor)
    except (ValueError, UnicodeDecodeError, ProfileUnreadableError, KeyProviderError):
        return False
    return True


def test_change_passphrase_overwrites_the_old_wrapped_key_before_replacing_it(
    tmp_path: Path,
) -> None:
    path = _profile(tmp_path)
    old_key_file = os.open(path / KEY_FILE, os.O_RDONLY)
    database = os.open(path / "profile.db", os.O_RDONLY)
    try:
        assert _unwraps(_recover(old_key_file), "old", tmp_path)  # the check is not vacuous
        with PersonalizationEngine(path, key=Passphrase("old", kdf=FAST_KDF)) as engine:
            engine.change_passphrase("new")
            assert not _unwraps(_recover(old_key_file), "old", tmp_path)
            engine.wipe()
        assert not path.exists()
        # The attacker's haul after wipe(): the old key file's blocks and the database's.
        stash = tmp_path / "stash"
        stash.mkdir()
        (stash / KEY_FILE).write_bytes(_recover(old_key_file))
        (stash / "profile.db").write_bytes(_recover(database))
        with pytest.raises((ProfileUnreadableError, KeyProviderError)):
            PersonalizationEngine(stash, key=Passphrase("old"), create=False)
    finally:
        os.close(old_key_file)
        os.close(database)


def test_rekey_overwrites_the_replaced_key_file_before_replacing_it(tmp_path: Path) -> None:
    path = _profile(tmp_path)
    backup = tmp_path / "backup.db"
    shutil.copy(path / "profile.db", backup)
    old_key_file = os.open(path / KEY_FILE, os.O_RDONLY)
    try:
        with PersonalizationEngine(path, key=Passphrase("old", kdf=FAST_KDF)) as engine:
            engine.rekey(Passphrase("new", kdf=FAST_KDF))
            engine.wipe()
        # The old key file's blocks no longer hold the key that opens the old database.
        assert not _unwraps(_recover(old_key_file), "old", tmp_path)
    finally:
        os.close(old_key_file)


def test_wipe_shreds_the_leftover_of_an_interrupted_key_file_write(tmp_path: Path) -> None:
    """A process killed between writing ``key.json.pending``'s temporary file and
    renaming it leaves the data key wrapped under the new passphrase: wipe() must not
    leave it behind."""
    path = _profile(tmp_path)
    with PersonalizationEngine(path, key=Passphrase("old", kdf=FAST_KDF)) as engine:
        leftover = path / f".{KEY_FILE}.pending.{secrets.token_hex(4)}.tmp"
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        Passphrase("new", kdf=FAST_KDF).store(scratch, engine._key, pending=True)
        shutil.copy(scratch / "key.json.pending", leftover)
        engine.wipe()
    assert not path.exists()
