"""Tests for bnlab.convex.cnn (EXPERIMENTAL two-layer CNN with channel-wise BN, convex_bn.md §4.1)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnlab.convex.cnn import (
    BNReLUCNN,
    cnn_nc_objective,
    conv_patches,
    enumerate_patterns,
    fit_convex_cnn,
    network_patterns,
)
from bnlab.convex.patterns import PatternWarning, pattern_bound, sample_patterns, whiten
from bnlab.convex.problem import ConvexBNProblem
from bnlab.convex.recover import BNReLUNet, recover
from bnlab.convex.solvers import ConvergenceWarning, solve

torch.set_num_threads(1)
T = torch.as_tensor


def _images(n=6, c=1, H=4, W=4, seed=0, C=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, c, H, W))
    y = rng.standard_normal(n if C is None else (n, C))
    return X, y


def _sampled(X, y, beta, ks, stride, padding, gates, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        return fit_convex_cnn(X, y, beta, ks, stride, padding, n_patterns=gates, seed=1, **kw)


def _nc(v: torch.Tensor) -> float:
    return float(v.detach())


def _set(D):
    return set(map(bytes, D.T))


# --- data preparation -----------------------------------------------------------------------------

@pytest.mark.parametrize("ks, stride, padding", [(3, 1, 0), ((2, 3), (2, 1), (1, 0)), (3, 2, 1)])
def test_patches_reproduce_conv2d(ks, stride, padding):
    X, _ = _images(n=3, c=2, H=5, W=6)
    pt = conv_patches(X, ks, stride, padding)
    w = torch.randn(4, 2, *((ks, ks) if isinstance(ks, int) else ks), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    ref = F.conv2d(T(X), w, stride=stride, padding=padding)                  # (n, 4, Ho, Wo)
    H = pt.M @ w.reshape(4, -1).numpy().T                                    # (n·K, 4), image-major rows
    assert pt.K == ref.shape[2] * ref.shape[3] and pt.out_hw == tuple(ref.shape[2:])
    np.testing.assert_allclose(H.reshape(3, pt.K, 4).transpose(0, 2, 1), ref.reshape(3, 4, -1).numpy(),
                               atol=1e-12)


def test_enumerate_patterns_is_complete():
    rng = np.random.default_rng(2)
    wh = whiten(rng.standard_normal((11, 2)))                                # general position, r = 2
    D = enumerate_patterns(wh.Up)
    assert D.shape[1] == pattern_bound(11, 2) - 1                            # every cell but the zero pattern
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        Ds = sample_patterns(wh.Up, 20000, seed=0)
    assert _set(Ds) <= _set(D) and len(_set(Ds)) >= D.shape[1] - 10
    # degenerate data (integer pixels, zero padding: duplicate and collinear patch points): still a superset
    pt = conv_patches(rng.integers(-1, 2, (3, 1, 3, 3)).astype(float), (1, 2), 1, 1)
    wh = whiten(pt.M)
    D = enumerate_patterns(wh.Up)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PatternWarning)
        Ds = sample_patterns(wh.Up, 20000, seed=0)
    assert _set(Ds) <= _set(D) and D.any(0).all() and len(_set(D)) == D.shape[1]


def test_enumerate_patterns_refuses_large_rank():
    X, _ = _images(n=6, H=5, W=5)
    wh = whiten(conv_patches(X, 3).M)
    with pytest.raises(ValueError, match="max_rays"):
        enumerate_patterns(wh.Up)


# --- exactness ------------------------------------------------------------------------------------

def test_recovered_cnn_matches_convex_optimum_and_predictions():
    X, y = _images(n=6, H=5, W=5, seed=3)                                   # 3x3 patches, padding 1, stride 2
    beta = 0.05
    r = _sampled(X, y, beta, 3, 2, 1, gates=60)
    assert r.solution.converged and r.patches.K == 9 and r.whitening.q == 10
    net = r.network()
    assert isinstance(net.bn, torch.nn.BatchNorm2d) and net.conv.bias is None
    Xt, yt = T(X), T(y)
    nc = _nc(cnn_nc_objective(net, Xt, yt, beta))
    assert abs(nc - r.objective) <= 1e-6 * abs(r.objective)
    gated = r.problem.predict(T(r.solution.W), gated=True)[0].numpy()       # A Σ D U'(s - s')
    with torch.no_grad():
        eval_out = net(Xt)[:, 0].numpy()
        train_out = r.network().train()(Xt)[:, 0].numpy()                  # batch statistics (fresh copy)
    np.testing.assert_allclose(train_out, gated, atol=1e-7)
    np.testing.assert_allclose(eval_out, train_out, atol=1e-10)
    Xn, _ = _images(n=4, H=5, W=5, seed=9)                                  # new images: population BN
    with torch.no_grad():
        np.testing.assert_allclose(net(T(Xn))[:, 0].numpy(), r.predict(Xn)[:, 0], atol=1e-7)


def test_nonconvex_cnn_never_below_enumerated_optimum():
    X, y = _images(n=6, H=4, W=4, seed=0)                                   # 1x2 patches, stride 2: K=4, N=24
    beta = 0.1
    r = fit_convex_cnn(X, y, beta, (1, 2), 2, patterns="enumerate")
    assert r.D.shape[1] == pattern_bound(24, 2) - 1 and r.solution.converged
    p = r.objective
    Xt, yt = T(X), T(y)
    assert abs(_nc(cnn_nc_objective(r.network(), Xt, yt, beta)) - p) <= 1e-6 * p
    vals = []
    for s in range(5):
        torch.manual_seed(s)
        net = BNReLUCNN(1, 8, (1, 2), 2).double()
        opt = torch.optim.LBFGS(net.parameters(), max_iter=60, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure(net=net, opt=opt):
            opt.zero_grad()
            o = cnn_nc_objective(net, Xt, yt, beta)
            o.backward()
            return o
        opt.step(closure)
        vals.append(_nc(cnn_nc_objective(net, Xt, yt, beta)))
    for s in range(1):
        torch.manual_seed(100 + s)
        net = BNReLUCNN(1, 12, (1, 2), 2).double()
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        for _ in range(250):
            opt.zero_grad()
            cnn_nc_objective(net, Xt, yt, beta).backward()
            opt.step()
        vals.append(_nc(cnn_nc_objective(net, Xt, yt, beta)))
    assert min(vals) >= p - 1e-6 * p, (min(vals), p)
    assert min(vals) <= 1.05 * p                                             # the local searches do get close
    # the check has power: with 3 sampled patterns the program is only an upper bound, beaten by local search
    p3 = _sampled(X, y, beta, (1, 2), 2, 0, gates=3).objective
    assert min(vals) < p3 - 1e-3


def test_program_on_a_networks_patterns_is_below_that_network():
    """With D = the realised patterns of a (locally trained) CNN, the convex optimum is <= its (NC-CNN) value,
    and the patterns are those of the BN pre-activations (checked against the program's cone constraints)."""
    X, y = _images(n=6, H=5, W=5, seed=8)
    beta = 0.05
    torch.manual_seed(0)
    net = BNReLUCNN(1, 4, 3, 2, 1).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        cnn_nc_objective(net, T(X), T(y), beta).backward()
        opt.step()
    D = network_patterns(net, X)
    assert D.shape == (6 * 9, 4)
    r = fit_convex_cnn(X, y, beta, 3, 2, 1, patterns=D)
    assert r.objective <= _nc(cnn_nc_objective(net, T(X), T(y), beta)) + 1e-7


def test_kernel_covering_the_image_reduces_to_fc_program():
    X, y = _images(n=7, c=2, H=2, W=1, seed=4)                              # K = 1: Conv2d = Linear, BN2d = BN1d
    beta = 0.1
    r = fit_convex_cnn(X, y, beta, (2, 1), patterns="enumerate")
    Xf = X.reshape(7, -1)
    wh = whiten(Xf)
    np.testing.assert_allclose(np.abs(wh.Up), np.abs(r.whitening.Up), atol=1e-12)
    sol = solve(ConvexBNProblem(T(wh.Up), T(r.D), T(y), beta), "clarabel")
    assert abs(sol.objective - r.objective) <= 1e-6 * r.objective
    fc = BNReLUNet.from_params(recover(sol.W, wh), Xf)
    with torch.no_grad():
        np.testing.assert_allclose(r.network()(T(X)).numpy(), fc(T(Xf)).numpy(), atol=1e-6)


def test_invariances():
    """Positive scaling and a constant shift of the images (no padding) leave the optimum unchanged;
    so does a permutation of the images."""
    X, y = _images(n=4, H=2, W=4, seed=5)
    beta = 0.1
    p = fit_convex_cnn(X, y, beta, (1, 2), (1, 2), patterns="enumerate").objective
    p2 = fit_convex_cnn(3 * X + 2, y, beta, (1, 2), (1, 2), patterns="enumerate").objective
    perm = np.array([3, 0, 2, 1])
    p3 = fit_convex_cnn(X[perm], y[perm], beta, (1, 2), (1, 2), patterns="enumerate").objective
    assert abs(p2 - p) <= 1e-6 * p and abs(p3 - p) <= 1e-6 * p


def test_vector_output_and_logistic_recovery():
    X, Y = _images(n=6, H=4, W=4, seed=6, C=2)
    r = _sampled(X, Y, 0.1, 2, 2, 0, gates=40)                              # one-vs-all, 2 outputs
    nc = _nc(cnn_nc_objective(r.network(), T(X), T(Y), 0.1))
    assert r.network().out.weight.shape[0] == 2 and abs(nc - r.objective) <= 1e-6 * r.objective
    yb = np.where(Y[:, 0] > 0, 1.0, -1.0)
    r = _sampled(X, yb, 0.1, 2, 2, 0, gates=40, loss="logistic", tol=1e-5)
    nc = _nc(cnn_nc_objective(r.network(), T(X), T(yb), 0.1, loss="logistic"))
    assert abs(nc - r.objective) <= 1e-6 * r.objective


def test_nc_objective_is_the_paper_objective():
    """cnn_nc_objective on a random net = ℓ + (β/2)Σ(γ²+α²+v²) computed by hand in the paper convention."""
    X, y = _images(n=4, c=2, H=5, W=5, seed=7)
    torch.manual_seed(0)
    net = BNReLUCNN(2, 3, 3, 2, 1).double()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 2.0)
        net.bn.bias.uniform_(-1.0, 1.0)
    val = _nc(cnn_nc_objective(net, T(X), T(y), 0.3))
    pt = conv_patches(X, 3, 2, 1)
    Hm = pt.M @ net.conv.weight.detach().reshape(3, -1).numpy().T            # (N, m)
    N = Hm.shape[0]
    Pc = Hm - Hm.mean(0)
    var = (Pc ** 2).mean(0)
    g = np.sqrt(N) * net.bn.weight.detach().numpy() * np.sqrt(var / (var + net.bn.eps))
    a = np.sqrt(N) * net.bn.bias.detach().numpy()
    Z = np.maximum(g * Pc / np.linalg.norm(Pc, axis=0) + a / np.sqrt(N), 0)
    f = Z.reshape(4, pt.K, 3).mean(1) @ net.out.weight.detach().numpy()[0]
    ref = 0.5 * np.sum((f - y) ** 2) + 0.15 * (g @ g + a @ a + net.out.weight.detach().numpy().ravel() @
                                               net.out.weight.detach().numpy().ravel())
    assert abs(val - ref) <= 1e-10 * abs(ref)
    assert net.bn.running_mean.abs().max() == 0                             # running stats untouched


