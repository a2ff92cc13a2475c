"""Centralized, non-private references: what a server holding every user's data gets.

- :func:`ease_fit` / :func:`ease_rank`: EASE (Steck, 2019), the closed-form item-item
  model ``B = I - P diag(1 / diag P)`` with ``P = (X^T X + lambda I)^-1``, zero diagonal;
- central ALS: :func:`ondevice.operator.build.train_als` on every user's training data,
  scored with each device user's own trained vector;
- central versions of each level: the harness builds popularity, neighbours, segments
  and ALS from everyone's training data with the same operator functions and scores
  them with the same device functions, so a level and its central twin differ only in
  who trained the model.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ondevice.operator.build import Csr

__all__ = ["ease_fit", "ease_rank"]

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


def _spd_inverse(g: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The inverse of a symmetric positive definite matrix through its Cholesky factor
    (LAPACK ``potrf`` + ``potri``: half the work of a general inverse)."""
    from scipy.linalg import lapack  # type: ignore[import-untyped]

    c, info = lapack.dpotrf(g, lower=False)
    if info == 0:
        inv, info = lapack.dpotri(c, lower=False)
        if info == 0:
            upper = np.triu(inv)
            out: npt.NDArray[np.float64] = upper + np.triu(upper, 1).T
            return out
    # not positive definite (regularization 0): the general way
    general: npt.NDArray[np.float64] = np.linalg.inv(g).astype(np.float64)
    return general


def ease_fit(x: Csr, regularization: float) -> F32:
    """The EASE item-item weight matrix ``B`` (``float32[n, n]``) of a binary matrix."""
    n = x.shape[1]
    xd = np.zeros(x.shape, dtype=np.float32)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    xd[rows, x.indices] = 1.0
    g = (xd.T @ xd).astype(np.float64)
    g[np.diag_indices(n)] += regularization
    p = _spd_inverse(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices(n)] = 0.0
    return b.astype(np.float32)


def ease_rank(b: F32, items: npt.NDArray[np.integer]) -> F32:
    """EASE scores of a user who interacted with ``items``: the sum of their rows."""
    idx = np.asarray(items, dtype=np.int64)
    if idx.size == 0:
        return np.zeros(b.shape[0], dtype=np.float32)
    out: F32 = b[idx].sum(axis=0, dtype=np.float32)
    return out
