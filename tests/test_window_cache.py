"""The per-call write path: the window it keeps in memory must never disagree with the
file, and a recycled interaction rewrites one page.

The store remembers, per connection, each user's window order so that recording an
interaction needs no read-back. These tests attack that memory: another engine (another
connection) writing in between, a rolled-back transaction, the retention purge inside
the write, a schema upgrade. The expected window always comes from a model of the rule
("the newest ``window`` by timestamp, ties in arrival order; older than a full window is
refused"), never from the code under test.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondevice import PersonalizationEngine, RawKey
from ondevice.policy import Interaction
from ondevice.store import CACHED_WINDOWS, SCHEMA_VERSION, Store

from conftest import T0, Clock, demo_policy, write_old_profile

DAY = 86400.0


def window_of(engine: PersonalizationEngine, user: str) -> list[tuple[str, dict]]:
    users = engine.export_profile(user)["users"]
    if not users:
        return []
    return [(i["item_id"], i["context"]) for i in users[0]["interactions"]]


class WindowModel:
    """The window rule, written independently of the store."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: dict[str, list[tuple[float, int, str, dict]]] = {}
        self.arrivals = 0

    def add(self, user: str, item: str, ts: float, context: dict) -> None:
        rows = self.rows.setdefault(user, [])
        if len(rows) >= self.size and ts < rows[0][0]:
            return  # older than everything in a full window
        self.arrivals += 1
        rows.append((ts, self.arrivals, item, context))
        rows.sort(key=lambda r: (r[0], r[1]))
        del rows[: max(0, len(rows) - self.size)]

    def wipe(self, user: str) -> None:
        self.rows.pop(user, None)

    def window(self, user: str) -> list[tuple[str, dict]]:
        return [(item, ctx) for _, _, item, ctx in self.rows.get(user, [])]


def assert_bound_holds(engine: PersonalizationEngine) -> None:
    """The stored timestamp bound, which lets the retention pass skip its scan, must
    stay at or below every stored timestamp."""
    with engine._store.read() as conn:
        bound = Store.oldest_bound(conn)
        (low,) = conn.execute("SELECT min(ts) FROM interactions").fetchone()
    assert bound is None or low is None or bound <= low


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(0, 1),  # which engine
            st.sampled_from(["u1", "u2"]),
            st.integers(0, 12),  # timestamp offset: small, so ties and backfills happen
            st.booleans(),  # with context
        ),
        st.tuples(
            st.just("batch"),  # two interactions of one user in one call
            st.integers(0, 1),
            st.sampled_from(["u1", "u2"]),
            st.integers(0, 12),
            st.integers(0, 12),
        ),
        st.tuples(st.just("wipe"), st.integers(0, 1), st.sampled_from(["u1", "u2"])),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_two_engines_interleaving_writes_keep_the_window_rule(ops):
    key = os.urandom(32)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p"
        opened = [
            PersonalizationEngine(
                path,
                key=RawKey(key),
                clock=clock,
                privacy_level="contextual",
                policy=demo_policy(window=3),
            )
            for _ in range(2)
        ]
        model = WindowModel(3)
        try:
            for n, op in enumerate(ops):
                if op[0] == "add":
                    _, which, user, offset, with_ctx = op
                    ctx = {"device": f"d{n}"} if with_ctx else {}
                    item = f"i{n}"
                    ts = T0 - 100 + offset
                    opened[which].update_profile(
                        user, {"item_id": item, "timestamp": ts, "context": ctx}
                    )
                    model.add(user, item, ts, ctx)
                elif op[0] == "batch":
                    _, which, user, first, second = op
                    pair = [(f"i{n}a", T0 - 100 + first), (f"i{n}b", T0 - 100 + second)]
                    opened[which].update_profile_many(
                        [(user, {"item_id": item, "timestamp": ts}) for item, ts in pair]
                    )
                    for item, ts in pair:
                        model.add(user, item, ts, {})
                else:
                    _, which, user = op
                    opened[which].wipe_profile(user)
                    model.wipe(user)
                for user in ("u1", "u2"):
                    # Both connections read what the rule says, whoever wrote last.
                    assert window_of(opened[n % 2], user) == model.window(user)
                assert_bound_holds(opened[n % 2])
        finally:
            for engine in opened:
                engine.close()


