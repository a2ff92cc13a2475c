"""The evaluation harness: hand-checked metrics and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import math
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ondevice import synthetic
from ondevice.errors import InvalidInputError
from ondevice.eval import harness
from ondevice.eval.__main__ import main
from ondevice.eval.movielens import age_band, is_published_ml100k, load_movielens
from ondevice.eval.references import ease_fit, ease_rank
from ondevice.operator import build
from ondevice.operator.build import interaction_matrix
from ondevice.operator.bundle_writer import generate_signing_key


def test_metrics_of_a_three_user_toy_case_match_the_hand_computation() -> None:
    # user 1: the single target at rank 2  -> HR 1, NDCG 1/log2(3)
    # user 2: targets {7, 9} at ranks 1, 3 -> DCG 1 + 1/log2(4) = 1.5,
    #         IDCG 1 + 1/log2(3); recall@20 = 2/2
    # user 3: target never ranked          -> all zero
    rankings = [[5, 3, 9], [9, 1, 7], [1, 2, 4]]
    targets = [[3], [7, 9], [8]]
    got = [harness.user_metrics(np.array(r), np.array(t)) for r, t in zip(rankings, targets,
                                                                          strict=True)]
    assert got[0] == pytest.approx((1.0, 1 / math.log2(3), 1.0))
    assert got[1] == pytest.approx((1.0, 1.5 / (1 + 1 / math.log2(3)), 1.0))
    assert got[2] == (0.0, 0.0, 0.0)
    mean_ndcg = float(np.mean([g[1] for g in got]))
    assert mean_ndcg == pytest.approx((0.63093 + 0.91972) / 3, abs=1e-4)


def test_metrics_respect_the_cutoffs() -> None:
    ranking = np.arange(30)
    hr, ndcg, rec = harness.user_metrics(ranking, np.array([12, 25]))
    assert hr == 0.0 and ndcg == 0.0 and rec == pytest.approx(0.5)  # 12 in top 20, 25 not
    with pytest.raises(InvalidInputError):
        harness.user_metrics(ranking, np.array([], dtype=np.int64))


def test_holdout_sizes_follow_the_protocols() -> None:
    assert [harness.holdout_size(n, "loo") for n in (1, 2, 50)] == [0, 1, 1]
    assert [harness.holdout_size(n, "t20") for n in (1, 2, 5, 20, 23)] == [0, 1, 1, 4, 5]
    with pytest.raises(InvalidInputError):
        harness.holdout_size(10, "random")


def test_dataset_orders_each_user_by_time_and_drops_repeats() -> None:
    d = harness.Dataset.from_arrays("t", np.array([0, 0, 0, 1]), np.array([5, 2, 5, 1]),
                                    np.array([30, 10, 5, 7]), n_users=2, n_items=6)
    np.testing.assert_array_equal(d.sequences[0], [5, 2])  # t=5 first; the repeat at 30 gone
    np.testing.assert_array_equal(d.times[0], [5, 10])
    assert d.n_users == 2


def test_ease_prefers_items_that_co_occur() -> None:
    users = np.array([0, 0, 1, 1, 2, 2, 3])
    items = np.array([0, 1, 0, 1, 2, 3, 2])
    b = ease_fit(interaction_matrix(users, items, 4, 4), 0.5)
    assert np.allclose(np.diag(b), 0.0)
    s = ease_rank(b, np.array([0]))
    assert int(np.argmax(s)) == 1


TINY = harness.EvalSettings(
    folds=2, factors=8, als_iterations=4, als_grid=((1.0, 5.0),), ease_grid=(10.0,),
    neighbours=20, half_life_grid=(1.0, 8.0), fusion_weight_grid=(1.0,),
    fusion_c_grid=(5.0,), session_boost_grid=(0.0,), context_strength_grid=(0.0, 1.0),
    segments=3, min_segment_users=20, shrinkage_grid=(0.0, 50.0))


@pytest.fixture(scope="module")
def tiny_data() -> harness.Dataset:
    return harness.from_synthetic(synthetic.generate(n_users=120, n_items=60, n_clusters=3,
                                                     mean_length=20, follow=0.7, seed=5))


@pytest.fixture(scope="module")
def tiny_result(tiny_data: harness.Dataset) -> harness.EvalResult:
    calls: list[tuple[int, int, str]] = []
    result = harness.evaluate(tiny_data, settings=TINY, progress=lambda d, t, s: calls.append(
        (d, t, s)))
    # per fold: the panel; per fold and protocol: tuning, device levels, references,
    # and the device levels again on the compact bundle
    assert calls[-1][0] == calls[-1][1] == 2 * (1 + 4 * 2)
    return result


def test_harness_measures_every_level_and_reference_on_every_device_user(
    tiny_result: harness.EvalResult,
) -> None:
    for p in ("loo", "t20"):
        rows = tiny_result.rows[p]
        keys = [r.key for r in rows]
        assert {"none", "segment", "segment_rules", "behavioral", "contextual", "foldin",
                "individual", "central_ease", "central_als"} <= set(keys)
        for r in rows:
            assert r.users == 120
            assert 0.0 <= r.ndcg <= r.hr <= 1.0 and 0.0 <= r.recall <= 1.0
            assert 0.0 < r.coverage <= 1.0 and r.ms_per_user > 0.0
            assert r.ndcg_se >= 0.0


def test_harness_finds_the_planted_sequence_structure(
    tiny_result: harness.EvalResult,
) -> None:
    # the planted "next item" chain: decayed neighbours must beat popularity by far
    loo = tiny_result
    assert loo.row("loo", "behavioral").ndcg > 2 * loo.row("loo", "none").ndcg
    assert loo.row("loo", "segment").ndcg > loo.row("loo", "none").ndcg


def test_markdown_report_lists_levels_targets_and_choices(
    tiny_result: harness.EvalResult,
) -> None:
    md = tiny_result.to_markdown()
    assert "| none: global popularity |" in md and "## Quality targets" in md
    assert "issue" not in md.lower()
    assert f"{tiny_result.cpu_seconds:.0f} s CPU" in md and "trained by `implicit`" in md
    assert md.count("fold 0:") == 2
    assert len(tiny_result.targets()) == 12
    assert "| none, as served (no item ids kept: seen items not excluded) |" in md
    served = [t for t in tiny_result.targets() if "as served" in t[1]]
    assert [t[0] for t in served] == ["loo", "t20"]


def _write_ml(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.data").write_text("1\t10\t5\t100\n1\t20\t3\t50\n2\t10\t4\t70\n")
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    genres = ["0"] * 19
    genres[1] = "1"
    (root / "u.item").write_text(
        "10|Film A (1995)|01-Jan-1995||url|" + "|".join(genres) + "\n"
        "20|Film B (1996)|01-Jan-1996||url|" + "|".join(["0"] * 19) + "\n")
    return root


def test_movielens_loader_reads_the_three_files(tmp_path: Path) -> None:
    d = load_movielens(_write_ml(tmp_path))
    assert d.n_users == 2 and d.n_items == 2 and d.item_ids == ("10", "20")
    np.testing.assert_array_equal(d.sequences[0], [1, 0])  # time 50 before 100
    assert d.signals[1] == {"age": "50-55", "gender": "F", "occupation": "other"}
    assert d.categories is not None and d.categories[0] == ("Action",)
    assert d.titles[1] == "Film B (1996)"
    assert age_band(17) == "<18" and age_band(56) == "56+"
    assert not is_published_ml100k(d)  # a small copy in the format: loads, but is flagged


def test_movielens_loader_takes_the_directory_its_parent_or_the_zip(tmp_path: Path) -> None:
    root = _write_ml(tmp_path / "dl" / "ml-100k")
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("u.data", "u.user", "u.item"):
            zf.write(root / name, f"ml-100k/{name}")
    first = load_movielens(root)
    for path in (tmp_path / "dl", archive):
        d = load_movielens(path)
        assert d.item_ids == first.item_ids and d.titles == first.titles
        for a, b in zip(d.sequences, first.sequences, strict=True):
            np.testing.assert_array_equal(a, b)


def _with_user(root: Path, data: str, user: str = "1|24|M|technician|85711\n") -> Path:
    (root / "u.data").write_text(data)
    (root / "u.user").write_text(user)
    return root


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "no u.data"),
        (lambda p: (p / "ratings.dat").write_text("1::2::5::978300760\n") and p, "1M or 10M"),
        (lambda p: (p / "ratings.csv").write_text("userId,movieId\n") and p, "'latest'"),
        (lambda p: _with_user(p, "1,10,5,100\n"), "u.data line 1"),
        (lambda p: _with_user(p, "1\tx\t5\t100\n"), "integers"),
        (lambda p: _with_user(p, "1\t10\t5\t100\n", "1|24|M\n"), "u.user line 1"),
        (
            lambda p: (p / "u.data").write_text("1\t10\t5\t100\n") and p,
            "u.user missing",
        ),
    ],
)
def test_a_path_that_is_not_ml100k_is_refused_with_where_to_get_it(
    tmp_path: Path, setup: Callable[[Path], Path], expected: str
) -> None:
    with pytest.raises(InvalidInputError) as err:
        load_movielens(setup(tmp_path))
    message = str(err.value)
    assert expected in message
    assert "https://grouplens.org/datasets/movielens/100k/" in message


def test_the_command_explains_a_missing_dataset_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--movielens", str(tmp_path / "nowhere"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no MovieLens-100K at") and "grouplens.org" in err
    assert "Traceback" not in err


def test_folds_in_worker_processes_give_the_same_table(
    tiny_result: harness.EvalResult, tiny_data: harness.Dataset
) -> None:
    calls: list[int] = []
    two = harness.evaluate(
        tiny_data, settings=TINY, jobs=2, progress=lambda d, t, s: calls.append(d)
    )
    assert two.jobs == 2 and tiny_result.jobs == 1
    assert sorted(calls) == list(range(2 * (1 + 4 * 2) + 1))
    assert two.chosen == tiny_result.chosen and two.segment_counts == tiny_result.segment_counts
    for p in ("loo", "t20"):
        pairs = [*zip(two.rows[p], tiny_result.rows[p], strict=True),
                 *zip(two.encoded[p]["compact"], tiny_result.encoded[p]["compact"], strict=True)]
        for a, b in pairs:
            same = ("hr", "hr_se", "ndcg", "ndcg_se", "recall", "recall_se", "coverage", "users")
            assert [getattr(a, f) for f in same] == [getattr(b, f) for f in same], a.key
    assert two.deltas == tiny_result.deltas


def test_validation_reuses_per_user_work_without_changing_a_ranking(
    tiny_data: harness.Dataset,
) -> None:
    users = list(range(0, tiny_data.n_users, 2))
    panel = {u: tiny_data.sequences[u] for u in range(tiny_data.n_users) if u % 2}
    x = harness._matrix(tiny_data, panel)
    u_f, y = build.train_als(x, factors=8, iterations=3)
    model = harness._model(
        harness._catalog(tiny_data, x, nbr=build.item_neighbours(x, top_n=20), y=y, reg=2.0,
                         alpha=2.0, s=TINY))
    model = harness._with_segments(model, x, u_f, [{}] * tiny_data.n_users, shrinkage=10.0,
                                   behaviour=True, rules=(), s=TINY)
    rankers = [
        harness._rank_individual(model, 20, 2.0, 1.0, 60.0, 50, 10.0),
        harness._rank_individual(model, 20, 2.0, 4.0, 5.0, 50, 10.0),  # same x and neighbours
        harness._rank_individual(model, 20, 2.0, 0.0, 60.0, 50),
        harness._rank_behavioral(model, 20, 2.0),
        harness._rank_contextual(model, 20, 2.0, 1.0, 1.0, 3600.0),
        harness._rank_contextual(model, 20, 2.0, 0.0, 0.5, 3600.0),
        harness._rank_segment(model, 20, behaviour=True, half_life=5.0),
        harness._rank_segment(model, 20, behaviour=True, half_life=5.0, exclude_seen=False),
    ]
    val = harness._views(tiny_data, users, "t20", 100, inner=True)
    test = harness._views(tiny_data, users, "t20", 100, inner=False)
    assert all(v.memo == {} for v in val) and all(v.memo is None for v in test)
    bare = [replace(v, memo=None) for v in val]
    for rank in rankers:
        for v, b in zip(val, bare, strict=True):
            np.testing.assert_array_equal(rank(v), rank(b))
    kinds = {key[1] for v in val for key in (v.memo or {})}
    assert kinds == {"fold-in", "neighbours", "affinity", "aggregates"}


@pytest.mark.slow
def test_cli_prints_and_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    out = tmp_path / "table.md"
    assert main(["--synthetic", "--folds", "2", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Quality targets" in printed and out.read_text(encoding="utf-8") in printed + "\n"


# ---- full precision and compact bundles side by side ----

def _fold_catalog(data: harness.Dataset) -> tuple[harness._Model, list[harness._View]]:
    """A catalog built as a fold's would be (ALS factors, neighbours, behaviour segments)
    from the odd users, and the even users' test views."""
    panel = {u: data.sequences[u] for u in range(data.n_users) if u % 2}
    x = harness._matrix(data, panel)
    u_f, y = build.train_als(x, factors=8, iterations=3)
    model = harness._model(
        harness._catalog(data, x, nbr=build.item_neighbours(x, top_n=20), y=y, reg=2.0,
                         alpha=2.0, s=TINY))
    model = harness._with_segments(model, x, u_f, [{}] * data.n_users, shrinkage=10.0,
                                   behaviour=True, rules=(), s=TINY)
    views = harness._views(data, list(range(0, data.n_users, 2)), "t20", 100, inner=False)
    return model, views


