"""ondevice: privacy-first personalization on the user's own machine.

Every profile, interaction and recommendation lives in one encrypted SQLCipher file on
the user's machine; the only thing that may ever leave it is a randomized segment ID.
Start with :class:`PersonalizationEngine`.

As a library should, the package attaches a ``NullHandler`` to its logger (``ondevice``):
nothing is printed unless the application configures logging.
"""

import logging as _logging

from .engine import PersonalizationEngine, ProfileReport, UserReport
from .errors import (
    BudgetExhaustedError,
    BundleError,
    ExportError,
    InvalidInputError,
    KeychainUnavailableError,
    KeyProviderError,
    OndeviceError,
    PolicyViolationError,
    ProfileBusyError,
    ProfileClosedError,
    ProfileError,
    ProfileGoneError,
    ProfileNotFoundError,
    ProfileUnreadableError,
    ProfileVersionError,
    StorageError,
    SyncError,
    ValidationError,
)
from .keys import (
    Argon2Params,
    Keychain,
    KeyProvider,
    Passphrase,
    RawKey,
    profile_key_provider,
)
from .policy import ContextField, FieldPurpose, Interaction, Policy, PrivacyLevel, Signal
from .results import Recommendation, Recommendations
from .sync_settings import SyncOutcome, SyncSettings

__version__ = "0.2.0"

__all__ = [
    "Argon2Params",
    "BudgetExhaustedError",
    "BundleError",
    "ContextField",
    "ExportError",
    "FieldPurpose",
    "Interaction",
    "InvalidInputError",
    "KeyProvider",
    "KeyProviderError",
    "Keychain",
    "KeychainUnavailableError",
    "OndeviceError",
    "Passphrase",
    "PersonalizationEngine",
    "Policy",
    "PolicyViolationError",
    "PrivacyLevel",
    "ProfileBusyError",
    "ProfileClosedError",
    "ProfileError",
    "ProfileGoneError",
    "ProfileNotFoundError",
    "ProfileReport",
    "ProfileUnreadableError",
    "ProfileVersionError",
    "RawKey",
    "Recommendation",
    "Recommendations",
    "Signal",
    "StorageError",
    "SyncError",
    "SyncOutcome",
    "SyncSettings",
    "UserReport",
    "ValidationError",
    "profile_key_provider",
]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
