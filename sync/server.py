"""The server stub: counts randomized segment reports, publishes debiased statistics.

Run it with ``python -m sync.server --k 8 --db counts.db`` (or the console script
``ondevice-sync-server``); ``--help`` lists every option. It depends on the standard
library, ``sync.protocol``, ``sync.privacy`` and ``sync.errors`` only, and never imports
``ondevice``.

Endpoints
---------
``POST /v1/report``
    Body: one canonical report (``sync.protocol``), content type
    :data:`~sync.protocol.REPORT_CONTENT_TYPE`, at most ``max_body`` bytes (a larger
    ``Content-Length`` is refused before the body is read), a segment below ``K`` and an
    epoch within ``epoch_window`` weeks of the server's clock. ``200`` once the count is
    committed to disk; a ``4xx`` with a JSON error body ``{"error": code, "message": ...}``
    for anything else, and then nothing is stored.
``GET /v1/content``
    The operator's content table (featured items of every segment), the same bytes for
    every client.
``GET /v1/bundle``
    The signed catalog bundle file, bytes as they are on disk.
``GET /v1/stats`` and ``GET /v1/stats?epoch=2026-W48``
    The epochs with reports; or one epoch's debiased per-segment estimates with every
    cell whose raw or estimated count is under the k threshold suppressed.

What is stored and logged
-------------------------
Only counts per (epoch, segment), in SQLite (WAL). Never a report, never a client
address: there is no access log (``log_message`` is silenced) and error logs carry no
address. A report is acknowledged only after the transaction that counts it has
committed (``synchronous=FULL`` by default, so even a power cut keeps it); concurrent
reports share commits (group commit), which is what keeps throughput up.

A test mode (``capture_raw=True``) keeps the exact raw bytes of every request in memory
so end-to-end tests can check every byte a client sent. Never enable it in production.

The network still shows the server an address. To hide it from the operator, put an
Oblivious HTTP relay (RFC 9458, as Firefox does) or any forwarding proxy run by a third
party in front: clients take any base URL, so only their configuration changes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import queue
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Final, Literal

from sync.errors import (
    BadEpochError,
    ConfigurationError,
    EpochOutOfWindowError,
    MessageSizeError,
    ProtocolError,
    StoreError,
    SyncError,
)
from sync.privacy import DEFAULT_EPSILON, DEFAULT_K_THRESHOLD, check_epsilon, estimate
from sync.protocol import (
    BUNDLE_CONTENT_TYPE,
    BUNDLE_PATH,
    CONTENT_PATH,
    CONTENT_TABLE_CONTENT_TYPE,
    ERROR_CONTENT_TYPE,
    MAX_BODY_SIZE,
    MAX_SEGMENTS,
    REPORT_CONTENT_TYPE,
    REPORT_PATH,
    STATS_PATH,
    WEEK_SECONDS,
    check_epoch_window,
    decode_content_table,
    decode_report,
    encode_content_table,
    epoch_of,
    epoch_start,
    parse_epoch,
    shift_epoch,
)

__all__ = [
    "STATS_VERSION",
    "STORE_VERSION",
    "CountStore",
    "ReportHandler",
    "ServerConfig",
    "SyncServer",
    "load_content_file",
    "main",
]

_log = logging.getLogger(__name__)

STORE_VERSION: Final = 1
"""``PRAGMA user_version`` of the count store."""

STATS_VERSION: Final = 1
"""Version of the ``/v1/stats`` document."""

_COMMIT_WAIT: Final = 30.0
_UPSERT: Final = (
    "INSERT INTO counts (epoch, segment, n) VALUES (?, ?, ?) "
    "ON CONFLICT (epoch, segment) DO UPDATE SET n = n + excluded.n"
)
_MAX_REQUEST_LINE: Final = 8192

Headers = list[tuple[str, str]]
HandlerResult = tuple[int, Headers, bytes]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the server stub; validated on construction.

    ``k`` is the number of segments of the bundle the devices use; ``epsilon`` the
    per-report epsilon the devices randomize with (the estimator assumes it);
    ``k_threshold`` the smallest count ever published (>= 1, default 50); ``port=0``
    picks a free port. ``synchronous`` is SQLite's: ``"FULL"`` survives power loss,
    ``"NORMAL"`` survives a killed process. ``workers`` pre-started threads serve
    connections (more are started when all are busy). ``capture_raw`` is a test-only
    switch.
    """

    k: int
    db_path: Path
    epsilon: float = DEFAULT_EPSILON
    k_threshold: int = DEFAULT_K_THRESHOLD
    content_path: Path | None = None
    bundle_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = MAX_BODY_SIZE
    epoch_window: int = 1
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    workers: int = 32
    capture_raw: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ConfigurationError("k must be an integer")
        if not 1 <= self.k <= MAX_SEGMENTS:
            raise ConfigurationError(f"k must be in 1..{MAX_SEGMENTS}, got {self.k}")
        check_epsilon(self.epsilon)
        if isinstance(self.k_threshold, bool) or not isinstance(self.k_threshold, int):
            raise ConfigurationError("k_threshold must be an integer")
        if self.k_threshold < 1:
            raise ConfigurationError(f"k_threshold must be >= 1, got {self.k_threshold}")
        if not 1 <= self.max_body <= MAX_BODY_SIZE:
            raise ConfigurationError(f"max_body must be in 1..{MAX_BODY_SIZE}")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError("port must be in 0..65535")
        if not 0 <= self.epoch_window <= 4:
            raise ConfigurationError("epoch_window must be in 0..4 weeks")
        if not 0 <= self.workers <= 1024:
            raise ConfigurationError("workers must be in 0..1024")
        if self.synchronous not in ("FULL", "NORMAL"):
            raise ConfigurationError("synchronous must be 'FULL' or 'NORMAL'")


