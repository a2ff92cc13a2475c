"""The wire message: one canonical constant-size encoding, strict decoding, ISO-week epochs."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ondevice_sync import errors
from ondevice_sync.protocol import (
    ALLOWED_REQUEST_HEADER_NAMES,
    CONTENT_TABLE_VERSION,
    MAX_BODY_SIZE,
    MAX_SEGMENTS,
    MESSAGE_SIZE,
    PROTOCOL_VERSION,
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
    assert json.loads(body) == {"version": 2, "epoch": epoch, "segment": f"{segment:02d}"}
    assert body.startswith(b'{"version":2,')


@given(epoch=epochs(), segment=st.integers(0, MAX_SEGMENTS - 1), indent=st.sampled_from([0, 1]))
def test_a_valid_report_written_differently_is_refused_as_non_canonical(
    epoch: str, segment: int, indent: int
) -> None:
    document = {"segment": f"{segment:02d}", "epoch": epoch, "version": 2}
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
        (b'{"version":2,"version":2,"epoch":"2026-W48","segment":"01"}',
         errors.MalformedMessageError),
        (b'{"version":2,"epoch":"2026-W48","segment":"01","user":"u1"}',
         errors.UnknownFieldError),
        (b'{"version":2,"epoch":"2026-W48"}', errors.MissingFieldError),
        (b'{"version":"1","epoch":"2026-W48","segment":"01"}', errors.FieldTypeError),
        (b'{"version":true,"epoch":"2026-W48","segment":"01"}', errors.FieldTypeError),
        (b'{"version":3,"epoch":"2026-W48","segment":"01"}', errors.UnsupportedVersionError),
        (b'{"version":1,"epoch":"2026-W48","segment":"01"}', errors.UnsupportedVersionError),
        (b'{"version":0,"epoch":"2026-W48","segment":"01"}', errors.UnsupportedVersionError),
        (b'{"version":2,"epoch":20264,"segment":"01"}', errors.FieldTypeError),
        (b'{"version":2,"epoch":"2026-11-27","segment":"01"}', errors.BadEpochError),
        (b'{"version":2,"epoch":"2025-W53","segment":"01"}', errors.BadEpochError),
        (b'{"version":2,"epoch":"2026-W00","segment":"01"}', errors.BadEpochError),
        (b'{"version":2,"epoch":"2026-W48","segment":1}', errors.FieldTypeError),
        (b'{"version":2,"epoch":"2026-W48","segment":"1"}', errors.FieldTypeError),
        (b'{"version":2,"epoch":"2026-W48","segment":"64"}', errors.SegmentOutOfRangeError),
        (b'{"version":2,"epoch":"2026-W48","segment":NaN}', errors.MalformedMessageError),
        (b'{"version":2.0,"epoch":"2026-W48","segment":"01"}', errors.FieldTypeError),
        (b'{"version":2,"epoch":"2026-W48","segment":"01"}\n', errors.NonCanonicalError),
        (b'{"version":2,"epoch":"2026-W48","segment":"\\u0030\\u0031"}',
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


def test_a_version_1_report_is_refused_and_the_message_says_why() -> None:
    # Version 1 was single-layer randomized response: its canonical bytes (47, like
    # version 2) must never be decoded into a report a server would count.
    body = b'{"version":1,"epoch":"2026-W48","segment":"01"}'
    assert len(body) == MESSAGE_SIZE
    with pytest.raises(errors.UnsupportedVersionError) as caught:
        decode_report(body)
    message = str(caught.value)
    assert "single-layer" in message and "two-layer" in message and "version 2" in message
    with pytest.raises(errors.UnsupportedVersionError, match="single-layer"):
        Report(epoch="2026-W48", segment=1, version=1)
    assert PROTOCOL_VERSION == 2 and MESSAGE_SIZE == 47


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
        {"epoch": "2026-W48", "segment": 1, "version": 1},
        {"epoch": "2026-W48", "segment": 1, "version": 3},
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
    epsilon_inf=st.floats(min_value=0.01, max_value=10.0),
    epsilon_1=st.floats(min_value=0.01, max_value=10.0),
)
def test_content_table_round_trips_through_its_canonical_bytes(
    rows: list[tuple[str, ...]], epsilon_inf: float, epsilon_1: float
) -> None:
    table = ContentTable(rows=tuple(rows), epsilon_inf=epsilon_inf, epsilon_1=epsilon_1)
    body = encode_content_table(table)
    assert body.isascii()
    assert decode_content_table(body) == table
    assert encode_content_table(decode_content_table(body)) == body
    document = json.loads(body)
    assert document["version"] == CONTENT_TABLE_VERSION == 2
    assert document["epsilon_inf"] == epsilon_inf and document["epsilon_1"] == epsilon_1
    assert "epsilon" not in document


def test_content_table_document_is_sorted_compact_json_with_both_epsilons() -> None:
    table = ContentTable(rows=(("i1", "i2"), (), ("i9",)), epsilon_inf=1.5, epsilon_1=2.25)
    assert encode_content_table(table) == (
        b'{"epsilon_1":2.25,"epsilon_inf":1.5,"k":3,'
        b'"segments":[["i1","i2"],[],["i9"]],"version":2}'
    )


TABLE = {"version": 2, "k": 1, "epsilon_inf": 1.0, "epsilon_1": 2.0, "segments": [["a"]]}


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"k": 2}, errors.ContentTableError),
        ({"version": 3}, errors.UnsupportedVersionError),
        ({"version": "2"}, errors.FieldTypeError),
        ({"segments": [[1]]}, errors.ContentTableError),
        ({"extra": 1}, errors.UnknownFieldError),
        ({"epsilon": 1.0}, errors.UnknownFieldError),
        ({"epsilon_inf": -1.0}, errors.ContentTableError),
        ({"epsilon_1": 0.0}, errors.ContentTableError),
        ({"epsilon_1": True}, errors.FieldTypeError),
        ({"epsilon_inf": "1"}, errors.FieldTypeError),
        ({"epsilon_inf": None}, errors.MissingFieldError),
        ({"epsilon_1": None}, errors.MissingFieldError),
        ({"segments": [[""]]}, errors.ContentTableError),
    ],
)
def test_content_table_refuses_malformed_documents(
    changes: dict[str, object], error: type[errors.ProtocolError]
) -> None:
    document = {**TABLE, **changes}
    document = {name: value for name, value in document.items() if value is not None}
    with pytest.raises(error):
        decode_content_table(json.dumps(document).encode(), require_canonical=False)


def test_a_version_1_content_table_with_one_epsilon_is_refused_as_unsupported() -> None:
    old = {"version": 1, "k": 1, "epsilon": 1.0986122886681098, "segments": [["a"]]}
    with pytest.raises(errors.UnsupportedVersionError, match="epsilon_inf and epsilon_1"):
        decode_content_table(json.dumps(old, separators=(",", ":"), sort_keys=True).encode())
    with pytest.raises(errors.UnsupportedVersionError):
        ContentTable(rows=(("a",),), epsilon_inf=1.0, epsilon_1=2.0, version=1)


def test_content_table_requires_canonical_bytes_by_default() -> None:
    body = json.dumps(TABLE).encode()
    assert decode_content_table(body, require_canonical=False).rows == (("a",),)
    with pytest.raises(errors.NonCanonicalError):
        decode_content_table(body)
