"""The contract every personalization level passes, on a catalog whose right answers
are planted by hand, plus the fallback chain and the bundle's place in the engine."""

from __future__ import annotations

import pytest

from ondevice import (
    BundleError,
    InvalidInputError,
    PersonalizationEngine,
    PolicyViolationError,
    PrivacyLevel,
)
from ondevice.operator.bundle_writer import generate_signing_key, write_bundle
from ondevice.store import Store

from conftest import T0
from planted import HISTORY, PLANTED, N, planted_catalog
from sqlcipher_pages import plaintext_of_profile


def _history(engine: PersonalizationEngine, user: str = "u") -> None:
    for n, item in enumerate(HISTORY):
        engine.update_profile(
            user,
            {
                "item_id": item,
                "event": "click",
                "timestamp": T0 - 600 + n,
                "context": {"daypart": "am"},
            },
        )
    engine.set_signals(user, {"plan": "pro"})


ALL = ["none", "segment", "behavioral", "contextual", "individual"]
PERSONAL = ["behavioral", "contextual", "individual"]


class TestLevelContract:
    """Every level: a known answer, cold start, exclusions, k, determinism."""

    @pytest.mark.parametrize("level", ALL)
    def test_planted_answer_comes_first(self, open_engine, level):
        engine = open_engine(level)
        _history(engine)
        recs = engine.get_recommendations("u", k=5)
        assert recs.level is PrivacyLevel(level)
        expected = "i0" if level == "none" else PLANTED
        assert recs[0].item_id == expected
        assert all(r.explanation for r in recs)
        assert all(r.level is PrivacyLevel(level) for r in recs)

    @pytest.mark.parametrize("level", ALL)
    def test_cold_start_falls_back_and_never_raises(self, open_engine, level):
        engine = open_engine(level)
        recs = engine.get_recommendations("stranger", k=4)
        assert len(recs) == 4
        assert recs.level is PrivacyLevel.NONE
        assert recs.item_ids == ["i0", "i1", "i2", "i3"]
        assert len(recs.fallbacks) == PrivacyLevel(level).rank
        assert recs.requested is PrivacyLevel(level)

    @pytest.mark.parametrize("level", PERSONAL)
    def test_seen_and_blocked_items_never_come_back(self, open_engine, level):
        engine = open_engine(level)
        _history(engine)
        engine.block_item("u", PLANTED)
        recs = engine.get_recommendations("u", k=N)
        assert PLANTED not in recs.item_ids
        assert not set(HISTORY) & set(recs.item_ids)
        assert len(recs) == N - len(HISTORY) - 1
        engine.unblock_item("u", PLANTED)
        assert engine.get_recommendations("u", k=1).item_ids == [PLANTED]

    @pytest.mark.parametrize("level", PERSONAL)
    def test_seen_items_can_be_allowed(self, open_engine, level):
        engine = open_engine(level, exclude_seen=False)
        _history(engine)
        assert set(HISTORY) <= set(engine.get_recommendations("u", k=N).item_ids)

    @pytest.mark.parametrize("level", ALL)
    def test_k_larger_than_the_catalog_returns_each_item_once(self, open_engine, level):
        engine = open_engine(level)
        _history(engine)
        ids = engine.get_recommendations("u", k=500).item_ids
        assert len(ids) == len(set(ids))
        excluded = len(HISTORY) if PrivacyLevel(level).allows(PrivacyLevel.BEHAVIORAL) else 0
        assert len(ids) == N - excluded

    @pytest.mark.parametrize("level", ALL)
    def test_answers_are_deterministic(self, open_engine, level):
        a, b = open_engine(level), open_engine(level)
        for engine in (a, b):
            _history(engine)
        first = a.get_recommendations("u", k=10).to_dict()
        assert a.get_recommendations("u", k=10).to_dict() == first
        assert b.get_recommendations("u", k=10).to_dict() == first

    @pytest.mark.parametrize("level", PERSONAL)
    def test_unknown_items_in_the_history_are_ignored(self, open_engine, level):
        engine = open_engine(level)
        _history(engine)
        engine.update_profile("u", {"item_id": "not-in-catalog", "timestamp": T0 - 1})
        assert engine.get_recommendations("u", k=1).item_ids == [PLANTED]

    @pytest.mark.parametrize("level", ALL)
    def test_bad_input_is_a_clear_error(self, open_engine, level):
        engine = open_engine(level)
        for k in (0, -3, True, "5", 2.0):
            with pytest.raises(InvalidInputError):
                engine.get_recommendations("u", k=k)
        with pytest.raises(PolicyViolationError):
            engine.get_recommendations("u", {"location": "home"})


