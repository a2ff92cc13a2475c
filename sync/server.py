"""The server stub: counts randomized segment reports, publishes noisy statistics.

Run it with ``python -m ondevice_sync.server --k 8 --db counts.db`` (or the console script
``ondevice-sync-server``); ``--help`` lists every option. It depends on the standard
library and ``ondevice_sync``'s ``protocol``, ``privacy``, ``ratelimit`` and ``errors``
only, and never imports ``ondevice``.

Endpoints
---------
``POST /v1/report``
    Body: one canonical version 2 report (``ondevice_sync.protocol``; version 1, single-layer
    randomized response, is refused and never mixed into the counts), content type
    :data:`~ondevice_sync.protocol.REPORT_CONTENT_TYPE`, at most ``max_body`` bytes (a larger
    ``Content-Length`` is refused before the body is read), a segment below ``K`` and an
    epoch within ``epoch_window`` weeks of the server's clock whose statistics are not
    published yet. ``200`` once the count is committed to disk; ``429`` (with
    ``Retry-After``) when the client address has sent ``rate_limit`` reports this
    epoch; a ``4xx`` with a JSON error body ``{"error": code, "message": ...}`` for
    anything else, and then nothing is stored.
``GET /v1/content``
    The operator's content table (featured items of every segment, and the channel
    ``epsilon_inf`` / ``epsilon_1``), the same bytes for every client.
``GET /v1/bundle``
    The signed catalog bundle file, bytes as they are on disk, streamed from the file
    in chunks (never read whole). Through the OHTTP gateway only a bundle that fits one
    encapsulated response is served (``413`` ``too_large`` otherwise: fetch it
    directly).
``GET /v1/stats``
    ``{"version": 2, "epochs": [...]}``: every *closed* epoch since the count store's
    first epoch, oldest first (each one published, see below).
``GET /v1/stats?epoch=2026-W48``
    One closed epoch's statistics (below). Before the epoch closes: ``425`` with a JSON
    error ``{"error": "not_published", "message": ..., "available_at": unix_time}`` and
    ``Retry-After``. For an epoch before the store's first epoch (nothing can have been
    counted): ``404`` ``no_data``.

Publication: when, and what
---------------------------
An epoch ``E`` *closes* at ``epoch_start(E) + (1 + epoch_window) weeks + grace``: the
last moment a report for ``E`` can be accepted (the report window follows the server's
week, so ``E`` is accepted until the week ``epoch_window`` weeks after it ends) plus
``grace``. Nothing about ``E`` is published before. At the first request after it
closes, the server draws two-sided geometric noise at ``central_epsilon``
(:func:`ondevice_sync.privacy.geometric_noise`) *once* per cell, stores the noisy counts (and the
parameters used) in the count store, and from then on serves the same bytes for ``E``
forever; the exact counts are never published again. Reports for a published epoch are
never counted: the count store's insert refuses them in the same transaction (so even a
changed ``epoch_window`` or a clock that went back cannot add to a published epoch).

The statistics document (version :data:`STATS_VERSION`), compact JSON, keys sorted:

- ``version`` (2), ``epoch``, ``k``;
- ``epsilon_inf``, ``epsilon_1``: the two layers of the devices' channel the estimator
  assumes; ``report_epsilon``: the composed per-report local epsilon about the true
  segment (:attr:`ondevice_sync.privacy.Channel.epsilon`; ``null`` for K = 1);
- ``central_epsilon``: the epsilon of the central noise; ``noise_standard_deviation``:
  its standard deviation in reports, ``sqrt(2 a) / (1 - a)`` with ``a = e^-central_epsilon``
  (2.8 at the default 0.5);
- ``k_threshold``; ``closed_at``: the unix time at which the epoch closed;
- ``segments``: one ``{"segment", "estimate", "standard_error"}`` per published cell:
  :func:`ondevice_sync.privacy.estimate_noisy` of the noisy counts (the standard error includes
  the central noise); a cell is published only when its noisy count and its estimate
  are both at least ``k_threshold``;
- ``suppressed``: the IDs of the other cells, with no numbers;
- ``noisy_total``: the sum of the noisy counts (``null`` under ``k_threshold``): *not*
  the number of reports, which is never published.

What anyone reading ``/v1/stats`` (the operator included) can and cannot infer
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Everything published for an epoch is a function of its noisy counts ``c_i + z_i``, and
one report changes one ``c_i`` by 1, so the publication is ``central_epsilon``-DP with
respect to each report, on top of the devices' local randomization. Concretely:

- a published cell gives back its noisy count exactly (``estimate * (P - Q) +
  noisy_total * Q``), so the exact count only up to ``z_i``: variance
  ``2 a / (1 - a)^2``, standard deviation 2.8 reports at the default
  ``central_epsilon = 0.5`` (1.22 at ln 3);
- ``noisy_total`` minus the published cells' noisy counts is the sum of the suppressed
  cells' counts *plus the sum of their noises* (variance ``m`` times the above for
  ``m`` suppressed cells); with ``K = 2`` and one suppressed cell, that cell's count
  plus one draw of noise;
- nothing at all before the epoch closes, and the same numbers after: querying before
  and after a report cannot isolate it (no report for the epoch is counted after
  publication), and repeating a query cannot average the noise away;
- injected reports shift a cell by exactly their number, so an attacker who injects
  ``m`` reports into a cell to lift it over the threshold and subtracts them learns
  the honest count plus that cell's noise, never the exact honest count. The rate limit
  below makes injection from one address costlier; it does not change this bound.

The central noise hides *one report*; it is small compared to the local randomization
(a debiased cell's error comes almost entirely from randomized response), which is what
protects each device's segment. Stores migrated from version 1 keep their version 1
(single-layer) counts aside in ``counts_v1``: never published, never mixed in.

Connections, threads and deadlines
----------------------------------
One event-loop thread accepts connections and reads requests; a fixed pool of
``workers`` threads runs the handler; the loop writes the answers. No thread is ever
started per connection, so an idle or slow connection costs a socket and a bounded
buffer (a request head is at most 16 KiB, a body at most ``max_body``), not a thread.

- At most ``max_connections`` connections are open (lowered, with a warning, to what
  the soft open-file limit leaves room for; the command line raises that limit up to
  the hard limit first). Any more are answered ``503`` ``overloaded`` with
  ``Retry-After`` and closed at once.
- Each request has one deadline, ``request_timeout`` seconds (default 10) after its
  connection was accepted or its previous answer sent, for its whole head and body:
  trickling bytes does not extend it. Past it the connection is closed, with ``408``
  ``request_timeout`` if part of a request had arrived.
- An answer must be taken by the client within ``request_timeout`` plus one second per
  64 KiB of it, and a client that takes nothing for ``request_timeout`` is dropped;
  the bundle is read from its file 64 KiB at a time as the client takes it, and at
  most 256 downloads run at once (``503`` ``busy`` beyond).
- Connections are kept alive between requests (HTTP/1.1, unless ``Connection:
  close``); requests on one connection are answered in order, one at a time.

Every answer of the HTTP layer itself is a JSON error ``{"error": code, "message":
...}`` closing the connection: ``400`` ``bad_request`` (malformed request line, header
field or ``Content-Length``), ``408``, ``411`` ``length_required`` (a ``POST`` without
``Content-Length``, or any ``Transfer-Encoding``), ``413`` (a ``Content-Length`` over
``max_body``, refused unread), ``414`` ``uri_too_long`` (a request line over 8 KiB),
``431`` ``header_fields_too_large`` (a head over 16 KiB or over 100 fields), ``503``,
``505`` ``http_version_not_supported``. The handler's answers use the same format (the
statuses listed with the endpoints, ``404`` / ``405`` for unknown paths or methods,
``503`` ``store_unavailable`` when the store fails).

Rate limit
----------
With ``rate_limit > 0`` the server counts at most that many reports per client address
per epoch (the server's current ISO week), using :class:`ondevice_sync.ratelimit.AddressLimiter`
in memory only (addresses are never stored or logged; IPv6 is counted per /64); more
get ``429`` with ``Retry-After`` pointing at the next epoch. The limiter counts at most
``rate_limit_tracked`` distinct addresses per epoch and then refuses new ones until the
epoch ends (it fails closed rather than open): size it above the number of distinct
addresses that report in a week. Reports that arrive through the mounted OHTTP gateway
are never limited here (the relay, which sees device addresses, limits them), so keep
the limit on with the gateway: it still guards plain ``POST /v1/report``. Behind a plain
forwarding proxy (not the gateway) every report arrives from the proxy's address: set
``rate_limit=0`` there. The in-process handler has no address and is never limited.

What is stored and logged
-------------------------
Only counts per (epoch, segment) and, once published, the noisy counts, in SQLite (WAL).
Never a report, never a client address: there is no access log (``log_message`` is
silenced) and error logs carry no address. A report is acknowledged only after the
transaction that counts it has committed (``synchronous=FULL`` by default, so even a
power cut keeps it); concurrent reports share commits (group commit), which is what
keeps throughput up.

A test mode (``capture_raw=True``) keeps the exact raw bytes of every request in memory
so end-to-end tests can check every byte a client sent, and tests may inject a seeded
``rng`` for the central noise. Never use either in production.

The network still shows the server an address. To hide it from the operator, mount the
Oblivious HTTP gateway (RFC 9458) with ``--ohttp-keys`` (``POST /v1/ohttp``,
``GET /v1/ohttp-keys``; see :mod:`ondevice_sync.gateway`), name the relays with ``--ohttp-relay``
(anyone else gets ``403 not_a_relay``), and give devices an
:class:`ondevice_sync.ohttp.OhttpTransport` pinned to the key configuration. A replayed
encapsulated request gets ``400 replayed_request``; a full replay cache
``503 replay_cache_full``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import errno
import heapq
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import selectors
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal

from ondevice_sync._serving import Serving, serve_until_signalled
from ondevice_sync.errors import (
    BadEpochError,
    ConfigurationError,
    EpochOutOfWindowError,
    MessageSizeError,
    ProtocolError,
    StoreError,
    SyncError,
)
from ondevice_sync.privacy import (
    DEFAULT_CENTRAL_EPSILON,
    DEFAULT_EPSILON_1,
    DEFAULT_EPSILON_INF,
    DEFAULT_K_THRESHOLD,
    Channel,
    check_epsilon,
    estimate_noisy,
    geometric_noise,
    geometric_variance,
)
from ondevice_sync.protocol import (
    BUNDLE_CONTENT_TYPE,
    BUNDLE_PATH,
    CONTENT_PATH,
    CONTENT_TABLE_CONTENT_TYPE,
    ERROR_CONTENT_TYPE,
    MAX_BODY_SIZE,
    MAX_CONTENT_TABLE_SIZE,
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
from ondevice_sync.ratelimit import DEFAULT_MAX_TRACKED, AddressLimiter

if TYPE_CHECKING:
    from ondevice_sync.gateway import OhttpGateway

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_RATE_LIMIT",
    "DEFAULT_REQUEST_TIMEOUT",
    "STATS_VERSION",
    "STORE_VERSION",
    "CountStore",
    "FileBody",
    "Publication",
    "ReportHandler",
    "ServerConfig",
    "SyncServer",
    "closes_at",
    "draw_noisy_counts",
    "load_content_file",
    "main",
    "stats_document",
]

_log = logging.getLogger(__name__)

STORE_VERSION: Final = 2
"""``PRAGMA user_version`` of the count store (2: noisy publications; a version 1
store is migrated on open)."""

STATS_VERSION: Final = 2
"""Version of the ``/v1/stats`` document (2: noisy, published only once closed)."""

DEFAULT_GRACE: Final = 24 * 3600.0
"""Seconds between the last moment an epoch accepts reports and its publication."""

DEFAULT_RATE_LIMIT: Final = 16
"""Reports counted per client address per epoch (0 turns the limit off)."""

DEFAULT_MAX_CONNECTIONS: Final = 16_384
"""Connections open at once; more are answered ``503`` and closed at once."""

DEFAULT_REQUEST_TIMEOUT: Final = 10.0
"""Seconds a connection has to deliver a whole request (head and body)."""

_MAX_GRACE: Final = 365 * 24 * 3600.0
_MAX_CONNECTIONS: Final = 1_000_000
_MAX_REQUEST_TIMEOUT: Final = 300.0
# ondevice_sync.ohttp's OHTTP_PATH, OHTTP_KEYS_PATH and REPORT_ENCAPSULATED_SIZE, spelled out so
# that the server loads pyhpke only when OHTTP is on (a test keeps them equal).
_OHTTP_PATH: Final = "/v1/ohttp"
_OHTTP_KEYS_PATH: Final = "/v1/ohttp-keys"
_OHTTP_REQUEST_SIZE: Final = 567
_MAX_RATE_LIMIT: Final = 1_000_000
_COMMIT_WAIT: Final = 30.0
# Counts a report unless its epoch is published, in the same statement (and so the same
# transaction) as the check: a publication either sees the count or the count is refused.
_UPSERT: Final = (
    "INSERT INTO counts (epoch, segment, n) SELECT ?1, ?2, ?3 "
    "WHERE NOT EXISTS (SELECT 1 FROM publications WHERE epoch = ?1) "
    "ON CONFLICT (epoch, segment) DO UPDATE SET n = n + excluded.n"
)
_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS counts ("
    " epoch TEXT NOT NULL, segment INTEGER NOT NULL, n INTEGER NOT NULL,"
    " PRIMARY KEY (epoch, segment)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS publications ("
    " epoch TEXT NOT NULL PRIMARY KEY, k INTEGER NOT NULL, epsilon_inf REAL NOT NULL,"
    " epsilon_1 REAL NOT NULL, central_epsilon REAL NOT NULL, k_threshold INTEGER NOT NULL,"
    " closed_at REAL NOT NULL, published_at REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS noisy_counts ("
    " epoch TEXT NOT NULL, segment INTEGER NOT NULL, n INTEGER NOT NULL,"
    " PRIMARY KEY (epoch, segment)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta ("
    " key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)
_MAX_REQUEST_LINE: Final = 8192

Headers = list[tuple[str, str]]
HandlerResult = tuple[int, Headers, bytes]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the server stub; validated on construction.

    ``k`` is the number of segments of the bundle the devices use; ``epsilon_inf`` and
    ``epsilon_1`` the two layers of randomized response the devices use (the memo's
    epsilon and each report's epsilon about the memo; the estimator assumes them and
    the content table announces them); ``central_epsilon`` the epsilon of the geometric
    noise added to every cell before publication; ``k_threshold`` the smallest noisy
    count or estimate ever published (>= 1, default 50). ``grace`` is the number of
    seconds between the last moment an epoch can receive reports and the publication of
    its statistics. ``rate_limit`` caps the reports counted per client address per
    epoch (0 = off: only behind a plain forwarding proxy, where every report arrives
    from the proxy's address; the OHTTP gateway's reports are never limited here); the
    limiter counts at most ``rate_limit_tracked``
    distinct addresses per epoch and then refuses *new* addresses until the epoch ends
    (it fails closed, :mod:`ondevice_sync.ratelimit`), so size it above the number of distinct
    addresses reporting per week. ``port=0`` picks a free port. ``synchronous`` is
    SQLite's: ``"FULL"`` survives power loss, ``"NORMAL"`` survives a killed process.
    ``workers`` threads run the handler (a fixed pool: no thread is ever started per
    connection); at most ``max_connections`` connections are open at once (lowered to
    what the open-file limit allows), more are answered ``503`` and closed;
    ``request_timeout`` is the one deadline, in seconds, for each whole request (from
    the moment its connection is accepted or its previous answer sent), and the base
    of the deadline for sending its answer. ``capture_raw`` is a test-only switch.
    """

    k: int
    db_path: Path
    epsilon_inf: float = DEFAULT_EPSILON_INF
    epsilon_1: float = DEFAULT_EPSILON_1
    central_epsilon: float = DEFAULT_CENTRAL_EPSILON
    k_threshold: int = DEFAULT_K_THRESHOLD
    grace: float = DEFAULT_GRACE
    rate_limit: int = DEFAULT_RATE_LIMIT
    rate_limit_tracked: int = DEFAULT_MAX_TRACKED
    content_path: Path | None = None
    bundle_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = MAX_BODY_SIZE
    epoch_window: int = 1
    synchronous: Literal["FULL", "NORMAL"] = "FULL"
    workers: int = 32
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    capture_raw: bool = False
    ohttp_keys_path: Path | None = None
    ohttp_relays: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ConfigurationError("k must be an integer")
        if not 1 <= self.k <= MAX_SEGMENTS:
            raise ConfigurationError(f"k must be in 1..{MAX_SEGMENTS}, got {self.k}")
        for name in ("epsilon_inf", "epsilon_1", "central_epsilon"):
            try:
                check_epsilon(getattr(self, name))
            except ConfigurationError as exc:
                raise ConfigurationError(f"{name}: {exc}") from None
        if isinstance(self.k_threshold, bool) or not isinstance(self.k_threshold, int):
            raise ConfigurationError("k_threshold must be an integer")
        if self.k_threshold < 1:
            raise ConfigurationError(f"k_threshold must be >= 1, got {self.k_threshold}")
        if (
            isinstance(self.grace, bool)
            or not isinstance(self.grace, int | float)
            or not 0 <= self.grace <= _MAX_GRACE
        ):
            raise ConfigurationError(f"grace must be a number of seconds in 0..{_MAX_GRACE:g}")
        if (
            isinstance(self.rate_limit, bool)
            or not isinstance(self.rate_limit, int)
            or not 0 <= self.rate_limit <= _MAX_RATE_LIMIT
        ):
            raise ConfigurationError(
                f"rate_limit must be an integer in 0..{_MAX_RATE_LIMIT} (0 = off)"
            )
        if (
            isinstance(self.rate_limit_tracked, bool)
            or not isinstance(self.rate_limit_tracked, int)
            or self.rate_limit_tracked < 1
        ):
            raise ConfigurationError("rate_limit_tracked must be an integer >= 1")
        if not 1 <= self.max_body <= MAX_BODY_SIZE:
            raise ConfigurationError(f"max_body must be in 1..{MAX_BODY_SIZE}")
        if self.ohttp_relays is not None:
            if not isinstance(self.ohttp_relays, tuple) or not self.ohttp_relays:
                raise ConfigurationError("ohttp_relays must be a non-empty tuple of addresses")
            for relay in self.ohttp_relays:
                try:
                    ipaddress.ip_network(relay, strict=False)
                except (TypeError, ValueError):
                    raise ConfigurationError(
                        "ohttp_relays holds addresses or networks like 192.0.2.7 or "
                        "2001:db8::/64"
                    ) from None
        if self.ohttp_keys_path is not None and self.max_body < _OHTTP_REQUEST_SIZE:
            raise ConfigurationError(
                f"with OHTTP, max_body must be >= {_OHTTP_REQUEST_SIZE} (one encapsulated report)"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigurationError("port must be in 0..65535")
        if not 0 <= self.epoch_window <= 4:
            raise ConfigurationError("epoch_window must be in 0..4 weeks")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int):
            raise ConfigurationError("workers must be an integer")
        if not 1 <= self.workers <= 1024:
            raise ConfigurationError("workers must be in 1..1024")
        if (
            isinstance(self.max_connections, bool)
            or not isinstance(self.max_connections, int)
            or not 1 <= self.max_connections <= _MAX_CONNECTIONS
        ):
            raise ConfigurationError(
                f"max_connections must be an integer in 1..{_MAX_CONNECTIONS}"
            )
        if (
            isinstance(self.request_timeout, bool)
            or not isinstance(self.request_timeout, int | float)
            or not 0 < self.request_timeout <= _MAX_REQUEST_TIMEOUT
        ):
            raise ConfigurationError(
                f"request_timeout must be a number of seconds in (0, {_MAX_REQUEST_TIMEOUT:g}]"
            )
        if self.synchronous not in ("FULL", "NORMAL"):
            raise ConfigurationError("synchronous must be 'FULL' or 'NORMAL'")

    @property
    def channel(self) -> Channel:
        """The devices' two-layer channel the estimator assumes."""
        return Channel.two_layer(self.epsilon_inf, self.epsilon_1, self.k)


