"""A malformed key file is the library's error, never a crash (issue 10, item 7).

A deeply nested ``key.json`` used to raise ``RecursionError`` out of the JSON parser.
Every read of a key file now goes through one parser that refuses anything that is not
a small, flat key descriptor with ProfileUnreadableError. These tests use only names
that exist in every version of ondevice, so they can be run against an older one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import keyring.backend
import keyring.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ondevice.keys
from ondevice import (
    Keychain,
    KeyProviderError,
    Passphrase,
    PersonalizationEngine,
    ProfileUnreadableError,
    ProfileVersionError,
    RawKey,
)

from conftest import FAST_KDF

DEEP = 100_000
NESTED_ARRAY = b"[" * DEEP + b"]" * DEEP
NESTED_OBJECT = b'{"a":' * DEEP + b"1" + b"}" * DEEP


def _nested_field(field: str) -> bytes:
    head = f'{{"format":"ondevice.key","version":1,"provider":"passphrase","{field}":'
    return head.encode() + NESTED_ARRAY + b"}"


MALFORMED = [
    pytest.param(NESTED_ARRAY, id="nested arrays"),
    pytest.param(NESTED_OBJECT, id="nested objects"),
    pytest.param(_nested_field("kdf"), id="nested kdf"),
    pytest.param(_nested_field("wrapped_key"), id="nested wrapped_key"),
    pytest.param(_nested_field("extra"), id="nested extra field"),
    pytest.param(
        b'{"format":"ondevice.key","version":1,"provider":"passphrase","kdf":{"a":{"b":1}}}',
        id="three levels",
    ),
    pytest.param(b" " * (8 * 1024 * 1024) + b"{}", id="8 MiB"),
    pytest.param(b"\xff\xfe{", id="not UTF-8"),
    pytest.param(b'{"format":"ondevice.key","version":true}', id="boolean version"),
]


@pytest.fixture
def passphrase_profile(tmp_path: Path) -> Path:
    path = tmp_path / "p"
    with PersonalizationEngine(path, key=Passphrase("pw", kdf=FAST_KDF)) as engine:
        engine.update_profile("alice", {"item_id": "x", "event": "view"})
    return path


@pytest.mark.parametrize("content", MALFORMED)
def test_a_malformed_key_json_is_profile_unreadable(
    passphrase_profile: Path, content: bytes
) -> None:
    (passphrase_profile / "key.json").write_bytes(content)
    with pytest.raises(ProfileUnreadableError):
        PersonalizationEngine(passphrase_profile, key=Passphrase("pw", kdf=FAST_KDF))


@pytest.mark.parametrize("content", MALFORMED)
def test_a_malformed_pending_key_file_is_ignored_and_the_profile_opens(
    passphrase_profile: Path, content: bytes
) -> None:
    (passphrase_profile / "key.json.pending").write_bytes(content)
    with PersonalizationEngine(passphrase_profile, key=Passphrase("pw", kdf=FAST_KDF)) as e:
        assert e.users() == ["alice"]
    assert not (passphrase_profile / "key.json.pending").exists()


class _DictKeyring(keyring.backend.KeyringBackend):
    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("no such password")


getattr(keyring.backend.KeyringBackend, "_classes", set()).discard(_DictKeyring)


@pytest.mark.parametrize("content", MALFORMED[:2])
def test_wipe_with_a_malformed_key_file_beside_a_keychain_key_still_shreds_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    name = f"{_DictKeyring.__module__}.{_DictKeyring.__qualname__}"
    allowed = getattr(ondevice.keys, "_SECURE_BACKENDS", frozenset())
    monkeypatch.setattr(ondevice.keys, "_SECURE_BACKENDS", allowed | {name}, raising=False)
    backend = _DictKeyring()
    path = tmp_path / "p"
    engine = PersonalizationEngine(path, key=Keychain(service="svc", backend=backend))
    (path / "key.json.pending").write_bytes(content)
    engine.wipe()
    assert not path.exists()
    assert backend.entries == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=json_values,
    provider=st.sampled_from(["passphrase", "raw", "keychain", 7]),
    version=st.sampled_from([1, 0, 2, "1", None]),
)
def test_any_json_in_key_json_is_one_of_the_librarys_errors(
    tmp_path_factory: pytest.TempPathFactory, value: object, provider: object, version: object
) -> None:
    base = tmp_path_factory.getbasetemp() / "fuzz-template"
    if not base.exists():
        with PersonalizationEngine(base, key=RawKey(bytes(32))) as engine:
            engine.update_profile("alice", {"item_id": "x", "event": "view"})
    path = tmp_path_factory.mktemp("fuzz")
    shutil.rmtree(path)
    shutil.copytree(base, path)
    for doc in (
        value,
        {"format": "ondevice.key", "version": version, "provider": provider, "kdf": value},
        {"format": "ondevice.key", "version": 1, "provider": provider, "wrapped_key": value},
    ):
        (path / "key.json").write_text(json.dumps(doc))
        for key in (Passphrase("pw", kdf=FAST_KDF), RawKey(bytes(32))):
            with contextlib.suppress(ProfileUnreadableError, KeyProviderError, ProfileVersionError):
                PersonalizationEngine(path, key=key, create=False).close()
