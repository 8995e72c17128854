"""three_effects (cbn.md Sec. 6): brute-force moments, exact smoothness on quadratics, no side effects."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.diagnostics import ThreeEffects, three_effects


def _tiny_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches(k: int, n: int = 8, d: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, d, generator=g, dtype=torch.double), torch.randint(0, classes, (n,), generator=g))
            for _ in range(k)]


def test_second_moment_and_variance_match_brute_force():
    model = _tiny_bn_net().eval()  # probes must switch to train-mode BN themselves
    batches = _batches(5)
    res = three_effects(model, F.cross_entropy, batches)
    grads, losses = [], []
    for x, y in batches:
        m = copy.deepcopy(model).train()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        losses.append(loss.item())
    G = torch.stack(grads)                                          # (K, P)
    k = G.shape[0]
    second = (G ** 2).sum(1).mean().item()
    mean_sq = (G.mean(0) ** 2).sum().item()
    var = (G - G.mean(0)).pow(2).sum(1).sum().item() / (k - 1)      # unbiased sample variance
    assert math.isclose(res.grad_sq_norm, second, rel_tol=1e-10)
    assert math.isclose(res.mean_grad_sq_norm, mean_sq, rel_tol=1e-10)
    assert math.isclose(res.grad_variance, var, rel_tol=1e-9)
    assert math.isclose(res.signal_fraction, mean_sq / second, rel_tol=1e-9)
    assert math.isclose(res.loss, sum(losses) / k, rel_tol=1e-12)
    assert res.num_batches == k
    # per layer: the same quantities per parameter tensor, and ||g_W||^2 ||W||^2
    offset = 0
    for name, p in model.named_parameters():
        gl = G[:, offset:offset + p.numel()]
        offset += p.numel()
        layer = res.per_layer[name]
        assert math.isclose(layer["grad_sq_norm"], (gl ** 2).sum(1).mean().item(), rel_tol=1e-10)
        vl = (gl - gl.mean(0)).pow(2).sum().item() / (k - 1)
        assert math.isclose(layer["grad_variance"], vl, rel_tol=1e-8, abs_tol=1e-15)
        w2 = p.detach().pow(2).sum().item()
        assert math.isclose(layer["scaled_grad_sq_norm"], layer["grad_sq_norm"] * w2, rel_tol=1e-10)
    total_scaled = sum(v["scaled_grad_sq_norm"] for v in res.per_layer.values())
    assert math.isclose(res.scaled_grad_sq_norm, total_scaled, rel_tol=1e-10)


def test_lipschitz_and_hessian_exact_on_a_quadratic():
    """Least squares: L(w) = mean((Xw - y)^2) has H = 2 X^T X / n, so
    ||grad L(w - s g) - grad L(w)|| / ||s g|| = ||H g|| / ||g|| for every s, and lambda_max(H) exactly."""
    torch.manual_seed(0)
    d = 4
    model = nn.Linear(d, 1, bias=False).double()
    scales = torch.tensor([3.0, 1.5, 0.7, 0.2], dtype=torch.double)
    batches = [(torch.randn(16, d, dtype=torch.double) * scales, torch.randn(16, 1, dtype=torch.double))
               for _ in range(3)]
    res = three_effects(model, F.mse_loss, batches, hessian=True, hessian_batches=3, hessian_iters=100)
    x0, y0 = batches[0]
    h0 = 2 * x0.T @ x0 / x0.shape[0]
    w = model.weight.detach().flatten()
    g = h0 @ w - 2 * x0.T @ y0.flatten() / x0.shape[0]
    assert math.isclose(res.lipschitz, (h0 @ g).norm().item() / g.norm().item(), rel_tol=1e-9)
    h_avg = sum(2 * x.T @ x / x.shape[0] for x, _ in batches) / 3
    assert math.isclose(res.hessian_top, torch.linalg.eigvalsh(h_avg)[-1].item(), rel_tol=1e-6)
    assert res.lipschitz <= res.hessian_top * 1.5  # sanity: a Rayleigh-type ratio of one batch's H
    assert res.loss_range > 0


def test_probes_leave_the_model_bit_identical():
    torch.manual_seed(0)
    model = bnlab.models.build("resnet20", norm="cbn:double", act="sigmoid", width=0.25, num_classes=3)
    for m in model.modules():  # one cumulative-average BN to exercise momentum=None as well
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            break
    model(torch.randn(4, 3, 8, 8))  # non-trivial buffers
    model.eval()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    rng = torch.get_rng_state()
    res = three_effects(model, F.cross_entropy, batches, hessian=True, hessian_batches=1, hessian_iters=2)
    assert isinstance(res, ThreeEffects) and all(math.isfinite(v) for v in res.scalars().values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    # and the result is reproducible: the same probes on the restored model give the same numbers
    again = three_effects(model, F.cross_entropy, batches, hessian=True, hessian_batches=1, hessian_iters=2)
    assert again.scalars() == res.scalars()


def test_scale_normalised_moment_is_invariant_to_weight_scale_before_bn():
    """Sec. 6.4: a weight feeding BN is scale-invariant, so ||g_W||^2 scales as 1/c^2 while
    ||g_W||^2 ||W||^2 does not change (nor does any other layer's gradient)."""
    batches = _batches(3)
    model = _tiny_bn_net()
    model[1].eps = 1e-14  # BN's eps is the only term that breaks the invariance
    ref = three_effects(model, F.cross_entropy, batches)
    with torch.no_grad():
        model[0].weight.mul_(4.0)
        model[0].bias.mul_(4.0)
    res = three_effects(model, F.cross_entropy, batches)
    a, b = ref.per_layer["0.weight"], res.per_layer["0.weight"]
    assert math.isclose(b["grad_sq_norm"], a["grad_sq_norm"] / 16, rel_tol=1e-8)
    assert math.isclose(b["scaled_grad_sq_norm"], a["scaled_grad_sq_norm"], rel_tol=1e-8)
    assert math.isclose(res.per_layer["3.weight"]["grad_sq_norm"], ref.per_layer["3.weight"]["grad_sq_norm"],
                        rel_tol=1e-8)


def test_bad_arguments():
    model = _tiny_bn_net()
    with pytest.raises(ValueError, match="at least 2"):
        three_effects(model, F.cross_entropy, _batches(1))
    with pytest.raises(ValueError, match="at least 2"):
        three_effects(model, F.cross_entropy, _batches(4), max_batches=1)
    with pytest.raises(TypeError, match="nn.Module"):
        three_effects(lambda x: x, F.cross_entropy, _batches(2))
    with pytest.raises(ValueError, match="lr"):
        three_effects(model, F.cross_entropy, _batches(2), lr=0.0)
    with pytest.raises(TypeError, match="loss_fn"):
        three_effects(model, None, _batches(2))