def closes_at(epoch: str, *, epoch_window: int, grace: float) -> float:
    """The unix time at which ``epoch`` closes and its statistics may be published.

    A report for ``epoch`` is accepted while the server's week is at most
    ``epoch_window`` weeks after it, i.e. until ``epoch_start(epoch) + (1 +
    epoch_window)`` weeks; ``grace`` seconds later the epoch closes.
    """
    return epoch_start(epoch) + (1 + epoch_window) * WEEK_SECONDS + grace


@dataclass(frozen=True, slots=True)
class Publication:
    """One published epoch as stored: its noisy counts and the parameters used.

    ``noisy_counts[s]`` is segment ``s``'s count plus one draw of geometric noise at
    ``central_epsilon``, drawn once at ``published_at``; ``closed_at`` is when the epoch
    closed. Everything ``/v1/stats`` says about the epoch is :func:`stats_document` of
    this, so it never changes.
    """

    epoch: str
    noisy_counts: tuple[int, ...]
    epsilon_inf: float
    epsilon_1: float
    central_epsilon: float
    k_threshold: int
    closed_at: float
    published_at: float

    @property
    def k(self) -> int:
        """The number of segments."""
        return len(self.noisy_counts)


def draw_noisy_counts(
    counts: Sequence[int], *, central_epsilon: float, rng: random.Random | None = None
) -> list[int]:
    """``counts`` with one independent draw of geometric noise added to every cell.

    The noise is :func:`ondevice_sync.privacy.geometric_noise` at ``central_epsilon``, from the
    OS CSPRNG unless a (test-only) ``rng`` is given.
    """
    return [int(n) + geometric_noise(central_epsilon, rng=rng) for n in counts]


