"""Only keyring backends known to be secure hold a data key (issue 10, item 6).

A list of known-bad backends let through a subclass of the plaintext keyring, or the
plaintext keyring inside keyring's chainer or keyrings.alt's multipart wrapper, and the
data key landed in a plaintext file. Now wrappers are resolved to the backend that
would hold the key, and only exact, allowlisted OS keychain classes are used.

No Secret Service runs here: no key is ever stored in a secure backend (the real
Secret Service tests are in test_keychain.py). Every refusal must come before anything
is written, and no plaintext keyring file may appear.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.backends.chainer
import keyring.backends.SecretService
import keyring.core
import pytest
from keyrings.alt.file import PlaintextKeyring
from keyrings.alt.multi import MultipartKeyringWrapper

from ondevice import Keychain, KeychainUnavailableError, PersonalizationEngine


class SneakyPlaintext(PlaintextKeyring):
    """A plaintext keyring under another name."""


class SecretServiceLookalike(keyring.backends.SecretService.Keyring):
    """A subclass of a secure backend: it may store anywhere."""


# Keep the test-only classes out of keyring's auto-detection.
for _cls in (SneakyPlaintext, SecretServiceLookalike):
    getattr(keyring.backend.KeyringBackend, "_classes", set()).discard(_cls)


def _impostor() -> Any:
    """A class that *claims* the Secret Service backend's module and name."""
    cls = type(
        "Keyring",
        (PlaintextKeyring,),
        {"__module__": "keyring.backends.SecretService", "__qualname__": "Keyring"},
    )
    getattr(keyring.backend.KeyringBackend, "_classes", set()).discard(cls)
    return cls()


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the plaintext keyring's file into tmp_path (never the real home), and
    keep keyring's default backend as it was after the test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setattr(keyring.core, "_keyring_backend", keyring.core._keyring_backend)
    yield home


def _files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _chainer_of(monkeypatch: pytest.MonkeyPatch, *backends: Any) -> Any:
    """keyring's ChainerBackend over exactly ``backends`` (it chains every detected
    backend that reports a priority: both are replaced for the test, as the Secret
    Service backend reports its priority only with a session bus)."""
    monkeypatch.setattr(keyring.backend, "get_all_keyring", lambda: [])
    monkeypatch.setattr(keyring.backends.chainer.ChainerBackend, "backends", list(backends))
    return keyring.backends.chainer.ChainerBackend()


@pytest.fixture
def secret_service() -> Any:
    """A Secret Service backend object (never asked to store anything here)."""
    return keyring.backends.SecretService.Keyring()


def _refused(tmp_path: Path, isolated_home: Path, backend: Any, names: str) -> None:
    profile = tmp_path / "profile"
    with pytest.raises(KeychainUnavailableError, match=names) as info:
        PersonalizationEngine(profile, key=Keychain(service="svc", backend=backend))
    assert "Passphrase" in str(info.value)
    assert not profile.exists()
    assert _files_under(isolated_home) == []  # no plaintext keyring file either


def test_a_subclass_of_the_plaintext_keyring_is_refused(
    tmp_path: Path, isolated_home: Path
) -> None:
    _refused(tmp_path, isolated_home, SneakyPlaintext(), "SneakyPlaintext")


def test_the_plaintext_keyring_inside_keyrings_chainer_is_refused(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chainer = _chainer_of(monkeypatch, PlaintextKeyring())
    _refused(tmp_path, isolated_home, chainer, r"keyrings\.alt\.file\.PlaintextKeyring")


def test_the_plaintext_keyring_inside_the_multipart_wrapper_is_refused(
    tmp_path: Path, isolated_home: Path
) -> None:
    wrapper = MultipartKeyringWrapper(PlaintextKeyring())
    _refused(tmp_path, isolated_home, wrapper, r"keyrings\.alt\.file\.PlaintextKeyring")


def test_a_subclass_of_a_secure_backend_is_refused(tmp_path: Path, isolated_home: Path) -> None:
    _refused(tmp_path, isolated_home, SecretServiceLookalike(), "SecretServiceLookalike")


def test_a_class_claiming_a_secure_backends_name_is_refused(
    tmp_path: Path, isolated_home: Path
) -> None:
    _refused(tmp_path, isolated_home, _impostor(), r"keyring\.backends\.SecretService\.Keyring")


def test_an_unknown_backend_is_refused(tmp_path: Path, isolated_home: Path) -> None:
    class Homemade(keyring.backend.KeyringBackend):
        priority = 1

        def get_password(self, service: str, username: str) -> str | None:
            return None

        def set_password(self, service: str, username: str, password: str) -> None:
            raise AssertionError("must never be asked to store a key")

        def delete_password(self, service: str, username: str) -> None:
            return None

    getattr(keyring.backend.KeyringBackend, "_classes", set()).discard(Homemade)
    _refused(tmp_path, isolated_home, Homemade(), "Homemade")


def test_the_default_plaintext_backend_is_refused(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring.set_keyring(_chainer_of(monkeypatch, PlaintextKeyring()))  # type: ignore[no-untyped-call]
    profile = tmp_path / "profile"
    with pytest.raises(KeychainUnavailableError, match="PlaintextKeyring"):
        PersonalizationEngine(profile)
    assert not profile.exists()
    assert _files_under(isolated_home) == []


def test_a_chainer_holding_a_secure_backend_resolves_to_that_backend(
    monkeypatch: pytest.MonkeyPatch, secret_service: Any
) -> None:
    chainer = _chainer_of(monkeypatch, PlaintextKeyring(), secret_service)
    assert Keychain(backend=chainer).backend() is secret_service
    keyring.set_keyring(chainer)  # type: ignore[no-untyped-call]
    assert Keychain().backend() is secret_service


def test_a_multipart_wrapper_around_a_secure_backend_resolves_to_that_backend(
    secret_service: Any,
) -> None:
    assert Keychain(backend=MultipartKeyringWrapper(secret_service)).backend() is secret_service


def test_the_exact_secure_backend_is_accepted(secret_service: Any) -> None:
    assert Keychain(backend=secret_service).backend() is secret_service
