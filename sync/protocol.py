"""The one message that may leave the device, and the documents the server publishes.

The report
----------
A report holds exactly three fields and nothing else: the protocol version, the epoch
(an ISO week such as ``"2026-W48"``) and the segment ID (``0..K-1``, ``K <= 64``), already
randomized on the device (``ondevice_sync.privacy``). Its one canonical encoding is compact JSON
with the keys in this order and fixed-width values::

    {"version":2,"epoch":"2026-W48","segment":"07"}

- ``version``: the JSON integer :data:`PROTOCOL_VERSION` (one digit);
- ``epoch``: a string ``YYYY-Www``: four-digit ISO year, ``-W``, two-digit ISO week;
- ``segment``: a string of exactly two decimal digits (``"00"`` to ``"63"``); a string,
  not a JSON number, because JSON numbers cannot carry leading zeros.

Every valid report is therefore exactly :data:`MESSAGE_SIZE` (47) bytes, so the size of
a request reveals nothing. :func:`decode_report` is strict: it accepts the canonical
bytes and nothing else (no whitespace, other key order, escapes, duplicate or unknown
keys, wrong types, unknown version, invalid week or segment), raising a
:class:`ondevice_sync.errors.ProtocolError` subclass that says what was wrong.

Versions
~~~~~~~~
Version 2 reports carry a segment randomized by *two-layer* randomized response (a
permanent memo, then a fresh randomization of it per report: ``ondevice_sync.privacy``).
Version 1 reports were randomized by one layer: the two channels have different keep
probabilities, so a count that mixes them cannot be debiased. Version 1 is therefore
refused with :class:`~ondevice_sync.errors.UnsupportedVersionError` (whose message says why),
never counted alongside version 2. The encoding is otherwise unchanged (47 bytes).

Requests
--------
A device sends only the fixed headers of :data:`REQUEST_HEADERS` (plus ``Host``, which
HTTP/1.1 requires and which names the server, not the device): no cookies, no
``User-Agent``, no ``Accept-Encoding``, ``Connection: close``. The whole request is thus
the same bytes for every device that reports the same (epoch, segment).

The content table
-----------------
``GET /v1/content`` returns featured items for *all* segments in one document, the same
bytes for every device (version :data:`CONTENT_TABLE_VERSION`)::

    {"epsilon_1":2.1972245773362196,"epsilon_inf":1.0986122886681098,"k":3,
     "segments":[["i1","i2"],[],["i9"]],"version":2}

(one line on the wire): compact JSON, keys sorted, ASCII only. ``segments[s]`` lists
segment ``s``'s featured item IDs, best first; ``k`` is the number of segments;
``epsilon_inf`` (the memo's epsilon) and ``epsilon_1`` (each report's epsilon about the
memo) are the two layers of the channel the operator's estimator assumes. A device
compares them with its own settings: one configured with another channel would bias the
published statistics, so it must not report. Version 1 tables (a single ``epsilon``)
are refused with :class:`~ondevice_sync.errors.UnsupportedVersionError`.

Clock
-----
Every function that needs the time takes ``now: float`` (unix seconds); epochs are ISO
weeks in UTC.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ondevice_sync.errors import (
    BadEpochError,
    ContentTableError,
    EpochOutOfWindowError,
    FieldTypeError,
    ForbiddenHeaderError,
    MalformedMessageError,
    MessageSizeError,
    MissingFieldError,
    NonCanonicalError,
    SegmentOutOfRangeError,
    UnknownFieldError,
    UnsupportedVersionError,
)

__all__ = [
    "ALLOWED_REQUEST_HEADER_NAMES",
    "BUNDLE_CONTENT_TYPE",
    "BUNDLE_PATH",
    "CONTENT_PATH",
    "CONTENT_TABLE_CONTENT_TYPE",
    "CONTENT_TABLE_VERSION",
    "ERROR_CONTENT_TYPE",
    "MAX_BODY_SIZE",
    "MAX_CONTENT_TABLE_SIZE",
    "MAX_FEATURED_PER_SEGMENT",
    "MAX_ITEM_ID_LENGTH",
    "MAX_SEGMENTS",
    "MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "REPORT_CONTENT_TYPE",
    "REPORT_PATH",
    "REQUEST_HEADERS",
    "STATS_PATH",
    "WEEK_SECONDS",
    "ContentTable",
    "Report",
    "check_epoch_window",
    "check_request_headers",
    "decode_content_table",
    "decode_report",
    "encode_content_table",
    "encode_report",
    "epoch_distance",
    "epoch_of",
    "epoch_start",
    "parse_epoch",
    "shift_epoch",
]

PROTOCOL_VERSION: Final = 2
"""The version of the report message; the only one :func:`decode_report` accepts
(version 1, single-layer randomized response, is refused: see the module docstring)."""

CONTENT_TABLE_VERSION: Final = 2
"""The version of the content table document (2: ``epsilon_inf`` and ``epsilon_1``)."""

MAX_SEGMENTS: Final = 64
"""The largest number of segments ``K`` the protocol carries (IDs ``00`` to ``63``)."""

MAX_BODY_SIZE: Final = 1024
"""The largest request body the server reads; anything larger is refused unread."""

MAX_CONTENT_TABLE_SIZE: Final = 4 * 1024 * 1024
"""The largest content table document a client accepts (bytes)."""

MAX_FEATURED_PER_SEGMENT: Final = 500
"""The most featured items one segment's row may list."""

