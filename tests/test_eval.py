"""The evaluation harness: hand-checked metrics and a tiny end-to-end run."""

from __future__ import annotations

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
    assert calls[-1][0] == calls[-1][1] == 2 * (1 + 3 * 2)
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
    assert sorted(calls) == list(range(2 * (1 + 3 * 2) + 1))
    assert two.chosen == tiny_result.chosen and two.segment_counts == tiny_result.segment_counts
    for p in ("loo", "t20"):
        for a, b in zip(two.rows[p], tiny_result.rows[p], strict=True):
            same = ("hr", "hr_se", "ndcg", "ndcg_se", "recall", "recall_se", "coverage", "users")
            assert [getattr(a, f) for f in same] == [getattr(b, f) for f in same], a.key


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
