"""CompleteBatchNorm (cbn.md Sec. 5.3), its model placement (Sec. 5.2) and folding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.nn.cbn import PRESETS, CBNFamily, CompleteBatchNorm
from bnlab.nn.factory import get_norm
from bnlab.nn.fold import fold_model, fold_post_norm, post_norm_affine
from bnlab.nn.norm_act import Affine
from bnlab.nn.stats import BatchStats

ACTS = ["sigmoid", "tanh", "relu", "selu", "silu"]
POST_STD = ["decoupled", "post_bn", "double"]



def _randomize(m: nn.Module) -> None:
    """Random positive scales and random shifts in every affine parameter."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("weight") and p.dim() == 1:
                p.uniform_(0.5, 2.0)
            elif n.endswith("bias") and p.dim() == 1:
                p.normal_()


# -- statistics ----------------------------------------------------------------------------
@pytest.mark.parametrize("preset", POST_STD + ["split_post", "post_center"])
@pytest.mark.parametrize("act", ["sigmoid", "relu"])
def test_post_norm_statistics_train_mode(preset, act):
    m = CompleteBatchNorm(6, act, preset)
    _randomize(m)
    if m.post_affine_weight is not None:  # post_bn: check the standardised part
        with torch.no_grad():
            m.post_affine_weight.fill_(1.0)
            m.post_affine_bias.zero_()
    y = m(torch.randn(64, 6, 4, 4) * 3 + 1)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    if preset != "split_post":  # split_post only rescales: unit variance, mean kept
        assert mean.abs().max() < 1e-3
    if preset != "post_center":  # post_center only centres
        assert (var - 1).abs().max() < 1e-3


@pytest.mark.parametrize("preset", list(PRESETS))
def test_eval_converges_to_train(preset):
    torch.manual_seed(1)
    m = CompleteBatchNorm(5, "tanh", preset)
    _randomize(m)
    x = torch.randn(64, 5, 4, 4) * 2 + 0.5
    for _ in range(200):
        y_train = m(x)
    m.eval()
    y_eval = m(x)
    assert torch.allclose(y_eval, y_train, atol=2e-2, rtol=0), (y_eval - y_train).abs().max()


def test_momentum_none_cumulative_average_matches_bn():
    m = CompleteBatchNorm(3, "relu", "decoupled", dims=1, momentum=None)
    ref = nn.BatchNorm1d(3, affine=False, momentum=None)
    for _ in range(4):
        x = torch.randn(10, 3)
        m(x)
        ref(F.relu(x))
    assert torch.allclose(m.post_norm.running_mean, ref.running_mean, atol=1e-6)
    assert torch.allclose(m.post_norm.running_var, ref.running_var, atol=1e-6)
    assert int(m.post_norm.num_batches_tracked) == int(ref.num_batches_tracked) == 4


# -- reductions to vanilla BN --------------------------------------------------------------
@pytest.mark.parametrize("dims,shape,bn", [(2, (8, 4, 5, 5), nn.BatchNorm2d), (1, (16, 4), nn.BatchNorm1d),
                                            (1, (8, 4, 6), nn.BatchNorm1d)])