def stats_document(publication: Publication) -> dict[str, Any]:
    """The ``/v1/stats?epoch=`` document of a publication (see the module docstring).

    A pure function of the stored noisy counts and parameters: the same publication
    always gives the same document.
    """
    channel = Channel.two_layer(publication.epsilon_inf, publication.epsilon_1, publication.k)
    result = estimate_noisy(
        list(publication.noisy_counts),
        channel=channel,
        central_epsilon=publication.central_epsilon,
        k_threshold=publication.k_threshold,
    )
    return {
        "version": STATS_VERSION,
        "epoch": publication.epoch,
        "k": publication.k,
        "epsilon_inf": publication.epsilon_inf,
        "epsilon_1": publication.epsilon_1,
        "report_epsilon": channel.epsilon if math.isfinite(channel.epsilon) else None,
        "central_epsilon": publication.central_epsilon,
        "noise_standard_deviation": math.sqrt(geometric_variance(publication.central_epsilon)),
        "k_threshold": publication.k_threshold,
        "closed_at": publication.closed_at,
        "noisy_total": result.total,
        "segments": [
            {
                "segment": cell.segment,
                "estimate": cell.estimate,
                "standard_error": cell.standard_error,
            }
            for cell in result.cells
        ],
        "suppressed": list(result.suppressed),
    }


# --------------------------------------------------------------------------- store


class _Batch:
    __slots__ = ("done", "error", "items", "refused")

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []
        self.done = False
        self.error: BaseException | None = None
        self.refused: set[str] = set()


