"""G-SGD equals SGD on basis-path coordinates (pbn.md Sec. 4, Sec. 8 tests 2-3)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bnlab.path as bpath
from bnlab.models import build
from bnlab.nn import BatchNormAct
from bnlab.nn.path_bn import PathBatchNorm, PathConv2d, PathUnit
from bnlab.optim import GSGD, make_optimizer

DT = torch.float64


# -- helpers: path coordinates <-> weights -----------------------------------------------------------
def _to_path(ws, ms):
    """weights -> (v (H,), layer-1 weight, [v^l = U^l v_k])."""
    v = (ws[0] * ms[0]).sum((1, *range(2, ws[0].dim())))
    col = [v.view(1, -1, *([1] * (w.dim() - 2))) for w in ws[1:]]
    return v, ws[0].clone(), [w * (1 - m) * c for w, m, c in zip(ws[1:], ms[1:], col)]


def _to_weights(v, w1, vls, ms):
    rows = v.view(-1, *([1] * (w1.dim() - 1)))
    out = [w1 * (1 - ms[0]) + ms[0] * rows]
    for vl, m in zip(vls, ms[1:]):
        out.append(vl * (1 - m) / v.view(1, -1, *([1] * (vl.dim() - 2))) + m)
    return out


def _reference_steps(loss_of_weights, ws, ms, steps, lr, wd, **sgd):
    """torch.optim.SGD on path coordinates; decay on non-skeleton path values only."""
    v, w1, vls = _to_path([w.detach() for w in ws], ms)
    coords = [t.clone().requires_grad_() for t in (v, w1, *vls)]
    opt = torch.optim.SGD([{"params": coords[:1], "weight_decay": 0.0},
                           {"params": coords[1:], "weight_decay": wd}], lr=lr, **sgd)
    for _ in range(steps):
        opt.zero_grad()
        loss_of_weights(_to_weights(coords[0], coords[1], coords[2:], ms)).backward()
        opt.step()
    return [t.detach() for t in _to_weights(coords[0], coords[1], coords[2:], ms)]


def _gsgd_steps(loss_of_weights, ws, roles, steps, lr, wd, **kw):
    params = [nn.Parameter(w.detach().clone()) for w in ws]
    opt = GSGD([{"params": params, "roles": roles, "block": "b"}], lr=lr, weight_decay=wd, **kw)
    for _ in range(steps):
        opt.zero_grad()
        loss_of_weights(params).backward()
        opt.step()
    return [p.detach() for p in params], opt


def _mlp_problem():
    """Bias-free MLP 3 -> 5 -> 5 -> 5 -> 4 (L = 4), no BN, positive-diagonal start."""
    torch.manual_seed(1)
    shapes = [(5, 3), (5, 5), (5, 5), (4, 5)]
    roles = bpath.roles_for(4)
    ms = [bpath.skeleton_mask(s, r, dtype=DT) for s, r in zip(shapes, roles)]
    ws = [torch.randn(*s, dtype=DT) * 0.5 for s in shapes]
    ws = [ws[0] * (1 - ms[0]) + 1.3 * ms[0]] + [w * (1 - m) + m for w, m in zip(ws[1:], ms[1:])]
    x, y = torch.randn(16, 3, dtype=DT), torch.randint(0, 4, (16,))

    def loss(w):
        z = x
        for i, wi in enumerate(w):
            z = z @ wi.T
            z = F.relu(z) if i < len(w) - 1 else z
        return F.cross_entropy(z, y)

    return loss, ws, ms, roles


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_one_step_equals_sgd_on_path_coordinates_mlp(wd):
    loss, ws, ms, roles = _mlp_problem()
    ref = _reference_steps(loss, ws, ms, 1, lr=0.3, wd=wd)
    got, _ = _gsgd_steps(loss, ws, roles, 1, lr=0.3, wd=wd)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-12
    assert max((a - b).abs().max().item() for a, b in zip(got, ws)) > 1e-3     # it did move


def _conv_block_problem():
    """3-layer conv block 3 -> 6 -> 6 -> 4 (modulo masks): BN in layer 1, Path-BN in layers 2-3."""
    torch.manual_seed(2)
    u1 = PathUnit(PathConv2d(3, 6, 3, 1, 1, role="first", dtype=DT), BatchNormAct(6, dtype=DT))
    u2 = PathUnit(PathConv2d(6, 6, 3, 2, 1, role="mid", dtype=DT), PathBatchNorm(6, lam=1.0, dtype=DT))
    u3 = PathUnit(PathConv2d(6, 4, 1, 1, 0, role="last", dtype=DT),
                  PathBatchNorm(4, lam=0.1, act=None, dtype=DT))
    net = nn.Sequential(u1, u2, u3)
    names = ["0.conv.weight", "1.conv.weight", "2.conv.weight"]
    ms = [u.conv.skeleton_mask for u in (u1, u2, u3)]
    ws = [u.conv.weight.detach() * (1 - m) + m * (1.2 if i == 0 else 1.0)
          for i, (u, m) in enumerate(zip((u1, u2, u3), ms))]
    x, y = torch.randn(8, 3, 6, 6, dtype=DT), torch.randint(0, 4, (8,))

    def loss(w):
        out = functional_call(net, dict(zip(names, w)), (x,))
        return F.cross_entropy(out.mean((2, 3)), y)

    return loss, ws, ms, ["first", "mid", "last"]


def test_one_step_equals_sgd_on_path_coordinates_conv_block_with_pathbn_and_wd():
    loss, ws, ms, roles = _conv_block_problem()
    ref = _reference_steps(loss, ws, ms, 1, lr=0.5, wd=0.02)
    got, _ = _gsgd_steps(loss, ws, roles, 1, lr=0.5, wd=0.02)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-12


@pytest.mark.parametrize("sgd", [dict(momentum=0.9), dict(momentum=0.8, dampening=0.3),
                                 dict(momentum=0.9, nesterov=True)])
def test_path_space_momentum_equals_sgd_momentum_on_path_coordinates(sgd):
    loss, ws, ms, roles = _conv_block_problem()
    ref = _reference_steps(loss, ws, ms, 3, lr=0.2, wd=0.01, **sgd)
    got, _ = _gsgd_steps(loss, ws, roles, 3, lr=0.2, wd=0.01, **sgd)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-11


def test_wnorm_variant_scales_path_gradients():
    """BN(wnorm) (pbn.md Sec. 4.3): SGD on path coordinates whose loss gradients are multiplied by
    ||U^l[o, :, taps]|| (non-skeleton) or divided by layer 1's centre norm (skeleton)."""
    loss, ws, ms, roles = _conv_block_problem()
    lr = 0.3
    v, w1, vls = _to_path(ws, ms)
    coords = [t.clone().requires_grad_() for t in (v, w1, *vls)]
    loss(_to_weights(coords[0], coords[1], coords[2:], ms)).backward()
    wn = [w.norm(2, dim=1, keepdim=True) for w in ws]
    gv = coords[0].grad / (wn[0] * ms[0]).sum((1, 2, 3))
    new = [coords[0] - lr * gv, coords[1] - lr * coords[1].grad * wn[0]]
    new += [c - lr * c.grad * w for c, w in zip(coords[2:], wn[1:])]
    ref = _to_weights(new[0].detach(), new[1].detach(), [t.detach() for t in new[2:]], ms)
    got, _ = _gsgd_steps(loss, ws, roles, 1, lr=lr, wd=0.0, wnorm=True)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-12