def test_an_engine_sees_rows_another_engine_recycled(make_engine):
    a = make_engine(policy=demo_policy(window=3))
    b = make_engine(policy=demo_policy(window=3))
    for n in range(3):
        a.update_profile("u", {"item_id": f"a{n}", "timestamp": T0 - 100 + n})
    # b overwrites a0's row with b0; a's memory of "a0 is the oldest" is now wrong.
    b.update_profile("u", {"item_id": "b0", "timestamp": T0 - 50})
    a.update_profile("u", {"item_id": "a3", "timestamp": T0 - 40})
    expected = [("a2", {}), ("b0", {}), ("a3", {})]
    assert window_of(a, "u") == expected
    assert window_of(b, "u") == expected


def test_a_rolled_back_write_leaves_nothing_in_the_remembered_window(make_engine):
    engine = make_engine(policy=demo_policy(window=3))
    for n in range(2):
        engine.update_profile("u", {"item_id": f"i{n}", "timestamp": T0 - 100 + n})
    store = engine._store
    with pytest.raises(RuntimeError), store.write(cached=True) as conn:
        phantom = Interaction("phantom", "view", T0 - 90, None, {})
        store.add_to_window(conn, "u", phantom, 3, keep_context=False)
        raise RuntimeError("the host app failed half-way")
    # Remembering the phantom would make the window look full and recycle i0.
    engine.update_profile("u", {"item_id": "i2", "timestamp": T0 - 80})
    assert window_of(engine, "u") == [("i0", {}), ("i1", {}), ("i2", {})]


def test_the_retention_purge_inside_a_write_is_not_undone_by_the_remembered_window(
    make_engine, clock
):
    engine = make_engine(policy=demo_policy(window=4))
    for name, age in (("old", 1000), ("b", 10), ("c", 5)):
        engine.update_profile("u", {"item_id": name, "timestamp": T0 - age})
    clock.advance(days=90, seconds=-500)  # "old" is now past the 90-day retention
    engine.update_profile("u", {"item_id": "d", "timestamp": clock.now})
    # That write's purge deleted "old": the window holds b, c, d and is not full, so
    # the next interaction is inserted, not written over the deleted row.
    engine.update_profile("u", {"item_id": "e", "timestamp": clock.now + 1})
    assert [i for i, _ in window_of(engine, "u")] == ["b", "c", "d", "e"]


def test_recycled_context_is_dropped_and_new_context_kept(make_engine):
    engine = make_engine(privacy_level="contextual", policy=demo_policy(window=2))
    engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 30, "context": {"device": "x"}})
    engine.update_profile("u", {"item_id": "b", "timestamp": T0 - 20})
    engine.update_profile("u", {"item_id": "c", "timestamp": T0 - 10})  # overwrites a's row
    engine.update_profile("u", {"item_id": "d", "timestamp": T0, "context": {"device": "y"}})
    assert window_of(engine, "u") == [("c", {}), ("d", {"device": "y"})]
    with engine._store.read() as conn:
        (contexts,) = conn.execute("SELECT count(*) FROM context").fetchone()
    assert contexts == 1  # a's context went with its row


def wal_frames(profile: Path) -> int:
    """Frames in the WAL (SQLCipher's page size is 4096; each frame has a 24-byte
    header and the file a 32-byte header)."""
    size = (profile / "profile.db-wal").stat().st_size
    return 0 if size == 0 else (size - 32) // (4096 + 24)


def test_recording_into_a_full_window_rewrites_one_page_per_call(make_engine, profile_dir):
    engine = make_engine(policy=demo_policy(window=100))
    for n in range(100):
        engine.update_profile("u", {"item_id": f"item-{n:05d}", "timestamp": T0 - 1000 + n})
    engine._store.checkpoint()  # empty the WAL
    assert wal_frames(profile_dir) == 0
    for n in range(100, 150):
        engine.update_profile("u", {"item_id": f"item-{n:05d}", "timestamp": T0 - 1000 + n})
    # One encrypted page per commit: the overwritten row's. No index page, no meta page.
    assert wal_frames(profile_dir) == 50
    window = [i for i, _ in window_of(engine, "u")]
    assert window == [f"item-{n:05d}" for n in range(50, 150)]


