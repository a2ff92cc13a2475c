"""The Oblivious HTTP gateway (RFC 9458): opens encapsulated requests for the server.

:class:`OhttpGateway` sits in front of a plain handler function with the signature of
``ondevice_sync.server.ReportHandler.handle`` (``(method, path, headers, body) -> (status,
headers, body)``). For each ``POST /v1/ohttp`` it decrypts the ``message/ohttp-req``
body with its private key, decodes the binary HTTP request inside, calls the handler
with it, and returns the handler's answer encoded as binary HTTP, zero-padded to a
multiple of :data:`~ondevice_sync.ohttp.RESPONSE_PAD_SIZE` and encrypted to the device
(``200``, ``message/ohttp-res``). ``GET /v1/ohttp-keys`` serves the public key
configurations (``application/ohttp-keys``).

The gateway sees the relay's address, never the device's: it is the relay that
connects to it, and nothing in the encapsulated request names the device.

Errors (RFC 9458 section 5.2)
-----------------------------
Problems found *before* the request is decrypted are answered in the clear with a
``4xx`` and a JSON body ``{"error": code, "message": ...}``: wrong content type (415),
empty or oversize body (400 / 413), unknown key id or suite (400, code
``unknown_key_id``, content type ``application/problem+json`` with the RFC's
``ohttp-key`` problem type, so a device knows its configuration is stale), a request
that does not decrypt (400, ``decapsulation_failed``). Problems found *after* it is
decrypted (malformed binary HTTP, a nested OHTTP request, the handler failing) are
answered inside an encapsulated response, like any answer of the handler. Nothing is
ever answered with a traceback.

Key management
--------------
``python -m ondevice_sync.gateway generate-key keys.json --key-id 1`` writes a new private key
file (mode 0600, never overwritten) and prints the configuration and its pin;
``python -m ondevice_sync.gateway show-config keys.json`` prints them again. To rotate keys,
add a key with a new id, publish its configuration and pin in a new app release, and
drop the old key once devices have moved: a device still using the old configuration
then gets :class:`~ondevice_sync.errors.UnknownKeyIdError`.

Replays
-------
The relay holds every encapsulated request it forwards and could post one again and
again: without a check, each copy would be counted, and a relay that replays one
device's report a thousand times would see which cell of the published statistics
grew by a thousand, that is, the device's report. The gateway therefore keeps a
:class:`ReplayCache` of the requests it has opened, keyed by a (keyed) hash of the HPKE
``enc`` (the ephemeral public key, fresh for every request, so it names one request and
nothing about the device). A request whose ``enc`` was already seen is refused *before*
the handler sees it, with a plain ``400`` and code ``replayed_request``: the answer is the
same whatever the request holds and whatever its first copy was answered, so it tells the
relay only what it already knows (that it sent the request twice).

Entries are kept for ``replay_retention`` seconds (default three weeks: a report is
accepted while the server's week is within ``epoch_window`` weeks of its epoch, so a
request captured at the start of that span can still be counted ``2 * epoch_window + 1``
weeks later; with the default window of 1 that is three weeks; a server with a wider
window must pass ``(2 * epoch_window + 1) * WEEK_SECONDS``). They are dropped in slices
of one twenty-first of the retention, so each is kept at least the retention and at most
one slice more. Only requests that decrypt are recorded (nobody else can produce a valid
request for someone else's ``enc``).

Memory is bounded by ``replay_capacity`` entries (default 1,000,000, roughly 100 MB;
size it to the requests of one retention period). When it is full the gateway fails
*closed*: new requests are answered ``503`` (code ``replay_cache_full``, with
``Retry-After`` until the oldest slice expires) and nothing is counted, because evicting
entries early would let a replay through. A warning is logged once per slice. The cache
lives in memory only: a restarted gateway has forgotten what it saw, so rotate the key
(or keep the gateway running) if replays across a restart matter.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from ondevice_sync.errors import (
    BinaryHttpError,
    ConfigurationError,
    DecapsulationError,
    KeyConfigError,
    SyncError,
    UnknownKeyIdError,
)
from ondevice_sync.ohttp import (
    KEY_PROBLEM_TYPE,
    KEYS_CONTENT_TYPE,
    MAX_BHTTP_REQUEST_SIZE,
    MAX_ENCAPSULATED_REQUEST_SIZE,
    OHTTP_KEYS_PATH,
    OHTTP_PATH,
    REQUEST_CONTENT_TYPE,
    RESPONSE_CONTENT_TYPE,
    RESPONSE_PAD_SIZE,
    BinaryResponse,
    GatewayContext,
    GatewayKey,
    decapsulate_request,
    decode_bhttp_request,
    encode_bhttp_response,
    encode_key_configs,
    load_gateway_keys,
    save_gateway_keys,
)
from ondevice_sync.protocol import WEEK_SECONDS

__all__ = [
    "DEFAULT_REPLAY_CAPACITY",
    "DEFAULT_REPLAY_RETENTION",
    "REPLAYED_CODE",
    "HandlerFunction",
    "HandlerResult",
    "OhttpGateway",
    "ReplayCache",
    "main",
]

_log = logging.getLogger(__name__)

HandlerResult = tuple[int, list[tuple[str, str]], bytes]
"""``(status, headers, body)``, as ``ondevice_sync.server.ReportHandler.handle`` returns."""

HandlerFunction = Callable[[str, str, Mapping[str, str], bytes], tuple[int, Any, bytes]]
"""``(method, path_and_query, headers, body) -> (status, headers, body)``."""

REPLAYED_CODE: Final = "replayed_request"
"""The error code of the answer to a request the gateway has already received."""
_ERROR_CONTENT_TYPE: Final = "application/json"
_PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
_DROPPED_ANSWER_HEADERS: Final = frozenset(
    {"connection", "content-length", "keep-alive", "transfer-encoding", "upgrade"}
)


DEFAULT_REPLAY_RETENTION: Final = 3 * WEEK_SECONDS
"""How long the gateway remembers a request (seconds): the span over which a report can
be accepted with the server's default ``epoch_window`` of 1 week (3 weeks)."""
DEFAULT_REPLAY_CAPACITY: Final = 1_000_000
"""How many requests the gateway remembers at most (about 100 MB)."""
_REPLAY_SLICES: Final = 21
_REPLAY_TAG_SIZE: Final = 16

