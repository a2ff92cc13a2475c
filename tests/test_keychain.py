"""The OS keychain key provider.

Two halves:

- ``@pytest.mark.keychain``: against a *real* Secret Service, Debian's gnome-keyring,
  each scenario on its own private D-Bus session with a temporary HOME (see
  ``keychain_env.py`` for the recipe, ``keychain_child.py`` for the scenarios). They
  skip when the tools are missing, and fail instead under CI (``CI`` set).
- In-process, with no Secret Service at all: insecure backends are refused before
  anything is written, and an explicit in-memory backend runs the full cycle.
"""

from __future__ import annotations

import functools
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.backends.null
import keyring.core
import keyring.errors
import pytest

import ondevice.keys
from ondevice import (
    Argon2Params,
    Keychain,
    KeychainUnavailableError,
    KeyProviderError,
    Passphrase,
    PersonalizationEngine,
    ProfileUnreadableError,
)

import keychain_env

CHEAP_KDF = Argon2Params(memory_kib=1024, iterations=1, lanes=1)


def new_markers(n: int = 4) -> list[str]:
    return [f"kcmarker-{secrets.token_hex(8)}" for _ in range(n)]


def new_service() -> str:
    return f"ondevice-test-{secrets.token_hex(6)}"


def record(engine: PersonalizationEngine, markers: list[str]) -> None:
    for marker in markers:
        engine.update_profile("alice", {"item_id": marker, "event": "view"})


def read_back(engine: PersonalizationEngine) -> list[str]:
    users = engine.export_profile("alice")["users"]
    return [row["item_id"] for user in users for row in user["interactions"]]


def left_on_disk(directory: Path) -> list[str]:
    """Names of the files in ``directory`` (none if it does not exist)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- against a real Secret Service (gnome-keyring on a private session bus) ---------------


def run_scenario(scenario: str, service: str, markers: list[str]) -> dict[str, Any]:
    return keychain_env.run_in_secret_service(
        scenario, args={"service": service, "markers": ",".join(markers)}
    )


@functools.cache
def shared_run(scenario: str) -> tuple[str, list[str], dict[str, Any]]:
    """One run of ``scenario``, shared by the tests that check different parts of it.
    Checks for the tools first (skip, or fail under CI); a failure is not cached."""
    keychain_env.require_secret_service_tools()
    service, markers = new_service(), new_markers()
    return service, markers, run_scenario(scenario, service, markers)


@pytest.mark.keychain
def test_default_backend_is_the_real_secret_service() -> None:
    _, _, obs = shared_run("roundtrip")
    assert obs["backend"] == "keyring.backends.SecretService.Keyring"


@pytest.mark.keychain
def test_keychain_profile_reads_back_after_reopen_and_markers_stay_encrypted() -> None:
    _, markers, obs = shared_run("roundtrip")
    assert obs["read_back"] == markers
    assert obs["files"] == ["key.json", "profile.db", "profile.lock"]
    assert obs["markers_on_disk"] == []


@pytest.mark.keychain
def test_data_key_lives_in_secret_service_and_key_json_only_names_it() -> None:
    service, _, obs = shared_run("roundtrip")
    descriptor = obs["key_json"]
    assert descriptor["provider"] == "keychain"
    assert descriptor["service"] == service
    assert set(descriptor) == {"format", "version", "provider", "service", "account"}
    # secret-tool (libsecret, not the keyring package) sees exactly one item...
    assert [item["username"] for item in obs["items"]] == [descriptor["account"]]
    secret = obs["items"][0]["secret"]
    assert len(bytes.fromhex(secret)) == 32
    assert secret not in repr(descriptor)
    # ...and it is the key: sqlcipher3 alone opens the database with it.
    assert obs["opens_with_keychain_secret"] is True


@pytest.mark.keychain
def test_no_key_argument_means_the_os_keychain_and_wipe_removes_its_entry() -> None:
    _, _, obs = shared_run("roundtrip")
    assert obs["default_key_json"]["provider"] == "keychain"
    assert obs["default_key_json"]["service"] == "ondevice"
    accounts = [item["username"] for item in obs["default_items"]]
    assert accounts == [obs["default_key_json"]["account"]]
    assert obs["default_items_after_wipe"] == []


@pytest.mark.keychain
def test_wipe_deletes_keychain_entry_and_files_and_old_copy_cannot_reopen() -> None:
    _, markers, obs = shared_run("wipe")
    assert obs["read_back_before"] == markers
    assert [item["username"] for item in obs["items_before"]] == [obs["account"]]
    assert obs["closed_after_wipe"] is True
    assert obs["items_after"] == []
    assert obs["profile_left"] in (None, [])
    # A copy of the whole directory (database and key.json) taken before wipe():
    error = obs["reopen_copy_error"]
    assert error is not None
    assert error["type"] in ("KeyProviderError", "ProfileUnreadableError")
    assert obs["copy_unchanged"] is True
    assert obs["items_after_reopen_attempt"] == []


@pytest.mark.keychain
def test_rekey_with_keychain_leaves_exactly_one_entry_holding_the_new_key() -> None:
    _, markers, obs = shared_run("rekey")
    assert [item["username"] for item in obs["items_before"]] == [obs["account_before"]]
    assert obs["account_after"] != obs["account_before"]
    assert [item["username"] for item in obs["items_after"]] == [obs["account_after"]]
    assert obs["items_after"][0]["secret"] != obs["items_before"][0]["secret"]
    assert "key.json.pending" not in obs["files_after"]
    assert obs["opens_with_old_secret"] is False
    assert obs["opens_with_new_secret"] is True
    assert obs["read_back_after_rekey"] == markers


@pytest.mark.keychain
def test_rekey_to_another_service_or_a_passphrase_releases_the_keychain_entry() -> None:
    service, markers, obs = shared_run("rekey")
    assert obs["moved_items_old_service"] == []
    assert obs["moved_key_json"]["service"] == service + "-moved"
    moved = [item["username"] for item in obs["moved_items_new_service"]]
    assert moved == [obs["moved_key_json"]["account"]]
    assert obs["passphrase_provider"] == "passphrase"
    assert obs["passphrase_items_old_service"] == []
    assert obs["read_back_passphrase"] == markers


@pytest.mark.keychain
def test_locked_keychain_is_a_key_provider_error_at_once_and_changes_nothing() -> None:
    _, _, obs = shared_run("locked")
    assert obs["locked"] is True
    assert obs["open_error"] is not None
    assert obs["open_error"]["type"] in ("KeyProviderError", "KeychainUnavailableError")
    assert obs["open_seconds"] < 5.0
    assert obs["files_unchanged"] is True


def test_missing_secret_service_tools_fail_under_ci_naming_the_install_script(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no tool is found
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"\.ci/install-system-deps"):
        keychain_env.require_secret_service_tools()


def test_missing_secret_service_tools_skip_outside_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="gnome-keyring-daemon"):
        keychain_env.require_secret_service_tools()


# -- in-process, no Secret Service --------------------------------------------------------


class InMemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring in a dict: for passing explicitly as ``Keychain(backend=...)``."""

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