class CountStore:
    """Counts per (epoch, segment) and published noisy counts, in SQLite (WAL).

    :meth:`add` returns only after the transaction holding that count has committed.
    Group commit without a writer thread: the first caller to find no commit in
    progress becomes the leader and commits every count queued so far in one
    transaction; callers arriving meanwhile queue for the next commit, led by one of
    them. A lone client thus pays one commit and no thread hand-off; many clients share
    commits. Reads (:meth:`counts`, :meth:`epochs`, :meth:`publication`) and
    :meth:`publish` use their own short-lived connections.

    Schema (``PRAGMA user_version`` :data:`STORE_VERSION`): ``counts(epoch, segment,
    n)``, the exact counts, never published; ``publications(epoch, k, epsilon_inf,
    epsilon_1, central_epsilon, k_threshold, closed_at, published_at)`` and
    ``noisy_counts(epoch, segment, n)``, one row per published epoch and cell;
    ``meta(key, value)`` holding ``first_epoch``. Opening a version 1 store migrates it
    in one transaction: its (single-layer) counts move to ``counts_v1``, which nothing
    reads, so they are never mixed with two-layer counts nor published.
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
            connection.execute("BEGIN IMMEDIATE")
            try:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > STORE_VERSION:
                    raise ConfigurationError(
                        f"count store version {version} is newer than this server "
                        f"({STORE_VERSION})"
                    )
                if version == 1:
                    _log.info("migrating the count store from version 1 to %d", STORE_VERSION)
                    connection.execute("ALTER TABLE counts RENAME TO counts_v1")
                for statement in _SCHEMA:
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version={STORE_VERSION}")
                connection.execute("COMMIT")
            finally:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot initialise the count store: {exc}") from exc

    def first_epoch(self, candidate: str) -> str:
        """The first epoch this store can hold counts for: the earliest ``candidate``
        ever given (the server passes its week minus ``epoch_window`` at every start).

        Reports for earlier epochs are refused and statistics exist only from it on. It
        only ever moves back (after a clock that was ahead at the first start, say):
        epochs before it were answered with "no data" whatever was reported, and none
        of them is published, so nothing published changes.
        """
        parse_epoch(candidate)
        connection = self._short_connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "INSERT INTO meta (key, value) VALUES ('first_epoch', ?1) "
                "ON CONFLICT (key) DO UPDATE SET value = ?1 WHERE value > ?1",
                (candidate,),
            )
            row = connection.execute(
                "SELECT value FROM meta WHERE key = 'first_epoch'"
            ).fetchone()
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the count store: {exc}") from exc
        finally:
            connection.close()
        return str(row[0])

    def add(self, epoch: str, segment: int) -> bool:
        """Count one report; returns once the count is committed (raises StoreError).

        Returns ``False``, counting nothing, when ``epoch`` is already published.
        """
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
        return epoch not in batch.refused

    def _commit(self, batch: _Batch) -> None:
        connection = self._connection
        totals = collections.Counter(batch.items)
        committed = False
        refused: set[str] = set()
        try:
            if len(totals) == 1:  # one statement: autocommitted on its own
                ((epoch, segment), n), = totals.items()
                if connection.execute(_UPSERT, (epoch, segment, n)).rowcount == 0:
                    refused.add(epoch)
            else:
                connection.execute("BEGIN IMMEDIATE")
                for (epoch, segment), n in totals.items():
                    if connection.execute(_UPSERT, (epoch, segment, n)).rowcount == 0:
                        refused.add(epoch)
                connection.execute("COMMIT")
            committed = True
            batch.refused = refused
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

    def _short_connection(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self._path, isolation_level=None, timeout=30.0)
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the count store: {exc}") from exc
        return connection

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
        """The exact committed count of every segment ``0..k-1`` for ``epoch``.

        For the operator's own checks and tests: the server never publishes these.
        """
        result = [0] * k
        for segment, n in self._read("SELECT segment, n FROM counts WHERE epoch = ?", (epoch,)):
            if 0 <= segment < k:
                result[segment] = int(n)
        return result

    def epochs(self) -> list[str]:
        """Every epoch with at least one counted report, oldest first (never published)."""
        return [row[0] for row in self._read("SELECT DISTINCT epoch FROM counts ORDER BY 1", ())]

    def published_epochs(self) -> list[str]:
        """Every published epoch, oldest first."""
        return [row[0] for row in self._read("SELECT epoch FROM publications ORDER BY 1", ())]

    @staticmethod
    def _load_publication(connection: sqlite3.Connection, epoch: str) -> Publication | None:
        row = connection.execute(
            "SELECT k, epsilon_inf, epsilon_1, central_epsilon, k_threshold, closed_at,"
            " published_at FROM publications WHERE epoch = ?",
            (epoch,),
        ).fetchone()
        if row is None:
            return None
        k, epsilon_inf, epsilon_1, central_epsilon, k_threshold, closed_at, published_at = row
        noisy = [0] * int(k)
        for segment, n in connection.execute(
            "SELECT segment, n FROM noisy_counts WHERE epoch = ?", (epoch,)
        ):
            noisy[int(segment)] = int(n)
        return Publication(
            epoch=epoch,
            noisy_counts=tuple(noisy),
            epsilon_inf=float(epsilon_inf),
            epsilon_1=float(epsilon_1),
            central_epsilon=float(central_epsilon),
            k_threshold=int(k_threshold),
            closed_at=float(closed_at),
            published_at=float(published_at),
        )

    def publication(self, epoch: str) -> Publication | None:
        """The stored publication of ``epoch``, or ``None`` if it is not published."""
        connection = self._short_connection()
        try:
            connection.execute("BEGIN")
            return self._load_publication(connection, epoch)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the count store: {exc}") from exc
        finally:
            connection.close()

    def publish(
        self,
        epoch: str,
        *,
        config: ServerConfig,
        closed_at: float,
        now: float,
        rng: random.Random | None = None,
    ) -> Publication:
        """Publish ``epoch`` once: noisy counts drawn and stored in one transaction.

        If ``epoch`` is already published, returns the stored publication unchanged (no
        new noise is ever drawn for it). Otherwise reads the exact counts of
        ``config.k`` segments, adds :func:`draw_noisy_counts` noise at
        ``config.central_epsilon`` and stores the result with the parameters. The write
        lock held from the read to the commit means every report is either in these
        counts or refused afterwards (:meth:`add`).
        """
        connection = self._short_connection()
        try:
            connection.execute("BEGIN IMMEDIATE")
            try:
                existing = self._load_publication(connection, epoch)
                if existing is not None:
                    connection.execute("COMMIT")
                    return existing
                exact = [0] * config.k
                for segment, n in connection.execute(
                    "SELECT segment, n FROM counts WHERE epoch = ?", (epoch,)
                ):
                    if 0 <= segment < config.k:
                        exact[int(segment)] = int(n)
                publication = Publication(
                    epoch=epoch,
                    noisy_counts=tuple(
                        draw_noisy_counts(exact, central_epsilon=config.central_epsilon, rng=rng)
                    ),
                    epsilon_inf=float(config.epsilon_inf),
                    epsilon_1=float(config.epsilon_1),
                    central_epsilon=float(config.central_epsilon),
                    k_threshold=config.k_threshold,
                    closed_at=float(closed_at),
                    published_at=float(now),
                )
                connection.execute(
                    "INSERT INTO publications (epoch, k, epsilon_inf, epsilon_1,"
                    " central_epsilon, k_threshold, closed_at, published_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (epoch, publication.k, publication.epsilon_inf, publication.epsilon_1,
                     publication.central_epsilon, publication.k_threshold,
                     publication.closed_at, publication.published_at),
                )
                connection.executemany(
                    "INSERT INTO noisy_counts (epoch, segment, n) VALUES (?, ?, ?)",
                    [(epoch, segment, n) for segment, n in enumerate(publication.noisy_counts)],
                )
                connection.execute("COMMIT")
            finally:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot publish epoch {epoch}: {exc}") from exc
        finally:
            connection.close()
        _log.info("published the statistics of epoch %s", epoch)
        return publication

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


def load_content_file(path: Path, *, k: int, epsilon_inf: float, epsilon_1: float) -> bytes:
    """Read the operator's content table file and return its canonical wire bytes.

    The file is JSON: ``{"version": 2, "segments": [[item IDs of segment 0], ...]}`` with
    exactly ``k`` rows; ``"k"``, ``"epsilon_inf"`` and ``"epsilon_1"`` may be given and
    must then match the server's configuration (they are filled in from it otherwise).
    A version 1 file (single ``epsilon``) is refused.
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
    for name, value in (("epsilon_inf", epsilon_inf), ("epsilon_1", epsilon_1)):
        if document.setdefault(name, value) != value:
            raise ConfigurationError(f"content table {path}: {name} differs from the server's")
    try:
        table = decode_content_table(json.dumps(document).encode(), require_canonical=False)
    except ProtocolError as exc:
        raise ConfigurationError(f"content table {path}: {exc}") from exc
    return encode_content_table(table)


@dataclass(frozen=True, slots=True)
class FileBody:
    """An answer body to stream from an open binary file: its first ``size`` bytes.

    :meth:`ReportHandler.respond` answers ``GET /v1/bundle`` with one; whoever gets it
    closes ``file`` (:meth:`ReportHandler.handle` reads it whole and closes it).
    """

    file: BinaryIO
    size: int


Answer = tuple[int, Headers, bytes | FileBody]


def _materialize(answer: Answer, *, limit: int | None = None) -> HandlerResult:
    status, headers, body = answer
    if not isinstance(body, FileBody):
        return status, headers, body
    with body.file:
        if limit is not None and body.size > limit:
            return _error(
                413, "too_large",
                f"this answer exceeds {limit} bytes, more than an encapsulated response "
                "carries; fetch the bundle directly (it is signed, the same for everyone)",
            )
        try:
            data = body.file.read(body.size)
        except OSError as exc:
            _log.error("cannot read the bundle file: %s", exc.strerror)
            data = b""
    if len(data) != body.size:
        return _error(503, "bundle_unavailable", "the bundle cannot be read now")
    return status, headers, data


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


