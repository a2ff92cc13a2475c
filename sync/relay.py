"""A small Oblivious HTTP relay (RFC 9458): forwards opaque bytes, forgets who sent them.

Run it with ``ondevice-ohttp-relay --gateway https://ondevice.example/v1/ohttp`` (or
``python -m ondevice_sync.relay``); ``--help`` lists every option. The relay is meant to be run
by someone other than the operator of the gateway: it learns device addresses but can
only see encrypted requests; the gateway sees contents but only the relay's address.

What it does
------------
It accepts ``POST <path>`` (default ``/v1/ohttp``) with ``Content-Type:
message/ohttp-req`` and a ``Content-Length`` of at most ``max_request`` bytes (no
chunked bodies), posts the same bytes to the configured gateway URL from its own socket
with only ``Host``, ``Content-Type`` and ``Content-Length`` (never ``Forwarded``,
``X-Forwarded-For``, ``Via`` or anything else about the client), and answers with the
gateway's status, content type and body (at most ``max_response`` bytes). Every answer
closes the connection (one request per connection).

Bounds
------
``workers`` threads serve connections; at most ``backlog`` accepted connections wait
for a worker, and any more are answered ``503`` at once and closed. Each request has one
overall ``deadline`` (seconds, from the moment its connection is accepted) covering the
wait for a worker, reading the request and the round trip to the gateway; past it the
client gets ``408`` (still reading) or ``504`` (gateway too slow). Writing the answer
gets its own short timeout, so a client that does not read cannot hold a worker.

One address (IPv6: one /64, as for the rate limit) holds at most
``connections_per_address`` connections at a time, waiting or served; a further one is
answered ``429`` (code ``too_many_connections``) at once and closed. Without this, a
single client that opens ``workers + backlog`` connections and sends nothing (slowloris)
would lock every other device out, again every ``deadline`` seconds. The open
connections are counted in memory under a keyed hash of the address (never the address)
and forgotten when the connection closes.

Rate limit
----------
At most ``per_epoch`` requests per client address per epoch (ISO week, UTC; an
injectable clock), counted by :class:`ondevice_sync.ratelimit.AddressLimiter` in memory only,
keyed by an HMAC under a key replaced every epoch; beyond it the answer is ``429`` with
``Retry-After``. Only well-formed requests that would be forwarded are counted.

What it logs
------------
Never a client address, never a body: start and stop, and aggregate failures to reach
the gateway.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import logging
import math
import queue
import secrets
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ondevice_sync._serving import Serving, serve_until_signalled
from ondevice_sync.client import HttpTransport
from ondevice_sync.errors import ConfigurationError, SyncError, TransportError, TransportTimeout
from ondevice_sync.ohttp import (
    MAX_ENCAPSULATED_REQUEST_SIZE,
    MAX_ENCAPSULATED_RESPONSE_SIZE,
    OHTTP_PATH,
    REQUEST_CONTENT_TYPE,
    RESPONSE_CONTENT_TYPE,
)
from ondevice_sync.ratelimit import (
    DEFAULT_MAX_TRACKED,
    DEFAULT_PER_EPOCH,
    AddressLimiter,
    address_bucket,
)

__all__ = ["OhttpRelay", "RelayConfig", "main"]

_log = logging.getLogger(__name__)

_MAX_HEAD: Final = 8192
_WRITE_TIMEOUT: Final = 2.0
_PASSED_CONTENT_TYPES: Final = frozenset(
    {RESPONSE_CONTENT_TYPE, "application/json", "application/problem+json"}
)
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Settings of the relay; validated on construction (see the module docstring).

    ``gateway_url`` is the gateway's full ``message/ohttp-req`` resource, e.g.
    ``https://ondevice.example/v1/ohttp``; ``port=0`` picks a free port.
    """

    gateway_url: str
    host: str = "127.0.0.1"
    port: int = 8081
    path: str = OHTTP_PATH
    per_epoch: int = DEFAULT_PER_EPOCH
    max_tracked: int = DEFAULT_MAX_TRACKED
    workers: int = 16
    backlog: int = 64
    connections_per_address: int = 4
    deadline: float = 10.0
    max_request: int = MAX_ENCAPSULATED_REQUEST_SIZE
    max_response: int = MAX_ENCAPSULATED_RESPONSE_SIZE

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.gateway_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"gateway_url is not an http(s) URL: {self.gateway_url!r}")
        if parts.username is not None or parts.password is not None or parts.fragment:
            raise ConfigurationError("gateway_url may carry no credentials and no fragment")
        if not self.path.startswith("/") or "?" in self.path:
            raise ConfigurationError("path must start with '/' and carry no query")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError("port must be in 0..65535")
        for name, low, high in (
            ("workers", 1, 1024),
            ("backlog", 1, 65535),
            ("connections_per_address", 1, 65535),
            ("per_epoch", 1, 10**9),
            ("max_tracked", 1, 10**8),
            ("max_request", 1, MAX_ENCAPSULATED_REQUEST_SIZE),
            ("max_response", 1, MAX_ENCAPSULATED_RESPONSE_SIZE),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigurationError(f"{name} must be an integer in {low}..{high}")
        if not (isinstance(self.deadline, int | float) and math.isfinite(self.deadline)):
            raise ConfigurationError("deadline must be a finite number of seconds")
        if not 0 < self.deadline <= 300:
            raise ConfigurationError("deadline must be in (0, 300] seconds")


class _Refused(Exception):
    """A request the relay answers itself (status, code, message, extra headers)."""

    def __init__(
        self, status: int, code: str, message: str, extra: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.extra = extra or []


_Job = tuple[socket.socket, Any, float, bytes] | None


class _RelayServer(socketserver.TCPServer):
    """Accepts connections and hands them to a fixed pool of worker threads."""

    allow_reuse_address = True

    def __init__(self, config: RelayConfig, relay: OhttpRelay) -> None:
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.request_queue_size = config.backlog
        self.relay = relay
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=config.backlog)
        self._per_address = config.connections_per_address
        self._open: dict[bytes, int] = {}  # keyed hash of an address bucket -> connections
        self._open_lock = threading.Lock()
        self._open_key = secrets.token_bytes(32)
        super().__init__((config.host, config.port), socketserver.BaseRequestHandler)
        self._workers = [
            threading.Thread(target=self._work, name=f"ohttp-relay-{n}", daemon=True)
            for n in range(config.workers)
        ]
        for worker in self._workers:
            worker.start()

    def _tag(self, client_address: Any) -> bytes:
        address = str(client_address[0]) if isinstance(client_address, tuple) else "?"
        bucket = address_bucket(address).encode("utf-8", "surrogatepass")
        return hmac.digest(self._open_key, bucket, hashlib.sha256)[:16]

    def _release(self, tag: bytes) -> None:
        with self._open_lock:
            count = self._open.get(tag, 0) - 1
            if count > 0:
                self._open[tag] = count
            else:
                self._open.pop(tag, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        tag = self._tag(client_address)
        with self._open_lock:
            count = self._open.get(tag, 0)
            if count >= self._per_address:
                refused = True
            else:
                refused = False
                self._open[tag] = count + 1
        if refused:
            self._overloaded(
                request, 429, "too_many_connections",
                "too many connections from this address at once; retry later",
            )
            return
        try:
            self._jobs.put_nowait((request, client_address, time.monotonic(), tag))
        except queue.Full:
            self._release(tag)
            self._overloaded(request)

    @staticmethod
    def _overloaded(
        sock: socket.socket,
        status: int = 503,
        code: str = "overloaded",
        message: str = "the relay is busy; retry later",
    ) -> None:
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(_answer(status, code, message))
        with contextlib.suppress(OSError):
            sock.close()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            sock, client_address, accepted, tag = job
            try:
                self.relay._serve(sock, client_address, accepted)
            except Exception:
                _log.exception("unexpected error while relaying a request")
            finally:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
                self._release(tag)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints the client's address to stderr; log without it.
        _log.exception("unexpected error while accepting a connection")

    def server_close(self) -> None:
        super().server_close()
        while True:  # connections still waiting for a worker: answer 503, close them
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._overloaded(job[0])
                self._release(job[3])
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=5.0)


def _answer(
    status: int, code: str, message: str, extra: list[tuple[str, str]] | None = None
) -> bytes:
    body = json.dumps({"error": code, "message": message}, separators=(",", ":")).encode()
    return _response_bytes(status, "application/json", body, extra or [])


def _response_bytes(
    status: int, content_type: str | None, body: bytes, extra: list[tuple[str, str]]
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in extra]
    lines += [f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class OhttpRelay(Serving):
    """The relay server: :meth:`start` (background thread) or :meth:`serve_forever`,
    then :meth:`close`; also a context manager.

    ``clock`` (unix seconds) drives the rate limit's epochs; ``limiter`` replaces the
    default :class:`~ondevice_sync.ratelimit.AddressLimiter` built from the config.
    """

    def __init__(
        self,
        config: RelayConfig,
        *,
        clock: Callable[[], float] = time.time,
        limiter: AddressLimiter | None = None,
    ) -> None:
        self._config = config
        self._limiter = (
            AddressLimiter(config.per_epoch, clock, max_tracked=config.max_tracked)
            if limiter is None
            else limiter
        )
        self._forward = HttpTransport(max_response_bytes=config.max_response)
        self._server = _RelayServer(config, self)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def config(self) -> RelayConfig:
        """The settings the relay runs with."""
        return self._config

    @property
    def limiter(self) -> AddressLimiter:
        """The per-address, per-epoch limiter."""
        return self._limiter

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the relay listens on (the real port when ``port=0``)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """The relay resource devices post to, e.g. ``http://127.0.0.1:8081/v1/ohttp``."""
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}{self._config.path}"

    _thread_name = "ohttp-relay"

    def _loop(self) -> Any:
        return self._server

    # ----------------------------------------------------------------------- serving

    def _serve(self, sock: socket.socket, client_address: Any, accepted: float) -> None:
        deadline = accepted + self._config.deadline
        try:
            body = self._read_request(sock, deadline)
            address = str(client_address[0]) if isinstance(client_address, tuple) else "?"
            if not self._limiter.allow(address):
                wait = math.ceil(self._limiter.seconds_until_reset())
                raise _Refused(
                    429, "rate_limited",
                    f"at most {self._limiter.per_epoch} requests per address per week",
                    [("Retry-After", str(wait))],
                )
            payload = self._relay(body, deadline)
        except _Refused as refusal:
            payload = _answer(refusal.status, refusal.code, str(refusal), refusal.extra)
        except TimeoutError:
            payload = _answer(408, "request_timeout", "the request did not arrive in time")
        except OSError:
            return  # the client went away
        with contextlib.suppress(OSError):
            sock.settimeout(_WRITE_TIMEOUT)
            sock.sendall(payload)

    @staticmethod
    def _recv(sock: socket.socket, deadline: float, size: int) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)
        return sock.recv(size)

    def _read_request(self, sock: socket.socket, deadline: float) -> bytes:
        data = bytearray()
        while b"\r\n\r\n" not in data:
            if len(data) > _MAX_HEAD:
                raise _Refused(431, "head_too_large", f"request head over {_MAX_HEAD} bytes")
            chunk = self._recv(sock, deadline, 4096)
            if not chunk:
                raise OSError("connection closed before the request head")
            data += chunk
        end = data.index(b"\r\n\r\n")
        if end > _MAX_HEAD:
            raise _Refused(431, "head_too_large", f"request head over {_MAX_HEAD} bytes")
        head = bytes(data[:end]).decode("latin-1")
        body = bytearray(data[end + 4 :])
        length = self._check_head(head)
        if len(body) > length:
            raise _Refused(400, "bad_request", "more bytes than Content-Length")
        while len(body) < length:
            chunk = self._recv(sock, deadline, length - len(body))
            if not chunk:
                raise OSError("connection closed inside the body")
            body += chunk
        return bytes(body)

    def _check_head(self, head: str) -> int:
        """Validate the request line and headers; return the body length."""
        request_line, *header_lines = head.split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            raise _Refused(400, "bad_request", "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _Refused(505, "bad_version", "only HTTP/1.x is spoken here")
        if target != self._config.path:
            raise _Refused(404, "not_found", "unknown path")
        if method != "POST":
            raise _Refused(405, "method_not_allowed", "use POST", [("Allow", "POST")])
        headers: dict[str, list[str]] = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or name[0] in " \t":
                raise _Refused(400, "bad_request", "malformed header line")
            headers.setdefault(name.lower(), []).append(value.strip())
        if "transfer-encoding" in headers:
            raise _Refused(411, "length_required", "send Content-Length, not chunks")
        lengths = headers.get("content-length", [])
        if len(lengths) != 1:
            raise _Refused(411, "length_required", "exactly one Content-Length is required")
        text = lengths[0]
        if not (text.isascii() and text.isdigit() and len(text) <= 18):
            raise _Refused(400, "bad_request", "bad Content-Length")
        length = int(text)
        if length == 0:
            raise _Refused(400, "empty_body", "no encapsulated request")
        if length > self._config.max_request:
            raise _Refused(
                413, "too_large",
                f"an encapsulated request is at most {self._config.max_request} bytes",
            )
        content_type = ",".join(headers.get("content-type", []))
        if content_type.split(";", 1)[0].strip().lower() != REQUEST_CONTENT_TYPE:
            raise _Refused(
                415, "unsupported_media_type", f"Content-Type must be {REQUEST_CONTENT_TYPE}"
            )
        return length

    def _relay(self, body: bytes, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused(504, "gateway_timeout", "no time left to reach the gateway")
        headers = {"Content-Type": REQUEST_CONTENT_TYPE, "Content-Length": str(len(body))}
        try:
            answer = self._forward.request(
                "POST", self._config.gateway_url, headers, body, remaining
            )
        except TransportTimeout:
            _log.warning("the gateway did not answer within the deadline")
            raise _Refused(504, "gateway_timeout", "the gateway did not answer in time") from None
        except TransportError as exc:
            _log.warning("cannot reach the gateway: %s", exc)
            raise _Refused(502, "bad_gateway", "the gateway cannot be reached") from None
        content_type = answer.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if answer.status == 200 and content_type != RESPONSE_CONTENT_TYPE:
            raise _Refused(502, "bad_gateway", "the gateway answered without message/ohttp-res")
        if content_type not in _PASSED_CONTENT_TYPES:
            return _response_bytes(answer.status, None, b"", [])
        return _response_bytes(answer.status, content_type, answer.body, [])


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ondevice-ohttp-relay",
        description="Relay Oblivious HTTP requests to a gateway without revealing clients.",
    )
    parser.add_argument("--gateway", required=True,
                        help="the gateway's message/ohttp-req URL, e.g. https://x/v1/ohttp")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port (0 = any free port)")
    parser.add_argument("--path", default=OHTTP_PATH, help=f"relay path (default {OHTTP_PATH})")
    parser.add_argument("--per-epoch", type=int, default=DEFAULT_PER_EPOCH,
                        help=f"requests per address per ISO week (default {DEFAULT_PER_EPOCH})")
    parser.add_argument("--max-tracked", type=int, default=DEFAULT_MAX_TRACKED,
                        help="distinct addresses tracked per week; new ones refused beyond")
    parser.add_argument("--workers", type=int, default=16, help="worker threads (default 16)")
    parser.add_argument("--backlog", type=int, default=64,
                        help="connections waiting for a worker before 503 (default 64)")
    parser.add_argument("--connections-per-address", type=int, default=4,
                        help="open connections one address (IPv6: /64) may hold (default 4)")
    parser.add_argument("--deadline", type=float, default=10.0,
                        help="seconds per request, end to end (default 10)")
    parser.add_argument("--ready-file", type=Path,
                        help="write the bound port to this file once listening")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``ondevice-ohttp-relay`` / ``python -m ondevice_sync.relay``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = RelayConfig(
            gateway_url=args.gateway,
            host=args.host,
            port=args.port,
            path=args.path,
            per_epoch=args.per_epoch,
            max_tracked=args.max_tracked,
            workers=args.workers,
            backlog=args.backlog,
            connections_per_address=args.connections_per_address,
            deadline=args.deadline,
        )
        relay = OhttpRelay(config)
    except (SyncError, OSError) as exc:
        sys.stderr.write(f"ondevice-ohttp-relay: error: {exc}\n")
        return 2

    host, port = relay.address
    _log.info("relaying POST %s on %s:%d to the configured gateway (%d per address per week)",
              config.path, host, port, config.per_epoch)
    serve_until_signalled(relay, port=port, ready_file=args.ready_file)
    _log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