# --------------------------------------------------------------------------- store


class _Batch:
    __slots__ = ("done", "error", "items")

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []
        self.done = False
        self.error: BaseException | None = None


class CountStore:
    """Counts per (epoch, segment) in SQLite (WAL), with group commit.

    :meth:`add` returns only after the transaction holding that count has committed.
    Group commit without a writer thread: the first caller to find no commit in
    progress becomes the leader and commits every count queued so far in one
    transaction; callers arriving meanwhile queue for the next commit, led by one of
    them. A lone client thus pays one commit and no thread hand-off; many clients share
    commits. Reads (:meth:`counts`, :meth:`epochs`) use their own short-lived connections.
    """

    def __init__(self, *, path: Path, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        self._path = Path(path)
        self._synchronous = synchronous
        self._cond = threading.Condition(threading.Lock())
        self._batch = _Batch()
        self._committing = False
        self._closed = False
        try:
            self._connection = self._connect()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the count store: {exc}") from exc
        try:
            self._init_schema(self._connection)
        except BaseException:
            self._connection.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self._synchronous}")
        return connection

    def _init_schema(self, connection: sqlite3.Connection) -> None:
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > STORE_VERSION:
                raise ConfigurationError(
                    f"count store version {version} is newer than this server ({STORE_VERSION})"
                )
            connection.execute(
                "CREATE TABLE IF NOT EXISTS counts ("
                " epoch TEXT NOT NULL, segment INTEGER NOT NULL, n INTEGER NOT NULL,"
                " PRIMARY KEY (epoch, segment)) WITHOUT ROWID"
            )
            connection.execute(f"PRAGMA user_version={STORE_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot initialise the count store: {exc}") from exc

    def add(self, epoch: str, segment: int) -> None:
        """Count one report; returns once the count is committed (raises StoreError)."""
        deadline = time.monotonic() + _COMMIT_WAIT
        with self._cond:
            if self._closed:
                raise StoreError("the count store is closed")
            batch = self._batch
            batch.items.append((epoch, segment))
            while not batch.done:
                if not self._committing:
                    # Lead: our batch is the pending one (taken batches are done before
                    # the leader lets go), so committing it commits our count.
                    self._committing = True
                    self._batch = _Batch()
                    self._cond.release()
                    try:
                        self._commit(batch)
                    finally:
                        self._cond.acquire()
                        self._committing = False
                        self._cond.notify_all()
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError("the count store did not commit in time")
                self._cond.wait(remaining)
        if batch.error is not None:
            raise StoreError("the count store could not commit") from batch.error

    def _commit(self, batch: _Batch) -> None:
        connection = self._connection
        totals = collections.Counter(batch.items)
        committed = False
        try:
            if len(totals) == 1:  # one statement: autocommitted on its own
                ((epoch, segment), n), = totals.items()
                connection.execute(_UPSERT, (epoch, segment, n))
            else:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany(
                    _UPSERT, [(epoch, segment, n) for (epoch, segment), n in totals.items()]
                )
                connection.execute("COMMIT")
            committed = True
        except sqlite3.Error as exc:
            _log.error("count store commit failed: %s", exc)
            batch.error = exc
        finally:
            if not committed:
                if batch.error is None:
                    batch.error = StoreError("the commit did not complete")
                with contextlib.suppress(sqlite3.Error):
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
            batch.done = True

    def _read(self, sql: str, params: Iterable[Any]) -> list[tuple[Any, ...]]:
        try:
            connection = sqlite3.connect(self._path, timeout=30.0)
            try:
                return connection.execute(sql, tuple(params)).fetchall()
            finally:
                connection.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the count store: {exc}") from exc

    def counts(self, epoch: str, *, k: int) -> list[int]:
        """The committed count of every segment ``0..k-1`` for ``epoch``."""
        result = [0] * k
        for segment, n in self._read("SELECT segment, n FROM counts WHERE epoch = ?", (epoch,)):
            if 0 <= segment < k:
                result[segment] = int(n)
        return result

    def epochs(self) -> list[str]:
        """Every epoch with at least one counted report, oldest first."""
        return [row[0] for row in self._read("SELECT DISTINCT epoch FROM counts ORDER BY 1", ())]

    def close(self) -> None:
        """Refuse new counts, wait for the commit in progress, close the connection."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._committing:
                self._cond.wait()
            self._connection.close()


# --------------------------------------------------------------------------- handler


def load_content_file(path: Path, *, k: int, epsilon: float) -> bytes:
    """Read the operator's content table file and return its canonical wire bytes.

    The file is JSON: ``{"version": 1, "segments": [[item IDs of segment 0], ...]}`` with
    exactly ``k`` rows; ``"k"`` and ``"epsilon"`` may be given and must then match the
    server's configuration (they are filled in from it otherwise).
    """
    try:
        raw = Path(path).read_bytes()
        document = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the content table {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigurationError(f"content table {path} must be a JSON object")
    if document.setdefault("k", k) != k:
        raise ConfigurationError(f"content table {path} has k={document['k']}, server k={k}")
    if document.setdefault("epsilon", epsilon) != epsilon:
        raise ConfigurationError(f"content table {path} epsilon differs from the server's")
    try:
        table = decode_content_table(json.dumps(document).encode(), require_canonical=False)
    except ProtocolError as exc:
        raise ConfigurationError(f"content table {path}: {exc}") from exc
    return encode_content_table(table)


def _json(status: int, document: Mapping[str, Any], extra: Headers | None = None) -> HandlerResult:
    body = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    headers: Headers = [("Content-Type", ERROR_CONTENT_TYPE), *(extra or [])]
    return status, headers, body


def _error(status: int, code: str, message: str, extra: Headers | None = None) -> HandlerResult:
    return _json(status, {"error": code, "message": message}, extra)


_ROUTES: Final[Mapping[str, str]] = {
    REPORT_PATH: "POST",
    CONTENT_PATH: "GET",
    BUNDLE_PATH: "GET",
    STATS_PATH: "GET",
}


class ReportHandler:
    """The server's request handling as a plain function of bytes, usable in-process.

    :meth:`handle` takes a method, a path (with its query string), the request headers
    and the body, and returns ``(status, headers, body)``. The HTTP server and the
    client's ``InProcessTransport`` both call it.
    """

    def __init__(
        self,
        *,
        config: ServerConfig,
        store: CountStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._window: tuple[float, float, frozenset[str]] = (0.0, 0.0, frozenset())
        self._content = (
            None
            if config.content_path is None
            else load_content_file(config.content_path, k=config.k, epsilon=config.epsilon)
        )

    @property
    def config(self) -> ServerConfig:
        """The settings this handler runs with."""
        return self._config

    def handle(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> HandlerResult:
        """Answer one request; never raises for bad input (a 4xx result instead)."""
        try:
            return self._route(method, path, {k.lower(): v for k, v in headers.items()}, body)
        except StoreError as exc:
            _log.error("store failure: %s", exc)
            return _error(503, "store_unavailable", "the report was not counted; retry later")
        except Exception:
            _log.exception("unexpected error while handling a request")
            return _error(500, "internal", "internal error; nothing was counted")

    def _route(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> HandlerResult:
        split = urllib.parse.urlsplit(target)
        allowed = _ROUTES.get(split.path)
        if allowed is None:
            return _error(404, "not_found", "unknown path")
        if method != allowed:
            return _error(
                405, "method_not_allowed", f"use {allowed} for {split.path}", [("Allow", allowed)]
            )
        if split.path == STATS_PATH:
            return self._stats(split.query)
        if split.query:
            return _error(400, "bad_query", "this endpoint takes no query string")
        if split.path == REPORT_PATH:
            return self._report(headers, body)
        if body:
            return _error(400, "unexpected_body", "GET requests carry no body")
        if split.path == CONTENT_PATH:
            return self._serve_content()
        return self._serve_bundle()

    def _report(self, headers: Mapping[str, str], body: bytes) -> HandlerResult:
        content_type = headers.get("content-type", "").strip().lower()
        if content_type != REPORT_CONTENT_TYPE:
            return _error(
                415, "unsupported_media_type", f"Content-Type must be {REPORT_CONTENT_TYPE}"
            )
        if len(body) > self._config.max_body:
            return _error(
                413, MessageSizeError.code, f"body exceeds {self._config.max_body} bytes"
            )
        try:
            report = decode_report(body, k=self._config.k)
            self._check_window(report.epoch)
        except ProtocolError as exc:
            return _error(400, exc.code, str(exc))
        self._store.add(report.epoch, report.segment)
        return _json(200, {"status": "counted"})

    def _check_window(self, epoch: str) -> None:
        now = self._clock()
        start, end, allowed = self._window
        if not start <= now < end:
            current = epoch_of(now)
            start = epoch_start(current)
            span = range(-self._config.epoch_window, self._config.epoch_window + 1)
            allowed = frozenset(shift_epoch(current, weeks) for weeks in span)
            self._window = (start, start + WEEK_SECONDS, allowed)
        if epoch not in allowed:
            check_epoch_window(epoch, now=now, window=self._config.epoch_window)
            raise EpochOutOfWindowError(f"epoch {epoch} is outside the accepted window")

    def _serve_content(self) -> HandlerResult:
        if self._content is None:
            return _error(404, "no_content", "no content table is configured")
        return 200, [("Content-Type", CONTENT_TABLE_CONTENT_TYPE)], self._content

    def _serve_bundle(self) -> HandlerResult:
        if self._config.bundle_path is None:
            return _error(404, "no_bundle", "no bundle is configured")
        try:
            data = self._config.bundle_path.read_bytes()
        except OSError as exc:
            _log.error("cannot read the bundle file: %s", exc.strerror)
            return _error(503, "bundle_unavailable", "the bundle cannot be read now")
        return 200, [("Content-Type", BUNDLE_CONTENT_TYPE)], data

    def _stats(self, query: str) -> HandlerResult:
        try:
            params = urllib.parse.parse_qs(
                query, keep_blank_values=True, strict_parsing=bool(query)
            )
        except ValueError:
            return _error(400, "bad_query", "malformed query string")
        if set(params) - {"epoch"} or any(len(v) != 1 for v in params.values()):
            return _error(400, "bad_query", "the only query parameter is one epoch=YYYY-Www")
        if not params:
            return _json(200, {"version": STATS_VERSION, "epochs": self._store.epochs()})
        epoch = params["epoch"][0]
        try:
            parse_epoch(epoch)
        except BadEpochError as exc:
            return _error(400, exc.code, str(exc))
        config = self._config
        result = estimate(
            self._store.counts(epoch, k=config.k),
            epsilon=config.epsilon,
            k_threshold=config.k_threshold,
        )
        return _json(
            200,
            {
                "version": STATS_VERSION,
                "epoch": epoch,
                "k": config.k,
                "epsilon": config.epsilon,
                "k_threshold": config.k_threshold,
                "total": result.total,
                "segments": [
                    {
                        "segment": cell.segment,
                        "estimate": cell.estimate,
                        "standard_error": cell.standard_error,
                    }
                    for cell in result.cells
                ],
                "suppressed": list(result.suppressed),
            },
        )


# --------------------------------------------------------------------------- HTTP


class _TeeReader:
    """Wraps a request's input stream and records every byte read (test mode)."""

    def __init__(self, raw: IO[bytes] | io.BufferedIOBase) -> None:
        self._raw = raw
        self.recorded = bytearray()

    def readline(self, limit: int = -1) -> bytes:
        data = self._raw.readline(limit)
        self.recorded += data
        return data

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.recorded += data
        return data

    def take(self) -> bytes:
        data = bytes(self.recorded)
        self.recorded.clear()
        return data

    def close(self) -> None:
        self._raw.close()