MAX_ITEM_ID_LENGTH: Final = 256
"""The longest item ID (characters) the content table may carry."""

WEEK_SECONDS: Final = 7 * 24 * 3600

REPORT_PATH: Final = "/v1/report"
CONTENT_PATH: Final = "/v1/content"
BUNDLE_PATH: Final = "/v1/bundle"
STATS_PATH: Final = "/v1/stats"

REPORT_CONTENT_TYPE: Final = "application/vnd.ondevice.report+json"
"""The only content type ``POST /v1/report`` accepts."""
CONTENT_TABLE_CONTENT_TYPE: Final = "application/vnd.ondevice.content-table+json"
BUNDLE_CONTENT_TYPE: Final = "application/octet-stream"
ERROR_CONTENT_TYPE: Final = "application/json"

_SINGLE_LAYER_VERSION: Final = 1
_SEGMENT_WIDTH: Final = 2
_EPOCH_RE: Final = re.compile(r"\A([0-9]{4})-W([0-9]{2})\Z")
_SEGMENT_RE: Final = re.compile(r"\A[0-9]{2}\Z")
_FIELDS: Final = ("version", "epoch", "segment")
# Every canonical report matches this; anything else takes the slow path, which names
# the problem.
_CANONICAL_RE: Final = re.compile(
    rb'\A\{"version":([0-9]),"epoch":"([0-9]{4}-W[0-9]{2})","segment":"([0-9]{2})"\}\Z'
)


@dataclass(frozen=True, slots=True)
class Report:
    """One segment report: the protocol version, the epoch and the (randomized) segment.

    Constructing one validates it: ``epoch`` must be a real ISO week ``YYYY-Www`` and
    ``segment`` an ``int`` in ``0..MAX_SEGMENTS-1``. Whether the segment is below the
    bundle's ``K`` is checked by :func:`encode_report` / :func:`decode_report` (``k=``).
    """

    epoch: str
    segment: int
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int:
            raise FieldTypeError("version must be an integer")
        if self.version != PROTOCOL_VERSION:
            raise _unsupported_version(self.version)
        if not isinstance(self.epoch, str):
            raise FieldTypeError("epoch must be a string like '2026-W48'")
        parse_epoch(self.epoch)
        if type(self.segment) is not int:
            raise FieldTypeError("segment must be an integer")
        _check_segment(self.segment, MAX_SEGMENTS)


def _unsupported_version(version: object) -> UnsupportedVersionError:
    if type(version) is int and version == _SINGLE_LAYER_VERSION:
        return UnsupportedVersionError(
            f"protocol version {_SINGLE_LAYER_VERSION} is no longer accepted: its segment "
            "went through single-layer randomized response, and a count that mixes it with "
            f"version {PROTOCOL_VERSION} (two-layer) reports cannot be debiased; "
            f"send version {PROTOCOL_VERSION}"
        )
    return UnsupportedVersionError(
        f"protocol version {_short(version)} is not supported (only {PROTOCOL_VERSION})"
    )


def _check_k(k: int) -> None:
    if type(k) is not int or not 1 <= k <= MAX_SEGMENTS:
        raise SegmentOutOfRangeError(f"K must be an integer in 1..{MAX_SEGMENTS}, got {k!r}")


def _check_segment(segment: int, k: int) -> None:
    if not 0 <= segment < k:
        raise SegmentOutOfRangeError(f"segment {segment} is not in 0..{k - 1}")


