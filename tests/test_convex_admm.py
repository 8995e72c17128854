"""Tests for the ADMM solver of (C-BN) (bnlab.convex.admm; solver="admm"/"auto")."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bnlab.convex.admm import admm, polish_scale, repair_cone, zprox_logistic, zprox_squared, zprox_squared_newton
from bnlab.convex.patterns import PatternWarning, sample_patterns, whiten
from bnlab.convex.problem import ConvexBNProblem
from bnlab.convex.solvers import ConvergenceWarning, solve

torch.set_num_threads(1)
T = torch.as_tensor


def _prox_case(seed=0, C=2, N=7, J=10):
    g = torch.Generator().manual_seed(seed)
    V = 3 * torch.randn(C, N, J, generator=g, dtype=torch.float64)
    M = torch.rand(N, J, generator=g) < 0.6
    M[0] = False                                   # a sample with no active block
    M[1] = True                                    # a sample with all blocks active
    s = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat_interleave(J // 2)
    Y = torch.randn(C, N, generator=g, dtype=torch.float64)
    return V, M, s, Y


def _kkt_squared(Z, V, M, s, Y, rho, gated=False):
    """Max deviation from the KKT fixed point z = Π(v - r s/ρ), r = Σ_M s z - y (sufficient: convex)."""
    r = (Z * s * M).sum(-1, keepdim=True) - Y[..., None]
    U = V - r * s / rho
    Zs = torch.where(M, U, V) if gated else torch.where(M, U.clamp_min(0), V.clamp_max(0))
    return float((Zs - Z).abs().max())


@pytest.mark.parametrize("rho", [0.05, 1.0, 40.0])
def test_zprox_squared_sort_and_newton_satisfy_kkt(rho):
    V, M, s, Y = _prox_case()
    Z = zprox_squared(V, M, s, Y, rho)
    assert _kkt_squared(Z, V, M, s, Y, rho) < 1e-12
    Zn, r = zprox_squared_newton(V, M, s, Y, rho, None)
    torch.testing.assert_close(Zn, Z, atol=1e-12, rtol=0)
    Zw, _ = zprox_squared_newton(V + 0.1, M, s, Y, rho, r)        # warm start from another point
    assert _kkt_squared(Zw, V + 0.1, M, s, Y, rho) < 1e-12
    Zg = zprox_squared(V, M, s, Y, rho, gated=True)
    assert _kkt_squared(Zg, V, M, s, Y, rho, gated=True) < 1e-12
    # not the identity: the prox moved the point and the cone signs hold
    assert float((Z - V).abs().max()) > 1e-3 and bool((Z[..., ~M] <= 0).all()) and bool((Z[:, M] >= 0).all())


def test_zprox_logistic_satisfies_kkt():
    V, M, s, Y = _prox_case(1)
    Y = torch.where(Y > 0, 1.0, -1.0).double()
    rho = 0.7
    for gated in (False, True):
        Z = zprox_logistic(V, M, s, Y, rho, gated)
        pred = (Z * s * M).sum(-1, keepdim=True)
        g = -Y[..., None] * torch.sigmoid(-Y[..., None] * pred)      # ℓ'(pred)
        U = V - g * s / rho
        Zs = torch.where(M, U if gated else U.clamp_min(0), V if gated else V.clamp_max(0))
        assert float((Zs - Z).abs().max()) < 1e-12


def _problem(n=12, d=3, seed=0, gates=40, beta=0.1, loss="squared", weights=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    if loss != "squared":
        y = np.where(y > 0, 1.0, -1.0)
    wh = whiten(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D = sample_patterns(wh.Up, gates, seed=1)
    return ConvexBNProblem(T(wh.Up), T(D), T(y), beta, loss, weights)


@pytest.mark.parametrize("seed, beta", [(0, 0.1), (3, 0.5)])
def test_admm_matches_clarabel_and_certifies(seed, beta):
    prob = _problem(seed=seed, beta=beta)
    ref = solve(prob, "clarabel")
    sol = solve(prob, "admm", tol=1e-8)
    assert sol.converged and sol.gap <= 1e-8 and sol.violation <= 1e-12      # repaired: exactly feasible
    assert abs(sol.objective - ref.objective) <= 1e-6 * ref.objective
    assert abs(sol.objective - float(prob.objective(T(sol.W)))) <= 1e-12 * sol.objective   # value of W itself
    assert sol.dual_bound <= ref.objective * (1 + 1e-9)             # a valid lower bound
    assert all(h["dual"] <= ref.objective * (1 + 1e-9) for h in sol.history)   # at every checked iterate
    assert solve(prob, "auto", tol=1e-6).solver == "admm"


def test_admm_vector_output_and_spectral_weights():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((10, 3))
    Y = np.eye(3)[rng.integers(0, 3, 10)].T                            # (C, n) one-hot targets
    wh = whiten(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D = sample_patterns(wh.Up, 30, seed=0)
    w = T(np.array([1.0, 2.0, 0.5, 1.5]))
    prob = ConvexBNProblem(T(wh.Up), T(D), T(Y), 0.2, weights=w)
    ref = solve(prob, "clarabel")
    sol = solve(prob, "admm", tol=1e-9)
    assert sol.converged and abs(sol.objective - ref.objective) <= 1e-6 * ref.objective


def test_admm_gated_relaxation_and_logistic():
    prob = _problem(seed=2, beta=0.2)
    ref_g = solve(prob, "cvxpy", gated=True)
    sol_g = solve(prob, "admm", tol=1e-9, gated=True)
    assert sol_g.converged and sol_g.gated and abs(sol_g.objective - ref_g.objective) <= 1e-6 * ref_g.objective
    lp = _problem(seed=4, beta=0.2, loss="logistic", gates=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)            # Clarabel's own logistic gap ~1e-5
        ref = solve(lp, "cvxpy")
    sol = solve(lp, "admm", tol=1e-8)
    assert sol.converged and abs(sol.objective - ref.objective) <= 1e-6 * ref.objective


def test_admm_reports_nonconvergence_and_bad_arguments():
    prob = _problem()
    with pytest.warns(ConvergenceWarning, match="relative duality gap"):
        sol = solve(prob, "admm", max_iter=20)
    assert not sol.converged and sol.gap > 1e-8 and np.isfinite(sol.gap)   # reports its gap, claims nothing
    assert sol.violation <= 1e-12                                            # still a feasible (repaired) point
    assert sol.objective >= sol.dual_bound
    with pytest.warns(ConvergenceWarning):
        raw = solve(prob, "admm", max_iter=20, repair=False)                 # old rule: the raw iterate
    assert not raw.converged and raw.violation > 1e-12
    with pytest.raises(ValueError, match="repair_every"):
        admm(prob, repair_every=0)
    with pytest.raises(ValueError, match="solver must be one of"):
        solve(prob, "newton")
    pooled = ConvexBNProblem(prob.Up, prob.D, prob.Y[:, :6], 0.1, pool=2)
    with pytest.raises(ValueError, match="pool"):
        solve(pooled, "admm")
    with pytest.raises(ValueError, match="hinge"):
        solve(_problem(loss="hinge", gates=5), "admm")


def test_admm_network_certificate_bounds_the_recovered_network():
    from bnlab.convex.recover import BNReLUNet, nc_objective, recover

    rng = np.random.default_rng(7)
    X, y = rng.standard_normal((14, 3)), rng.standard_normal(14)
    wh = whiten(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D = sample_patterns(wh.Up, 30, seed=2)
    prob = ConvexBNProblem(T(wh.Up), T(D), T(y), 0.1)
    ref = solve(prob, "clarabel")
    sol = solve(prob, "admm", tol=1e-5, certify="network")
    assert sol.converged and sol.solver == "admm-network"
    assert sol.dual_bound <= ref.objective * (1 + 1e-9)
    net = BNReLUNet.from_params(recover(sol.W, wh), X)
    nc = float(nc_objective(net, T(X), T(y), 0.1))
    assert abs(nc - sol.objective) <= 1e-8 * sol.objective          # the certified value is the network's
    assert nc <= ref.objective * (1 + 1e-5) + 1e-12                 # at least as good as the program optimum


def test_estimator_admm_network_reports_its_networks_objective():
    from sklearn.datasets import load_digits

    from bnlab.convex.estimator import ConvexBNClassifier
    from bnlab.convex.recover import nc_objective

    X, y = load_digits(return_X_y=True)
    m = y < 2
    X, y = X[m][:60], y[m][:60]
    clf = ConvexBNClassifier(beta=0.1, n_patterns=20, solver="admm-network", tol=1e-5, k=5).fit(X, y)
    cert = clf.certificate_
    assert cert["solver"] == "admm-network" and cert["converged"] and clf.score(X, y) > 0.95
    Y = T(2.0 * y - 1)[:, None]
    nc = float(nc_objective(clf.to_torch(), T(X), Y, 0.1))
    assert abs(nc - cert["objective"]) <= 1e-7 * cert["objective"]


def test_repair_cone_is_exactly_feasible_and_polish_is_optimal_rescaling():
    from scipy.optimize import minimize

    p = _problem(seed=1, beta=0.1)
    W = admm(p, tol=1e-12, max_iter=30, repair=False)["W"]                  # an infeasible ADMM iterate
    A = p.A.T[None]
    G = A * p.hidden(W)
    assert float(p.violation(W)) > 1e-4
    Wr, info = repair_cone(p, W)
    Gr = A * p.hidden(Wr)
    assert float(Gr.min()) >= -1e-13 * float(Gr.abs().max()) and info["blocks"] > 0
    ok = (G >= 0).all(-1)                                                    # feasible blocks are untouched
    assert torch.equal(Wr[ok], W[ok])
    assert bool((Wr.norm(dim=-1) <= W.norm(dim=-1) * (1 + 1e-12)).all())     # a projection: no norm growth
    viol_rows = (G < 0) & (Wr.norm(dim=-1, keepdim=True) > 0)               # violated rows now hold with equality
    assert float(Gr[viol_rows].abs().max()) <= 1e-12 * float(Gr.abs().max())
    # polish: nonnegative rescaling of the blocks (checked against L-BFGS-B on c), feasibility kept
    Wp = polish_scale(p, Wr, iters=2000)
    assert float(p.violation(Wp)) <= 1e-13
    nz = (Wr[0].norm(dim=-1) > 0).nonzero().flatten()
    F = ((Wr[0, nz] @ p.Up.T) * p.Dsgn.T[nz] * p.sigma[nz, None]).numpy()
    nrm, y = Wr[0, nz].norm(dim=-1).numpy(), p.Y[0].numpy()

    def f(c):
        r = F.T @ c - y
        return 0.5 * r @ r + p.beta * nrm @ c, F @ r + p.beta * nrm

    ref = minimize(f, np.ones(len(nz)), jac=True, bounds=[(0, None)] * len(nz), method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000}).fun
    assert ref * (1 - 1e-9) <= float(p.objective(Wp)) <= ref * (1 + 1e-6)   # FISTA: near the optimal rescale
    assert float(p.objective(Wp)) < float(p.objective(Wr)) - 1e-6            # it did something
    # far from converged (3 iterations): blocks that collapse to rounding noise are dropped, not rescaled up
    W3 = admm(p, tol=1e-12, max_iter=3, repair=False)["W"]
    W3r, _ = repair_cone(p, W3)
    assert float(p.violation(W3r)) <= 1e-12 and float(p.violation(polish_scale(p, W3r))) <= 1e-12


@pytest.fixture(scope="module")
def digits_problem():
    """sklearn digits 0/1 (80 samples), top-6 whitening, 25 patterns, beta 0.5, and its tight Clarabel solution."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    m = y < 2
    X, y = X[m][:80] / 16.0, np.where(y[m][:80] == 1, 1.0, -1.0)
    wh = whiten(X, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D = sample_patterns(wh.Up, 25, seed=0)
    prob = ConvexBNProblem(T(wh.Up), T(D), T(y), 0.5)
    ref = solve(prob, "clarabel", solver_opts={"tol_gap_rel": 1e-10, "tol_gap_abs": 1e-10, "tol_feas": 1e-10})
    return prob, ref


def test_admm_program_certificate_on_digits_matches_clarabel(digits_problem):
    prob, ref = digits_problem
    sol = solve(prob, "admm", tol=1e-7)
    assert sol.converged and sol.solver == "admm" and sol.gap <= 1e-7
    assert float(prob.violation(T(sol.W))) <= 1e-12                         # recomputed, not just reported
    assert abs(sol.objective - ref.objective) <= 1e-6 * ref.objective
    assert sol.dual_bound <= ref.objective * (1 + 1e-9)
    # the active-set Newton polish (default) certifies in far fewer iterations than ADMM alone
    fast, slow = admm(prob, tol=1e-7), admm(prob, tol=1e-7, newton_polish=False)
    assert fast["gap"] <= 1e-7 and slow["gap"] <= 1e-7 and fast["iterations"] < slow["iterations"] / 4
    assert abs(fast["objective"] - ref.objective) <= 1e-7 * ref.objective


@pytest.mark.parametrize("seed, beta, n, gates", [(3, 0.5, 12, 40), (1, 0.1, 30, 60)])
def test_newton_polish_certifies_tightly_in_fewer_iterations(seed, beta, n, gates):
    p = _problem(n=n, seed=seed, beta=beta, gates=gates)
    ref = solve(p, "clarabel", solver_opts={"tol_gap_rel": 1e-11, "tol_gap_abs": 1e-11, "tol_feas": 1e-11}).objective
    fast = admm(p, tol=1e-6, max_iter=5000)
    slow = admm(p, tol=1e-6, max_iter=5000, newton_polish=False)
    assert fast["gap"] <= 1e-6 and abs(fast["objective"] - ref) <= 1e-6 * ref
    assert float(p.violation(fast["W"])) <= 1e-12                            # exactly cone-feasible (recomputed)
    assert abs(fast["objective"] - float(p.objective(fast["W"]))) <= 1e-12 * ref
    assert fast["dual"] <= ref * (1 + 1e-9)                                  # a valid lower bound
    assert all(h["newton_dual"] <= ref * (1 + 1e-9) for h in fast["history"] if "newton_dual" in h)
    assert any("newton_dual" in h for h in fast["history"])
    assert fast["iterations"] < slow["iterations"] / 2


def test_polish_active_set_recovers_the_optimum_and_its_dual():
    from bnlab.convex.polish import polish_active_set

    p = _problem(n=30, seed=1, beta=0.1, gates=60)
    ref = solve(p, "clarabel", solver_opts={"tol_gap_rel": 1e-11, "tol_gap_abs": 1e-11, "tol_feas": 1e-11}).objective
    r = admm(p, tol=1e-14, max_iter=300, repair=False, newton_polish=False)   # ADMM alone: gap ~1e-2 here
    assert r["gap"] > 1e-4
    Wp, lam = polish_active_set(p, r["W"], r["Z"], r["Yd"])
    assert bool((lam >= 0).all())
    Wr, _ = repair_cone(p, Wp)
    pv, dv = float(p.objective(Wr)), float(p.dual_bound(Wp, lam)[0])
    assert float(p.violation(Wr)) <= 1e-12
    assert ref * (1 - 1e-9) <= pv <= ref * (1 + 1e-8) and ref * (1 - 1e-8) <= dv <= ref * (1 + 1e-9)
    cache: dict = {}
    assert polish_active_set(p, r["W"], r["Z"], r["Yd"], cache=cache) is not None
    assert polish_active_set(p, r["W"], r["Z"], r["Yd"], cache=cache) is None     # same guess: skipped
    lp = _problem(seed=4, beta=0.2, loss="logistic", gates=20)
    assert polish_active_set(lp, r["W"][:, :40], r["Z"][:, :40], r["Yd"][:, :40]) is None   # squared loss only


def test_bench_rows_mapping_keeps_target_and_certificate():
    from bnlab.benchmarks.convex import _result

    row = {"name": "ADMM vs Clarabel", "size": "n=500", "ours_ms": 10.0, "baseline_ms": 400.0, "ratio": 0.025,
           "target": 0.05, "rel_gap": 3e-5, "certified": True, "gap": 9e-5, "iterations": 1500}
    r = _result(row, "cpu")
    assert r.name == "convex/ADMM vs Clarabel" and r.ratio == 0.025 and r.met is True
    assert r.extra["iterations"] == 1500 and "certified=True" in r.note
    r2 = _result(dict(row, ours_ms=30.0), "cpu")
    assert r2.met is False                                          # 30/400 = 0.075 > 0.05


# --- network-certificate fast path (admm.admm_network: (C, N, 2P) layout, float32 bulk, float64 certificate) ---

@pytest.mark.parametrize("rho", [0.05, 1.0, 40.0])
def test_zprox_squared_nj_matches_the_exact_prox(rho):
    from bnlab.convex.admm import zprox_squared_nj

    V, M, s, Y = _prox_case(2, C=2, N=9, J=12)
    Mf = M.double()
    Z, r = zprox_squared_nj(V, Mf, s, Y, rho)
    assert _kkt_squared(Z, V, M, s, Y, rho) < 1e-12                  # exact (float64), same as the sort method
    torch.testing.assert_close(Z, zprox_squared(V, M, s, Y, rho), atol=1e-12, rtol=0)
    Zw, _ = zprox_squared_nj(V + 0.3, Mf, s, Y, rho, r, Mneg=1 - Mf)  # warm start from another point's root
    assert _kkt_squared(Zw, V + 0.3, M, s, Y, rho) < 1e-12
    Z32, _ = zprox_squared_nj(V.float(), Mf.float(), s.float(), Y.float(), rho)
    assert float((Z32.double() - Z).abs().max()) <= 1e-5 * (1 + float(Z.abs().max()))
    assert float((Z - V).abs().max()) > 1e-3                          # the prox moved the point


def test_admm_bound_nj_equals_admm_bound_and_is_valid_for_any_iterate():
    from bnlab.convex.admm import admm_bound, admm_bound_nj

    prob = _problem(seed=6, beta=0.3)
    ref = solve(prob, "clarabel", solver_opts={"tol_gap_rel": 1e-10, "tol_gap_abs": 1e-10, "tol_feas": 1e-10})
    g = torch.Generator().manual_seed(0)
    N, J = prob.Up.shape[0], 2 * prob.n_patterns
    for k in range(5):                                                # arbitrary (Z, ρu): bound still valid
        Z = torch.randn(1, N, J, generator=g, dtype=torch.float64) * 0.3 * k
        Yd = torch.randn(1, N, J, generator=g, dtype=torch.float64)
        b = admm_bound_nj(prob, Z.float(), Yd.float())                # float32 state, float64 evaluation
        assert b == pytest.approx(admm_bound(prob, Z.float().double().transpose(1, 2),
                                             Yd.float().double().transpose(1, 2)), rel=1e-12, abs=1e-12)
        assert b <= ref.objective * (1 + 1e-9)


@pytest.mark.parametrize("seed, beta", [(0, 0.1), (3, 0.5), (5, 0.05)])
def test_admm_network_fast_path_certifies_against_clarabel(seed, beta):
    from bnlab.convex.admm import admm_network

    prob = _problem(n=20, seed=seed, beta=beta, gates=40)
    ref = solve(prob, "clarabel", solver_opts={"tol_gap_rel": 1e-10, "tol_gap_abs": 1e-10, "tol_feas": 1e-10})
    tol = 1e-4
    sol = solve(prob, "admm-network", tol=tol)                        # default: float32 iterations
    assert sol.converged and sol.solver == "admm-network"
    assert sol.history[0]["dtype"] == "float32"
    net = float(prob.objective(T(sol.W), gated=False))                # the returned network's value, float64
    assert abs(net - sol.objective) <= 1e-12 * abs(net)
    assert net <= sol.dual_bound + tol * abs(net)                     # the certificate's claim ...
    assert sol.dual_bound <= ref.objective * (1 + 1e-9)               # ... with a valid bound ...
    assert all(h["dual"] <= ref.objective * (1 + 1e-9) for h in sol.history)
    assert net <= ref.objective * (1 + tol)                           # ... hence vs the tight optimum
    old = admm(prob, tol=tol, certify="network", fast=False)          # the previous (float64, AA) loop
    assert old["gap"] <= tol and old["objective"] <= ref.objective * (1 + tol)
    r64 = admm_network(prob, tol=tol, iter_dtype=torch.float64)       # float64 iterations
    assert r64["gap"] <= tol and r64["history"][-1]["dtype"] == "float64"
    assert r64["dual"] <= ref.objective * (1 + 1e-9) and r64["objective"] <= ref.objective * (1 + tol)


def test_admm_network_fast_path_on_digits_and_float32_fallback(digits_problem):
    from bnlab.convex.admm import admm_network

    prob, ref = digits_problem
    sol = solve(prob, "admm-network", tol=1e-4)
    net = float(prob.objective(T(sol.W), gated=False))
    assert sol.converged and net <= sol.dual_bound + 1e-4 * net and sol.dual_bound <= ref.objective * (1 + 1e-9)
    # a tolerance below float32's floor: the iteration must continue in float64 and still certify
    r = admm_network(prob, tol=1e-10, iter_dtype=torch.float32, stall_checks=3, max_iter=20000)
    dts = [h["dtype"] for h in r["history"]]
    assert dts[0] == "float32" and dts[-1] == "float64"
    assert r["gap"] <= 1e-10 and r["dual"] <= ref.objective * (1 + 1e-9)
    assert float(prob.objective(r["W"], gated=False)) <= r["dual"] + 1e-10 * abs(r["dual"])


def test_admm_network_fast_path_gated_logistic_and_weights():
    prob = _problem(seed=2, beta=0.2)
    ref_g = solve(prob, "cvxpy", gated=True)
    sol = solve(prob, "admm-network", tol=1e-5, gated=True)
    assert sol.converged and sol.dual_bound <= ref_g.objective * (1 + 1e-9)
    assert sol.objective <= sol.dual_bound + 1e-5 * abs(sol.objective)
    lp = _problem(seed=4, beta=0.2, loss="logistic", gates=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)            # Clarabel's own logistic gap ~1e-5
        ref = solve(lp, "cvxpy")
    sl = solve(lp, "admm-network", tol=1e-5)
    assert sl.converged and sl.dual_bound <= ref.objective * (1 + 1e-6)
    assert float(lp.objective(T(sl.W), gated=False)) <= sl.dual_bound + 1e-5 * abs(sl.objective)
    wp = _problem(seed=1, beta=0.2, weights=T(np.array([1.0, 2.0, 0.5, 1.5])))
    refw = solve(wp, "clarabel", solver_opts={"tol_gap_rel": 1e-10, "tol_gap_abs": 1e-10, "tol_feas": 1e-10})
    sw = solve(wp, "admm-network", tol=1e-5)
    assert sw.converged and sw.dual_bound <= refw.objective * (1 + 1e-9)
    assert float(wp.objective(T(sw.W), gated=False)) <= sw.dual_bound + 1e-5 * abs(sw.objective)


def test_bench_network_rows_against_a_separately_measured_clarabel(tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        mods = {}
        for name in ("bench_convex", "convex_clarabel_baseline"):
            spec = importlib.util.spec_from_file_location(f"_t_{name}", bench / f"{name}.py")
            mods[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
        out = tmp_path / "cl.json"
        assert mods["convex_clarabel_baseline"].main(["--size", "60,5,20", "--json", str(out)]) == 0
        base = json.loads(out.read_text())
        assert base["status"] == "optimal" and base["solve_cpu_s"] > 0 and base["process_cpu_s"] >= base["solve_cpu_s"]
        rows = mods["bench_convex"].bench_rows(sizes=[(60, 5, 20)], baselines=(), program=False, repeat=2,
                                               baseline_json=[str(out)])
    finally:
        sys.path.remove(str(bench))
    assert [r["name"] for r in rows] == ["ADMM-network vs Clarabel"]
    r = rows[0]
    assert r["certified"] and r["target"] == 0.05 and r["baseline_objective"] == base["objective"]
    assert r["objective"] <= r["dual_bound"] + 1e-4 * abs(r["objective"])
    assert r["objective"] <= base["objective"] * (1 + 1e-4)           # the network is at least as good
    assert r["ratio"] == pytest.approx(r["ours_ms"] / r["baseline_ms"])


@pytest.mark.parametrize("seed, n, beta", [(0, 40, 0.1), (1, 80, 0.1)])
def test_polish_multipliers_refine_support_blocks_tightens_a_valid_bound(seed, n, beta):
    from bnlab.convex.polish import _multipliers

    p = _problem(n=n, seed=seed, beta=beta, gates=60)
    ref = solve(p, "clarabel", solver_opts={"tol_gap_rel": 1e-11, "tol_gap_abs": 1e-11, "tol_feas": 1e-11}).objective
    r = admm(p, tol=1e-12, max_iter=30, newton_polish=False)             # an early iterate: a wrong active set
    Wp, _ = repair_cone(p, r["W"])
    sup = [(Wp[0].norm(dim=-1) > 0).nonzero().flatten()]
    F = p.sigma[:, None, None] * (p.Dsgn.T[:, :, None] * p.Up[None])
    lam_t = _multipliers(p, Wp, r["Yd"], sup, F, refine_support=True)
    lam_f = _multipliers(p, Wp, r["Yd"], sup, F, refine_support=False)
    assert bool((lam_t >= 0).all())
    b_t, b_f = float(p.dual_bound(Wp, lam_t)[0]), float(p.dual_bound(Wp, lam_f)[0])
    assert b_t <= ref * (1 + 1e-9)                                       # still a valid lower bound
    assert b_t > b_f + 0.1 * (ref - b_f)                                 # and much tighter (~2-4x closer here)
    # the FISTA's early stop (all refined ratios <= 1) loses nothing against running all its steps
    b_full = float(p.dual_bound(Wp, _multipliers(p, Wp, r["Yd"], sup, F, refine_stop=None))[0])
    assert b_full <= ref * (1 + 1e-9) and b_t >= b_full - 1e-9 * abs(b_full)


def test_refine_blocks_early_stop_loses_nothing_for_the_bound():
    from bnlab.convex.polish import _block_ratios, _refine_blocks

    p = _problem(n=40, seed=0, beta=0.1, gates=60)
    ref = solve(p, "clarabel", solver_opts={"tol_gap_rel": 1e-11, "tol_gap_abs": 1e-11, "tol_feas": 1e-11})
    nu = 0.9 * (p.Y - p.predict(T(ref.W)))                              # strictly dual-feasible direction
    allb = [torch.arange(2 * p.n_patterns)]
    lam_s = p.Up.new_zeros(1, 2 * p.n_patterns, p.Up.shape[0])
    lam_f = lam_s.clone()
    _refine_blocks(p, lam_s, nu, allb, 400, stop_at=1.0)
    _refine_blocks(p, lam_f, nu, allb, 400)
    r_s, r_f = _block_ratios(p, lam_s, nu), _block_ratios(p, lam_f, nu)
    assert float(r_s.max()) <= 1.0 and float(r_f.max()) <= 1.0 and bool((lam_s >= 0).all())
    assert float((lam_s - lam_f).abs().max()) > 0                      # it did stop early

    def bound(r):                                                       # problem.dual_bound's t scaling
        t = min(float((nu * p.Y).sum() / (nu ** 2).sum()), 1.0 / float(r.max()), 1.0)
        return float(p.neg_conj(t * nu))

    assert bound(r_s) == pytest.approx(bound(r_f), rel=1e-14) and bound(r_s) <= ref.objective * (1 + 1e-9)
