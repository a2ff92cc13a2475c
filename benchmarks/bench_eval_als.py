"""The operator's ALS training: ``implicit`` against a plain numpy exact ALS, one run.

Trains the evaluation's model (64 factors, 8 iterations, the three (regularization,
alpha) pairs of its grid) on MovieLens-100K (``--movielens DIR``) or on the project's
synthetic data, and prints wall and CPU seconds per training and the objective
(``sum c (p - x.y)^2 + lambda (|X|^2 + |Y|^2)``, ``c = 1 + alpha r``) relative to the
exact solver's:

- ``implicit, exact``: :func:`ondevice.operator.build.train_als` with ``cg_steps=0``;
- ``implicit, CG n``: the same with n conjugate-gradient steps per row (10 is the
  default, 3 is ``implicit``'s own);
- ``numpy, BLAS 1 thread`` and ``numpy, BLAS default``: the floor, a straightforward
  numpy implementation of the same exact ALS (a Python loop over rows, small matrix
  products, batched ``np.linalg.solve``), like the hand-written trainer of ondevice
  0.2, with BLAS held to one thread and with its default thread count. On a busy
  two-core machine the default costs many times the CPU of one thread: BLAS threads
  wait for each other on every small product.

    .venv/bin/python benchmarks/bench_eval_als.py [--movielens DIR] [--iterations 8]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from ondevice.operator import build
from ondevice.synthetic import generate

GRID = ((2.0, 2.0), (10.0, 5.0), (30.0, 10.0))


def _matrix(path: str | None) -> build.Csr:
    if path:
        from ondevice.eval.movielens import load_movielens

        d = load_movielens(path)
        users = np.concatenate([np.full(s.size, u) for u, s in enumerate(d.sequences)])
        return build.interaction_matrix(users, np.concatenate(d.sequences), d.n_users, d.n_items)
    s = generate(n_users=900, n_items=1600, mean_length=100, seed=0)
    return build.interaction_matrix(s.users, s.items, s.n_users, s.n_items)


def _numpy_side(m: build.Csr, other: np.ndarray, reg: float, alpha: float) -> np.ndarray:
    f = other.shape[1]
    base = other.T @ other + reg * np.eye(f)
    a = np.broadcast_to(base, (m.shape[0], f, f)).copy()
    b = np.zeros((m.shape[0], f))
    for r in range(m.shape[0]):
        cols = m.row(r)
        if cols.size:
            yu = other[cols]
            c = alpha * m.data[m.indptr[r] : m.indptr[r + 1]].astype(np.float64)
            a[r] += (yu * c[:, None]).T @ yu
            b[r] = yu.T @ (1.0 + c)
    out: np.ndarray = np.linalg.solve(a, b[..., None])[..., 0]
    return out


def _numpy_als(
    x: build.Csr, factors: int, reg: float, alpha: float, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    # the start train_als uses: small zero-mean item factors from the same seed
    y = np.random.default_rng(0).normal(0.0, 0.1 / math.sqrt(factors), (x.shape[1], factors))
    y = y.astype(np.float32).astype(np.float64)
    xt = x.transpose()
    for _ in range(iterations):
        u = _numpy_side(x, y, reg, alpha)
        y = _numpy_side(xt, u, reg, alpha)
    return _numpy_side(x, y, reg, alpha), y


def _objective(x: build.Csr, u: np.ndarray, y: np.ndarray, reg: float, alpha: float) -> float:
    u, y = u.astype(np.float64), y.astype(np.float64)
    total = float(np.trace((u.T @ u) @ (y.T @ y)))  # every pair with p = 0, c = 1
    for r in range(x.shape[0]):
        cols = x.row(r)
        if cols.size:
            s = y[cols] @ u[r]
            c = 1.0 + alpha * x.data[x.indptr[r] : x.indptr[r + 1]]
            total += float((c * (1.0 - s) ** 2).sum() - (s**2).sum())
    return total + reg * float((u**2).sum() + (y**2).sum())


def _timed(fn: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[float, float, tuple]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--movielens", metavar="DIR", help="ML-100K (default: synthetic data)")
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--skip-numpy-default", action="store_true",
                    help="skip the slow numpy run with default BLAS threads")
    args = ap.parse_args()
    x = _matrix(args.movielens)
    print(f"{x.shape[0]} users x {x.shape[1]} items, {x.indices.size} interactions; "
          f"{args.factors} factors, {args.iterations} iterations")
    print(f"{'trainer':<26} {'reg':>5} {'alpha':>5} {'wall s':>8} {'CPU s':>8} "
          f"{'objective / exact':>18}")
    for reg, alpha in GRID:
        exact = math.nan
        for name, fn in _runs(x, reg, alpha, args):
            wall, cpu, (u, y) = _timed(fn)
            obj = _objective(x, u, y, reg, alpha)
            if name == "implicit, exact":
                exact = obj
            print(f"{name:<26} {reg:>5g} {alpha:>5g} {wall:>8.2f} {cpu:>8.2f} "
                  f"{obj / exact:>18.5f}", flush=True)


def _runs(
    x: build.Csr, reg: float, alpha: float, args: argparse.Namespace
) -> list[tuple[str, Callable[[], tuple[np.ndarray, np.ndarray]]]]:
    def implicit(n: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        return lambda: build.train_als(x, factors=args.factors, regularization=reg,
                                       alpha=alpha, iterations=args.iterations, cg_steps=n)

    def numpy_als() -> tuple[np.ndarray, np.ndarray]:
        return _numpy_als(x, args.factors, reg, alpha, args.iterations)

    def one_thread() -> tuple[np.ndarray, np.ndarray]:
        with threadpool_limits(limits=1, user_api="blas"):
            return numpy_als()

    runs = [(f"implicit, CG {n}" if n else "implicit, exact", implicit(n))
            for n in (0, 3, 6, build.ALS_CG_STEPS)]
    runs.append(("numpy, BLAS 1 thread", one_thread))
    if not args.skip_numpy_default:
        runs.append(("numpy, BLAS default", numpy_als))
    return runs


if __name__ == "__main__":
    main()
