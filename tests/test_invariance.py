"""find_scale_invariant: the detection tables of psi_manifold.md Sec. 8 / 10.2-10, each verdict
cross-checked against the numeric probe (per-unit positive rescaling, float64, BN eps 1e-12)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.nn.stats import BatchStats
from bnlab.optim import find_scale_invariant, invariance
from bnlab.optim.invariance import analyse_scale_invariance, probe_invariance


def verdicts(model: nn.Module, x: torch.Tensor, mode: str = "fx") -> dict[str, bool]:
    return {r.module: r.invariant for r in analyse_scale_invariance(model, x, mode=mode)}


def check_against_probe(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """The fx verdict of every layer equals the numeric probe's (the probe is the definition)."""
    fx = verdicts(model, x, "fx")
    modules = dict(model.named_modules())
    for name, ok in fx.items():
        if name in modules:
            assert probe_invariance(model, x, [name]) == ok, name
    assert verdicts(model, x, "runtime") == {k: v for k, v in fx.items() if k in modules}
    return fx


class PostBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class PreBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x)))))) + x


class TinyResNet(nn.Module):
    def __init__(self, pre: bool, c: int = 4) -> None:
        super().__init__()
        self.pre = pre
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c)
        self.block = PreBlock(c) if pre else PostBlock(c)
        self.final_bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.block(x if self.pre else F.relu(self.stem_bn(x)))
        if self.pre:
            x = F.relu(self.final_bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


X = torch.randn(4, 3, 8, 8)


def test_post_vs_pre_activation_resnet_tables():
    post = check_against_probe(TinyResNet(pre=False), X)
    assert post == {"stem": True, "block.conv1": True, "block.conv2": True, "fc": False}
    pre = check_against_probe(TinyResNet(pre=True), X)
    assert pre == {"stem": False, "block.conv1": True, "block.conv2": False, "fc": False}


class Dense(nn.Module):
    """DenseNet-style: two convs concatenated along channels with the input, then BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(9)
        self.fc = nn.Linear(9, 2)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([x, self.a(x), F.max_pool2d(self.b(x), 3, 1, 1)], dim=1)))
        return self.fc(y.mean((2, 3)))


def test_concat_along_channels_is_invariant():
    v = check_against_probe(Dense(), X)
    assert v == {"a": True, "b": True, "fc": False}
    units = {u.weight: u for u in find_scale_invariant(Dense(), X)}
    assert units["a.weight"].bias == "a.bias" and units["a.weight"].norm is None  # channels shifted


class Between(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = act
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.act(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("act,expected", [(nn.GELU(), False), (nn.SiLU(), False), (nn.Tanh(), False),
                                          (nn.ReLU(), True), (nn.LeakyReLU(0.1), True),
                                          (nn.Identity(), True)])
def test_activation_between_conv_and_bn(act, expected):
    v = check_against_probe(Between(act), X)
    assert v["conv"] is expected


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d: a fixed per-channel affine map from buffers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(c) + 0.5)
        self.register_buffer("bias", torch.randn(c))
        self.register_buffer("running_mean", torch.randn(c))
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def test_eval_and_frozen_bn_are_not_absorbers():
    m = Between(nn.ReLU())
    m.bn.eval()
    assert check_against_probe(m, X)["conv"] is False
    m.bn = nn.BatchNorm2d(4, track_running_stats=False).eval()  # batch stats even in eval
    assert check_against_probe(m, X)["conv"] is True
    m.bn = FrozenBatchNorm2d(4)
    assert check_against_probe(m, X)["conv"] is False
    m.bn = BatchStats(4, center_only=True)
    assert check_against_probe(m, X)["conv"] is False


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 5, 2, stride=2)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.up(x))).mean((2, 3)))


def test_conv_transpose_uses_dim1():
    m = Transposed()
    (unit,) = find_scale_invariant(m, X, verify=True)
    assert (unit.weight, unit.bias, unit.out_dim, unit.norm) == ("up.weight", "up.bias", 1, "bn")
    assert check_against_probe(m, X) == {"up": True, "fc": False}


class Seq(nn.Module):
    """Linear on (N, L, F): the unit dim is the last one; BN1d normalises dim 1."""

    def __init__(self, transpose: bool) -> None:
        super().__init__()
        self.transpose = transpose
        self.lin = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5 if transpose else 7)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = self.lin(x)
        y = self.bn(y.transpose(1, 2)).transpose(1, 2) if self.transpose else self.bn(y)
        return self.fc(F.relu(y).mean(1))


def test_channel_dim_is_tracked():
    x = torch.randn(4, 7, 6)
    assert check_against_probe(Seq(transpose=True), x)["lin"] is True
    assert check_against_probe(Seq(transpose=False), x)["lin"] is False


class Shared(nn.Module):
    def __init__(self, second_to_output: bool) -> None:
        super().__init__()
        self.second_to_output = second_to_output
        self.lin = nn.Linear(6, 6, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm1d(6), nn.BatchNorm1d(6)
        self.w = nn.Parameter(torch.randn(4, 6))
        self.bn3 = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn1(self.lin(x))
        z = self.lin(torch.tanh(y))  # the same module called twice
        z = z if self.second_to_output else self.bn2(z)
        return z + self.bn3(F.linear(x, self.w)).sum(1, keepdim=True)  # functional producer


def test_shared_weights_and_functional_producers():
    x = torch.randn(8, 6)
    assert check_against_probe(Shared(second_to_output=False), x) == {"lin": True, "linear": True}
    rep = {r.weight: r for r in analyse_scale_invariance(Shared(second_to_output=False), x)}
    assert rep["w"].invariant and rep["w"].out_dim == 0
    assert verdicts(Shared(second_to_output=True), x)["lin"] is False
    assert probe_invariance(Shared(second_to_output=True), x, ["lin"]) is False


class SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Linear(4, 4)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        s = torch.sigmoid(self.gate(y.mean((2, 3))))
        return self.bn(y * s[:, :, None, None]).sum((1, 2, 3))


def test_multiplication_by_a_tensor_breaks():
    v = check_against_probe(SE(), X)
    assert v == {"conv": False, "gate": False}


@pytest.mark.parametrize("name,kw,expect_fc_only", [
    ("resnet20", dict(width=0.25), True),
    ("resnet18", dict(width=0.0625, shortcut="B"), True),
    ("vgg11", dict(width=0.0625), True),
    ("plainnet18", dict(width=0.0625), True),
    ("mlp", dict(in_channels=1, input_size=4, hidden=[8, 8]), True),
])
def test_bnlab_zoo(name, kw, expect_fc_only):
    model = bnlab.models.build(name, **kw)
    x = torch.randn(4, 4 * 4) if name == "mlp" else torch.randn(4, 3, 8, 8)
    reports = analyse_scale_invariance(model, x, verify=True)
    non = [r.module for r in reports if not r.invariant]
    assert non == ["fc"]
    for r in reports:
        if r.invariant:
            assert r.norm == r.module.rsplit(".", 1)[0] + ".norm"  # ConvUnit(conv, norm)
    fx = verdicts(model, x, "fx")
    assert verdicts(model, x, "runtime") == fx


def test_verify_demotes_what_the_probe_rejects(monkeypatch):
    monkeypatch.setattr(invariance, "_HOMOGENEOUS_MODULES", invariance._HOMOGENEOUS_MODULES + (nn.GELU,))
    m = Between(nn.GELU())
    assert verdicts(m, X)["conv"] is True  # the (sabotaged) graph rule accepts it
    with pytest.warns(UserWarning, match="fails the numeric probe"):
        rep = {r.module: r.invariant for r in analyse_scale_invariance(m, X, verify=True)}
    assert rep["conv"] is False


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        scale = float(x.abs().mean())  # float() of a proxy cannot be traced
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3))) * scale


def test_runtime_fallback_when_tracing_fails():
    with pytest.warns(UserWarning, match="runtime probe"):
        rep = verdicts(Untraceable(), X, "auto")
    assert rep == {"conv": True, "fc": False}
    with pytest.raises(RuntimeError, match="mode='runtime'"):
        verdicts(Untraceable(), X, "fx")


def test_tracing_does_not_touch_the_model():
    model = bnlab.models.build("resnet20", width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_scale_invariant(model, verify=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        find_scale_invariant("resnet20")
    with pytest.raises(ValueError, match="mode"):
        find_scale_invariant(Between(nn.ReLU()), X, mode="magic")
    with pytest.raises(ValueError, match="example_input"):
        find_scale_invariant(nn.BatchNorm1d(3))


@pytest.mark.parametrize("preset", ["split_post"])
def test_cbn_models_trace_and_are_never_over_claimed(preset):
    """bnlab's CBN presets (shape arithmetic in forward) trace; the graph analysis may be conservative
    but never marks a layer the numeric probe rejects."""
    pytest.importorskip("bnlab.nn.cbn")
    model = bnlab.models.build("resnet20", norm=f"cbn:{preset}", act="sigmoid", width=0.25)
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the runtime probe
        fx = verdicts(model, x, "fx")
    runtime = verdicts(model, x, "runtime")
    assert all(runtime[k] for k, ok in fx.items() if ok)
    assert fx["fc"] is False
