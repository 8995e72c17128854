"""Tests for the deliverable-8 experiment helpers (bnlab.convex.experiments, implicit.top_energy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnlab.convex.estimator import ConvexBNClassifier
from bnlab.convex.experiments import (
    _fit_row,
    convex_vs_restarts,
    fit_with_patterns,
    implicit_vs_gd,
    realised_patterns,
    restart_summary,
)
from bnlab.convex.implicit import top_energy
from bnlab.convex.patterns import whiten
from bnlab.convex.recover import NeuronParams

torch.set_num_threads(1)


def _data(n=24, d=5, seed=0, C=2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * np.linspace(2.0, 0.5, d)
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 > 0.4).astype(int) if C == 2 else np.arange(n) % C
    Xte = rng.standard_normal((20, d)) * np.linspace(2.0, 0.5, d)
    yte = (Xte[:, 0] + 0.5 * Xte[:, 1] ** 2 > 0.4).astype(int) if C == 2 else np.arange(20) % C
    return X, y, Xte, yte


def test_pattern_seeded_convex_is_below_the_trained_network():
    """The trained net is feasible for the program over its own patterns: convex (NC) <= its (NC)."""
    X, y, Xte, yte = _data()
    beta = 0.1
    gd = ConvexBNClassifier(beta=beta, solver="adam", random_state=3, gd_options={"width": 6, "epochs": 40})
    r_gd = _fit_row(gd, "adam", X, y, Xte, yte, beta)
    extra = realised_patterns(gd, X)
    assert extra.shape == (24, 6) and extra.dtype == bool
    # patterns agree with the torch network's BN output signs (population stats = training stats)
    net = gd.to_torch()
    with torch.no_grad():
        h = net.bn(net.linear(torch.as_tensor(X))).numpy()
    clear = np.abs(h) > 1e-6
    assert np.array_equal(extra[clear], (h >= 0)[clear])
    cvx = ConvexBNClassifier(beta=beta, solver="clarabel", n_patterns=5, random_state=0)
    r_cvx = _fit_row(cvx, "seeded", X, y, Xte, yte, beta, fit=lambda: fit_with_patterns(cvx, X, y, extra))
    D = cvx.patterns_
    for col in extra.T[extra.any(0)]:                                # every realised pattern is in the program
        assert (D == col[:, None]).all(0).any()
    assert r_cvx["NC_objective"] <= r_gd["NC_objective"] + 1e-6
    assert abs(r_cvx["NC_objective"] - r_cvx["convex_objective"]) <= 1e-5 * max(1.0, r_cvx["NC_objective"])
    # and without the extra patterns the program is a restriction: its optimum is not lower
    plain = ConvexBNClassifier(beta=beta, solver="clarabel", n_patterns=5, random_state=0)
    fit_with_patterns(plain, X, y, None)
    assert plain.objective_ >= cvx.objective_ - 1e-6


def test_fit_with_patterns_validates_arguments():
    X, y, _, _ = _data()
    with pytest.raises(ValueError, match="spectral_p=1.0"):
        fit_with_patterns(ConvexBNClassifier(spectral_p=1.0, solver="clarabel"), X, y)
    with pytest.raises(ValueError, match="extra must be a bool array"):
        fit_with_patterns(ConvexBNClassifier(solver="clarabel"), X, y, np.ones((3, 2), bool))


@pytest.mark.filterwarnings("ignore::bnlab.convex.patterns.PatternWarning")
def test_top_energy_exact_on_known_directions():
    X, _, _, _ = _data(n=30, d=5)
    wh = whiten(X, 5)
    # neuron 0 along the top whitened direction, neuron 1 along the lowest; sizes 3 and 1
    W = np.stack([wh.V[:, 0] / wh.S[0], wh.V[:, 4] / wh.S[4]], 1)
    p = NeuronParams(W=W, gamma=np.array([3.0, 1.0]), alpha=np.zeros(2), V=np.array([[1.0], [-1.0]]))
    e = top_energy(p, wh, X, (1, 2, 4, 5))
    np.testing.assert_allclose(e, [0.75, 0.75, 0.75, 1.0], atol=1e-10)
    # an E1 network (first layer in span V_k) has all its energy in the top k directions
    clf = ConvexBNClassifier(beta=0.1, solver="clarabel", k=2, n_patterns=10).fit(X, (X[:, 0] > 0).astype(int))
    e = top_energy(clf.params_, wh, X, (1, 2, 3))
    assert e[1] == pytest.approx(1.0, abs=1e-9) and 0 <= e[0] <= e[1] <= e[2] + 1e-12


def test_convex_vs_restarts_rows_and_summary():
    X, y, Xte, yte = _data(n=30, C=3)
    opts = (("sgd", {"lr": 1e-3, "epochs": 3, "batch_size": 10}), ("adam", {"lr": 3e-2, "epochs": 15}))
    rows = convex_vs_restarts(X, y, X[:12], y[:12], 0.1, 3, 8, opts, starts=(0, 1), solver="clarabel")
    assert len(rows) == 1 + 2 * 2 + 1
    m = rows[0]["width"]
    assert all(r["width"] == m for r in rows[1:5])
    assert [r["start"] for r in rows] == [None, 0, 1, 0, 1, None]
    finite = [r["NC_objective"] for r in rows[1:5] if np.isfinite(r["NC_objective"])]
    assert rows[-1]["NC_objective"] <= min(finite) + 1e-6               # seeded convex certified below best run
    assert rows[0]["excess"] == 0.0
    summ = {s["model"]: s for s in restart_summary(rows)}
    assert len(summ) == 4
    adam = summ[rows[3]["model"]]
    assert adam["runs"] == 2 and adam["NC_best"] == min(rows[3]["NC_objective"], rows[4]["NC_objective"])
    assert adam["NC_mean"] >= adam["NC_best"] and adam["diverged"] == 0
    # a diverged start is counted, not propagated into best / mean
    bad = [dict(rows[3]), dict(rows[4], NC_objective=float("nan"), excess=float("nan"))]
    s = restart_summary(bad)[0]
    assert s["diverged"] == 1 and s["NC_best"] == s["NC_mean"] == rows[3]["NC_objective"]


def test_implicit_vs_gd_rows():
    X, y, Xte, yte = _data(n=30)
    rows = implicit_vs_gd(X, y, Xte, yte, 0.1, ks=(2,), spectral=((4, 1.0),), n_patterns=10,
                          gd=(("sgd", {"lr": 1e-3, "epochs": 10, "width": 8}),), solver="clarabel", tops=(1, 2, 4))
    assert [r["model"] for r in rows] == ["E1 k=2", "E2 k=4 p=1.0", "non-convex GD (full batch), full input"]
    assert rows[0]["E_top2"] == pytest.approx(1.0, abs=1e-9)
    for r in rows:
        e = [r["E_top1"], r["E_top2"], r["E_top4"]]
        assert all(0 <= a <= b + 1e-12 <= 1 + 1e-9 for a, b in zip(e, e[1:]))
    # E1 and the unweighted program: the recovered network realises the convex objective
    assert rows[0]["NC_objective"] == pytest.approx(rows[0]["convex_objective"], rel=1e-5)
    # E2: the realised (NC) uses the unweighted BN penalty, so it differs from the weighted objective
    assert rows[1]["NC_objective"] != pytest.approx(rows[1]["convex_objective"], rel=1e-3)


def test_convex_suite_grid_covers_deliverable_8():
    from pathlib import Path

    from bnlab.suites.convex import grid

    a, b = grid(False, Path("/data"))
    cells = {(s["name"], s["classes"] is None, s["n"]) for s in a}
    assert cells == {(d, ten, n) for d in ("cifar10", "fashion_mnist") for ten in (False, True)
                     for n in (500, 2000, 10000)}
    assert {(s["name"], s["n"]) for s in b} == {("cifar10", 2000), ("fashion_mnist", 2000)}
    assert all(s["root"] == f"/data/{s['name']}.npz" for s in a + b)
    qa, qb = grid(True, Path("/data"))
    assert all(s["name"] == "digits" and s["n"] <= 60 for s in qa + qb)
