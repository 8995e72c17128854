"""Path space: skeleton masks, exact reparameterisation, Path-BN layers (pbn.md Sec. 1-3, Sec. 8)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab.path as bpath
from bnlab.models import build
from bnlab.nn import BatchNormAct
from bnlab.nn.path_bn import PathBatchNorm, PathConv2d, PathLinear, PathUnit

DT = torch.float64


def _perturb_bn(model: nn.Module) -> None:
    """Random gamma/beta and running stats so that rescaling errors would show."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNormAct):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=DT))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=DT) + 0.5)


def _small(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name == "mlp":
        model = build("mlp", norm="bn", in_channels=1, input_size=4, hidden=[6, 6, 6])
        x = torch.randn(10, 1, 4, 4, dtype=DT)
    else:
        model = build(name, norm="bn", width=0.0625)
        x = torch.randn(6, 3, 8, 8, dtype=DT)
    return model.to(DT), x


# -- skeleton ------------------------------------------------------------------------------------
def test_skeleton_masks_modulo_rule():
    m = bpath.skeleton_mask((6, 3, 3, 3), "first")
    assert m.sum() == 6 and m[:, :, 1, 1].sum(1).eq(1).all()           # one incoming edge per hidden node
    assert [int(m[o, :, 1, 1].argmax()) for o in range(6)] == [0, 1, 2, 0, 1, 2]
    m = bpath.skeleton_mask((4, 6), "last")
    assert m.sum(0).eq(1).all()                                          # one outgoing edge per hidden node
    assert [int(m[:, i].argmax()) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert torch.equal(bpath.skeleton_mask((5, 5, 1, 1), "mid")[:, :, 0, 0], torch.eye(5))
    with pytest.raises(ValueError, match="role"):
        bpath.skeleton_mask((3, 3), "middle")


@pytest.mark.parametrize("name", ["mlp", "plainnet18", "resnet18", "resnet50"])
def test_conversion_preserves_function(name):
    model, x = _small(name)
    _perturb_bn(model)
    model.eval()
    ref_eval = model(x)
    ref_model = copy.deepcopy(model).train()
    ref_train = ref_model(x)
    bpath.to_path_space(model, path_bn=False)
    assert model.path_space["init"] == "preserve"
    assert (model(x) - ref_eval).abs().max() < 1e-12                      # eval: BN buffers untouched
    model.train()
    assert (model(x) - ref_train).abs().max() < 1e-12
    for m in model.modules():                                            # constants are +-1 now
        if isinstance(m, (PathConv2d, PathLinear)) and m.role != "first":
            vals = m.weight[m.skeleton_mask.bool()]
            assert torch.equal(vals.abs(), torch.ones_like(vals))
    for name_, mod in model.named_modules():                             # running stats identical
        if isinstance(mod, BatchNormAct):
            ref = ref_model.get_submodule(name_)
            assert torch.allclose(mod.running_mean, ref.running_mean, atol=1e-12, rtol=0)


def test_paper_init_sets_skeleton_to_one():
    model, _ = _small("plainnet18")
    bpath.to_path_space(model, path_bn=True)
    assert model.path_space == {"path_bn": True, "lam": 1.0, "init": "paper",
                                "blocks": ["stages.0", "stages.1", "stages.2", "stages.3"]}
    for m in model.modules():
        if isinstance(m, PathConv2d):
            assert torch.equal(m.weight[m.skeleton_mask.bool()], torch.ones(m.weight.shape[0], dtype=DT))


# -- skeleton skip fast paths ---------------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,k,stride,pad,role", [
    (4, 4, 3, 1, 1, "mid"), (4, 4, 3, 2, 1, "mid"), (4, 4, 1, 2, 0, "last"), (4, 8, 1, 1, 0, "last"),
    (8, 4, 3, 1, 1, "last"), (3, 5, 3, 2, 1, "first"), (4, 4, 3, 1, 0, "mid"), (5, 5, 3, 2, 2, "mid"),
])
def test_skeleton_skip_equals_mask_conv(cin, cout, k, stride, pad, role):
    conv = PathConv2d(cin, cout, k, stride, pad, role=role, dtype=DT)
    x = torch.randn(2, cin, 7, 7, dtype=DT)
    ref = F.conv2d(x, conv.skeleton_mask, None, stride, pad)
    assert torch.equal(conv.skeleton(x), ref)
    if (cin, cout, stride, pad, k) == (4, 4, 1, 1, 3):
        assert torch.equal(conv.skeleton(x), x)                           # identity
    if (cin, cout, stride, pad, k) == (4, 4, 2, 1, 3):
        assert torch.equal(conv.skeleton(x), x[:, :, ::2, ::2])           # strided slice