def test_skeleton_entries_never_change_and_model_trains():
    torch.manual_seed(0)
    model = build("resnet18", norm="pbn", width=0.0625)
    consts = {id(m): m.weight.detach()[m.skeleton_mask.bool()].clone()
              for m in model.modules() if isinstance(m, PathConv2d) and m.role != "first"}
    opt = make_optimizer("gsgd", model, lr=0.1, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for m in model.modules():
        if id(m) in consts:
            assert torch.equal(m.weight.detach()[m.skeleton_mask.bool()], consts[id(m)])   # bit-identical
    tele = opt.telemetry()
    assert tele["gsgd_steps"] == 5.0 and 0 < tele["gsgd_min_abs_v"]
    assert tele["gsgd_min_R"] <= tele["gsgd_max_R"]
    assert all(isinstance(v, float) for v in tele.values())
    assert opt.telemetry() == {"gsgd_steps": 0.0}                                        # reset


@pytest.mark.parametrize("sgd", [dict(), dict(momentum=0.9, weight_decay=1e-3),
                                 dict(momentum=0.9, nesterov=True)])
def test_plain_groups_are_exactly_torch_sgd(sgd):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    b = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    b.load_state_dict(a.state_dict())
    oa = GSGD(a.parameters(), lr=0.1, **sgd)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, **sgd)
    for _ in range(3):
        x = torch.randn(6, 4)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    assert 0 in oa._elayouts  # the flat path (bnlab.optim.psi.flat_sgd_step) ran
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_state_dict_round_trip_with_momentum():
    torch.manual_seed(0)
    model = build("mlp", norm="pbn", hidden=[8, 8], in_channels=1, input_size=4)
    opt = make_optimizer("gsgd", model, lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["roles"] == ["first", "mid", "last"]
    opt2 = make_optimizer("gsgd", model, lr=0.05, momentum=0.9)
    opt2.load_state_dict(sd)
    w0 = model.layers[0].conv.weight
    assert torch.equal(opt2.state[w0]["skeleton_buffer"], opt.state[w0]["skeleton_buffer"])


# -- bad input ---------------------------------------------------------------------------------------
def test_refuses_model_not_in_path_space():
    with pytest.raises(ValueError, match="no path-space layers.*norm='pbn'"):
        make_optimizer("gsgd", build("resnet18", norm="bn", width=0.0625), lr=0.1)
    with pytest.raises(ValueError, match="unknown option"):
        make_optimizer("gsgd", build("resnet18", norm="pbn", width=0.0625), lr=0.1, foo=1)


def test_degenerate_v_raises_and_leaves_weights():
    loss, ws, ms, roles = _mlp_problem()
    ws[0] = ws[0] * (1 - ms[0])                                   # v_k = 0
    params = [nn.Parameter(w.clone()) for w in ws]
    opt = GSGD([{"params": params, "roles": roles, "block": "blk7"}], lr=0.1)
    loss(params).backward()
    with pytest.raises(FloatingPointError, match="blk7"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(params, ws))


def test_sign_flip_warns_and_r_min_clamps():
    loss, ws, ms, roles = _mlp_problem()
    params = [nn.Parameter(w.clone()) for w in ws]
    opt = GSGD([{"params": params, "roles": roles, "block": "blk3"}], lr=1e4)
    loss(params).backward()
    with pytest.warns(RuntimeWarning, match="blk3.*R_k"):
        opt.step()
    assert opt.telemetry()["gsgd_sign_flips"] >= 1
    params = [nn.Parameter(w.clone()) for w in ws]
    opt = GSGD([{"params": params, "roles": roles, "block": "blk3"}], lr=1e4, r_min=0.1)
    loss(params).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    tele = opt.telemetry()
    assert tele["gsgd_min_R"] == pytest.approx(0.1) and tele["gsgd_clamped"] >= 1


def test_bad_group_roles_are_reported():
    w = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, 4))]
    with pytest.raises(ValueError, match="roles must be first"):
        GSGD([{"params": w, "roles": ["mid", "last"], "block": "x"}], lr=0.1)
    w = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(2, 5))]
    with pytest.raises(ValueError, match="design rule"):
        GSGD([{"params": w, "roles": ["first", "mid", "last"], "block": "x"}], lr=0.1)


