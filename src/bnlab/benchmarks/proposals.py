"""Speed fixes proposed for modules this package does not own, kept here so they can be timed
(``norm/cbn:<preset> [proposed]`` rows) and tested for equality with the current code.

:func:`fast_cbn_forward` is a drop-in replacement of ``CompleteBatchNorm.forward``
(``bnlab/nn/cbn.py``, same equations, cbn.md Sec. 5.1): the pre/post affines go *inside* the BN
kernel (``BatchStats.standardize(x, weight, bias)``) or through the fused
:func:`bnlab.nn.stats.channel_affine`, and a ReLU on a fresh tensor is applied in place.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.stats import channel_affine, stats_dtype

__all__ = ["fast_cbn_forward", "proposed_cbn"]


def fast_cbn_forward(self, h: Tensor) -> Tensor:
    """``post_affine(post_norm(phi(pre_affine(pre_norm(h)))))`` with fused affines (see module doc)."""
    self._check_input(h)
    relu = type(self.act) is nn.ReLU
    if self.post_mode == "scale_pre":  # split_pre: gamma / sigma_B(h) * phi(h - mu_B(h) + beta)
        stats = self.pre_norm
        mean, var = self._scale_moments(stats, h)
        acc = stats_dtype(h.dtype)
        shift = -mean if self.pre_affine_bias is None else self.pre_affine_bias.to(acc) - mean
        t = channel_affine(h.to(acc), None, shift)
        t = torch.relu_(t) if relu else self.act(t)
        scale = torch.rsqrt(var + stats.eps)
        if self.pre_affine_weight is not None:
            scale = scale * self.pre_affine_weight.to(acc)
        return channel_affine(t, scale, None).to(h.dtype)
    if self.pre_norm is not None:
        x = self.pre_norm.standardize(h, self.pre_affine_weight, self.pre_affine_bias)
    else:
        x = channel_affine(h, self.pre_affine_weight, self.pre_affine_bias)
    x = torch.relu_(x) if (relu and x is not h) else self.act(x)
    if self.post_mode == "scale_post":
        _, var = self._scale_moments(self.post_norm, x)
        acc = stats_dtype(x.dtype)
        scale = torch.rsqrt(var + self.post_norm.eps)
        if self.post_affine_weight is not None:
            scale = scale * self.post_affine_weight.to(acc)
        bias = None if self.post_affine_bias is None else self.post_affine_bias.to(acc)
        return channel_affine(x.to(acc), scale, bias).to(h.dtype)
    if self.post_norm is not None:
        return self.post_norm.standardize(x, self.post_affine_weight, self.post_affine_bias)
    return channel_affine(x, self.post_affine_weight, self.post_affine_bias)


def proposed_cbn(*args, **kwargs) -> nn.Module:
    """A ``CompleteBatchNorm`` whose forward is :func:`fast_cbn_forward` (same parameters/buffers)."""
    from ..nn.cbn import CompleteBatchNorm

    class ProposedCBN(CompleteBatchNorm):
        forward = fast_cbn_forward

    return ProposedCBN(*args, **kwargs)
