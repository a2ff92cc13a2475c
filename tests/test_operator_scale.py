"""The operator's build at scale: the sparse neighbour path, array ingestion, the heavy
user cap, and the hand-off of arrays computed elsewhere (Spark) into a signed bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ondevice import synthetic
from ondevice.bundle import load_bundle
from ondevice.catalog import Catalog
from ondevice.errors import InvalidInputError
from ondevice.operator import build
from ondevice.operator.bundle_writer import (
    generate_signing_key,
    private_key_bytes,
    public_key_bytes,
    write_bundle,
)

SMALL = build.BuildSettings(
    factors=4, iterations=3, neighbours=10, segments=2, min_segment_users=30
)


@pytest.fixture(scope="module")
def data() -> synthetic.SyntheticData:
    return synthetic.generate(n_users=160, n_items=90, n_clusters=3, mean_length=20, seed=5)


def _coded(data: synthetic.SyntheticData) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The panel as codes in the order ``build_catalog`` gives users and items (sorted
    by their string ids)."""
    users = sorted({f"u{u}" for u in data.users.tolist()})
    items = sorted({f"i{i}" for i in data.items.tolist()})
    upos = {n: k for k, n in enumerate(users)}
    ipos = {n: k for k, n in enumerate(items)}
    uu = np.array([upos[f"u{u}"] for u in data.users.tolist()], dtype=np.int32)
    ii = np.array([ipos[f"i{i}"] for i in data.items.tolist()], dtype=np.int64)
    return uu, ii, users, items


@pytest.fixture(scope="module")
def built(data: synthetic.SyntheticData) -> Catalog:
    return build.build_catalog(data.interactions(), settings=SMALL, created_at=1.0)


def _equal_catalogs(a: Catalog, b: Catalog) -> None:
    assert tuple(a.item_ids) == tuple(b.item_ids)
    for name in ("popularity", "nbr_indptr", "nbr_indices", "nbr_weights", "item_factors", "gram"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert len(a.segments) == len(b.segments)
    for s, t in zip(a.segments, b.segments, strict=True):
        assert (s.name, s.panel_users) == (t.name, t.panel_users)
        np.testing.assert_array_equal(s.top_items, t.top_items)
        if s.centroid is None:
            assert t.centroid is None
        else:
            assert t.centroid is not None
            np.testing.assert_allclose(s.centroid, t.centroid, rtol=1e-5, atol=1e-6)
    assert a.default_segment == b.default_segment and a.als == b.als


# --- neighbours: sparse top-k product == dense reference, bit for bit ---------------


def _random_panel(rng: np.random.Generator) -> tuple[build.Csr, int]:
    n_users, n_items = int(rng.integers(1, 50)), int(rng.integers(1, 40))
    nnz = int(rng.integers(0, n_users * n_items + 1))
    x = build.interaction_matrix(
        rng.integers(0, n_users, nnz), rng.integers(0, n_items, nnz), n_users, n_items
    )
    return x, int(rng.integers(1, n_items + 2))


def test_sparse_neighbours_equal_the_dense_path_exactly() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        x, k = _random_panel(rng)
        dense = build.item_neighbours(x, top_n=k, method="dense")
        sparse = build.item_neighbours(
            x, top_n=k, method="sparse", block_cells=int(rng.integers(1, 300))
        )
        for a, b in zip(dense, sparse, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_ties_at_the_cut_keep_the_lowest_indices() -> None:
    # item 0 shares one user with each of items 1..6, all of the same popularity: six
    # equal weights, and top_n = 3 cuts through them; item 7 shares both of its users
    users = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7]
    items = [0, 1, 2, 3, 4, 5, 6, 7, 0, 7, 1, 2, 3, 4, 5, 6]
    x = build.interaction_matrix(np.array(users), np.array(items), 8, 8)
    for method in ("dense", "sparse"):
        ip, ix, w = build.item_neighbours(x, top_n=3, method=method, block_cells=5)
        assert ix[ip[0] : ip[1]].tolist() == [7, 1, 2], method
        assert w[ip[0]] > w[ip[0] + 1] == w[ip[0] + 2]
        for i in range(8):
            assert i not in ix[ip[i] : ip[i + 1]]
            assert (w[ip[i] : ip[i + 1]] > 0).all()


def test_sparse_path_on_the_synthetic_panel_matches_brute_force(
    data: synthetic.SyntheticData,
) -> None:
    x = build.interaction_matrix(data.users, data.items, data.n_users, data.n_items)
    ip, ix, w = build.item_neighbours(x, top_n=12, method="sparse", block_cells=2000)
    d = np.zeros(x.shape)
    d[np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), x.indices] = 1.0
    n = np.sqrt(np.maximum(d.sum(0), 1.0))
    cos = (d.T @ d) / n[:, None] / n[None, :]
    np.fill_diagonal(cos, 0.0)
    for i in range(x.shape[1]):
        order = np.lexsort((np.arange(x.shape[1]), -cos[i]))
        want = [j for j in order[:12].tolist() if cos[i, j] > 0]
        assert ix[ip[i] : ip[i + 1]].tolist() == want
        np.testing.assert_allclose(w[ip[i] : ip[i + 1]], cos[i, want], rtol=1e-6)


