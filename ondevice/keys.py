"""Key providers: where the profile's data key comes from, and how it is destroyed.

Every profile is encrypted with a random 256-bit *data key*, handed to SQLCipher as a
raw key (no key derivation on every open). A key provider keeps that data key:

- :class:`RawKey`: the host app holds the 32 bytes itself.
- :class:`Passphrase`: the data key is wrapped with AES-256-GCM under a key derived
  from the passphrase with Argon2id, in ``key.json`` beside the database. Changing the
  passphrase re-wraps the data key; the database is not re-encrypted.
- :class:`Keychain`: the data key lives in the OS keychain through ``keyring``.
  Insecure backends (plaintext files, the ``fail`` and ``null`` backends) are refused.

``key.json`` (plaintext, no secret in it but the *wrapped* key) says which provider a
profile uses, so a mismatch is a clear error. Crypto-shredding (:meth:`KeyProvider.destroy`)
overwrites and deletes the key file and deletes the keychain entry.

What no software can promise: a backup of ``key.json`` plus the passphrase (or a copy of
the raw key) reopens a backup of the database. Shredding destroys the copies it can see.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .errors import (
    InvalidInputError,
    KeychainUnavailableError,
    KeyProviderError,
    ProfileBusyError,
    ProfileUnreadableError,
    ProfileVersionError,
    StorageError,
)

__all__ = ["Argon2Params", "KeyProvider", "Keychain", "Passphrase", "RawKey"]

log = logging.getLogger(__name__)

KEY_FILE: Final = "key.json"
#: An empty file whose advisory lock serializes what changes key material: creating a
#: profile, rotating its key, finishing an interrupted rotation.
LOCK_FILE: Final = "profile.lock"
KEY_FORMAT: Final = "ondevice.key"
KEY_VERSION: Final = 1
DATA_KEY_BYTES: Final = 32
UNREADABLE: Final = (
    "cannot open the profile: wrong key or passphrase, or the profile files were "
    "modified or truncated"
)


@contextlib.contextmanager
def key_lock(directory: Path, timeout: float) -> Iterator[None]:
    """Hold the profile directory's key lock (an OS advisory lock on ``profile.lock``)
    for the block, waiting up to ``timeout`` seconds for another process to release it.
    Only code that creates or changes key material takes it, so opening a profile whose
    key is settled never writes a byte."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create the lock file in {directory}: {exc.strerror}") from exc
    locked = False
    try:
        deadline = time.monotonic() + timeout
        while not locked:
            try:
                _try_lock(fd)
                locked = True
            except OSError:
                if time.monotonic() > deadline:
                    raise ProfileBusyError(
                        "another process is creating or re-keying this profile; try again"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        if locked:
            with contextlib.suppress(OSError):
                _unlock(fd)
        os.close(fd)


def _try_lock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def new_data_key() -> bytes:
    """A fresh random 256-bit data key from the OS CSPRNG."""
    return secrets.token_bytes(DATA_KEY_BYTES)


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id cost parameters. The default is RFC 9106's second recommended option
    (64 MiB, 3 passes, 4 lanes): about 0.13 s on a 2-core laptop-class machine."""

    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if self.memory_kib < 8 * self.lanes or self.iterations < 1 or self.lanes < 1:
            raise InvalidInputError("Argon2 parameters out of range")

    def derive(self, secret: bytes, salt: bytes) -> bytes:
        """Derive a 256-bit key-encryption key."""
        kdf = Argon2id(
            salt=salt,
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(secret)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored beside the wrapped key."""
        return {
            "name": "argon2id",
            "memory_kib": self.memory_kib,
            "iterations": self.iterations,
            "lanes": self.lanes,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Argon2Params:
        """Parse :meth:`to_dict` output; anything else raises ValueError/TypeError/KeyError."""
        if not isinstance(d, dict) or d.get("name") != "argon2id":
            raise ValueError("unsupported KDF")
        mem, it, lanes = d["memory_kib"], d["iterations"], d["lanes"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (mem, it, lanes)):
            raise TypeError("KDF parameters must be ints")
        # An export or key file from elsewhere must not make us allocate gigabytes.
        if mem > 1024 * 1024 or it > 16 or lanes > 16:
            raise ValueError("KDF parameters unreasonably large")
        return cls(memory_kib=mem, iterations=it, lanes=lanes)


def b64e(data: bytes) -> str:
    """Base64 (standard alphabet) as text."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: object) -> bytes:
    """Strict base64 decode; raises ValueError on anything malformed."""
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)


def seal(secret: bytes, params: Argon2Params, plaintext: bytes, aad: bytes) -> dict[str, str]:
    """Encrypt ``plaintext`` under a key derived from ``secret`` (Argon2id + AES-256-GCM).

    Returns the salt, nonce and ciphertext as base64; ``aad`` must be given again to
    :func:`unseal`. Used for wrapped keys and encrypted exports.
    """
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    kek = params.derive(secret, salt)
    ct = AESGCM(kek).encrypt(nonce, plaintext, aad)
    return {"salt": b64e(salt), "nonce": b64e(nonce), "ciphertext": b64e(ct)}


def unseal(secret: bytes, params: Argon2Params, sealed: dict[str, Any], aad: bytes) -> bytes:
    """Inverse of :func:`seal`. Raises ``InvalidTag`` or ``ValueError`` on a wrong secret
    or any modified byte; callers translate."""
    salt, nonce, ct = b64d(sealed["salt"]), b64d(sealed["nonce"]), b64d(sealed["ciphertext"])
    if len(salt) != 16 or len(nonce) != 12:
        raise ValueError("bad salt or nonce length")
    return AESGCM(params.derive(secret, salt)).decrypt(nonce, ct, aad)


def canonical(data: dict[str, Any]) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces), used as AEAD associated data."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync dir),
    readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or unlink in it is durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def shred_file(path: Path) -> None:
    """Overwrite a small file with random bytes, fsync, then delete it.

    On copy-on-write or journaling file systems and on SSDs the old blocks may survive
    the overwrite; destroying the *key* is what makes the data unreadable, so this is a
    best effort on top of that.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    try:
        with open(path, "r+b") as fh:
            fh.write(secrets.token_bytes(max(size, 1)))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        log.warning("could not overwrite %s before deleting it: %s", path.name, exc)
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot delete {path.name}: {exc.strerror or exc}") from exc


def read_key_file(directory: Path, name: str = KEY_FILE) -> dict[str, Any] | None:
    """The parsed ``key.json`` (or another key file) of a profile, or None if absent."""
    path = directory / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyProviderError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ProfileUnreadableError(UNREADABLE) from None
    if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
        raise ProfileUnreadableError(UNREADABLE)
    version = data.get("version")
    if not isinstance(version, int):
        raise ProfileUnreadableError(UNREADABLE)
    if version > KEY_VERSION:
        raise ProfileVersionError(
            f"the key file was written by a newer ondevice (key format {version}; this "
            f"version reads up to {KEY_VERSION}); upgrade ondevice"
        )
    return data


class KeyProvider(ABC):
    """Supplies and keeps the data key of a profile directory."""

    #: The name recorded in ``key.json``.
    kind: str = ""

    def create(self, directory: Path) -> bytes:
        """Make a new data key for a new profile, keep it, and return it."""
        key = self._initial_key()
        self.store(directory, key)
        return key

    def _initial_key(self) -> bytes:
        return new_data_key()

    def check_available(self) -> None:
        """Raise now if this provider cannot work here (before anything is created)."""
        return None

    @abstractmethod
    def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
        """Keep ``key`` as the profile's data key (``pending``: as the candidate of an
        unfinished key rotation, see :meth:`load_candidates`)."""

    @abstractmethod
    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        """Return the data key described by ``descriptor`` (a parsed ``key.json``)."""

    def destroy(self, directory: Path) -> None:
        """Destroy the key material this provider keeps for ``directory``."""
        for name in (KEY_FILE, KEY_FILE + ".pending"):
            shred_file(directory / name)

    def load_candidates(self, directory: Path) -> list[tuple[bytes, bool]]:
        """Keys to try, in order, each with whether it is the *pending* key: the current
        key, then the pending key of a rotation that was interrupted (a crash between
        re-encrypting and switching key files). Only the key files of this provider's
        kind are read, so after an interrupted move from one kind of key to another the
        profile opens with either the old or the new provider."""
        descriptor = read_key_file(directory)
        if descriptor is None:
            raise KeyProviderError(
                f"{directory} has a database but no {KEY_FILE}: the key material was "
                "destroyed or never copied; the profile cannot be opened"
            )
        keys: list[tuple[bytes, bool]] = []
        if descriptor.get("provider") == self.kind:
            keys.append((self.load(directory, descriptor), False))
        pending = directory / (KEY_FILE + ".pending")
        if pending.exists():
            try:
                data = json.loads(pending.read_bytes())
                if not isinstance(data, dict):
                    raise ValueError("pending key file is not an object")
                if data.get("provider") == self.kind:
                    keys.append((self.load(directory, data), True))
            except (KeyProviderError, ProfileUnreadableError, ValueError, OSError):
                log.warning("ignoring an unreadable pending key from an interrupted rotation")
        if not keys:
            self._check_kind(descriptor)
        return keys

    def commit_pending(self, directory: Path) -> None:
        """Make the pending key of a finished rotation the current one."""
        pending = directory / (KEY_FILE + ".pending")
        if pending.exists():
            os.replace(pending, directory / KEY_FILE)
            fsync_dir(directory)

    def discard_pending(self, directory: Path) -> None:
        """Forget the pending key of a rotation that did not happen."""
        shred_file(directory / (KEY_FILE + ".pending"))

    def release(self, directory: Path) -> None:
        """Delete key material kept outside the directory (a keychain entry) for the
        current ``key.json``."""
        return None

    def release_descriptor(self, descriptor: dict[str, Any]) -> None:
        """Delete key material kept outside the directory for the key ``descriptor``
        names (a parsed ``key.json``); called on the old provider once a rotation has
        switched ``key.json`` to the new key."""
        return None

    def _check_kind(self, descriptor: dict[str, Any]) -> None:
        kind = descriptor.get("provider")
        if kind != self.kind:
            raise KeyProviderError(
                f"this profile is protected by a {kind!r} key, but a {self.kind!r} key was given"
            )

    def _descriptor(self, **fields: Any) -> dict[str, Any]:
        return {"format": KEY_FORMAT, "version": KEY_VERSION, "provider": self.kind, **fields}

    def _write(self, directory: Path, data: dict[str, Any], pending: bool) -> None:
        name = KEY_FILE + (".pending" if pending else "")
        try:
            write_atomic(directory / name, canonical(data))
        except OSError as exc:
            raise StorageError(f"cannot write {name}: {exc.strerror or exc}") from exc


class RawKey(KeyProvider):
    """A 32-byte key the host app keeps itself (for example in its own secure storage).

    The SDK never writes this key anywhere; ``key.json`` only records that the profile
    uses a raw key. Crypto-shredding cannot destroy the host's copy: forget it yourself.
    """

    kind = "raw"

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != DATA_KEY_BYTES:
            raise InvalidInputError("a raw key must be exactly 32 bytes")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "RawKey(<32 bytes, hidden>)"

    def _initial_key(self) -> bytes:
        return self._key

    def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
        if key != self._key:
            raise KeyProviderError(
                "a raw key cannot be rotated in place: pass the new key with rekey(RawKey(...))"
            )
        self._write(directory, self._descriptor(), pending)

    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        return self._key


class Passphrase(KeyProvider):
    """A passphrase that unwraps the data key stored, encrypted, in ``key.json``.

    The passphrase is run through Argon2id (:class:`Argon2Params`) once per open. A
    lost passphrase means a lost profile: keep an export if that matters.
    """

    kind = "passphrase"

    def __init__(self, passphrase: str | bytes, *, kdf: Argon2Params | None = None) -> None:
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not isinstance(passphrase, bytes) or not passphrase:
            raise InvalidInputError("the passphrase must be a non-empty str or bytes")
        self._secret = passphrase
        self._kdf = kdf or Argon2Params()

    def __repr__(self) -> str:
        return "Passphrase(<hidden>)"

    def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
        header = self._descriptor(kdf=self._kdf.to_dict())
        sealed = seal(self._secret, self._kdf, key, canonical(header))
        self._write(directory, {**header, "wrapped_key": sealed}, pending)

    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        try:
            params = Argon2Params.from_dict(descriptor["kdf"])
            header = {k: v for k, v in descriptor.items() if k != "wrapped_key"}
            key = unseal(self._secret, params, descriptor["wrapped_key"], canonical(header))
        except (InvalidTag, ValueError, TypeError, KeyError, InvalidInputError):
            raise ProfileUnreadableError(UNREADABLE) from None
        if len(key) != DATA_KEY_BYTES:
            raise ProfileUnreadableError(UNREADABLE)
        return key


_INSECURE_BACKENDS: Final = frozenset(
    {
        "keyring.backends.fail.Keyring",
        "keyring.backends.null.Keyring",
        "keyrings.alt.file.PlaintextKeyring",
        "keyrings.alt.file.EncryptedKeyring",  # prompts on a terminal; unusable in apps
        "keyrings.alt.Gnome.Keyring",
    }
)
_SECURE_MODULES: Final = (
    "keyring.backends.SecretService",
    "keyring.backends.libsecret",
    "keyring.backends.kwallet",
    "keyring.backends.macOS",
    "keyring.backends.Windows",
)


def _backend_name(backend: object) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


class Keychain(KeyProvider):
    """The OS keychain (Secret Service on Linux, Keychain on macOS, Credential Locker on
    Windows) through the optional ``keyring`` package (``pip install ondevice[keyring]``).

    With no ``backend``, the keyring's default backend is used only if it is a known
    secure one; plaintext and placeholder backends are refused with
    :class:`KeychainUnavailableError`. An explicit ``backend`` is trusted unless it is a
    known insecure one (tests pass an in-memory backend this way).
    """

    kind = "keychain"

    def __init__(self, *, service: str = "ondevice", backend: Any = None) -> None:
        if not isinstance(service, str) or not service:
            raise InvalidInputError("service must be a non-empty str")
        self.service = service
        self._explicit = backend
        self._backend: Any = None

    def __repr__(self) -> str:
        return f"Keychain(service={self.service!r})"

    def check_available(self) -> None:
        self.backend()

    def backend(self) -> Any:
        """The keyring backend that will be used, after the security check."""
        if self._backend is not None:
            return self._backend
        if self._explicit is not None:
            chosen = self._explicit
            if _backend_name(chosen) in _INSECURE_BACKENDS:
                raise KeychainUnavailableError(
                    f"refusing the insecure keyring backend {_backend_name(chosen)}; pass "
                    "key=Passphrase(...) or key=RawKey(...) instead"
                )
        else:
            try:
                import keyring
            except ImportError:
                raise KeychainUnavailableError(
                    "the OS keychain needs the keyring package: pip install 'ondevice[keyring]'"
                    "; or pass key=Passphrase(...) or key=RawKey(...)"
                ) from None
            chosen = keyring.get_keyring()
            candidates = list(getattr(chosen, "backends", None) or [chosen])
            secure = [b for b in candidates if _backend_name(b).startswith(_SECURE_MODULES)]
            if not secure:
                names = ", ".join(_backend_name(b) for b in candidates) or "none"
                raise KeychainUnavailableError(
                    f"no secure OS keychain is available (found: {names}); pass "
                    "key=Passphrase(...) or key=RawKey(...) instead"
                )
            chosen = secure[0]
        self._backend = chosen
        return chosen

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # keyring raises many unrelated types
            raise KeyProviderError(f"the OS keychain failed to {what}: {exc}") from exc

    def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
        backend = self.backend()
        account = f"profile-{uuid.uuid4()}"
        self._call("store the key", backend.set_password, self.service, account, key.hex())
        self._write(directory, self._descriptor(service=self.service, account=account), pending)

    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        service, account = descriptor.get("service"), descriptor.get("account")
        if not isinstance(service, str) or not isinstance(account, str):
            raise ProfileUnreadableError(UNREADABLE)
        secret = self._call("read the key", self.backend().get_password, service, account)
        if secret is None:
            raise KeyProviderError(
                f"the keychain has no key for this profile (service {service!r}, account "
                f"{account!r}): it was deleted, or this is another user's keychain"
            )
        try:
            key = bytes.fromhex(secret)
        except (ValueError, TypeError):
            raise ProfileUnreadableError(UNREADABLE) from None
        if len(key) != DATA_KEY_BYTES:
            raise ProfileUnreadableError(UNREADABLE)
        return key

    def destroy(self, directory: Path) -> None:
        for name in (KEY_FILE, KEY_FILE + ".pending"):
            self._delete_entry(directory / name)
        super().destroy(directory)

    def discard_pending(self, directory: Path) -> None:
        self._delete_entry(directory / (KEY_FILE + ".pending"))
        super().discard_pending(directory)

    def release(self, directory: Path) -> None:
        self._delete_entry(directory / KEY_FILE)

    def _delete_entry(self, key_file: Path) -> None:
        try:
            data = json.loads(key_file.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(data, dict):
            self.release_descriptor(data)

    def release_descriptor(self, descriptor: dict[str, Any]) -> None:
        service, account = descriptor.get("service"), descriptor.get("account")
        if descriptor.get("provider") != self.kind or not isinstance(account, str):
            return
        backend = self.backend()
        try:
            backend.delete_password(service, account)
        except Exception as exc:
            # keyring raises PasswordDeleteError when the entry is already gone.
            if type(exc).__name__ != "PasswordDeleteError":
                raise KeyProviderError(f"the OS keychain failed to delete the key: {exc}") from exc