def test_linear_skeleton_and_path_forward():
    lin = PathLinear(6, 4, bias=True, role="last", dtype=DT)
    x = torch.randn(5, 6, dtype=DT)
    assert torch.allclose(lin.skeleton(x), x @ lin.skeleton_mask.T, atol=1e-15)
    with torch.no_grad():
        lin.weight.mul_(1 - lin.skeleton_mask).add_(lin.skeleton_mask)
    full = lin(x)
    lin.path_forward = True
    assert torch.allclose(lin(x), full, atol=1e-14)
    lin(x).sum().backward()
    assert torch.equal(lin.weight.grad * lin.skeleton_mask, torch.zeros_like(lin.weight))


# -- Path-BN --------------------------------------------------------------------------------------
def test_path_batchnorm_reduces_to_batchnorm():
    pbn = PathBatchNorm(4, lam=0.0, act=None, momentum=0.3, dtype=DT)
    ref = nn.BatchNorm2d(4, momentum=0.3, dtype=DT)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
        pbn.weight.copy_(ref.weight)
        pbn.bias.copy_(ref.bias)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=DT, requires_grad=True)
        y1 = pbn(x, torch.randn_like(x))
        g1 = torch.autograd.grad(y1.square().sum(), x)[0]
        y2 = ref(x)
        g2 = torch.autograd.grad(y2.square().sum(), x)[0]
        assert torch.allclose(y1, y2, atol=1e-13) and torch.allclose(g1, g2, atol=1e-12)
    assert torch.allclose(pbn.running_mean, ref.running_mean)
    assert torch.allclose(pbn.running_var, ref.running_var)
    assert pbn.num_batches_tracked == ref.num_batches_tracked == 3
    assert set(pbn.state_dict()) == set(ref.state_dict())


def test_path_unit_formula_and_eval_uses_partial_sum_stats():
    conv = PathConv2d(4, 4, 3, 1, 1, role="mid", dtype=DT)
    with torch.no_grad():
        conv.weight.mul_(1 - conv.skeleton_mask).add_(conv.skeleton_mask)
    unit = PathUnit(conv, PathBatchNorm(4, lam=0.7, momentum=None, dtype=DT))
    xs = [torch.randn(6, 4, 5, 5, dtype=DT) for _ in range(3)]
    for x in xs:
        out = unit(x)
        o = F.conv2d(x, conv.weight * (1 - conv.skeleton_mask), padding=1)
        want = F.relu(F.batch_norm(o, None, None, training=True) + 0.7 * x)   # eqs 8-10
        assert torch.allclose(out, want, atol=1e-12)
    o_all = torch.cat([F.conv2d(x, conv.weight * (1 - conv.skeleton_mask), padding=1) for x in xs])
    per_batch = torch.stack([F.conv2d(x, conv.weight * (1 - conv.skeleton_mask), padding=1)
                             .var((0, 2, 3)) for x in xs])               # momentum=None: cumulative average
    assert torch.allclose(unit.norm.running_var, per_batch.mean(0), atol=1e-12)
    assert torch.allclose(unit.norm.running_mean, o_all.mean((0, 2, 3)), atol=1e-12)
    unit.eval()
    x = torch.randn(3, 4, 5, 5, dtype=DT)
    o = F.conv2d(x, conv.weight * (1 - conv.skeleton_mask), padding=1)
    rm, rv = unit.norm.running_mean.view(1, -1, 1, 1), unit.norm.running_var.view(1, -1, 1, 1)
    assert torch.allclose(unit(x), F.relu((o - rm) / torch.sqrt(rv + 1e-5) + 0.7 * x), atol=1e-12)
    # train/eval agree when the running stats equal the batch statistics of the partial sum
    with torch.no_grad():
        unit.norm.running_mean.copy_(o.mean((0, 2, 3)))
        unit.norm.running_var.copy_(o.var((0, 2, 3), unbiased=False))
    ev = unit(x)
    unit.train()
    assert torch.allclose(unit(x), ev, atol=1e-12)


def test_path_batchnorm_needs_skip():
    with pytest.raises(TypeError, match="skip"):
        PathBatchNorm(3)(torch.randn(4, 3, 2, 2))


