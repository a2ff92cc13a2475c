"""The device side of sync: builds the one allowed report and sends it through a transport.

:class:`SyncClient` knows three requests and nothing else: ``POST /v1/report`` with one
canonical report (``ondevice_sync.protocol``), ``GET /v1/content`` (the content table of every
segment, the same bytes for every device) and ``GET /v1/bundle``. Before sending a report
it re-validates its own bytes against the schema and refuses to send anything else.
Every request carries only the fixed headers of :data:`ondevice_sync.protocol.REQUEST_HEADERS`
(plus ``Host``): no cookies, no ``User-Agent``, ``Connection: close``.

The client does *not* randomize (``ondevice_sync.privacy.randomize`` does, in the engine, before
the segment reaches :meth:`SyncClient.send_report`), keep a budget or remember epochs:
that state lives in the engine's encrypted profile.

Any base URL
------------
``base_url`` may be the server itself or any relay in front of it, for example an
Oblivious HTTP relay (RFC 9458) or a forwarding proxy run by a third party, so that the
operator never sees device addresses: switching to a relay is a configuration change,
not a code change. Paths are appended to the base URL (``https://relay.example/ondevice``
gives ``https://relay.example/ondevice/v1/report``).

Transports
----------
A transport is anything with ``request(method, url, headers, body, timeout) ->
Response`` (:class:`Transport`): :class:`HttpTransport` speaks real HTTP(S) with
``http.client`` and a timeout on every request; :class:`InProcessTransport` calls the
server's plain handler function directly (protocol tests, no sockets).

Answer size
-----------
Every answer is read into a bounded buffer, the cap depending on the request:
:data:`MAX_REPORT_ANSWER_SIZE` bytes for a report (its answer is a status and a short
JSON document), :data:`~ondevice_sync.protocol.MAX_CONTENT_TABLE_SIZE` for the content table
and ``max_bundle_bytes`` (default :data:`DEFAULT_MAX_BUNDLE_SIZE`) for the bundle.
:class:`HttpTransport` also caps the status line and header fields together at
:data:`MAX_RESPONSE_HEAD_SIZE`, refuses an announced ``Content-Length`` over the cap
before reading the body, and stops reading as soon as the cap is passed; a larger
answer raises :class:`~ondevice_sync.errors.TransportError` (``maybe_delivered``). Answers from
other transports are checked after the fact. Nothing the server chose reaches
:class:`ReportAnswer`: it holds the status and the fixed word ``"counted"``; an error
code from the server is kept only if it is a short ``snake_case`` word (``"unknown"``
otherwise), and its message only as printable ASCII, at most 200 characters.

Retries
-------
:class:`Backoff` is the retry schedule the engine uses after a retryable failure
(``exc.retryable``). A retry must resend the *same* bytes for the *same* epoch (never a
fresh random draw, which would leak more and spend budget again).
"""

from __future__ import annotations

import functools
import http.client
import inspect
import json
import math
import random
import re
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from ondevice_sync.errors import (
    AnswerTooLargeError,
    ConfigurationError,
    MessageSizeError,
    ProtocolError,
    ServerRejectedError,
    ServerUnavailableError,
    TransportError,
    TransportTimeout,
)
from ondevice_sync.protocol import (
    BUNDLE_PATH,
    CONTENT_PATH,
    MAX_CONTENT_TABLE_SIZE,
    MAX_SEGMENTS,
    MESSAGE_SIZE,
    REPORT_PATH,
    REQUEST_HEADERS,
    ContentTable,
    Report,
    check_request_headers,
    decode_content_table,
    decode_report,
    encode_report,
)

__all__ = [
    "DEFAULT_MAX_BUNDLE_SIZE",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MAX_REPORT_ANSWER_SIZE",
    "MAX_RESPONSE_HEAD_SIZE",
    "Backoff",
    "HttpTransport",
    "InProcessTransport",
    "ReportAnswer",
    "Response",
    "SyncClient",
    "Transport",
]

DEFAULT_MAX_RESPONSE_BYTES: Final = MAX_CONTENT_TABLE_SIZE
"""The largest response body :class:`HttpTransport` reads unless told otherwise per
request (:class:`SyncClient` always says, per kind of request)."""

MAX_REPORT_ANSWER_SIZE: Final = 1024
"""The largest answer body read for a report (the server's are under 300 bytes)."""

DEFAULT_MAX_BUNDLE_SIZE: Final = 64 * 1024 * 1024
"""The default cap on a fetched bundle (``SyncClient(max_bundle_bytes=...)``)."""

MAX_RESPONSE_HEAD_SIZE: Final = 16 * 1024
"""The most bytes of status line and header fields :class:`HttpTransport` reads."""

