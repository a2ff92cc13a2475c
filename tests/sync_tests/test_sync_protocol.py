"""The wire message: one canonical constant-size encoding, strict decoding, ISO-week epochs."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sync import errors
from sync.protocol import (
    ALLOWED_REQUEST_HEADER_NAMES,
    MAX_BODY_SIZE,
    MAX_SEGMENTS,
    MESSAGE_SIZE,
    REQUEST_HEADERS,
    ContentTable,
    Report,
    check_epoch_window,
    check_request_headers,
    decode_content_table,
    decode_report,
    encode_content_table,
    encode_report,
    epoch_distance,
    epoch_of,
    epoch_start,
    parse_epoch,
    shift_epoch,
)

DAY = 86400.0


@st.composite
def epochs(draw: st.DrawFn) -> str:
    """Valid ISO weeks over years 1000..9998."""
    day = draw(st.dates(min_value=dt.date(1000, 1, 10), max_value=dt.date(9998, 12, 20)))
    iso = day.isocalendar()
    return f"{iso.year:04d}-W{iso.week:02d}"


@given(epoch=epochs(), segment=st.integers(0, MAX_SEGMENTS - 1))
def test_every_valid_report_round_trips_at_the_same_size(epoch: str, segment: int) -> None:
    report = Report(epoch=epoch, segment=segment)
    body = encode_report(report)
    assert len(body) == MESSAGE_SIZE
    assert decode_report(body) == report
    assert json.loads(body) == {"version": 1, "epoch": epoch, "segment": f"{segment:02d}"}


@given(epoch=epochs(), segment=st.integers(0, MAX_SEGMENTS - 1), indent=st.sampled_from([0, 1]))
def test_a_valid_report_written_differently_is_refused_as_non_canonical(
    epoch: str, segment: int, indent: int
) -> None:
    document = {"segment": f"{segment:02d}", "epoch": epoch, "version": 1}
    body = json.dumps(document, indent=indent).encode()
    with pytest.raises(errors.NonCanonicalError):
        decode_report(body)


@given(body=st.binary(max_size=MAX_BODY_SIZE + 10))
def test_arbitrary_bytes_either_decode_to_their_own_canonical_form_or_raise(body: bytes) -> None:
    try:
        report = decode_report(body)
    except errors.ProtocolError:
        return
    assert encode_report(report) == body


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", errors.MessageSizeError),
        (b" " * (MAX_BODY_SIZE + 1), errors.MessageSizeError),
        (b"\xff\xfe", errors.MalformedMessageError),
        (b"{not json", errors.MalformedMessageError),
        (b"[1, 2]", errors.MalformedMessageError),
        (b'{"version":1,"version":1,"epoch":"2026-W48","segment":"01"}',
         errors.MalformedMessageError),
        (b'{"version":1,"epoch":"2026-W48","segment":"01","user":"u1"}',
         errors.UnknownFieldError),
        (b'{"version":1,"epoch":"2026-W48"}', errors.MissingFieldError),
        (b'{"version":"1","epoch":"2026-W48","segment":"01"}', errors.FieldTypeError),
        (b'{"version":true,"epoch":"2026-W48","segment":"01"}', errors.FieldTypeError),
        (b'{"version":2,"epoch":"2026-W48","segment":"01"}', errors.UnsupportedVersionError),
        (b'{"version":1,"epoch":20264,"segment":"01"}', errors.FieldTypeError),
        (b'{"version":1,"epoch":"2026-11-27","segment":"01"}', errors.BadEpochError),
        (b'{"version":1,"epoch":"2025-W53","segment":"01"}', errors.BadEpochError),
        (b'{"version":1,"epoch":"2026-W00","segment":"01"}', errors.BadEpochError),
        (b'{"version":1,"epoch":"2026-W48","segment":1}', errors.FieldTypeError),
        (b'{"version":1,"epoch":"2026-W48","segment":"1"}', errors.FieldTypeError),
        (b'{"version":1,"epoch":"2026-W48","segment":"64"}', errors.SegmentOutOfRangeError),
        (b'{"version":1,"epoch":"2026-W48","segment":NaN}', errors.MalformedMessageError),
        (b'{"version":1.0,"epoch":"2026-W48","segment":"01"}', errors.FieldTypeError),
        (b'{"version":1,"epoch":"2026-W48","segment":"01"}\n', errors.NonCanonicalError),
        (b'{"version":1,"epoch":"2026-W48","segment":"\\u0030\\u0031"}',
         errors.NonCanonicalError),
    ],
)
def test_malformed_report_raises_the_specific_protocol_error(
    body: bytes, error: type[errors.ProtocolError]
) -> None:
    with pytest.raises(error) as caught:
        decode_report(body)
    assert isinstance(caught.value, errors.ProtocolError)
    assert isinstance(caught.value, errors.SyncError)
    assert str(caught.value)


def test_segment_at_or_above_k_is_refused_by_encoder_and_decoder() -> None:
    report = Report(epoch="2026-W48", segment=5)
    body = encode_report(report, k=6)
    assert decode_report(body, k=6) == report
    with pytest.raises(errors.SegmentOutOfRangeError):
        encode_report(report, k=5)
    with pytest.raises(errors.SegmentOutOfRangeError):
        decode_report(body, k=5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epoch": "2026-W48", "segment": 64},
        {"epoch": "2026-W48", "segment": -1},
        {"epoch": "2026-W48", "segment": True},
        {"epoch": "2026-w48", "segment": 1},
        {"epoch": "2026-W48", "segment": 1, "version": 2},
    ],
)
def test_report_refuses_invalid_values_at_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(errors.ProtocolError):
        Report(**kwargs)  # type: ignore[arg-type]


def test_epoch_of_follows_iso_weeks_in_utc() -> None:
    def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> float:
        return dt.datetime(year, month, day, hour, minute, sec, tzinfo=dt.UTC).timestamp()

    assert epoch_of(at(2026, 11, 27, 12)) == "2026-W48"
    assert epoch_of(at(2021, 1, 1)) == "2020-W53"
    assert epoch_of(at(2024, 12, 30)) == "2025-W01"
    assert epoch_of(at(2026, 11, 29, 23, 59, 59)) == "2026-W48"
    assert epoch_of(at(2026, 11, 30)) == "2026-W49"
    assert epoch_start("2026-W49") == at(2026, 11, 30)
    assert parse_epoch("2020-W53") == (2020, 53)


@given(epoch=epochs(), weeks=st.integers(-200, 200))
def test_shift_and_distance_agree(epoch: str, weeks: int) -> None:
    try:
        shifted = shift_epoch(epoch, weeks)
    except errors.BadEpochError:
        return
    assert epoch_distance(shifted, epoch) == weeks
    assert epoch_of(epoch_start(shifted)) == shifted


def test_epoch_window_accepts_neighbouring_weeks_only() -> None:
    now = epoch_start("2026-W01") + 3 * DAY
    for epoch in ("2025-W52", "2026-W01", "2026-W02"):
        check_epoch_window(epoch, now=now, window=1)
    for epoch in ("2025-W51", "2026-W03", "1999-W10"):
        with pytest.raises(errors.EpochOutOfWindowError):
            check_epoch_window(epoch, now=now, window=1)
    with pytest.raises(errors.BadEpochError):
        check_epoch_window("next week", now=now)


def test_request_headers_are_fixed_and_within_the_allowed_set() -> None:
    for headers in REQUEST_HEADERS.values():
        names = {name.lower() for name, _ in headers}
        assert names <= ALLOWED_REQUEST_HEADER_NAMES
        assert "cookie" not in names and "user-agent" not in names
        check_request_headers(dict(headers))
    for forbidden in ("Cookie", "User-Agent", "X-Device-Id", "Authorization"):
        with pytest.raises(errors.ForbiddenHeaderError):
            check_request_headers({forbidden: "x"})


item_ids = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
)


@given(
    rows=st.lists(st.lists(item_ids, max_size=5).map(tuple), min_size=1, max_size=MAX_SEGMENTS),
    epsilon=st.floats(min_value=0.01, max_value=10.0),
)
def test_content_table_round_trips_through_its_canonical_bytes(
    rows: list[tuple[str, ...]], epsilon: float
) -> None:
    table = ContentTable(rows=tuple(rows), epsilon=epsilon)
    body = encode_content_table(table)
    assert body.isascii()
    assert decode_content_table(body) == table
    assert encode_content_table(decode_content_table(body)) == body


@pytest.mark.parametrize(
    "document",
    [
        {"version": 1, "k": 2, "epsilon": 1.0, "segments": [["a"]]},
        {"version": 2, "k": 1, "epsilon": 1.0, "segments": [["a"]]},
        {"version": 1, "k": 1, "epsilon": 1.0, "segments": [[1]]},
        {"version": 1, "k": 1, "epsilon": 1.0, "segments": [["a"]], "extra": 1},
        {"version": 1, "k": 1, "epsilon": -1.0, "segments": [["a"]]},
        {"version": 1, "k": 1, "segments": [["a"]]},
        {"version": 1, "k": 1, "epsilon": 1.0, "segments": [[""]]},
    ],
)
def test_content_table_refuses_malformed_documents(document: dict[str, object]) -> None:
    with pytest.raises(errors.ProtocolError):
        decode_content_table(json.dumps(document).encode(), require_canonical=False)


def test_content_table_requires_canonical_bytes_by_default() -> None:
    body = json.dumps({"version": 1, "k": 1, "epsilon": 1.0, "segments": [["a"]]}).encode()
    assert decode_content_table(body, require_canonical=False).rows == (("a",),)
    with pytest.raises(errors.NonCanonicalError):
        decode_content_table(body)