# -- placement (pbn.md Sec. 3.3) and norm="pbn" forward/backward -----------------------------------
def test_pathbn_placement():
    r = build("resnet50", norm="pbn", width=0.0625)
    blk = r.stages[1][0]
    assert isinstance(blk.unit1.norm, BatchNormAct) and not isinstance(blk.unit1.norm, PathBatchNorm)
    assert isinstance(blk.unit2.norm, PathBatchNorm) and blk.unit2.norm.lam == 0.1
    assert isinstance(blk.unit2.norm.act, nn.ReLU) and blk.unit2.conv.stride == (2, 2)
    assert isinstance(blk.unit3.norm, PathBatchNorm) and isinstance(blk.unit3.norm.act, nn.Identity)
    assert isinstance(blk.shortcut.conv, nn.Conv2d) and not isinstance(blk.shortcut.conv, PathConv2d)
    assert not isinstance(r.stem.conv, PathConv2d) and not isinstance(r.fc, PathLinear)
    p = build("plainnet18", norm="pbn", width=0.0625)
    assert [type(u.norm).__name__ for u in p.stages[2]] == ["BatchNormAct"] + ["PathBatchNorm"] * 3
    assert p.stages[2][1].norm.lam == 1.0
    m = build("mlp", norm="pbn", hidden=[8, 8], in_channels=1, input_size=4)
    assert isinstance(m.fc, PathLinear) and m.fc.path_forward and m.fc.role == "last"
    m2 = build("mlp", norm="pbn", hidden=[8, 8], in_channels=1, input_size=4, path_options={"lam": 0.5})
    assert m2.layers[1].norm.lam == 0.5


@pytest.mark.parametrize("name", ["mlp", "plainnet18", "plainnet34", "resnet18", "resnet34", "resnet50"])
def test_pbn_models_forward_backward(name):
    kw = dict(in_channels=1, input_size=4, hidden=[8, 8, 8]) if name == "mlp" else dict(width=0.0625)
    model = build(name, norm="pbn", **kw)
    x = torch.randn(4, 1, 4, 4) if name == "mlp" else torch.randn(4, 3, 8, 8)
    out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    groups = bpath.param_groups(model)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for m in model.modules():
        if isinstance(m, (PathConv2d, PathLinear)):
            assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
            if m.role != "first":                                       # constants never enter the forward
                assert torch.equal(m.weight.grad * m.skeleton_mask, torch.zeros_like(m.weight))


# -- bad input -------------------------------------------------------------------------------------
def test_design_rule_and_unsupported_layers_are_reported():
    with pytest.raises(ValueError, match="design rule.*\\[8, 6\\]"):
        bpath.to_path_space(build("mlp", norm="bn", hidden=[8, 6], in_channels=1, input_size=4))
    with pytest.raises(ValueError, match="unsupported norm ReLU"):
        bpath.to_path_space(build("mlp", norm="none", hidden=[8, 8], in_channels=1, input_size=4))
    with pytest.raises(TypeError, match="VGG"):
        bpath.to_path_space(build("vgg11", norm="bn", width=0.0625))
    with pytest.raises(ValueError, match="ReLU"):
        build("plainnet18", norm="pbn", act="tanh")
    m = build("resnet18", norm="pbn", width=0.0625)
    with pytest.raises(ValueError, match="already"):
        bpath.to_path_space(m)
    with pytest.raises(ValueError, match="no path-space layers"):
        bpath.param_groups(build("resnet18", norm="bn", width=0.0625))
    with pytest.raises(ValueError, match="init"):
        bpath.to_path_space(build("resnet18", norm="bn", width=0.0625), init="ones")


# -- path values -----------------------------------------------------------------------------------
def test_path_values_match_products_and_are_rescaling_invariant():
    model, _ = _small("mlp")
    bpath.to_path_space(model, path_bn=False)
    ws = [u.conv.weight for u in model.layers] + [model.fc.weight]
    pv = bpath.path_values(model)["layers+fc"]
    # brute force for one non-skeleton weight of layer 2 (input k=1 -> output j=3)
    s = [w[bpath.skeleton_mask(w.shape, r, dtype=DT).bool()] for w, r in
         zip(ws, ["first", "mid", "mid", "last"])]
    want = s[0][1] * ws[1][3, 1] * s[2][3] * ws[3][3 % 10, 3]
    assert torch.allclose(pv["layers"][1][3, 1], want, atol=1e-14)
    assert torch.allclose(pv["skeleton"], s[0] * s[1] * s[2] * s[3][:6], atol=1e-14)
    # positive rescaling of hidden node 2 of layer 2 leaves every path value unchanged
    with torch.no_grad():
        ws[1][2].mul_(3.0)
        ws[2][:, 2].div_(3.0)
    pv2 = bpath.path_values(model)["layers+fc"]
    for a, b in zip(pv["layers"], pv2["layers"]):
        assert torch.allclose(a, b, atol=1e-13)
    assert torch.allclose(pv["skeleton"], pv2["skeleton"], atol=1e-13)