@pytest.mark.parametrize("act", ["sigmoid", "relu"])
def test_vanilla_equals_batchnorm_plus_activation_over_steps(dims, shape, bn, act):
    torch.manual_seed(0)
    ref_bn = bn(4).double()
    ref_act = bnlab.nn.make_activation(act)
    m = CompleteBatchNorm(4, act, "vanilla", dims=dims).double()
    with torch.no_grad():
        ref_bn.weight.uniform_(0.5, 2)
        ref_bn.bias.normal_()
        m.pre_affine_weight.copy_(ref_bn.weight)
        m.pre_affine_bias.copy_(ref_bn.bias)
    opt_r = torch.optim.SGD(ref_bn.parameters(), lr=0.1)
    opt_m = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(4):
        x = torch.randn(*shape, dtype=torch.double) * 2 + 1
        w = torch.randn(*shape, dtype=torch.double)
        y_r, y_m = ref_act(ref_bn(x)), m(x)
        torch.testing.assert_close(y_m, y_r, rtol=1e-12, atol=1e-12)
        for opt, y in ((opt_r, y_r), (opt_m, y_m)):
            opt.zero_grad()
            (y * w).sum().backward()
        torch.testing.assert_close(m.pre_affine_weight.grad, ref_bn.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.pre_affine_bias.grad, ref_bn.bias.grad, rtol=1e-10, atol=1e-12)
        opt_r.step()
        opt_m.step()
    torch.testing.assert_close(m.pre_norm.running_mean, ref_bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.pre_norm.running_var, ref_bn.running_var, rtol=1e-12, atol=1e-12)
    assert int(m.pre_norm.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 4
    m.eval()
    ref_bn.eval()
    x = torch.randn(*shape, dtype=torch.double)
    torch.testing.assert_close(m(x), ref_act(ref_bn(x)), rtol=1e-12, atol=1e-12)


def test_input_gradient_of_vanilla_matches_batchnorm():
    x = torch.randn(6, 3, 4, 4, dtype=torch.double, requires_grad=True)
    m = CompleteBatchNorm(3, "silu", "vanilla").double()
    ref = nn.BatchNorm2d(3).double()
    (gm,) = torch.autograd.grad((m(x) ** 2).sum(), x)
    (gr,) = torch.autograd.grad((F.silu(ref(x)) ** 2).sum(), x)
    torch.testing.assert_close(gm, gr, rtol=1e-10, atol=1e-12)


def test_decoupled_equals_affine_act_then_bn_without_affine():
    m = CompleteBatchNorm(4, "sigmoid", "decoupled").double()
    _randomize(m)
    ref = nn.BatchNorm2d(4, affine=False).double()
    x = torch.randn(8, 4, 3, 3, dtype=torch.double)
    shape = (1, 4, 1, 1)
    expected = ref(torch.sigmoid(x * m.pre_affine_weight.view(shape) + m.pre_affine_bias.view(shape)))
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.post_norm.running_var, ref.running_var)


@pytest.mark.parametrize("train", [True, False])
def test_split_pre_equals_vanilla_for_relu(train):
    """F1: ReLU(gamma (h - mu)/sigma + beta) = gamma/sigma ReLU(h - mu + beta sigma / gamma)."""
    torch.manual_seed(3)
    van = CompleteBatchNorm(5, "relu", "vanilla").double()
    spl = CompleteBatchNorm(5, "relu", "split_pre").double()
    _randomize(van)
    x = torch.randn(16, 5, 3, 3, dtype=torch.double) * 3 + 2
    if not train:
        for _ in range(3):
            van(x + torch.randn_like(x))
        spl.load_state_dict(van.state_dict())  # same state-dict keys, same buffers
        van.eval()
        spl.eval()
        var = van.pre_norm.running_var
    else:
        var = torch.var(x, dim=(0, 2, 3), correction=0)
    sigma = torch.sqrt(var + 1e-5)
    with torch.no_grad():
        spl.pre_affine_weight.copy_(van.pre_affine_weight)
        spl.pre_affine_bias.copy_(van.pre_affine_bias * sigma / van.pre_affine_weight)
    torch.testing.assert_close(spl(x), van(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", ["resnet20", "mlp"])
def test_split_pre_model_equals_vanilla_model_for_relu(model):
    kw = dict(act="relu", width=0.25, num_classes=3, input_size=8)
    torch.manual_seed(0)
    a = bnlab.models.build(model, norm="cbn:vanilla", **kw)
    torch.manual_seed(0)
    b = bnlab.models.build(model, norm="cbn:split_pre", **kw)
    b.load_state_dict(a.state_dict())  # beta = 0 at init: no reparametrisation needed
    x = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


def test_post_center_is_a_noop_before_a_bn_linear_layer():
    """F2: centring the input of a layer followed by BN changes nothing (outputs and gradients)."""
    torch.manual_seed(0)

    def net(preset: str) -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(7, 6, bias=False), CompleteBatchNorm(6, "sigmoid", preset, dims=1),
                             nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)).double()

    a, b = net("vanilla"), net("post_center")
    x = torch.randn(32, 7, dtype=torch.double)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ya)
    ga = torch.autograd.grad((ya * w).sum(), list(a.parameters()))
    gb = torch.autograd.grad((yb * w).sum(), list(b.parameters()))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(a[1](x[:, :6]), b[1](x[:, :6]))  # the layer itself does act