@pytest.fixture(scope="module")
def fold(tiny_data: harness.Dataset) -> tuple[harness._Model, list[harness._View]]:
    return _fold_catalog(tiny_data)


def test_every_device_level_is_measured_under_both_encodings_side_by_side(
    tiny_result: harness.EvalResult,
) -> None:
    md = tiny_result.to_markdown()
    assert "## Full precision and compact bundles side by side" in md
    for p in ("loo", "t20"):
        device = [r for r in tiny_result.rows[p] if r.group.startswith("on the device")]
        compact = tiny_result.encoded[p]["compact"]
        assert [r.key for r in compact] == [r.key for r in device]
        assert {"none", "segment", "behavioral", "contextual", "individual"} <= {
            r.key for r in compact}
        assert all(r.users == 120 for r in compact)
        for full in device:
            d = tiny_result.delta(p, full.key, "compact")
            assert (d.reference, d.reference_se) == (full.ndcg, full.ndcg_se)
            line = next(ln for ln in md.splitlines()
                        if ln.startswith(f"| {full.label} | {full.ndcg:.4f} ± "))
            assert f"| {d.measured:.4f} ± {d.measured_se:.4f} |" in line
    # no central reference is measured twice: only the device gets a bundle
    assert not any(d.key.startswith("central") for d in tiny_result.deltas)