ReplayVerdict = Literal["fresh", "replayed", "full"]


class ReplayCache:
    """The ``enc`` values of recently opened requests: refuses a second copy of one.

    ``retention`` (seconds) is how long an entry is kept at least, ``capacity`` how many
    entries are kept at most; ``clock`` gives unix seconds. Thread-safe. The module
    docstring explains the policy (fail closed when full).
    """

    def __init__(
        self,
        retention: float = DEFAULT_REPLAY_RETENTION,
        capacity: int = DEFAULT_REPLAY_CAPACITY,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (
            isinstance(retention, bool)
            or not isinstance(retention, int | float)
            or not math.isfinite(retention)
            or not 0 < retention <= 52 * WEEK_SECONDS
        ):
            raise ConfigurationError("replay retention must be in (0, 52 weeks] seconds")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError("replay capacity must be an integer >= 1")
        self._retention = float(retention)
        self._capacity = capacity
        self._clock = clock
        self._slice = self._retention / _REPLAY_SLICES
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._slices: collections.deque[tuple[int, set[bytes]]] = collections.deque()
        self._size = 0
        self._warned_slice: int | None = None

    @property
    def retention(self) -> float:
        """Seconds an entry is kept at least."""
        return self._retention

    @property
    def capacity(self) -> int:
        """Entries kept at most."""
        return self._capacity

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._now())
            return self._size

    def _now(self) -> float:
        now = float(self._clock())
        if not math.isfinite(now):
            raise ConfigurationError("the replay cache's clock is not finite")
        return now

    def _expire(self, now: float) -> None:
        horizon = now - self._retention
        while self._slices and (self._slices[0][0] + 1) * self._slice <= horizon:
            _, entries = self._slices.popleft()
            self._size -= len(entries)

    def _tag(self, enc: bytes) -> bytes:
        return hmac.digest(self._key, enc, hashlib.sha256)[:_REPLAY_TAG_SIZE]

    def admit(self, enc: bytes) -> ReplayVerdict:
        """Record ``enc``: ``"fresh"`` (recorded now), ``"replayed"`` (seen within the
        retention, not recorded again) or ``"full"`` (not seen, but no room: refuse)."""
        tag = self._tag(bytes(enc))
        with self._lock:
            now = self._now()
            self._expire(now)
            if any(tag in entries for _, entries in self._slices):
                return "replayed"
            if self._size >= self._capacity:
                index = math.floor(now / self._slice)
                if self._warned_slice != index:
                    self._warned_slice = index
                    _log.warning(
                        "the replay cache holds %d requests, its capacity: new requests "
                        "are refused until its oldest entries expire", self._capacity,
                    )
                return "full"
            index = math.floor(now / self._slice)
            if self._slices and self._slices[-1][0] >= index:  # same slice, or clock went back
                self._slices[-1][1].add(tag)
            else:
                self._slices.append((index, {tag}))
            self._size += 1
            return "fresh"

    def seconds_until_room(self) -> float:
        """Seconds until the oldest entries expire (0 when there is room now)."""
        with self._lock:
            now = self._now()
            self._expire(now)
            if self._size < self._capacity or not self._slices:
                return 0.0
            return max(0.0, (self._slices[0][0] + 1) * self._slice + self._retention - now)