_Job = tuple[socket.socket, Any] | None


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a pool of pre-started worker threads.

    Starting a thread per connection costs more than handling a report (hundreds of
    microseconds on a busy machine), so connections go to an idle pooled worker; when
    every worker is busy (e.g. held by keep-alive connections) a fresh thread is
    started as ThreadingHTTPServer always does, so nothing ever waits for the pool.
    """

    daemon_threads = True
    request_queue_size = 512
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], handler: ReportHandler, capture: bool, workers: int
    ) -> None:
        self.report_handler = handler
        self.capture: list[bytes] | None = [] if capture else None
        self.capture_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._idle = 0
        self._idle_lock = threading.Lock()
        super().__init__(address, _HTTPRequestHandler)
        self._workers = [
            threading.Thread(target=self._work, name=f"sync-worker-{n}", daemon=True)
            for n in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._idle_lock:
            pooled = self._idle > 0
            if pooled:
                self._idle -= 1
        if pooled:
            self._jobs.put((request, client_address))
        else:
            super().process_request(request, client_address)

    def _work(self) -> None:
        while True:
            with self._idle_lock:
                self._idle += 1
            job = self._jobs.get()
            if job is None:
                return
            self.process_request_thread(*job)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints the client's address to stderr; log the failure without it.
        _log.exception("unexpected error while serving a connection")

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            self._jobs.put(None)


def _is_decimal(text: str) -> bool:
    return 0 < len(text) <= 18 and text.isascii() and text.isdigit()


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class _HTTPRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 10.0
    server: _HTTPServer
    _tee: _TeeReader | None = None

    def setup(self) -> None:
        super().setup()
        if self.server.capture is not None:
            self._tee = _TeeReader(self.rfile)
            self.rfile = self._tee  # type: ignore[assignment]

    # No access log: nothing with a client address is ever written.
    def log_message(self, format: str, *args: Any) -> None:
        return

    def log_error(self, format: str, *args: Any) -> None:
        return

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        self._write(*_error(code, "bad_request", message or _REASONS.get(code, "error")))

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(_MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > _MAX_REQUEST_LINE:
                self.requestline = ""
                self.request_version = "HTTP/1.1"
                self.command = ""
                self.send_error(414, "request line too long")
                return
            if not self.parse_request():
                return
            self._dispatch()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def _dispatch(self) -> None:
        limit = self.server.report_handler.config.max_body
        if "transfer-encoding" in self.headers:
            self.send_error(411, "Transfer-Encoding is not accepted; send Content-Length")
            return
        lengths = self.headers.get_all("Content-Length") or []
        if self.command == "POST" and not lengths:
            self.send_error(411, "Content-Length is required")
            return
        if len(lengths) > 1 or (lengths and not _is_decimal(lengths[0].strip())):
            self.send_error(400, "bad Content-Length")
            return
        length = int(lengths[0]) if lengths else 0
        if length > limit:
            # Refused unread; the unread body makes the connection unusable.
            self.close_connection = True
            self._capture()
            self._write(*_error(413, MessageSizeError.code, f"body exceeds {limit} bytes"))
            return
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            return
        self._capture()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self._write(*self.server.report_handler.handle(self.command, self.path, headers, body))

    def _capture(self) -> None:
        if self._tee is None or self.server.capture is None:
            return
        data = self._tee.take()
        with self.server.capture_lock:
            self.server.capture.append(data)

    def _write(self, status: int, headers: Headers, body: bytes) -> None:
        if self.close_connection:
            headers = [*headers, ("Connection", "close")]
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        payload = head if self.command == "HEAD" else head + body
        if self.command == "HEAD":
            self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.write(payload)


class SyncServer:
    """The HTTP server stub: a :class:`ReportHandler` behind a stdlib
    :class:`~http.server.ThreadingHTTPServer`.

    Use :meth:`start` to serve from a background thread (tests, examples) or
    :meth:`serve_forever` to serve from the calling thread (the command line), then
    :meth:`close`. Also a context manager.
    """

    def __init__(self, *, config: ServerConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._store = CountStore(path=config.db_path, synchronous=config.synchronous)
        try:
            self._handler = ReportHandler(config=config, store=self._store, clock=clock)
            self._http = _HTTPServer(
                (config.host, config.port), self._handler, config.capture_raw, config.workers
            )
        except (OSError, SyncError):
            self._store.close()
            raise
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on (the real port when ``port=0``)."""
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """The base URL clients use, e.g. ``http://127.0.0.1:8080``."""
        host, port = self.address
        return f"http://{host}:{port}"

    @property
    def handler(self) -> ReportHandler:
        """The plain request handler (for in-process use)."""
        return self._handler

    @property
    def store(self) -> CountStore:
        """The count store."""
        return self._store

    def captured_requests(self) -> list[bytes]:
        """Raw bytes of every request so far (request line, headers, body); test mode."""
        if self._http.capture is None:
            raise ConfigurationError("raw capture is off (ServerConfig.capture_raw)")
        with self._http.capture_lock:
            return list(self._http.capture)

    def start(self) -> SyncServer:
        """Serve from a background daemon thread; returns ``self``."""
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
            name="sync-server", daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until :meth:`shutdown` is called elsewhere."""
        self._http.serve_forever()

    def shutdown(self) -> None:
        """Stop accepting requests (call from another thread than ``serve_forever``)."""
        self._http.shutdown()

    def close(self) -> None:
        """Stop serving, commit pending counts and release the port and the store."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()
        self._store.close()

    def __enter__(self) -> SyncServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ondevice-sync-server",
        description="Count randomized segment reports and publish k-suppressed statistics.",
    )
    parser.add_argument("--k", type=int, required=True, help="number of segments K (1..64)")
    parser.add_argument("--db", type=Path, required=True, help="SQLite count store path")
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                        help="devices' per-report epsilon (default ln 3)")
    parser.add_argument("--k-threshold", type=int, default=DEFAULT_K_THRESHOLD,
                        help="smallest count ever published (default 50)")
    parser.add_argument("--content", type=Path, help="content table JSON file")
    parser.add_argument("--bundle", type=Path, help="signed catalog bundle file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 = any free port)")
    parser.add_argument("--max-body", type=int, default=MAX_BODY_SIZE, help="body limit, bytes")
    parser.add_argument("--epoch-window", type=int, default=1,
                        help="accepted distance in weeks from the server's week (default 1)")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                        help="SQLite durability (FULL survives power loss)")
    parser.add_argument("--workers", type=int, default=32,
                        help="pre-started worker threads (default 32)")
    parser.add_argument("--capture-raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", type=Path,
                        help="write the bound port to this file once listening")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``ondevice-sync-server`` / ``python -m sync.server``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = ServerConfig(
            k=args.k,
            db_path=args.db,
            epsilon=args.epsilon,
            k_threshold=args.k_threshold,
            content_path=args.content,
            bundle_path=args.bundle,
            host=args.host,
            port=args.port,
            max_body=args.max_body,
            epoch_window=args.epoch_window,
            synchronous=args.synchronous,
            workers=args.workers,
            capture_raw=args.capture_raw,
        )
        server = SyncServer(config=config)
    except (SyncError, OSError) as exc:
        sys.stderr.write(f"ondevice-sync-server: error: {exc}\n")
        return 2

    def _stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    host, port = server.address
    _log.info("serving K=%d epsilon=%.4f k_threshold=%d on %s:%d",
              config.k, config.epsilon, config.k_threshold, host, port)
    if args.ready_file is not None:
        partial = args.ready_file.with_name(args.ready_file.name + ".partial")
        partial.write_text(f"{port}\n")
        partial.replace(args.ready_file)
    try:
        server.serve_forever()
    finally:
        server.close()
    _log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
