"""The levels the engine serves are the rankers the evaluation measures.

The evaluation harness (``ondevice.eval``) ranks with thin calls into
``ondevice.scoring``; the engine ranks through ``ondevice.levels`` on an encrypted
profile. This test feeds the same synthetic users through both and requires the same
items in the same order, so the published table describes the product.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ondevice import PersonalizationEngine, RawKey
from ondevice.bundle import load_bundle
from ondevice.eval.harness import (
    _model,
    _rank_behavioral,
    _rank_individual,
    _rank_none,
    _rank_segment,
    _View,
)
from ondevice.operator.build import BuildSettings, build_catalog
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle
from ondevice.scoring import ScoringParams
from ondevice.synthetic import generate

from conftest import T0

K = 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = generate(n_users=400, n_items=150, seed=11)
    rows = [
        (f"u{u}", f"i{i}", int(t))
        for u, i, t in zip(data.users, data.items, data.times, strict=True)
    ]
    panel = [r for r in rows if int(r[0][1:]) >= 40]  # users 0..39 are the devices
    catalog = build_catalog(
        panel,
        settings=BuildSettings(factors=8, iterations=6, segments=4, min_segment_users=20),
        items=data.item_ids,
    )
    key = generate_signing_key()
    path = tmp_path_factory.mktemp("b") / "c.bundle"
    write_bundle(catalog, path, private_key=key)
    histories = {
        u: [int(i) for uu, i in zip(data.users, data.items, strict=True) if uu == u][:30]
        for u in range(40)
    }
    return (
        path,
        public_key_bytes(key),
        load_bundle(path, public_key=public_key_bytes(key)),
        histories,
    )


def _view(window_oldest_first: list[int]) -> _View:
    w = np.asarray(window_oldest_first[::-1], dtype=np.int64)
    return _View(
        row=0,
        window=w,
        times=np.arange(w.size, 0, -1, dtype=np.int64),
        seen=np.unique(w),
        targets=np.empty(0, np.int64),
        now=T0,
        signals={},
    )


def _engine(tmp_path, world, level: str, user: int) -> PersonalizationEngine:
    path, pub, _, histories = world
    engine = PersonalizationEngine(
        tmp_path / f"{level}-{user}",
        key=RawKey(bytes(32)),
        privacy_level=level,
        clock=lambda: T0,
        bundle=path,
        bundle_public_key=pub,
    )
    for n, item in enumerate(histories[user]):
        engine.update_profile("u", {"item_id": f"i{item}", "timestamp": T0 - 1000 + n})
    return engine


@pytest.mark.parametrize("user", range(0, 40, 3))
def test_behavioral_and_individual_rank_exactly_as_evaluated(tmp_path, world, user):
    catalog, history = world[2], world[3][user]
    p = ScoringParams.from_extra(catalog.extra)
    model, view = _model(catalog), _view(history)
    expected = {
        "behavioral": _rank_behavioral(model, K, p.half_life)(view),
        "individual": _rank_individual(
            model,
            K,
            p.half_life,
            p.fusion_weight,
            p.fusion_c,
            p.fusion_depth,
            p.foldin_half_life,
        )(view),
    }
    for level, ranking in expected.items():
        with _engine(tmp_path, world, level, user) as engine:
            got = engine.get_recommendations("u", k=K)
        assert got.level.value == level
        assert got.item_ids == [f"i{i}" for i in ranking]


@pytest.mark.parametrize("user", range(40))
def test_segment_and_none_rank_exactly_as_evaluated(tmp_path, world, user):
    catalog, history = world[2], world[3][user]
    p = ScoringParams.from_extra(catalog.extra)
    model, view = _model(catalog), _view(sorted(set(history), key=history.index))
    segment = _rank_segment(
        model, K, behaviour=True, half_life=p.segment_half_life, exclude_seen=False
    )(view)
    none = _rank_none(model, K, exclude_seen=False)(view)
    # The segment level keeps only the factor-space sums, folded in one interaction at
    # a time (no item ids): the same segment and list as the window form.
    path, pub = world[0], world[1]
    with PersonalizationEngine(
        tmp_path / "seg",
        key=RawKey(bytes(32)),
        privacy_level="segment",
        clock=lambda: T0,
        bundle=path,
        bundle_public_key=pub,
    ) as engine:
        for n, item in enumerate(sorted(set(history), key=history.index)):
            engine.update_profile("u", {"item_id": f"i{item}", "timestamp": T0 - 1000 + n})
        got = engine.get_recommendations("u", k=K)
    assert got.level.value == "segment"
    assert got.item_ids == [f"i{i}" for i in segment]
    with _engine(tmp_path, world, "none", user) as engine:
        assert engine.get_recommendations("u", k=K).item_ids == [f"i{i}" for i in none]


@pytest.fixture(scope="module")
def world_ann(tmp_path_factory, world):
    """The same catalog written with an approximate index (items in cluster order)."""
    _, _, catalog, histories = world
    # a short fusion depth, so a request needs a few clusters, not all of them
    catalog = replace(catalog, extra={**catalog.extra, "scoring.fusion_depth": "10"})
    key = generate_signing_key()
    ann_path = tmp_path_factory.mktemp("ann") / "c.bundle"
    write_bundle(catalog, ann_path, private_key=key, ann=8)
    loaded = load_bundle(ann_path, public_key=public_key_bytes(key))
    assert loaded.ann is not None and loaded.ann.nprobe < 8  # it approximates
    return ann_path, public_key_bytes(key), loaded, histories


@pytest.mark.parametrize("user", range(0, 40, 4))
def test_individual_with_an_index_ranks_exactly_as_evaluated(tmp_path, world_ann, user):
    catalog, history = world_ann[2], world_ann[3][user]
    position = {item_id: i for i, item_id in enumerate(catalog.item_ids)}
    p = ScoringParams.from_extra(catalog.extra)
    view = _view([position[f"i{item}"] for item in history])
    ranking = _rank_individual(
        _model(catalog), 10, p.half_life, p.fusion_weight, p.fusion_c, p.fusion_depth,
        p.foldin_half_life,
    )(view)
    with _engine(tmp_path, world_ann, "individual", user) as engine:
        got = engine.get_recommendations("u", k=10)
    assert got.level.value == "individual"
    assert got.item_ids == [catalog.item_ids[i] for i in ranking]