def test_trainer_run_logs_telemetry(tmp_path):
    import json

    from bnlab.train import train
    from bnlab.train.config import RunConfig

    cfg = RunConfig(model="mlp", norm="pbn", optim="gsgd", data="digits", epochs=2, batch_size=64, lr=0.2,
                    momentum=0.0, weight_decay=1e-4, schedule="multistep", augment=False, device="cpu",
                    model_options={"hidden": [32, 32]}, max_steps_per_epoch=5, out_dir=str(tmp_path / "r"))
    summary = train(cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["opt/gsgd_steps"] == 5.0 and rows[-1]["opt/gsgd_sign_flips"] == 0.0
    assert summary["test_acc"] > 0.3                                   # digits: chance is 0.1


def test_pbn_suite_configs_build():
    from bnlab.suites import get_suite

    for quick in (True, False):
        s = get_suite("pbn", quick=quick)
        assert len(s.configs) == (5 if quick else 10)
        for cfg in s.configs[:5]:
            model = build(cfg.model, norm=cfg.norm, width=0.0625, in_channels=1 if quick else 3,
                          input_size=8, **dict(cfg.model_options))
            opt = make_optimizer(cfg.optim, model, lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay, **dict(cfg.optim_options))
            assert isinstance(opt, GSGD) == (cfg.optim == "gsgd")
            assert opt.param_groups[0].get("wnorm", False) == ("wnorm" in cfg.name)


# -- the fast in-place step equals a straightforward out-of-place reference -----------------------------
def _random_block(shapes, gen: torch.Generator, dtype: torch.dtype = DT):
    """Random weights of one block (``* 0.3``), layer-1 skeleton entries 1.5, later ones 1 (a valid path-space
    start) -> (weights, masks, roles)."""
    roles = bpath.roles_for(len(shapes))
    ms = [bpath.skeleton_mask(s, r, dtype=dtype) for s, r in zip(shapes, roles)]
    ws = [torch.randn(*s, generator=gen, dtype=dtype) * 0.3 for s in shapes]
    ws = [ws[0] * (1 - ms[0]) + 1.5 * ms[0]] + [w * (1 - m) + m for w, m in zip(ws[1:], ms[1:])]
    return ws, ms, roles


def _ref_block_step(ws, gs, ms, *, lr, wd, mom, damp, nest, wnorm, r_min, bufs, sbuf):
    """Masked, out-of-place G-SGD step of one block (the pre-optimisation code, kept as the reference)."""
    col = lambda t, d: t.view(1, -1, *([1] * (d - 2)))                    # noqa: E731
    row = lambda t, d: t.view(-1, *([1] * (d - 1)))                       # noqa: E731
    red0 = (1, *range(2, ws[0].dim()))
    v, gsk = (ws[0] * ms[0]).sum(red0), (gs[0] * ms[0]).sum(red0)
    sigma = sum(((1 - m) * w * g).sum((0, *range(2, w.dim()))) for w, g, m in zip(ws[1:], gs[1:], ms[1:]))
    wn = [w.norm(2, dim=1, keepdim=True) for w in ws] if wnorm else [1.0] * len(ws)
    d_s = (v * gsk - sigma) / (v * (wn[0] * ms[0]).sum(red0)) if wnorm else gsk - sigma / v
    ds = [(1 - ms[0]) * (gs[0] * wn[0] + wd * ws[0])]
    ds += [(1 - m) * (g * n / col(v, w.dim()) + wd * w * col(v, w.dim())) for w, g, m, n in
           zip(ws[1:], gs[1:], ms[1:], wn[1:])]
    if mom:
        new_bufs = [d.clone() if b is None else b * mom + d * (1 - damp) for d, b in zip([d_s, *ds], [sbuf, *bufs])]
        steps = [d + mom * b if nest else b for d, b in zip([d_s, *ds], new_bufs)]
        (d_s, *ds), (sbuf, *bufs) = steps, new_bufs
    R = 1 - lr * d_s / v
    R = R if r_min is None else R.clamp_min(r_min)
    new = [torch.where(ms[0].bool(), ws[0] * row(R, ws[0].dim()), ws[0] - lr * ds[0])]
    new += [torch.where(m.bool(), w, (w - lr * d / col(v, w.dim())) / col(R, w.dim()))
            for w, d, m in zip(ws[1:], ds[1:], ms[1:])]
    return new, bufs, sbuf


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.01), dict(momentum=0.9, weight_decay=0.01),
                                dict(momentum=0.8, dampening=0.3, weight_decay=0.02),
                                dict(momentum=0.9, nesterov=True, weight_decay=0.01),
                                dict(momentum=0.9, wnorm=True, maximize=True, r_min=0.5),
                                dict(momentum=0.9, nesterov=True, channels_last=True)])
