"""The reporting path on the device (ondevice/reporting.py): memos, the lifetime budget,
clock jumps, several local users and their schedule.

The transport here is a recorder that answers as the server does and notes what was
sent and when (the clock is the test's): the schedule is a property of the client.
The same paths run against the real server on loopback in test_sync_e2e.py.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from ondevice import PersonalizationEngine, PrivacyLevel, RawKey, SyncSettings
from ondevice.store import Store
from ondevice_sync.client import Response
from ondevice_sync.protocol import decode_report, epoch_of, epoch_start

from conftest import Clock

LN3 = math.log(3)
K = 3  # the planted catalog's segments
WEEK = 7 * 86400.0


class Recorder:
    """Answers every report with 200 and records ``(time, body)``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes]] = []
        self.lock = threading.Lock()

    def request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes, timeout: float
    ) -> Response:
        assert method == "POST" and url.endswith("/v1/report")
        with self.lock:
            self.sent.append((self.clock.now, body))
        return Response(200, {"content-type": "application/json"}, b'{"status":"counted"}')

    def segments(self) -> list[int]:
        return [decode_report(body, k=K).segment for _, body in self.sent]

    def epochs(self) -> list[str]:
        return [decode_report(body, k=K).epoch for _, body in self.sent]


def settings(recorder: Recorder, **overrides: object) -> SyncSettings:
    values: dict[str, object] = {
        "server_url": "http://sync.invalid",
        "transport": recorder,
        "schedule": False,
        "min_gap": 0.0,
        "rng": random.Random(20261129),
    }
    values.update(overrides)
    return SyncSettings(**values)  # type: ignore[arg-type]


def to_segment(engine: PersonalizationEngine, user: str, segment: int) -> None:
    """Put ``user`` in ``segment`` of the planted catalog: 1 by the plan rule, 0 by
    taste for cluster a, 2 by (more) taste for cluster c."""
    if segment == 1:
        engine.set_signals(user, {"plan": "pro"})
        return
    engine.set_signals(user, {"plan": "free"})
    cluster = 0 if segment == 0 else 20
    for n in range(10 if segment == 0 else 30):
        engine.update_profile(user, {"item_id": f"i{cluster + n % 10}", "event": "purchase"})


def ledger_rows(engine: PersonalizationEngine) -> list[tuple[object, ...]]:
    with engine._store.read() as conn:
        return conn.execute("SELECT * FROM budget_ledger ORDER BY created_at").fetchall()


def memo_rows(engine: PersonalizationEngine, user: str) -> list[dict[str, object]]:
    with engine._store.read() as conn:
        return Store.memos(conn, user)


# -- memos -----------------------------------------------------------------------------


def test_the_memo_is_drawn_once_per_true_segment_and_every_report_randomizes_it(
    open_engine, clock
):
    rec = Recorder(clock)
    # epsilon_1 = 20: a report is the memo itself (almost surely), so it shows the memo.
    engine = open_engine("segment", sync=settings(rec, epsilon_1=20.0))
    to_segment(engine, "u", 1)
    for _ in range(12):
        outcome = engine.sync("u")
        assert outcome.status == "sent"
        clock.advance(days=7)
    (memo,) = memo_rows(engine, "u")
    assert memo["segment"] == 1 and memo["k"] == K and memo["epsilon_inf"] == LN3
    assert set(rec.segments()) == {memo["memo"]}  # twelve weeks, one memo
    spends = [row[2] for row in ledger_rows(engine)]
    assert spends == [pytest.approx(LN3)] + [0.0] * 11  # only the draw spent
    budget = engine.report("u").users[0].privacy_budget
    assert budget["lifetime_spent"] == pytest.approx(LN3)
    assert budget["lifetime_remaining"] == pytest.approx(3 * LN3)
    assert budget["epsilon_inf"] == LN3 and budget["epsilon_1"] == 20.0
    assert budget["memos"] == 1 and budget["reports_in_period"] == 12


