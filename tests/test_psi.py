"""PSISGD (Yi, UAI 2022): the spec's tests (psi_manifold.md Sec. 10.2), float64, BN eps 1e-12."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab.optim import PSISGD, make_optimizer, psi_param_groups

DT = torch.float64



class Net(nn.Module):
    """The spec's Sec. 2.7 net: conv(bias)-BN-ReLU-pool, conv-BN-ReLU-pool, Linear(bias)-BN1d-ReLU, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(4, eps=1e-12)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(5, eps=1e-12)
        self.l3 = nn.Linear(5 * 2 * 2, 6)
        self.b3 = nn.BatchNorm1d(6, eps=1e-12)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
        x = torch.relu(self.b3(self.l3(torch.flatten(x, 1))))
        return self.fc(x)


PSI_LAYERS = ("c1", "c2", "l3")


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(DT)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 2, 8, 8, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def rescaled_copy(net: Net, lo: float = 0.2, hi: float = 5.0, seed: int = 3) -> Net:
    """Per-unit positive rescaling T_a of every PSI layer (weight and bias together)."""
    other = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in PSI_LAYERS:
            m = getattr(other, name)
            a = lo + (hi - lo) * torch.rand(m.weight.shape[0], generator=g, dtype=DT)
            m.weight.mul_(a.view(-1, *[1] * (m.weight.dim() - 1)))
            if m.bias is not None:
                m.bias.mul_(a)
    return other


def train(net: Net, opt: torch.optim.Optimizer, data, lr_at=None) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for t, (x, y) in enumerate(data):
        if lr_at is not None:
            for g in opt.param_groups:
                g["lr"] = lr_at(t, g)
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()


def units(net: Net) -> torch.Tensor:
    """All PSI unit directions theta_j/||theta_j||, stacked per layer and concatenated."""
    out = []
    for name in PSI_LAYERS:
        m = getattr(net, name)
        th = m.weight.detach().flatten(1)
        if m.bias is not None:
            th = torch.cat([th, m.bias.detach()[:, None]], 1)
        out.append(th / th.norm(dim=1, keepdim=True))
    return torch.cat([u.flatten() for u in out])


def row_norms(net: Net) -> list[torch.Tensor]:
    out = []
    for name in PSI_LAYERS:
        m = getattr(net, name)
        th = m.weight.detach().flatten(1)
        if m.bias is not None:
            th = torch.cat([th, m.bias.detach()[:, None]], 1)
        out.append(th.norm(dim=1))
    return out


def psi_opt(net: Net, **kw) -> PSISGD:
    kw.setdefault("lr", 0.1)
    eu = {k: kw.pop(k) for k in ("e_lr", "e_momentum") if k in kw}
    groups = psi_param_groups(net, lr=eu.get("e_lr", 0.1), momentum=eu.get("e_momentum", 0.0),
                              example_input=torch.randn(4, 2, 8, 8, dtype=DT))
    return PSISGD(groups, **kw)


def test_groups_of_the_test_net():
    groups = psi_param_groups(make_net(), example_input=torch.randn(4, 2, 8, 8, dtype=DT))
    assert groups[0]["psi"] and groups[0]["psi_names"] == ["c1.weight", "c2.weight", "l3.weight"]
    assert groups[0]["psi_norms"] == ["b1", "b2", "b3"]
    assert [tuple(u) for u in groups[0]["psi_units"]] == [(0, 1, 0), (2, -1, 0), (3, 4, 0)]
    assert groups[0]["psi_weight_decay"] == 0.0
    assert not groups[1]["psi"] and len(groups[1]["params"]) == 6 + 2  # 3 BN (gamma, beta) + fc