_CHUNK: Final = 64 * 1024
_CODE_RE: Final = re.compile(r"[a-z][a-z0-9_]{0,47}")
_UNPRINTABLE_RE: Final = re.compile(r"[^\x20-\x7e]")


def _check_cap(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1")


class _TooLarge(Exception):
    """The answer passed the transport's byte budget."""


class _Budget:
    """Wraps a response's socket file; fails once more than ``limit`` bytes are read.

    ``http.client`` reads the status line, the header fields, any chunk framing and
    the body through it; the buffered reader beneath reads ahead at most its buffer.
    """

    def __init__(self, raw: Any, limit: int) -> None:
        self._raw = raw
        self._left = limit

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise _TooLarge
        return data

    def _size(self, size: int | None) -> int:
        return self._left + 1 if size is None or size < 0 else min(size, self._left + 1)

    def readline(self, size: int | None = -1) -> bytes:
        return self._take(self._raw.readline(self._size(size)))

    def read(self, size: int | None = -1) -> bytes:
        return self._take(self._raw.read(self._size(size)))

    def read1(self, size: int = -1) -> bytes:
        return self._take(self._raw.read1(self._size(size)))

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count: int = self._raw.readinto(view[: self._left + 1])
        self._left -= count
        if self._left < 0:
            raise _TooLarge
        return count

    def close(self) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@functools.lru_cache(maxsize=64)
def _takes_cap(kind: type) -> bool:
    """Whether ``kind.request`` takes a per-request ``max_response_bytes`` (as
    :meth:`HttpTransport.request` does); other transports are checked afterwards."""
    try:
        parameters = inspect.signature(getattr(kind, "request")).parameters  # noqa: B009
    except (AttributeError, TypeError, ValueError):
        return False
    return "max_response_bytes" in parameters


@functools.lru_cache(maxsize=32)
def _bounded_response(limit: int) -> type[http.client.HTTPResponse]:
    """An HTTPResponse class whose reads, head included, stop after ``limit`` bytes."""

    class BoundedResponse(http.client.HTTPResponse):
        def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(sock, *args, **kwargs)
            self.fp = _Budget(self.fp, limit)  # type: ignore[assignment]

    return BoundedResponse


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer: status, headers (names lower case) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Transport(Protocol):
    """Carries one request and returns the answer; raises TransportError on failure."""

    def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> Response:
        """Send ``method url`` with exactly ``headers`` and ``body``; wait ``timeout`` s."""
        ...


def _split_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"not an http(s) URL: {url!r}")
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise ConfigurationError("the URL may carry no credentials and no fragment")
    return parts


