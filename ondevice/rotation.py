"""Key rotation: ``rekey``, ``change_passphrase``, and the crash recovery of a pending key.

One invariant holds at every step, so a process killed anywhere leaves a profile that
opens with the old or the new secret:

    **Some key file on disk holds a key that opens the database, and opening a profile
    tries every key file the given provider can read** (``KeyProvider.load_candidates``:
    a file it cannot read, of another kind, under another passphrase, naming a deleted
    keychain entry or overwritten, never stops the other file from being tried).

The steps of a rotation, each durable before the next, with the caller holding the
profile's key lock (:func:`ondevice.keys.key_lock`). Each is marked with
:func:`ondevice.keys.step` (:data:`STEPS`); the crash tests end a process at each one.

1. ``rotation:begin``. Leftovers of an earlier interrupted write are shredded first.
2. ``key.json.pending:tmp-synced``, ``key.json.pending:replaced``: the new key is
   written to ``key.json.pending`` (wrapped under the new passphrase, or naming a new
   keychain entry), then for a keychain ``keychain:entry-stored``: the entry itself.
3. ``database:rekeyed`` (``rekey`` only): SQLCipher re-encrypts every page under the new
   key in one transaction, synced (``synchronous = FULL`` for it). Before this step the
   database opens with the old key only; after it, with the new key only.
4. ``old-key:released``: the old key's keychain entry, if any, is deleted.
5. ``old-key:overwritten``: the bytes of the old ``key.json`` are overwritten in place
   (they wrap the old key, or for ``change_passphrase`` the data key itself under the
   old passphrase: a rename alone would leave them in the freed blocks).
6. ``rotation:committed``: ``key.json.pending`` is renamed over ``key.json``.

What opens after a crash: up to step 3, the old secret (the open discards the pending
key; after ``change_passphrase``'s step 2, the new passphrase opens too, and that open
finishes the change); from step 3 on, the new secret (the open finishes steps 4 to 6).
Which file opened the database decides: the open that settles an interrupted rotation
holds the key lock, and if the pending key opens the database it is committed, and if
the current key does, the pending key is discarded (``pending:released``,
``pending:discarded``). Finishing after a crash runs the same steps 4 to 6, so a crash
during the recovery is recovered the same way.

No keychain entry is left that no file names: the key file naming an entry is written
before the entry, and an entry is deleted before the file naming it (unless the keychain
refuses the deletion: that is reported, by ``rekey`` as a KeyProviderError once the
rotation is committed, by an open as a logged warning).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .errors import KeyProviderError, OndeviceError, ProfileUnreadableError, StorageError
from .keys import (
    KEY_FILE,
    PENDING_FILE,
    UNREADABLE,
    Keychain,
    KeyProvider,
    fsync_dir,
    key_files,
    leftover_key_files,
    overwrite_in_place,
    read_key_file_quietly,
    shred_file,
    step,
)

__all__ = ["STEPS", "destroy", "open_database", "rotate", "unsettled"]

log = logging.getLogger(__name__)

#: The steps a rotation marks, in order (some only for some kinds: the keychain entry,
#: the database re-encryption), then those of discarding a pending key at an open.
STEPS: Final = (
    "rotation:begin",
    f"{PENDING_FILE}:tmp-synced",
    f"{PENDING_FILE}:replaced",
    "keychain:entry-stored",
    "database:rekeyed",
    "old-key:released",
    "old-key:overwritten",
    "rotation:committed",
    "pending:released",
    "pending:discarded",
)

#: Opens the profile database with a data key; raises ProfileUnreadableError if that
#: key does not open it. The connection is the caller's (any type).
Connect = Callable[[bytes], Any]


def unsettled(directory: Path) -> bool:
    """Whether key material is in flux: a pending key, or leftovers of an interrupted
    key-file write. Opening such a profile takes the key lock and settles it."""
    return (directory / PENDING_FILE).exists() or bool(leftover_key_files(directory))


def provider_for(descriptor: dict[str, Any], current: KeyProvider) -> KeyProvider:
    """A provider able to release the key material ``descriptor`` names: ``current``
    when it is of that kind, else a default one of the descriptor's kind (only a
    keychain keeps material outside the directory)."""
    if descriptor.get("provider") == current.kind:
        return current
    if descriptor.get("provider") == Keychain.kind:
        return Keychain(service=str(descriptor.get("service") or "ondevice"))
    return current


def rotate(
    directory: Path,
    *,
    old: KeyProvider,
    new: KeyProvider,
    new_key: bytes,
    reencrypt: Callable[[bytes], None] | None,
    opens_with_old_key: Callable[[], bool],
    switched: Callable[[], None],
) -> None:
    """Move the profile in ``directory`` from ``old`` to ``new`` holding ``new_key``.

    ``reencrypt(new_key)`` re-encrypts the database (None for ``change_passphrase``,
    where ``new_key`` is the current data key). ``switched()`` is called as soon as the
    new key is the one that opens the database, before the old key material goes.
    If storing the new key or re-encrypting fails, the pending key is discarded only if
    ``opens_with_old_key()`` confirms the database still opens with the old key;
    otherwise it stays for the next open to settle. A failure after the switch is
    raised once the rotation is committed as far as it can be. The caller holds the
    key lock and has checked that its key is the profile's current key.
    """
    for leftover in leftover_key_files(directory):
        shred_file(leftover)
    step("rotation:begin")
    try:
        new.store(directory, new_key, pending=True)
        if reencrypt is not None:
            reencrypt(new_key)
    except BaseException:
        _discard_if_unused(directory, new, reencrypt is None, opens_with_old_key)
        raise
    if reencrypt is not None:
        step("database:rekeyed")
    switched()
    _finish(directory, current=new, old=old, strict=True)


def _discard_if_unused(
    directory: Path,
    new: KeyProvider,
    database_untouched: bool,
    opens_with_old_key: Callable[[], bool],
) -> None:
    """After a failed rotation: discard the pending key if the database provably does
    not need it. Never raises (the original error is what the caller reports)."""
    try:
        if database_untouched or opens_with_old_key():
            _discard(directory, new)
        else:
            log.warning("the database may be re-keyed: keeping the pending key for the next open")
    except Exception as exc:
        log.warning("could not discard the pending key of a failed rotation: %s", exc)


def _finish(
    directory: Path, *, current: KeyProvider, old: KeyProvider | None, strict: bool
) -> None:
    """Make the pending key the current one: release the old key's keychain entry,
    overwrite the old ``key.json`` in place, rename ``key.json.pending`` over it. Only
    once the database opens with the pending key. A failure to delete the old keychain
    entry is raised at the end if ``strict`` (the rotation itself is complete), else
    logged."""
    previous = read_key_file_quietly(directory / KEY_FILE)
    problem: KeyProviderError | None = None
    if previous is not None:
        owner = old if old is not None and previous.get("provider") == old.kind else None
        try:
            (owner or provider_for(previous, current)).release_descriptor(previous)
        except KeyProviderError as exc:
            log.warning("could not delete the replaced key from the keychain: %s", exc)
            problem = exc
    step("old-key:released")
    overwrite_in_place(directory / KEY_FILE)
    step("old-key:overwritten")
    try:
        os.replace(directory / PENDING_FILE, directory / KEY_FILE)
    except OSError as exc:
        raise StorageError(
            f"the database is re-keyed, but {PENDING_FILE} could not replace {KEY_FILE} "
            f"({exc.strerror or exc}); the next open finishes the rotation"
        ) from exc
    fsync_dir(directory)
    step("rotation:committed")
    if problem is not None and strict:
        raise KeyProviderError(
            f"the data key was rotated, but the replaced key could not be deleted from the "
            f"OS keychain: {problem}"
        ) from problem


def _discard(directory: Path, current: KeyProvider) -> None:
    """Forget the pending key of a rotation that did not reach the database: delete its
    keychain entry (if any), then overwrite and delete ``key.json.pending``."""
    pending = read_key_file_quietly(directory / PENDING_FILE)
    if pending is not None:
        try:
            provider_for(pending, current).release_descriptor(pending)
        except KeyProviderError as exc:
            log.warning("could not delete the abandoned pending key from the keychain: %s", exc)
    step("pending:released")
    shred_file(directory / PENDING_FILE)
    fsync_dir(directory)
    step("pending:discarded")


def open_database(
    directory: Path, provider: KeyProvider, connect: Connect, *, settle: bool
) -> tuple[Any, bytes]:
    """Open the profile database with the first key ``provider`` reads from the key
    files that opens it; return the connection and that key.

    Without ``settle`` only ``key.json`` is tried and nothing is written. With
    ``settle`` (the caller holds the key lock) the pending key is tried too, and the
    key files are settled: a pending key that opened the database is committed, one
    that did not (the current key opened it) is discarded, and leftovers of interrupted
    writes are shredded. A failure to settle is logged, never raised: the database is
    open, and the next open under the lock tries again.
    """
    candidates = provider.load_candidates(directory)
    if not settle:
        candidates = [(key, pending) for key, pending in candidates if not pending]
        if not candidates:
            raise ProfileUnreadableError(UNREADABLE)
    has_pending = settle and (directory / PENDING_FILE).exists()
    last: OndeviceError | None = None
    tried: set[bytes] = set()
    for key, is_pending in candidates:
        if key in tried:
            continue
        tried.add(key)
        try:
            conn = connect(key)
        except ProfileUnreadableError as exc:
            last = exc
            continue
        if settle:
            try:
                _settle(directory, provider, is_pending=is_pending, has_pending=has_pending)
            except OndeviceError as exc:
                log.warning("could not settle the key files: %s", exc)
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
        return conn, key
    raise last if last is not None else ProfileUnreadableError(UNREADABLE)


def _settle(directory: Path, provider: KeyProvider, *, is_pending: bool, has_pending: bool) -> None:
    if is_pending:
        log.info("finishing an interrupted key rotation")
        _finish(directory, current=provider, old=None, strict=False)
    elif has_pending:
        log.info("discarding the pending key of a rotation that never reached the database")
        _discard(directory, provider)
    for leftover in leftover_key_files(directory):
        shred_file(leftover)


def destroy(directory: Path, provider: KeyProvider, *, strict: bool = True) -> None:
    """Crypto-shred: delete the keychain entries every key file names, then overwrite
    and delete every key file (``key.json`` last). An entry of the current provider's
    kind that cannot be deleted raises KeyProviderError before any file is touched if
    ``strict`` (the key would survive); entries of another kind (a rotation to or from
    a keychain left half-done) are deleted with a default provider, best effort."""
    for path in key_files(directory):
        descriptor = read_key_file_quietly(path)
        if descriptor is None or descriptor.get("provider") == provider.kind:
            continue
        try:
            provider_for(descriptor, provider).release_descriptor(descriptor)
        except KeyProviderError as exc:
            log.warning("could not delete a keychain entry of another key provider: %s", exc)
    if strict:
        provider.destroy(directory)
        return
    with contextlib.suppress(OndeviceError):
        for path in key_files(directory):
            descriptor = read_key_file_quietly(path)
            if descriptor is not None and descriptor.get("provider") == provider.kind:
                provider.release_descriptor(descriptor)
    for path in key_files(directory):
        shred_file(path)
    fsync_dir(directory)