def test_heavy_user_cap_is_off_by_default_and_samples_when_on() -> None:
    rng = np.random.default_rng(2)
    x = build.interaction_matrix(rng.integers(0, 30, 900), rng.integers(0, 60, 900), 30, 60)
    lens = np.diff(x.indptr)
    capped = build.cap_user_items(x, 10, seed=4)
    assert (np.diff(capped.indptr) == np.minimum(lens, 10)).all()
    for u in range(30):
        row = capped.row(u)
        assert set(row.tolist()) <= set(x.row(u).tolist())
        assert (np.diff(row) > 0).all()  # columns stay sorted
        if lens[u] <= 10:
            np.testing.assert_array_equal(row, x.row(u))
    again = build.cap_user_items(x, 10, seed=4)
    np.testing.assert_array_equal(capped.indices, again.indices)
    assert not np.array_equal(capped.indices, build.cap_user_items(x, 10, seed=5).indices)
    plain = build.item_neighbours(x, top_n=5, method="sparse")
    with_cap = build.item_neighbours(x, top_n=5, method="sparse", max_user_items=10, seed=4)
    assert any(not np.array_equal(a, c) for a, c in zip(plain, with_cap, strict=True))
    no_op = build.item_neighbours(x, top_n=5, method="sparse", max_user_items=int(lens.max()))
    for a, b in zip(plain, no_op, strict=True):
        np.testing.assert_array_equal(a, b)
    assert build.BuildSettings().max_user_items == 0
    with pytest.raises(InvalidInputError):
        build.BuildSettings(max_user_items=-1)


# --- ingestion from integer-coded arrays ---------------------------------------------


def test_arrays_build_the_same_catalog_as_rows(
    data: synthetic.SyntheticData, built: Catalog
) -> None:
    uu, ii, _users, items = _coded(data)
    from_arrays = build.build_catalog_from_arrays(uu, ii, items, settings=SMALL, created_at=1.0)
    _equal_catalogs(built, from_arrays)


def test_arrays_ingestion_refuses_bad_input() -> None:
    ids = ["a", "b", "c"]
    with pytest.raises(InvalidInputError, match="items holds an index >= 3"):
        build.build_catalog_from_arrays([0, 1], [0, 3], ids)
    with pytest.raises(InvalidInputError, match="negative"):
        build.build_catalog_from_arrays([0, -1], [0, 1], ids)
    with pytest.raises(InvalidInputError, match="integers"):
        build.build_catalog_from_arrays(np.array([0.0, 1.0]), [0, 1], ids)
    with pytest.raises(InvalidInputError, match="differ in length"):
        build.build_catalog_from_arrays([0, 1, 1], [0, 1], ids)
    with pytest.raises(InvalidInputError, match="duplicate"):
        build.build_catalog_from_arrays([0], [0], ["a", "a"])
    with pytest.raises(InvalidInputError, match="empty"):
        build.build_catalog_from_arrays(np.array([], np.int64), np.array([], np.int64), ids)


