"""The exception tree of the ``sync`` package.

``sync`` never imports ``ondevice``; the engine translates these errors into
``ondevice.errors.SyncError`` (and :class:`BudgetExhausted` into
``ondevice.errors.BudgetExhaustedError``), chaining the original as ``__cause__``.

::

    SyncError
    ├── ProtocolError (ValueError)       a message or document violates the wire schema
    │   ├── MessageSizeError             body empty, over the limit, or not MESSAGE_SIZE
    │   ├── MalformedMessageError        not UTF-8, not JSON, not an object, duplicate keys
    │   ├── UnknownFieldError            a field the schema does not define
    │   ├── MissingFieldError            a field the schema requires is absent
    │   ├── FieldTypeError               a field of the wrong JSON type
    │   ├── UnsupportedVersionError      a protocol or document version not spoken here
    │   ├── BadEpochError                not an ISO week "YYYY-Www", or no such week
    │   │   └── EpochOutOfWindowError    a real week, but too far from the server's clock
    │   ├── SegmentOutOfRangeError       segment not in 0..K-1
    │   ├── NonCanonicalError            valid values, but not the one canonical encoding
    │   ├── ForbiddenHeaderError         a request header outside the fixed allowed set
    │   └── ContentTableError            a malformed content table document
    ├── ConfigurationError (ValueError)  a bad setting (K, epsilon, k threshold, paths...)
    ├── StoreError                       the server's count store failed (nothing counted)
    ├── BudgetExhausted                  the privacy budget for the rolling period is spent
    ├── TransportError                   the server could not be reached or did not answer
    │   └── TransportTimeout             ...within the request's timeout
    ├── ServerError                      the server answered with an error status
    │   ├── ServerRejectedError          4xx: the request was refused; do not retry it
    │   └── ServerUnavailableError       5xx or 429: try again later, with backoff
    └── OhttpError                       Oblivious HTTP (ohttp, gateway, relay)
        ├── KeyConfigError (ValueError)  a gateway key configuration is malformed or unusable
        │   └── KeyConfigPinError        ...or is not the one the device pinned (refused locally)
        ├── BinaryHttpError (ValueError) a binary HTTP message (RFC 9292) is malformed or too big
        ├── DecapsulationError (ValueError)  an encapsulated request cannot be opened
        │   └── UnknownKeyIdError        ...its key id or suite is not the gateway's: stale config
        ├── ResponseDecryptionError (TransportError)  the encapsulated answer does not open
        └── OhttpRejectedError           the relay or gateway refused the request (plain 4xx)

Every class carries a class-level ``retryable`` flag: ``True`` only for
:class:`TransportError` (and so :class:`ResponseDecryptionError`) and
:class:`ServerUnavailableError`, the failures a later retry (of the *same* randomized
report, see ``ondevice_sync.client``) can fix. Every :class:`ProtocolError` and every
:class:`OhttpError` carries a short machine-readable ``code`` that the server, gateway
and relay put in their JSON error bodies.
"""

from __future__ import annotations

__all__ = [
    "AnswerTooLargeError",
    "BadEpochError",
    "BinaryHttpError",
    "BudgetExhausted",
    "ConfigurationError",
    "ContentTableError",
    "DecapsulationError",
    "EpochOutOfWindowError",
    "FieldTypeError",
    "ForbiddenHeaderError",
    "KeyConfigError",
    "KeyConfigPinError",
    "MalformedMessageError",
    "MessageSizeError",
    "MissingFieldError",
    "NonCanonicalError",
    "OhttpError",
    "OhttpRejectedError",
    "ProtocolError",
    "ResponseDecryptionError",
    "SegmentOutOfRangeError",
    "ServerError",
    "ServerRejectedError",
    "ServerUnavailableError",
    "StoreError",
    "SyncError",
    "TransportError",
    "TransportTimeout",
    "UnknownFieldError",
    "UnknownKeyIdError",
    "UnsupportedVersionError",
]


class SyncError(Exception):
    """Root of every error raised by ``ondevice_sync`` (the repository folder ``sync/``)."""

    retryable: bool = False


class ProtocolError(SyncError, ValueError):
    """A message, document or request violates the wire protocol."""

    code: str = "protocol_error"


class MessageSizeError(ProtocolError):
    """The body is empty, larger than the limit, or not exactly ``MESSAGE_SIZE`` bytes."""

    code = "bad_size"


class MalformedMessageError(ProtocolError):
    """The body is not UTF-8 JSON holding one object with distinct keys."""

    code = "malformed"


class UnknownFieldError(ProtocolError):
    """The message holds a field that the schema does not define."""

    code = "unknown_field"


class MissingFieldError(ProtocolError):
    """The message lacks a field that the schema requires."""

    code = "missing_field"


class FieldTypeError(ProtocolError):
    """A field has the wrong JSON type (for example a number where a string belongs)."""

    code = "wrong_type"


class UnsupportedVersionError(ProtocolError):
    """The protocol (or content table) version is not one this code speaks."""

    code = "unsupported_version"


