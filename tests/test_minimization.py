"""Declared purposes, the rolling window, retention and the privacy level's cap."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ondevice import (
    Interaction,
    InvalidInputError,
    OndeviceError,
    PersonalizationEngine,
    PolicyViolationError,
    PrivacyLevel,
    ValidationError,
)
from ondevice.store import Store

from conftest import T0, demo_policy
from sqlcipher_pages import plaintext_of_profile


def rows(engine: PersonalizationEngine) -> dict[str, int]:
    with engine._store.read() as conn:
        return Store.count_rows(conn)


# -- validation: refused input writes nothing -----------------------------------------


@pytest.mark.parametrize(
    "interaction, error",
    [
        ({"item_id": "a", "colour": "red"}, PolicyViolationError),
        ({"item_id": "a", "context": {"gps": "52.1,4.3"}}, PolicyViolationError),
        ({"item_id": "a", "event": "stare"}, PolicyViolationError),
        ({"item_id": 42}, InvalidInputError),
        ({"item_id": ""}, InvalidInputError),
        ({"item_id": "x" * 257}, InvalidInputError),
        ({"item_id": "a\x00b"}, InvalidInputError),
        ({"item_id": "a", "value": math.nan}, InvalidInputError),
        ({"item_id": "a", "value": math.inf}, InvalidInputError),
        ({"item_id": "a", "value": True}, InvalidInputError),
        ({"item_id": "a", "timestamp": T0 + 86400}, InvalidInputError),
        ({"item_id": "a", "timestamp": 1_795_780_800_000}, InvalidInputError),  # ms
        ({"item_id": "a", "timestamp": "yesterday"}, InvalidInputError),
        ({"item_id": "a", "context": {"daypart": "noon"}}, InvalidInputError),
        ({"event": "view"}, InvalidInputError),
        ("item-a", InvalidInputError),
    ],
)
def test_bad_interaction_is_refused_and_nothing_is_written(make_engine, interaction, error):
    engine = make_engine(privacy_level="contextual")
    engine.update_profile("u", {"item_id": "ok", "timestamp": T0 - 10})
    before = rows(engine)
    with pytest.raises(error):
        engine.update_profile("u", interaction)
    assert rows(engine) == before


def test_bad_record_in_a_batch_refuses_the_whole_batch(make_engine):
    engine = make_engine()
    good = [("u", {"item_id": f"i{n}", "timestamp": T0 - n}) for n in range(50)]
    with pytest.raises(PolicyViolationError):
        engine.update_profile_many([*good, ("u", {"item_id": "x", "secret": 1})])
    assert rows(engine)["interactions"] == 0
    assert rows(engine)["activity"] == 0


def test_undeclared_signal_is_refused(make_engine):
    engine = make_engine(privacy_level="segment")
    with pytest.raises(PolicyViolationError, match="not declared"):
        engine.set_signals("u", {"plan": "pro", "salary": 100_000})
    with pytest.raises(InvalidInputError):
        engine.set_signals("u", {"plan": "platinum"})
    assert rows(engine)["signals"] == 0 and rows(engine)["users"] == 0


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.binary(max_size=10),
)
_malformed = st.dictionaries(
    st.sampled_from(["item_id", "event", "timestamp", "value", "context", "extra", "ITEM"]),
    st.one_of(_scalars, st.dictionaries(st.text(max_size=8), _scalars, max_size=3)),
    max_size=6,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(interaction=_malformed)
def test_generated_interactions_are_stored_whole_or_refused_whole(make_engine, interaction):
    engine = make_engine(privacy_level="contextual")
    before = rows(engine)
    try:
        engine.update_profile("u", interaction)
    except ValidationError:
        assert rows(engine) == before
    else:
        after = rows(engine)
        assert after["interactions"] == before["interactions"] + 1
        window = engine.export_profile("u")["users"][0]["interactions"]
        assert window[-1]["item_id"] == interaction["item_id"]


# -- rolling window and retention -------------------------------------------------------


def test_the_101st_interaction_evicts_the_oldest(make_engine):
    engine = make_engine()
    for i in range(101):
        engine.update_profile("u", {"item_id": f"item-{i}", "timestamp": T0 - 1000 + i})
    window = engine.export_profile("u")["users"][0]["interactions"]
    assert len(window) == 100
    assert window[0]["item_id"] == "item-1"
    assert window[-1]["item_id"] == "item-100"
    # The window holds the activity: no separate counters at this level (minimization).
    assert engine.export_profile("u")["users"][0]["activity"] == []


def test_a_full_window_refuses_an_interaction_older_than_all_it_holds(make_engine):
    engine = make_engine(policy=demo_policy(window=3))
    for i in range(3):
        engine.update_profile("u", {"item_id": f"new-{i}", "timestamp": T0 - 100 + i})
    engine.update_profile("u", {"item_id": "ancient", "timestamp": T0 - 5000})
    window = engine.export_profile("u")["users"][0]["interactions"]
    assert [w["item_id"] for w in window] == ["new-0", "new-1", "new-2"]


def test_recycled_window_rows_drop_their_old_context(make_engine):
    engine = make_engine(privacy_level="contextual", policy=demo_policy(window=2))
    engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 30, "context": {"device": "x"}})
    engine.update_profile("u", {"item_id": "b", "timestamp": T0 - 20})
    engine.update_profile("u", {"item_id": "c", "timestamp": T0 - 10})
    window = engine.export_profile("u")["users"][0]["interactions"]
    assert [(w["item_id"], w["context"]) for w in window] == [("b", {}), ("c", {})]
    assert rows(engine)["context"] == 0


def test_segment_level_counts_every_interaction_without_item_ids(make_engine):
    engine = make_engine(privacy_level="segment")
    for i in range(101):
        engine.update_profile("u", {"item_id": f"item-{i}", "timestamp": T0 - 1000 + i})
    user = engine.export_profile("u")["users"][0]
    assert user["interactions"] == []
    assert sum(a["count"] for a in user["activity"]) == 101


def test_window_keeps_the_newest_by_timestamp_not_by_arrival(make_engine):
    engine = make_engine(policy=demo_policy(window=3))
    for ts in (5, 1, 4, 2, 3):
        engine.update_profile("u", {"item_id": f"t{ts}", "timestamp": T0 - 100 + ts})
    window = engine.export_profile("u")["users"][0]["interactions"]
    assert [w["item_id"] for w in window] == ["t3", "t4", "t5"]


def test_batch_respects_the_window_per_user(make_engine):
    engine = make_engine(policy=demo_policy(window=10))
    records = [
        (f"u{n % 3}", {"item_id": f"i{n}", "timestamp": T0 - 10_000 + n}) for n in range(300)
    ]
    assert engine.update_profile_many(records) == 300
    data = {u["user_id"]: u for u in engine.export_profile()["users"]}
    for uid in ("u0", "u1", "u2"):
        items = [int(i["item_id"][1:]) for i in data[uid]["interactions"]]
        assert len(items) == 10
        assert items == sorted(n for n in range(300) if f"u{n % 3}" == uid)[-10:]


def test_retention_removes_old_rows_at_the_next_open(make_engine, clock, profile_dir, raw_key):
    engine = make_engine(privacy_level="contextual")
    engine.update_profile(
        "u", {"item_id": "expired-QZ9", "timestamp": T0 - 10, "context": {"daypart": "morning"}}
    )
    engine.set_signals("u", {"plan": "pro"})
    engine.close()
    clock.advance(days=31)  # past the context field's 30 days, not the profile's 90
    engine = make_engine(privacy_level="contextual")
    window = engine.export_profile("u")["users"][0]["interactions"]
    assert window[0]["item_id"] == "expired-QZ9" and window[0]["context"] == {}
    engine.close()
    clock.advance(days=60)  # 91 days: interactions and counters expire
    engine = make_engine(privacy_level="contextual")
    user = engine.export_profile("u")["users"][0]
    assert user["interactions"] == [] and user["activity"] == []
    assert [s["name"] for s in user["signals"]] == ["plan"]  # declared for 365 days
    engine.close()
    clock.advance(days=300)
    engine = make_engine(privacy_level="contextual")
    assert engine.users() == []  # nothing left: the user row goes too
    assert rows(engine) == dict.fromkeys(rows(engine), 0)
    assert b"expired-QZ9" not in plaintext_of_profile(profile_dir, raw_key)


def test_retention_is_enforced_inside_each_write(make_engine, clock):
    engine = make_engine()
    engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 10})
    clock.advance(days=91)
    engine.update_profile("u", {"item_id": "b"})
    assert [i["item_id"] for i in engine.export_profile("u")["users"][0]["interactions"]] == ["b"]


def test_an_interaction_older_than_retention_is_not_stored(make_engine):
    engine = make_engine()
    assert engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 100 * 86400}) is False
    assert rows(engine)["interactions"] == 0


# -- the privacy level caps collection ----------------------------------------------------

ITEM = "item-ZK42-marker"
DEVICE = "device-QP93-marker"


def _record(engine: PersonalizationEngine) -> None:
    engine.update_profile(
        "u", Interaction(ITEM, "purchase", T0 - 5, 2.0, {"daypart": "evening", "device": DEVICE})
    )
    engine.set_signals("u", {"plan": "pro"})


def test_level_none_stores_nothing(make_engine, profile_dir, raw_key):
    engine = make_engine(privacy_level="none")
    _record(engine)
    assert rows(engine) == dict.fromkeys(rows(engine), 0)
    assert ITEM.encode() not in plaintext_of_profile(profile_dir, raw_key)


def test_level_segment_keeps_signals_and_counters_but_no_item_id(make_engine, profile_dir, raw_key):
    engine = make_engine(privacy_level="segment")
    _record(engine)
    counts = rows(engine)
    assert counts["signals"] == 1 and counts["activity"] == 1
    assert counts["interactions"] == 0 and counts["context"] == 0
    assert ITEM.encode() not in plaintext_of_profile(profile_dir, raw_key)


def test_level_behavioral_keeps_the_window_but_not_the_context(make_engine):
    engine = make_engine(privacy_level="behavioral")
    _record(engine)
    assert rows(engine)["interactions"] == 1 and rows(engine)["context"] == 0


def test_level_contextual_keeps_declared_context(make_engine):
    engine = make_engine(privacy_level="contextual")
    _record(engine)
    assert rows(engine)["context"] == 2


@pytest.mark.parametrize("lower", ["behavioral", "segment", "none"])
def test_lowering_the_level_purges_and_scrubs_pages(make_engine, profile_dir, raw_key, lower):
    engine = make_engine(privacy_level="contextual")
    _record(engine)
    assert ITEM.encode() in plaintext_of_profile(profile_dir, raw_key)
    assert DEVICE.encode() in plaintext_of_profile(profile_dir, raw_key)
    engine.set_privacy_level(lower)
    assert engine.privacy_level is PrivacyLevel(lower)
    plain = plaintext_of_profile(profile_dir, raw_key)
    assert DEVICE.encode() not in plain
    assert (ITEM.encode() in plain) == (lower == "behavioral")
    if lower == "none":
        assert rows(engine) == dict.fromkeys(rows(engine), 0)


def test_opening_at_a_lower_level_purges_at_open(make_engine):
    engine = make_engine(privacy_level="contextual")
    _record(engine)
    engine.close()
    engine = make_engine(privacy_level="segment")
    assert rows(engine)["interactions"] == 0 and rows(engine)["signals"] == 1


def test_raising_the_level_keeps_data_and_collects_more_from_then_on(make_engine):
    engine = make_engine(privacy_level="segment")
    _record(engine)
    engine.set_privacy_level("contextual")
    _record(engine)
    assert rows(engine)["interactions"] == 1 and rows(engine)["context"] == 2


def test_undeclaring_a_field_purges_its_values(make_engine):
    engine = make_engine(privacy_level="contextual")
    _record(engine)
    engine.close()
    engine = make_engine(privacy_level="contextual", policy=demo_policy(signals=(), context=()))
    assert rows(engine)["signals"] == 0 and rows(engine)["context"] == 0
    assert rows(engine)["interactions"] == 1


def test_report_names_every_field_with_its_purpose(make_engine):
    engine = make_engine(privacy_level="segment")
    _record(engine)
    report = engine.report("u").to_dict()
    fields = {f["name"]: f for f in report["fields"]}
    assert fields["plan"]["purpose"] == "choose plan-specific tips"
    assert fields["plan"]["retention_days"] == 365 and fields["plan"]["collected"]
    assert fields["interactions.item_id"]["collected"] is False  # segment level
    assert fields["interactions.item_id"]["retention_days"] == 90
    assert fields["daypart"]["collected"] is False
    assert all(f["purpose"] for f in report["fields"])
    (user,) = report["users"]
    assert user["signals"] == {"plan": "pro"} and user["interactions"] == 0
    assert user["active_days"] == 1


def test_stored_level_and_policy_are_kept_when_not_given(make_engine):
    engine = make_engine(privacy_level="individual")
    engine.close()
    engine = make_engine(privacy_level=None, policy=None)
    assert engine.privacy_level is PrivacyLevel.INDIVIDUAL
    assert engine.policy == demo_policy()


def test_lowering_to_segment_turns_the_window_into_counters(make_engine, profile_dir, raw_key):
    engine = make_engine(privacy_level="behavioral")
    for i in range(3):
        engine.update_profile("u", {"item_id": f"{ITEM}-{i}", "timestamp": T0 - 100 + i})
    engine.set_privacy_level("segment")
    user = engine.export_profile("u")["users"][0]
    assert user["interactions"] == []
    assert sum(a["count"] for a in user["activity"]) == 3
    assert ITEM.encode() not in plaintext_of_profile(profile_dir, raw_key)


def test_backfilled_history_still_expires_at_open(make_engine, clock):
    """The open-time pass skips its scan only while every timestamp is provably fresh;
    an older interaction written later (a backfill) lowers that bound."""
    engine = make_engine()
    engine.update_profile("u", {"item_id": "fresh", "timestamp": T0 - 10})
    engine.close()
    clock.advance(days=1)
    engine = make_engine()  # full pass: records how old the oldest interaction is
    engine.update_profile("u", {"item_id": "backfill", "timestamp": T0 - 80 * 86400})
    engine.close()
    clock.advance(days=11)  # "backfill" is now 92 days old, "fresh" 12
    engine = make_engine()
    ids = [i["item_id"] for i in engine.export_profile("u")["users"][0]["interactions"]]
    assert ids == ["fresh"]


def test_the_window_rolls_on_with_equal_timestamps(make_engine):
    """Apps that send whole seconds: eight events in one second, window of three."""
    engine = make_engine(policy=demo_policy(window=3))
    for i in range(8):
        engine.update_profile("u", {"item_id": f"e{i}", "timestamp": T0 - 5})
    window = engine.export_profile("u")["users"][0]["interactions"]
    assert [w["item_id"] for w in window] == ["e5", "e6", "e7"]


def test_undeclaring_an_event_purges_its_counters_too(make_engine):
    engine = make_engine(privacy_level="segment")
    engine.update_profile("u", {"item_id": "a", "event": "click", "timestamp": T0 - 5})
    engine.update_profile("u", {"item_id": "b", "event": "view", "timestamp": T0 - 4})
    export = engine.export_profile()
    engine.close()
    engine = make_engine(privacy_level="segment", policy=demo_policy(events=("view",)))
    assert [a["event"] for a in engine.export_profile("u")["users"][0]["activity"]] == ["view"]
    with pytest.raises(PolicyViolationError):  # the old export still says "click"
        engine.import_profile(export)
    engine.import_profile(engine.export_profile())  # its own export imports cleanly


SECRET = "diagnosis-QQ71"


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.set_signals("u", {"plan": SECRET}),
        lambda e: e.update_profile("u", {"item_id": "a", "event": SECRET}),
        lambda e: e.update_profile("u", {"item_id": "a", "context": {"daypart": SECRET}}),
        lambda e: e.update_profile("u", {"item_id": SECRET * 30}),
        lambda e: e.import_profile(
            {
                "format": "ondevice.export",
                "version": 1,
                "users": [
                    {
                        "user_id": "u",
                        "created_at": T0,
                        "activity": [{"day": SECRET, "event": "view", "count": 1}],
                    }
                ],
            }
        ),
    ],
)
def test_refused_values_are_never_echoed_in_error_messages(make_engine, call):
    engine = make_engine(privacy_level="contextual")
    with pytest.raises(OndeviceError) as err:
        call(engine)
    assert SECRET not in str(err.value)
    assert SECRET not in repr(err.value.__cause__ or "")


def test_forgetting_a_user_forgets_the_stored_timestamp_bound(make_engine, clock):
    engine = make_engine()
    engine.update_profile("u", {"item_id": "a", "timestamp": T0 - 7777})
    engine.close()
    clock.advance(days=1)
    engine = make_engine()  # the open-time pass records the bound
    with engine._store.read() as conn:
        assert Store.get_meta(conn, "oldest_ts") == repr(T0 - 7777)
    engine.wipe_profile("u")
    with engine._store.read() as conn:
        assert Store.get_meta(conn, "oldest_ts") is None