def test_fast_step_equals_reference_over_steps(kw):
    """Two blocks (a conv block with a strided 3x3 mid and 1x1 last layer, an MLP block) in float64, four
    steps with fresh random gradients: weights and momentum buffers equal the reference to 1e-12,
    skeleton constants of layers >= 2 bit-identical; a non-contiguous (channels_last) layout too."""
    kw = dict(kw)
    cl = kw.pop("channels_last", False)
    g = torch.Generator().manual_seed(3)
    shapes = [[(6, 3, 3, 3), (6, 6, 3, 3), (4, 6, 1, 1)], [(5, 4), (5, 5), (3, 5)]]
    blocks = []
    for shp in shapes:
        ws, ms, roles = _random_block(shp, g)
        if cl:
            ws = [w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w for w in ws]
        blocks.append((ws, ms, roles))
    params = [[nn.Parameter(w.clone()) for w in ws] for ws, _, _ in blocks]
    opt = GSGD([{"params": p, "roles": r, "block": f"b{i}"} for i, (p, (_, _, r)) in enumerate(zip(params, blocks))],
               lr=0.05, **kw)
    hp = dict(lr=0.05, wd=kw.get("weight_decay", 0.0), mom=kw.get("momentum", 0.0), damp=kw.get("dampening", 0.0),
              nest=kw.get("nesterov", False), wnorm=kw.get("wnorm", False), r_min=kw.get("r_min"))
    ref = [([w.clone() for w in ws], [None] * len(ws), None) for ws, _, _ in blocks]
    for _ in range(4):
        grads = [[torch.randn(w.shape, generator=g, dtype=DT) for w in ws] for ws, _, _ in blocks]
        for p, gr in zip(params, grads):
            for q, gg in zip(p, gr):
                q.grad = gg.clone()
        opt.step()
        for i, ((ws, bufs, sbuf), (_, ms, _), gr) in enumerate(zip(ref, blocks, grads)):
            gr = [-t for t in gr] if kw.get("maximize") else gr
            ref[i] = _ref_block_step(ws, gr, ms, bufs=bufs, sbuf=sbuf, **hp)
    for p, (ws, bufs, sbuf), (w0, ms, _) in zip(params, ref, blocks):
        assert max((a - b).abs().max().item() for a, b in zip(p, ws)) < 1e-12
        assert max((a - b).abs().max().item() for a, b in zip(p, w0)) > 1e-3              # it moved
        for q, m, w in zip(p[1:], ms[1:], w0[1:]):
            assert torch.equal(q.detach()[m.bool()], w[m.bool()])                       # bit-identical
        if hp["mom"]:
            got = [opt.state[q]["momentum_buffer"] for q in p]
            assert max((a - b).abs().max().item() for a, b in zip(got, bufs)) < 1e-12
            assert (opt.state[p[0]]["skeleton_buffer"] - sbuf).abs().max().item() < 1e-12


