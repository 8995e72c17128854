"""The fused closed-form CBN path with ReLU (``bnlab.nn.cbn._FusedReLU``) against the plain
``BatchStats``/autograd path (``CompleteBatchNorm.fused = False``) and finite differences."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from bnlab.nn.cbn import PRESETS, CompleteBatchNorm, _FusedReLU

FUSED_PRESETS = [p for p in PRESETS if p != "split_pre"]  # split_pre has its own _SplitPreReLU
CASES = [(p, {}) for p in FUSED_PRESETS] + [
    ("split_post", {"post_affine": True}), ("split_post", {"pre_affine": False}),
    ("post_center", {"post_affine": True}), ("decoupled", {"pre_affine": False}),
    ("double", {"pre_affine": False}), ("post_bn", {"post_affine": False}),
]


def _randomize(m: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-1.5, 1.5)  # negative gammas included


def _plain(m: CompleteBatchNorm) -> CompleteBatchNorm:
    ref = copy.deepcopy(m)
    ref.fused = False
    return ref


def _grad_fn_name(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


@pytest.mark.parametrize("preset, overrides", CASES)
@pytest.mark.parametrize("bn_kw", [{}, {"momentum": None}, {"track_running_stats": False}])
def test_fused_equals_plain_path_float64(preset, overrides, bn_kw):
    """Values, input/parameter gradients and every buffer over train, train, eval steps."""
    torch.manual_seed(0)
    m = CompleteBatchNorm(5, "relu", preset, **bn_kw, **overrides).double()
    _randomize(m)
    ref = _plain(m)
    for step, training in enumerate((True, True, False)):
        m.train(training)
        ref.train(training)
        x = (torch.randn(6, 5, 3, 4, dtype=torch.float64) * 2 + 0.3 * step).requires_grad_(True)
        y, yr = m(x), ref(x)
        uses_batch = training or not bn_kw.get("track_running_stats", True)
        assert (_grad_fn_name(y) == "_FusedReLUBackward") == uses_batch, _grad_fn_name(y)
        assert _grad_fn_name(yr) != "_FusedReLUBackward"
        torch.testing.assert_close(y, yr, rtol=1e-11, atol=1e-12)
        g = torch.randn_like(y)
        ga = torch.autograd.grad(y, [x, *m.parameters()], g)
        gb = torch.autograd.grad(yr, [x, *ref.parameters()], g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("pre, post", [(a, b) for a, b in itertools.product(
    ("none", "standardize", "center"), ("none", "standardize", "center", "scale_post")) if (a, b) != ("none", "none")])
@pytest.mark.parametrize("affine", [(True, True), (False, True), (True, False), (False, False)])
def test_fused_function_every_norm_combination(pre, post, affine):
    """_FusedReLU against its plain-autograd ``_ref`` for all 11 (pre, post) pairs, with and
    without each affine; gradients for every input, float64."""
    torch.manual_seed(1)
    c = 3
    h = (torch.randn(5, c, 2, 3, dtype=torch.double) * 1.5 + 0.4).requires_grad_(True)
    ws = [torch.empty(c, dtype=torch.double).uniform_(-1.5, 1.5).requires_grad_(True) if on else None
          for on in (affine[0], affine[0], affine[1], affine[1])]
    args = (*ws, pre, post, 1e-5, 1e-3)
    y, st = _FusedReLU.apply(h, *args)
    yr = _FusedReLU._ref(h, *args)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    live = [h, *[w for w in ws if w is not None]]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, live, g), torch.autograd.grad(yr, live, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    dims = (0, 2, 3)
    if pre != "none":
        v, mu = torch.var_mean(h.detach(), dims, correction=0)
        torch.testing.assert_close(st[0], mu)
        torch.testing.assert_close(st[1], v)
    else:
        assert not st[:2].any()
    assert not st.requires_grad


@pytest.mark.parametrize("preset, overrides", [("double", {}), ("post_center", {"post_affine": True}),
                                               ("split_post", {"post_affine": True}), ("decoupled", {}),
                                               ("vanilla", {}), ("post_bn", {})])
def test_fused_gradcheck_and_gradgradcheck(preset, overrides):
    """First derivatives (closed form) and second derivatives (create_graph: plain autograd) against
    finite differences, float64, tiny shapes."""
    torch.manual_seed(2)
    m = CompleteBatchNorm(2, "relu", preset, track_running_stats=False, **overrides).double()
    _randomize(m)
    x = torch.randn(4, 2, 2, 2, dtype=torch.double, requires_grad=True)
    assert _grad_fn_name(m(x)) == "_FusedReLUBackward"
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    ps = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(f, (x, *ps), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("preset", FUSED_PRESETS)
def test_fused_channels_last(preset):
    torch.manual_seed(3)
    m = CompleteBatchNorm(4, "relu", preset)
    _randomize(m)
    ref = _plain(m)
    x = torch.randn(8, 4, 5, 5)
    xc = x.to(memory_format=torch.channels_last).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    y, yr = m(xc), ref(xr)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yr)
    ga = torch.autograd.grad(y, [xc, *m.parameters()], g.to(memory_format=torch.channels_last))
    gb = torch.autograd.grad(yr, [xr, *ref.parameters()], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("preset", FUSED_PRESETS)
def test_fused_partial_requires_grad_and_input_untouched(preset):
    """Frozen parameters / an input without grad (first layer), and the input is never modified."""
    torch.manual_seed(4)
    m = CompleteBatchNorm(3, "relu", preset).double()
    _randomize(m)
    ref = _plain(m)
    x = torch.randn(4, 3, 3, 3, dtype=torch.double)
    x0 = x.clone()
    params = list(m.parameters())
    if params:
        params[0].requires_grad_(False)
        list(ref.parameters())[0].requires_grad_(False)
    live = [p for p in m.parameters() if p.requires_grad]
    live_r = [p for p in ref.parameters() if p.requires_grad]
    y, yr = m(x), ref(x)
    assert torch.equal(x, x0)
    if live:
        g = torch.randn_like(y)
        for a, b in zip(torch.autograd.grad(y, live, g), torch.autograd.grad(yr, live_r, g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    for p in m.parameters():
        p.requires_grad_(False)
    y = m(xg)
    assert torch.equal(xg.detach(), x0)
    dx = torch.autograd.grad(y, xg, torch.ones_like(y))[0]
    xr = x.clone().requires_grad_(True)
    for p in ref.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(dx, torch.autograd.grad(ref(xr), xr, torch.ones_like(y))[0], rtol=1e-10, atol=1e-12)


def test_fused_float32_close_to_float64():
    """Every closed-form path (``_FusedReLU``, and split_pre's ``_SplitPreReLU``) in float32 vs float64."""
    torch.manual_seed(5)
    for preset in PRESETS:
        m = CompleteBatchNorm(8, "relu", preset)
        _randomize(m)
        md = copy.deepcopy(m).double()
        x = torch.randn(16, 8, 5, 5, requires_grad=True)
        xd = x.detach().double().requires_grad_(True)
        y, yd = m(x), md(xd)
        torch.testing.assert_close(y.double(), yd, rtol=1e-4, atol=1e-5)
        g = torch.randn_like(y)
        a = torch.autograd.grad(y, x, g)[0]
        b = torch.autograd.grad(yd, xd, g.double())[0]
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


def test_fused_torch_compile_takes_plain_path():
    m = CompleteBatchNorm(4, "relu", "double")
    ref = copy.deepcopy(m)
    cm = torch.compile(m, backend="aot_eager", fullgraph=False)
    x = torch.randn(8, 4, 3, 3)
    torch.testing.assert_close(cm(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.post_norm.running_var, ref.post_norm.running_var)
    torch.testing.assert_close(m.pre_norm.running_mean, ref.pre_norm.running_mean)


def test_fused_off_for_other_activations_and_half_dtypes():
    m = CompleteBatchNorm(4, "tanh", "double")
    assert _grad_fn_name(m(torch.randn(4, 4, 2, 2, requires_grad=True))) != "_FusedReLUBackward"
    m = CompleteBatchNorm(4, "relu", "double")
    assert m._fused_ok(torch.randn(4, 4, 2, 2))
    assert not m._fused_ok(torch.randn(4, 4, 2, 2, dtype=torch.bfloat16))
    assert not m._fused_ok(torch.randn(4, 4, 2, 2, dtype=torch.float64))  # parameters are float32
    m.fused = False
    assert not m._fused_ok(torch.randn(4, 4, 2, 2))


@pytest.mark.parametrize("dims, shape", [(1, (7, 3)), (1, (5, 3, 4)), (3, (3, 3, 2, 2, 3))])
@pytest.mark.parametrize("preset", ["double", "split_post", "post_center"])
def test_fused_other_ranks_equal_plain_path(dims, shape, preset):
    torch.manual_seed(6)
    m = CompleteBatchNorm(3, "relu", preset, dims=dims, post_affine=True).double()
    _randomize(m)
    ref = _plain(m)
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    y, yr = m(x), ref(x)
    assert _grad_fn_name(y) == "_FusedReLUBackward"
    torch.testing.assert_close(y, yr, rtol=1e-11, atol=1e-12)
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, [x, *m.parameters()], g)
    for a, b in zip(ga, torch.autograd.grad(yr, [x, *ref.parameters()], g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)


def test_cbn_preset_benchmark_rows_use_the_fused_path():
    """The issue-7 benchmark (bench/bench_norms.py --cbn) times the fused path (smoke run, tiny)."""
    from bnlab.benchmarks.norms import cbn_presets
    from bnlab.benchmarks.timing import Settings

    rows = list(cbn_presets(1, Settings(warmup=1, reps=1, min_sample_s=0.0), shapes=[(4, 4, 3, 3)],
                            presets=["double", "split_pre"]))
    assert [r.name for r in rows] == ["norm/cbn:double", "norm/cbn:split_pre"]
    assert [r.extra["grad_fn"] for r in rows] == ["_FusedReLUBackward", "_SplitPreReLUBackward"]
    assert all(r.ours_ms > 0 and r.baseline_ms > 0 for r in rows)