# --- the hand-off: arrays computed elsewhere -> catalog -> signed bundle ---------------


def _handoff(catalog: Catalog) -> dict[str, Any]:
    assert catalog.als is not None
    return {
        "popularity": catalog.popularity.astype(np.int64),  # Spark counts are integers
        "nbr_indptr": catalog.nbr_indptr,
        "nbr_indices": catalog.nbr_indices.astype(np.int64),
        "nbr_weights": catalog.nbr_weights.astype(np.float64),
        "item_factors": catalog.item_factors,
        "regularization": catalog.als.regularization,
        "alpha": catalog.als.alpha,
    }


def test_assembled_catalog_round_trips_through_a_signed_bundle(
    data: synthetic.SyntheticData, built: Catalog, tmp_path: Path
) -> None:
    uu, ii, _users, items = _coded(data)
    assembled = build.assemble_catalog(
        items, **_handoff(built), panel_users=uu, panel_items=ii, settings=SMALL, created_at=1.0
    )
    # same factors, same lambda: the exact fold-ins, hence the segments, are the build's
    _equal_catalogs(built, assembled)
    key = generate_signing_key()
    path = tmp_path / "assembled.bundle"
    write_bundle(assembled, path, private_key=key, format_version=1)
    loaded = load_bundle(path, public_key=public_key_bytes(key))
    _equal_catalogs(assembled, loaded)
    write_bundle(assembled, tmp_path / "v2.bundle", private_key=key)  # compact format too
    assert load_bundle(tmp_path / "v2.bundle", public_key=public_key_bytes(key)).n_items == len(
        items
    )


def test_assemble_sorts_and_cuts_neighbour_rows_and_reads_triples(built: Catalog) -> None:
    ip, ix, w = built.nbr_indptr, built.nbr_indices, built.nbr_weights
    n = built.n_items
    rows = np.repeat(np.arange(n), np.diff(ip))
    perm = np.random.default_rng(0).permutation(ix.size)
    csr = build.neighbours_from_pairs(rows[perm], ix[perm], w[perm], n)
    # the builder orders equal float32 weights by their float64 values; triples carry
    # only the float32 ones, so their ties go by lower index
    canon = np.lexsort((ix, -w, rows))
    for a, b in zip((ip, ix[canon], w[canon]), csr, strict=True):
        np.testing.assert_array_equal(a, b)
    top3 = build.neighbours_from_pairs(rows[perm], ix[perm], w[perm], n, top_n=3)
    assert (np.diff(top3[0]) == np.minimum(np.diff(ip), 3)).all()
    # rows shuffled inside the CSR: assemble sorts them back, then cuts to settings
    shuffled = np.concatenate([np.arange(ip[i], ip[i + 1])[::-1] for i in range(n)])
    hand = _handoff(built) | {"nbr_indices": ix[shuffled], "nbr_weights": w[shuffled]}
    cat = build.assemble_catalog(
        list(built.item_ids), **hand, settings=build.BuildSettings(neighbours=4)
    )
    assert (np.diff(cat.nbr_indptr) == np.minimum(np.diff(ip), 4)).all()
    for i in range(n):
        got = cat.nbr_indices[cat.nbr_indptr[i] : cat.nbr_indptr[i + 1]]
        np.testing.assert_array_equal(got, ix[ip[i] : ip[i] + got.size])
    assert cat.segments == ()  # no panel, no segments


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"item_factors": "nan"}, "item_factors holds NaN"),
        ({"item_factors": "short"}, "item_factors must have shape"),
        ({"item_factors": "strings"}, "item_factors must hold numbers"),
        ({"popularity": "negative"}, "popularity must be >= 0"),
        ({"nbr_indptr": "short"}, "nbr_indptr must have"),
        ({"nbr_indices": "out of range"}, "nbr_indices holds an index >="),
        ({"nbr_indices": "self"}, "is its own neighbour"),
        ({"nbr_indices": "twice"}, "lists a neighbour twice"),
        ({"nbr_weights": "zero"}, "neighbour weights must be > 0"),
        ({"nbr_weights": "inf"}, "nbr_weights holds NaN or infinite"),
        ({"regularization": -1.0}, "regularization must be a finite number"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"panel_users": "alone"}, "give both panel_users and panel_items"),
        ({"item_ids": "duplicate"}, "duplicate item ids"),
    ],
)
def test_assemble_refuses_bad_arrays_with_a_clear_error(
    built: Catalog, change: dict[str, Any], message: str
) -> None:
    hand = _handoff(built)
    ids = list(built.item_ids)
    ip = hand["nbr_indptr"]
    ((name, how),) = change.items()
    if name == "item_factors":
        y = hand["item_factors"].copy()
        if how == "nan":
            y[3, 1] = np.nan
        hand[name] = {"nan": y, "short": y[:-1], "strings": y.astype(str)}[how]
    elif name == "popularity":
        hand[name] = hand[name] - 10**6
    elif name == "nbr_indptr":
        hand[name] = ip[:-1]
    elif name == "nbr_indices":
        ix = hand[name].copy()
        row = int(np.flatnonzero(np.diff(ip) >= 2)[0])
        if how == "out of range":
            ix[0] = len(ids)
        elif how == "self":
            ix[ip[row]] = row
        else:
            ix[ip[row] + 1] = ix[ip[row]]
        hand[name] = ix
    elif name == "nbr_weights":
        wt = hand[name].copy()
        wt[5] = 0.0 if how == "zero" else np.inf
        hand[name] = wt
    elif name == "panel_users":
        hand[name] = np.zeros(3, dtype=np.int64)
    elif name == "item_ids":
        ids[1] = ids[0]
    else:
        hand[name] = how
    with pytest.raises(InvalidInputError, match=message):
        build.assemble_catalog(ids, **hand)