def _utc(moment: float) -> str:
    try:
        return _dt.datetime.fromtimestamp(moment, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix time {moment:.0f}"


def _retry_after(seconds: float) -> Headers:
    return [("Retry-After", str(max(1, math.ceil(seconds))))]


class ReportHandler:
    """The server's request handling as a plain function of bytes, usable in-process.

    :meth:`handle` takes a method, a path (with its query string), the request headers,
    the body and optionally the client's address, and returns ``(status, headers,
    body)``. The HTTP server and the client's ``InProcessTransport`` both call it.
    ``clock`` gives the server's time; ``rng`` (tests only) seeds the central noise,
    which otherwise comes from the OS CSPRNG.
    """

    def __init__(
        self,
        *,
        config: ServerConfig,
        store: CountStore,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._rng = rng
        self._publish_lock = threading.Lock()
        self._window: tuple[float, float, frozenset[str]] = (0.0, 0.0, frozenset())
        self._content = (
            None
            if config.content_path is None
            else load_content_file(
                config.content_path,
                k=config.k,
                epsilon_inf=config.epsilon_inf,
                epsilon_1=config.epsilon_1,
            )
        )
        self._first_epoch = store.first_epoch(
            shift_epoch(epoch_of(clock()), -config.epoch_window)
        )
        self._limiter = (
            AddressLimiter(config.rate_limit, clock, max_tracked=config.rate_limit_tracked)
            if config.rate_limit > 0
            else None
        )
        self._gateway: OhttpGateway | None = None
        if config.ohttp_keys_path is not None:
            from ondevice_sync.gateway import OhttpGateway  # lazy: pyhpke loads only with OHTTP on

            # A replayed request is refused for as long as its report could be counted.
            retention = (2 * config.epoch_window + 1) * WEEK_SECONDS + config.grace
            self._gateway = OhttpGateway.from_key_file(
                config.ohttp_keys_path,
                self._handle_encapsulated,
                replay_retention=retention,
                clock=clock,
                relays=config.ohttp_relays,
            )
            if config.ohttp_relays is None:
                _log.warning(
                    "the OHTTP gateway takes encapsulated reports from any address, around "
                    "the relay's rate limit: name the relays with --ohttp-relay"
                )

    @property
    def config(self) -> ServerConfig:
        """The settings this handler runs with."""
        return self._config

    @property
    def first_epoch(self) -> str:
        """The first epoch the count store accepts reports for and publishes."""
        return self._first_epoch

    def closes_at(self, epoch: str) -> float:
        """When ``epoch`` closes under this configuration (see :func:`closes_at`)."""
        return closes_at(epoch, epoch_window=self._config.epoch_window, grace=self._config.grace)

    def handle(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        client: str | None = None,
    ) -> HandlerResult:
        """Answer one request; never raises for bad input (a 4xx result instead).

        ``client`` is the address the request came from (the HTTP server passes it;
        ``None`` in process). It is used for the rate limit only, never stored or logged.
        The answer's body is bytes: the bundle is read whole here (the HTTP server uses
        :meth:`respond` and streams it instead).
        """
        return _materialize(self.respond(method, path, headers, body, client=client))

    def respond(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        client: str | None = None,
    ) -> Answer:
        """Like :meth:`handle`, but a file answer (the bundle) comes back as an open
        :class:`FileBody` to stream; the caller closes it."""
        try:
            return self._route(
                method, path, {k.lower(): v for k, v in headers.items()}, body, client
            )
        except StoreError as exc:
            _log.error("store failure: %s", exc)
            return _error(
                503, "store_unavailable", "the count store failed; nothing was counted, retry later"
            )
        except Exception:
            _log.exception("unexpected error while handling a request")
            return _error(500, "internal", "internal error; nothing was counted")

    def _handle_encapsulated(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> HandlerResult:
        # What the OHTTP gateway calls: an answer has to fit one encapsulated response
        # (ondevice_sync.ohttp caps those at the content table's size plus a margin), so a larger
        # bundle is refused rather than read into memory and encrypted whole.
        return _materialize(
            self.respond(method, path, headers, body), limit=MAX_CONTENT_TABLE_SIZE
        )

    def _route(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        client: str | None,
    ) -> Answer:
        split = urllib.parse.urlsplit(target)
        if "#" in target:  # urlsplit would drop it silently; a request never has one
            return _error(400, "bad_request", "a request target carries no fragment")
        if self._gateway is not None and split.path in (_OHTTP_PATH, _OHTTP_KEYS_PATH):
            # The gateway decapsulates and calls handle() with no client address: every
            # request comes from the relay, which limits device addresses itself.
            return self._gateway.handle(method, target, headers, body, client=client)
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
            return self._report(headers, body, client)
        if body:
            return _error(400, "unexpected_body", "GET requests carry no body")
        if split.path == CONTENT_PATH:
            return self._serve_content()
        return self._serve_bundle()

    def _report(
        self, headers: Mapping[str, str], body: bytes, client: str | None
    ) -> HandlerResult:
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
        if client is not None and self._limiter is not None and not self._limiter.allow(client):
            wait = self._limiter.seconds_until_reset()
            return _error(
                429,
                "rate_limited",
                f"this client address has sent its {self._config.rate_limit} reports for "
                f"this epoch (or the limiter is full); try again from "
                f"{_utc(self._clock() + wait)}",
                _retry_after(wait),
            )
        if not self._store.add(report.epoch, report.segment):
            return _error(
                400,
                EpochOutOfWindowError.code,
                f"epoch {report.epoch} is closed and its statistics are published; "
                "reports for it are no longer counted",
            )
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
        if epoch < self._first_epoch:  # fixed-width "YYYY-Www" sorts chronologically
            raise EpochOutOfWindowError(
                f"epoch {epoch} is before this count store's first epoch {self._first_epoch}"
            )

    def _serve_content(self) -> HandlerResult:
        if self._content is None:
            return _error(404, "no_content", "no content table is configured")
        return 200, [("Content-Type", CONTENT_TABLE_CONTENT_TYPE)], self._content

    def _serve_bundle(self) -> Answer:
        if self._config.bundle_path is None:
            return _error(404, "no_bundle", "no bundle is configured")
        # Opened, not read: the HTTP server streams it (a file replaced meanwhile by a
        # rename keeps serving the old bytes to this request, consistently).
        try:
            file = self._config.bundle_path.open("rb")
        except OSError as exc:
            _log.error("cannot open the bundle file: %s", exc.strerror)
            return _error(503, "bundle_unavailable", "the bundle cannot be read now")
        try:
            size = os.fstat(file.fileno()).st_size
        except OSError as exc:
            file.close()
            _log.error("cannot read the bundle file: %s", exc.strerror)
            return _error(503, "bundle_unavailable", "the bundle cannot be read now")
        return 200, [("Content-Type", BUNDLE_CONTENT_TYPE)], FileBody(file, size)

    def publication(self, epoch: str) -> Publication | None:
        """``epoch``'s publication, publishing it now if it is closed and not yet
        published; ``None`` while it is open (or before the store's first epoch)."""
        stored = self._store.publication(epoch)
        if stored is not None:
            return stored
        if epoch < self._first_epoch:
            return None
        now = self._clock()
        closed_at = self.closes_at(epoch)
        if now < closed_at:
            return None
        with self._publish_lock:  # the store also serializes; this saves a wasted draw
            return self._store.publish(
                epoch, config=self._config, closed_at=closed_at, now=now, rng=self._rng
            )

    def _closed_epochs(self) -> list[str]:
        now = self._clock()
        closed: list[str] = []
        epoch = self._first_epoch
        with contextlib.suppress(BadEpochError):
            while self.closes_at(epoch) <= now:
                closed.append(epoch)
                epoch = shift_epoch(epoch, 1)
        return closed

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
            published = set(self._store.published_epochs())
            for epoch in self._closed_epochs():
                if epoch not in published:
                    self.publication(epoch)
                    published.add(epoch)
            return _json(200, {"version": STATS_VERSION, "epochs": sorted(published)})
        epoch = params["epoch"][0]
        try:
            parse_epoch(epoch)
        except BadEpochError as exc:
            return _error(400, exc.code, str(exc))
        publication = self.publication(epoch)
        if publication is not None:
            return _json(200, stats_document(publication))
        if epoch < self._first_epoch:
            return _error(
                404,
                "no_data",
                f"epoch {epoch} is before this count store's first epoch "
                f"{self._first_epoch}: nothing was ever counted for it",
            )
        available = self.closes_at(epoch)
        return _json(
            425,
            {
                "error": "not_published",
                "message": (
                    f"the statistics of {epoch} are published from {_utc(available)}, once "
                    "no report for it can be counted any more"
                ),
                "available_at": available,
            },
            _retry_after(available - self._clock()),
        )


# --------------------------------------------------------------------------- HTTP

_MAX_HEAD: Final = 16 * 1024
_MAX_HEADER_FIELDS: Final = 100
_RECV_SIZE: Final = 64 * 1024
_FILE_CHUNK: Final = 64 * 1024
_JOIN_LIMIT: Final = 16 * 1024
_MIN_SEND_RATE: Final = 64 * 1024
_LINGER: Final = 1.0
_LINGER_BYTES: Final = 64 * 1024
_MAX_FILE_STREAMS: Final = 256
_FD_RESERVE: Final = 64
_BACKLOG: Final = 1024
_ACCEPT_BATCH: Final = 64
_ACCEPT_PAUSE: Final = 0.1
_JOIN_WORKERS: Final = 5.0
_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION: Final = re.compile(r"HTTP/([0-9])\.([0-9])")
_CTL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


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
    425: "Too Early",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def _response_head(status: int, headers: Headers, length: int, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_bytes(status: int, code: str, message: str, extra: Headers | None = None) -> bytes:
    _, headers, body = _error(status, code, message, extra)
    return _response_head(status, headers, len(body), True) + body


@dataclass(frozen=True, slots=True)
class _Head:
    """A parsed request head: what the handler needs, and how to frame the body."""

    method: str
    target: str
    headers: dict[str, str]  # names lower case; repeated fields joined with ", "
    length: int
    close: bool
    expect_continue: bool


class _Refusal(Exception):
    """A request the HTTP layer answers itself, then closes the connection."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _parse_head(head: bytes, max_body: int) -> _Head:
    """The request line and header fields (``head`` without the empty line), strict.

    Raises :class:`_Refusal` for anything malformed: 400, 411 (no or chunked length),
    413 (a length over ``max_body``), 414, 431, 505.
    """
    lines = head.decode("latin-1").split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    request_line = lines[0]
    if len(request_line) > _MAX_REQUEST_LINE:
        raise _Refusal(414, "uri_too_long", "request line too long")
    parts = request_line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _Refusal(400, "bad_request", "malformed request line")
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise _Refusal(400, "bad_request", "malformed HTTP version")
    if match.group(1) != "1":
        raise _Refusal(505, "http_version_not_supported", "only HTTP/1.x is spoken here")
    if not _TOKEN.fullmatch(method):
        raise _Refusal(400, "bad_request", "malformed method")
    if _CTL.search(target) or "\t" in target:
        raise _Refusal(400, "bad_request", "malformed request target")
    if len(lines) - 1 > _MAX_HEADER_FIELDS:
        raise _Refusal(431, "header_fields_too_large", "too many header fields")
    headers: dict[str, str] = {}
    lengths: list[str] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # A token right up to the colon: no obs-fold, no space before the colon.
        if not colon or not _TOKEN.fullmatch(name):
            raise _Refusal(400, "bad_request", "malformed header field")
        value = value.strip(" \t")
        if _CTL.search(value):
            raise _Refusal(400, "bad_request", "control character in a header field")
        key = name.lower()
        if key == "content-length":
            lengths.append(value)
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        raise _Refusal(411, "length_required",
                       "Transfer-Encoding is not accepted; send Content-Length")
    if method == "POST" and not lengths:
        raise _Refusal(411, "length_required", "Content-Length is required")
    if len(lengths) > 1 or (lengths and not _is_decimal(lengths[0])):
        raise _Refusal(400, "bad_request", "bad Content-Length")
    length = int(lengths[0]) if lengths else 0
    if length > max_body:
        raise _Refusal(413, MessageSizeError.code, f"body exceeds {max_body} bytes")
    tokens = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    http10 = match.group(2) == "0"
    return _Head(
        method=method,
        # As http.server does: "//x/y" would otherwise read as a URL with host "x".
        target="/" + target.lstrip("/") if target.startswith("//") else target,
        headers=headers,
        length=length,
        close="close" in tokens or (http10 and "keep-alive" not in tokens),
        expect_continue=(
            not http10 and length > 0
            and headers.get("expect", "").strip().lower() == "100-continue"
        ),
    )


_READ, _BUSY, _WRITE, _LINGERING, _CLOSED = range(5)


class _Conn:
    """One client connection, owned by the event loop thread (workers never touch it)."""

    __slots__ = (
        "body_end", "buf", "client", "close_after", "deadline", "drained", "events",
        "file", "file_left", "head", "linger", "out", "scan", "send_by", "sock", "state",
    )

    def __init__(self, sock: socket.socket, client: str | None) -> None:
        self.sock = sock
        self.client = client
        self.state = _READ
        self.events = 0
        self.buf = bytearray()
        self.scan = 0
        self.head: _Head | None = None
        self.body_end = 0
        self.deadline = 0.0
        self.send_by = 0.0
        self.out: collections.deque[memoryview] = collections.deque()
        self.file: BinaryIO | None = None
        self.file_left = 0
        self.close_after = False
        self.linger = False
        self.drained = 0


_Job = tuple[_Conn, _Head, bytes] | None
_Done = tuple[_Conn, _Head, Answer]


def _connection_cap(requested: int, workers: int) -> int:
    """``requested``, lowered to what the open-file limit leaves room for."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return requested
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover
        return requested
    if soft == resource.RLIM_INFINITY:
        return requested
    room = max(1, soft - _FD_RESERVE - _MAX_FILE_STREAMS - workers)
    if room < requested:
        _log.warning(
            "serving at most %d connections, not %d: the open-file limit is %d "
            "(raise it with ulimit -n; the command line raises it up to the hard limit)",
            room, requested, soft,
        )
    return min(requested, room)


def _raise_open_file_limit(needed: int) -> None:
    """Raise the soft open-file limit towards ``needed`` (never above the hard limit)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, OSError, ValueError):  # pragma: no cover - best effort
        return


class _HTTPServer:
    """HTTP/1.1 on one event-loop thread plus a fixed pool of worker threads.

    The loop (:meth:`serve_forever`) accepts connections, reads each request's head and
    body into a bounded buffer under one deadline, hands complete requests to the
    ``workers`` threads (which only run the handler), and writes the answers back
    without blocking, streaming files in chunks. An idle or slow connection costs a
    socket and a few hundred bytes, never a thread. At most ``max_connections`` are
    open (lowered to fit the open-file limit); beyond, new ones get ``503`` at once.
    Threads: the loop plus ``workers``, whatever the number of connections.
    """

    def __init__(
        self,
        address: tuple[str, int],
        handler: ReportHandler,
        *,
        capture: bool,
        workers: int,
        max_connections: int,
        request_timeout: float,
    ) -> None:
        self.report_handler = handler
        self.capture: list[bytes] | None = [] if capture else None
        self.capture_lock = threading.Lock()
        self.max_connections = _connection_cap(max_connections, workers)
        self._timeout = request_timeout
        self._max_body = handler.config.max_body
        self._conns: set[_Conn] = set()
        self._heap: list[tuple[float, int, _Conn]] = []
        self._seq = itertools.count()
        self._streams = 0
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._done: collections.deque[_Done] = collections.deque()
        self._shutdown_request = False
        self._is_shut_down = threading.Event()
        self._closed = False
        self._accept_paused_until = 0.0
        self._warned_at = -math.inf
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(_BACKLOG)
            self._listener.setblocking(False)
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector.register(self._listener, selectors.EVENT_READ, None)
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        except BaseException:
            self._release()
            raise
        self.server_address: tuple[Any, ...] = self._listener.getsockname()
        self._workers = [
            threading.Thread(target=self._work, name=f"sync-worker-{n}", daemon=True)
            for n in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def open_connections(self) -> int:
        """Connections open right now (read by the loop thread; approximate elsewhere)."""
        return len(self._conns)

    # ------------------------------------------------------------------ life cycle

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the event loop until :meth:`shutdown` (socketserver's semantics)."""
        self._is_shut_down.clear()
        try:
            while not self._shutdown_request:
                try:
                    self._turn(poll_interval)
                except Exception:  # the loop must outlive any one bad connection
                    _log.exception("unexpected error in the server's event loop")
                    time.sleep(0.01)
        finally:
            self._shutdown_request = False
            self._is_shut_down.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait for it (call it from another thread)."""
        self._shutdown_request = True
        self._wake()
        self._is_shut_down.wait()

    def server_close(self) -> None:
        """Close the port; let the workers finish (their counts commit); drop the rest."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(self._listener)
        self._listener.close()
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(timeout=_JOIN_WORKERS)
        for conn in list(self._conns):
            self._close(conn)
        while self._done:
            _, _, (_, _, body) = self._done.popleft()
            if isinstance(body, FileBody):
                body.file.close()
        self._release()

    def _release(self) -> None:
        self._selector.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ the loop

    def _turn(self, poll_interval: float) -> None:
        now = time.monotonic()
        timeout = poll_interval
        if self._heap:
            timeout = min(timeout, self._heap[0][0] - now)
        if self._accept_paused_until:
            timeout = min(timeout, self._accept_paused_until - now)
        for key, mask in self._selector.select(max(0.0, timeout)):
            target = key.data
            if target is None:
                self._accept()
            elif target is self._wake_r:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            else:
                self._guarded(target, mask)
        while self._done:
            conn, head, answer = self._done.popleft()
            if conn.state == _BUSY:
                self._guarded(conn, 0, (head, answer))
            elif isinstance(answer[2], FileBody):
                answer[2].file.close()
        now = time.monotonic()
        self._expire(now)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, None)

    def _guarded(self, conn: _Conn, mask: int, answer: tuple[_Head, Answer] | None = None) -> None:
        try:
            if answer is not None:
                self._answer(conn, answer[0], answer[1])
            elif conn.state == _WRITE:
                self._flush(conn)
            elif conn.state == _LINGERING:
                self._drain(conn)
            elif conn.state == _READ:
                self._read(conn)
        except Exception:
            _log.exception("unexpected error while serving a connection")
            if answer is not None and isinstance(answer[1][2], FileBody):
                answer[1][2].file.close()
            self._close(conn)

    def _watch(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if events == 0:
            self._selector.unregister(conn.sock)
        elif conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _set_deadline(self, conn: _Conn, deadline: float) -> None:
        conn.deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), conn))

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, conn = heapq.heappop(heap)
            if conn.deadline != deadline or conn.state in (_BUSY, _CLOSED):
                continue  # a stale entry: the connection moved on
            if conn.state == _READ and (conn.buf or conn.head is not None):
                with contextlib.suppress(OSError):  # one try, never waits
                    conn.sock.send(_error_bytes(
                        408, "request_timeout",
                        f"the request did not arrive within {self._timeout:g} s",
                    ))
            self._close(conn)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(exc)
                    return
                continue  # e.g. ECONNABORTED: that client is gone already
            if len(self._conns) >= self.max_connections:
                self._refuse(sock)
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()
                continue
            client = str(address[0]) if isinstance(address, tuple) and address else None
            conn = _Conn(sock, client)
            self._conns.add(conn)
            self._set_deadline(conn, time.monotonic() + self._timeout)
            self._watch(conn, selectors.EVENT_READ)

    def _pause_accepting(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._warned_at > 60:
            self._warned_at = now
            _log.warning("cannot accept connections for now (%s); %d open",
                         errno.errorcode.get(exc.errno or 0, "error"), len(self._conns))
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._listener)
        self._accept_paused_until = now + _ACCEPT_PAUSE

    @staticmethod
    def _refuse(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(_error_bytes(503, "overloaded", "too many open connections; retry later",
                                   _retry_after(1)))
        sock.close()

    def _close(self, conn: _Conn) -> None:
        if conn.state == _CLOSED:
            return
        conn.state = _CLOSED
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.events = 0
        self._end_stream(conn)
        conn.sock.close()
        conn.buf = bytearray()
        conn.out.clear()
        self._conns.discard(conn)

    def _end_stream(self, conn: _Conn) -> None:
        if conn.file is not None:
            conn.file.close()
            conn.file = None
            self._streams -= 1

    # ------------------------------------------------------------------ reading

    def _read(self, conn: _Conn) -> None:
        # Never buffer past the head's limit or the announced body.
        room = (_MAX_HEAD + 4 if conn.head is None else conn.body_end) - len(conn.buf)
        try:
            data = conn.sock.recv(max(1, min(_RECV_SIZE, room)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:  # the client closed; a partial request is dropped unanswered
            self._close(conn)
            return
        conn.buf += data
        self._advance(conn)

    def _advance(self, conn: _Conn) -> None:
        buf = conn.buf
        if conn.head is None:
            if buf.startswith((b"\r", b"\n")):  # empty lines before a request line: skipped
                stripped = len(buf) - len(buf.lstrip(b"\r\n"))
                del buf[:stripped]
                conn.scan = 0
            match = _HEAD_END.search(buf, max(0, conn.scan - 3))
            if match is None:
                conn.scan = len(buf)
                line_room = _MAX_REQUEST_LINE + 2  # the line and its CRLF
                if len(buf) > line_room and buf.find(b"\n", 0, line_room) < 0:
                    self._refuse_request(conn, _Refusal(414, "uri_too_long",
                                                        "request line too long"))
                elif len(buf) > _MAX_HEAD:
                    self._refuse_request(conn, _Refusal(431, "header_fields_too_large",
                                                        f"request head over {_MAX_HEAD} bytes"))
                else:
                    self._watch(conn, selectors.EVENT_READ)
                return
            if match.start() > _MAX_HEAD:
                self._refuse_request(conn, _Refusal(431, "header_fields_too_large",
                                                    f"request head over {_MAX_HEAD} bytes"))
                return
            try:
                head = _parse_head(bytes(buf[: match.start()]), self._max_body)
            except _Refusal as refusal:
                if refusal.status == 413:  # as before: the refused head is captured
                    self._capture(bytes(buf[: match.end()]))
                self._refuse_request(conn, refusal)
                return
            conn.head = head
            conn.body_end = match.end() + head.length
            conn.scan = 0
            if head.expect_continue and len(buf) < conn.body_end:
                try:  # 25 bytes into an idle connection's empty send buffer
                    sent = conn.sock.send(_CONTINUE)
                except OSError:
                    sent = 0
                if sent != len(_CONTINUE):
                    self._close(conn)
                    return
        if len(buf) < conn.body_end:
            self._watch(conn, selectors.EVENT_READ)
            return
        head = conn.head
        raw = bytes(buf[: conn.body_end])
        del buf[: conn.body_end]
        conn.head = None
        self._capture(raw)
        conn.state = _BUSY
        self._watch(conn, 0)
        self._jobs.put((conn, head, raw[len(raw) - head.length :] if head.length else b""))

    def _capture(self, raw: bytes) -> None:
        if self.capture is not None:
            with self.capture_lock:
                self.capture.append(raw)

    def _refuse_request(self, conn: _Conn, refusal: _Refusal) -> None:
        conn.buf.clear()
        conn.head = None
        _, headers, body = _error(refusal.status, refusal.code, str(refusal))
        self._send(conn, "", refusal.status, headers, body, close=True, linger=True)

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, head, body = job
            try:
                answer = self.report_handler.respond(
                    head.method, head.target, head.headers, body, client=conn.client
                )
            except Exception:  # respond() catches everything; this is a last resort
                _log.exception("unexpected error while handling a request")
                answer = _error(500, "internal", "internal error; nothing was counted")
            if self._closed:
                if isinstance(answer[2], FileBody):
                    answer[2].file.close()
                continue
            self._done.append((conn, head, answer))
            self._wake()

    # ------------------------------------------------------------------ writing

    def _answer(self, conn: _Conn, head: _Head, answer: Answer) -> None:
        status, headers, body = answer
        if isinstance(body, FileBody):
            if self._streams >= _MAX_FILE_STREAMS:
                body.file.close()
                status, headers, body = _error(
                    503, "busy", "too many downloads in progress; retry later", _retry_after(5)
                )
            else:
                self._streams += 1
                conn.file = body.file
        self._send(conn, head.method, status, headers, body, close=head.close, linger=False)

    def _send(
        self,
        conn: _Conn,
        method: str,
        status: int,
        headers: Headers,
        body: bytes | FileBody,
        *,
        close: bool,
        linger: bool,
    ) -> None:
        size = body.size if isinstance(body, FileBody) else len(body)
        if method == "HEAD":
            close = True
            self._end_stream(conn)
        head = _response_head(status, headers, size, close)
        conn.out.clear()
        if method == "HEAD":
            conn.out.append(memoryview(head))
        elif isinstance(body, FileBody):
            conn.out.append(memoryview(head))
            conn.file_left = size
        elif len(body) <= _JOIN_LIMIT:
            conn.out.append(memoryview(head + body))
        else:  # the cached content table is sent from its one copy
            conn.out.extend((memoryview(head), memoryview(body)))
        conn.state = _WRITE
        conn.close_after = close
        conn.linger = linger
        now = time.monotonic()
        conn.send_by = now + self._timeout + size / _MIN_SEND_RATE
        self._set_deadline(conn, min(conn.send_by, now + self._timeout))
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while True:
            if not conn.out:
                if conn.file is None or conn.file_left <= 0:
                    self._answered(conn)
                    return
                chunk = conn.file.read(min(_FILE_CHUNK, conn.file_left))
                if not chunk:  # the file shrank under us: the framing is broken
                    _log.error("the bundle file shrank while it was being sent")
                    self._close(conn)
                    return
                conn.file_left -= len(chunk)
                conn.out.append(memoryview(chunk))
            view = conn.out[0]
            try:
                sent = conn.sock.send(view)
            except (BlockingIOError, InterruptedError):
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except OSError:
                self._close(conn)
                return
            if conn.send_by > conn.deadline:
                # Progress: the client has request_timeout from now to take more (but
                # the whole answer stays due by send_by). Moved at most twice a second.
                moved = min(conn.send_by, time.monotonic() + self._timeout)
                if moved - conn.deadline > 0.5:
                    self._set_deadline(conn, moved)
            if sent < len(view):
                conn.out[0] = view[sent:]
                self._watch(conn, selectors.EVENT_WRITE)
                return
            conn.out.popleft()

    def _answered(self, conn: _Conn) -> None:
        self._end_stream(conn)
        if conn.close_after:
            if conn.linger or conn.buf:
                self._start_linger(conn)
            else:
                self._close(conn)
            return
        conn.state = _READ
        self._set_deadline(conn, time.monotonic() + self._timeout)
        if conn.buf:  # a pipelined request is waiting
            self._advance(conn)
        else:
            self._watch(conn, selectors.EVENT_READ)

    def _start_linger(self, conn: _Conn) -> None:
        # Closing with unread input would reset the connection and could destroy the
        # answer before the client reads it: half-close, drain a little, then close.
        conn.buf = bytearray()
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = _LINGERING
        conn.drained = 0
        self._set_deadline(conn, time.monotonic() + _LINGER)
        self._watch(conn, selectors.EVENT_READ)

    def _drain(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained > _LINGER_BYTES:
            self._close(conn)


class SyncServer(Serving):
    """The HTTP server stub: a :class:`ReportHandler` behind a bounded HTTP/1.1 server.

    One event-loop thread reads requests (each under one deadline of
    ``request_timeout``) and writes answers; ``workers`` threads run the handler; at
    most ``max_connections`` connections are open (see the module docstring). Use
    :meth:`start` to serve from a background thread (tests, examples) or
    :meth:`serve_forever` to serve from the calling thread (the command line), then
    :meth:`close`. Also a context manager. ``clock`` is the server's time; ``rng`` a
    seeded source for the central noise, for tests only (production draws it from the
    OS CSPRNG).
    """

    def __init__(
        self,
        *,
        config: ServerConfig,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._store = CountStore(path=config.db_path, synchronous=config.synchronous)
        try:
            self._handler = ReportHandler(config=config, store=self._store, clock=clock, rng=rng)
            self._http = _HTTPServer(
                (config.host, config.port),
                self._handler,
                capture=config.capture_raw,
                workers=config.workers,
                max_connections=config.max_connections,
                request_timeout=config.request_timeout,
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
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    @property
    def handler(self) -> ReportHandler:
        """The plain request handler (for in-process use)."""
        return self._handler

    @property
    def store(self) -> CountStore:
        """The count store."""
        return self._store

    @property
    def max_connections(self) -> int:
        """Connections served at once: ``config.max_connections``, or fewer if the
        open-file limit leaves no room for that many."""
        return self._http.max_connections

    @property
    def open_connections(self) -> int:
        """Connections open now (approximate when read from another thread)."""
        return self._http.open_connections

    def captured_requests(self) -> list[bytes]:
        """Raw bytes of every request so far (request line, headers, body); test mode."""
        if self._http.capture is None:
            raise ConfigurationError("raw capture is off (ServerConfig.capture_raw)")
        with self._http.capture_lock:
            return list(self._http.capture)

    _thread_name = "sync-server"

    def _loop(self) -> Any:
        return self._http

    def _release(self) -> None:
        self._store.close()


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ondevice-sync-server",
        description=(
            "Count randomized segment reports; publish noisy, k-suppressed statistics of "
            "each epoch once it is closed."
        ),
    )
    parser.add_argument("--k", type=int, required=True, help="number of segments K (1..64)")
    parser.add_argument("--db", type=Path, required=True, help="SQLite count store path")
    parser.add_argument("--epsilon-inf", type=float, default=DEFAULT_EPSILON_INF,
                        help="devices' memo epsilon, layer 1 (default ln 3)")
    parser.add_argument("--epsilon-1", type=float, default=DEFAULT_EPSILON_1,
                        help="devices' per-report epsilon about the memo, layer 2 "
                             "(default ln 9)")
    parser.add_argument("--central-epsilon", type=float, default=DEFAULT_CENTRAL_EPSILON,
                        help="epsilon of the geometric noise added to every published cell "
                             "(default 0.5)")
    parser.add_argument("--k-threshold", type=int, default=DEFAULT_K_THRESHOLD,
                        help="smallest noisy count or estimate ever published (default 50)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                        help="seconds after an epoch stops accepting reports before its "
                             "statistics are published (default 86400, one day)")
    parser.add_argument("--rate-limit", type=int, default=DEFAULT_RATE_LIMIT, metavar="N",
                        help="reports counted per client address per epoch (default 16; "
                             "0 = off, only behind a plain forwarding proxy; reports "
                             "through the OHTTP gateway are never limited here)")
    parser.add_argument("--rate-limit-tracked", type=int, default=DEFAULT_MAX_TRACKED,
                        metavar="N",
                        help="most distinct client addresses the rate limit counts per epoch; "
                             "beyond it new addresses are refused until the epoch ends "
                             f"(default {DEFAULT_MAX_TRACKED:,})")
    parser.add_argument("--content", type=Path,
                        help='content table JSON file: {"version": 2, "segments": [...]}')
    parser.add_argument("--bundle", type=Path, help="signed catalog bundle file")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 = any free port)")
    parser.add_argument("--max-body", type=int, default=MAX_BODY_SIZE, help="body limit, bytes")
    parser.add_argument("--epoch-window", type=int, default=1,
                        help="accepted distance in weeks from the server's week (default 1); "
                             "an epoch's statistics are published 1 + this many weeks after "
                             "it starts, plus --grace")
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                        help="SQLite durability (FULL survives power loss)")
    parser.add_argument("--workers", type=int, default=32,
                        help="threads running the handler, a fixed pool (default 32)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="connections open at once; more get 503 (default "
                             f"{DEFAULT_MAX_CONNECTIONS:,}; the soft open-file limit is "
                             "raised up to the hard limit to fit them)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help="one deadline per request for its whole head and body "
                             f"(default {DEFAULT_REQUEST_TIMEOUT:g})")
    parser.add_argument("--capture-raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ohttp-keys", type=Path,
                        help="OHTTP gateway key file "
                             "(python -m ondevice_sync.gateway generate-key): "
                             "serve POST /v1/ohttp and GET /v1/ohttp-keys")
    parser.add_argument("--ohttp-relay", action="append", metavar="ADDRESS",
                        help="an address or network of a relay allowed to post encapsulated "
                             "reports (repeatable; default: any, with a warning)")
    parser.add_argument("--ready-file", type=Path,
                        help="write the bound port to this file once listening")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``ondevice-sync-server`` / ``python -m ondevice_sync.server``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = ServerConfig(
            k=args.k,
            db_path=args.db,
            epsilon_inf=args.epsilon_inf,
            epsilon_1=args.epsilon_1,
            central_epsilon=args.central_epsilon,
            k_threshold=args.k_threshold,
            grace=args.grace,
            rate_limit=args.rate_limit,
            rate_limit_tracked=args.rate_limit_tracked,
            content_path=args.content,
            bundle_path=args.bundle,
            host=args.host,
            port=args.port,
            max_body=args.max_body,
            epoch_window=args.epoch_window,
            synchronous=args.synchronous,
            workers=args.workers,
            max_connections=args.max_connections,
            request_timeout=args.request_timeout,
            capture_raw=args.capture_raw,
            ohttp_keys_path=args.ohttp_keys,
            ohttp_relays=tuple(args.ohttp_relay) if args.ohttp_relay else None,
        )
        _raise_open_file_limit(
            config.max_connections + _FD_RESERVE + _MAX_FILE_STREAMS + config.workers
        )
        server = SyncServer(config=config)
    except (SyncError, OSError) as exc:
        sys.stderr.write(f"ondevice-sync-server: error: {exc}\n")
        return 2

    host, port = server.address
    _log.info(
        "serving K=%d epsilon_inf=%.4f epsilon_1=%.4f central_epsilon=%.4f k_threshold=%d "
        "rate_limit=%d max_connections=%d on %s:%d",
        config.k, config.epsilon_inf, config.epsilon_1, config.central_epsilon,
        config.k_threshold, config.rate_limit, server.max_connections, host, port,
    )
    serve_until_signalled(server, port=port, ready_file=args.ready_file)
    _log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