def test_reports_are_fresh_randomizations_not_the_memo_verbatim(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))  # default epsilon_1 = ln 9
    to_segment(engine, "u", 1)
    for _ in range(40):
        assert engine.sync("u").status == "sent"
        clock.advance(days=7)
    (memo,) = memo_rows(engine, "u")
    seen = rec.segments()
    # At K = 3 and ln 9 a report keeps the memo with p = 9/11: most, not all.
    assert 0.6 < seen.count(memo["memo"]) / len(seen) < 0.97
    assert len(set(seen)) > 1


def test_a_changed_segment_draws_a_new_memo_and_changing_back_reuses_the_old_one(
    open_engine, clock
):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 0)
    first = engine.sync("u")
    assert first.spent == pytest.approx(LN3) and first.reason == "new segment: drew its memo"
    clock.advance(days=7)
    to_segment(engine, "u", 1)
    second = engine.sync("u")
    assert second.status == "sent" and second.spent == pytest.approx(LN3)
    clock.advance(days=7)
    to_segment(engine, "u", 0)  # back to a segment that has a memo: nothing spent
    third = engine.sync("u")
    assert third.status == "sent" and third.spent == 0.0
    assert sorted(m["segment"] for m in memo_rows(engine, "u")) == [0, 1]
    budget = engine.report("u").users[0].privacy_budget
    assert budget["lifetime_spent"] == pytest.approx(2 * LN3)


@pytest.mark.parametrize("when_spent", ["repeat", "skip"])
def test_a_spent_lifetime_budget_repeats_the_last_memo_or_sends_nothing(
    open_engine, clock, when_spent
):
    rec = Recorder(clock)
    engine = open_engine(
        "segment",
        sync=settings(rec, lifetime_cap=LN3, epsilon_1=20.0, when_spent=when_spent),
    )
    to_segment(engine, "u", 0)
    assert engine.sync("u").status == "sent"
    (memo,) = memo_rows(engine, "u")
    clock.advance(days=7)
    to_segment(engine, "u", 1)  # a new segment, and no budget for its memo
    outcome = engine.sync("u")
    assert outcome.spent in (None, 0.0)
    assert "lifetime budget spent" in (outcome.reason or "")
    if when_spent == "repeat":
        assert outcome.status == "sent"
        assert rec.segments()[-1] == memo["memo"]  # the old memo, randomized again
        assert len(rec.sent) == 2
    else:
        assert outcome.status == "skipped" and outcome.body is None
        assert len(rec.sent) == 1
    assert len(memo_rows(engine, "u")) == 1  # no memo was drawn for segment 1
    assert engine.report("u").users[0].privacy_budget["when_spent"] == when_spent
    # A year of the reporting clock later the draw of last year leaves the budget.
    clock.advance(days=366)
    fresh = engine.sync("u")
    assert fresh.status == "sent" and fresh.spent == pytest.approx(LN3)
    assert sorted(m["segment"] for m in memo_rows(engine, "u")) == [0, 1]


# -- the clock -------------------------------------------------------------------------


def test_an_open_with_the_clock_a_year_ahead_resets_nothing(open_engine, clock, tmp_path):
    rec = Recorder(clock)
    path = tmp_path / "p"
    engine = open_engine("segment", path=path, sync=settings(rec))
    to_segment(engine, "u", 1)
    assert engine.sync("u").status == "sent"
    ledger, memos = ledger_rows(engine), memo_rows(engine, "u")
    egress = engine.export_profile("u")["users"][0]["egress"]
    engine.close()

    today = clock.now
    clock.now = today + 400 * 86400  # the machine's clock jumps a year ahead
    ahead = open_engine("segment", path=path, sync=settings(rec))
    ahead.update_profile("u", {"item_id": "i3", "event": "view"})
    ahead.get_recommendations("u", k=3)
    ahead.purge_expired()
    assert ledger_rows(ahead) == ledger  # not purged by the open nor the retention pass
    assert memo_rows(ahead, "u") == memos
    assert ahead.export_profile("u")["users"][0]["egress"] == egress
    ahead.close()

    clock.now = today + 3600  # and back
    back = open_engine("segment", path=path, sync=settings(rec))
    to_segment(back, "u", 1)
    again = back.sync("u")
    assert again.status == "already_sent"
    assert len(rec.sent) == 1
    assert ledger_rows(back) == ledger and memo_rows(back, "u") == memos


