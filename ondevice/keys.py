"""Key providers: where the profile's data key comes from, and how it is destroyed.

Every profile is encrypted with a random 256-bit *data key*, handed to SQLCipher as a
raw key (no key derivation on every open). A key provider keeps that data key:

- :class:`RawKey`: the host app holds the 32 bytes itself.
- :class:`Passphrase`: the data key is wrapped with AES-256-GCM under a key derived
  from the passphrase with Argon2id, in ``key.json`` beside the database. Changing the
  passphrase re-wraps the data key; the database is not re-encrypted.
- :class:`Keychain`: the data key lives in the OS keychain through ``keyring``. Only
  keyring backends known to keep secrets in a real OS keychain are used (an allowlist:
  Secret Service, libsecret, KWallet, the macOS Keychain, the Windows Credential
  Locker); wrappers such as keyring's chainer are resolved to the backend that would
  hold the key, and anything else (plaintext files, placeholders, subclasses) is refused.

``key.json`` (plaintext, no secret in it but the *wrapped* key) says which provider a
profile uses, so a mismatch is a clear error. A key rotation (``ondevice.rotation``)
writes the new key to ``key.json.pending`` first; opening a profile tries every key
file the given provider can read, so an interrupted rotation never loses the key.

Argon2id parameters are bounded both ways (:class:`Argon2Params`): never weaker than
:data:`KDF_MIN_MEMORY_KIB` / :data:`KDF_MIN_ITERATIONS` for anything the SDK writes,
never costlier than the caps for anything it writes *or reads*, so a crafted key file
or export cannot make one attempt take minutes and gigabytes.

Crypto-shredding (:meth:`KeyProvider.destroy`) overwrites key files in place and deletes
them, and deletes the keychain entries; a rotation or a passphrase change overwrites the
replaced ``key.json`` in place before the new one takes its name. What no software can
promise: a backup of ``key.json`` plus the passphrase (or a copy of the raw key) reopens
a backup of the database; and an overwrite in place reaches the same disk blocks only
on a file system that rewrites in place. SSDs (wear levelling keeps old flash pages
until they are erased), copy-on-write file systems (btrfs, ZFS, APFS), snapshots,
journals that log data, and backups may all keep an old ``key.json``. Such a copy still
needs the passphrase it was wrapped under (Argon2id makes each guess costly), so a
passphrase that was ever exposed should be treated as exposing every key it wrapped.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ._fileio import NotARegularFileError, open_regular
from .errors import (
    InvalidInputError,
    KeychainUnavailableError,
    KeyProviderError,
    OndeviceError,
    ProfileBusyError,
    ProfileUnreadableError,
    ProfileVersionError,
    StorageError,
)

__all__ = ["Argon2Params", "KeyProvider", "Keychain", "Passphrase", "RawKey"]

log = logging.getLogger(__name__)

KEY_FILE: Final = "key.json"
#: The new key of a rotation in progress (or interrupted): see ``ondevice.rotation``.
PENDING_FILE: Final = KEY_FILE + ".pending"
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
#: A key file is a few hundred bytes; anything larger is not one (and is not read whole).
MAX_KEY_FILE_BYTES: Final = 64 * 1024
#: A key file holds one object whose values are scalars or objects of scalars (``kdf``,
#: ``wrapped_key``): deeper nesting is refused before anything else looks at it.
_MAX_KEY_FILE_DEPTH: Final = 2

#: The weakest Argon2id parameters the SDK writes (a wrapped key or an encrypted export):
#: OWASP's minimum for Argon2id, 19 MiB and 2 passes (about 50 ms a guess on a 2-core
#: machine, against 0.125 ms at the 8 KiB and one pass that used to be accepted).
KDF_MIN_MEMORY_KIB: Final = 19 * 1024
KDF_MIN_ITERATIONS: Final = 2
#: The costliest Argon2id parameters accepted anywhere: written (so the SDK never writes
#: more) and read (so a key file or an export cannot ask for more). 256 MiB, and at most
#: 1 GiB of memory passes (256 MiB x 4 passes, or 64 MiB x 16): about 1.5 s on a
#: 2-core machine, against 43 to 59 s and 1 GiB per attempt at the old read limit.
#: The default (64 MiB x 3 passes) is a fifth of that.
KDF_MAX_MEMORY_KIB: Final = 256 * 1024
KDF_MAX_ITERATIONS: Final = 16
KDF_MAX_LANES: Final = 8
KDF_MAX_MEMORY_PASSES_KIB: Final = 1024 * 1024

#: The floor :class:`Argon2Params` and :func:`seal` enforce, as (memory KiB, passes).
#: Nothing in the SDK changes it and no argument or environment variable reaches it;
#: only the test-suite lowers it, in its own process (tests/conftest.py), to derive its
#: hundreds of throwaway keys in a millisecond each.
_write_floor: tuple[int, int] = (KDF_MIN_MEMORY_KIB, KDF_MIN_ITERATIONS)

#: Test hook: when set, called with the name of each step of a change of key material,
#: in order, once the step is durable (see ``ondevice.rotation.STEPS``). The crash-safety
#: tests end a child process at each step in turn. Never set by the SDK.
step_hook: Callable[[str], None] | None = None


def step(name: str) -> None:
    """Mark a step of a change of key material (calls :data:`step_hook` if set)."""
    hook = step_hook
    if hook is not None:
        hook(name)


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


_KDF_FIELDS: Final = ("memory_kib", "iterations", "lanes")


@dataclass(frozen=True, slots=True)
class Argon2Params:
    """Argon2id cost parameters. The default is RFC 9106's second recommended option
    (64 MiB, 3 passes, 4 lanes): about 0.13 s on a 2-core laptop-class machine.

    Parameters are refused (:class:`~ondevice.InvalidInputError`) below the floor
    (:data:`KDF_MIN_MEMORY_KIB`, :data:`KDF_MIN_ITERATIONS`) and above the caps
    (:data:`KDF_MAX_MEMORY_KIB`, :data:`KDF_MAX_ITERATIONS`, :data:`KDF_MAX_LANES`, and
    memory times passes at most :data:`KDF_MAX_MEMORY_PASSES_KIB`). Parameters read from
    a file (:meth:`from_dict`) must be within the caps; they may be below the floor (a
    key file from an older version still opens), but such parameters never wrap a key
    or an export again.
    """

    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        self._check_caps()
        if not self._meets_floor():
            floor_kib, floor_passes = _write_floor
            raise InvalidInputError(
                f"Argon2 parameters too weak: at least {floor_kib} KiB of memory and "
                f"{floor_passes} passes"
            )

    def _check_caps(self) -> None:
        values = (self.memory_kib, self.iterations, self.lanes)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise InvalidInputError("Argon2 parameters must be ints")
        if not (
            1 <= self.lanes <= KDF_MAX_LANES
            and 1 <= self.iterations <= KDF_MAX_ITERATIONS
            and 8 * self.lanes <= self.memory_kib <= KDF_MAX_MEMORY_KIB
            and self.memory_kib * self.iterations <= KDF_MAX_MEMORY_PASSES_KIB
        ):
            raise InvalidInputError(
                f"Argon2 parameters out of range: at most {KDF_MAX_MEMORY_KIB} KiB, "
                f"{KDF_MAX_ITERATIONS} passes, {KDF_MAX_LANES} lanes and "
                f"{KDF_MAX_MEMORY_PASSES_KIB} KiB x passes"
            )

    def _meets_floor(self) -> bool:
        floor_kib, floor_passes = _write_floor
        return self.memory_kib >= floor_kib and self.iterations >= floor_passes

    def derive(self, secret: bytes, salt: bytes) -> bytes:
        """Derive a 256-bit key-encryption key."""
        self._check_caps()  # whatever made this instance, it never costs more
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
        """Parse :meth:`to_dict` output from a file. Parameters above the caps, and
        anything malformed, raise ValueError (TypeError or KeyError for a wrong shape)
        before any key is derived. Parameters below the floor are returned (an older
        key file still opens) but cannot be used to write."""
        if not isinstance(d, dict) or d.get("name") != "argon2id":
            raise ValueError("unsupported KDF")
        values = [d[name] for name in _KDF_FIELDS]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError("KDF parameters must be ints")
        params = object.__new__(cls)  # no floor check: reading is not choosing
        for name, value in zip(_KDF_FIELDS, values, strict=True):
            object.__setattr__(params, name, value)
        params._check_caps()  # an InvalidInputError is a ValueError
        return params


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
    :func:`unseal`. Used for wrapped keys and encrypted exports: the one place anything
    is written under a passphrase, so parameters below the floor are refused here
    (:class:`~ondevice.InvalidInputError`) whatever made them.
    """
    if not isinstance(params, Argon2Params) or not params._meets_floor():
        raise InvalidInputError("refusing to write under Argon2 parameters below the floor")
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
    readable by the owner only. Marks the steps ``<name>:tmp-synced`` (the temporary
    file is complete, not yet renamed) and ``<name>:replaced`` (see :func:`step`)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        step(f"{path.name}:tmp-synced")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    step(f"{path.name}:replaced")


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