def test_block_without_grads_joins_later_and_mixed_dtypes():
    """A block whose first gradient arrives one step later (its skeleton buffer starts then, the other
    block's continues: torch.optim.SGD per block), and a float32 block next to float64 ones: each
    block equals the reference run on it alone."""
    g = torch.Generator().manual_seed(5)
    shp = [(4, 3, 3, 3), (4, 4, 3, 3), (2, 4, 1, 1)]
    inits = [_random_block(shp, g) for _ in range(3)]
    ms, roles = inits[0][1], inits[0][2]
    inits = [ws for ws, _, _ in inits]
    dts = [DT, DT, torch.float32]
    params = [[nn.Parameter(w.to(dt)) for w in ws] for ws, dt in zip(inits, dts)]
    opt = GSGD([{"params": p, "roles": roles, "block": f"b{i}"} for i, p in enumerate(params)], lr=0.05,
               momentum=0.9, weight_decay=0.01)
    ref = [([w.clone() for w in ws], [None] * 3, None) for ws in inits]
    hp = dict(lr=0.05, wd=0.01, mom=0.9, damp=0.0, nest=False, wnorm=False, r_min=None)
    for step in range(3):
        for i, p in enumerate(params):
            gr = [torch.randn(w.shape, generator=g, dtype=DT) for w in p]
            for q, gg in zip(p, gr):
                q.grad = None if (i == 1 and step == 0) else gg.to(q.dtype)
            if not (i == 1 and step == 0):
                ws, bufs, sbuf = ref[i]
                ref[i] = _ref_block_step(ws, [gg.to(dts[i]).to(DT) for gg in gr], ms, bufs=bufs, sbuf=sbuf, **hp)
        opt.step()
    for p, (ws, _b, _s), dt in zip(params, ref, dts):
        tol = 1e-12 if dt == DT else 1e-5
        assert max((a.double() - b).abs().max().item() for a, b in zip(p, ws)) < tol