# -- 1. the exact paper update ----------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_dim", [0, 1])
def test_exact_paper_update(bias, out_dim):
    torch.manual_seed(0)
    w = torch.randn(4, 3, 2, dtype=DT, requires_grad=True)
    b = torch.randn(w.shape[out_dim], dtype=DT, requires_grad=True)
    params = [w, b] if bias else [w]
    unit = (0, 1 if bias else -1, out_dim)
    g0, g1 = torch.randn_like(w), torch.randn_like(w)  # NOT orthogonal to the rows
    h0, h1 = torch.randn_like(b), torch.randn_like(b)

    def s_of(wv, bv):
        s = wv.pow(2).sum(dim=[d for d in range(3) if d != out_dim])
        return s + bv.pow(2) if bias else s

    def view(s):
        return s.view(-1, 1, 1) if out_dim == 0 else s.view(1, -1, 1)

    lr, rho = 0.3, 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = PSISGD([{"params": params, "psi": True, "psi_units": [unit]}], lr=lr, momentum=0.0,
                     check_invariance="off", renorm_threshold=None)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = g0.clone(), h0.clone()
    opt.step()
    s0 = s_of(w0, b0)
    torch.testing.assert_close(w.detach(), w0 - lr * view(s0) * g0, atol=1e-12, rtol=0)
    if bias:
        torch.testing.assert_close(b.detach(), b0 - lr * s0 * h0, atol=1e-12, rtol=0)
    # PSI-SGDM, two steps: u1 = -lr s0 G0; w1 = w0 + u1; u2 = rho u1 - lr s1 G1; w2 = w1 + u2
    with torch.no_grad():
        w.copy_(w0)
        b.copy_(b0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = PSISGD([{"params": params, "psi": True, "psi_units": [unit]}], lr=lr, momentum=rho,
                     check_invariance="off", renorm_threshold=None)
    w.grad, b.grad = g0.clone(), h0.clone()
    opt.step()
    w.grad, b.grad = g1.clone(), h1.clone()
    opt.step()
    u1w, u1b = -lr * view(s0) * g0, -lr * s0 * h0
    w1, b1 = w0 + u1w, b0 + u1b
    s1 = s_of(w1, b1)
    w2 = w1 + rho * u1w - lr * view(s1) * g1
    b2 = b1 + rho * u1b - lr * s1 * h1
    torch.testing.assert_close(w.detach(), w2, atol=1e-12, rtol=0)
    if bias:
        torch.testing.assert_close(b.detach(), b2, atol=1e-12, rtol=0)


# -- 2. Theorem 1: equivalence preservation ---------------------------------------------------
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_theorem1_equivalence(rho):
    a = make_net()
    b = rescaled_copy(a)
    data = batches(30)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-8, rtol=0)
    start = units(a)
    train(a, psi_opt(a, momentum=rho), data)
    train(b, psi_opt(b, momentum=rho), data)
    probe = batches(1, seed=9)[0][0]
    with torch.no_grad():
        gap = (a(probe) - b(probe)).abs().max().item()
    assert gap < 1e-8
    moved = (units(a) - start).view(-1)
    # every row's unit direction moved by > 1e-2 in l2
    per_row = []
    ua, u0 = units(a), start
    offset = 0
    for name in PSI_LAYERS:
        m = getattr(a, name)
        d = m.weight[0].numel() + (1 if m.bias is not None else 0)
        n = m.weight.shape[0]
        per_row.append((ua[offset:offset + n * d] - u0[offset:offset + n * d]).view(n, d).norm(dim=1))
        offset += n * d
    assert torch.cat(per_row).min() > 1e-2, moved.abs().max()


def test_sgd_breaks_equivalence():
    a = make_net()
    b = rescaled_copy(a)
    data = batches(30)
    for net in (a, b):
        train(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), data)
    probe = batches(1, seed=9)[0][0]
    with torch.no_grad():
        assert (a(probe) - b(probe)).abs().max().item() > 1e-1