def test_assemble_command_signs_a_bundle_from_npy_files(
    data: synthetic.SyntheticData, built: Catalog, tmp_path: Path
) -> None:
    uu, ii, users, items = _coded(data)
    hand = _handoff(built)
    (tmp_path / "items.txt").write_text("\n".join(items) + "\n", encoding="utf-8")
    np.save(tmp_path / "pop.npy", hand["popularity"])
    np.save(tmp_path / "factors.npy", hand["item_factors"])
    ip = built.nbr_indptr
    np.savez(
        tmp_path / "nbrs.npz",
        item=np.repeat(np.arange(built.n_items), np.diff(ip)),
        neighbour=built.nbr_indices,
        weight=built.nbr_weights,
    )
    np.savez(tmp_path / "panel.npz", users=uu, items=ii, user_ids=np.array(users))
    key = generate_signing_key()
    (tmp_path / "k").write_bytes(private_key_bytes(key))
    args = [
        sys.executable, "-m", "ondevice.operator", "assemble",
        "--item-ids", str(tmp_path / "items.txt"), "--popularity", str(tmp_path / "pop.npy"),
        "--neighbours", str(tmp_path / "nbrs.npz"), "--factors", str(tmp_path / "factors.npy"),
        "--regularization", str(hand["regularization"]), "--alpha", str(hand["alpha"]),
        "--panel", str(tmp_path / "panel.npz"), "--segments", "2",
        "--min-segment-users", "30", "--neighbours-per-item", "10",
        "--signing-key", str(tmp_path / "k"), "--out", str(tmp_path / "c.bundle"),
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["items"] == len(items)
    loaded = load_bundle(tmp_path / "c.bundle", public_key=public_key_bytes(key))
    np.testing.assert_array_equal(loaded.nbr_indptr, built.nbr_indptr)
    assert [s.panel_users for s in loaded.segments] == [s.panel_users for s in built.segments]
    np.save(tmp_path / "factors.npy", hand["item_factors"][:-1])
    bad = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "item_factors must have shape" in bad.stderr