def _canonical_report_bytes(version: int, epoch: str, segment: int) -> bytes:
    return (
        f'{{"version":{version},"epoch":"{epoch}",'
        f'"segment":"{segment:0{_SEGMENT_WIDTH}d}"}}'
    ).encode("ascii")


MESSAGE_SIZE: Final = len(_canonical_report_bytes(PROTOCOL_VERSION, "2026-W48", 0))
"""The size in bytes of every valid encoded report (47)."""


def encode_report(report: Report, *, k: int = MAX_SEGMENTS) -> bytes:
    """The one canonical encoding of ``report``: exactly :data:`MESSAGE_SIZE` bytes.

    Raises :class:`~ondevice_sync.errors.SegmentOutOfRangeError` when the segment is not below
    ``k`` (the number of segments of the bundle in use).
    """
    _check_k(k)
    _check_segment(report.segment, k)
    body = _canonical_report_bytes(report.version, report.epoch, report.segment)
    if len(body) != MESSAGE_SIZE:  # pragma: no cover - guaranteed by Report validation
        raise MessageSizeError(f"encoded report is {len(body)} bytes, not {MESSAGE_SIZE}")
    return body


def _reject_constant(name: str) -> Any:
    raise MalformedMessageError(f"{name} is not valid JSON")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise MalformedMessageError(f"duplicate key {_short(key)}")
        result[key] = value
    return result


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_unique_object, parse_constant=_reject_constant
)