def _document(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _plain_error(status: int, code: str, message: str) -> HandlerResult:
    body = _document({"error": code, "message": message})
    return status, [("Content-Type", _ERROR_CONTENT_TYPE), ("Cache-Control", "no-store")], body


class OhttpGateway:
    """Decapsulates requests for ``inner`` and encapsulates its answers.

    ``keys`` is one :class:`~ondevice_sync.ohttp.GatewayKey` or several (distinct key ids, e.g.
    during a rotation); ``inner`` is the handler function the decrypted requests go to.
    ``pad_to`` is the multiple answers are padded to. ``replay_cache`` remembers opened
    requests (default: a :class:`ReplayCache` of ``replay_retention`` seconds and
    ``replay_capacity`` entries on ``clock``); a second copy of a request is refused (see
    the module docstring). ``relays`` (addresses or networks, e.g. ``"192.0.2.7"``,
    ``"2001:db8::/64"``), when given, are the only sources whose encapsulated requests
    are opened: :meth:`handle` refuses any other ``client`` (and a missing one) with
    ``403``, so nobody can skip the relay, whose per-address limit is then the only
    one. Thread-safe.
    """

    def __init__(
        self,
        keys: GatewayKey | Iterable[GatewayKey],
        inner: HandlerFunction,
        *,
        pad_to: int = RESPONSE_PAD_SIZE,
        replay_retention: float = DEFAULT_REPLAY_RETENTION,
        replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
        clock: Callable[[], float] = time.time,
        replay_cache: ReplayCache | None = None,
        relays: Iterable[str] | None = None,
    ) -> None:
        key_list: Sequence[GatewayKey] = (
            (keys,) if isinstance(keys, GatewayKey) else tuple(keys)
        )
        if not key_list:
            raise KeyConfigError("the gateway needs at least one key")
        ids = [key.key_id for key in key_list]
        if len(set(ids)) != len(ids):
            raise KeyConfigError("gateway key ids must be distinct")
        if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 0:
            raise ConfigurationError("pad_to must be an integer >= 0")
        self._keys = {key.key_id: key for key in key_list}
        self._inner = inner
        self._pad_to = pad_to
        self._key_document = encode_key_configs(key.config for key in key_list)
        self._replays = (
            ReplayCache(replay_retention, replay_capacity, clock=clock)
            if replay_cache is None
            else replay_cache
        )
        self._relays: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
        if relays is not None:
            if isinstance(relays, str):
                raise ConfigurationError("relays is a list of addresses or networks")
            try:
                self._relays = tuple(ipaddress.ip_network(r, strict=False) for r in relays)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"a relay address is not an IP address: {exc}") from None
            if not self._relays:
                raise ConfigurationError("relays, when given, lists at least one address")

    @classmethod
    def from_key_file(
        cls, path: Path, inner: HandlerFunction, **options: Any
    ) -> OhttpGateway:
        """A gateway with the keys of a file written by ``save_gateway_keys``;
        ``options`` are the keyword arguments of the constructor."""
        return cls(load_gateway_keys(path), inner, **options)

    @property
    def replay_cache(self) -> ReplayCache:
        """The requests this gateway has opened recently."""
        return self._replays

    @property
    def key_configs_document(self) -> bytes:
        """The ``application/ohttp-keys`` bytes :meth:`key_config_response` serves."""
        return self._key_document

    def _from_relay(self, client: str | None) -> bool:
        if self._relays is None:
            return True
        if client is None:
            return False
        try:
            address = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._relays)

    def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        client: str | None = None,
    ) -> HandlerResult:
        """Route ``POST /v1/ohttp`` and ``GET /v1/ohttp-keys``; 404/405 for the rest.

        ``client`` is the address the request came from (the relay's), checked against
        ``relays`` when those are configured; never stored or logged.
        """
        split = urllib.parse.urlsplit(path)
        if split.path == OHTTP_PATH:
            if method != "POST":
                return self._with(_plain_error(405, "method_not_allowed", "use POST"), "POST")
            if not self._from_relay(client):
                return _plain_error(
                    403, "not_a_relay",
                    "encapsulated requests are accepted only through the configured relays",
                )
            if split.query:
                return _plain_error(400, "bad_query", "this endpoint takes no query string")
            content_type = next(
                (value for name, value in headers.items() if name.lower() == "content-type"),
                "",
            )
            return self.handle_encapsulated(content_type, body)
        if split.path == OHTTP_KEYS_PATH:
            if method != "GET":
                return self._with(_plain_error(405, "method_not_allowed", "use GET"), "GET")
            if split.query or body:
                return _plain_error(400, "bad_request", "GET it without query or body")
            return self.key_config_response()
        return _plain_error(404, "not_found", "unknown path")

    @staticmethod
    def _with(result: HandlerResult, allow: str) -> HandlerResult:
        status, headers, body = result
        return status, [*headers, ("Allow", allow)], body

    def key_config_response(self) -> HandlerResult:
        """The answer to ``GET /v1/ohttp-keys``: every key configuration, newest last."""
        headers = [("Content-Type", KEYS_CONTENT_TYPE), ("Cache-Control", "max-age=3600")]
        return 200, headers, self._key_document

    def handle_encapsulated(self, content_type: str, body: bytes) -> HandlerResult:
        """Answer one ``message/ohttp-req``; never raises (a 4xx/5xx result instead)."""
        if content_type.split(";", 1)[0].strip().lower() != REQUEST_CONTENT_TYPE:
            return _plain_error(
                415, "unsupported_media_type", f"Content-Type must be {REQUEST_CONTENT_TYPE}"
            )
        if not body:
            return _plain_error(400, "empty_body", "no encapsulated request")
        if len(body) > MAX_ENCAPSULATED_REQUEST_SIZE:
            return _plain_error(
                413, "too_large",
                f"an encapsulated request is at most {MAX_ENCAPSULATED_REQUEST_SIZE} bytes",
            )
        try:
            plaintext, context = decapsulate_request(self._keys, body)
        except UnknownKeyIdError as exc:
            document = {
                "type": KEY_PROBLEM_TYPE,
                "title": "key identifier unknown",
                "error": UnknownKeyIdError.code,
                "message": f"{exc}; fetch the current key configuration",
            }
            return 400, [("Content-Type", _PROBLEM_CONTENT_TYPE)], _document(document)
        except DecapsulationError as exc:
            _log.debug("encapsulated request refused: %s", exc)
            return _plain_error(400, DecapsulationError.code, str(exc))
        verdict = self._replays.admit(context.enc)
        if verdict == "replayed":
            return _plain_error(
                400, REPLAYED_CODE,
                "this encapsulated request was already received; a copy is never processed "
                "again (nothing was counted)",
            )
        if verdict == "full":
            wait = max(1, math.ceil(self._replays.seconds_until_room()))
            status, headers, body = _plain_error(
                503, "replay_cache_full",
                "the gateway cannot take new requests now; nothing was counted, retry later",
            )
            return status, [*headers, ("Retry-After", str(wait))], body
        try:
            answer = self._answer(plaintext)
        except Exception:
            _log.exception("unexpected error while answering an encapsulated request")
            answer = self._inner_error(500, "internal", "internal error; nothing was counted")
        return self._seal(context, answer)

    def _answer(self, plaintext: bytes) -> bytes:
        try:
            request = decode_bhttp_request(plaintext, max_size=MAX_BHTTP_REQUEST_SIZE)
        except BinaryHttpError as exc:
            return self._inner_error(400, BinaryHttpError.code, str(exc))
        target = urllib.parse.urlsplit(request.path).path
        if target in (OHTTP_PATH, OHTTP_KEYS_PATH):
            return self._inner_error(400, "nested_ohttp", "OHTTP requests cannot be nested")
        headers: dict[str, str] = {"host": request.authority} if request.authority else {}
        for name, value in request.headers:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status, answer_headers, answer_body = self._inner(
            request.method, request.path, headers, request.content
        )
        fields = tuple(
            (str(name).lower(), str(value))
            for name, value in answer_headers
            if str(name).lower() not in _DROPPED_ANSWER_HEADERS
        )
        return encode_bhttp_response(
            BinaryResponse(status, fields, bytes(answer_body)), pad_to=self._pad_to
        )

    def _inner_error(self, status: int, code: str, message: str) -> bytes:
        body = _document({"error": code, "message": message})
        response = BinaryResponse(status, (("content-type", _ERROR_CONTENT_TYPE),), body)
        return encode_bhttp_response(response, pad_to=self._pad_to)

    @staticmethod
    def _seal(context: GatewayContext, answer: bytes) -> HandlerResult:
        headers = [("Content-Type", RESPONSE_CONTENT_TYPE), ("Cache-Control", "no-store")]
        return 200, headers, context.seal_response(answer)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ondevice_sync.gateway",
        description="Manage the Oblivious HTTP gateway's key file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate-key", help="write a new key file (mode 0600) and print its pin"
    )
    generate.add_argument("path", type=Path, help="key file to create (never overwritten)")
    generate.add_argument("--key-id", type=int, default=1, help="key identifier 0..255")
    show = commands.add_parser("show-config", help="print the configuration(s) and pin(s)")
    show.add_argument("path", type=Path, help="key file")
    return parser


def _describe(keys: Sequence[GatewayKey]) -> str:
    lines = []
    for key in keys:
        lines.append(f"key id {key.key_id}")
        lines.append(f"  key config (hex): {key.config.encode().hex()}")
        lines.append(f"  pin (sha-256):    {key.config.digest()}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m ondevice_sync.gateway``)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate-key":
            key = GatewayKey.generate(args.key_id)
            save_gateway_keys(args.path, [key])
            keys: Sequence[GatewayKey] = (key,)
        else:
            keys = load_gateway_keys(args.path)
    except SyncError as exc:
        sys.stderr.write(f"ondevice_sync.gateway: error: {exc}\n")
        return 2
    sys.stdout.write(_describe(keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
