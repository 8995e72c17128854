"""Solvers for (C-BN): first-order in torch (CPU or CUDA) and a CVXPY reference backend.

* ``fista``: accelerated proximal gradient (FISTA, backtracking, gradient-mapping restarts,
  block soft-thresholding prox) for the gated relaxation (no cone constraints; convex_bn.md §7.2).
* ``al``: augmented Lagrangian for the exact cone-constrained program (§2.3), each subproblem solved
  by the same FISTA with warm starts; multipliers ``λ ← (λ - δ (2D-1)⊙U'w)_+``, δ raised while the
  violation stalls (scnn's AL, §7.2, with an adaptive δ instead of scnn's fixed 1000/n).
* ``cvxpy``: the SOCP / exponential-cone program (Clarabel by default, SCS as fallback).

Every solver returns a :class:`ConvexSolution` whose certificate is computed the same way:
primal value, Lagrangian-dual lower bound (problem.py), relative gap and max constraint violation.
``converged`` is True only if gap <= tol and violation <= constraint_tol; otherwise a warning
reports the gap (optimality is never claimed).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .problem import ConvexBNProblem

__all__ = ["ConvexSolution", "ConvergenceWarning", "solve", "fista", "augmented_lagrangian", "solve_cvxpy",
           "admm_solve", "SOLVERS"]

SOLVERS = ("auto", "admm", "admm-network", "al", "fista", "cvxpy", "clarabel", "scs")


class ConvergenceWarning(UserWarning):
    """The solver stopped before reaching the requested gap / violation."""


@dataclass
class ConvexSolution:
    """``W`` (C, 2P, q) float64 numpy; rows < P carry sign +1, rows >= P sign -1."""

    W: np.ndarray
    objective: float
    dual_bound: float
    gap: float
    violation: float
    converged: bool
    solver: str
    iterations: int
    time_s: float
    gated: bool = False
    history: list = field(default_factory=list)

    @property
    def certificate(self) -> dict:
        return {"objective": self.objective, "dual_bound": self.dual_bound, "relative_gap": self.gap,
                "max_violation": self.violation, "converged": self.converged, "solver": self.solver,
                "iterations": self.iterations, "time_s": self.time_s}


def _rel_gap(p: float, d: float) -> float:
    return (p - d) / max(1.0, abs(p))


def _unweight(prob: ConvexBNProblem) -> ConvexBNProblem:
    """E2 weights Λ: substitute W' = ΛW, U'' = U' Λ^{-1} (plain group norm in W')."""
    if prob.weights is None:
        return prob
    return ConvexBNProblem(prob.Up / prob.weights, prob.D, prob.Y, prob.beta, prob.loss, None, prob.pool)


def _progress(total: int, verbose: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not verbose, desc=desc, leave=False)


def _prox(V: Tensor, thr: float) -> Tensor:
    nrm = V.norm(dim=-1, keepdim=True)
    return V * (1 - thr / nrm.clamp_min(1e-300)).clamp_min(0)


def _fista_core(fg, W0: Tensor, beta: float, L: float, max_iter: int, tol: float, check=None,
                check_every: int = 10, bar=None) -> tuple[Tensor, float, int]:
    """min f(W) + β Σ||w_j||: returns (W, L, iterations). ``fg(W) -> (f, grad)``; stops when the
    gradient-mapping norm <= tol, or when ``check(W)`` returns True."""
    x = W0.clone()
    y = x.clone()
    t = 1.0
    it = 0
    for it in range(1, max_iter + 1):
        fy, gy = fg(y)
        while True:
            x_new = _prox(y - gy / L, beta / L)
            d = x_new - y
            f_new, _ = fg(x_new, need_grad=False)
            if f_new <= fy + (gy * d).sum() + 0.5 * L * (d * d).sum() + 1e-13 * abs(float(fy)):
                break
            L *= 2.0
        gmap = L * float(d.norm())
        if float(((y - x_new) * (x_new - x)).sum()) > 0:        # restart (O'Donoghue & Candès)
            t, y = 1.0, x_new.clone()
        else:
            t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
            y = x_new + ((t - 1) / t_new) * (x_new - x)
            t = t_new
        x = x_new
        L *= 0.95
        if bar is not None:
            bar.update(1)
        if gmap <= tol:
            break
        if check is not None and it % check_every == 0 and check(x):
            break
    return x, L, it


def _as_tensors(prob: ConvexBNProblem, device, dtype) -> ConvexBNProblem:
    cv = lambda a: None if a is None else a.to(device=device, dtype=dtype)  # noqa: E731
    return ConvexBNProblem(cv(prob.Up), prob.D.to(device), cv(prob.Y), prob.beta, prob.loss, cv(prob.weights),
                           prob.pool)


def fista(prob: ConvexBNProblem, tol: float = 1e-8, max_iter: int = 20000, W0: Tensor | None = None,
          verbose: bool = False) -> ConvexSolution:
    """Gated relaxation (no cone constraints) by restarted FISTA; stops on the relative duality gap."""
    t0 = time.perf_counter()
    if prob.loss == "hinge":
        raise ValueError("loss='hinge' is non-smooth: the first-order solvers need 'squared' or 'logistic'; "
                         "use solver='cvxpy'")
    p = _unweight(prob)

    def fg(W, need_grad=True):
        Z = p.predict(W)
        f = p.loss_value(Z)
        return f, (p.grad_from_pred(p.loss_grad(Z)) if need_grad else None)

    state = {}

    def check(W):
        pv = float(p.objective(W))
        db, _ = p.dual_bound(W)
        state.update(pv=pv, db=float(db))
        return _rel_gap(pv, float(db)) <= tol

    W = p.zeros() if W0 is None else W0.clone()
    with _progress(max_iter, verbose, "fista") as bar:
        W, _, it = _fista_core(fg, W, p.beta, 1.0, max_iter, 0.0, check, bar=bar)
    check(W)
    Wout = W if prob.weights is None else W / prob.weights
    gap = _rel_gap(state["pv"], state["db"])
    return _finish(Wout, state["pv"], state["db"], gap, 0.0, gap <= tol, "fista", it, t0, gated=True)


def augmented_lagrangian(prob: ConvexBNProblem, tol: float = 1e-8, constraint_tol: float = 1e-8,
                         max_iter: int = 50000, max_outer: int = 100000, delta0: float = 100.0,
                         stall: float = 0.9, growth: float = 2.0, inner_decay: float = 0.3, inner_max: int = 100000,
                         W0: Tensor | None = None, verbose: bool = False) -> ConvexSolution:
    """Exact (C-BN) by an augmented Lagrangian; certificate from the multipliers (problem.dual_bound)."""
    t0 = time.perf_counter()
    if prob.loss == "hinge":
        raise ValueError("loss='hinge' is non-smooth: the first-order solvers need 'squared' or 'logistic'; "
                         "use solver='cvxpy'")
    p = _unweight(prob)
    A = p.A.T[None]                                        # (1, 2P, N)
    W = p.zeros() if W0 is None else (W0 if prob.weights is None else W0 * prob.weights).clone()
    lam = torch.zeros(p.n_outputs, 2 * p.n_patterns, p.Up.shape[0], dtype=p.Up.dtype, device=p.Up.device)
    delta = delta0
    L = 1.0
    total = 0
    inner_tol = 1e-2
    prev_viol = math.inf
    history = []
    pv = db = math.inf
    viol = math.inf
    with _progress(max_iter, verbose, "augmented Lagrangian") as bar:
        for outer in range(max_outer):
            def fg(W, need_grad=True, lam=lam, delta=delta):
                Z = p.predict(W)
                G = A * p.hidden(W)
                R = (lam - delta * G).clamp_min(0)
                f = p.loss_value(Z) + (0.5 / delta) * ((R ** 2).sum() - (lam ** 2).sum())
                if not need_grad:
                    return f, None
                return f, p.grad_from_pred(p.loss_grad(Z)) - (R * A) @ p.Up

            W, L, it = _fista_core(fg, W, p.beta, max(L, delta), max(1, min(inner_max, max_iter - total)),
                                   inner_tol, bar=bar)
            total += it
            G = A * p.hidden(W)
            lam = (lam - delta * G).clamp_min(0)
            viol = float(p.violation(W))
            pv = float(p.objective(W))
            db = float(p.dual_bound(W, lam)[0])
            gap = _rel_gap(pv, db)
            history.append({"outer": outer, "iters": total, "objective": pv, "dual": db, "violation": viol,
                            "delta": delta})
            if bar is not None:
                bar.set_postfix(gap=f"{gap:.2e}", viol=f"{viol:.1e}")
            if abs(gap) <= tol and viol <= constraint_tol:
                break
            if total >= max_iter:
                break
            if viol > stall * prev_viol and viol > constraint_tol:
                delta *= growth
            prev_viol = viol
            inner_tol = max(inner_tol * inner_decay, 1e-13)
    gap = _rel_gap(pv, db)
    Wout = W if prob.weights is None else W / prob.weights
    ok = abs(gap) <= tol and viol <= constraint_tol
    sol = _finish(Wout, pv, db, gap, viol, ok, "al", total, t0)
    sol.history = history
    return sol


def admm_solve(prob: ConvexBNProblem, tol: float = 1e-8, constraint_tol: float | None = None,
               max_iter: int = 20000, gated: bool = False, rho: float | None = None, alpha: float = 1.6,
               check_every: int = 10, W0: Tensor | None = None, verbose: bool = False,
               certify: str = "program", repair: bool = True, admm_options: dict | None = None) -> ConvexSolution:
    """Exact (C-BN) (or the gated relaxation, ``gated=True``) by ADMM with an exact cone prox (admm.py).

    ``certify="program"``, ``repair=True`` (default): "repair + certify": the iterate is periodically made
    exactly cone-feasible (admm.repair_cone + admm.polish_scale) and the best repaired objective is paired with
    the best dual bound; stop when that gap <= tol. The returned W is the repaired point (violation <= 1e-13
    relative, also when not converged). ``repair=False``: the previous rule (raw iterate's gap <= tol and
    violation <= constraint_tol; W is the raw, slightly infeasible iterate).
    ``certify="network"``: the primal value is the realised ReLU network ``objective(W, gated=False)`` (the
    (NC) value of ``recover(W)``, feasible for any W); stop when it is <= dual bound + tol·|value|, i.e. the
    returned network is at least as good as the sampled-pattern optimum up to tol (solver "admm-network")."""
    from .admm import admm

    t0 = time.perf_counter()
    ctol = tol if constraint_tol is None else constraint_tol
    with _progress(max_iter, verbose, "admm") as bar:               # E2 weights: weighted-norm prox in admm
        r = admm(prob, tol=tol, constraint_tol=ctol, max_iter=max_iter, rho=rho, alpha=alpha, gated=gated,
                 check_every=check_every, W0=W0, bar=bar, certify=certify, repair=repair, **(admm_options or {}))
    W = r["W"]
    ok = r["gap"] <= tol and (certify == "network" or r["violation"] <= ctol)
    name = "admm" if certify == "program" else "admm-network"
    sol = _finish(W, r["objective"], r["dual"], r["gap"], r["violation"], ok, name, r["iterations"], t0,
                  gated=gated)
    sol.history = r["history"]
    return sol


def _finish(W: Tensor, pv, db, gap, viol, ok, name, it, t0, gated=False) -> ConvexSolution:
    sol = ConvexSolution(W=W.detach().cpu().double().numpy(), objective=pv, dual_bound=db, gap=gap,
                         violation=viol, converged=bool(ok), solver=name, iterations=it,
                         time_s=time.perf_counter() - t0, gated=gated)
    if not ok:
        warnings.warn(f"{name}: stopped after {it} iterations without reaching the tolerance: relative "
                      f"duality gap {gap:.3e}, max constraint violation {viol:.3e}; the objective "
                      f"{pv:.6g} is not certified optimal", ConvergenceWarning, stacklevel=3)
    return sol


def solve_cvxpy(prob: ConvexBNProblem, solver: str = "CLARABEL", gated: bool = False,
                solver_opts: dict | None = None, tol: float = 1e-6) -> ConvexSolution:
    """Reference backend: the same program in CVXPY, one problem per output (one-vs-all).
    Falls back to SCS if the requested solver fails. Certificate recomputed from the CVXPY duals."""
    import cvxpy as cp

    t0 = time.perf_counter()
    Up = prob.Up.detach().cpu().double().numpy()
    D = prob.D.cpu().numpy().astype(float)
    Y = prob.Y.detach().cpu().double().numpy()
    wts = None if prob.weights is None else prob.weights.detach().cpu().double().numpy()
    q, P, N = Up.shape[1], D.shape[1], Up.shape[0]
    A = 2 * D - 1
    Ws, lams, used = [], [], solver
    for c in range(Y.shape[0]):
        S1, S2 = cp.Variable((q, P)), cp.Variable((q, P))
        Z1, Z2 = Up @ S1, Up @ S2
        h = cp.sum(cp.multiply(D, Z1 - Z2), axis=1)
        if prob.pool is not None:
            pool = np.kron(np.eye(N // prob.pool), np.full((1, prob.pool), 1.0 / prob.pool))
            h = pool @ h
        y = Y[c]
        if prob.loss == "squared":
            lossv = 0.5 * cp.sum_squares(h - y)
        elif prob.loss == "logistic":
            lossv = cp.sum(cp.logistic(-cp.multiply(y, h)))
        else:
            lossv = cp.sum(cp.pos(1 - cp.multiply(y, h)))
        M1, M2 = (S1, S2) if wts is None else (np.diag(wts) @ S1, np.diag(wts) @ S2)
        reg = prob.beta * (cp.sum(cp.norm(M1, 2, axis=0)) + cp.sum(cp.norm(M2, 2, axis=0)))
        cons = [] if gated else [cp.multiply(A, Z1) >= 0, cp.multiply(A, Z2) >= 0]
        pr = cp.Problem(cp.Minimize(lossv + reg), cons)
        order = [solver] + [s for s in ("CLARABEL", "SCS") if s != solver]
        for s in order:
            try:
                pr.solve(solver=s, **(solver_opts or {}))
                if pr.status in ("optimal", "optimal_inaccurate") and S1.value is not None:
                    used = s
                    break
            except (cp.error.SolverError, ValueError) as e:  # fall back to the next solver
                warnings.warn(f"CVXPY solver {s} failed ({e}); trying the next one", ConvergenceWarning,
                              stacklevel=2)
        else:
            raise RuntimeError(f"CVXPY could not solve the program (status {pr.status!r})")
        Ws.append(np.concatenate([S1.value.T, S2.value.T], 0))
        lams.append(None if gated else np.concatenate([cons[0].dual_value.T, cons[1].dual_value.T], 0))
    W = torch.as_tensor(np.stack(Ws), dtype=prob.Up.dtype, device=prob.Up.device)
    lam = None if gated else torch.as_tensor(np.maximum(np.stack(lams), 0), dtype=prob.Up.dtype,
                                             device=prob.Up.device)
    pv = float(prob.objective(W))
    db = float(prob.dual_bound(W, lam)[0])
    viol = 0.0 if gated else float(prob.violation(W))
    gap = _rel_gap(pv, db)
    return _finish(W, pv, db, gap, viol, abs(gap) <= max(tol, 1e-6) and viol <= 1e-6, f"cvxpy-{used.lower()}",
                   0, t0, gated=gated)


def solve(prob: ConvexBNProblem, solver: str = "al", tol: float = 1e-8, max_iter: int = 50000,
          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64, verbose: bool = False,
          **kwargs) -> ConvexSolution:
    """Dispatch: ``solver`` in {"auto" (= "admm", or "al" for pooled problems), "admm" (exact; ``gated=True``
    for the relaxation), "admm-network" (= "admm" with ``certify="network"``), "al" (exact), "fista" (gated
    relaxation), "cvxpy"/"clarabel"/"scs"}."""
    if not isinstance(solver, str) or solver.lower() not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")
    s = solver.lower()
    if s == "auto":
        s = "cvxpy" if prob.loss == "hinge" else ("al" if prob.pool is not None else "admm")
    if s in ("cvxpy", "clarabel", "scs"):
        return solve_cvxpy(prob, "CLARABEL" if s == "cvxpy" else s.upper(), tol=tol, **kwargs)
    p = _as_tensors(prob, torch.device(device), dtype)
    if s == "al":
        kwargs.setdefault("constraint_tol", tol)
        return augmented_lagrangian(p, tol=tol, max_iter=max_iter, verbose=verbose, **kwargs)
    if s in ("admm", "admm-network"):
        if s == "admm-network":
            kwargs["certify"] = "network"
        return admm_solve(p, tol=tol, max_iter=max_iter, verbose=verbose, **kwargs)
    return fista(p, tol=tol, max_iter=max_iter, verbose=verbose, **kwargs)