def overwrite_in_place(path: Path) -> bool:
    """Overwrite every byte of a small file with random bytes and fsync it, keeping the
    file (its inode, and so its blocks on a file system that rewrites in place). False
    if there was no such file or the overwrite failed (logged).

    On SSDs, copy-on-write or data-journaling file systems, and in snapshots or backups,
    old copies of the bytes may survive: this is a best effort on top of destroying the
    key, never a substitute for it.
    """
    try:
        # Never through a symlink: only the profile's own file is overwritten.
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "r+b") as fh:
            remaining = max(os.fstat(fh.fileno()).st_size, 1)
            while remaining:
                chunk = min(remaining, 64 * 1024)
                fh.write(secrets.token_bytes(chunk))
                remaining -= chunk
            fh.flush()
            os.fsync(fh.fileno())
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("could not overwrite %s in place: %s", path.name, exc)
        return False
    return True


def shred_file(path: Path) -> None:
    """Overwrite a small file in place (:func:`overwrite_in_place`), then delete it."""
    if not overwrite_in_place(path) and not path.exists():
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot delete {path.name}: {exc.strerror or exc}") from exc


def leftover_key_files(directory: Path) -> list[Path]:
    """Temporary files of a key-file write that was interrupted before its rename (they
    may hold a wrapped key)."""
    try:
        return sorted(directory.glob(f".{KEY_FILE}.*.tmp"))
    except OSError:
        return []


