"""The one exception tree of ``ondevice``.

Every error the SDK raises on purpose derives from :class:`OndeviceError`, so a host
app can catch the whole family in one ``except``. Errors of the database driver
(``sqlcipher3``), of ``cryptography`` and of ``keyring`` never reach the caller raw:
they are translated at the module that talks to them and chained as ``__cause__``.

::

    OndeviceError
    ├── ProfileError                   the encrypted profile on disk
    │   ├── ProfileUnreadableError     wrong key or passphrase, tampered or truncated file
    │   ├── ProfileNotFoundError       no profile at that path (and create=False)
    │   ├── ProfileVersionError        written by a newer version of the SDK
    │   ├── ProfileBusyError           another process held the lock past the timeout
    │   ├── ProfileClosedError         the engine was closed or wiped
    │   ├── ProfileGoneError           the files were deleted or replaced under an open
    │   │                              engine (a wipe elsewhere): nothing was stored
    │   └── StorageError               the disk refused a write (full, read-only, I/O)
    ├── KeyProviderError               obtaining or storing the data key
    │   └── KeychainUnavailableError   no secure OS keychain (or an insecure one refused)
    ├── ValidationError (ValueError)   a call's input, refused before anything is written
    │   ├── PolicyViolationError       undeclared signal, context field or event; or a
    │   │                              write the current privacy level does not allow
    │   └── InvalidInputError          malformed interaction, bad argument
    ├── ExportError                    unreadable, tampered or unsupported export file
    ├── BundleError                    catalog bundle unsigned, tampered, wrongly signed,
    │                                  truncated or of an unsupported version
    └── SyncError                      reporting a segment to the server failed
        └── BudgetExhaustedError       (0.1; no longer raised: see SyncSettings.when_spent)

Fail closed, reveal nothing: a wrong key, a wrong passphrase, a flipped byte and a
truncated file all raise :class:`ProfileUnreadableError` with the same message, because
telling them apart would help an attacker more than it helps the user.
"""

from __future__ import annotations

__all__ = [
    "BudgetExhaustedError",
    "BundleError",
    "ExportError",
    "InvalidInputError",
    "KeyProviderError",
    "KeychainUnavailableError",
    "OndeviceError",
    "PolicyViolationError",
    "ProfileBusyError",
    "ProfileClosedError",
    "ProfileError",
    "ProfileGoneError",
    "ProfileNotFoundError",
    "ProfileUnreadableError",
    "ProfileVersionError",
    "StorageError",
    "SyncError",
    "ValidationError",
]


class OndeviceError(Exception):
    """Root of every error raised by ``ondevice``."""


class ProfileError(OndeviceError):
    """The encrypted profile could not be opened, read or written."""


class ProfileUnreadableError(ProfileError):
    """The profile cannot be decrypted and verified.

    Raised for a wrong raw key, a wrong passphrase, a tampered or truncated database,
    key file or WAL, at open or at the first read that touches a damaged page. The
    causes are deliberately indistinguishable.
    """


class ProfileNotFoundError(ProfileError):
    """There is no profile at the given path and creating one was not allowed."""


class ProfileVersionError(ProfileError):
    """The profile (or its key file) was written by a newer version of ``ondevice``."""


class ProfileBusyError(ProfileError):
    """Another connection held the profile's write lock for longer than the timeout."""


class ProfileClosedError(ProfileError):
    """The engine was closed (or the profile wiped); open a new engine."""


class ProfileGoneError(ProfileError):
    """The profile's database file was deleted or replaced while this engine had it open
    (``wipe()`` or ``ondevice wipe`` elsewhere, the directory removed, a new profile
    created at the same path). Nothing of the refused call was stored; close this engine
    and open the profile again if it still exists."""


class StorageError(ProfileError):
    """The operating system refused a write: disk full, read-only file, I/O error.

    The transaction that failed was rolled back; nothing of that call is stored.
    """


class KeyProviderError(OndeviceError):
    """The data key could not be obtained, stored or destroyed."""


class KeychainUnavailableError(KeyProviderError):
    """No secure OS keychain is available, or only an insecure backend was found."""


class ValidationError(OndeviceError, ValueError):
    """A call's input was refused; nothing of that call was written."""


class PolicyViolationError(ValidationError):
    """The write would store a field without a declared purpose, or one the current
    privacy level does not collect."""


class InvalidInputError(ValidationError):
    """Malformed input: wrong type, oversized string, NaN, a timestamp in the future..."""


class ExportError(OndeviceError):
    """An export could not be read: malformed, tampered, wrong passphrase or version."""


class BundleError(OndeviceError):
    """A catalog bundle was refused (signature, integrity, format or version)."""


class SyncError(OndeviceError):
    """A segment report could not be made or sent; recommendations are unaffected."""


class BudgetExhaustedError(SyncError):
    """The local differential-privacy budget is spent.

    Kept for code written against 0.1: since 0.2 ``sync()`` does not raise it. A spent
    lifetime budget repeats the last memo or sends nothing (``SyncSettings.when_spent``),
    and the outcome's ``reason`` says which.
    """