def _load_json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        text = body.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise MalformedMessageError(f"{what} is not UTF-8") from exc
    try:
        value = _DECODER.decode(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MalformedMessageError(f"{what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise MalformedMessageError(f"{what} must be a JSON object")
    return value


def _check_fields(obj: Mapping[str, Any], fields: Sequence[str]) -> None:
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        names = ", ".join(_short(name) for name in unknown[:5])
        raise UnknownFieldError(f"unknown field(s): {names}; allowed: {', '.join(fields)}")
    missing = [name for name in fields if name not in obj]
    if missing:
        raise MissingFieldError(f"missing field(s): {', '.join(missing)}")


def decode_report(body: bytes, *, k: int = MAX_SEGMENTS) -> Report:
    """Parse and validate ``body``; only the canonical encoding is accepted.

    Raises a :class:`~ondevice_sync.errors.ProtocolError` subclass naming the first problem:
    size, malformed JSON, unknown or missing field, wrong type, version, epoch, segment
    out of ``0..k-1``, or non-canonical bytes (a valid message written differently).
    """
    _check_k(k)
    if not isinstance(body, bytes | bytearray | memoryview):
        raise MalformedMessageError("the report body must be bytes")
    body = bytes(body)
    fast = _CANONICAL_RE.match(body)
    if fast is not None and int(fast.group(1)) == PROTOCOL_VERSION:
        epoch = fast.group(2).decode("ascii")
        parse_epoch(epoch)
        segment = int(fast.group(3))
        _check_segment(segment, k)
        return Report(epoch=epoch, segment=segment)
    if not body:
        raise MessageSizeError("empty body")
    if len(body) > MAX_BODY_SIZE:
        raise MessageSizeError(f"body of {len(body)} bytes exceeds {MAX_BODY_SIZE}")
    obj = _load_json_object(body, "report")
    _check_fields(obj, _FIELDS)
    version, epoch, segment_text = obj["version"], obj["epoch"], obj["segment"]
    if type(version) is not int:
        raise FieldTypeError("version must be a JSON integer")
    if version != PROTOCOL_VERSION:
        raise _unsupported_version(version)
    if not isinstance(epoch, str):
        raise FieldTypeError("epoch must be a JSON string like \"2026-W48\"")
    parse_epoch(epoch)
    if not isinstance(segment_text, str) or not _SEGMENT_RE.match(segment_text):
        raise FieldTypeError('segment must be a string of two decimal digits like "07"')
    segment = int(segment_text)
    _check_segment(segment, k)
    if body != _canonical_report_bytes(version, epoch, segment):
        raise NonCanonicalError(
            "valid fields but not the canonical encoding "
            '(compact JSON, keys in order version, epoch, segment)'
        )
    return Report(epoch=epoch, segment=segment, version=version)


# --------------------------------------------------------------------------- epochs


def parse_epoch(epoch: str) -> tuple[int, int]:
    """``(iso_year, iso_week)`` of an epoch string ``YYYY-Www``; strict.

    Raises :class:`~ondevice_sync.errors.BadEpochError` for any other string, and for week 53 of
    a year that has only 52 ISO weeks.
    """
    if not isinstance(epoch, str):
        raise BadEpochError("epoch must be a string like '2026-W48'")
    match = _EPOCH_RE.match(epoch)
    if match is None:
        raise BadEpochError(f"epoch {_short(epoch)} is not an ISO week 'YYYY-Www'")
    year, week = int(match.group(1)), int(match.group(2))
    try:
        _dt.date.fromisocalendar(year, week, 1)
    except ValueError as exc:
        raise BadEpochError(f"epoch {epoch!r} is not an existing ISO week") from exc
    return year, week


def epoch_of(now: float) -> str:
    """The ISO week (UTC) containing the unix time ``now``, as ``YYYY-Www``."""
    if not math.isfinite(now):
        raise BadEpochError("time must be finite")
    try:
        iso = _dt.datetime.fromtimestamp(now, tz=_dt.UTC).isocalendar()
    except (OverflowError, OSError, ValueError) as exc:
        raise BadEpochError(f"time {now!r} is out of range") from exc
    return f"{iso.year:04d}-W{iso.week:02d}"


def epoch_start(epoch: str) -> float:
    """The unix time at which ``epoch`` begins (its Monday, 00:00 UTC)."""
    year, week = parse_epoch(epoch)
    monday = _dt.date.fromisocalendar(year, week, 1)
    return _dt.datetime(monday.year, monday.month, monday.day, tzinfo=_dt.UTC).timestamp()


def epoch_distance(epoch: str, reference: str) -> int:
    """How many weeks ``epoch`` lies after ``reference`` (negative when before)."""
    return round((epoch_start(epoch) - epoch_start(reference)) / WEEK_SECONDS)


def shift_epoch(epoch: str, weeks: int) -> str:
    """The epoch ``weeks`` weeks after ``epoch`` (before, when negative)."""
    return epoch_of(epoch_start(epoch) + weeks * WEEK_SECONDS + WEEK_SECONDS / 2)


def check_epoch_window(epoch: str, *, now: float, window: int = 1) -> None:
    """Refuse ``epoch`` unless it is within ``window`` weeks of the week of ``now``.

    Raises :class:`~ondevice_sync.errors.BadEpochError` for a malformed epoch and
    :class:`~ondevice_sync.errors.EpochOutOfWindowError` for one too far in the past or future.
    """
    distance = epoch_distance(epoch, epoch_of(now))
    if abs(distance) > window:
        raise EpochOutOfWindowError(
            f"epoch {epoch} is {abs(distance)} weeks "
            f"{'ahead of' if distance > 0 else 'behind'} the server's week "
            f"(at most {window} allowed)"
        )


# --------------------------------------------------------------------------- headers

ALLOWED_REQUEST_HEADER_NAMES: Final = frozenset(
    {"host", "content-type", "content-length", "accept", "connection"}
)
"""Every header name a device's request may carry (lower case)."""

REQUEST_HEADERS: Final[Mapping[str, tuple[tuple[str, str], ...]]] = {
    REPORT_PATH: (
        ("Content-Type", REPORT_CONTENT_TYPE),
        ("Content-Length", str(MESSAGE_SIZE)),
        ("Accept", "application/json"),
        ("Connection", "close"),
    ),
    CONTENT_PATH: (
        ("Accept", CONTENT_TABLE_CONTENT_TYPE),
        ("Connection", "close"),
    ),
    BUNDLE_PATH: (
        ("Accept", BUNDLE_CONTENT_TYPE),
        ("Connection", "close"),
    ),
}
"""The fixed headers of each device request, by path (``Host`` is added by the
transport from the base URL). Nothing varies between devices."""


def check_request_headers(headers: Mapping[str, str]) -> None:
    """Refuse any header whose name is not in :data:`ALLOWED_REQUEST_HEADER_NAMES`."""
    for name in headers:
        if name.lower() not in ALLOWED_REQUEST_HEADER_NAMES:
            raise ForbiddenHeaderError(f"header {name!r} may not be sent by a device")


# --------------------------------------------------------------------------- content


_TABLE_FIELDS: Final = ("epsilon_1", "epsilon_inf", "k", "segments", "version")


def _check_table_epsilon(value: object, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ContentTableError(f"{name} must be a finite number > 0")


@dataclass(frozen=True, slots=True)
class ContentTable:
    """Featured items for every segment: ``rows[s]`` lists segment ``s``'s item IDs.

    ``epsilon_inf`` and ``epsilon_1`` are the two layers of randomized response (the
    memo's epsilon and each report's epsilon about the memo) that the operator's
    statistics assume; a device whose own settings differ must not report.
    """

    rows: tuple[tuple[str, ...], ...]
    epsilon_inf: float
    epsilon_1: float
    version: int = CONTENT_TABLE_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != CONTENT_TABLE_VERSION:
            raise UnsupportedVersionError(
                f"content table version {_short(self.version)} is not supported "
                f"(only {CONTENT_TABLE_VERSION})"
            )
        if not isinstance(self.rows, tuple) or not 1 <= len(self.rows) <= MAX_SEGMENTS:
            raise ContentTableError(f"a content table has 1..{MAX_SEGMENTS} rows")
        _check_table_epsilon(self.epsilon_inf, "epsilon_inf")
        _check_table_epsilon(self.epsilon_1, "epsilon_1")
        for segment, row in enumerate(self.rows):
            if not isinstance(row, tuple):
                raise ContentTableError(f"row {segment} must be a tuple of item IDs")
            if len(row) > MAX_FEATURED_PER_SEGMENT:
                raise ContentTableError(
                    f"segment {segment} lists {len(row)} items "
                    f"(at most {MAX_FEATURED_PER_SEGMENT})"
                )
            for item in row:
                if not isinstance(item, str) or not 1 <= len(item) <= MAX_ITEM_ID_LENGTH:
                    raise ContentTableError(
                        f"segment {segment}: item IDs must be strings of "
                        f"1..{MAX_ITEM_ID_LENGTH} characters"
                    )

    @property
    def k(self) -> int:
        """The number of segments."""
        return len(self.rows)

    def items_for(self, segment: int) -> tuple[str, ...]:
        """Featured item IDs of ``segment``, best first."""
        _check_segment(segment, self.k)
        return self.rows[segment]


def encode_content_table(table: ContentTable) -> bytes:
    """The canonical bytes of ``table`` (compact JSON, sorted keys, ASCII)."""
    document = {
        "epsilon_1": float(table.epsilon_1),
        "epsilon_inf": float(table.epsilon_inf),
        "k": table.k,
        "segments": [list(row) for row in table.rows],
        "version": table.version,
    }
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def decode_content_table(body: bytes, *, require_canonical: bool = True) -> ContentTable:
    """Parse a content table document; strict about fields, types and sizes.

    With ``require_canonical`` (the default, for what a client receives) the bytes must
    be exactly :func:`encode_content_table` of the result; the server loads the
    operator's file with ``require_canonical=False`` and re-encodes it. A version 1
    table (one ``epsilon``, single-layer) raises
    :class:`~ondevice_sync.errors.UnsupportedVersionError`; otherwise raises a
    :class:`~ondevice_sync.errors.ProtocolError` subclass naming the problem.
    """
    if len(body) > MAX_CONTENT_TABLE_SIZE:
        raise ContentTableError(
            f"content table of {len(body)} bytes exceeds {MAX_CONTENT_TABLE_SIZE}"
        )
    obj = _load_json_object(body, "content table")
    version = obj.get("version")
    if "version" in obj and type(version) is not int:
        raise FieldTypeError("content table version must be an integer")
    if "version" in obj and version != CONTENT_TABLE_VERSION:
        raise UnsupportedVersionError(
            f"content table version {_short(version)} is not supported (only "
            f"{CONTENT_TABLE_VERSION}, whose epsilon_inf and epsilon_1 describe the "
            "two-layer channel)"
        )
    _check_fields(obj, _TABLE_FIELDS)
    k, segments = obj["k"], obj["segments"]
    if type(k) is not int or not 1 <= k <= MAX_SEGMENTS:
        raise ContentTableError(f"k must be an integer in 1..{MAX_SEGMENTS}")
    if not isinstance(segments, list) or len(segments) != k:
        raise ContentTableError(f"segments must be a list of exactly k={k} rows")
    if not all(isinstance(row, list) for row in segments):
        raise ContentTableError("every row of segments must be a list of item IDs")
    for name in ("epsilon_inf", "epsilon_1"):
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldTypeError(f"{name} must be a number")
    table = ContentTable(
        rows=tuple(tuple(row) for row in segments),
        epsilon_inf=float(obj["epsilon_inf"]),
        epsilon_1=float(obj["epsilon_1"]),
        version=CONTENT_TABLE_VERSION,
    )
    if require_canonical and encode_content_table(table) != bytes(body):
        raise NonCanonicalError("content table is not in its canonical encoding")
    return table
