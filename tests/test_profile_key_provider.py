"""``profile_key_provider``: an app asks which key a profile needs before opening it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ondevice import (
    KeyProviderError,
    Passphrase,
    PersonalizationEngine,
    ProfileUnreadableError,
    ProfileVersionError,
    RawKey,
    profile_key_provider,
)

from conftest import FAST_KDF


def _make(path: Path, key: RawKey | Passphrase) -> None:
    with PersonalizationEngine(path, key=key) as engine:
        engine.update_profile("u", {"item_id": "a", "event": "click"})


def test_no_profile_is_none_and_asking_creates_nothing(tmp_path: Path) -> None:
    assert profile_key_provider(tmp_path / "absent") is None
    assert not (tmp_path / "absent").exists()
    (tmp_path / "empty").mkdir()
    assert profile_key_provider(tmp_path / "empty") is None
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize(
    ("make_key", "expected"),
    [
        (lambda: RawKey(bytes(range(32))), "raw"),
        (lambda: Passphrase("a passphrase", kdf=FAST_KDF), "passphrase"),
    ],
)
def test_names_the_kind_that_made_the_profile(tmp_path: Path, make_key, expected) -> None:
    _make(tmp_path / "p", make_key())
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p").iterdir()}
    assert profile_key_provider(tmp_path / "p") == expected
    assert profile_key_provider(str(tmp_path / "p")) == expected  # str paths too
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p").iterdir()}
    assert after == before  # read only


def test_after_a_rotation_the_new_kind_answers(tmp_path: Path) -> None:
    with PersonalizationEngine(tmp_path / "p", key=RawKey(bytes(range(32)))) as engine:
        engine.rekey(Passphrase("new passphrase", kdf=FAST_KDF))
    assert profile_key_provider(tmp_path / "p") == "passphrase"


def test_a_database_without_its_key_file_is_a_clear_error(tmp_path: Path) -> None:
    _make(tmp_path / "p", RawKey(bytes(range(32))))
    (tmp_path / "p" / "key.json").unlink()
    with pytest.raises(KeyProviderError, match=r"no key\.json"):
        profile_key_provider(tmp_path / "p")


def test_hostile_key_files_raise_the_librarys_errors(tmp_path: Path) -> None:
    _make(tmp_path / "p", RawKey(bytes(range(32))))
    key_file = tmp_path / "p" / "key.json"
    descriptor = json.loads(key_file.read_bytes())

    key_file.write_text(json.dumps({**descriptor, "provider": "cloud"}))
    with pytest.raises(KeyProviderError, match="unknown key provider 'cloud'"):
        profile_key_provider(tmp_path / "p")
    key_file.write_text(json.dumps({**descriptor, "provider": ["raw"]}))
    with pytest.raises(KeyProviderError, match="unknown key provider"):
        profile_key_provider(tmp_path / "p")
    key_file.write_bytes(b"\xff{not json")
    with pytest.raises(ProfileUnreadableError):
        profile_key_provider(tmp_path / "p")
    key_file.write_text(json.dumps({**descriptor, "version": 99}))
    with pytest.raises(ProfileVersionError, match="newer ondevice"):
        profile_key_provider(tmp_path / "p")


def test_a_fifo_in_place_of_the_key_file_is_refused_without_blocking(tmp_path: Path) -> None:
    import os
    import threading

    (tmp_path / "p").mkdir()
    os.mkfifo(tmp_path / "p" / "key.json")
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            profile_key_provider(tmp_path / "p")
        except KeyProviderError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "profile_key_provider blocked on a FIFO"
    assert outcome and "not a regular file" in str(outcome[0])
