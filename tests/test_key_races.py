"""Key material under concurrency: a second process opening during a key rotation, or
creating the same profile at the same moment, must not lose the key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ondevice import Passphrase, PersonalizationEngine

from conftest import FAST_KDF

CHILD = """
import sys
from ondevice import PersonalizationEngine, Passphrase
# The key file's own Argon2 parameters unwrap the key; this child never wraps one.
e = PersonalizationEngine(sys.argv[1], key=Passphrase("pw"))
if len(sys.argv) > 2:
    e.update_profile(sys.argv[2], {"item_id": "from-the-other-process"})
e.close()
"""


def _spawn(path: Path, *extra: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # let it reach the point where it must wait for us
    return child


@pytest.mark.slow
def test_an_open_during_a_key_rotation_waits_and_the_profile_survives(tmp_path):
    path = tmp_path / "p"
    children: list[subprocess.Popen[str]] = []

    class OpenedMeanwhile(Passphrase):
        def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
            super().store(directory, key, pending=pending)
            if pending:  # the pending key exists; the database is not re-keyed yet
                children.append(_spawn(directory))

    with PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF)) as engine:
        engine.update_profile("alice", {"item_id": "x"})
        engine.rekey(OpenedMeanwhile("pw", kdf=FAST_KDF))
    _, err = children[0].communicate(timeout=60)
    assert children[0].returncode == 0, err
    with PersonalizationEngine(path, key=Passphrase("pw")) as engine:
        assert engine.users() == ["alice"]
    assert not (path / "key.json.pending").exists()


@pytest.mark.slow
def test_two_processes_creating_one_profile_end_with_one_readable_profile(tmp_path):
    path = tmp_path / "p"
    children: list[subprocess.Popen[str]] = []

    class CreatedMeanwhile(Passphrase):
        def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
            super().store(directory, key, pending=pending)
            if not children:  # key.json is written, profile.db not yet
                children.append(_spawn(directory, "bob"))

    with PersonalizationEngine(path, key=CreatedMeanwhile("pw", kdf=FAST_KDF)) as engine:
        engine.update_profile("alice", {"item_id": "x"})
    _, err = children[0].communicate(timeout=60)
    assert children[0].returncode == 0, err
    with PersonalizationEngine(path, key=Passphrase("pw")) as engine:
        assert engine.users() == ["alice", "bob"]


def test_a_stale_engine_cannot_rotate_or_rewrap_a_key_changed_elsewhere(tmp_path):
    """An engine opened before another one re-keyed the profile (or before a rotation
    was interrupted) must refuse to touch key material: it would destroy the new key."""
    from ondevice import KeyProviderError

    path = tmp_path / "p"
    stale = PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF))
    stale.update_profile("alice", {"item_id": "x"})
    with PersonalizationEngine(path, key=Passphrase("pw")) as other:
        other.rekey()
    with pytest.raises(KeyProviderError, match="reopen"):
        stale.rekey()
    with pytest.raises(KeyProviderError, match="reopen"):
        stale.change_passphrase("new")
    stale.close()
    with PersonalizationEngine(path, key=Passphrase("pw")) as engine:
        assert engine.users() == ["alice"]