# -- 3. norm independence of the angular step --------------------------------------------------
def test_angle_independent_of_norm():
    x, y = batches(1)[0]
    angles, tele = [], []
    for scale in (0.1, 1.0, 10.0):
        net = make_net()
        with torch.no_grad():
            net.c2.weight.mul_(scale)
        before = net.c2.weight.detach().flatten(1).clone()
        opt = psi_opt(net, lr=0.5)
        opt.zero_grad()
        nn.CrossEntropyLoss()(net(x), y).backward()
        opt.step()
        after = net.c2.weight.detach().flatten(1)
        cos = (before * after).sum(1) / (before.norm(dim=1) * after.norm(dim=1))
        ang = torch.atan2(torch.sqrt((1 - cos) * (1 + cos)), cos)
        angles.append(ang)
        tele.append(opt.telemetry()["psi_angle_mean/c2.weight"])
        torch.testing.assert_close(torch.tensor(tele[-1], dtype=DT), ang.mean(), rtol=1e-6, atol=0)
    assert angles[0].min() > 1e-3
    torch.testing.assert_close(angles[0], angles[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(angles[2], angles[1], rtol=1e-6, atol=0)


# -- 4. Lemma 1 norm law ------------------------------------------------------------------------
def test_lemma1_norm_law():
    net = make_net()
    opt = psi_opt(net, lr=0.5, renorm_threshold=None)
    loss_fn = nn.CrossEntropyLoss()
    worst = 0.0
    for x, y in batches(20):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        n0 = row_norms(net)
        g2 = []
        for name in PSI_LAYERS:
            m = getattr(net, name)
            g = m.weight.grad.flatten(1)
            if m.bias is not None:
                g = torch.cat([g, m.bias.grad[:, None]], 1)
            g2.append(g.pow(2).sum(1))
        opt.step()
        for a, b, g in zip(n0, row_norms(net), g2):
            pred = a**2 + 0.25 * a**4 * g
            worst = max(worst, ((b**2 - pred).abs() / pred).max().item())
    assert worst < 1e-8


# -- 5. the overflow guard ------------------------------------------------------------------------
def _set_row_norms(net: Net, value: float) -> None:
    with torch.no_grad():
        for name in PSI_LAYERS:
            m = getattr(net, name)
            th = m.weight.flatten(1)
            if m.bias is not None:
                th = torch.cat([th, m.bias[:, None]], 1)
            c = value / th.norm(dim=1)
            m.weight.mul_(c.view(-1, *[1] * (m.weight.dim() - 1)))
            if m.bias is not None:
                m.bias.mul_(c)


def test_guard_rescales_buffer_and_bn_stats():
    data = batches(60)
    ref = make_net()
    _set_row_norms(ref, 0.1)
    net = copy.deepcopy(ref)
    train(ref, psi_opt(ref, lr=0.1, momentum=0.9, renorm_threshold=None), data)
    opt = psi_opt(net, lr=0.1, momentum=0.9, renorm_threshold=0.12, renorm_target=0.1, bn_stats=net)
    train(net, opt, data)
    fired = sum(float(st["renorm_count"]) for st in opt.state.values() if "renorm_count" in st)
    assert fired > 20
    assert max(n.max().item() for n in row_norms(net)) <= 0.12 + 1e-12
    torch.testing.assert_close(units(net), units(ref), atol=1e-8, rtol=0)
    ref.eval()
    net.eval()
    probe = batches(1, seed=9)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(net(probe), ref(probe), atol=1e-7, rtol=0)


# -- 6. normalised retraction ------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_normalize_retraction_equivalent(rho):
    data = batches(30)
    a = make_net()
    b = copy.deepcopy(a)
    train(a, psi_opt(a, momentum=rho), data)
    n0 = row_norms(b)
    train(b, psi_opt(b, momentum=rho, retraction="normalize", bn_stats=b), data)
    torch.testing.assert_close(units(a), units(b), atol=1e-10, rtol=0)
    for x, y in zip(n0, row_norms(b)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)


# -- 7. momentum form across an LR drop --------------------------------------------------------
def test_momentum_forms():
    data = batches(30)
    drop = lambda t, g: g["initial"] * (0.2 if t >= 20 else 1.0)  # noqa: E731
    const = lambda t, g: g["initial"]  # noqa: E731
    runs = {}
    for form in ("paper", "torch"):
        for sched_name, sched in (("drop", drop), ("const", const)):
            net = make_net()
            opt = psi_opt(net, lr=0.1, momentum=0.9, momentum_form=form)
            for g in opt.param_groups:
                g["initial"] = g["lr"]
            train(net, opt, data, lr_at=sched)
            runs[form, sched_name] = units(net)
    assert (runs["paper", "const"] - runs["torch", "const"]).abs().max() < 1e-12
    assert (runs["paper", "drop"] - runs["torch", "drop"]).abs().max() > 1e-3


def test_paper_form_reference_recursion_with_drop():
    """One unit, synthetic grads: paper form = u <- rho u - lr_t s G; torch form = b <- rho b + s G."""
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=DT, requires_grad=True)
    grads = [0.1 * torch.randn(3, 4, dtype=DT) for _ in range(25)]
    for form in ("paper", "torch"):
        with torch.no_grad():
            w.copy_(torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(1)))
        wr = w.detach().clone()
        buf = torch.zeros_like(wr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = PSISGD([{"params": [w], "psi": True, "psi_units": [(0, -1, 0)]}], lr=0.1, momentum=0.9,
                         momentum_form=form, check_invariance="off")
        for t, g in enumerate(grads):
            lr = 0.1 * (0.2 if t >= 20 else 1.0)
            opt.param_groups[0]["lr"] = lr
            w.grad = g.clone()
            opt.step()
            s = wr.pow(2).sum(1, keepdim=True)
            if form == "paper":
                buf = 0.9 * buf - lr * s * g
                wr = wr + buf
            else:
                buf = 0.9 * buf + s * g
                wr = wr - lr * buf
        torch.testing.assert_close(w.detach(), wr, atol=1e-12, rtol=1e-12)


# -- 8. Euclidean groups are torch.optim.SGD, bit for bit -------------------------------------------
@pytest.mark.parametrize("cfg", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                 dict(momentum=0.5, dampening=0.3, weight_decay=1e-2, maximize=True),
                                 dict(momentum=0.0, weight_decay=0.0)])