# keyring registers every backend class it sees for auto-detection; take this test-only
# one back out, so no other test in this process ever gets it as the default keyring.
getattr(keyring.backend.KeyringBackend, "_classes", set()).discard(InMemoryKeyring)


def trust_backend(monkeypatch: pytest.MonkeyPatch, backend_class: type) -> None:
    """Add a test backend class to the allowlist of secure keychains, for one test."""
    name = f"{backend_class.__module__}.{backend_class.__qualname__}"
    monkeypatch.setattr(ondevice.keys, "_SECURE_BACKENDS", ondevice.keys._SECURE_BACKENDS | {name})


@pytest.fixture(autouse=True)
def _in_memory_keyring_is_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only allowlisted backends are ever used: the dict-backed one stands in for a
    real OS keychain here."""
    trust_backend(monkeypatch, InMemoryKeyring)


@pytest.fixture
def fail_keyring(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """keyring's default backend is its ``fail`` backend for the test; the previous
    state (including "not detected yet") is restored afterwards."""
    monkeypatch.setattr(keyring.core, "_keyring_backend", keyring.core._keyring_backend)
    keyring.set_keyring(keyring.backends.fail.Keyring())  # type: ignore[no-untyped-call]
    yield


def test_fail_backend_is_refused_with_a_hint_and_nothing_is_created(
    fail_keyring: None, tmp_path: Path
) -> None:
    profile = tmp_path / "profile"
    with pytest.raises(KeychainUnavailableError) as info:
        PersonalizationEngine(profile, key=Keychain(service=new_service()))
    message = str(info.value)
    assert "Passphrase" in message
    assert "RawKey" in message
    assert "keyring.backends.fail.Keyring" in message
    assert left_on_disk(profile) == []


def test_no_key_argument_with_only_the_fail_backend_is_refused(
    fail_keyring: None, tmp_path: Path
) -> None:
    profile = tmp_path / "profile"
    with pytest.raises(KeychainUnavailableError, match="Passphrase"):
        PersonalizationEngine(profile, privacy_level="behavioral")
    assert left_on_disk(profile) == []


def test_explicit_null_backend_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    provider = Keychain(service=new_service(), backend=keyring.backends.null.Keyring())  # type: ignore[no-untyped-call]
    with pytest.raises(KeychainUnavailableError, match=r"keyring\.backends\.null\.Keyring"):
        PersonalizationEngine(profile, key=provider)
    assert left_on_disk(profile) == []


def test_explicit_plaintext_file_keyring_is_refused(tmp_path: Path) -> None:
    alt = pytest.importorskip("keyrings.alt.file")  # not a dependency; never installed for this
    profile = tmp_path / "profile"
    provider = Keychain(service=new_service(), backend=alt.PlaintextKeyring())
    with pytest.raises(KeychainUnavailableError, match="PlaintextKeyring"):
        PersonalizationEngine(profile, key=provider)
    assert left_on_disk(profile) == []


def test_explicit_in_memory_backend_runs_create_reopen_wipe(tmp_path: Path) -> None:
    backend, service, markers = InMemoryKeyring(), new_service(), new_markers()
    profile, backup = tmp_path / "profile", tmp_path / "backup"
    with PersonalizationEngine(
        profile, key=Keychain(service=service, backend=backend), privacy_level="behavioral"
    ) as engine:
        record(engine, markers)
    assert len(backend.entries) == 1
    ((entry_service, account),) = backend.entries
    assert entry_service == service
    assert f'"account":"{account}"' in (profile / "key.json").read_text()
    blob = b"".join((profile / name).read_bytes() for name in left_on_disk(profile))
    assert not any(m.encode() in blob for m in markers)
    assert backend.entries[(service, account)].encode() not in blob

    shutil.copytree(profile, backup)
    engine = PersonalizationEngine(profile, key=Keychain(service=service, backend=backend))
    assert read_back(engine) == markers
    engine.wipe()
    assert backend.entries == {}
    assert left_on_disk(profile) == []
    with pytest.raises((KeyProviderError, ProfileUnreadableError)):
        PersonalizationEngine(backup, key=Keychain(service=service, backend=backend), create=False)
    assert backend.entries == {}


def test_in_memory_backend_rekey_keeps_one_entry_and_passphrase_move_releases_it(
    tmp_path: Path,
) -> None:
    backend, service, markers = InMemoryKeyring(), new_service(), new_markers()
    profile = tmp_path / "profile"
    with PersonalizationEngine(profile, key=Keychain(service=service, backend=backend)) as engine:
        record(engine, markers)
        before = dict(backend.entries)
        engine.rekey()
        assert len(backend.entries) == 1
        assert backend.entries.keys().isdisjoint(before.keys())
        engine.rekey(Passphrase("a new secret", kdf=CHEAP_KDF))
        assert backend.entries == {}
    with PersonalizationEngine(profile, key=Passphrase("a new secret", kdf=CHEAP_KDF)) as engine:
        assert read_back(engine) == markers


class _Crash(BaseException):
    """Stands for the process dying at that point."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def hook(reached: str) -> None:
        if reached == name:
            raise _Crash(name)

    monkeypatch.setattr(ondevice.keys, "step_hook", hook)


def test_rotation_interrupted_after_reencryption_finishes_at_open_with_one_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, service, markers = InMemoryKeyring(), new_service(), new_markers(2)
    profile = tmp_path / "profile"
    engine = PersonalizationEngine(profile, key=Keychain(service=service, backend=backend))
    record(engine, markers)
    # The process dies once the database is re-encrypted under the new key, before
    # key.json names that key (the pending key is already stored).
    _crash_at(monkeypatch, "database:rekeyed")
    with pytest.raises(_Crash):
        engine.rekey(Keychain(service=service, backend=backend))
    monkeypatch.setattr(ondevice.keys, "step_hook", None)
    engine.close()

    with PersonalizationEngine(profile, key=Keychain(service=service, backend=backend)) as engine:
        assert read_back(engine) == markers
        assert "key.json.pending" not in left_on_disk(profile)
        # Only the new key is left: the replaced one would reopen old copies after wipe().
        assert len(backend.entries) == 1
        engine.wipe()
    assert backend.entries == {}