def test_a_sync_under_a_clock_ahead_never_lets_an_earlier_week_out_again(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 1)
    today = clock.now
    assert engine.sync("u").status == "sent"
    clock.now = today + 365 * 86400
    ahead = engine.sync("u")  # a report for the future week goes out (its week)
    assert ahead.status == "sent" and ahead.epoch == epoch_of(clock.now)
    clock.now = today + 86400  # back to the real time: the same week as the first report
    back = engine.sync("u")
    assert back.status == "already_sent"
    clock.now = today + 30 * 86400  # a later real week, still before the clock mark
    later = engine.sync("u")
    assert later.status == "already_sent"  # the reporting clock never goes back
    assert rec.epochs() == [epoch_of(today), epoch_of(today + 365 * 86400)]
    (memo,) = memo_rows(engine, "u")  # the segment kept its one memo throughout
    assert memo["segment"] == 1


def test_the_clock_set_back_a_week_sends_nothing(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 1)
    clock.advance(days=7)
    assert engine.sync("u").status == "sent"
    clock.advance(days=-7)
    outcome = engine.sync("u")
    assert outcome.status == "already_sent"
    assert len(rec.sent) == 1


def test_forgetting_the_user_or_toggling_the_level_keeps_the_ledger(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 1)
    assert engine.sync("u").status == "sent"
    ledger = ledger_rows(engine)
    assert engine.wipe_profile("u")
    assert memo_rows(engine, "u") == []  # the memo was the user's: it goes
    to_segment(engine, "u", 1)
    assert engine.sync("u").status == "already_sent"
    engine.set_privacy_level("none")
    assert memo_rows(engine, "u") == [] and ledger_rows(engine) == ledger
    engine.set_privacy_level("segment")
    to_segment(engine, "u", 1)
    assert engine.sync("u").status == "already_sent"
    assert len(rec.sent) == 1 and ledger_rows(engine) == ledger
    # Next week the memo is drawn again, and the ledger has counted both draws.
    clock.advance(days=7)
    assert engine.sync("u").spent == pytest.approx(LN3)
    budget = engine.report("u").users[0].privacy_budget
    assert budget["lifetime_spent"] == pytest.approx(2 * LN3)


def test_two_engines_racing_send_one_report_per_epoch(open_engine, clock, tmp_path):
    rec = Recorder(clock)
    path = tmp_path / "shared"
    first = open_engine("segment", path=path, sync=settings(rec, rng=None))
    second = open_engine("segment", path=path, sync=settings(rec, rng=None))
    to_segment(first, "u", 1)
    for _ in range(10):
        barrier = threading.Barrier(2)
        results: list[str] = []

        def run(
            engine: PersonalizationEngine, barrier: threading.Barrier, results: list[str]
        ) -> None:
            barrier.wait()
            results.append(engine.sync("u").status)

        threads = [
            threading.Thread(target=run, args=(e, barrier, results)) for e in (first, second)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) in (["already_sent", "sent"], ["sent", "waiting"])
        clock.advance(days=7)
    epochs = rec.epochs()
    assert len(epochs) == 10 and len(set(epochs)) == 10
    assert len(memo_rows(first, "u")) == 1


# -- the schedule ----------------------------------------------------------------------


