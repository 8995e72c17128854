"""Speed fixes proposed for modules this package does not own, kept here so they can be timed and
tested for equality with the current code.

* CBN: the forward once proposed here is now ``CompleteBatchNorm.forward`` (``bnlab/nn/cbn.py``).
  ``fast_cbn_forward`` / ``proposed_cbn(..., fast_bn=False)`` remain as aliases because
  ``benchmarks/train_step.py`` and ``tests/test_bench.py`` still import them.
* ``BatchStats`` (``bnlab/nn/stats.py``): :func:`fast_standardize`, a drop-in for
  ``BatchStats.standardize`` on CPU with batch statistics. PyTorch's CPU BN kernel computes its
  batch moments slowly for NCHW (a strided reduction; ~15 ms of a ~20 ms BN+ReLU call at
  128x256x8x8 in a micro-benchmark here). This computes them with ``bnlab.nn.cbn._moments`` (a
  plain sum plus one pass of the BN backward kernel, var_mean fallback for ill-conditioned
  channels), normalises with the inference-mode kernel (one pass, running stats = the batch
  moments) and backpropagates with PyTorch's own training-mode BN backward kernel, so the
  gradient formula is PyTorch's. Running buffers follow the BN rule. CompleteBatchNorm with ReLU
  no longer standardises through ``BatchStats`` in training (``bnlab.nn.cbn._FusedReLU`` computes its
  own moments), so this now matters for ``BatchNormAct``, CBN with other activations and the
  reference path only (not needed for issue 7's CBN targets, see docs/results/speed_cbn.md).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.cbn import CompleteBatchNorm, _grads_by_autograd, _moments, update_running_stats
from ..nn.stats import BatchStats, check_batch_size, world_size

__all__ = ["fast_cbn_forward", "fast_standardize", "proposed_cbn"]

#: Alias of :meth:`CompleteBatchNorm.forward` (integrated).
fast_cbn_forward = CompleteBatchNorm.forward


class _FastBN(torch.autograd.Function):
    """``y = (x - mu_B) / sqrt(var_B + eps) * w + b`` (Ioffe & Szegedy 2015, Alg. 1), x (N, C, *)."""

    @staticmethod
    def _ref(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
        return F.batch_norm(x, None, None, w, b, True, 0.0, eps)

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float):
        var, mean = _moments(x)
        y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        ctx.save_for_backward(x, w, b, mean, torch.rsqrt(var + eps))
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _m, _v):
        x, w, b, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: plain autograd reference
            return _grads_by_autograd(ctx, _FastBN._ref, dy, (x, w, b, ctx.eps)) + (None,)
        mask = [ctx.needs_input_grad[0], w is not None and ctx.needs_input_grad[1],
                b is not None and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean, invstd, True, ctx.eps, mask)
        return dx, dw, db, None


def fast_standardize(self: BatchStats, x: Tensor, weight: Tensor | None = None,
                     bias: Tensor | None = None) -> Tensor:
    """``BatchStats.standardize`` with fast CPU batch moments (see module doc); any other case
    (eval with running stats, CUDA, half dtypes, centring only, synchronised) is delegated."""
    use_batch = self.training or not self.track_running_stats
    if (not use_batch or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
            or self.center_only or (self.sync_stats and world_size(self.process_group) > 1)):
        return BatchStats.standardize(self, x, weight, bias)
    self._check_input_dim(x)
    if self.training:
        check_batch_size(x)
    w = self.weight if weight is None else weight
    b = self.bias if bias is None else bias
    y, mean, var = _FastBN.apply(x, w, b, self.eps)
    if self.training and self.track_running_stats:
        self.num_batches_tracked.add_(1)
        update_running_stats(self, mean, var, x.numel() // x.shape[1])
    return y


def proposed_cbn(*args, fast_bn: bool = False, **kwargs) -> nn.Module:
    """A ``CompleteBatchNorm``; with ``fast_bn`` its BatchStats use :func:`fast_standardize`."""
    m = CompleteBatchNorm(*args, **kwargs)
    if fast_bn:
        for s in (m.pre_norm, m.post_norm):
            if s is not None:
                s.standardize = types.MethodType(fast_standardize, s)
    return m


def proposed_bn_relu(c: int) -> nn.Module:
    """``BatchStats(C) + ReLU`` through :func:`fast_standardize` (vs ``BatchNorm2d + ReLU``)."""
    bs = BatchStats(c, dims=2)
    bs.forward = types.MethodType(fast_standardize, bs)
    return nn.Sequential(bs, nn.ReLU(inplace=True))
