"""BatchNormAct / BatchStats against torch.nn.BatchNorm* + activation: forward, grads, buffers."""

import pytest
import torch
from torch import nn

from bnlab.nn import BatchNormAct, BatchNormAct1d, BatchNormAct2d, BatchStats
from bnlab.nn.stats import batch_moments


def _pair(cls_ours, cls_ref, c, act, dims, **kw):
    ours = cls_ours(c, act, dims=dims, **kw).double()
    ref = cls_ref(c, **kw).double()
    with torch.no_grad():
        if ours.affine:
            w = torch.rand(c, dtype=torch.float64) + 0.5
            b = torch.randn(c, dtype=torch.float64)
            ours.weight.copy_(w), ref.weight.copy_(w)
            ours.bias.copy_(b), ref.bias.copy_(b)
    return ours, ref


ACTS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "selu": torch.selu,
        "silu": nn.functional.silu, "gelu": nn.functional.gelu}


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
@pytest.mark.parametrize("dims,shape", [(2, (6, 3, 5, 4)), (1, (8, 5)), (1, (7, 4, 6))])
def test_matches_torch_batchnorm_over_steps(act, momentum, dims, shape):
    c = shape[1]
    cls_ref = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    ours, ref = _pair(BatchNormAct, cls_ref, c, act, dims, momentum=momentum)
    for step in range(4):
        x = torch.randn(*shape, dtype=torch.float64) * (step + 1) + step
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        y1 = ours(x1)
        y2 = ACTS[act](ref(x2))
        torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-14)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ours.eval(), ref.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ACTS[act](ref(x)), rtol=1e-12, atol=1e-12)


def test_state_dict_keys_and_round_trip_with_torch():
    ours = BatchNormAct2d(4, "relu")
    ref = nn.BatchNorm2d(4)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours(torch.randn(5, 4, 3, 3))
    ref.load_state_dict(ours.state_dict())
    fresh = BatchNormAct2d(4, "relu")
    fresh.load_state_dict(ref.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_flags_match_torch(affine, track):
    ours = BatchNormAct2d(3, None, affine=affine, track_running_stats=track).double()
    ref = nn.BatchNorm2d(3, affine=affine, track_running_stats=track).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_center_only_and_explicit_path_match_definition():
    m = BatchStats(3, center_only=True, affine=False).double()
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64) * 3 + 1
    y = m(x)
    torch.testing.assert_close(y, x - x.mean((0, 2, 3), keepdim=True))
    unbiased = x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * unbiased)
    torch.testing.assert_close(m.running_mean, 0.1 * x.mean((0, 2, 3)))


def test_explicit_and_native_paths_agree():
    """The hand-written path (used for sync and centring) equals the fused kernel."""
    a = BatchStats(5).double()
    b = BatchStats(5).double()
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    ya = a.standardize(x)
    with torch.no_grad():
        b.num_batches_tracked.add_(1)
    yb = b._explicit(x, use_batch=True, sync=False)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(a.running_var, b.running_var)
    ga, = torch.autograd.grad(ya.square().sum(), x)
    gb, = torch.autograd.grad(yb.square().sum(), x)
    torch.testing.assert_close(ga, gb)


def test_batch_moments_fp32_under_half_input():
    x = (torch.randn(64, 3, 4, 4) * 100 + 1000).bfloat16()
    mean, var, count = batch_moments(x)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32 and count == 64 * 16
    ref_var, ref_mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_bf16_forward_returns_bf16_and_is_close():
    m = BatchNormAct2d(4, "relu")
    x = torch.randn(8, 4, 5, 5)
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = BatchNormAct2d(4, "relu")
    torch.testing.assert_close(y.float(), ref(x.bfloat16().float()), atol=2e-2, rtol=2e-2)


def test_channels_last_preserved():
    m = BatchNormAct2d(4, "relu")
    x = torch.randn(8, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert m(x).is_contiguous(memory_format=torch.channels_last)


def test_errors_like_torch():
    m = BatchNormAct2d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 channels"):
        m(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="num_features"):
        BatchNormAct1d(0)
    with pytest.raises(ValueError, match="momentum"):
        BatchNormAct1d(3, momentum=2.0)
    m.eval()
    assert m(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)  # one sample is fine in eval


def test_torch_compile_matches_eager():
    m = BatchNormAct2d(4, "silu")
    x = torch.randn(8, 4, 5, 5)
    ref = BatchNormAct2d(4, "silu")
    ref.load_state_dict(m.state_dict())
    compiled = torch.compile(m, backend="eager")
    torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(m.running_mean, ref.running_mean)