class HttpTransport:
    """Real HTTP(S) through :mod:`http.client`: one connection per request, closed after.

    Sends only the headers it is given (checked against the protocol's allowed set) plus
    ``Host``; no ``Accept-Encoding``, no ``User-Agent``, no cookies. ``timeout`` bounds
    connecting, and the rest of the exchange shares one deadline of ``timeout`` from the
    start (a server that drips its answer cannot hold the device much longer). The
    answer's body is capped at ``max_response_bytes`` (or at the ``max_response_bytes``
    given to :meth:`request` for that request), its status line and header fields at
    :data:`MAX_RESPONSE_HEAD_SIZE`; past either, :class:`~ondevice_sync.errors.TransportError`.
    """

    def __init__(
        self,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        _check_cap(max_response_bytes, "max_response_bytes")
        self._max = max_response_bytes
        self._ssl_context = ssl_context

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout: float,
        *,
        max_response_bytes: int | None = None,
    ) -> Response:
        """Send one request; see the class docstring. ``max_response_bytes`` replaces
        the transport's cap for this request."""
        check_request_headers(headers)
        cap = self._max if max_response_bytes is None else max_response_bytes
        _check_cap(cap, "max_response_bytes")
        parts = _split_url(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
            connection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=timeout, context=context
            )
        else:
            connection = http.client.HTTPConnection(
                parts.hostname or "", parts.port, timeout=timeout
            )
        connection.response_class = _bounded_response(cap + MAX_RESPONSE_HEAD_SIZE)
        deadline = time.monotonic() + timeout
        sent = False
        answer: http.client.HTTPResponse | None = None
        status: int | None = None
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders(body if body else None)
            sent = True
            self._shrink_timeout(connection, deadline)
            answer = connection.getresponse()
            status = answer.status
            if answer.length is not None and answer.length > cap:
                raise _TooLarge
            data = bytearray()
            while True:
                self._shrink_timeout(connection, deadline)
                chunk = answer.read(min(_CHUNK, cap + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
                if len(data) > cap:
                    raise _TooLarge
            return Response(
                status=answer.status,
                headers={name.lower(): value for name, value in answer.getheaders()},
                body=bytes(data),
            )
        except _TooLarge:
            raise AnswerTooLargeError(
                f"{method} {parts.path}: answer over {cap} bytes (or its head over "
                f"{MAX_RESPONSE_HEAD_SIZE})",
                status=status,
            ) from None
        except TimeoutError as exc:
            raise TransportTimeout(
                f"{method} {parts.path}: no answer within {timeout:g} s", maybe_delivered=sent
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(
                f"{method} {parts.path}: {type(exc).__name__}: {exc}", maybe_delivered=sent
            ) from exc
        finally:
            # The response holds the socket too (for a "Connection: close" answer it is
            # the only holder): close both, so no error path leaves the socket open.
            if answer is not None:
                answer.close()
            connection.close()

    @staticmethod
    def _shrink_timeout(connection: http.client.HTTPConnection, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete answer within the timeout")
        if connection.sock is not None:
            connection.sock.settimeout(remaining)


HandlerFunction = Callable[
    [str, str, Mapping[str, str], bytes], tuple[int, Sequence[tuple[str, str]], bytes]
]


class InProcessTransport:
    """Calls a server handler function directly: no sockets, same bytes in and out.

    ``handler`` is ``ondevice_sync.server.ReportHandler(...).handle`` or any function with its
    signature ``(method, path_and_query, headers, body) -> (status, headers, body)``.
    """

    def __init__(self, handler: HandlerFunction) -> None:
        self._handler = handler

    def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> Response:
        """Hand the request to the handler; ``timeout`` is not used."""
        check_request_headers(headers)
        parts = _split_url(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sent = {"Host": parts.netloc, **headers}
        status, answer_headers, answer_body = self._handler(method, target, sent, body)
        return Response(
            status=status,
            headers={name.lower(): value for name, value in answer_headers},
            body=answer_body,
        )


@dataclass(frozen=True, slots=True)
class ReportAnswer:
    """The server's answer to a report that was counted: its status and the fixed word
    ``"counted"`` (nothing the server wrote; the egress log keeps only these)."""

    status: int
    code: str = "counted"

    @property
    def summary(self) -> str:
        """A short human line, e.g. ``"200 counted"``."""
        return f"{self.status} {self.code}"


def _json_field(response: Response, name: str) -> str | None:
    try:
        document = json.loads(response.body)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get(name), str):
        return str(document[name])
    return None


class SyncClient:
    """Sends segment reports and fetches the content table and the bundle.

    ``base_url`` is the server's or a relay's (see the module docstring); ``transport``
    defaults to :class:`HttpTransport`; ``timeout`` (seconds) bounds every request; ``k``
    is the bundle's number of segments, so a segment ``>= k`` is refused locally;
    ``max_bundle_bytes`` caps :meth:`fetch_bundle`'s answer (the other answers have
    fixed caps, see the module docstring).
    """

    def __init__(
        self,
        *,
        base_url: str,
        transport: Transport | None = None,
        timeout: float = 5.0,
        k: int = MAX_SEGMENTS,
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_SIZE,
    ) -> None:
        _split_url(base_url)
        _check_cap(max_bundle_bytes, "max_bundle_bytes")
        if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
            raise ConfigurationError("timeout must be a finite number of seconds > 0")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SEGMENTS:
            raise ConfigurationError(f"k must be an integer in 1..{MAX_SEGMENTS}")
        self._base = base_url.rstrip("/")
        self._transport: Transport = HttpTransport() if transport is None else transport
        self._timeout = float(timeout)
        self._k = k
        self._caps: Mapping[str, int] = {
            REPORT_PATH: MAX_REPORT_ANSWER_SIZE,
            CONTENT_PATH: MAX_CONTENT_TABLE_SIZE,
            BUNDLE_PATH: max_bundle_bytes,
        }

    @property
    def base_url(self) -> str:
        """The base URL requests go to (server or relay)."""
        return self._base

    def build_report(self, segment_reported: int, epoch: str) -> bytes:
        """The exact bytes :meth:`send_report` would send, validated against the schema.

        The engine logs these bytes in its egress log *before* sending them. Raises a
        :class:`~ondevice_sync.errors.ProtocolError` for anything the schema does not allow.
        """
        body = encode_report(Report(epoch=epoch, segment=segment_reported), k=self._k)
        if len(body) != MESSAGE_SIZE or decode_report(body, k=self._k) != Report(
            epoch=epoch, segment=segment_reported
        ):  # pragma: no cover - encode and decode agree by construction
            raise MessageSizeError("refusing to send a report that fails its own schema")
        return body

    def send_report(self, segment_reported: int, epoch: str) -> ReportAnswer:
        """Send one (already randomized) segment for ``epoch``.

        Returns the answer once the server has counted it. Raises
        :class:`~ondevice_sync.errors.ProtocolError` (nothing sent),
        :class:`~ondevice_sync.errors.TransportError` /
        :class:`~ondevice_sync.errors.ServerUnavailableError`
        (retry later with :class:`Backoff`, same bytes) or
        :class:`~ondevice_sync.errors.ServerRejectedError` (do not retry).
        """
        body = self.build_report(segment_reported, epoch)
        return self.send_report_bytes(body)

    def send_report_bytes(self, body: bytes) -> ReportAnswer:
        """Send previously built report bytes (a retry of a logged report).

        The bytes are validated again; anything but a canonical report is refused.
        """
        decode_report(body, k=self._k)  # raises for anything but a canonical report
        try:
            response = self._request("POST", REPORT_PATH, body)
        except AnswerTooLargeError as exc:
            if exc.status == 200:
                # Counted: a long body (a proxy's banner) does not make it a failure,
                # and a retry would count it again.
                return ReportAnswer(status=200)
            raise
        if response.status == 200:
            return ReportAnswer(status=200)
        raise self._failure(response)

    def fetch_content(self) -> ContentTable:
        """The content table for all segments (the same bytes for every device)."""
        response = self._request("GET", CONTENT_PATH, b"")
        if response.status != 200:
            raise self._failure(response)
        try:
            return decode_content_table(response.body)
        except ProtocolError as exc:
            raise ServerRejectedError(
                f"the server sent an invalid content table: {exc}", status=200, code=exc.code
            ) from exc

    def fetch_bundle(self) -> bytes:
        """The catalog bundle's bytes, as served (verify its signature before use)."""
        response = self._request("GET", BUNDLE_PATH, b"")
        if response.status != 200:
            raise self._failure(response)
        return response.body

    def _request(self, method: str, path: str, body: bytes) -> Response:
        headers = dict(REQUEST_HEADERS[path])
        cap = self._caps[path]
        url = self._base + path
        if _takes_cap(type(self._transport)):
            response = self._transport.request(  # type: ignore[call-arg]
                method, url, headers, body, self._timeout, max_response_bytes=cap
            )
        else:
            response = self._transport.request(method, url, headers, body, self._timeout)
        if len(response.body) > cap:
            raise AnswerTooLargeError(
                f"{method} {path}: answer over {cap} bytes", status=response.status
            )
        return response

    @staticmethod
    def _failure(response: Response) -> ServerRejectedError | ServerUnavailableError:
        code = _json_field(response, "error")
        if code is None or not _CODE_RE.fullmatch(code):
            code = "unknown"
        message = _UNPRINTABLE_RE.sub("", _json_field(response, "message") or "")[:200]
        text = f"server answered {response.status} ({code}){': ' + message if message else ''}"
        if response.status == 429 or response.status >= 500:
            return ServerUnavailableError(text, status=response.status, code=code)
        return ServerRejectedError(text, status=response.status, code=code)


_SYSTEM_RANDOM: Final = secrets.SystemRandom()


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential retry delays with a cap and jitter.

    The delay before retry number ``attempt`` (0 for the first retry) is
    ``d = min(cap, base * factor ** attempt)``, drawn uniformly from
    ``[d * (1 - jitter), d]``. The defaults retry after about a minute, then two, four...
    up to six hours, which keeps a device with no network quiet.
    """

    base: float = 60.0
    factor: float = 2.0
    cap: float = 6 * 3600.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.base <= self.cap and math.isfinite(self.cap)):
            raise ConfigurationError("backoff needs 0 < base <= cap < inf")
        if not self.factor >= 1 or not 0 <= self.jitter <= 1:
            raise ConfigurationError("backoff needs factor >= 1 and 0 <= jitter <= 1")

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (``>= 0``)."""
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
            raise ConfigurationError("attempt must be an integer >= 0")
        if self.factor == 1:
            ceiling = self.base
        else:
            limit = math.log(self.cap / self.base, self.factor)
            ceiling = self.cap if attempt >= limit else self.base * self.factor**attempt
        ceiling = min(ceiling, self.cap)
        source = _SYSTEM_RANDOM if rng is None else rng
        return ceiling * (1 - self.jitter * source.random())

    def next_attempt_at(
        self, now: float, attempt: int, *, rng: random.Random | None = None
    ) -> float:
        """The unix time of retry number ``attempt`` after a failure at ``now``."""
        return now + self.delay(attempt, rng=rng)