def test_euclidean_groups_bit_equal_to_sgd(cfg):
    a = make_net()
    b = copy.deepcopy(a)
    data = batches(50)
    maximize = cfg.pop("maximize", False)
    train(a, torch.optim.SGD(a.parameters(), lr=0.05, maximize=maximize, **cfg), data)
    train(b, PSISGD(b.parameters(), lr=0.05, maximize=maximize, **cfg), data)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_mixed_groups_euclidean_part_matches_sgd():
    """In a PSI model the Euclidean group gets exactly torch's SGD update given the same grads."""
    net = make_net()
    opt = psi_opt(net, e_momentum=0.9)
    e_params = opt.param_groups[1]["params"]
    shadow = [p.detach().clone().requires_grad_(True) for p in e_params]
    sgd = torch.optim.SGD(shadow, lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches(5):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        for s, p in zip(shadow, e_params):
            s.grad = p.grad.clone()
        opt.step()
        sgd.step()
    for s, p in zip(shadow, e_params):
        assert torch.equal(s, p)


# -- 9. extensions ------------------------------------------------------------------------------
def test_project_transport_keeps_buffers_horizontal():
    net = make_net()
    opt = psi_opt(net, momentum=0.9, transport="project")
    train(net, opt, batches(10))
    for name in PSI_LAYERS:
        m = getattr(net, name)
        u = opt.state[m.weight]["momentum_buffer"].flatten(1)
        th = m.weight.detach().flatten(1)
        if m.bias is not None:
            u = torch.cat([u, opt.state[m.bias]["momentum_buffer"][:, None]], 1)
            th = torch.cat([th, m.bias.detach()[:, None]], 1)
        cos = (u * th).sum(1).abs() / (u.norm(dim=1) * th.norm(dim=1))
        assert cos.max() < 1e-10


# -- 11. state-dict round trip ------------------------------------------------------------------
def test_state_dict_resume_bit_identical():
    data = batches(40)
    kw = dict(lr=0.1, momentum=0.9, renorm_threshold=0.12, renorm_target=0.1)
    ref = make_net()
    _set_row_norms(ref, 0.1)
    start = copy.deepcopy(ref)
    train(ref, psi_opt(ref, bn_stats=ref, **kw), data)

    net = copy.deepcopy(start)
    opt = psi_opt(net, bn_stats=net, **kw)
    train(net, opt, data[:17])
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make_net(seed=5)
    fresh.load_state_dict(state["model"])
    opt2 = psi_opt(fresh, **kw)
    opt2.load_state_dict(state["opt"])
    opt2.bind_bn_stats(fresh)
    train(fresh, opt2, data[17:])
    for (n, p), q in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), n