def test_a_version_4_profile_moves_to_the_user_index_and_keeps_its_window(tmp_path, raw_key):
    path = tmp_path / "p"
    write_old_profile(path, raw_key, 4, "u", [(f"i{n}", T0 - 100 + n) for n in range(3)])
    policy = demo_policy(window=3)
    with PersonalizationEngine(path, key=RawKey(raw_key), clock=lambda: T0, policy=policy) as e:
        assert e._store.schema_version() == SCHEMA_VERSION
        with e._store.read() as conn:
            indexes = {
                name
                for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' "
                    "AND tbl_name = 'interactions' AND sql IS NOT NULL"
                )
            }
        assert indexes == {"interactions_user"}
        e.update_profile("u", {"item_id": "i3", "timestamp": T0 - 10})
        assert [i for i, _ in window_of(e, "u")] == ["i1", "i2", "i3"]


def test_a_batch_between_single_calls_keeps_the_timestamp_bound_a_lower_bound(make_engine):
    engine = make_engine(policy=demo_policy(window=5))
    engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 50})
    # The batch path writes the bound itself (a backfill, older than everything).
    engine.update_profile_many(
        [
            ("u", {"item_id": "b", "timestamp": T0 - 90}),
            ("u", {"item_id": "c", "timestamp": T0 - 80}),
        ]
    )
    # A remembered bound from before the batch (T0 - 50) would be "lowered" to T0 - 70,
    # above b: the next retention pass could then skip b after it expired.
    engine.update_profile("u", {"item_id": "d", "timestamp": T0 - 70})
    assert_bound_holds(engine)
    assert [i for i, _ in window_of(engine, "u")] == ["b", "c", "d", "a"]


class InterruptingConnection:
    """The engine's real connection, except that one statement raises
    KeyboardInterrupt (as Ctrl-C can, between two statements) instead of running."""

    def __init__(self, conn: object, statement: str) -> None:
        self._conn = conn
        self._statement = statement

    def execute(self, sql: str, *args: object) -> object:
        if sql == self._statement:
            self._statement = ""  # once
            raise KeyboardInterrupt
        return self._conn.execute(sql, *args)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


@pytest.mark.parametrize("statement", ["PRAGMA data_version", "COMMIT"])
def test_an_interrupted_write_leaves_no_transaction_open(make_engine, statement):
    a = make_engine(policy=demo_policy(window=3))
    b = make_engine(policy=demo_policy(window=3), busy_timeout=0.5)
    a.update_profile("u", {"item_id": "first", "timestamp": T0 - 10})
    real = a._store._conn
    a._store._conn = InterruptingConnection(real, statement)
    with pytest.raises(KeyboardInterrupt):
        a.update_profile("u", {"item_id": "interrupted", "timestamp": T0 - 5})
    a._store._conn = real
    assert not real.in_transaction  # rolled back: the database's write lock is free
    b.update_profile("u", {"item_id": "other", "timestamp": T0 - 4})
    a.update_profile("u", {"item_id": "later", "timestamp": T0 - 3})
    assert [i for i, _ in window_of(a, "u")] == ["first", "other", "later"]


def test_the_remembered_windows_stay_bounded_and_right(make_engine):
    engine = make_engine(policy=demo_policy(window=2))
    users = [f"u{n}" for n in range(CACHED_WINDOWS + 40)]
    for step in range(3):
        for user in users:
            engine.update_profile(user, {"item_id": f"{user}-{step}", "timestamp": T0 - 9 + step})
    assert len(engine._store._cache.windows) <= CACHED_WINDOWS
    # The first users' windows were dropped and read again: still the newest two.
    for user in (users[0], users[-1]):
        assert [i for i, _ in window_of(engine, user)] == [f"{user}-1", f"{user}-2"]
