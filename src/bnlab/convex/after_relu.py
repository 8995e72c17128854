"""BN after the ReLU (convex_bn.md §2.7): ``f(X) = Σ_j BN_{γ_j,α_j}((X w_j)_+) v_j``, squared loss.

Per pattern ``D_i`` (linear arrangements ``1[X g >= 0]`` of the raw data; no first-layer bias in this
model): ``P_n D_i X = U_i Σ_i V_i^T``, ``U'_i = [U_i, 1/sqrt(n)]`` and

    min ½||Σ_i U'_i (s_i - s'_i) - y||² + β Σ_i (||s_i|| + ||s'_i||)
    s.t. (2D_i - I) X w_i >= 0,  s_i[:r_i] = Σ_i V_i^T w_i    (same for s'_i with w'_i)

Recovery: ``w = w_i``, ``γ = ||s[:r_i]||/sqrt(||s||)``, ``α = s[r_i]/sqrt(||s||)``, ``v = ±sqrt(||s||)``.
Solved with CVXPY (the per-pattern whitening has no first-order solver here). Experimental.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AfterReLUSolution", "solve_after_relu", "after_relu_forward", "after_relu_objective"]


@dataclass
class AfterReLUSolution:
    """``W`` (d, m), ``gamma``, ``alpha``, ``v`` (m,); ``objective`` of the convex program."""

    W: np.ndarray
    gamma: np.ndarray
    alpha: np.ndarray
    v: np.ndarray
    objective: float
    n_patterns: int


def _linear_patterns(X: np.ndarray, n_gates: int, seed: int) -> np.ndarray:
    import torch

    G = torch.randn(X.shape[1], n_gates, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    D = np.unique((X @ G.numpy() >= 0).T, axis=0).T
    return D[:, D.any(0)]


def solve_after_relu(X: np.ndarray, y: np.ndarray, beta: float, n_gates: int = 1000, seed: int = 0,
                     rtol: float = 1e-10, solver: str = "CLARABEL") -> AfterReLUSolution:
    import cvxpy as cp

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = X.shape
    D = _linear_patterns(X, n_gates, seed)
    blocks = []
    for i in range(D.shape[1]):          # per-pattern SVDs differ in rank: a small loop over patterns (CVXPY build)
        M = D[:, i:i + 1] * X
        U, S, Vt = np.linalg.svd(M - M.mean(0), full_matrices=False)
        r = int((S > rtol * S[0]).sum()) if S[0] > 0 else 0
        if r == 0:
            continue
        Upi = np.hstack([U[:, :r], np.full((n, 1), 1 / math.sqrt(n))])
        blocks.append((D[:, i], Upi, S[:r], Vt[:r], r))
    pred, reg, cons, vars_ = 0, 0, [], []
    for Di, Upi, S, Vt, r in blocks:
        A = (2 * Di - 1)[:, None] * X
        for _sgn in (1.0, -1.0):
            s, w = cp.Variable(r + 1), cp.Variable(d)
            cons += [A @ w >= 0, s[:r] == (S[:, None] * Vt) @ w]
            pred = pred + _sgn * (Upi @ s)
            reg = reg + cp.norm(s, 2)
            vars_.append((s, w, _sgn, r))
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(pred - y) + beta * reg), cons)
    prob.solve(solver=solver)
    W, g, a, v = [], [], [], []
    for s, w, sgn, r in vars_:
        sv, wv = s.value, w.value
        ns = np.linalg.norm(sv)
        if ns < 1e-9 * max(1.0, abs(prob.value)):
            continue
        W.append(wv)
        g.append(np.linalg.norm(sv[:r]) / math.sqrt(ns))
        a.append(sv[r] / math.sqrt(ns))
        v.append(sgn * math.sqrt(ns))
    return AfterReLUSolution(np.array(W).T.reshape(d, -1), np.array(g), np.array(a), np.array(v),
                             float(prob.value), len(blocks))


def after_relu_forward(X, W, gamma, alpha, v, eps: float = 0.0):
    """Paper-convention BN after ReLU on the batch X (numpy or torch): (n,)."""
    H = X @ W
    H = H * (H > 0)
    Hc = H - H.mean(0)
    nrm = (Hc ** 2).sum(0) ** 0.5 + eps
    n = X.shape[0]
    return ((Hc / nrm) * gamma + alpha / math.sqrt(n)) @ v


def after_relu_objective(X, y, W, gamma, alpha, v, beta: float, eps: float = 0.0):
    """(NC) of the BN-after-ReLU model."""
    f = after_relu_forward(X, W, gamma, alpha, v, eps)
    return 0.5 * ((f - y) ** 2).sum() + 0.5 * beta * ((gamma ** 2).sum() + (alpha ** 2).sum() + (v ** 2).sum())