# -- API: closure, schedulers, registry, telemetry, errors --------------------------------------
def test_closure_and_scheduler():
    net = make_net()
    opt = psi_opt(net, lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(net(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(4):
        losses.append(float(opt.step(closure).detach()))
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.025]
    assert losses[-1] < losses[0]


def test_registry_builders():
    model = bnlab.models.build("resnet20", width=0.25)
    opt = make_optimizer("psi-sgd", model, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True,
                         psi_lr=1.0)
    psi, eu = opt.param_groups
    assert psi["psi"] and psi["momentum"] == 0.0 and psi["lr"] == 1.0 and psi["psi_weight_decay"] == 0.0
    assert len(psi["psi_units"]) == 19 and psi["psi_norms"][0] == "stem.norm"
    assert not eu["psi"] and eu["momentum"] == 0.9 and eu["weight_decay"] == 5e-4 and eu["nesterov"]
    opt = make_optimizer("psi-sgdm", model, lr=0.1, momentum=0.9)
    assert opt.param_groups[0]["momentum"] == 0.9
    opt = make_optimizer("psi-gd", model, lr=0.1, momentum=0.9)
    assert [g["momentum"] for g in opt.param_groups] == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown option"):
        make_optimizer("psi-sgd", model, lr=0.1, bogus=1)


def test_telemetry_keys_are_floats():
    net = make_net()
    opt = psi_opt(net, momentum=0.9)
    train(net, opt, batches(3))
    tele = opt.telemetry()
    assert {"psi_angle_mean", "psi_angle_max", "psi_norm_min", "psi_norm_median", "psi_norm_max",
            "psi_renorms"} <= set(tele)
    assert all(isinstance(v, float) and math.isfinite(v) for v in tele.values())
    assert tele["psi_angle_max"] >= tele["psi_angle_mean"] > 0
    assert "psi_angle_mean" not in opt.telemetry()  # accumulators reset


def test_refuses_non_invariant_parameter():
    net = make_net()
    groups = [{"params": [net.fc.weight, net.fc.bias], "psi": True, "psi_units": [(0, 1, 0)]},
              {"params": [p for n, p in net.named_parameters() if not n.startswith("fc.")]}]
    opt = PSISGD(groups, lr=0.1)
    x, y = batches(1)[0]
    nn.CrossEntropyLoss()(net(x), y).backward()
    with pytest.raises(ValueError, match="not scale-invariant"):
        opt.step()
    opt = PSISGD(groups, lr=0.1, check_invariance="warn")
    with pytest.warns(UserWarning, match="not scale-invariant"):
        opt.step()
    with pytest.warns(UserWarning, match="check_invariance='off'"):
        PSISGD(groups, lr=0.1, check_invariance="off")


def test_bad_inputs_raise_clear_errors():
    net = make_net()
    x, y = batches(1)[0]
    opt = psi_opt(net)
    nn.CrossEntropyLoss()(net(x), y).backward()
    net.c2.weight.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite gradient"):
        opt.step()
    net.c2.weight.grad.zero_()
    with torch.no_grad():
        net.c2.weight[1].zero_()
    with pytest.raises(ValueError, match="zero norm"):
        opt.step()
    w = torch.randn(3, 2, dtype=DT, requires_grad=True)
    opt = PSISGD([{"params": [w], "psi": True, "psi_units": [(0, -1, 0)]}], lr=0.1)
    w.grad = torch.randn(3, 2, dtype=DT).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="psi_units"):
        PSISGD([{"params": [w], "psi": True}])
    with pytest.raises(ValueError, match="belong to no psi unit"):
        PSISGD([{"params": [w, torch.zeros(3, requires_grad=True)], "psi": True, "psi_units": [(0, -1, 0)]}])
    with pytest.raises(ValueError, match="bias shape"):
        PSISGD([{"params": [w, torch.zeros(2, requires_grad=True)], "psi": True, "psi_units": [(0, 1, 0)]}])
    with pytest.raises(ValueError, match="retraction"):
        PSISGD([{"params": [w], "psi": True, "psi_units": [(0, -1, 0)]}], retraction="exp")
    with pytest.raises(ValueError, match="nesterov"):
        PSISGD([{"params": [w], "psi": True, "psi_units": [(0, -1, 0)]}], momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        PSISGD([w], lr=-1.0)
    with pytest.raises(TypeError, match="bn_stats"):
        PSISGD([{"params": [w], "psi": True, "psi_units": [(0, -1, 0)]}], bn_stats=3)


def test_psi_weight_decay_is_coupled_through_the_rule():
    """psi_weight_decay: G <- G + lambda theta, then the PSI rule (spec Sec. 3.7)."""
    w = torch.randn(3, 4, dtype=DT, requires_grad=True)
    w0 = w.detach().clone()
    g = torch.randn(3, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = PSISGD([{"params": [w], "psi": True, "psi_units": [(0, -1, 0)]}], lr=0.1, psi_weight_decay=0.01,
                     check_invariance="off")
    w.grad = g.clone()
    opt.step()
    s = w0.pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(w.detach(), (1 - 0.1 * 0.01 * s) * w0 - 0.1 * s * g, atol=1e-12, rtol=0)


def test_psi_suite_configs_build_their_optimisers():
    from bnlab.suites import get_suite

    for quick in (True, False):
        s = get_suite("psi", quick=quick)
        assert [c.name for c in s.configs] == ["SGD", "SGDM", "PSI-SGD", "PSI-SGDM"]
        assert all(c.weight_decay == 0.0 for c in s.configs)
    model = bnlab.models.build("resnet20", width=0.25, in_channels=1)
    for c in get_suite("psi", quick=True).configs:
        opt = make_optimizer(c.optim, model, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                             **c.optim_options)
        assert isinstance(opt, PSISGD) == c.optim.startswith("psi")


def test_invariance_guard_ignores_psi_weight_decay():
    """The orthogonality test is applied to the loss gradient, before coupled L2 is added."""
    net = make_net()
    train(net, psi_opt(net, psi_weight_decay=0.5), batches(3))


def test_add_param_group_is_validated():
    net = make_net()
    opt = PSISGD([{"params": [net.fc.weight]}], lr=0.1)
    opt.add_param_group({"params": [net.fc.bias], "momentum": 0.9})
    with pytest.raises(ValueError, match="psi_units"):
        opt.add_param_group({"params": [net.c2.weight], "psi": True})
    assert len(opt.param_groups) == 2


# -- fast path (flat layout) vs the reference path and a plain per-unit reference ---------------
def _run_pair(cfg: dict, steps: int = 12, norms: float | None = 0.1):
    """The same run with the fast path and with the reference path: (nets, optimisers)."""
    out = []
    for fast in (True, False):
        net = make_net()
        if norms is not None:
            _set_row_norms(net, norms)
        opt = psi_opt(net, bn_stats=net, guard_steps=1, **cfg)
        opt._use_fast = fast
        train(net, opt, batches(steps))
        out.append((net, opt))
    return out


@pytest.mark.parametrize("cfg", [
    dict(lr=0.1, momentum=0.9, renorm_threshold=0.12, renorm_target=0.1, e_momentum=0.9),
    dict(lr=0.5, momentum=0.0, psi_weight_decay=0.1, maximize=True, renorm_threshold=None),
    dict(lr=0.2, momentum=0.9, renorm_threshold=0.12, renorm_target=0.1, foreach=True, e_momentum=0.9,
         track_angles=False),
    dict(lr=0.1, momentum=0.9, maximize=True, renorm_threshold=None),              # ungathered G, ascent
    dict(lr=0.1, momentum=0.5, psi_weight_decay=0.05, renorm_threshold=None),      # gathered G, momentum
])
def test_fast_path_bit_equal_to_reference_path(cfg):
    (net_f, opt_f), (net_r, opt_r) = _run_pair(dict(cfg))
    lay = opt_f._layouts[0]
    assert lay is not None and 0 not in opt_r._layouts  # the fast path ran in one, not in the other
    for (n, p), q in zip(net_f.state_dict().items(), net_r.state_dict().values()):
        assert torch.equal(p, q), n  # weights, biases, BN running statistics
    for p_f, p_r in zip(net_f.parameters(), net_r.parameters()):
        sf, sr = opt_f.state[p_f], opt_r.state[p_r]
        assert sf.keys() >= {k for k in sr if not k.startswith("angle")}
        for k in ("momentum_buffer", "renorm_count"):
            if k in sr:
                assert torch.equal(sf[k], sr[k]), k
    if "renorm_threshold" in cfg and cfg["renorm_threshold"] is not None:
        assert sum(float(st.get("renorm_count", 0)) for st in opt_f.state.values()) > 5
    if cfg.get("momentum", 0):
        assert opt_f.state[net_f.c2.weight]["momentum_buffer"].data_ptr() >= lay.ubuf.data_ptr()
    tf, tr = opt_f.telemetry(), opt_r.telemetry()
    assert tf.keys() == tr.keys()
    for k in tf:
        assert tf[k] == pytest.approx(tr[k], rel=1e-10, abs=1e-14), k


def test_fast_path_matches_plain_per_unit_reference():
    """Algorithm 1 + guard + BN-stat rescaling written as a plain loop over layers (float64, 1e-12)."""
    lr, rho, thr, tgt = 0.1, 0.9, 0.12, 0.1
    net = make_net()
    _set_row_norms(net, 0.1)
    ref = copy.deepcopy(net)
    opt = psi_opt(net, lr=lr, momentum=rho, renorm_threshold=thr, renorm_target=tgt, bn_stats=net, guard_steps=0)
    psi = {getattr(ref, n).weight for n in PSI_LAYERS} | {getattr(ref, n).bias for n in PSI_LAYERS} - {None}
    sgd = torch.optim.SGD([p for p in ref.parameters() if p not in psi], lr=0.1)
    bufs = {n: None for n in PSI_LAYERS}
    fired = 0
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches(15):
        train(net, opt, [(x, y)])
        ref.zero_grad()
        loss_fn(ref(x), y).backward()
        sgd.step()
        with torch.no_grad():
            for n, bn in zip(PSI_LAYERS, ("b1", "b2", "b3")):
                m, b = getattr(ref, n), getattr(ref, bn)
                cols = [m.weight.flatten(1)] + ([m.bias[:, None]] if m.bias is not None else [])
                gcols = [m.weight.grad.flatten(1)] + ([m.bias.grad[:, None]] if m.bias is not None else [])
                th, g = torch.cat(cols, 1), torch.cat(gcols, 1)
                s = (th * th).sum(1, keepdim=True)
                u = -lr * s * g if bufs[n] is None else rho * bufs[n] - lr * s * g
                th = th + u
                nrm = th.norm(dim=1, keepdim=True)
                c = torch.where(nrm > thr, tgt / nrm, torch.ones_like(nrm))
                fired += int((c != 1).sum())
                th, bufs[n] = th * c, u * c
                m.weight.copy_(th[:, :m.weight[0].numel()].view_as(m.weight))
                if m.bias is not None:
                    m.bias.copy_(th[:, -1])
                b.running_mean.mul_(c[:, 0])
                b.running_var.mul_(c[:, 0] ** 2)
    assert opt._layouts[0] is not None and fired > 5
    assert sum(float(st.get("renorm_count", 0)) for st in opt.state.values()) == fired
    for (n, p), q in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0, msg=n)


@pytest.mark.parametrize("cfg", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                 dict(momentum=0.5, dampening=0.3, weight_decay=1e-2, maximize=True),
                                 dict(momentum=0.0, weight_decay=0.0)])
def test_flat_euclidean_step_bit_equal_to_sgd_foreach(cfg):
    a = make_net()
    b = copy.deepcopy(a)
    data = batches(20)
    train(a, torch.optim.SGD(a.parameters(), lr=0.05, foreach=True, **cfg), data)
    opt = PSISGD(b.parameters(), lr=0.05, foreach=True, **cfg)
    train(b, opt, data)
    assert 0 in opt._elayouts  # the flat path ran
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_layout_rebuilt_after_load_state_dict_and_angles_survive_state_dict():
    net = make_net()
    opt = psi_opt(net, lr=0.1, momentum=0.9, guard_steps=0)
    train(net, opt, batches(3))
    sd = copy.deepcopy(opt.state_dict())  # flushes the pending per-row angle sums into the state
    assert float(sd["state"][0]["angle_count"]) == 3 * net.c1.weight.shape[0]
    opt.load_state_dict(sd)
    assert not opt._layouts
    train(net, opt, batches(2, seed=4))
    lay = opt._layouts[0]
    assert opt.state[net.c2.weight]["momentum_buffer"].untyped_storage().data_ptr() == \
        lay.ubuf.untyped_storage().data_ptr()
    assert opt.telemetry()["psi_angle_mean"] > 0