def test_relative_changes_come_from_the_two_encodings_rows(
    tiny_result: harness.EvalResult,
) -> None:
    side = tiny_result.to_markdown().split("## Full precision and compact")[1]
    sections = side.split("\n### ")[1:]
    assert [s_.split("\n")[0] for s_ in sections] == [
        "leave last one out (LOO)", "last 20% held out (T20)"]
    moved = 0
    for p, section in zip(("loo", "t20"), sections, strict=True):
        full = {r.key: r for r in tiny_result.rows[p]}
        for c in tiny_result.encoded[p]["compact"]:
            expected = c.ndcg / full[c.key].ndcg - 1.0
            d = tiny_result.delta(p, c.key, "compact")
            assert d.measured == c.ndcg and d.measured_se == c.ndcg_se
            assert d.change == pytest.approx(expected, abs=1e-12)
            assert d.within() == (abs(expected) <= 0.01)
            line = next(ln for ln in section.splitlines() if ln.startswith(f"| {c.label} | "))
            cells = [x.strip() for x in line.strip("|").split("|")]
            assert cells[1:3] == [f"{full[c.key].ndcg:.4f} ± {full[c.key].ndcg_se:.4f}",
                                  f"{c.ndcg:.4f} ± {c.ndcg_se:.4f}"]
            assert cells[3] == f"{expected:+.2%}"
            assert cells[5] == ("yes" if abs(expected) <= 0.01 else "NO")
            moved += c.ndcg != full[c.key].ndcg
        # popularity and declared-signal segments read no factor and no weight
        for key in ("none", "none_served", "segment_rules"):
            assert tiny_result.delta(p, key, "compact").change == 0.0
    assert moved > 0  # the quantization reaches the rankings