# --- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, msg", [
    ({"X": np.zeros((6, 5, 5))}, "4-D"),
    ({"kernel_size": 0}, "kernel_size"),
    ({"kernel_size": 7}, "does not fit"),
    ({"padding": -1}, "padding"),
    ({"stride": (1, 2, 3)}, "stride"),
    ({"y": np.zeros(5)}, "n=6 images"),
    ({"beta": 0.0}, "beta"),
    ({"solver": "admm"}, "solver"),
    ({"patterns": "all"}, "patterns"),
    ({"patterns": np.ones((5, 3), bool)}, "patterns array"),
    ({"patterns": "enumerate"}, "max_rays"),
    ({"X": np.full((6, 1, 5, 5), np.nan)}, "NaN"),
])
def test_input_validation(kwargs, msg):
    X, y = _images(n=6, H=5, W=5)
    args = {"X": X, "y": y, "beta": 0.1, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=msg):
        fit_convex_cnn(**args)


def test_predict_rejects_other_image_shapes():
    X, y = _images(n=6, H=4, W=4, seed=0)
    r = fit_convex_cnn(X, y, 0.1, (1, 2), 2, patterns="enumerate")
    with pytest.raises(ValueError, match="positions"):
        r.predict(np.zeros((2, 1, 6, 6)))