def test_the_weeks_report_waits_for_its_random_moment(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec, schedule=True))
    to_segment(engine, "u", 1)
    week_end = epoch_start(epoch_of(clock.now)) + WEEK
    first = engine.sync("u")
    assert first.status == "scheduled" and rec.sent == []
    assert first.retry_at is not None and clock.now <= first.retry_at < week_end
    again = engine.sync("u")
    assert again.status == "scheduled" and again.retry_at == first.retry_at  # drawn once
    clock.now = first.retry_at - 1
    assert engine.sync("u").status == "scheduled"
    clock.now = first.retry_at
    assert engine.sync("u").status == "sent"
    assert rec.sent[0][0] == first.retry_at


def test_due_moments_are_independent_between_users_and_weeks(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec, schedule=True, rng=random.Random(5)))
    for user in ("a", "b"):
        to_segment(engine, user, 1)
    offsets: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(60):
        start = clock.now = epoch_start(epoch_of(clock.now))  # the week's first sync
        dues = []
        for user in offsets:
            due = engine.sync(user).retry_at
            assert due is not None
            offsets[user].append((due - start) / WEEK)
            dues.append(due)
        clock.now = max(dues)  # both leave at their moments
        assert {engine.sync(user).status for user in offsets} <= {"sent", "already_sent"}
        clock.now = start + WEEK
    for user, values in offsets.items():
        assert min(values) < 0.15 and max(values) > 0.85, user  # spread over the week
        assert 0.35 < sum(values) / len(values) < 0.65, user
    a, b = offsets["a"], offsets["b"]
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True)) / len(a)
    sd = math.sqrt(
        sum((x - mean_a) ** 2 for x in a) / len(a) * sum((y - mean_b) ** 2 for y in b) / len(b)
    )
    assert abs(cov / sd) < 0.35  # 60 pairs: independent draws stay well inside this


def test_several_local_users_never_report_back_to_back(open_engine, clock):
    rec = Recorder(clock)
    gap = 3600.0
    engine = open_engine(
        "segment", sync=settings(rec, schedule=False, min_gap=gap, rng=random.Random(9))
    )
    users = ["alice", "bob", "carol", "dave"]
    for user in users:
        to_segment(engine, user, 1)
    start = epoch_start(epoch_of(clock.now)) + 3600
    clock.now = start
    first = engine.sync_due()  # everyone is due at once
    assert [o.status for o in first].count("sent") == 1
    assert {o.status for o in first} == {"sent", "scheduled"}
    for outcome in first:
        if outcome.status == "scheduled":
            assert outcome.retry_at is not None and outcome.retry_at >= start + gap
    while clock.now < start + 2 * 86400 and len(rec.sent) < len(users):
        clock.advance(seconds=300)  # the host app's timer
        engine.sync_due()
    times = sorted(t for t, _ in rec.sent)
    assert len(times) == len(users)
    assert all(b - a >= gap for a, b in itertools.pairwise(times))
    assert all(b - a <= 2 * gap + 300 for a, b in itertools.pairwise(times))


# -- transparency ----------------------------------------------------------------------


def test_the_export_shows_memos_and_both_epsilons_and_an_import_does_not_take_memos(
    open_engine, clock
):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 1)
    engine.sync("u")
    user = engine.export_profile("u")["users"][0]
    (memo,) = user["report_memos"]
    assert set(memo) == {"k", "epsilon_inf", "segment", "memo", "created_at", "used_at"}
    (entry,) = user["egress"]
    assert entry["epsilon"] == pytest.approx(LN3) and entry["epsilon_1"] == pytest.approx(2 * LN3)
    assert user["privacy_budget"]["lifetime_remaining"] == pytest.approx(3 * LN3)

    other = open_engine("segment", sync=settings(Recorder(clock)))
    forged = json.loads(json.dumps(engine.export_profile("u")))
    forged["users"][0]["report_memos"][0]["memo"] = 1  # a memo equal to the truth
    other.import_profile(forged)
    assert memo_rows(other, "u") == []  # memos are never taken from a file
    # The imported log still holds the week, and its spend counts.
    assert other.sync("u").status == "already_sent"
    assert other.report("u").users[0].privacy_budget["lifetime_spent"] == pytest.approx(LN3)


