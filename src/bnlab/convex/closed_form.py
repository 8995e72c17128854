"""Closed-form optima in the high-dimensional regime (convex_bn.md §3.1, §3.2; §4.2 for the last block
of a deep net on a wide representation).

Applies when ``rank(P_n X) = n - 1`` (then ``U'`` is n×n orthogonal and every sign pattern is an
arrangement), squared loss, no truncation/spectral weighting. Per output column ``y``:
``f* = (1 - β/||y_+||)_+ y_+ - (1 - β/||y_-||)_+ y_-`` and ``p* = φ(||y_+||) + φ(||y_-||)`` with
``φ(t) = t²/2 (t <= β), βt - β²/2 (t > β)``. Convex blocks ``s_± = (1 - β/||y_±||)_+ U'^T y_±`` on the
patterns ``1[y > 0]``, ``1[y < 0]``. One-hot targets (§3.2) are the special case ``y_- = 0`` per column.
"""

from __future__ import annotations

import time

import numpy as np

from .patterns import Whitening
from .solvers import ConvexSolution

__all__ = ["closed_form_applies", "closed_form", "phi"]


def phi(t: np.ndarray, beta: float) -> np.ndarray:
    """Huber-type value of one soft-thresholded half (§3.1)."""
    t = np.asarray(t, dtype=np.float64)
    return np.where(t <= beta, 0.5 * t * t, beta * t - 0.5 * beta * beta)


def closed_form_applies(wh: Whitening, loss: str = "squared", k: int | None = None,
                        spectral_p: float = 0.0) -> bool:
    """True iff the §3 regime holds: rank(P_n X) = n - 1, no truncation below it, squared loss, plain C-BN."""
    return (loss == "squared" and wh.rank == wh.n - 1 and wh.k == wh.rank and spectral_p == 0
            and (k is None or k >= wh.rank))


def closed_form(wh: Whitening, Y: np.ndarray, beta: float) -> tuple[ConvexSolution, np.ndarray]:
    """Y (C, n) -> (solution with blocks W (C, 4C, q), patterns D (n, 2C)); vectorised over outputs."""
    t0 = time.perf_counter()
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    C, n = Y.shape
    Yp, Ym = np.maximum(Y, 0), np.maximum(-Y, 0)
    D = np.concatenate([Yp.T > 0, Ym.T > 0], 1)                       # (n, 2C): patterns 0..C-1 (+), C..2C-1 (-)
    npos, nneg = np.linalg.norm(Yp, axis=1), np.linalg.norm(Ym, axis=1)
    shrink = lambda t: np.maximum(1 - beta / np.maximum(t, 1e-300), 0)  # noqa: E731
    P = 2 * C
    W = np.zeros((C, 2 * P, wh.q))
    ar = np.arange(C)
    W[ar, ar] = shrink(npos)[:, None] * (Yp @ wh.Up)                  # s_+ on pattern c, sign +
    W[ar, P + C + ar] = shrink(nneg)[:, None] * (Ym @ wh.Up)          # s_- on pattern C + c, sign -
    p_star = float(phi(npos, beta).sum() + phi(nneg, beta).sum())
    sol = ConvexSolution(W=W, objective=p_star, dual_bound=p_star, gap=0.0, violation=0.0, converged=True,
                         solver="closed_form", iterations=0, time_s=time.perf_counter() - t0)
    return sol, D