def test_beta_above_threshold_gives_zero_network_and_clear_error():
    X, y = _images(n=6, H=4, W=4, seed=0)
    with warnings.catch_warnings():                     # the solver's relative violation is 0/0 at W = 0
        warnings.simplefilter("ignore", ConvergenceWarning)
        r = fit_convex_cnn(X, y, 100.0, (1, 2), 2, patterns="enumerate")
    assert r.params.width == 0
    assert abs(r.objective - 0.5 * float(y @ y)) <= 1e-6 * float(y @ y)     # f = 0 is optimal for large beta
    with pytest.raises(ValueError, match="width 0"):
        r.network()


def test_truncated_whitening_recovers_filters_in_top_k_span():
    X, y = _images(n=6, H=5, W=5, seed=10)
    r = _sampled(X, y, 0.05, 3, 2, 1, gates=40, k=2)                        # spec §5.3 E1 on the patch matrix
    assert r.whitening.q == 3
    Vk = r.whitening.V                                                       # (9, 2)
    Wf = r.network().conv.weight.detach().reshape(r.params.width, -1).numpy().T
    np.testing.assert_allclose(Vk @ (Vk.T @ Wf), Wf, atol=1e-10)
    assert abs(_nc(cnn_nc_objective(r.network(), T(X), T(y), 0.05)) - r.objective) <= 1e-6 * r.objective
