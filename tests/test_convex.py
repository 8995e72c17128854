"""Tests for bnlab.convex (exact convex training of BN-ReLU networks, convex_bn.md)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bnlab.convex.closed_form import closed_form
from bnlab.convex.estimator import ConvexBNClassifier, ConvexBNRegressor
from bnlab.convex.patterns import PatternWarning, pattern_bound, sample_patterns, whiten
from bnlab.convex.problem import ConvexBNProblem
from bnlab.convex.recover import BNReLUNet, nc_objective, recover
from bnlab.convex.solvers import ConvergenceWarning, solve

torch.set_num_threads(1)
T = torch.as_tensor


def _problem(n=10, d=2, seed=0, gates=20000, beta=0.1, loss="squared", k=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    if loss != "squared":
        y = np.where(y > 0, 1.0, -1.0)
    wh = whiten(X, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D = sample_patterns(wh.Up, gates, seed=1)
    return X, y, wh, D, ConvexBNProblem(T(wh.Up), T(D), T(y), beta, loss)


def test_whitening_orthonormal_and_rank():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 4))
    X = np.hstack([X, X[:, :1], np.full((12, 1), 3.0)])          # duplicate and constant features
    wh = whiten(X)
    assert wh.rank == 4 and wh.q == 5
    np.testing.assert_allclose(wh.Up.T @ wh.Up, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(wh.transform(X), wh.Up, atol=1e-10)
    assert whiten(X, k=2).q == 3


@pytest.mark.parametrize("X, msg", [(np.ones((5, 3)), "constant"), (np.zeros((1, 3)), "n_samples=1"),
                                    (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN")])
def test_whitening_rejects_bad_data(X, msg):
    with pytest.raises(ValueError, match=msg):
        whiten(X)


def test_patterns_deterministic_dedup_and_affine():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((15, 2))
    wh = whiten(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D1, D2 = sample_patterns(wh.Up, 3000, seed=5), sample_patterns(wh.Up, 3000, seed=5)
        D3 = sample_patterns(wh.Up, 3000, seed=6)
        Dw = sample_patterns(wh.Up, 200000, seed=0)
        Dr = sample_patterns(wh.Up, 200000, seed=0, space="raw", X=X)
    np.testing.assert_array_equal(D1, D2)
    assert not np.array_equal(D1, D3)
    assert D1.any(0).all() and len(np.unique(D1.T, axis=0)) == D1.shape[1]
    # affine arrangements of [X, 1] = arrangements of U' (§2.2); plain 1[Xw >= 0] would give far fewer
    sw, sr = {c.tobytes() for c in Dw.T}, {c.tobytes() for c in Dr.T}
    # both samplers draw from the same finite set of affine arrangements (sampling misses aside, §9)
    assert len(sw | sr) <= pattern_bound(15, 2) and len(sr & sw) >= 0.9 * len(sr)
    assert len(sw) > 2 * 15                                      # more than the 2n linear (no-bias) patterns
    with pytest.warns(PatternWarning, match="arrangement bound"):
        sample_patterns(wh.Up, 5, seed=0)


def test_cvxpy_optimum_equals_recovered_network_and_lbfgs_never_below():
    X, y, wh, D, prob = _problem(n=10, d=2)
    sol = solve(prob, "cvxpy")
    assert sol.converged and sol.gap < 1e-6
    p = recover(sol.W, wh)
    net = BNReLUNet.from_params(p, X)
    Xt, yt = T(X), T(y)
    nc = float(nc_objective(net, Xt, yt, 0.1).detach())
    assert abs(nc - sol.objective) < 1e-6 * max(1, sol.objective)
    best = np.inf
    for seed in range(4):                                          # random starts on (NC), float64
        torch.manual_seed(seed)
        m = 4 + 4 * seed
        nnet = BNReLUNet(2, m).double()
        opt = torch.optim.LBFGS(nnet.parameters(), max_iter=150, line_search_fn="strong_wolfe")

        def closure(nnet=nnet, opt=opt):
            opt.zero_grad()
            f = nc_objective(nnet, Xt, yt, 0.1)
            f.backward()
            return f
        opt.step(closure)
        best = min(best, float(nc_objective(nnet, Xt, yt, 0.1)))
    assert best >= sol.dual_bound - 1e-7
    assert best < 3 * sol.objective                                # the starts did optimise


def test_torch_network_train_and_eval_predict_like_the_convex_model():
    X, y, wh, D, prob = _problem(n=10, d=3, seed=2)
    sol = solve(prob, "cvxpy")
    net = BNReLUNet.from_params(recover(sol.W, wh), X)
    Xt = T(X)
    conv = prob.predict(T(sol.W), gated=False)[0]
    with torch.no_grad():
        np.testing.assert_allclose(net.eval()(Xt)[:, 0], conv, atol=1e-9)
        np.testing.assert_allclose(net.train()(Xt)[:, 0], conv, atol=1e-9)


@pytest.mark.parametrize("loss, tol", [("squared", 1e-8), ("logistic", 3e-7)])
def test_augmented_lagrangian_matches_cvxpy(loss, tol):
    X, y, wh, D, _ = _problem(n=8, d=2, seed=4, loss=loss)
    prob = ConvexBNProblem(T(wh.Up), T(D[:, ::3]), T(y), 0.1, loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)   # Clarabel's own logistic gap is ~1e-5
        ref = solve(prob, "cvxpy")
    sol = solve(prob, "al", tol=tol)
    assert sol.converged
    assert abs(sol.objective - ref.objective) <= 1e-6 * abs(ref.objective)
    assert abs(sol.dual_bound - ref.objective) <= 1e-6 * abs(ref.objective)


def test_al_matches_cvxpy_on_real_digits():
    from sklearn.datasets import load_digits

    Xa, ya = load_digits(return_X_y=True)
    idx = np.flatnonzero(ya < 2)[:12]
    X, y = Xa[idx], np.where(ya[idx] == 1, 1.0, -1.0)
    wh = whiten(X, k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D = sample_patterns(wh.Up, 25, seed=0)
    prob = ConvexBNProblem(T(wh.Up), T(D), T(y), 0.5)
    ref, sol = solve(prob, "cvxpy"), solve(prob, "al", tol=1e-8)
    assert abs(sol.objective - ref.objective) <= 1e-6 * ref.objective


def test_fista_gated_matches_cvxpy_gated():
    X, y, wh, D, _ = _problem(n=10, d=2, seed=5)
    prob = ConvexBNProblem(T(wh.Up), T(D[:, ::4]), T(y), 0.2)
    ref = solve(prob, "cvxpy", gated=True)
    sol = solve(prob, "fista", tol=1e-9)
    assert sol.converged and abs(sol.objective - ref.objective) <= 1e-6 * ref.objective
    assert sol.objective <= solve(prob, "cvxpy").objective + 1e-7      # relaxation is a lower bound


def test_nonconvergence_reports_gap():
    X, y, wh, D, prob = _problem(n=10, d=2)
    with pytest.warns(ConvergenceWarning, match="relative duality gap"):
        sol = solve(prob, "al", max_iter=20)
    assert not sol.converged and sol.certificate["relative_gap"] == sol.gap


@pytest.mark.parametrize("n, d, beta", [(7, 10, 0.3), (6, 5, 0.5)])
def test_closed_form_matches_solver_and_network(n, d, beta):
    rng = np.random.default_rng(n)
    X, y = rng.standard_normal((n, d)), rng.standard_normal(n)
    wh = whiten(X)
    assert wh.rank == n - 1
    cf, Dcf = closed_form(wh, y, beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        D = sample_patterns(wh.Up, 20000, seed=0)
    assert D.shape[1] == 2 ** n - 1                                  # every pattern is an arrangement
    ref = solve(ConvexBNProblem(T(wh.Up), T(D), T(y), beta), "cvxpy")
    assert abs(cf.objective - ref.objective) <= 1e-6 * ref.objective
    net = BNReLUNet.from_params(recover(cf.W, wh), X)
    assert abs(float(nc_objective(net, T(X), T(y), beta)) - cf.objective) <= 1e-9 * cf.objective
    assert recover(cf.W, wh).width <= 2


def test_closed_form_one_hot_vector_output():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 30))
    Y = np.eye(4)[rng.integers(0, 4, 12)]
    beta = 0.5
    cf, _ = closed_form(whiten(X), Y.T, beta)
    nk = Y.sum(0)
    expect = sum(0.5 * t * t if t <= beta else beta * t - beta ** 2 / 2 for t in np.sqrt(nk))
    assert abs(cf.objective - expect) < 1e-12
    est = ConvexBNRegressor(beta=beta).fit(X, Y)
    assert est.certificate_["solver"] == "closed_form"
    net = est.to_torch()
    assert abs(float(nc_objective(net.train(), T(X), T(Y), beta)) - expect) < 1e-8


def test_truncated_whitening_weights_in_top_k_span():
    X, y, wh, D, _ = _problem(n=12, d=5, seed=7, k=2)
    assert wh.q == 3
    sol = solve(ConvexBNProblem(T(wh.Up), T(D), T(y), 0.1), "cvxpy")
    p = recover(sol.W, wh)
    full = whiten(X)
    resid = p.W - full.V[:, :2] @ (full.V[:, :2].T @ p.W)
    assert np.abs(resid).max() < 1e-9
    net = BNReLUNet.from_params(p, X)
    assert abs(float(nc_objective(net, T(X), T(y), 0.1)) - sol.objective) < 1e-6


def test_estimators_predict_like_torch_and_bad_input():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    m = y < 3
    X, y = X[m][:90], y[m][:90]
    clf = ConvexBNClassifier(beta=0.1, n_patterns=20, random_state=0).fit(X[:60], y[:60])
    assert clf.score(X[:60], y[:60]) > 0.9
    with torch.no_grad():
        F = clf.to_torch()(T(X[60:])).numpy()
    np.testing.assert_allclose(F, clf.decision_function(X[60:]), atol=1e-8)
    lg = ConvexBNClassifier(beta=0.1, loss="logistic", n_patterns=10).fit(X[:40], y[:40] == 1)
    np.testing.assert_allclose(lg.predict_proba(X[:5]).sum(1), 1.0)
    assert not hasattr(clf, "predict_proba")
    with pytest.raises(ValueError, match="loss='squared' only"):
        ConvexBNRegressor(loss="logistic").fit(X[:10], y[:10])
    with pytest.raises(ValueError, match=r"labels in \{-1, \+1\}"):
        ConvexBNProblem(T(np.eye(3)), T(np.eye(3, dtype=bool)), T(np.arange(3.0)), 1.0, "hinge")
    with pytest.raises(ValueError, match="beta"):
        ConvexBNRegressor(beta=-1).fit(X[:10], y[:10])


def test_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for est in (ConvexBNRegressor(n_patterns=8), ConvexBNClassifier(n_patterns=8)):
            check_estimator(est)


def test_bn_after_relu_convex_equals_recovered_and_lbfgs_not_below():
    from bnlab.convex.after_relu import after_relu_objective, solve_after_relu

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((8, 2)), rng.standard_normal(8)
    sol = solve_after_relu(X, y, 0.1, n_gates=4000)
    rec = after_relu_objective(X, y, sol.W, sol.gamma, sol.alpha, sol.v, 0.1)
    assert abs(rec - sol.objective) < 1e-6 * sol.objective
    Xt, yt = T(X), T(y)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        m = 6
        params = [torch.randn(2, m, generator=g, dtype=torch.float64, requires_grad=True)]
        params += [torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        opt = torch.optim.LBFGS(params, max_iter=150, line_search_fn="strong_wolfe")

        def closure(params=params, opt=opt):
            opt.zero_grad()
            f = after_relu_objective(Xt, yt, *params, 0.1, eps=1e-12)
            f.backward()
            return f
        opt.step(closure)
        with torch.no_grad():
            assert float(after_relu_objective(Xt, yt, *params, 0.1, eps=1e-12)) >= sol.objective - 1e-5


def test_cli_runs_and_prints_certificate(capsys):
    import argparse

    from bnlab.convex import cli

    ap = argparse.ArgumentParser()
    cli.add_parser(ap.add_subparsers())
    args = ap.parse_args(["convex", "--classes", "0,1", "--n", "30", "--n-test", "20", "--patterns", "10",
                          "--beta", "0.1", "--solver", "clarabel", "--quiet", "--json"])
    assert args.func(args) == 0
    import json

    res = json.loads(capsys.readouterr().out)
    assert res["n_train"] == 30 and res["classes"] == 2 and res["certified"] is True
    assert abs(res["objective"] - res["dual_bound"]) <= 1e-5 * res["objective"] and res["train_acc"] > 0.9
