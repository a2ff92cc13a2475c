"""The operator's ALS is trained by ``implicit``; the device's fold-in must solve the very
system ``implicit`` solves, so a device user's vector is the one training gave them.

``implicit`` reads a stored value ``v`` as the confidence ``alpha_implicit * v`` of a
positive pair (absent pairs: confidence 1, preference 0) and regularizes plainly with
``regularization * I``. The project's confidence is ``1 + alpha * r``: the builder stores
``1 + alpha * r`` and sets ``implicit``'s alpha to 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_info

from ondevice import scoring, synthetic
from ondevice.bundle import load_bundle
from ondevice.catalog import AlsParams, Catalog
from ondevice.operator import build
from ondevice.operator.bundle_writer import generate_signing_key, public_key_bytes, write_bundle

REG, ALPHA = 3.0, 4.0


@pytest.fixture(scope="module")
def matrix() -> build.Csr:
    data = synthetic.generate(n_users=300, n_items=120, n_clusters=4, mean_length=25, seed=7)
    return build.interaction_matrix(data.users, data.items, data.n_users, data.n_items)


@pytest.fixture(scope="module")
def trained(matrix: build.Csr) -> tuple[np.ndarray, np.ndarray]:
    return build.train_als(
        matrix, factors=12, regularization=REG, alpha=ALPHA, iterations=6, seed=1
    )


def _implicit_model(y: np.ndarray) -> AlternatingLeastSquares:
    with build.single_threaded_blas():
        model = AlternatingLeastSquares(
            factors=y.shape[1], regularization=REG, alpha=1.0, dtype=np.float64, iterations=0
        )
    model.item_factors = y.astype(np.float64)
    return model


def _objective(x: build.Csr, u: np.ndarray, y: np.ndarray, reg: float, alpha: float) -> float:
    """Hu, Koren and Volinsky's loss with c = 1 + alpha * r, computed densely."""
    p = np.zeros(x.shape)
    c = np.ones(x.shape)
    for r in range(x.shape[0]):
        cols = x.row(r)
        p[r, cols] = 1.0
        c[r, cols] = 1.0 + alpha * x.data[x.indptr[r] : x.indptr[r + 1]]
    err = p - u.astype(np.float64) @ y.astype(np.float64).T
    return float((c * err**2).sum() + reg * ((u.astype(np.float64) ** 2).sum() + (y**2).sum()))


def test_the_device_fold_in_of_a_training_user_is_implicits_user_factor(
    matrix: build.Csr, trained: tuple[np.ndarray, np.ndarray]
) -> None:
    u, y = trained
    gram = (y.astype(np.float64).T @ y).astype(np.float32)  # as the bundle ships it
    for user in (0, 5, 42, 117, 299):
        device = scoring.fold_in(y, gram, matrix.row(user), regularization=REG, alpha=ALPHA)
        np.testing.assert_allclose(device, u[user], rtol=2e-5, atol=1e-6)
    # every user at once, and the active ones are not trivially zero
    batch = build.user_vectors(matrix, y, regularization=REG, alpha=ALPHA)
    np.testing.assert_array_equal(batch, u)
    assert np.linalg.norm(u, axis=1).min() > 0.1


def test_implicit_solves_the_devices_system_once_its_matrix_holds_1_plus_alpha_r(
    matrix: build.Csr, trained: tuple[np.ndarray, np.ndarray]
) -> None:
    _, y = trained
    model = _implicit_model(y)
    gram = y.astype(np.float64).T @ y
    rng = np.random.default_rng(3)
    for user in (3, 77, 250):
        items = matrix.row(user)
        r = rng.integers(1, 5, size=items.size).astype(np.float32)  # graded evidence
        row = scipy.sparse.csr_matrix(
            (1.0 + ALPHA * r, items, [0, items.size]), shape=(1, matrix.shape[1])
        )
        with build.single_threaded_blas():
            theirs = model.recalculate_user(user, row)
        ours = scoring.fold_in(y, gram, items, regularization=REG, alpha=ALPHA, values=r)
        np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6)
        # implicit's own alpha reads c = alpha * r: not this project's 1 + alpha * r
        raw = scipy.sparse.csr_matrix((r, items, [0, items.size]), shape=(1, matrix.shape[1]))
        model.alpha = ALPHA
        with build.single_threaded_blas():
            other = model.recalculate_user(user, raw)
        model.alpha = 1.0
        assert np.abs(other - ours).max() > 1e-2 * np.abs(ours).max()


def test_a_bundle_carries_the_trained_factors_to_the_device_fold_in(
    matrix: build.Csr, trained: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    u, y = trained
    n = matrix.shape[1]
    empty_nbr = (np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    catalog = Catalog(
        item_ids=tuple(f"i{i}" for i in range(n)),
        titles=tuple(f"i{i}" for i in range(n)),
        popularity=build.item_popularity(matrix),
        nbr_indptr=empty_nbr[0],
        nbr_indices=empty_nbr[1],
        nbr_weights=empty_nbr[2],
        item_factors=y,
        gram=(y.astype(np.float64).T @ y).astype(np.float32),
        als=AlsParams(factors=y.shape[1], regularization=REG, alpha=ALPHA),
    )
    key = generate_signing_key()
    path = tmp_path / "full.bundle"
    write_bundle(catalog, path, private_key=key, format_version=1)  # full precision
    loaded = load_bundle(path, public_key=public_key_bytes(key))
    assert loaded.als is not None and loaded.item_factors is not None and loaded.gram is not None
    for user in (1, 60, 200):
        device = scoring.fold_in(
            loaded.item_factors,
            loaded.gram,
            matrix.row(user),
            regularization=loaded.als.regularization,
            alpha=loaded.als.alpha,
        )
        np.testing.assert_allclose(device, u[user], rtol=2e-5, atol=1e-6)


def test_enough_cg_steps_reach_the_exact_solvers_objective(matrix: build.Csr) -> None:
    kw = dict(factors=12, regularization=REG, alpha=ALPHA, iterations=8, seed=2)
    exact = _objective(matrix, *build.train_als(matrix, cg_steps=0, **kw), REG, ALPHA)
    cg = _objective(
        matrix, *build.train_als(matrix, cg_steps=build.ALS_CG_STEPS, **kw), REG, ALPHA
    )
    one = _objective(matrix, *build.train_als(matrix, cg_steps=1, **kw), REG, ALPHA)
    assert cg <= exact * 1.002  # the default's objective is the exact one's, to 0.2%
    assert one > cg * 1.002  # the measurement can fail: one step is not enough


def test_training_holds_blas_to_one_thread_and_is_the_same_on_any_thread_count(
    matrix: build.Csr,
) -> None:
    def blas() -> dict[str, int]:
        info = threadpool_info()
        return {a["filepath"]: a["num_threads"] for a in info if a["user_api"] == "blas"}

    before = blas()
    seen: list[int] = []

    def watch(done: int, total: int, stage: str) -> None:
        seen.extend(blas().values())

    one = build.train_als(matrix, factors=8, iterations=3, threads=1, progress=watch)
    two = build.train_als(matrix, factors=8, iterations=3, threads=2)
    assert seen and set(seen) == {1}
    assert blas() == before  # BLAS gets its threads back afterwards
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