def test_an_imported_report_dated_in_the_future_is_refused(open_engine, clock):
    from ondevice import ExportError

    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 1)
    engine.sync("u")
    forged = json.loads(json.dumps(engine.export_profile("u")))
    forged["users"][0]["egress"][0]["created_at"] = 1e300
    with pytest.raises(ExportError, match=r"egress entry's time is not a time up to now"):
        engine.import_profile(forged)


def test_a_v5_profile_migrates_with_its_reporting_clock_and_spends(tmp_path: Path, clock):
    from ondevice import _db

    path = tmp_path / "old"
    path.mkdir()
    key = bytes(range(32))
    RawKey(key).create(path)
    store = Store(_db.connect(path / "profile.db", key, busy_timeout=5))
    store.migrate(target=5)
    epoch = epoch_of(clock.now)
    with store.write() as conn:
        Store.ensure_user(conn, "u", clock.now)
        body = b'{"version":1,"epoch":"' + epoch.encode() + b'","segment":"01"}'
        conn.execute(
            "INSERT INTO egress(user_id, epoch, body, epsilon, created_at, status) "
            "VALUES ('u', ?, ?, ?, ?, 'sent')",
            (epoch, body, LN3, clock.now),
        )
        Store.spend(conn, Store.ledger_tag(conn, "u"), epoch, LN3, clock.now)
        last_week = epoch_of(clock.now - WEEK)
        conn.execute(  # 0.1 kept the server's words in `answer`, and retried v1 bytes
            "INSERT INTO egress(user_id, epoch, body, epsilon, created_at, status, answer, "
            "next_attempt) VALUES ('u', ?, ?, ?, ?, 'failed', ?, ?)",
            (last_week, body.replace(epoch.encode(), last_week.encode()), LN3,
             clock.now - WEEK, "400 bad_epoch: words the server chose", clock.now),
        )
    store.close()
    store = Store(_db.connect(path / "profile.db", key, busy_timeout=5))
    store.migrate()
    with store.read() as conn:
        assert Store.report_clock(conn) == clock.now
        old, new = Store.egress(conn, "u")
        assert old["epoch"] == epoch_of(clock.now - WEEK) and new["epoch"] == epoch
        assert new["epsilon_1"] is None  # a single-layer report of 0.1
        # A v1 report can never be delivered now: final, with only its status code.
        assert old["status"] == "unsent" and old["answer"] == "400"
        assert old["next_attempt"] is None
    store.close()


# -- what an adversarial review broke (each fails on the first version of this module) --


class Failing(Recorder):
    """Fails every report with ``error`` while ``failing`` is set."""

    def __init__(self, clock: Clock, error: BaseException) -> None:
        super().__init__(clock)
        self.error = error
        self.failing = True

    def request(self, method, url, headers, body, timeout):  # type: ignore[no-untyped-def]
        if self.failing:
            raise self.error
        return super().request(method, url, headers, body, timeout)


def test_restoring_an_export_never_sends_a_week_again(open_engine, clock, tmp_path):
    from ondevice_sync.errors import TransportError

    transport = Failing(clock, TransportError("offline", maybe_delivered=False))
    engine = open_engine("segment", sync=settings(transport))
    to_segment(engine, "u", 1)
    failed = engine.sync("u")
    assert failed.status == "failed"
    backup = engine.export_profile("u")  # the app backs the user up: the row is "failed"
    transport.failing = False
    clock.now = failed.retry_at + 1
    assert engine.sync("u").status == "sent"
    for _ in range(3):  # restore the backup, again and again
        engine.import_profile(backup)
        assert engine.sync("u").status == "already_sent"
    forged = json.loads(json.dumps(backup))  # "failed", with another segment
    forged["users"][0]["egress"][0]["body"] = forged["users"][0]["egress"][0]["body"].replace(
        '"segment":"0', '"segment":"9'
    )
    engine.import_profile(forged)
    assert engine.sync("u").status == "already_sent"
    other = open_engine("segment", sync=settings(transport))  # another profile imports it
    other.import_profile(backup)
    assert other.sync("u").status == "already_sent"
    assert len(transport.sent) == 1
    (entry,) = other.export_profile("u")["users"][0]["egress"]
    assert entry["status"] == "unsent"