def test_behavioral_explanation_names_the_evidence(open_engine):
    engine = open_engine("behavioral")
    _history(engine)
    top = engine.get_recommendations("u", k=1)[0]
    assert top.explanation.startswith("because you opened")
    assert "Item 14" in top.explanation or "Item 13" in top.explanation


def test_recency_decay_favours_the_latest_item(open_engine):
    engine = open_engine("behavioral")
    for n, item in enumerate(["i2", "i21"]):  # cluster a long ago, cluster c just now
        engine.update_profile("u", {"item_id": item, "timestamp": T0 - 100 + n})
    assert engine.get_recommendations("u", k=1).item_ids[0] in {f"i{j}" for j in range(20, 30)}


def test_current_item_steers_the_contextual_level(open_engine):
    engine = open_engine("contextual")
    engine.update_profile("u", {"item_id": "i14", "event": "click", "timestamp": T0 - 60})
    without = engine.get_recommendations("u", k=3).item_ids
    assert without[0] == PLANTED
    assert not any(i in {f"i{j}" for j in range(20, 30)} for i in without)
    recs = engine.get_recommendations("u", k=3, current_item="i25")
    cluster_c = {f"i{j}" for j in range(20, 30)}
    assert recs.item_ids[0] == PLANTED
    assert set(recs.item_ids[1:]) <= cluster_c - {"i25"}


def test_segment_level_uses_rules_then_taste_sums_without_item_ids(open_engine, tmp_path, raw_key):
    path = tmp_path / "seg"
    engine = open_engine("segment", path=path)
    for n, item in enumerate(["i21", "i22", "i23"]):
        engine.update_profile("v", {"item_id": item, "timestamp": T0 - 10 + n})
    recs = engine.get_recommendations("v", k=2)
    assert recs.level is PrivacyLevel.SEGMENT
    assert "cluster-c" in recs[0].explanation and "similar tastes" in recs[0].explanation
    assert recs[0].item_id == "i20"
    assert b"i21" not in plaintext_of_profile(path, raw_key)
    engine.set_signals("v", {"plan": "pro"})  # a rule beats the taste sums
    assert engine.get_recommendations("v", k=1).item_ids == [PLANTED]


def test_lowering_to_segment_keeps_the_taste_as_sums(open_engine, tmp_path, raw_key):
    path = tmp_path / "low"
    engine = open_engine("behavioral", path=path)
    for n, item in enumerate(["i21", "i22", "i23"]):
        engine.update_profile("v", {"item_id": item, "timestamp": T0 - 10 + n})
    engine.set_privacy_level("segment")
    assert b"i21" not in plaintext_of_profile(path, raw_key)
    recs = engine.get_recommendations("v", k=1)
    assert recs.level is PrivacyLevel.SEGMENT and "cluster-c" in recs[0].explanation


def test_individual_falls_back_when_the_bundle_has_no_vectors(open_engine):
    engine = open_engine("individual", bundle="no_vectors")
    _history(engine)
    recs = engine.get_recommendations("u", k=3)
    assert recs.level is PrivacyLevel.CONTEXTUAL
    assert recs.fallbacks == ("individual: the catalog has no item vectors",)
    assert recs[0].item_id == PLANTED


def test_individual_caches_the_user_vector_and_refreshes_it(open_engine):
    engine = open_engine("individual")
    _history(engine)
    engine.get_recommendations("u", k=1)

    def vector_blob():
        with engine._store.read() as conn:
            return {n: b for n, b, _ in Store.derived(conn, "u")}["user_vector"]

    first = vector_blob()
    engine.get_recommendations("u", k=1)
    assert vector_blob() == first  # unchanged window: served from the cache
    engine.update_profile("u", {"item_id": "i25", "timestamp": T0})
    engine.get_recommendations("u", k=1)
    assert vector_blob() != first


def test_no_bundle_means_an_empty_answer_with_a_reason(open_engine):
    engine = open_engine("individual", bundle="")
    recs = engine.get_recommendations("u")
    assert len(recs) == 0 and recs.fallbacks == ("no catalog bundle is loaded",)