@pytest.mark.parametrize("preset", list(PRESETS))
def test_gradcheck_float64(preset):
    m = CompleteBatchNorm(2, "tanh", preset).double()
    _randomize(m)
    x = torch.randn(3, 2, 2, 2, dtype=torch.double, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    ps = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-5)


# -- bad input -----------------------------------------------------------------------------
def test_errors_are_clear():
    with pytest.raises(ValueError, match="preset"):
        CompleteBatchNorm(3, "relu", "nope")
    with pytest.raises(ValueError, match="activation"):
        CompleteBatchNorm(3, "softplusx")
    with pytest.raises(TypeError, match="unexpected keyword"):
        CompleteBatchNorm(3, "relu", post_scale=True)
    with pytest.raises(ValueError, match="normalises nothing"):
        CompleteBatchNorm(3, "relu", "decoupled", post_norm="none")
    with pytest.raises(ValueError, match="scale_pre"):
        CompleteBatchNorm(3, "relu", "decoupled", post_norm="scale_pre")
    with pytest.raises(ValueError, match="post_affine"):
        CompleteBatchNorm(3, "relu", "vanilla", post_affine=True)
    with pytest.raises(ValueError, match="pre_norm"):
        CompleteBatchNorm(3, "relu", "vanilla", pre_norm="whiten")
    with pytest.raises(TypeError, match="pre_affine"):
        CompleteBatchNorm(3, "relu", "vanilla", pre_affine="yes")
    with pytest.raises(ValueError, match="num_features"):
        CompleteBatchNorm(0, "relu")
    with pytest.raises(ValueError, match="dims"):
        CompleteBatchNorm(3, "relu", dims=4)
    m = CompleteBatchNorm(3, "relu")
    with pytest.raises(ValueError, match=r"4D input"):
        m(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(N, 3"):
        m(torch.randn(4, 5, 2, 2))
    for preset in PRESETS:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            CompleteBatchNorm(3, "relu", preset, dims=1)(torch.randn(1, 3))
        mm = CompleteBatchNorm(3, "relu", preset, dims=1).eval()
        assert mm(torch.randn(1, 3)).shape == (1, 3)  # eval is fine, like nn.BatchNorm1d


def test_state_dict_names_and_activation_module():
    keys = set(CompleteBatchNorm(3, nn.SiLU(), "post_bn").state_dict())
    assert keys == {"post_norm.running_mean", "post_norm.running_var", "post_norm.num_batches_tracked",
                    "post_affine_weight", "post_affine_bias"}
    keys = set(CompleteBatchNorm(3, "relu", "double").state_dict())
    assert {"pre_norm.running_mean", "pre_affine_weight", "pre_affine_bias", "post_norm.running_var"} <= keys
    assert isinstance(CompleteBatchNorm(3, nn.SiLU()).act, nn.SiLU)
    inner = [m for m in CompleteBatchNorm(3, "relu", "double", sync_stats=True).modules()
             if isinstance(m, BatchStats)]
    assert len(inner) == 2 and all(m.sync_stats and not m.affine for m in inner)


# -- dtype, layout, compile ----------------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESETS))
def test_bf16_autocast_keeps_fp32_statistics(preset):
    m = CompleteBatchNorm(4, "sigmoid", preset)
    m32 = copy.deepcopy(m)
    x = torch.randn(16, 4, 3, 3) * 2 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    y32 = m32(x.bfloat16().float())
    assert y.dtype == torch.bfloat16
    for b in m.buffers():
        assert b.dtype in (torch.float32, torch.int64)
    for b, b32 in zip(m.buffers(), m32.buffers()):
        torch.testing.assert_close(b.float(), b32.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_channels_last_preserved(preset):
    m = CompleteBatchNorm(4, "selu", preset)
    x = torch.randn(8, 4, 5, 5)
    y_ref = copy.deepcopy(m)(x)
    y = m(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_torch_compile():
    m = CompleteBatchNorm(4, "tanh", "split_post")
    ref = copy.deepcopy(m)
    cm = torch.compile(m, backend="aot_eager", fullgraph=False)
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(cm(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.post_norm.running_var, ref.post_norm.running_var)


# -- models (Sec. 5.2) ---------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("act", ACTS)
def test_resnet_every_preset_and_activation(preset, act):
    net = bnlab.models.build("resnet20", norm=f"cbn:{preset}", act=act, width=0.25, num_classes=3)
    x = torch.randn(4, 3, 8, 8)
    out = net(x)
    out.sum().backward()
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("model", ["vgg11", "mlp", "resnet50", "resnet18"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_other_models_every_preset(model, preset):
    net = bnlab.models.build(model, norm=f"cbn:{preset}", act="sigmoid", width=0.0625, num_classes=3,
                             input_size=8)
    out = net(torch.randn(3, 3, 8, 8))
    out.sum().backward()
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    assert all((c.bias is not None) == (preset == "post_bn") for c in convs)


def test_decoupled_resnet_placement():
    net = bnlab.models.build("resnet20", norm="cbn", act="sigmoid", width=0.5, shortcut="B")
    block = net.stages[1][0]
    assert isinstance(block.unit1.norm, CompleteBatchNorm) and block.unit1.norm.preset == "decoupled"
    assert isinstance(block.unit2.norm, Affine) and isinstance(block.shortcut.norm, Affine)
    assert block.post.pre_affine_weight is None and block.post.post_mode == "standardize"
    out = block(torch.randn(16, 8, 8, 8))  # the block output is standardised per channel (Sec. 5.2)
    var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
    assert mean.abs().max() < 1e-4 and (var - 1).abs().max() < 1e-3
    double = bnlab.models.build("resnet20", norm="cbn:double", act="tanh", width=0.5).stages[0][0]
    assert isinstance(double.unit2.norm, BatchStats) and double.unit2.norm.affine
    assert isinstance(double.post, CompleteBatchNorm) and double.post.post_mode == "standardize"


def test_family_errors_and_options():
    with pytest.raises(ValueError, match="unknown preset"):
        get_norm("cbn:nope", "relu")
    with pytest.raises(ValueError, match="unknown option"):
        get_norm("cbn", "relu", foo=1)
    with pytest.raises(ValueError, match="activation"):
        get_norm("cbn", "nope")
    with pytest.raises(ValueError, match="normalises nothing"):
        get_norm("cbn:decoupled", "relu", post_norm="none")
    fam = get_norm("cbn:post_bn", "tanh", momentum=0.3, eps=1e-3)
    assert isinstance(fam, CBNFamily) and fam.conv_bias and fam.preset == "post_bn"
    unit = fam(8)  # callable with one positional num_features (norm_layer= style)
    assert isinstance(unit, CompleteBatchNorm)
    assert unit.post_norm.momentum == 0.3 and unit.post_norm.eps == 1e-3
    assert get_norm("cbn", "relu").preset == "decoupled"


# -- folding (Sec. 5.1, deployment) --------------------------------------------------------
def _trained(preset: str, c: int, dims: int, shape) -> CompleteBatchNorm:
    m = CompleteBatchNorm(c, "sigmoid", preset, dims=dims).double()
    _randomize(m)
    for _ in range(5):
        m(torch.randn(*shape, dtype=torch.double) * 2 + 1)
    return m.eval()


@pytest.mark.parametrize("preset", ["decoupled", "post_bn", "double", "split_post", "post_center"])
def test_fold_into_conv_padding0_and_linear_is_exact(preset):
    m = _trained(preset, 4, 2, (16, 4, 5, 5))
    conv = nn.Conv2d(4, 6, 3, padding=0, bias=False).double()
    x = torch.randn(3, 4, 7, 7, dtype=torch.double)
    ref = conv(m(x))
    m2, conv2 = fold_post_norm(m, conv)
    torch.testing.assert_close(conv2(m2(x)), ref, rtol=1e-10, atol=1e-10)
    assert m2.post_norm is None and m2.post_affine_weight is None
    ml = _trained(preset, 4, 1, (16, 4))
    lin = nn.Linear(4, 3).double()
    xl = torch.randn(5, 4, dtype=torch.double)
    ml2, lin2 = fold_post_norm(ml, lin)
    torch.testing.assert_close(lin2(ml2(xl)), lin(ml(xl)), rtol=1e-10, atol=1e-10)


def test_fold_with_padding_differs_only_at_the_border_and_needs_opt_in():
    m = _trained("decoupled", 4, 2, (16, 4, 5, 5))
    conv = nn.Conv2d(4, 2, 3, padding=1).double()
    with pytest.raises(ValueError, match="padding"):
        fold_post_norm(m, conv)
    m2, conv2 = fold_post_norm(m, conv, allow_padding=True)
    x = torch.randn(2, 4, 6, 6, dtype=torch.double)
    diff = (conv2(m2(x)) - conv(m(x))).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-10 and diff.max() > 1e-6
    scale, shift = post_norm_affine(m)
    assert scale.shape == shift.shape == (4,)
    with pytest.raises(ValueError, match="eval"):
        fold_post_norm(m.train(), conv)


def test_fold_model_mlp():
    torch.manual_seed(0)
    net = bnlab.models.build("mlp", norm="cbn:double", act="tanh", hidden=[12, 10], num_classes=3,
                             input_size=4).double()
    for _ in range(3):
        net(torch.randn(32, 3, 4, 4, dtype=torch.double))
    net.eval()
    x = torch.randn(6, 3, 4, 4, dtype=torch.double)
    folded = fold_model(net)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-10, atol=1e-10)
    assert all(layer.norm.post_norm is None for layer in folded.layers)
    assert net.layers[0].norm.post_norm is not None  # the original is untouched


# -- fused forward/backward (speed work) against the plain autograd formulation --------------
def _reference_forward(m: CompleteBatchNorm, h: torch.Tensor) -> torch.Tensor:
    """cbn.md Sec. 5.1 written with plain ops and autograd (the pre-fusion implementation)."""
    shape = [1, -1] + [1] * (h.dim() - 2)

    def aff(x, w, b):
        x = x if w is None else x * w.view(shape)
        return x if b is None else x + b.view(shape)

    def moments(stats, x):
        if stats.training or not stats.track_running_stats:
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            if stats.training and stats.track_running_stats:
                stats.num_batches_tracked.add_(1)
                mom = stats.momentum if stats.momentum is not None else 1 / float(stats.num_batches_tracked)
                n = x.numel() // x.shape[1]
                with torch.no_grad():
                    stats.running_mean.lerp_(mean, mom)
                    stats.running_var.lerp_(var * n / (n - 1), mom)
            return mean, var
        return stats.running_mean, stats.running_var

    def norm(stats, x, center, scale):
        mean, var = moments(stats, x)
        y = x - mean.view(shape) if center else x
        return y * torch.rsqrt(var + stats.eps).view(shape) if scale else y

    if m.post_mode == "scale_pre":
        mean, var = moments(m.pre_norm, h)
        t = m.act(aff(h - mean.view(shape), None, m.pre_affine_bias))
        return aff(t * torch.rsqrt(var + m.pre_norm.eps).view(shape), m.pre_affine_weight, None)
    x = h if m.pre_norm is None else norm(m.pre_norm, h, True, m.pre_mode == "standardize")
    x = m.act(aff(x, m.pre_affine_weight, m.pre_affine_bias))
    if m.post_norm is not None:
        x = norm(m.post_norm, x, m.post_mode != "scale_post", m.post_mode != "center")
    return aff(x, m.post_affine_weight, m.post_affine_bias)


CASES = [(p, {}) for p in PRESETS] + [
    ("split_post", {"post_affine": True}), ("split_pre", {"pre_affine": False}),
    ("post_center", {"post_affine": True}), ("split_post", {"pre_affine": False}),
    ("decoupled", {"pre_affine": False}),
]


@pytest.mark.parametrize("preset, overrides", CASES)
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("bn_kw", [{}, {"momentum": None}, {"track_running_stats": False}])
def test_forward_backward_buffers_equal_reference(preset, overrides, act, bn_kw):
    torch.manual_seed(0)
    m = CompleteBatchNorm(4, act, preset, **bn_kw, **overrides).double()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1.5, 1.5)  # signs of gamma included
    ref = copy.deepcopy(m)
    for step, training in enumerate((True, True, False)):
        m.train(training)
        ref.train(training)
        x = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 0.3 * step).requires_grad_(True)
        y, yr = m(x), _reference_forward(ref, x)
        torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(y)
        ga = torch.autograd.grad(y, [x, *m.parameters()], g)
        gb = torch.autograd.grad(yr, [x, *ref.parameters()], g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("preset, overrides", [("split_pre", {}), ("split_post", {"post_affine": True}),
                                               ("post_center", {"post_affine": True})])
def test_fused_functions_gradcheck_and_double_backward(preset, overrides):
    """First derivatives of the closed-form backward, and second derivatives (Hessian-vector
    products, create_graph=True), checked against finite differences in float64 with ReLU."""
    m = CompleteBatchNorm(2, "relu", preset, track_running_stats=False, **overrides).double()
    _randomize(m)
    x = torch.randn(4, 2, 2, 2, dtype=torch.double, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    ps = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x, *ps), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 3), (16, 3, 7), (8, 3, 5, 5), (4, 3, 2, 3, 3)])
@pytest.mark.parametrize("mean_over_std", [0.0, 5.0, 25.0, 1e3])
def test_fast_moments_match_var_mean(shape, mean_over_std):
    """The fast CPU moments equal var_mean; ill-conditioned channels (mean^2 > 1e3 var) take
    var_mean itself, so float32 stays within 1e-4 relative at every |mean| / std."""
    from bnlab.nn.cbn import _moments

    torch.manual_seed(2)
    view = (1, 3, *[1] * (len(shape) - 2))
    x = torch.randn(shape, dtype=torch.float64) * torch.tensor([1e-2, 1.0, 30.0]).view(view)
    x = x + (torch.tensor([1e-2, -1.0, 30.0]) * mean_over_std).view(view)
    dims = [0, *range(2, len(shape))]
    v_ref, m_ref = torch.var_mean(x, dim=dims, correction=0)
    v, m = _moments(x)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(m, m_ref, rtol=1e-13, atol=1e-15)
    xf = x.float()
    v32, m32 = _moments(xf)
    v_ref32 = torch.var_mean(xf.double(), dim=dims, correction=0)[0]
    torch.testing.assert_close(v32.double(), v_ref32, rtol=1e-4, atol=0)


# -- proposal for BatchStats (bnlab.benchmarks.proposals.fast_standardize) -----------------------
@pytest.mark.parametrize("shape, bn", [((8, 3, 4, 4), nn.BatchNorm2d), ((16, 3), nn.BatchNorm1d),
                                       ((6, 3, 5), nn.BatchNorm1d)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_proposed_fast_standardize_equals_batchnorm(shape, bn, momentum):
    import types

    from bnlab.benchmarks.proposals import fast_standardize

    torch.manual_seed(3)
    ref = bn(3, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.uniform_(-2, 2)
        ref.bias.normal_()
    m = BatchStats(3, momentum=momentum).double()
    m.load_state_dict(ref.state_dict())
    m.forward = types.MethodType(fast_standardize, m)
    for step, training in enumerate((True, True, False)):
        m.train(training)
        ref.train(training)
        x = (torch.randn(shape, dtype=torch.float64) * 3 + step).requires_grad_(True)
        y, yr = m(x), ref(x)
        torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, [x, m.weight, m.bias], g),
                        torch.autograd.grad(yr, [x, ref.weight, ref.bias], g)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("preset", ["double", "decoupled", "vanilla"])
def test_proposed_fast_standardize_double_backward_and_cbn(preset):
    from bnlab.benchmarks.proposals import proposed_cbn

    torch.manual_seed(4)
    ref = CompleteBatchNorm(2, "tanh", preset, track_running_stats=False).double()
    _randomize(ref)
    m = proposed_cbn(2, "tanh", preset=preset, track_running_stats=False, fast_bn=True).double()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 2, 2, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-10, atol=1e-12)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    ps = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x, *ps), eps=1e-6, atol=1e-4)