def test_a_send_outliving_its_lease_is_not_taken_over_by_another_engine(
    open_engine, clock, tmp_path
):
    path = tmp_path / "shared"
    seen: list[str] = []

    class Slow(Recorder):
        def request(self, method, url, headers, body, timeout):  # type: ignore[no-untyped-def]
            self.clock.advance(seconds=3600)  # the laptop slept in the middle of the send
            if not seen:
                seen.append(second.sync("u").status)  # another engine syncs meanwhile
            return super().request(method, url, headers, body, timeout)

    slow = Slow(clock)
    first = open_engine("segment", path=path, sync=settings(slow))
    second = open_engine("segment", path=path, sync=settings(Recorder(clock)))
    to_segment(first, "u", 1)
    assert first.sync("u").status == "sent"
    assert seen == ["waiting"]
    assert len(slow.sent) == 1


def test_any_exception_from_a_host_transport_is_a_failed_send_retried_with_the_same_bytes(
    open_engine, clock
):
    transport = Failing(clock, RuntimeError("secret detail from the app"))
    engine = open_engine("segment", sync=settings(transport))
    to_segment(engine, "u", 1)
    failed = engine.sync("u")
    assert failed.status == "failed" and failed.answer == "RuntimeError"
    (entry,) = engine.export_profile("u")["users"][0]["egress"]
    assert entry["answer"] == "RuntimeError" and "secret" not in json.dumps(entry)
    transport.failing = False
    clock.now = failed.retry_at + 1
    sent = engine.sync("u")
    assert sent.status == "sent" and sent.body == failed.body


def test_settings_a_send_could_not_honour_are_refused():
    from ondevice import InvalidInputError

    with pytest.raises(InvalidInputError, match="timeout"):
        SyncSettings(server_url="http://x.invalid", timeout=1e10)
    with pytest.raises(InvalidInputError, match="request"):
        SyncSettings(server_url="http://x.invalid", transport=object())


def test_one_users_error_does_not_stop_sync_due_for_the_others(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    for user in ("a", "b"):
        to_segment(engine, user, 1)
    with engine._store.write() as conn:  # a report logged under another K, pending
        conn.execute(
            "INSERT INTO egress(user_id, epoch, body, epsilon, created_at, status) "
            "VALUES ('a', ?, ?, 0.0, ?, 'pending')",
            (epoch_of(clock.now), b'{"version":2,"epoch":"' + epoch_of(clock.now).encode()
             + b'","segment":"09"}', clock.now - 3600),
        )
    outcomes = {o.user_id: o for o in engine.sync_due()}
    assert outcomes["a"].status == "error" and "segment" in (outcomes["a"].reason or "")
    assert outcomes["b"].status == "sent"


@pytest.mark.parametrize("how", ["wipe_profile", "level", "import"])
def test_the_weeks_moment_is_never_drawn_again(open_engine, clock, how):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec, schedule=True))
    to_segment(engine, "u", 1)
    first = engine.sync("u")
    assert first.status == "scheduled"
    backup = engine.export_profile("u")
    if how == "wipe_profile":
        engine.wipe_profile("u")
    elif how == "level":
        engine.set_privacy_level("none")
        engine.set_privacy_level("segment")
    else:
        engine.import_profile(backup)
    to_segment(engine, "u", 1)
    again = engine.sync("u")
    assert again.status == "scheduled" and again.retry_at == first.retry_at


def test_an_imported_report_whose_week_and_time_differ_is_refused(open_engine, clock):
    from ondevice import ExportError

    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 1)
    engine.sync("u")
    forged = json.loads(json.dumps(engine.export_profile("u")))
    entry = forged["users"][0]["egress"][0]
    entry["body"] = entry["body"].replace(entry["epoch"], "2099-W01")
    entry["epoch"] = "2099-W01"
    with pytest.raises(ExportError, match="week and time differ"):
        engine.import_profile(forged)


