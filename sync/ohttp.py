"""Oblivious HTTP (RFC 9458) for the device's requests: the relay sees who, never what.

With Oblivious HTTP a device encrypts its whole HTTP request (method, target, headers,
body) to the *gateway*'s public key and posts the ciphertext to a *relay* run by
someone else. The relay learns the device's address but only sees opaque bytes; the
gateway (next to the server) decrypts the request but only sees the relay's address.
Neither alone can link a report to a device. The answer travels back encrypted.

::

    device ── message/ohttp-req ──> relay ── same bytes ──> gateway ── plain ──> handler
           <── message/ohttp-res ──       <── same bytes ──         <──────────

This module holds everything the device needs and the pieces the gateway shares:

- binary HTTP (RFC 9292), known-length form only: :class:`BinaryRequest`,
  :class:`BinaryResponse`, :func:`encode_bhttp_request` / :func:`decode_bhttp_request`
  and the response pair, strict and bounded (every length is checked against the bytes
  that are actually there before anything is sliced, so a hostile length prefix cannot
  allocate);
- key configurations (RFC 9458 section 3): :class:`KeyConfig`, the
  ``application/ohttp-keys`` list (:func:`encode_key_configs`,
  :func:`decode_key_configs`) and :func:`key_config_digest`, the SHA-256 pin;
- the gateway's key material: :class:`GatewayKey`, :func:`save_gateway_keys`,
  :func:`load_gateway_keys` (a private file, mode 0600, never overwritten);
- encapsulation (RFC 9458 sections 4.3 and 4.4): :func:`encapsulate_request` /
  :func:`decapsulate_request` and the response halves on :class:`ClientContext` and
  :class:`GatewayContext`;
- :class:`OhttpTransport`, a drop-in transport for ``ondevice_sync.client.SyncClient``, and
  :func:`fetch_key_config`.

Suite
-----
Only the suite every OHTTP deployment supports: DHKEM(X25519, HKDF-SHA256),
HKDF-SHA256, AES-128-GCM (HPKE ids ``0x0020``, ``0x0001``, ``0x0001``), through the
``pyhpke`` library on top of ``cryptography``.

Pinning
-------
A key configuration must be authenticated (RFC 9458 section 3): whoever hands the device
a key of their own reads its reports. The device is therefore configured with the
SHA-256 digest of the gateway's encoded key configuration (:func:`key_config_digest`),
exactly as the app pins the bundle's signing key, and refuses any configuration that
does not match (:class:`~ondevice_sync.errors.KeyConfigPinError`) before encrypting anything
with it. The configuration itself can then come from anywhere: shipped with the app,
from a CDN, or fetched with :func:`fetch_key_config`.

Sizes
-----
Every binary HTTP request the transport builds is padded with zero bytes to a multiple
of :data:`REQUEST_PAD_SIZE` (512): a report, a retry and a content table fetch are all
the same number of bytes on the wire (:data:`REPORT_ENCAPSULATED_SIZE`, 567), so the
relay cannot tell them apart by size. The gateway pads its answers to a multiple of
:data:`RESPONSE_PAD_SIZE`, so "counted" and a refusal look alike too.

Test seams
----------
:func:`encapsulate_request` takes ``_test_ephemeral_key`` and
:meth:`GatewayContext.seal_response` takes ``_test_response_nonce``, only so the tests
can reproduce the published RFC 9458 example byte for byte. Production code never
passes them: a fixed ephemeral key or nonce would break the encryption.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import struct
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from pyhpke import (
    AEADId,
    CipherSuite,
    ContextInterface,
    KDFId,
    KEMId,
    KEMKey,
    KEMKeyPair,
    PyHPKEError,
)

from ondevice_sync.client import HttpTransport, Response, Transport
from ondevice_sync.errors import (
    BinaryHttpError,
    ConfigurationError,
    DecapsulationError,
    KeyConfigError,
    KeyConfigPinError,
    OhttpRejectedError,
    ResponseDecryptionError,
    ServerUnavailableError,
    UnknownKeyIdError,
)
from ondevice_sync.protocol import MAX_BODY_SIZE, MAX_CONTENT_TABLE_SIZE, check_request_headers

__all__ = [
    "AEAD_AES_128_GCM",
    "KDF_HKDF_SHA256",
    "KEM_X25519_HKDF_SHA256",
    "KEYS_CONTENT_TYPE",
    "KEY_PROBLEM_TYPE",
    "MAX_BHTTP_REQUEST_SIZE",
    "MAX_ENCAPSULATED_REQUEST_SIZE",
    "MAX_ENCAPSULATED_RESPONSE_SIZE",
    "MAX_KEY_CONFIGS_SIZE",
    "OHTTP_KEYS_PATH",
    "OHTTP_PATH",
    "REPORT_ENCAPSULATED_SIZE",
    "REQUEST_CONTENT_TYPE",
    "REQUEST_PAD_SIZE",
    "RESPONSE_CONTENT_TYPE",
    "RESPONSE_PAD_SIZE",
    "BinaryRequest",
    "BinaryResponse",
    "ClientContext",
    "GatewayContext",
    "GatewayKey",
    "KeyConfig",
    "OhttpTransport",
    "check_key_config_pin",
    "decapsulate_request",
    "decode_bhttp_request",
    "decode_bhttp_response",
    "decode_key_configs",
    "encapsulate_request",
    "encode_bhttp_request",
    "encode_bhttp_response",
    "encode_key_configs",
    "fetch_key_config",
    "key_config_digest",
    "load_gateway_keys",
    "save_gateway_keys",
]

# --------------------------------------------------------------------------- constants

KEM_X25519_HKDF_SHA256: Final = 0x0020
"""HPKE KEM id of DHKEM(X25519, HKDF-SHA256), the only KEM spoken here."""
KDF_HKDF_SHA256: Final = 0x0001
"""HPKE KDF id of HKDF-SHA256."""
AEAD_AES_128_GCM: Final = 0x0001
"""HPKE AEAD id of AES-128-GCM."""

REQUEST_CONTENT_TYPE: Final = "message/ohttp-req"
"""Media type of an encapsulated request (RFC 9458 section 4.1)."""
RESPONSE_CONTENT_TYPE: Final = "message/ohttp-res"
"""Media type of an encapsulated response (RFC 9458 section 4.2)."""
KEYS_CONTENT_TYPE: Final = "application/ohttp-keys"
"""Media type of a list of key configurations (RFC 9458 section 3.2)."""
KEY_PROBLEM_TYPE: Final = "https://iana.org/assignments/http-problem-types#ohttp-key"
"""The problem type a gateway uses for an unknown or outdated key (RFC 9458 5.3)."""

OHTTP_PATH: Final = "/v1/ohttp"
"""Where the gateway takes ``POST`` of encapsulated requests (and the relay too)."""
OHTTP_KEYS_PATH: Final = "/v1/ohttp-keys"
"""Where the gateway serves its key configurations (``GET``)."""

REQUEST_PAD_SIZE: Final = 512
"""Binary HTTP requests are zero-padded to a multiple of this many bytes."""
RESPONSE_PAD_SIZE: Final = 512
"""The gateway zero-pads binary HTTP answers to a multiple of this many bytes."""

_NK: Final = 16  # AES-128-GCM key
_NN: Final = 12  # AES-128-GCM nonce
_NT: Final = 16  # AES-128-GCM tag
_NPK: Final = 32  # X25519 public key
_NENC: Final = 32  # X25519 encapsulated key
_HDR_SIZE: Final = 7
_RESPONSE_NONCE_SIZE: Final = max(_NN, _NK)
_REQUEST_OVERHEAD: Final = _HDR_SIZE + _NENC + _NT

MAX_ENCAPSULATED_REQUEST_SIZE: Final = MAX_BODY_SIZE
"""The largest encapsulated request the relay and the gateway accept (1024 bytes, the
server's body limit)."""
MAX_BHTTP_REQUEST_SIZE: Final = MAX_ENCAPSULATED_REQUEST_SIZE - _REQUEST_OVERHEAD
"""The largest binary HTTP request that fits in an encapsulated request."""
MAX_ENCAPSULATED_RESPONSE_SIZE: Final = MAX_CONTENT_TABLE_SIZE + 8 * 1024
"""The largest encapsulated response a device or the relay reads: the largest content
table plus room for the binary HTTP framing, padding, nonce and tag."""
MAX_KEY_CONFIGS_SIZE: Final = 16 * 1024
"""The largest ``application/ohttp-keys`` document :func:`fetch_key_config` reads."""
REPORT_ENCAPSULATED_SIZE: Final = _REQUEST_OVERHEAD + REQUEST_PAD_SIZE
"""The size of every encapsulated request :class:`OhttpTransport` sends (567 bytes)."""

_MAX_KEY_CONFIGS: Final = 16
_MAX_FIELDS: Final = 64
_MAX_INFORMATIONAL: Final = 8
_VARINT_MAX: Final = (1 << 62) - 1
_REQUEST_INFO: Final = b"message/bhttp request"
_RESPONSE_EXPORT: Final = b"message/bhttp response"
_HOP_BY_HOP: Final = frozenset(
    {"connection", "content-length", "host", "keep-alive", "proxy-connection",
     "transfer-encoding", "upgrade", "te"}
)


def _suite() -> CipherSuite:
    return CipherSuite.new(
        KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM
    )


_SUITE: Final = _suite()


# --------------------------------------------------------------------------- varints


def _encode_varint(value: int) -> bytes:
    """QUIC variable-length integer (RFC 9000 section 16), shortest form."""
    if value < 0 or value > _VARINT_MAX:
        raise BinaryHttpError(f"{value} does not fit a variable-length integer")
    if value < 1 << 6:
        return bytes((value,))
    if value < 1 << 14:
        return struct.pack(">H", value | 0x4000)
    if value < 1 << 30:
        return struct.pack(">I", value | 0x8000_0000)
    return struct.pack(">Q", value | 0xC000_0000_0000_0000)


class _Reader:
    """Reads a byte string front to back; every length is checked before slicing."""

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = start
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def at_end(self) -> bool:
        return self._pos >= self._end

    def varint(self, what: str) -> int:
        if self._pos >= self._end:
            raise BinaryHttpError(f"truncated before the {what}")
        first = self._data[self._pos]
        size = 1 << (first >> 6)
        if size > self.remaining:
            raise BinaryHttpError(f"truncated inside the {what}")
        value = first & 0x3F
        for offset in range(1, size):
            value = (value << 8) | self._data[self._pos + offset]
        self._pos += size
        return value

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise BinaryHttpError(
                f"the {what} claims {size} bytes but only {self.remaining} remain"
            )
        start = self._pos
        self._pos += size
        return self._data[start : self._pos]

    def prefixed(self, what: str) -> bytes:
        return self.take(self.varint(f"{what} length"), what)

    def sub(self, size: int, what: str) -> _Reader:
        if size > self.remaining:
            raise BinaryHttpError(
                f"the {what} claims {size} bytes but only {self.remaining} remain"
            )
        reader = _Reader(self._data, self._pos, self._pos + size)
        self._pos += size
        return reader

    def rest(self) -> bytes:
        start = self._pos
        self._pos = self._end
        return self._data[start : self._end]


# --------------------------------------------------------------------------- binary HTTP

Fields = tuple[tuple[str, str], ...]

_TOKEN_RE: Final = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_NAME_RE: Final = re.compile(r"\A[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_SCHEME_RE: Final = re.compile(r"\A[A-Za-z][A-Za-z0-9+\-.]*\Z")
_TARGET_RE: Final = re.compile(r"\A[\x21-\x7e]*\Z")
_BAD_VALUE_RE: Final = re.compile(r"[\x00\r\n]|\A[ \t]|[ \t]\Z")


@dataclass(frozen=True, slots=True)
class BinaryRequest:
    """An HTTP request as binary HTTP carries it: control data, fields and content.

    ``authority`` may be empty; ``path`` includes the query string; header names are
    lower case (as in HTTP/2). Validated on construction.
    """

    method: str
    scheme: str
    authority: str
    path: str
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()

    def __post_init__(self) -> None:
        if not _TOKEN_RE.match(self.method):
            raise BinaryHttpError(f"bad method {self.method[:40]!r}")
        if not _SCHEME_RE.match(self.scheme):
            raise BinaryHttpError(f"bad scheme {self.scheme[:40]!r}")
        if not _TARGET_RE.match(self.authority):
            raise BinaryHttpError("the authority holds a character outside visible ASCII")
        if not (self.path.startswith("/") or (self.path == "*" and self.method == "OPTIONS")):
            raise BinaryHttpError("the path must start with '/'")
        if not _TARGET_RE.match(self.path):
            raise BinaryHttpError("the path holds a character outside visible ASCII")
        _check_fields(self.headers, "header")
        _check_fields(self.trailers, "trailer")


@dataclass(frozen=True, slots=True)
class BinaryResponse:
    """A final HTTP response as binary HTTP carries it (informational answers, which an
    encapsulated exchange cannot use, are dropped when decoding)."""

    status: int
    headers: Fields = ()
    content: bytes = b""
    trailers: Fields = ()

    def __post_init__(self) -> None:
        if type(self.status) is not int or not 200 <= self.status <= 599:
            raise BinaryHttpError(f"final status {self.status!r} is not in 200..599")
        _check_fields(self.headers, "header")
        _check_fields(self.trailers, "trailer")

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (lower case); repeated fields joined by ``, ``."""
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


def _check_fields(fields: Fields, what: str) -> None:
    if not isinstance(fields, tuple) or len(fields) > _MAX_FIELDS:
        raise BinaryHttpError(f"a {what} section is a tuple of at most {_MAX_FIELDS} fields")
    for item in fields:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise BinaryHttpError(f"every {what} field is a (name, value) pair")
        name, value = item
        _check_name(name, what)
        _check_value(value, name)


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise BinaryHttpError(f"a {what} field name must be a non-empty string")
    if name.startswith(":"):
        raise BinaryHttpError(f"pseudo-field {name[:40]!r} is not allowed in binary HTTP")
    if not _NAME_RE.match(name):
        raise BinaryHttpError(f"{what} field name {name[:40]!r} is not a lower-case token")


def _check_value(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise BinaryHttpError(f"the value of field {name!r} must be a string")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise BinaryHttpError(f"the value of field {name!r} is not latin-1 text") from exc
    if _BAD_VALUE_RE.search(value):
        raise BinaryHttpError(
            f"the value of field {name!r} holds NUL, CR, LF or surrounding whitespace"
        )


def _encode_prefixed(data: bytes) -> bytes:
    return _encode_varint(len(data)) + data


def _encode_fields(fields: Fields) -> bytes:
    lines = b"".join(
        _encode_prefixed(name.encode("ascii")) + _encode_prefixed(value.encode("latin-1"))
        for name, value in fields
    )
    return _encode_prefixed(lines)


def _pad(message: bytes, pad_to: int) -> bytes:
    if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 0:
        raise ConfigurationError("pad_to must be an integer >= 0")
    if pad_to == 0:
        return message
    size = max(1, -(-len(message) // pad_to)) * pad_to
    return message + bytes(size - len(message))


def encode_bhttp_request(request: BinaryRequest, *, pad_to: int = 0) -> bytes:
    """The known-length binary HTTP encoding of ``request`` (framing indicator 0).

    Nothing is truncated; with ``pad_to > 0`` zero bytes are appended up to the next
    multiple of ``pad_to`` (RFC 9292 section 3.8), so requests of different lengths
    below one multiple encode to the same number of bytes.
    """
    message = b"".join(
        (
            _encode_varint(0),
            _encode_prefixed(request.method.encode("ascii")),
            _encode_prefixed(request.scheme.encode("ascii")),
            _encode_prefixed(request.authority.encode("ascii")),
            _encode_prefixed(request.path.encode("ascii")),
            _encode_fields(request.headers),
            _encode_prefixed(bytes(request.content)),
            _encode_fields(request.trailers),
        )
    )
    return _pad(message, pad_to)


def encode_bhttp_response(response: BinaryResponse, *, pad_to: int = 0) -> bytes:
    """The known-length binary HTTP encoding of ``response`` (framing indicator 1),
    zero-padded to a multiple of ``pad_to`` when it is ``> 0``."""
    message = b"".join(
        (
            _encode_varint(1),
            _encode_varint(response.status),
            _encode_fields(response.headers),
            _encode_prefixed(bytes(response.content)),
            _encode_fields(response.trailers),
        )
    )
    return _pad(message, pad_to)


def _decode_fields(reader: _Reader, what: str) -> Fields:
    section = reader.sub(reader.varint(f"{what} section length"), f"{what} section")
    fields: list[tuple[str, str]] = []
    while not section.at_end():
        if len(fields) >= _MAX_FIELDS:
            raise BinaryHttpError(f"more than {_MAX_FIELDS} {what} fields")
        raw_name = section.prefixed(f"{what} field name")
        raw_value = section.prefixed(f"{what} field value")
        if not raw_name:
            raise BinaryHttpError(f"an empty {what} field name")
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError as exc:
            raise BinaryHttpError(f"a {what} field name is not ASCII") from exc
        value = raw_value.decode("latin-1")
        _check_name(name, what)
        _check_value(value, name)
        fields.append((name, value))
    return tuple(fields)


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BinaryHttpError(f"the {what} is not ASCII") from exc


def _check_input(data: bytes, max_size: int, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BinaryHttpError(f"a binary HTTP {what} must be bytes")
    if len(data) > max_size:
        raise BinaryHttpError(f"binary HTTP {what} of {len(data)} bytes exceeds {max_size}")
    if not data:
        raise BinaryHttpError(f"empty binary HTTP {what}")
    return bytes(data)


def _framing(reader: _Reader, expected: int, what: str) -> None:
    framing = reader.varint("framing indicator")
    if framing == expected:
        return
    if framing in (2, 3):
        raise BinaryHttpError("indeterminate-length binary HTTP is not accepted")
    raise BinaryHttpError(f"framing indicator {framing} is not a known-length {what}")


def _sections(reader: _Reader, max_content: int) -> tuple[Fields, bytes, Fields]:
    """Header section, content and trailer section; each may be truncated away (then
    empty); what follows the trailers must be zero padding."""
    headers: Fields = ()
    content = b""
    trailers: Fields = ()
    if not reader.at_end():
        headers = _decode_fields(reader, "header")
    if not reader.at_end():
        size = reader.varint("content length")
        if size > max_content:
            raise BinaryHttpError(f"content of {size} bytes exceeds {max_content}")
        content = reader.take(size, "content")
    if not reader.at_end():
        trailers = _decode_fields(reader, "trailer")
    if reader.rest().strip(b"\x00"):
        raise BinaryHttpError("non-zero bytes after the message (padding must be zeros)")
    return headers, content, trailers


def decode_bhttp_request(
    data: bytes, *, max_size: int = MAX_BHTTP_REQUEST_SIZE
) -> BinaryRequest:
    """Parse a known-length binary HTTP request (RFC 9292); strict and bounded.

    Accepts truncation before the header section, the content or the trailer section
    (RFC 9292 section 3.1) and zero padding; refuses indeterminate-length framing,
    non-zero padding, pseudo-fields, upper-case or invalid field names, field values
    with NUL/CR/LF, more than 64 fields per section and anything over ``max_size``
    bytes. Raises :class:`~ondevice_sync.errors.BinaryHttpError`.
    """
    data = _check_input(data, max_size, "request")
    reader = _Reader(data)
    _framing(reader, 0, "request")
    method = _ascii(reader.prefixed("method"), "method")
    scheme = _ascii(reader.prefixed("scheme"), "scheme")
    authority = _ascii(reader.prefixed("authority"), "authority")
    path = _ascii(reader.prefixed("path"), "path")
    headers, content, trailers = _sections(reader, max_size)
    return BinaryRequest(method, scheme, authority, path, headers, content, trailers)


def decode_bhttp_response(
    data: bytes, *, max_size: int = MAX_ENCAPSULATED_RESPONSE_SIZE
) -> BinaryResponse:
    """Parse a known-length binary HTTP response (RFC 9292); strict and bounded.

    Informational (1xx) parts are parsed and dropped (at most 8); the same truncation,
    padding and field rules as :func:`decode_bhttp_request` apply.
    """
    data = _check_input(data, max_size, "response")
    reader = _Reader(data)
    _framing(reader, 1, "response")
    status = reader.varint("status code")
    informational = 0
    while 100 <= status <= 199:
        informational += 1
        if informational > _MAX_INFORMATIONAL:
            raise BinaryHttpError(f"more than {_MAX_INFORMATIONAL} informational responses")
        _decode_fields(reader, "informational header")
        status = reader.varint("status code")
    if not 200 <= status <= 599:
        raise BinaryHttpError(f"final status {status} is not in 200..599")
    headers, content, trailers = _sections(reader, max_size)
    return BinaryResponse(status, headers, content, trailers)


# --------------------------------------------------------------------------- key configs


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One gateway key configuration (RFC 9458 section 3.1).

    ``suites`` lists the (KDF id, AEAD id) pairs the gateway accepts with this key, in
    its order of preference. Construction checks the shapes; :meth:`decode` is the
    strict parser of the wire form.
    """

    key_id: int
    kem_id: int
    public_key: bytes
    suites: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if type(self.key_id) is not int or not 0 <= self.key_id <= 0xFF:
            raise KeyConfigError("key_id must be an integer in 0..255")
        if self.kem_id != KEM_X25519_HKDF_SHA256:
            raise KeyConfigError(
                f"KEM 0x{self.kem_id:04x} is not supported "
                f"(only DHKEM(X25519, HKDF-SHA256), 0x{KEM_X25519_HKDF_SHA256:04x})"
            )
        if not isinstance(self.public_key, bytes) or len(self.public_key) != _NPK:
            raise KeyConfigError(f"an X25519 public key is {_NPK} bytes")
        if not isinstance(self.suites, tuple) or not 1 <= len(self.suites) <= 65532 // 4:
            raise KeyConfigError("a key configuration lists 1..16383 (KDF, AEAD) pairs")
        for pair in self.suites:
            if not (
                isinstance(pair, tuple)
                and len(pair) == 2
                and all(type(x) is int and 0 <= x <= 0xFFFF for x in pair)
            ):
                raise KeyConfigError("every suite is a (kdf_id, aead_id) pair of 16-bit ids")

    def encode(self) -> bytes:
        """The wire encoding: key id, KEM id, public key, suites with their length."""
        suites = b"".join(struct.pack(">HH", kdf, aead) for kdf, aead in self.suites)
        return (
            struct.pack(">BH", self.key_id, self.kem_id)
            + self.public_key
            + struct.pack(">H", len(suites))
            + suites
        )

    @classmethod
    def decode(cls, data: bytes) -> KeyConfig:
        """Parse exactly one encoded key configuration; strict (no trailing bytes).

        Raises :class:`~ondevice_sync.errors.KeyConfigError` for a malformed configuration or a
        KEM other than X25519 (whose public key length this code cannot know).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise KeyConfigError("a key configuration must be bytes")
        data = bytes(data)
        if len(data) < 3:
            raise KeyConfigError("key configuration truncated before its KEM id")
        key_id, kem_id = struct.unpack_from(">BH", data)
        if kem_id != KEM_X25519_HKDF_SHA256:
            raise KeyConfigError(
                f"KEM 0x{kem_id:04x} is not supported (only DHKEM(X25519, HKDF-SHA256))"
            )
        if len(data) < 3 + _NPK + 2:
            raise KeyConfigError("key configuration truncated inside its public key")
        public_key = data[3 : 3 + _NPK]
        (length,) = struct.unpack_from(">H", data, 3 + _NPK)
        body = data[3 + _NPK + 2 :]
        if length < 4 or length % 4:
            raise KeyConfigError(f"the suites length {length} is not a positive multiple of 4")
        if len(body) != length:
            raise KeyConfigError(
                f"the suites length says {length} bytes but {len(body)} follow"
            )
        suites = tuple(struct.unpack_from(">HH", body, offset) for offset in range(0, length, 4))
        return cls(key_id, kem_id, public_key, suites)

    def digest(self) -> str:
        """:func:`key_config_digest` of this configuration."""
        return key_config_digest(self)

    def supports_suite(self) -> bool:
        """Whether HKDF-SHA256 with AES-128-GCM is among the configuration's suites."""
        return (KDF_HKDF_SHA256, AEAD_AES_128_GCM) in self.suites


def key_config_digest(config: KeyConfig | bytes) -> str:
    """The pin of a key configuration: SHA-256 (lower-case hex) of its encoding.

    ``config`` is a :class:`KeyConfig` or its encoded bytes (which are parsed first, so
    only a well-formed configuration has a digest).
    """
    if not isinstance(config, KeyConfig):
        config = KeyConfig.decode(config)
    return hashlib.sha256(config.encode()).hexdigest()


_PIN_RE: Final = re.compile(r"\A[0-9a-f]{64}\Z")


def _normalize_pin(pin: str) -> str:
    if not isinstance(pin, str):
        raise ConfigurationError("the key configuration pin must be a hex string")
    normalized = pin.strip().lower()
    if not _PIN_RE.match(normalized):
        raise ConfigurationError(
            "the key configuration pin must be 64 hex digits (a SHA-256 digest)"
        )
    return normalized


def check_key_config_pin(config: KeyConfig | bytes, pin: str) -> KeyConfig:
    """Return ``config`` (parsed) if its digest is ``pin``; else raise.

    Raises :class:`~ondevice_sync.errors.KeyConfigPinError` on a mismatch,
    :class:`~ondevice_sync.errors.KeyConfigError` for a malformed configuration and
    :class:`~ondevice_sync.errors.ConfigurationError` for a malformed pin.
    """
    expected = _normalize_pin(pin)
    parsed = config if isinstance(config, KeyConfig) else KeyConfig.decode(config)
    actual = key_config_digest(parsed)
    if not hmac.compare_digest(actual, expected):
        raise KeyConfigPinError(
            f"the gateway key configuration (key id {parsed.key_id}, digest "
            f"{actual[:16]}...) does not match the pinned digest {expected[:16]}...; "
            "refusing to encrypt anything with it"
        )
    return parsed


def encode_key_configs(configs: Iterable[KeyConfig]) -> bytes:
    """The ``application/ohttp-keys`` encoding: each configuration with a 2-byte length."""
    out = bytearray()
    for config in configs:
        encoded = config.encode()
        out += struct.pack(">H", len(encoded)) + encoded
    if not out:
        raise KeyConfigError("an application/ohttp-keys list holds at least one config")
    return bytes(out)


def decode_key_configs(data: bytes) -> tuple[KeyConfig, ...]:
    """Parse an ``application/ohttp-keys`` list; the whole list or nothing.

    RFC 9458 section 3.2 requires discarding a list with any encoding error (partial
    recovery could segregate clients), so one malformed entry, a truncated length, an
    unsupported KEM, more than 16 entries or trailing bytes refuse the whole document
    with :class:`~ondevice_sync.errors.KeyConfigError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise KeyConfigError("an application/ohttp-keys document must be bytes")
    data = bytes(data)
    if len(data) > MAX_KEY_CONFIGS_SIZE:
        raise KeyConfigError(f"key configuration list exceeds {MAX_KEY_CONFIGS_SIZE} bytes")
    configs: list[KeyConfig] = []
    offset = 0
    while offset < len(data):
        if len(configs) >= _MAX_KEY_CONFIGS:
            raise KeyConfigError(f"more than {_MAX_KEY_CONFIGS} key configurations")
        if len(data) - offset < 2:
            raise KeyConfigError("key configuration list truncated inside a length")
        (length,) = struct.unpack_from(">H", data, offset)
        offset += 2
        if length > len(data) - offset:
            raise KeyConfigError(
                f"a key configuration claims {length} bytes but {len(data) - offset} remain"
            )
        configs.append(KeyConfig.decode(data[offset : offset + length]))
        offset += length
    if not configs:
        raise KeyConfigError("empty key configuration list")
    return tuple(configs)


# --------------------------------------------------------------------------- gateway keys

_KEY_FILE_FORMAT: Final = "ondevice-ohttp-gateway-keys"
_KEY_FILE_VERSION: Final = 1


class GatewayKey:
    """The gateway's X25519 private key with its key id; never shown in ``repr``.

    Build with :meth:`generate` (fresh random key), :meth:`from_private_bytes` or
    :func:`load_gateway_keys`; :attr:`config` is the public configuration to publish
    and pin.
    """

    __slots__ = ("_config", "_key_id", "_private", "_secret")

    def __init__(self, key_id: int, private_key: bytes) -> None:
        if type(key_id) is not int or not 0 <= key_id <= 0xFF:
            raise KeyConfigError("key_id must be an integer in 0..255")
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise KeyConfigError("an X25519 private key is 32 bytes")
        self._key_id = key_id
        self._private = private_key
        self._secret = _SUITE.kem.deserialize_private_key(private_key)
        public = X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()
        self._config = KeyConfig(
            key_id, KEM_X25519_HKDF_SHA256, public, ((KDF_HKDF_SHA256, AEAD_AES_128_GCM),)
        )

    @classmethod
    def generate(cls, key_id: int = 1) -> GatewayKey:
        """A fresh key from the operating system's random source."""
        return cls(key_id, X25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_private_bytes(cls, key_id: int, private_key: bytes) -> GatewayKey:
        """A key from its 32 raw private bytes (tests, the RFC example)."""
        return cls(key_id, private_key)

    @property
    def key_id(self) -> int:
        """The one-byte key identifier requests name."""
        return self._key_id

    @property
    def config(self) -> KeyConfig:
        """The public key configuration (what devices use and pin)."""
        return self._config

    def private_bytes(self) -> bytes:
        """The 32 raw private key bytes (for :func:`save_gateway_keys` only)."""
        return self._private

    def _hpke_secret(self) -> Any:
        return self._secret

    def __repr__(self) -> str:
        return f"GatewayKey(key_id={self._key_id}, digest={self._config.digest()[:16]}...)"


def save_gateway_keys(path: Path, keys: Sequence[GatewayKey]) -> None:
    """Write ``keys`` to a new private file (mode 0600); never overwrites.

    The file is JSON (format ``ondevice-ohttp-gateway-keys``, version 1) holding each
    key id and private key in hex. Raises :class:`~ondevice_sync.errors.ConfigurationError` if
    ``path`` exists or cannot be written.
    """
    _check_key_set(keys)
    document = {
        "format": _KEY_FILE_FORMAT,
        "version": _KEY_FILE_VERSION,
        "keys": [
            {"key_id": key.key_id, "kem_id": KEM_X25519_HKDF_SHA256,
             "private_key": key.private_bytes().hex()}
            for key in keys
        ],
    }
    data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("ascii")
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:
        raise ConfigurationError(f"refusing to overwrite the existing key file {path}") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot create the key file {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise ConfigurationError(f"cannot write the key file {path}: {exc.strerror}") from exc


def _check_key_set(keys: Sequence[GatewayKey]) -> None:
    if not keys or len(keys) > _MAX_KEY_CONFIGS:
        raise KeyConfigError(f"a gateway holds 1..{_MAX_KEY_CONFIGS} keys")
    if not all(isinstance(key, GatewayKey) for key in keys):
        raise KeyConfigError("every gateway key must be a GatewayKey")
    ids = [key.key_id for key in keys]
    if len(set(ids)) != len(ids):
        raise KeyConfigError("gateway key ids must be distinct")


def load_gateway_keys(path: Path) -> tuple[GatewayKey, ...]:
    """Read a key file written by :func:`save_gateway_keys`; strict.

    Refuses (:class:`~ondevice_sync.errors.ConfigurationError`) a file that others than its owner
    may read or write, and (:class:`~ondevice_sync.errors.KeyConfigError`) any content that is
    not exactly the expected document.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigurationError(f"cannot open the key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigurationError(f"the key file {path} is not a regular file")
        if mode & 0o077:
            raise ConfigurationError(
                f"the key file {path} is accessible to other users "
                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"
            )
        raw = handle.read(64 * 1024 + 1)
    if len(raw) > 64 * 1024:
        raise KeyConfigError(f"the key file {path} is too large")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise KeyConfigError(f"the key file {path} is not JSON") from exc
    if not (
        isinstance(document, dict)
        and set(document) == {"format", "version", "keys"}
        and document["format"] == _KEY_FILE_FORMAT
        and document["version"] == _KEY_FILE_VERSION
        and isinstance(document["keys"], list)
    ):
        raise KeyConfigError(f"the key file {path} is not an {_KEY_FILE_FORMAT} v1 file")
    keys: list[GatewayKey] = []
    for entry in document["keys"]:
        if not (
            isinstance(entry, dict)
            and set(entry) == {"key_id", "kem_id", "private_key"}
            and entry["kem_id"] == KEM_X25519_HKDF_SHA256
            and isinstance(entry["private_key"], str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["private_key"])
        ):
            raise KeyConfigError(f"the key file {path} holds a malformed key entry")
        keys.append(GatewayKey(entry["key_id"], bytes.fromhex(entry["private_key"])))
    _check_key_set(keys)
    return tuple(keys)


# --------------------------------------------------------------------------- encapsulation


def _header(key_id: int) -> bytes:
    return struct.pack(
        ">BHHH", key_id, KEM_X25519_HKDF_SHA256, KDF_HKDF_SHA256, AEAD_AES_128_GCM
    )


def _response_key_nonce(secret: bytes, enc: bytes, response_nonce: bytes) -> tuple[bytes, bytes]:
    """RFC 9458 section 4.4: prk = Extract(enc || response_nonce, secret); Expand."""
    prk = hmac.digest(enc + response_nonce, secret, "sha256")
    key = HKDFExpand(hashes.SHA256(), _NK, b"key").derive(prk)
    nonce = HKDFExpand(hashes.SHA256(), _NN, b"nonce").derive(prk)
    return key, nonce


class ClientContext:
    """The device's half of one exchange: opens the matching encapsulated response."""

    __slots__ = ("_enc", "_secret")

    def __init__(self, enc: bytes, context: ContextInterface) -> None:
        self._enc = enc
        self._secret = context.export(_RESPONSE_EXPORT, _RESPONSE_NONCE_SIZE)

    def open_response(self, enc_response: bytes) -> bytes:
        """Decrypt an encapsulated response (RFC 9458 section 4.4) to binary HTTP.

        Raises :class:`~ondevice_sync.errors.ResponseDecryptionError` if it is too short or fails
        authentication (tampered, truncated, or meant for another request).
        """
        if len(enc_response) < _RESPONSE_NONCE_SIZE + _NT:
            raise ResponseDecryptionError(
                f"encapsulated response of {len(enc_response)} bytes is too short"
            )
        response_nonce = bytes(enc_response[:_RESPONSE_NONCE_SIZE])
        key, nonce = _response_key_nonce(self._secret, self._enc, response_nonce)
        try:
            return AESGCM(key).decrypt(nonce, bytes(enc_response[_RESPONSE_NONCE_SIZE:]), b"")
        except InvalidTag as exc:
            raise ResponseDecryptionError(
                "the encapsulated response does not decrypt (tampered with, truncated or "
                "not the answer to this request)"
            ) from exc


class GatewayContext:
    """The gateway's half of one exchange: seals the answer to the request it opened."""

    __slots__ = ("_enc", "_secret")

    def __init__(self, enc: bytes, context: ContextInterface) -> None:
        self._enc = enc
        self._secret = context.export(_RESPONSE_EXPORT, _RESPONSE_NONCE_SIZE)

    @property
    def enc(self) -> bytes:
        """The request's HPKE encapsulated key: fresh for every request, so it names one
        request (the gateway's replay cache is keyed by it) and nothing about its sender."""
        return self._enc

    def seal_response(
        self, response: bytes, *, _test_response_nonce: bytes | None = None
    ) -> bytes:
        """Encrypt a binary HTTP response (RFC 9458 section 4.4) with a fresh nonce.

        ``_test_response_nonce`` is a test-only seam (reproducing the RFC example);
        production code never passes it.
        """
        if _test_response_nonce is None:
            response_nonce = secrets.token_bytes(_RESPONSE_NONCE_SIZE)
        else:
            if len(_test_response_nonce) != _RESPONSE_NONCE_SIZE:
                raise ConfigurationError(f"a response nonce is {_RESPONSE_NONCE_SIZE} bytes")
            response_nonce = bytes(_test_response_nonce)
        key, nonce = _response_key_nonce(self._secret, self._enc, response_nonce)
        return response_nonce + AESGCM(key).encrypt(nonce, bytes(response), b"")


def encapsulate_request(
    config: KeyConfig, request: bytes, *, _test_ephemeral_key: bytes | None = None
) -> tuple[bytes, ClientContext]:
    """Encrypt a binary HTTP request to the gateway (RFC 9458 section 4.3).

    Returns the encapsulated request (``hdr || enc || ct``) and the context that opens
    the answer. ``config`` must list HKDF-SHA256 with AES-128-GCM
    (:class:`~ondevice_sync.errors.KeyConfigError` otherwise). ``_test_ephemeral_key`` (32 raw
    X25519 private bytes) is a test-only seam for the RFC example; production code
    never passes it, so every request gets a fresh ephemeral key.
    """
    if not config.supports_suite():
        raise KeyConfigError(
            f"the gateway key configuration (key id {config.key_id}) does not offer "
            "HKDF-SHA256 with AES-128-GCM"
        )
    hdr = _header(config.key_id)
    info = _REQUEST_INFO + b"\x00" + hdr
    try:
        public = _SUITE.kem.deserialize_public_key(config.public_key)
        ephemeral: KEMKeyPair | None = None
        if _test_ephemeral_key is not None:
            secret_key = X25519PrivateKey.from_private_bytes(_test_ephemeral_key)
            ephemeral = KEMKeyPair(
                _SUITE.kem.deserialize_private_key(_test_ephemeral_key),
                KEMKey.from_pyca_cryptography_key(secret_key.public_key()),
            )
        enc, context = _SUITE.create_sender_context(public, info, eks=ephemeral)
        ct = context.seal(bytes(request), b"")
    except (ValueError, PyHPKEError) as exc:  # e.g. a low-order public key
        raise KeyConfigError(
            f"cannot encrypt to the gateway key (key id {config.key_id}): {exc}"
        ) from exc
    return hdr + enc + ct, ClientContext(enc, context)


def decapsulate_request(
    keys: Mapping[int, GatewayKey], enc_request: bytes
) -> tuple[bytes, GatewayContext]:
    """Open an encapsulated request with the gateway's keys (RFC 9458 section 4.3).

    ``keys`` maps key ids to keys. Returns the binary HTTP request and the context that
    seals the answer. Raises :class:`~ondevice_sync.errors.UnknownKeyIdError` when the key id,
    KEM, KDF or AEAD is not one of the gateway's (a stale client configuration) and
    :class:`~ondevice_sync.errors.DecapsulationError` when the request is malformed or does not
    decrypt.
    """
    data = bytes(enc_request)
    if len(data) < _HDR_SIZE:
        raise DecapsulationError(f"encapsulated request of {len(data)} bytes has no header")
    key_id, kem_id, kdf_id, aead_id = struct.unpack_from(">BHHH", data)
    key = keys.get(key_id)
    if key is None:
        raise UnknownKeyIdError(f"unknown key id {key_id}")
    if (kem_id, kdf_id, aead_id) != (KEM_X25519_HKDF_SHA256, KDF_HKDF_SHA256, AEAD_AES_128_GCM):
        raise UnknownKeyIdError(
            f"key id {key_id} is not offered with KEM 0x{kem_id:04x}, KDF 0x{kdf_id:04x}, "
            f"AEAD 0x{aead_id:04x}"
        )
    if len(data) < _HDR_SIZE + _NENC + _NT:
        raise DecapsulationError(f"encapsulated request of {len(data)} bytes is too short")
    enc = data[_HDR_SIZE : _HDR_SIZE + _NENC]
    info = _REQUEST_INFO + b"\x00" + data[:_HDR_SIZE]
    try:
        context = _SUITE.create_recipient_context(enc, key._hpke_secret(), info)
        plaintext = context.open(data[_HDR_SIZE + _NENC :], b"")
    except Exception as exc:  # pyhpke wraps failures in several exception types
        raise DecapsulationError("the encapsulated request does not decrypt") from exc
    return plaintext, GatewayContext(enc, context)


# --------------------------------------------------------------------------- transport


def _check_url(url: str, what: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{what} is not an http(s) URL: {url!r}")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise ConfigurationError(f"{what} may carry no credentials and no fragment")
    return parts


def _json_code(body: bytes) -> tuple[str, str, str]:
    """(error code, message, problem type) from a JSON error body, best effort."""
    try:
        document = json.loads(body[:4096])
    except ValueError:
        return "unknown", "", ""
    if not isinstance(document, dict):
        return "unknown", "", ""

    def text(name: str) -> str:
        value = document.get(name)
        return value[:200] if isinstance(value, str) else ""

    return text("error") or "unknown", text("message") or text("title"), text("type")


def _content_type(headers: Mapping[str, str]) -> str:
    for name, value in headers.items():
        if name.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower()
    return ""


class OhttpTransport:
    """A transport (:class:`ondevice_sync.client.Transport`) that sends every request
    through an Oblivious HTTP relay.

    An app passes it to the engine as ``SyncSettings(server_url=..., transport=...)``:
    ``server_url`` names the target (the server behind the gateway), ``relay_url`` the
    relay's resource. With a :class:`~ondevice_sync.client.SyncClient` directly::

        transport = OhttpTransport(
            relay_url="https://relay.example/v1/ohttp",
            key_config=config_bytes,            # or a KeyConfig
            key_config_pin="3f1c...64 hex...",  # key_config_digest() of the gateway's
        )
        client = SyncClient(base_url="https://ondevice.example", transport=transport)

    For each request the (method, URL, headers, body) become a binary HTTP request
    (hop-by-hop ``Connection``/``Content-Length`` and ``Host`` dropped; the host is the
    authority), zero-padded to a multiple of ``pad_to`` bytes, encrypted to the pinned
    gateway key and posted to the relay as ``message/ohttp-req`` with only
    ``Content-Type``, ``Content-Length``, ``Accept`` and ``Connection: close``. The
    answer must be a ``message/ohttp-res`` of at most ``max_response_bytes``; it is
    decrypted and returned as the inner :class:`~ondevice_sync.client.Response`.

    Errors: a configuration that does not match the pin is refused here, at
    construction (:class:`~ondevice_sync.errors.KeyConfigPinError`); the gateway's "unknown key"
    answer raises :class:`~ondevice_sync.errors.UnknownKeyIdError` (the configuration is stale),
    its "cannot decrypt" answer :class:`~ondevice_sync.errors.DecapsulationError`, any other
    plain 4xx :class:`~ondevice_sync.errors.OhttpRejectedError`; an answer that does not decrypt
    :class:`~ondevice_sync.errors.ResponseDecryptionError`. A plain 429 or 5xx from the relay is
    returned as is, so the client reports it as "unavailable, retry later".
    ``inner_transport`` (default: :class:`~ondevice_sync.client.HttpTransport` capped at
    ``max_response_bytes``) carries the encapsulated request to the relay.

    Reports and the content table fit the cap; the catalog bundle generally does not:
    fetch it directly (it is signed, and the same bytes for every device).
    """

    def __init__(
        self,
        *,
        relay_url: str,
        key_config: KeyConfig | bytes,
        key_config_pin: str,
        inner_transport: Transport | None = None,
        pad_to: int = REQUEST_PAD_SIZE,
        max_response_bytes: int = MAX_ENCAPSULATED_RESPONSE_SIZE,
    ) -> None:
        _check_url(relay_url, "relay_url")
        self._config = check_key_config_pin(key_config, key_config_pin)
        if not self._config.supports_suite():
            raise KeyConfigError(
                f"the pinned key configuration (key id {self._config.key_id}) does not "
                "offer HKDF-SHA256 with AES-128-GCM"
            )
        if isinstance(pad_to, bool) or not isinstance(pad_to, int):
            raise ConfigurationError("pad_to must be an integer")
        if not 0 <= pad_to <= MAX_BHTTP_REQUEST_SIZE:
            raise ConfigurationError(f"pad_to must be in 0..{MAX_BHTTP_REQUEST_SIZE}")
        if not 64 <= max_response_bytes <= MAX_ENCAPSULATED_RESPONSE_SIZE:
            raise ConfigurationError(
                f"max_response_bytes must be in 64..{MAX_ENCAPSULATED_RESPONSE_SIZE}"
            )
        self._relay_url = relay_url
        self._pad_to = pad_to
        self._max = max_response_bytes
        self._inner: Transport = (
            HttpTransport(max_response_bytes=max_response_bytes)
            if inner_transport is None
            else inner_transport
        )

    @property
    def key_config(self) -> KeyConfig:
        """The pinned gateway key configuration requests are encrypted to."""
        return self._config

    @property
    def relay_url(self) -> str:
        """The relay resource every request is posted to."""
        return self._relay_url

    def encapsulate(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[bytes, ClientContext]:
        """The exact encapsulated bytes :meth:`request` would post, and their context."""
        check_request_headers(headers)
        parts = _check_url(url, "the request URL")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = tuple(
            (name.lower(), value)
            for name, value in headers.items()
            if name.lower() not in _HOP_BY_HOP
        )
        message = encode_bhttp_request(
            BinaryRequest(method, parts.scheme, parts.netloc, target, fields, bytes(body)),
            pad_to=self._pad_to,
        )
        if len(message) > MAX_BHTTP_REQUEST_SIZE:
            raise BinaryHttpError(
                f"the binary HTTP request of {len(message)} bytes exceeds "
                f"{MAX_BHTTP_REQUEST_SIZE} (the gateway's limit)"
            )
        return encapsulate_request(self._config, message)

    def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> Response:
        """Encapsulate, post to the relay, decapsulate; see the class docstring."""
        enc_request, context = self.encapsulate(method, url, headers, body)
        outer_headers = {
            "Content-Type": REQUEST_CONTENT_TYPE,
            "Content-Length": str(len(enc_request)),
            "Accept": RESPONSE_CONTENT_TYPE,
            "Connection": "close",
        }
        answer = self._inner.request("POST", self._relay_url, outer_headers, enc_request, timeout)
        if len(answer.body) > self._max:
            raise ResponseDecryptionError(f"the relay's answer exceeds {self._max} bytes")
        if answer.status == 200:
            return self._open(answer, context)
        if answer.status == 429 or answer.status >= 500:
            return answer
        raise self._rejection(answer)

    def _open(self, answer: Response, context: ClientContext) -> Response:
        if _content_type(answer.headers) != RESPONSE_CONTENT_TYPE:
            raise ResponseDecryptionError(
                f"the relay answered 200 without a {RESPONSE_CONTENT_TYPE} body"
            )
        plaintext = context.open_response(answer.body)
        try:
            inner = decode_bhttp_response(plaintext, max_size=self._max)
        except BinaryHttpError as exc:
            raise ResponseDecryptionError(
                f"the gateway's answer is not valid binary HTTP: {exc}"
            ) from exc
        headers: dict[str, str] = {}
        for name, value in inner.headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return Response(status=inner.status, headers=headers, body=inner.content)

    def _rejection(self, answer: Response) -> Exception:
        code, message, problem = _json_code(answer.body)
        detail = f": {message}" if message else ""
        if code == UnknownKeyIdError.code or problem == KEY_PROBLEM_TYPE:
            return UnknownKeyIdError(
                f"the gateway does not hold key id {self._config.key_id} "
                f"(answered {answer.status}{detail}): this device's key configuration is "
                "stale; fetch the gateway's configuration again and check it against the pin"
            )
        if code == DecapsulationError.code:
            return DecapsulationError(
                f"the gateway could not decrypt the request (answered {answer.status}"
                f"{detail})"
            )
        return OhttpRejectedError(
            f"the relay or gateway refused the encapsulated request: {answer.status} "
            f"({code}){detail}",
            status=answer.status,
            code=code,
        )


def fetch_key_config(
    url: str,
    pin: str,
    *,
    transport: Transport | None = None,
    timeout: float = 5.0,
) -> KeyConfig:
    """GET the gateway's ``application/ohttp-keys`` and return the pinned configuration.

    The list is parsed whole (any encoding error refuses it, :class:`KeyConfigError`);
    the configuration whose digest is ``pin`` is returned, and if none matches,
    :class:`~ondevice_sync.errors.KeyConfigPinError` is raised: nothing fetched is trusted
    unless it is the pinned key. A 4xx answer raises
    :class:`~ondevice_sync.errors.OhttpRejectedError`, a 429/5xx
    :class:`~ondevice_sync.errors.ServerUnavailableError`. Fetching from the gateway itself
    shows it the device's address once; the configuration is the same for every
    device and can equally come from a CDN or ship with the app.
    """
    _check_url(url, "the key configuration URL")
    expected = _normalize_pin(pin)
    carrier: Transport = (
        HttpTransport(max_response_bytes=MAX_KEY_CONFIGS_SIZE) if transport is None else transport
    )
    answer = carrier.request(
        "GET", url, {"Accept": KEYS_CONTENT_TYPE, "Connection": "close"}, b"", timeout
    )
    if answer.status != 200:
        code, message, _ = _json_code(answer.body)
        text = f"fetching the key configuration: {answer.status} ({code}) {message}".strip()
        if answer.status == 429 or answer.status >= 500:
            raise ServerUnavailableError(text, status=answer.status, code=code)
        raise OhttpRejectedError(text, status=answer.status, code=code)
    if _content_type(answer.headers) != KEYS_CONTENT_TYPE:
        raise KeyConfigError(f"the key configuration was not served as {KEYS_CONTENT_TYPE}")
    configs = decode_key_configs(answer.body)
    for config in configs:
        if hmac.compare_digest(config.digest(), expected):
            return config
    raise KeyConfigPinError(
        f"none of the {len(configs)} key configuration(s) served at {url} matches the "
        f"pinned digest {expected[:16]}...; refusing to use them"
    )
