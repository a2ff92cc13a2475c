"""End to end on loopback: engines with several local users record, recommend and
sync against the real server stub; every byte the client sent is captured and checked."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from ondevice import (
    PersonalizationEngine,
    PrivacyLevel,
    SyncError,
    SyncSettings,
)
from ondevice_sync.protocol import MESSAGE_SIZE, REPORT_PATH, decode_report, epoch_of
from ondevice_sync.server import ServerConfig, SyncServer

from planted import HISTORY, PLANTED

K = 3  # the planted catalog's segments
USERS = ["alice@example.com", "bob-7781", "carol-local-42"]
VALUE = 4.25  # an interaction value that must never leave


@pytest.fixture
def server(tmp_path, clock):
    content = tmp_path / "content.json"
    content.write_text(json.dumps({"version": 2, "segments": [["i3"], ["i19"], []]}))
    srv = SyncServer(
        config=ServerConfig(
            k=K,
            db_path=tmp_path / "counts.db",
            port=0,
            capture_raw=True,
            content_path=content,
            k_threshold=1,
        ),
        clock=clock,
    ).start()
    yield srv
    srv.close()


def _now(**overrides: object) -> SyncSettings:
    """Settings that send at the first sync of the week, users not spaced (the schedule
    is tested in test_reporting.py and below)."""
    values: dict[str, object] = {"schedule": False, "min_gap": 0.0}
    values.update(overrides)
    return SyncSettings(**values)  # type: ignore[arg-type]


def _record(engine: PersonalizationEngine, user: str) -> None:
    for n, item in enumerate(HISTORY):
        engine.update_profile(
            user,
            {
                "item_id": item,
                "event": "purchase",
                "timestamp": engine.now() - 60 + n,
                "value": VALUE,
            },
        )
    engine.set_signals(user, {"plan": "pro"})


def _reports(server: SyncServer) -> list[bytes]:
    return [r for r in server.captured_requests() if r.startswith(b"POST " + REPORT_PATH.encode())]


def _split(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def test_only_randomized_segment_ids_leave_and_nothing_links_them(open_engine, server, clock):
    engines = [
        open_engine(level, sync=_now(server_url=server.url))
        for level in ("segment", "behavioral", "individual")
    ]
    for engine in engines:
        for user in USERS:
            _record(engine, user)
            assert engine.get_recommendations(user, k=3)[0].item_id == PLANTED
    outcomes = [engine.sync(user) for engine in engines for user in USERS]
    assert {o.status for o in outcomes} == {"sent"}
    clock.advance(days=7)  # next epoch: a second report from each profile
    outcomes += [engine.sync(user) for engine in engines for user in USERS]
    assert all(o.status == "sent" for o in outcomes)

    raw = _reports(server)
    assert len(raw) == 2 * len(engines) * len(USERS)
    heads = {_split(r)[0] for r in raw}
    assert len(heads) == 1, "every request carries the same headers: nothing identifies it"
    forbidden = [*USERS, *HISTORY, PLANTED, "Item 1", repr(VALUE), "4.25", "pro", "purchase"]
    for r in raw:
        head, body = _split(r)
        assert len(body) == MESSAGE_SIZE
        report = decode_report(body, k=K)  # strict: exactly the allowed schema
        assert report.epoch in {epoch_of(clock.now - 7 * 86400), epoch_of(clock.now)}
        for word in forbidden:
            assert word.encode() not in r
        assert b"cookie" not in head.lower() and b"user-agent" not in head.lower()
    # Two reports of one profile differ at most in the epoch and the segment.
    for engine in engines:
        for user in USERS:
            bodies = [e["body"] for e in engine.export_profile(user)["users"][0]["egress"]]
            assert len(bodies) == 2
            a, b = (json.loads(x) for x in bodies)
            assert set(a) == set(b) == {"version", "epoch", "segment"}
    # What the egress logs say left is exactly what the server received.
    logged = sorted(
        e["body"].encode()
        for engine in engines
        for user in USERS
        for e in engine.export_profile(user)["users"][0]["egress"]
    )
    assert logged == sorted(_split(r)[1] for r in raw)


def test_one_report_per_epoch(open_engine, server):
    engine = open_engine("segment", sync=_now(server_url=server.url))
    _record(engine, "u")
    first = engine.sync("u")
    again = engine.sync("u")
    assert first.status == "sent" and again.status == "already_sent"
    assert again.body == first.body
    assert len(_reports(server)) == 1


def test_a_year_of_weekly_reports_spends_one_memo_on_the_real_server(open_engine, server, clock):
    settings = _now(server_url=server.url, lifetime_cap=math.log(3))
    engine = open_engine("segment", sync=settings)
    _record(engine, "u")
    for _ in range(52):
        outcome = engine.sync("u")
        assert outcome.status == "sent", outcome
        clock.advance(days=7)
    assert len(_reports(server)) == 52
    budget = engine.report("u").users[0].privacy_budget
    assert budget["lifetime_spent"] == pytest.approx(math.log(3))  # one memo, 52 reports
    assert budget["memos"] == 1
    egress = engine.export_profile("u")["users"][0]["egress"]
    assert [e["epsilon"] for e in egress].count(0.0) == 51


def test_level_none_sends_nothing(open_engine, server):
    engine = open_engine("none", sync=_now(server_url=server.url))
    _record(engine, "u")
    outcome = engine.sync("u")
    assert outcome.status == "skipped" and outcome.body is None
    assert server.captured_requests() == []


def test_offline_sync_fails_softly_and_resends_the_same_bytes_later(
    open_engine, server, clock, tmp_path
):
    url = server.url
    server.close()  # the network is gone
    engine = open_engine("behavioral", sync=_now(server_url=url, timeout=2.0))
    _record(engine, "u")
    failed = engine.sync("u")
    assert failed.status == "failed" and failed.retry_at is not None
    assert engine.get_recommendations("u", k=1).item_ids == [PLANTED]  # unaffected
    assert engine.sync("u").status == "waiting"
    host, port = url.removeprefix("http://").split(":")
    revived = SyncServer(
        config=ServerConfig(
            k=K,
            db_path=tmp_path / "again.db",
            host=host,
            port=int(port),
            capture_raw=True,
            k_threshold=1,
        ),
        clock=clock,
    ).start()
    try:
        clock.now = failed.retry_at + 1
        sent = engine.sync("u")
        assert sent.status == "sent" and sent.body == failed.body  # no new draw
        assert [_split(r)[1].decode() for r in _reports(revived)] == [failed.body]
    finally:
        revived.close()


def test_featured_content_is_one_table_and_blends_into_the_true_segment(open_engine, server):
    engine = open_engine("segment", sync=_now(server_url=server.url))
    _record(engine, "u")
    before = engine.get_recommendations("u", k=3)
    assert engine.fetch_featured() == 2
    after = engine.get_recommendations("u", k=3)
    assert after.level is PrivacyLevel.SEGMENT
    assert after[0].item_id == "i19" and after[0].explanation.startswith("featured")
    assert after.item_ids[1:] == before.item_ids[:2]
    content = [r for r in server.captured_requests() if r.startswith(b"GET ")]
    assert len(content) == 1 and b"\r\n\r\n" in content[0]
    assert _split(content[0])[1] == b""  # a GET with no body: nothing about the device


def test_sync_without_settings_is_a_clear_error(open_engine):
    engine = open_engine("segment")
    with pytest.raises(SyncError, match="not configured"):
        engine.sync("u")


def test_report_bodies_are_logged_before_sending(open_engine):
    """A server that never answers: the report is in the egress log all the same."""
    engine = open_engine("segment", sync=_now(server_url="http://127.0.0.1:9", timeout=0.5))
    _record(engine, "u")
    outcome = engine.sync("u")
    assert outcome.status == "failed"
    (entry,) = engine.export_profile("u")["users"][0]["egress"]
    assert entry["body"] == outcome.body and entry["status"] == "failed"


def test_forgetting_a_user_does_not_reset_the_weekly_report_or_the_budget(open_engine, server):
    engine = open_engine("segment", sync=_now(server_url=server.url))
    _record(engine, "u")
    assert engine.sync("u").status == "sent"
    engine.wipe_profile("u")
    _record(engine, "u")
    assert engine.sync("u").status == "already_sent"
    engine.set_privacy_level("none")
    engine.set_privacy_level("segment")
    _record(engine, "u")
    assert engine.sync("u").status == "already_sent"
    assert len(_reports(server)) == 1
    budget = engine.report("u").users[0].privacy_budget
    assert budget["lifetime_spent"] == pytest.approx(math.log(3))


def test_a_report_in_flight_is_not_sent_twice(open_engine, server):
    """A second sync() while the first is still sending waits for it."""
    from ondevice_sync.client import HttpTransport

    seen: list[str] = []

    class Reentrant(HttpTransport):
        def request(self, method, url, headers, body, timeout):
            if method == "POST" and not seen:
                seen.append(engine.sync("u").status)  # the app syncs again, meanwhile
            return super().request(method, url, headers, body, timeout)

    engine = open_engine("segment", sync=_now(server_url=server.url, transport=Reentrant()))
    _record(engine, "u")
    assert engine.sync("u").status == "sent"
    assert seen == ["waiting"]
    assert len(_reports(server)) == 1


def test_settings_that_cannot_hold_are_refused():
    from ondevice import InvalidInputError

    with pytest.raises(InvalidInputError, match="lifetime_cap"):
        SyncSettings(server_url="http://127.0.0.1:1", epsilon_inf=2.0, lifetime_cap=1.0)
    with pytest.raises(InvalidInputError, match="when_spent"):
        SyncSettings(server_url="http://127.0.0.1:1", when_spent="resend")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="min_gap"):
        SyncSettings(server_url="http://127.0.0.1:1", min_gap=-1)


def test_reports_of_several_users_leave_spaced_on_separate_connections(
    open_engine, server, clock
):
    gap = 1800.0
    engine = open_engine("segment", sync=_now(server_url=server.url, min_gap=gap))
    for user in USERS:
        _record(engine, user)
    sent_at: list[float] = []
    for _ in range(3 * 24 * 12):  # a timer every 5 minutes for up to three days
        sent_at += [clock.now for o in engine.sync_due() if o.status == "sent"]
        if len(sent_at) == len(USERS):
            break
        clock.advance(seconds=300)
    assert len(sent_at) == len(USERS) == len(_reports(server))
    assert all(b - a >= gap for a, b in itertools.pairwise(sent_at))
    assert all(b"Connection: close" in _split(r)[0] for r in _reports(server))


def test_an_export_with_a_forged_egress_entry_is_refused(open_engine, server):
    from ondevice import ExportError

    engine = open_engine("segment", sync=_now(server_url=server.url))
    _record(engine, "u")
    engine.sync("u")
    export = engine.export_profile()
    forged = json.loads(json.dumps(export))
    forged["users"][0]["egress"][0]["epsilon"] = -50.0
    with pytest.raises(ExportError):
        engine.import_profile(forged)
    forged = json.loads(json.dumps(export))
    forged["users"][0]["egress"][0]["epoch"] = "2020-W01"
    with pytest.raises(ExportError):
        engine.import_profile(forged)


def test_budget_spent_before_the_ledger_existed_stays_spent(tmp_path, clock):
    """A schema-3 profile (egress log, no ledger) migrates its spends into the ledger."""
    from ondevice import RawKey, _db
    from ondevice.store import Store

    path = tmp_path / "old"
    path.mkdir()
    key = bytes(range(32))
    RawKey(key).create(path)
    store = Store(_db.connect(path / "profile.db", key, busy_timeout=5))
    store.migrate(target=3)
    with store.write() as conn:
        Store.ensure_user(conn, "u", clock.now)
        body = b'{"version":1,"epoch":"' + epoch_of(clock.now).encode() + b'","segment":"01"}'
        conn.execute(  # the schema-3 egress log, as 0.1 wrote it
            "INSERT INTO egress(user_id, epoch, body, epsilon, created_at, status, sent_at) "
            "VALUES ('u', ?, ?, 1.0, ?, 'sent', ?)",
            (epoch_of(clock.now), body, clock.now, clock.now),
        )
    store.close()
    from ondevice.sample import SAMPLE_BUNDLE, SAMPLE_PUBLIC_KEY

    engine = PersonalizationEngine(
        path,
        key=RawKey(key),
        clock=clock,
        sync=_now(server_url="http://127.0.0.1:9"),
        bundle=SAMPLE_BUNDLE,
        bundle_public_key=SAMPLE_PUBLIC_KEY,
    )
    assert engine.report("u").users[0].privacy_budget["lifetime_spent"] == pytest.approx(1.0)
    assert engine.sync("u").status == "already_sent"
    engine.close()


def test_a_device_on_another_channel_than_the_server_is_told_so(open_engine, server):
    engine = open_engine("segment", sync=_now(server_url=server.url, epsilon_1=1.0))
    _record(engine, "u")
    with pytest.raises(SyncError, match="align SyncSettings"):
        engine.fetch_featured()
    assert engine.get_recommendations("u", k=3)[0].explanation.startswith("popular")