def test_a_refused_bundle_keeps_the_previous_one(open_engine, tmp_path, bundles):
    engine = open_engine("behavioral")
    _history(engine)
    before = engine.get_recommendations("u", k=3).item_ids
    bad = tmp_path / "bad.bundle"
    data = bytearray(bundles["full"].read_bytes())
    data[len(data) // 3] ^= 0x20
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        engine.load_bundle(bad)
    other = generate_signing_key()
    write_bundle(planted_catalog(), tmp_path / "other.bundle", private_key=other)
    with pytest.raises(BundleError):
        engine.load_bundle(tmp_path / "other.bundle")
    assert engine.get_recommendations("u", k=3).item_ids == before


def test_blocking_needs_a_level_that_keeps_item_ids(open_engine):
    engine = open_engine("segment")
    with pytest.raises(PolicyViolationError, match="behavioral"):
        engine.block_item("u", "i1")


@pytest.mark.parametrize("level", ["none", "segment", "behavioral"])
def test_app_supplied_exclusions_apply_and_are_never_stored(open_engine, tmp_path, raw_key, level):
    path = tmp_path / f"ex-{level}"
    engine = open_engine(level, path=path)
    _history(engine)
    first = engine.get_recommendations("u", k=3).item_ids
    owned = [first[0], "unknown-item"]
    again = engine.get_recommendations("u", k=3, exclude=owned)
    assert first[0] not in again.item_ids and again.item_ids[:2] == first[1:]
    if level != "behavioral":  # behavioral keeps its window: item ids are there anyway
        assert first[0].encode() not in plaintext_of_profile(path, raw_key)
    with pytest.raises(InvalidInputError):
        engine.get_recommendations("u", exclude=[5])


def test_a_wipe_during_a_recommendation_is_not_undone_by_the_vector_cache(open_engine, monkeypatch):
    from ondevice.levels import individual

    engine = open_engine("individual")
    _history(engine)
    real = individual.fold_in

    def fold_in_then_forget(rt, state):  # the user says "forget me" mid-call
        vector = real(rt, state)
        engine.wipe_profile("u")
        return vector

    monkeypatch.setattr(individual, "fold_in", fold_in_then_forget)
    engine.get_recommendations("u", k=3)
    with engine._store.read() as conn:
        assert Store.count_rows(conn) == dict.fromkeys(Store.count_rows(conn), 0)


def test_raising_the_level_drops_the_segment_levels_stand_ins(open_engine):
    engine = open_engine("segment")
    _history(engine)
    with engine._store.read() as conn:
        assert Store.count_rows(conn)["activity"] > 0 and Store.count_rows(conn)["derived"] == 1
    engine.set_privacy_level("individual")
    report = {f["name"]: f for f in engine.report("u").to_dict()["fields"]}
    assert report["activity.daily_counts"]["collected"] is False
    with engine._store.read() as conn:
        assert Store.count_rows(conn)["activity"] == 0 and Store.count_rows(conn)["derived"] == 0


def test_segment_taste_sums_forget_what_retention_deletes(open_engine, clock):
    import numpy as np

    from ondevice import _aggblob

    engine = open_engine("segment")
    engine.update_profile("u", {"item_id": "i21", "timestamp": clock.now - 85 * 86400})
    clock.advance(days=40)  # i21 is now 125 days old: past the 90-day retention
    engine.update_profile("u", {"item_id": "i3", "timestamp": clock.now - 60})

    def sums():
        with engine._store.read() as conn:
            blob = {n: b for n, b, _ in Store.derived(conn, "u")}.get("taste_aggregates")
        return None if blob is None else _aggblob.unpack(blob)

    _, _, f, _, buckets = sums()
    assert len(buckets) == 1  # only the span holding i3
    s = np.frombuffer(buckets[0][1], dtype="<f4")[:f]
    y = engine.catalog.item_factors
    assert np.allclose(s, y[3], atol=1e-6)  # S = y(i3) alone: i21 is gone
    clock.advance(days=120)  # and an inactive user's sums go at the next open's pass
    engine.purge_expired()
    assert sums() is None


def test_opening_at_segment_from_a_higher_level_with_a_bundle_keeps_the_taste(
    open_engine, tmp_path
):
    path = tmp_path / "down"
    engine = open_engine("behavioral", path=path)
    for n, item in enumerate(["i21", "i22", "i23"]):
        engine.update_profile("v", {"item_id": item, "timestamp": T0 - 10 + n})
    engine.close()
    engine = open_engine("segment", path=path)
    recs = engine.get_recommendations("v", k=1)
    assert recs.level is PrivacyLevel.SEGMENT and "cluster-c" in recs[0].explanation


def test_short_retention_still_keeps_segment_taste_sums(open_engine, tmp_path):
    import dataclasses

    from planted import POLICY

    engine = open_engine("segment", policy=dataclasses.replace(POLICY, retention_days=7))
    engine.update_profile("v", {"item_id": "i21", "timestamp": T0 - 60})
    with engine._store.read() as conn:
        assert Store.count_rows(conn)["derived"] == 1