def test_a_report_pushed_past_its_weeks_end_leaves_next_week_with_its_own_week(
    open_engine, clock
):
    rec = Recorder(clock)
    gap = 3600.0
    engine = open_engine("segment", sync=settings(rec, min_gap=gap, rng=random.Random(3)))
    for user in ("a", "b"):
        to_segment(engine, user, 1)
    week = epoch_of(clock.now)
    end = epoch_start(week) + WEEK
    clock.now = end - 600  # ten minutes before the week ends, both are due
    outcomes = engine.sync_due()
    assert sorted(o.status for o in outcomes) == ["scheduled", "sent"]
    late = next(o for o in outcomes if o.status == "scheduled")
    assert late.retry_at is not None and late.retry_at > end  # pushed past the end
    clock.now = late.retry_at
    assert engine.sync(late.user_id).status == "sent"
    assert rec.epochs() == [week, week]  # labelled with the week it belongs to
    assert rec.sent[1][0] - rec.sent[0][0] >= gap
    nxt = engine.sync(late.user_id)  # and then this week's report is scheduled as usual
    assert nxt.status == "scheduled" and nxt.epoch == epoch_of(clock.now) != week


def test_a_damaged_memo_or_clock_is_a_clear_error_and_other_users_are_served(
    open_engine, clock
):
    from ondevice import ProfileError

    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    for user in ("a", "b"):
        to_segment(engine, user, 1)
    engine.sync("a")
    clock.advance(days=7)
    with engine._store.write() as conn:  # only code holding the key could do this
        conn.execute("UPDATE report_memos SET memo = 'x' WHERE user_id = 'a'")
    with pytest.raises(ProfileError, match="damaged memo"):
        engine.sync("a")
    outcomes = {o.user_id: o for o in engine.sync_due()}
    assert outcomes["a"].status == "error" and outcomes["b"].status == "sent"
    with engine._store.write() as conn:
        conn.execute("UPDATE meta SET value = 'yesterday' WHERE key = 'report_clock'")
    with pytest.raises(ProfileError, match="damaged reporting clock"):
        engine.report("a")


def test_an_open_with_a_clock_far_ahead_does_not_redraw_the_weeks_moment(
    open_engine, clock, tmp_path
):
    rec = Recorder(clock)
    path = tmp_path / "p"
    engine = open_engine("segment", path=path, sync=settings(rec, schedule=True))
    to_segment(engine, "u", 1)
    first = engine.sync("u")  # draws this week's moment and sets the reporting clock
    assert first.status == "scheduled"
    engine.close()
    today = clock.now
    clock.now = today + 40 * 86400  # an open (and its retention pass) far ahead
    open_engine("segment", path=path, sync=settings(rec, schedule=True)).purge_expired()
    clock.now = today + 60
    again = open_engine("segment", path=path, sync=settings(rec, schedule=True)).sync("u")
    assert again.status == "scheduled" and again.retry_at == first.retry_at


def test_every_piece_of_reporting_state_is_declared_with_its_purpose(open_engine, clock):
    rec = Recorder(clock)
    engine = open_engine("segment", sync=settings(rec))
    to_segment(engine, "u", 1)
    engine.sync("u")
    with engine._store.read() as conn:
        meta = {k for (k,) in conn.execute("SELECT key FROM meta")}
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"report_clock", "last_report_at"} <= meta
    declared = {f.name.split(".")[0] for f in engine.policy.purposes()}
    assert {"report_clock", "report_memos", "report_schedule", "budget_ledger",
            "egress"} <= declared
    assert {"report_memos", "report_schedule", "budget_ledger", "egress"} <= tables
    none = {f.name for f in engine.policy.purposes() if f.collected_at(PrivacyLevel.NONE)}
    assert {"report_clock.times", "budget_ledger.spend", "report_schedule.due_at"} <= none
