"""Device-side segment assignment: rules first, then nearest centroid, then default."""

from __future__ import annotations

import numpy as np
import pytest

from ondevice import scoring, segments, synthetic
from ondevice.catalog import Catalog, Segment, SegmentRule
from ondevice.operator import build


def _catalog(segs: tuple[Segment, ...], rules: tuple[SegmentRule, ...] = (),
             default: int = 0) -> Catalog:
    return Catalog(
        item_ids=("a", "b"), titles=("a", "b"), popularity=np.ones(2, dtype=np.float32),
        nbr_indptr=np.zeros(3, dtype=np.int64), nbr_indices=np.zeros(0, dtype=np.int32),
        nbr_weights=np.zeros(0, dtype=np.float32), segments=segs, segment_rules=rules,
        default_segment=default)


def _seg(i: int, centroid: list[float] | None = None) -> Segment:
    return Segment(id=i, name=f"s{i}", panel_users=50, top_items=np.zeros(0, dtype=np.int32),
                   centroid=None if centroid is None else np.asarray(centroid, np.float32))


RULES = (
    SegmentRule(segment=1, when={"plan": ("pro", "team"), "usage": ("daily",)}),
    SegmentRule(segment=2, when={"plan": ("pro",)}),
)


def test_first_matching_rule_wins() -> None:
    assert segments.match_rules(RULES, {"plan": "pro", "usage": "daily"}) == 1
    assert segments.match_rules(RULES, {"plan": "pro", "usage": "weekly"}) == 2
    assert segments.match_rules(RULES, {"plan": "team"}) is None
    assert segments.match_rules(RULES, None) is None


def test_rules_beat_centroids_and_centroids_beat_the_default() -> None:
    cat = _catalog((_seg(0), _seg(1), _seg(2), _seg(3, [1, 0]), _seg(4, [0, 1])), RULES,
                   default=0)
    vec = np.array([0.1, 2.0], dtype=np.float32)
    assert segments.assign_segment(cat, signals={"plan": "pro"}, user_vector=vec) == 2
    assert segments.assign_segment(cat, signals={"plan": "free"}, user_vector=vec) == 4
    assert segments.assign_segment(cat, signals={"plan": "free"},
                                   user_vector=np.array([3.0, -1.0])) == 3
    assert segments.assign_segment(cat, signals={"plan": "free"}) == 0
    assert segments.assign_segment(cat, user_vector=np.zeros(2)) == 0


def test_centroid_assignment_is_by_cosine_not_distance() -> None:
    segs = (_seg(0, [1, 0]), _seg(1, [0.6, 0.8]))
    # far along segment 1's direction, yet closer in euclidean terms to segment 0's centroid
    assert segments.nearest_centroid(segs, np.array([0.3, 0.4])) == 1
    assert segments.nearest_centroid(segs, np.array([10.0, 1.0])) == 0
    assert segments.nearest_centroid(segs, np.array([np.nan, 1.0])) is None


def test_a_rule_pointing_at_a_missing_segment_falls_through() -> None:
    cat = _catalog((_seg(0), _seg(5, [1, 0])), (SegmentRule(segment=9, when={"x": ("y",)}),),
                   default=0)
    assert segments.assign_segment(cat, signals={"x": "y"}, user_vector=np.ones(2)) == 5
    assert segments.segment_by_id(cat, 5) is cat.segments[1]
    assert segments.segment_by_id(cat, 9) is None


@pytest.fixture(scope="module")
def planted() -> tuple[synthetic.SyntheticData, Catalog]:
    data = synthetic.generate(n_users=300, n_items=100, n_clusters=3, seed=11)
    cat = build.build_catalog(
        data.interactions(), signals=data.signals, items=data.item_ids,
        settings=build.BuildSettings(factors=8, iterations=8, segments=3, neighbours=10,
                                     min_segment_users=40, rule_signals=("plan",),
                                     max_segments=6))
    return data, cat


def test_declared_signals_assign_rule_segments_of_the_built_catalog(
    planted: tuple[synthetic.SyntheticData, Catalog],
) -> None:
    data, cat = planted
    for u in range(20):
        sig = data.signals[f"u{u}"]
        sid = segments.assign_segment(cat, signals=sig)
        rule = next((r for r in cat.segment_rules if sig["plan"] in r.when["plan"]), None)
        assert sid == (rule.segment if rule else cat.default_segment)


def test_folded_in_aggregates_put_users_of_one_home_cluster_together(
    planted: tuple[synthetic.SyntheticData, Catalog],
) -> None:
    data, cat = planted
    behaviour = tuple(s for s in cat.segments if s.centroid is not None)
    assert behaviour
    beh_cat = Catalog(**{**{f: getattr(cat, f) for f in cat.__dataclass_fields__},
                         "segments": behaviour, "segment_rules": ()})
    assert cat.item_factors is not None and cat.gram is not None and cat.als is not None
    pos = {name: i for i, name in enumerate(cat.item_ids)}
    by_home: dict[int, list[int]] = {}
    for u in range(data.n_users):
        items = np.array([pos[f"i{i}"] for i in data.items[data.users == u]])
        b, a = scoring.aggregates(cat.item_factors, items, alpha=cat.als.alpha)
        x = scoring.fold_in_aggregates(cat.gram, b, a, regularization=cat.als.regularization)
        sid = segments.assign_segment(beh_cat, user_vector=x)
        by_home.setdefault(int(data.user_home[u]), []).append(sid)
    purity = [np.bincount(v).max() / len(v) for v in by_home.values()]
    assert np.mean(purity) > 0.8