class BadEpochError(ProtocolError):
    """The epoch is not an ISO week written ``YYYY-Www``, or that week does not exist."""

    code = "bad_epoch"


class EpochOutOfWindowError(BadEpochError):
    """The epoch is a real ISO week, but too far from the server's current week."""

    code = "epoch_out_of_window"


class SegmentOutOfRangeError(ProtocolError):
    """The segment is not in ``0..K-1`` for the configured number of segments ``K``."""

    code = "segment_out_of_range"


class NonCanonicalError(ProtocolError):
    """The values are valid but the bytes are not their one canonical encoding."""

    code = "non_canonical"


class ForbiddenHeaderError(ProtocolError):
    """A request would carry a header outside the protocol's fixed allowed set."""

    code = "forbidden_header"


class ContentTableError(ProtocolError):
    """The content table document is malformed, of the wrong size or version."""

    code = "bad_content_table"


class ConfigurationError(SyncError, ValueError):
    """A setting is out of range: K, epsilon, k threshold, budget, paths, limits."""


class StoreError(SyncError):
    """The server's count store could not commit; the report was not counted."""


class BudgetExhausted(SyncError):
    """Spending this epsilon now would exceed the cap for the rolling period."""

    def __init__(self, message: str, *, remaining: float, available_at: float) -> None:
        super().__init__(message)
        self.remaining = remaining
        """Epsilon still available at the time of the check."""
        self.available_at = available_at
        """Earliest unix time at which the requested epsilon fits under the cap."""


class TransportError(SyncError):
    """The request could not be completed: refused, reset, unreachable, bad answer.

    ``maybe_delivered`` is ``True`` when the failure happened after the whole request
    was written, so the server may have counted it: a retry must resend the *same*
    randomized report for the same epoch (never redraw the noise).
    """

    retryable = True

    def __init__(self, message: str, *, maybe_delivered: bool = False) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered


class AnswerTooLargeError(TransportError):
    """The answer was larger than the client reads for that kind of request.

    ``status`` is the answer's HTTP status when its status line was read (None when the
    head itself was too large). A report answered with a 2xx status was counted, however
    long the body: :meth:`ondevice_sync.client.SyncClient.send_report_bytes` treats it as sent,
    never as a failure to retry (which would count it again).
    """

    def __init__(self, message: str, *, status: int | None) -> None:
        super().__init__(message, maybe_delivered=True)
        self.status = status


class TransportTimeout(TransportError):
    """The server did not answer within the request's timeout."""


class ServerError(SyncError):
    """The server answered with an error status; ``status`` and ``code`` say which."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerRejectedError(ServerError):
    """A 4xx answer: the server refused this request; sending it again will not help."""


class ServerUnavailableError(ServerError):
    """A 5xx or 429 answer: the server could not take the report now; retry later."""

    retryable = True


class OhttpError(SyncError):
    """Root of the Oblivious HTTP errors (RFC 9458): key configs, encapsulation, relay."""

    code: str = "ohttp_error"


class KeyConfigError(OhttpError, ValueError):
    """A gateway key configuration (or ``application/ohttp-keys`` list) is malformed,
    uses an algorithm this code does not speak, or a key file is unusable."""

    code = "bad_key_config"


class KeyConfigPinError(KeyConfigError):
    """A key configuration is well formed but is not the one the device is pinned to.

    Refused locally, before anything is encapsulated with it: a relay (or anyone on the
    path to the gateway's key endpoint) could otherwise hand out its own key and read
    every report.
    """

    code = "key_config_pin_mismatch"


class BinaryHttpError(OhttpError, ValueError):
    """A binary HTTP message (RFC 9292) is malformed, truncated mid-field, carries
    non-zero padding or a forbidden field, or exceeds a size limit."""

    code = "bad_bhttp"


class DecapsulationError(OhttpError, ValueError):
    """An encapsulated request cannot be opened: malformed, truncated or tampered with.

    Raised by the gateway; the device raises it too when the gateway answers that it
    could not decrypt the request.
    """

    code = "decapsulation_failed"


class UnknownKeyIdError(DecapsulationError):
    """The request names a key id (or KEM/KDF/AEAD suite) the gateway does not hold.

    On the device this means its key configuration is stale (the gateway rotated its
    keys): fetch the configuration again and check it against the pin.
    """

    code = "unknown_key_id"


class ResponseDecryptionError(OhttpError, TransportError):
    """The relay's answer is not an encapsulated response that opens with this request's
    context: tampered with, truncated, or not encapsulated at all.

    A :class:`TransportError` with ``maybe_delivered=True``: the gateway may have
    counted the report, so a retry must resend the same report bytes.
    """

    code = "bad_encapsulated_response"

    def __init__(self, message: str, *, maybe_delivered: bool = True) -> None:
        super().__init__(message, maybe_delivered=maybe_delivered)


class OhttpRejectedError(OhttpError):
    """The relay or the gateway refused the encapsulated request with a plain
    (unencapsulated) 4xx answer other than the key errors above, for example a wrong
    content type or an oversize body; ``status`` and ``code`` say which."""

    code = "ohttp_rejected"

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