def test_paired_standard_error_is_that_of_the_per_user_differences() -> None:
    # differences 0, 1, 2: standard deviation 1, three users
    assert harness._paired_se([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == pytest.approx(
        1 / math.sqrt(3))
    d = harness.EncodingDelta(protocol="loo", key="k", label="k", encoding="compact",
                              reference=0.2, reference_se=0.01, measured=0.203,
                              measured_se=0.01, diff_se=0.002)
    assert d.change == pytest.approx(0.015) and d.change_se == pytest.approx(0.01)
    assert not d.within() and d.within(0.02)


def test_the_compact_catalog_is_the_quantized_bundle_not_a_copy(
    fold: tuple[harness._Model, list[harness._View]], tmp_path: Path,
    tiny_result: harness.EvalResult,
) -> None:
    built = fold[0].catalog
    key = generate_signing_key()
    got = harness._through_bundle(built, harness.COMPACT, tmp_path / "c.odb", key)
    assert not (tmp_path / "c.odb").exists()
    assert built.item_factors is not None and got.item_factors is not None
    assert built.gram is not None and got.gram is not None
    y, yq = built.item_factors, got.item_factors
    assert yq.dtype == np.float32 and not np.array_equal(yq, y)  # quantized values
    step = np.abs(y).max(axis=1) / 127  # int8 with a scale per item
    assert (np.abs(yq - y) <= 0.5 * step[:, None] * (1 + 1e-5) + 1e-7).all()
    # the Gram matrix the device folds in with is that of the quantized factors
    np.testing.assert_allclose(got.gram, yq.astype(np.float64).T @ yq, rtol=1e-4, atol=1e-5)
    assert not np.array_equal(got.gram, built.gram)
    w, wq = built.nbr_weights, got.decoded_weights()
    np.testing.assert_array_equal(got.nbr_indices, built.nbr_indices)
    assert not np.array_equal(wq, w)
    assert np.max(np.abs(wq - w) / w) < 0.02  # the log table's 1.6% steps
    # full precision is what a format 1 bundle carries, bit for bit
    one = harness._through_bundle(built, harness.Encoding("f1", "format 1", 1),
                                  tmp_path / "f1.odb", key)
    assert one.item_factors is not None and one.gram is not None
    np.testing.assert_array_equal(one.item_factors, y)
    np.testing.assert_array_equal(one.gram, built.gram)
    np.testing.assert_array_equal(one.nbr_weights, w)
    # and the run reports what its bundles changed
    for p in ("loo", "t20"):
        for st in tiny_result.encoding_stats[p]["compact"]:
            assert 0 < st["factors_changed"] <= 1 and 0 < st["factors_rel_error"] < 0.02
            assert 0 < st["weights_max_rel_error"] < 0.02 and st["gram_rel_error"] > 0
            assert st["reordered"] == 0.0


def test_arrays_a_bundle_keeps_compact_are_measured_as_their_values(
    fold: tuple[harness._Model, list[harness._View]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ondevice import bundle

    built, views = fold[0].catalog, fold[1]
    key = generate_signing_key()
    small = harness._through_bundle(built, harness.COMPACT, tmp_path / "a.odb", key)
    monkeypatch.setattr(bundle, "DECODE_LIMIT", 0)  # as for a catalog of millions of items
    large = harness._through_bundle(built, harness.COMPACT, tmp_path / "b.odb", key)
    assert large.item_factor_scales is not None and large.nbr_weight_table is not None
    a, b = harness._model(small), harness._model(harness._decoded(large))
    assert b.catalog.item_factors is not None and small.item_factors is not None
    np.testing.assert_array_equal(b.catalog.item_factors, small.item_factors)
    np.testing.assert_array_equal(b.catalog.nbr_weights, small.nbr_weights)
    for make in (lambda m: harness._rank_individual(m, 20, 2.0, 1.0, 60.0, 50, 10.0),
                 lambda m: harness._rank_contextual(m, 20, 2.0, 1.0, 1.0, 3600.0),
                 lambda m: harness._rank_segment(m, 20, behaviour=True, half_life=5.0)):
        for v in views[:20]:
            np.testing.assert_array_equal(make(a)(v), make(b)(v))


def test_a_bundle_that_reorders_items_is_measured_by_item_id(
    fold: tuple[harness._Model, list[harness._View]],
) -> None:
    # an approximate index writes items in cluster order: emulate that with a permutation
    built, views = fold[0].catalog, fold[1]
    assert built.item_factors is not None
    n = built.n_items
    perm = np.random.default_rng(3).permutation(n)  # new position k holds old item perm[k]
    inv = np.argsort(perm)
    lens = np.diff(built.nbr_indptr)[perm]
    rows = [np.arange(built.nbr_indptr[i], built.nbr_indptr[i + 1]) for i in perm]
    offs = np.concatenate(rows)
    moved = replace(
        built,
        item_ids=tuple(built.item_ids[i] for i in perm),
        titles=tuple(built.titles[i] for i in perm),
        popularity=built.popularity[perm],
        nbr_indptr=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        nbr_indices=inv[built.nbr_indices[offs]].astype(np.int32),
        nbr_weights=built.nbr_weights[offs],
        item_factors=built.item_factors[perm],
        categories=None if built.categories is None else [built.categories[i] for i in perm],
    )
    order = harness._renumbering(built, moved)
    assert order is not None and harness._renumbering(built, built) is None
    np.testing.assert_array_equal(order, inv)
    a, b = harness._model(built), harness._model(moved)
    for v, w in zip(views, harness._renumbered(views, order), strict=True):
        np.testing.assert_array_equal(perm[w.targets], v.targets)
        ra = harness._rank_individual(a, 20, 2.0, 0.0, 60.0, 50)(v)
        rb = harness._rank_individual(b, 20, 2.0, 0.0, 60.0, 50)(w)
        np.testing.assert_array_equal(perm[rb], ra)


def test_encodings_start_with_full_precision_and_parse_from_the_command_line() -> None:
    from ondevice.eval.__main__ import parse_encodings

    assert parse_encodings("full,compact") == (harness.FULL, harness.COMPACT)
    assert parse_encodings("compact") == (harness.FULL, harness.COMPACT)
    assert parse_encodings("full") == (harness.FULL,)
    with pytest.raises(argparse.ArgumentTypeError, match="known: full, compact"):
        parse_encodings("full,int4")
    with pytest.raises(InvalidInputError, match="start with full precision"):
        harness.EvalSettings(encodings=(harness.COMPACT,))
    with pytest.raises(InvalidInputError, match="repeat"):
        harness.EvalSettings(encodings=(harness.FULL, harness.COMPACT, harness.COMPACT))
    # the hook for a variant of the format: extra write_bundle keyword arguments
    ann = harness.Encoding("compact+ann", "compact + ANN", 2, (("ann", 4),))
    assert harness.EvalSettings(encodings=(harness.FULL, ann)).encodings[1] is ann


def test_full_precision_alone_is_the_table_without_the_compact_pass(
    tiny_result: harness.EvalResult, tiny_data: harness.Dataset
) -> None:
    calls: list[int] = []
    full = harness.evaluate(tiny_data, settings=replace(TINY, encodings=(harness.FULL,)),
                            progress=lambda d, t, s: calls.append(d))
    assert calls[-1] == 2 * (1 + 3 * 2)
    assert full.deltas == () and full.encoded == {"loo": {}, "t20": {}}
    assert "side by side" not in full.to_markdown()
    for p in ("loo", "t20"):
        for a, b in zip(full.rows[p], tiny_result.rows[p], strict=True):
            assert (a.key, a.ndcg, a.hr, a.recall) == (b.key, b.ndcg, b.hr, b.recall)