def key_files(directory: Path) -> list[Path]:
    """Every file of ``directory`` that may hold key material, in the order to destroy
    them: leftovers of interrupted writes, the pending key, and ``key.json`` last (a
    profile without it is refused, whatever else survives an interrupted shred)."""
    files = [*leftover_key_files(directory), directory / PENDING_FILE, directory / KEY_FILE]
    return [p for p in files if p.exists()]


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in a parsed JSON value (iteratively)."""
    depth, level = 0, [value]
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        depth += 1
        level = [item for c in containers for item in (c.values() if isinstance(c, dict) else c)]
    return depth


def parse_key_file(raw: bytes) -> dict[str, Any]:
    """A key file's bytes as a descriptor: ProfileUnreadableError for anything that is
    not a well-formed key file (oversized, malformed, deeply nested, wrong format),
    ProfileVersionError for one written by a newer ondevice. Never another exception."""
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ProfileUnreadableError(UNREADABLE)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProfileUnreadableError(UNREADABLE) from None
    if not isinstance(data, dict) or data.get("format") != KEY_FORMAT:
        raise ProfileUnreadableError(UNREADABLE)
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProfileUnreadableError(UNREADABLE)
    if version > KEY_VERSION:
        raise ProfileVersionError(
            f"the key file was written by a newer ondevice (key format {version}; this "
            f"version reads up to {KEY_VERSION}); upgrade ondevice"
        )
    if _depth(data) > _MAX_KEY_FILE_DEPTH:
        raise ProfileUnreadableError(UNREADABLE)
    return data


def read_key_file(directory: Path, name: str = KEY_FILE) -> dict[str, Any] | None:
    """The parsed ``key.json`` (or another key file) of a profile, or None if absent.
    Raises as :func:`parse_key_file`, or KeyProviderError if the file cannot be read."""
    path = directory / name
    try:
        with open_regular(path) as fh:
            parts, got = [], 0
            while got <= MAX_KEY_FILE_BYTES:  # unbuffered: a read may return less
                part = fh.read(MAX_KEY_FILE_BYTES + 1 - got)
                if not part:
                    break
                parts.append(part)
                got += len(part)
            raw = b"".join(parts)
    except FileNotFoundError:
        return None
    except NotARegularFileError as exc:
        raise KeyProviderError(f"cannot read {path}: not a regular file") from exc
    except OSError as exc:
        raise KeyProviderError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_key_file(raw)


#: The key provider kinds a ``key.json`` may name, as :func:`profile_key_provider` returns.
KeyProviderKind = Literal["raw", "passphrase", "keychain"]
_KINDS: Final[tuple[str, ...]] = ("raw", "passphrase", "keychain")


def profile_key_provider(directory: str | os.PathLike[str]) -> KeyProviderKind | None:
    """Which kind of key protects the profile in ``directory``: ``"raw"``
    (:class:`RawKey`), ``"passphrase"`` (:class:`Passphrase`) or ``"keychain"``
    (:class:`Keychain`); None if there is no profile there (no key file and no database).

    It reads only the key file (no key is derived, nothing is decrypted, nothing is
    written), so an app can decide what to ask the user for before it opens the profile::

        kind = profile_key_provider(path)
        key = Keychain() if kind in (None, "keychain") else Passphrase(ask_user())

    During a key rotation the committed ``key.json`` answers. Raises
    :class:`~ondevice.errors.KeyProviderError` if the database exists but the key file
    does not (the key was destroyed), if the key file cannot be read or if it names an
    unknown provider; :class:`~ondevice.errors.ProfileUnreadableError` if it is not a
    well-formed key file (tampered); :class:`~ondevice.errors.ProfileVersionError` if a
    newer ondevice wrote it.
    """
    path = Path(directory)
    descriptor = read_key_file(path)
    if descriptor is None:
        if (path / "profile.db").exists():
            raise KeyProviderError(
                f"{path} has a database but no {KEY_FILE}: the key material was destroyed "
                "or never copied; the profile cannot be opened"
            )
        return None
    kind = descriptor.get("provider")
    if kind not in _KINDS:
        raise KeyProviderError(f"{path / KEY_FILE} names an unknown key provider {kind!r}")
    return cast(KeyProviderKind, kind)


def read_key_file_quietly(path: Path) -> dict[str, Any] | None:
    """The descriptor in ``path``, or None if it is absent or unreadable in any way."""
    try:
        return read_key_file(path.parent, path.name)
    except OndeviceError:
        return None


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
        """Keep ``key`` as the profile's data key (``pending``: as the new key of a key
        rotation, in ``key.json.pending``; see ``ondevice.rotation``)."""

    @abstractmethod
    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        """Return the data key described by ``descriptor`` (a parsed key file)."""

    def destroy(self, directory: Path) -> None:
        """Destroy the key material this provider keeps for ``directory``: every key
        file (leftovers, pending, then ``key.json``) is overwritten in place and
        deleted."""
        for path in key_files(directory):
            shred_file(path)
        fsync_dir(directory)

    def load_candidates(self, directory: Path) -> list[tuple[bytes, bool]]:
        """Keys to try, in order, each with whether it is the *pending* key: the key in
        ``key.json``, then the one in ``key.json.pending`` (a rotation in progress or
        interrupted). Each file is read on its own: one this provider cannot read (of
        another kind, unwrapped by another passphrase, naming a deleted keychain entry,
        overwritten by a rotation) never stops the other from being tried. So at every
        step of a rotation the profile opens with the old or the new provider.

        Raises KeyProviderError if there is no ``key.json`` (destroyed: the profile
        cannot be opened, whatever else is left), or if no file is of this provider's
        kind; otherwise the first error met reading a file of this kind (a wrong
        passphrase: ProfileUnreadableError)."""
        try:
            primary = read_key_file(directory)
            primary_error: OndeviceError | None = None
        except ProfileVersionError:
            raise
        except OndeviceError as exc:  # unreadable: tampered, or overwritten mid-rotation
            primary, primary_error = None, exc
        if primary is None and primary_error is None:
            raise KeyProviderError(
                f"{directory} has a database but no {KEY_FILE}: the key material was "
                "destroyed or never copied; the profile cannot be opened"
            )
        try:
            pending = read_key_file(directory, PENDING_FILE)
        except OndeviceError:
            log.warning("ignoring an unreadable pending key file")
            pending = None
        keys: list[tuple[bytes, bool]] = []
        errors: list[OndeviceError] = []
        for descriptor, is_pending in ((primary, False), (pending, True)):
            if descriptor is None or descriptor.get("provider") != self.kind:
                continue
            try:
                keys.append((self.load(directory, descriptor), is_pending))
            except (KeyProviderError, ProfileUnreadableError) as exc:
                errors.append(exc)
        if keys:
            return keys
        if errors:
            raise errors[0]
        if primary is None:
            assert primary_error is not None
            raise primary_error
        self._check_kind(primary)
        raise ProfileUnreadableError(UNREADABLE)  # pragma: no cover - _check_kind raised

    def release(self, directory: Path) -> None:
        """Delete key material kept outside the directory (a keychain entry) for the
        current ``key.json``."""
        return None

    def release_descriptor(self, descriptor: dict[str, Any]) -> None:
        """Delete key material kept outside the directory for the key ``descriptor``
        names (a parsed key file); called on the old provider before a rotation lets
        the new key take the name ``key.json``."""
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
        name = PENDING_FILE if pending else KEY_FILE
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
        """Record in the key file that the profile uses a raw key (never the key)."""
        if key != self._key:
            raise KeyProviderError(
                "a raw key cannot be rotated in place: pass the new key with rekey(RawKey(...))"
            )
        self._write(directory, self._descriptor(), pending)

    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        """The raw key itself (the key file holds nothing to load)."""
        return self._key


class Passphrase(KeyProvider):
    """A passphrase that unwraps the data key stored, encrypted, in ``key.json``.

    The passphrase is run through Argon2id (:class:`Argon2Params`) once per open. A
    lost passphrase means a lost profile: keep an export if that matters. ``kdf`` sets
    the parameters of the next wrap (the default, or anything between the floor and
    the caps of :class:`Argon2Params`); an existing key file is read with its own.
    """

    kind = "passphrase"

    def __init__(self, passphrase: str | bytes, *, kdf: Argon2Params | None = None) -> None:
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not isinstance(passphrase, bytes) or not passphrase:
            raise InvalidInputError("the passphrase must be a non-empty str or bytes")
        if kdf is not None and (not isinstance(kdf, Argon2Params) or not kdf._meets_floor()):
            raise InvalidInputError("kdf must be Argon2Params at or above the floor")
        self._secret = passphrase
        self._kdf = kdf or Argon2Params()

    def __repr__(self) -> str:
        return "Passphrase(<hidden>)"

    def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
        """Wrap ``key`` under the passphrase and write the key file."""
        header = self._descriptor(kdf=self._kdf.to_dict())
        sealed = seal(self._secret, self._kdf, key, canonical(header))
        self._write(directory, {**header, "wrapped_key": sealed}, pending)

    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        """Unwrap the data key (ProfileUnreadableError on a wrong passphrase or any
        modified byte; parameters above the caps are refused before any derivation)."""
        try:
            params = Argon2Params.from_dict(descriptor["kdf"])
            header = {k: v for k, v in descriptor.items() if k != "wrapped_key"}
            wrapped = descriptor["wrapped_key"]
            if not isinstance(wrapped, dict):
                raise TypeError("wrapped_key must be an object")
            key = unseal(self._secret, params, wrapped, canonical(header))
        except (InvalidTag, ValueError, TypeError, KeyError, InvalidInputError):
            raise ProfileUnreadableError(UNREADABLE) from None
        if len(key) != DATA_KEY_BYTES:
            raise ProfileUnreadableError(UNREADABLE)
        return key


#: The keyring backends that keep secrets in a real OS keychain, encrypted at rest and
#: guarded by the user's login session. Only these exact classes are used, never a
#: subclass or anything unknown (an allowlist: a new plaintext backend, a subclass of
#: one, or a wrapper around one can never slip through a list of known-bad ones).
_SECURE_BACKENDS: frozenset[str] = frozenset(
    {
        "keyring.backends.SecretService.Keyring",
        "keyring.backends.libsecret.Keyring",
        "keyring.backends.kwallet.DBusKeyring",
        "keyring.backends.kwallet.DBusKeyringKWallet4",
        "keyring.backends.macOS.Keyring",
        "keyring.backends.Windows.WinVaultKeyring",
    }
)


def _chained(backend: Any) -> list[Any]:
    return list(backend.backends)


def _multipart_inner(backend: Any) -> list[Any]:
    # Our secret (64 hex characters) is a single part: the wrapped keyring holds it as is.
    return [backend._keyring]


#: Backends that only pass calls on to other backends, and how to find those: they are
#: resolved to the backend that would hold the key, which is then used directly.
_WRAPPERS: Final[dict[str, Callable[[Any], list[Any]]]] = {
    "keyring.backends.chainer.ChainerBackend": _chained,
    "keyrings.alt.multi.MultipartKeyringWrapper": _multipart_inner,
}


def _backend_name(backend: object) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_secure_backend(backend: object) -> bool:
    """Whether ``backend`` is an instance of exactly one of the allowlisted classes."""
    cls = type(backend)
    if _backend_name(backend) not in _SECURE_BACKENDS:
        return False
    module = sys.modules.get(cls.__module__)
    return module is not None and getattr(module, cls.__qualname__, None) is cls


def _resolve_backend(backend: Any, depth: int = 0) -> list[Any]:
    """The backends a secret given to ``backend`` may land in: the backend itself, or,
    for a known wrapper, what it wraps (recursively)."""
    unwrap = _WRAPPERS.get(_backend_name(backend))
    if unwrap is None or depth >= 4:
        return [backend]
    try:
        inner = unwrap(backend)
    except Exception:  # a wrapper we cannot see into holds nothing we could check
        return []
    return [found for b in inner for found in _resolve_backend(b, depth + 1)]


class Keychain(KeyProvider):
    """The OS keychain (Secret Service on Linux, Keychain on macOS, Credential Locker on
    Windows) through the optional ``keyring`` package (``pip install ondevice[keyring]``).

    The backend (``backend``, or keyring's default) is resolved through the wrappers
    keyring uses (the chainer, the multipart wrapper) to the backend that would hold the
    key, and used only if that is one of the known secure OS keychains; anything else
    (plaintext or "encrypted" files, the ``fail`` and ``null`` placeholders, subclasses,
    unknown backends) is refused with :class:`KeychainUnavailableError`.
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
        """Raise KeychainUnavailableError unless a secure OS keychain is available."""
        self.backend()

    def backend(self) -> Any:
        """The keyring backend that will be used, after the security check."""
        if self._backend is not None:
            return self._backend
        if self._explicit is not None:
            chosen = self._explicit
        else:
            try:
                import keyring
            except ImportError:
                raise KeychainUnavailableError(
                    "the OS keychain needs the keyring package: pip install 'ondevice[keyring]'"
                    "; or pass key=Passphrase(...) or key=RawKey(...)"
                ) from None
            chosen = keyring.get_keyring()
        candidates = _resolve_backend(chosen)
        secure = [b for b in candidates if _is_secure_backend(b)]
        if not secure:
            names = ", ".join(_backend_name(b) for b in candidates) or _backend_name(chosen)
            raise KeychainUnavailableError(
                f"no secure OS keychain is available (found: {names}; only known OS "
                "keychains are used); pass key=Passphrase(...) or key=RawKey(...) instead"
            )
        self._backend = secure[0]
        return self._backend

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # keyring raises many unrelated types
            raise KeyProviderError(f"the OS keychain failed to {what}: {exc}") from exc

    def store(self, directory: Path, key: bytes, *, pending: bool = False) -> None:
        """Write the key file naming a new keychain entry, then store the key in that
        entry (in this order: an interruption never leaves an entry no file names)."""
        backend = self.backend()
        account = f"profile-{uuid.uuid4()}"
        descriptor = self._descriptor(service=self.service, account=account)
        self._write(directory, descriptor, pending)
        try:
            self._call("store the key", backend.set_password, self.service, account, key.hex())
        except BaseException:
            with contextlib.suppress(Exception):
                self.release_descriptor(descriptor)
            shred_file(directory / (PENDING_FILE if pending else KEY_FILE))
            raise
        step("keychain:entry-stored")

    def load(self, directory: Path, descriptor: dict[str, Any]) -> bytes:
        """Read the data key from the keychain entry ``descriptor`` names."""
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
        """Delete the keychain entries every key file names, then the files."""
        for path in key_files(directory):
            self._delete_entry(path)
        super().destroy(directory)

    def release(self, directory: Path) -> None:
        """Delete the keychain entry the current ``key.json`` names."""
        self._delete_entry(directory / KEY_FILE)

    def _delete_entry(self, key_file: Path) -> None:
        descriptor = read_key_file_quietly(key_file)
        if descriptor is not None:
            self.release_descriptor(descriptor)

    def release_descriptor(self, descriptor: dict[str, Any]) -> None:
        """Delete the keychain entry ``descriptor`` names (gone already is fine)."""
        service, account = descriptor.get("service"), descriptor.get("account")
        if descriptor.get("provider") != self.kind or not isinstance(account, str):
            return
        if not isinstance(service, str):
            return
        backend = self.backend()
        try:
            backend.delete_password(service, account)
        except Exception as exc:
            # keyring raises PasswordDeleteError when the entry is already gone.
            if type(exc).__name__ != "PasswordDeleteError":
                raise KeyProviderError(f"the OS keychain failed to delete the key: {exc}") from exc
