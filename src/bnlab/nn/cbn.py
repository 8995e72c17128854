"""Complete Batch Normalisation (Peng, Yu & Yu, "Re-Thinking the Effectiveness of Batch
Normalization and Beyond", TPAMI 2024, DOI 10.1109/TPAMI.2023.3319005).

The paper's equations could not be read (see ``docs/methods/cbn.md``); this module implements the
configurable layer of the project spec (``methods/cbn.md`` Sec. 5.1)::

    forward(h) = post_affine( post_norm( phi( pre_affine( pre_norm(h) ) ) ) )

with the presets of Sec. 5.1 (Std = per-channel batch standardisation, A = per-channel affine):

============  ==========================================  ==================
preset        forward                                     reading (Sec. 4)
============  ==========================================  ==================
vanilla       phi(A(Std(h)))                              BN baseline
decoupled     Std(phi(A(h)))                              R2 (default)
post_bn       A(Std(phi(h)))                              R1 (conv bias on)
double        Std(phi(A(Std(h))))                         R4
split_pre     gamma / sigma_B(h) * phi(h - mu_B(h) + beta)  R3a (= vanilla for ReLU)
split_post    phi(A(h - mu_B(h))) / sigma_B(phi(.))       R3b
post_center   phi(A(Std(h))) - mu_B(phi(.))               R5 (ablation)
============  ==========================================  ==================

Every statistic lives in a :class:`bnlab.nn.stats.BatchStats` (affine=False; its buffers, running-
statistics rule and state-dict keys). Standardisation always runs ``BatchStats.standardize`` (PyTorch's
BN kernel) with the neighbouring affine passed *into* the kernel; a ReLU on a fresh tensor is applied
in place. Speed path (batch statistics, fp32/fp64, unsynchronised, not compiled/traced): with ReLU
the whole layer is one closed-form autograd Function (``_FusedReLU`` for every preset but
split_pre, ``_SplitPreReLU`` for split_pre; 3 full-size allocations per forward+backward against
BN+ReLU's 4); with other activations the centring-only and scale-only norms are closed-form
Functions (``_Center``, ``_ScaleStd``). All use fast CPU moments (``_moments``) and re-run plain
autograd for double backward. Eval mode, half dtypes, ``sync_stats`` and ``fused = False`` take the
plain autograd path (``BatchStats`` / :func:`bnlab.nn.stats.batch_moments`), numerically the same layer.
The module also registers the ``"cbn"`` norm family (Sec. 5.2 placement) with
:func:`bnlab.nn.factory.register_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import make_activation
from .factory import NormFamily, register_norm
from .norm_act import Affine, BatchNormAct
from .stats import BatchStats, batch_moments, channel_affine, check_batch_size, reduce_dims, stats_dtype, world_size

__all__ = ["CompleteBatchNorm", "CBNFamily", "PRESETS", "DEFAULT_PRESET", "preset_names", "update_running_stats"]

PRE_NORMS = ("none", "standardize", "center")
POST_NORMS = ("none", "standardize", "center", "scale_post", "scale_pre")

#: preset -> (pre_norm, pre_affine, post_norm, post_affine); cbn.md Sec. 5.1 table.
PRESETS: dict[str, dict[str, Any]] = {
    "vanilla": dict(pre_norm="standardize", pre_affine=True, post_norm="none", post_affine=False),
    "decoupled": dict(pre_norm="none", pre_affine=True, post_norm="standardize", post_affine=False),
    "post_bn": dict(pre_norm="none", pre_affine=False, post_norm="standardize", post_affine=True),
    "double": dict(pre_norm="standardize", pre_affine=True, post_norm="standardize", post_affine=False),
    "split_pre": dict(pre_norm="center", pre_affine=True, post_norm="scale_pre", post_affine=False),
    "split_post": dict(pre_norm="center", pre_affine=True, post_norm="scale_post", post_affine=False),
    "post_center": dict(pre_norm="standardize", pre_affine=True, post_norm="center", post_affine=False),
}
DEFAULT_PRESET = "decoupled"
#: presets whose preceding weight layer carries a bias (no shift before phi otherwise).
_CONV_BIAS = {"post_bn"}


def preset_names() -> list[str]:
    return list(PRESETS)


def _shape(x: Tensor) -> list[int]:
    s = [1] * x.dim()
    s[1] = x.shape[1]
    return s


def update_running_stats(stats: BatchStats, mean: Tensor, var_biased: Tensor, count: int) -> None:
    """Fold batch moments (C,) of ``count`` values per channel into ``stats``' running buffers with
    the ``torch.nn.BatchNorm`` rule (the one place this module touches ``BatchStats`` internals)."""
    stats._update_running(mean.detach(), var_biased.detach(), count)


# -- fused autograd Functions (batch statistics, fp32/fp64, one process) ------------------------
# Each returns (y, mean, var_biased); mean/var are non-differentiable outputs for the running
# buffers. backward() uses closed-form gradients in a few full-tensor passes; under
# create_graph=True (double backward, e.g. Hessian-vector products) it re-runs the plain autograd
# reference ``_ref`` instead, so higher derivatives stay exact.
_FAST_DTYPES = (torch.float32, torch.float64)
#: FX symbolic tracing (``is_fx_tracing`` warns on every call in recent torch; together with
#: ``torch.compiler.is_compiling()`` this covers the same cases).
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def _view(t: Tensor | None, x: Tensor) -> Tensor | None:
    """(C,) -> broadcastable against x (N, C, *)."""
    return None if t is None else t.view(_shape(x))


def _sums(g: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum(g * (x - mean)), sum(g))`` in one pass over g and x (the BN
    inference-mode backward kernel with running mean ``mean``, variance 1, eps 0)."""
    ones = torch.ones_like(mean)
    _, sxm, sg = torch.ops.aten.native_batch_norm_backward(
        g, x, None, mean, ones, None, None, False, 0.0, [False, True, True])
    return sxm, sg


#: largest mean^2 / var for which :func:`_moments` keeps its one-pass variance (float32 relative
#: error ~ 6e-8 * mean^2 / var, i.e. <= ~1e-4); above it, ``torch.var_mean``.
_MOMENTS_MAX_RATIO = 1e3


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (biased var, mean) of x (N, C, *), as ``torch.var_mean(..., correction=0)``.

    CPU: ``mean = sum(x) / N``, then ``sum(x * (x - mean))`` in one pass of :func:`_sums` (the BN
    inference-mode backward kernel; measured float32 error ~6e-8 * mean^2 / var relative, e.g. 4%
    at mean^2 / var = 1e6; a one-pass ``E[x^2] - mean^2`` was 3x worse): 4-6x faster than
    ``torch.var_mean`` over (0, 2, 3) (a strided Welford reduction) and than the BN kernel's own
    statistics. That form loses ``eps * mean^2 / var`` relative precision, so a channel with
    ``mean^2 > 1e3 * var`` (one host check, free on CPU) sends the call to ``torch.var_mean``.
    Other devices: ``torch.var_mean``.
    """
    dims = reduce_dims(x)
    if x.device.type != "cpu":
        return torch.var_mean(x, dim=dims, correction=0)
    n = x.numel() // x.shape[1]
    mean = x.sum(dims) / n
    s, _ = _sums(x, x, mean)
    var = (s / n).clamp_min_(0.0)
    if bool((mean * mean > _MOMENTS_MAX_RATIO * var).any()):
        return torch.var_mean(x, dim=dims, correction=0)
    return var, mean


def _grads_by_autograd(ctx: Any, ref: Any, dy: Tensor, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Gradients of ``ref(*inputs)`` by autograd, with a graph (double backward)."""
    with torch.enable_grad():
        live = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and ctx.needs_input_grad[i]]
        y = ref(*inputs)
        gs = torch.autograd.grad(y, [inputs[i] for i in live], dy, create_graph=True, allow_unused=True)
    out: list[Any] = [None] * len(inputs)
    for i, g in zip(live, gs):
        out[i] = g
    return tuple(out)


class _Center(torch.autograd.Function):
    """``y = (x - mu_B(x)) * w + b`` (centring only; w, b (C,) or None). Forward: :func:`_moments`
    and one fused affine. Backward: ``dx = w * (dy - mean(dy))``, ``dw = sum(dy * (x - mu))``,
    ``db = sum(dy)``: one reduction pass and one affine pass."""

    @staticmethod
    def _ref(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
        y = x - x.mean(reduce_dims(x), keepdim=True)
        y = y if w is None else y * _view(w, x)
        return y if b is None else y + _view(b, x)

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        var, mean = _moments(x)
        shift = -mean if w is None else -mean * w
        y = channel_affine(x, w, shift if b is None else shift + b)
        ctx.save_for_backward(x, w, b, mean)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _m: Any, _v: Any) -> tuple[Any, ...]:
        x, w, b, mean = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _grads_by_autograd(ctx, _Center._ref, dy, (x, w, b))
        if w is not None and ctx.needs_input_grad[1]:
            sxm, sg = _sums(dy, x, mean)
        else:  # no dw: a plain sum (about half the cost of the fused two-sum pass)
            sxm, sg = None, dy.sum(reduce_dims(dy))
        n = x.numel() // x.shape[1]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = channel_affine(dy, w, -sg / n if w is None else -w * sg / n)
        return dx, sxm, sg if b is not None else None


class _ScaleStd(torch.autograd.Function):
    """``y = x / sqrt(sigma_B^2(x) + eps) * w + b`` (scale only, no centring; split_post's
    post-norm). Forward: :func:`_moments` + one fused affine. Backward with ``r = rstd``, ``s = r * w``:
    ``dx = s * dy + k * (x - mu)``, ``k = -r^3 * w * sum(dy * x) / N`` (the variance path),
    ``dw = r * sum(dy * x)``, ``db = sum(dy)``: one reduction pass and two elementwise passes."""

    @staticmethod
    def _ref(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
        var = x.var(reduce_dims(x), correction=0, keepdim=True)
        y = x * torch.rsqrt(var + eps)
        y = y if w is None else y * _view(w, x)
        return y if b is None else y + _view(b, x)

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        var, mean = _moments(x)
        rstd = torch.rsqrt(var + eps)
        y = channel_affine(x, rstd if w is None else rstd * w, b)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _m: Any, _v: Any) -> tuple[Any, ...]:
        x, w, b, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _grads_by_autograd(ctx, _ScaleStd._ref, dy, (x, w, b, ctx.eps)) + (None,)
        sxm, sg = _sums(dy, x, mean)
        sdx = sxm + mean * sg  # sum(dy * x)
        n = x.numel() // x.shape[1]
        dx = None
        if ctx.needs_input_grad[0]:
            s = rstd if w is None else rstd * w
            k = -rstd.pow(3) * (sdx if w is None else w * sdx) / n
            dx = channel_affine(dy, s, -k * mean).addcmul_(x, k.view(_shape(x)))
        dw = rstd * sdx if w is not None else None
        return dx, dw, sg if b is not None else None, None


class _SplitPreReLU(torch.autograd.Function):
    """split_pre with ReLU: ``y = gamma * rstd(h) * relu(h - mu(h) + beta)`` (gamma, beta (C,) or
    None). Forward: :func:`_moments`, then affine, in-place ReLU, affine (r = relu(.) saved). Backward with
    ``G = dy * [r > 0]``, ``s = gamma * rstd``, ``A = sum(G)``, ``B = sum(G * r)``:
    ``dh = s * (G - A / N) + k * (h - mu)``, ``k = -rstd^3 * gamma * B / N``, ``dgamma = rstd * B``,
    ``dbeta = s * A``: four passes."""

    @staticmethod
    def _ref(h: Tensor, g: Tensor | None, be: Tensor | None, eps: float) -> Tensor:
        var, mean = torch.var_mean(h, dim=reduce_dims(h), correction=0, keepdim=True)
        t = h - mean if be is None else h - mean + _view(be, h)
        y = torch.relu(t) * torch.rsqrt(var + eps)
        return y if g is None else y * _view(g, h)

    @staticmethod
    def forward(ctx: Any, h: Tensor, g: Tensor | None, be: Tensor | None, eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
        var, mean = _moments(h)
        rstd = torch.rsqrt(var + eps)
        r = torch.relu_(channel_affine(h, None, -mean if be is None else be - mean))
        y = channel_affine(r, rstd if g is None else rstd * g, None)
        ctx.save_for_backward(h, g, be, r, mean, rstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _m: Any, _v: Any) -> tuple[Any, ...]:
        h, g, be, r, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _grads_by_autograd(ctx, _SplitPreReLU._ref, dy, (h, g, be, ctx.eps)) + (None,)
        gm = torch.ops.aten.threshold_backward(dy, r, 0)
        b_sum, a_sum = _sums(gm, r, torch.zeros_like(mean))
        n = h.numel() // h.shape[1]
        s = rstd if g is None else rstd * g
        dh = None
        if ctx.needs_input_grad[0]:
            k = -rstd.pow(3) * (b_sum if g is None else g * b_sum) / n
            dh = channel_affine(gm, s, -s * a_sum / n - k * mean).addcmul_(h, k.view(_shape(h)))
        dg = rstd * b_sum if g is not None else None
        return dh, dg, s * a_sum if be is not None else None, None


def _inplace_affine(t: Tensor, s: Tensor | None, c: Tensor | None) -> Tensor:
    """``t = t * s + c`` in place (s, c (C,) or None), one pass; t must be a tensor we own."""
    sv, cv = _view(s, t), _view(c, t)
    if sv is not None and cv is not None:
        return torch.addcmul(cv, t, sv, out=t)
    if sv is not None:
        return t.mul_(sv)
    return t if cv is None else t.add_(cv)


def _masked_relu_grad(t: Tensor, r: Tensor) -> Tensor:
    """``t * [r > 0]`` in place (ReLU's backward, ``threshold_backward``, written into t)."""
    return torch.ops.aten.threshold_backward.grad_input(t, r, 0, grad_input=t)


class _FusedReLU(torch.autograd.Function):
    """One CBN layer with ReLU (every preset but split_pre), cbn.md Sec. 5.1::

        z = A1(N1(h)),  r = relu(z),  y = A2(N2(r))

    N1 in {none, standardize, center}, N2 in {none, standardize, center, scale_post} (batch moments
    (C,) of h resp. r), A1 = (w1, b1), A2 = (w2, b2), each weight/bias (C,) or None. Returns
    ``(y, stats)``, stats (4, C) = (mean_h, var_h, mean_r, var_r) (biased; zeros for an absent norm),
    non-differentiable, for the running buffers.

    Forward: :func:`_moments` (no allocation), one kernel pass for ``N1+A1`` (``F.batch_norm`` in
    inference mode with the batch moments, i.e. ``(h - mu) * rstd * w1 + b1``), ReLU in place,
    moments of r, one pass for ``N2+A2``: two full-size allocations (r, y), BN+ReLU makes two.
    Backward with ``A = sum(dy)``, ``B = sum(dy * (r - mu_r))`` (one ``_sums`` pass), post stage
    ``dr = s2 * dy + k2 * r + c2`` (standardize: ``s2 = w2 rstd``, ``k2 = -s2 rstd^2 B / n``;
    center: ``k2 = 0``; scale_post: ``k2 = -w2 rstd^3 (B + mu A) / n``), masked in place by
    ``[r > 0]``, then the pre stage in place on the same buffer (BN's backward, Ioffe & Szegedy
    2015 Alg. 1, ``dh = s1 * (dz - A1 / n) + k1 * (h - mu_h)``): one allocation, which becomes dh.
    Under ``create_graph`` the plain autograd reference :meth:`_ref` runs instead.
    """

    @staticmethod
    def _ref(h: Tensor, w1: Tensor | None, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None,
             pre: str, post: str, eps1: float, eps2: float) -> Tensor:
        def norm(x: Tensor, mode: str, eps: float) -> Tensor:
            if mode == "none":
                return x
            var, mean = torch.var_mean(x, dim=reduce_dims(x), correction=0, keepdim=True)
            if mode == "center":
                return x - mean
            if mode == "scale_post":
                return x * torch.rsqrt(var + eps)
            return (x - mean) * torch.rsqrt(var + eps)

        def aff(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:
            x = x if w is None else x * _view(w, x)
            return x if b is None else x + _view(b, x)

        r = torch.relu(aff(norm(h, pre, eps1), w1, b1))
        return aff(norm(r, post, eps2), w2, b2)

    @staticmethod
    def forward(ctx: Any, h: Tensor, w1: Tensor | None, b1: Tensor | None, w2: Tensor | None,
                b2: Tensor | None, pre: str, post: str, eps1: float, eps2: float) -> tuple[Tensor, Tensor]:
        stats = h.new_zeros(4, h.shape[1])
        m1 = rstd1 = m2 = rstd2 = None
        if pre == "none":
            r = torch.relu(h) if w1 is None and b1 is None else torch.relu_(channel_affine(h, w1, b1))
        else:
            v1, m1 = _moments(h)
            stats[0], stats[1] = m1, v1
            if pre == "standardize":
                rstd1 = torch.rsqrt(v1 + eps1)
                r = F.batch_norm(h, m1, v1, w1, b1, False, 0.0, eps1)
            else:  # center: (h - mu) * w1 + b1
                shift = -m1 if w1 is None else -m1 * w1
                r = channel_affine(h, w1, shift if b1 is None else shift + b1)
            torch.relu_(r)
        y = r if w2 is None and b2 is None else channel_affine(r, w2, b2)  # post == "none"
        if post != "none":
            v2, m2 = _moments(r)
            stats[2], stats[3] = m2, v2
            if post == "standardize":
                rstd2 = torch.rsqrt(v2 + eps2)
                y = F.batch_norm(r, m2, v2, w2, b2, False, 0.0, eps2)
            elif post == "center":
                shift = -m2 if w2 is None else -m2 * w2
                y = channel_affine(r, w2, shift if b2 is None else shift + b2)
            else:  # scale_post: r * rstd * w2 + b2
                rstd2 = torch.rsqrt(v2 + eps2)
                y = channel_affine(r, rstd2 if w2 is None else rstd2 * w2, b2)
        ctx.save_for_backward(h, r, w1, b1, w2, b2, m1, rstd1, m2, rstd2)
        ctx.cfg = (pre, post, eps1, eps2)
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx: Any, dy: Tensor, _stats: Any) -> tuple[Any, ...]:
        h, r, w1, b1, w2, b2, m1, rstd1, m2, rstd2 = ctx.saved_tensors
        pre, post, eps1, eps2 = ctx.cfg
        if torch.is_grad_enabled():
            return _grads_by_autograd(ctx, _FusedReLU._ref, dy, (h, w1, b1, w2, b2, *ctx.cfg))
        n = h.numel() // h.shape[1]
        dw1 = db1 = dw2 = db2 = None
        # post stage: dr = s2 * dy + k2 * r + c2, then dz = dr * [r > 0]
        if post == "none" and w2 is None and b2 is None:
            t = torch.ops.aten.threshold_backward(dy, r, 0)
        elif post == "none":  # y = r * w2 + b2
            dw2, db2 = _sums(dy, r, r.new_zeros(r.shape[1]))
            t = _masked_relu_grad(channel_affine(dy, w2, None) if w2 is not None else dy.clone(), r)
        else:
            b_sum, a_sum = _sums(dy, r, m2)  # sum(dy * (r - mu)), sum(dy)
            k2 = None
            if post == "standardize":
                s2 = rstd2 if w2 is None else rstd2 * w2
                k2 = -s2 * rstd2 * rstd2 * b_sum / n
                c2 = -s2 * a_sum / n - k2 * m2
                dw2 = rstd2 * b_sum
            elif post == "center":
                s2 = w2
                c2 = -a_sum / n if w2 is None else -w2 * a_sum / n
                dw2 = b_sum
            else:  # scale_post
                sdr = b_sum + m2 * a_sum  # sum(dy * r)
                s2 = rstd2 if w2 is None else rstd2 * w2
                k2 = -rstd2.pow(3) * (sdr if w2 is None else w2 * sdr) / n
                c2 = -k2 * m2
                dw2 = rstd2 * sdr
            db2 = a_sum
            t = channel_affine(dy, s2, c2)
            if k2 is not None:
                t.addcmul_(r, _view(k2, r))
            _masked_relu_grad(t, r)
        # pre stage, in place on t: dh = s1 * t + k1 * h + c1
        need_w1 = w1 is not None and ctx.needs_input_grad[1]
        need_b1 = b1 is not None and ctx.needs_input_grad[2]
        if pre == "none":
            if need_w1:
                dw1, db1 = _sums(t, h, h.new_zeros(h.shape[1]))
            elif need_b1:
                db1 = t.sum(reduce_dims(t))
            dh = t if w1 is None else t.mul_(_view(w1, t))
        else:
            b_sum, a_sum = _sums(t, h, m1)
            k1 = None
            if pre == "standardize":
                s1 = rstd1 if w1 is None else rstd1 * w1
                k1 = -s1 * rstd1 * rstd1 * b_sum / n
                c1 = -s1 * a_sum / n - k1 * m1
                dw1 = rstd1 * b_sum
            else:  # center
                s1 = w1
                c1 = -a_sum / n if w1 is None else -w1 * a_sum / n
                dw1 = b_sum
            db1 = a_sum
            dh = None
            if ctx.needs_input_grad[0]:
                dh = _inplace_affine(t, s1, c1)
                if k1 is not None:
                    dh.addcmul_(h, _view(k1, h))
        if not ctx.needs_input_grad[0]:
            dh = None
        return (dh, dw1 if need_w1 else None, db1 if need_b1 else None,
                dw2 if w2 is not None else None, db2 if b2 is not None else None, None, None, None, None)


class CompleteBatchNorm(nn.Module):
    """``post_affine(post_norm(phi(pre_affine(pre_norm(h)))))`` (cbn.md Sec. 5.1).

    Shapes: ``dims=1``: (N, C) or (N, C, L); ``dims=2``: (N, C, H, W); ``dims=3``: (N, C, D, H, W);
    output has the input's shape, dtype and memory format.

    Args:
        num_features: C.
        activation: a name (``relu, sigmoid, tanh, selu, silu, gelu, identity``) or a module.
        preset: one of :data:`PRESETS`.
        eps, momentum, track_running_stats: as ``torch.nn.BatchNorm*`` (for every inner statistic).
        sync_stats, process_group: cross-process statistics (see :class:`BatchStats`).
        overrides: ``pre_norm`` (none|standardize|center), ``pre_affine`` (bool), ``post_norm``
            (none|standardize|center|scale_post|scale_pre), ``post_affine`` (bool).

    State dict: ``pre_norm.*`` / ``post_norm.*`` (BN buffers), ``pre_affine_weight``,
    ``pre_affine_bias``, ``post_affine_weight``, ``post_affine_bias``. With ``post_norm="scale_pre"``
    (split_pre) ``pre_affine_weight`` multiplies *after* phi and ``pre_affine_bias`` is added before.
    """

    #: use the fused closed-form path (:class:`_FusedReLU`, ``_SplitPreReLU``, ...) where it applies;
    #: ``False`` on an instance forces the plain ``BatchStats``/autograd path (the tests' reference).
    fused: bool = True

    def __init__(
        self,
        num_features: int,
        activation: str | nn.Module | None = "relu",
        preset: str = DEFAULT_PRESET,
        dims: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        sync_stats: bool = False,
        process_group=None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        unknown = set(overrides) - set(PRESETS[preset])
        if unknown:
            raise TypeError(
                f"CompleteBatchNorm got unexpected keyword argument(s) {sorted(unknown)}; "
                f"flags that may be overridden: {sorted(PRESETS[preset])}"
            )
        cfg = {**PRESETS[preset], **overrides}
        _validate(cfg)
        self.num_features, self.preset, self.dims = num_features, preset, dims
        self.pre_mode: str = cfg["pre_norm"]
        self.post_mode: str = cfg["post_norm"]
        self.act = make_activation(activation)

        def stats(center_only: bool) -> BatchStats:
            return BatchStats(num_features, eps, momentum, affine=False,
                              track_running_stats=track_running_stats, dims=dims,
                              center_only=center_only, sync_stats=sync_stats, process_group=process_group)

        self.pre_norm = None if self.pre_mode == "none" else stats(self.pre_mode == "center")
        no_post = self.post_mode in ("none", "scale_pre")
        self.post_norm = None if no_post else stats(self.post_mode == "center")
        if cfg["pre_affine"]:
            self.pre_affine_weight = nn.Parameter(torch.ones(num_features))
            self.pre_affine_bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("pre_affine_weight", None)
            self.register_parameter("pre_affine_bias", None)
        if cfg["post_affine"]:
            self.post_affine_weight = nn.Parameter(torch.ones(num_features))
            self.post_affine_bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("post_affine_weight", None)
            self.register_parameter("post_affine_bias", None)

    # -- helpers --------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        ranks = BatchStats._RANKS[self.dims]
        if x.dim() not in ranks or x.shape[1] != self.num_features:
            want = " or ".join(f"{r}D" for r in ranks)
            raise ValueError(
                f"CompleteBatchNorm: expected {want} input (N, {self.num_features}, ...), "
                f"got input of shape {list(x.shape)}"
            )

    @staticmethod
    def _fast(stats: BatchStats, x: Tensor) -> bool:
        """True when ``stats`` normalises ``x`` with its own batch moments, unsynchronised, in
        x's dtype (fp32/fp64): the case the fused autograd Functions below implement."""
        return (type(x) is torch.Tensor and not _fx_tracing() and not torch.compiler.is_compiling()
                and (stats.training or not stats.track_running_stats) and x.dtype in _FAST_DTYPES
                and not (stats.sync_stats and world_size(stats.process_group) > 1))

    @staticmethod
    def _batch_fn(fn: type[torch.autograd.Function], stats: BatchStats, x: Tensor, *args: Any) -> Tensor:
        """Run a fused Function on batch moments of ``x`` and update ``stats``' running buffers."""
        if stats.training:
            check_batch_size(x)
        y, mean, var = fn.apply(x, *args)
        if stats.training and stats.track_running_stats:
            stats.num_batches_tracked.add_(1)
            update_running_stats(stats, mean, var, x.numel() // x.shape[1])
        return y

    def _fused_ok(self, h: Tensor) -> bool:
        """True when the whole layer can run as one :class:`_FusedReLU` call: ReLU, every norm on
        batch moments (see :meth:`_fast`), parameters in h's dtype, and the fused path enabled."""
        if not self.fused or type(self.act) is not nn.ReLU or self.post_mode == "scale_pre":
            return False
        norms = [s for s in (self.pre_norm, self.post_norm) if s is not None]
        params = [p for p in (self.pre_affine_weight, self.pre_affine_bias, self.post_affine_weight,
                              self.post_affine_bias) if p is not None]
        return (type(h) is torch.Tensor and h.dtype in _FAST_DTYPES and all(self._fast(s, h) for s in norms)
                and all(type(p) is nn.Parameter or type(p) is torch.Tensor for p in params)
                and all(p.dtype == h.dtype and p.device == h.device for p in params))

    def _fused_forward(self, h: Tensor) -> Tensor:
        """The layer as one :class:`_FusedReLU` call; running buffers updated with the BN rule."""
        pre, post = self.pre_norm, self.post_norm
        if any(s is not None and s.training for s in (pre, post)):
            check_batch_size(h)
        y, st = _FusedReLU.apply(h, self.pre_affine_weight, self.pre_affine_bias, self.post_affine_weight,
                                 self.post_affine_bias, self.pre_mode, self.post_mode,
                                 pre.eps if pre is not None else 0.0, post.eps if post is not None else 0.0)
        n = h.numel() // h.shape[1]
        for i, stats in enumerate((pre, post)):
            if stats is not None and stats.training and stats.track_running_stats:
                stats.num_batches_tracked.add_(1)
                update_running_stats(stats, st[2 * i], st[2 * i + 1], n)
        return y

    def _scale_moments(self, stats: BatchStats, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, biased var) of ``x`` per channel: batch moments (updating ``stats``' buffers
        with the BN rule) in training or without running stats; the running buffers in eval."""
        if stats.training or not stats.track_running_stats:
            sync = stats.sync_stats and world_size(stats.process_group) > 1
            if stats.training:
                check_batch_size(x, world_size(stats.process_group) if sync else 1)
            mean, var, count = batch_moments(x, sync=sync, process_group=stats.process_group)
            if stats.training and stats.track_running_stats:
                stats.num_batches_tracked.add_(1)
                update_running_stats(stats, mean.detach(), var.detach(), count)
            return mean, var
        acc = stats_dtype(x.dtype)
        return stats.running_mean.to(acc), stats.running_var.to(acc)

    # -- forward --------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        self._check_input(h)
        relu = type(self.act) is nn.ReLU
        if self.post_mode == "scale_pre":  # split_pre: gamma / sigma_B(h) * phi(h - mu_B(h) + beta)
            if relu and self.fused and self._fast(self.pre_norm, h):
                return self._batch_fn(_SplitPreReLU, self.pre_norm, h, self.pre_affine_weight,
                                      self.pre_affine_bias, self.pre_norm.eps)
            return self._split_pre(h, relu)
        if relu and self._fused_ok(h):
            return self._fused_forward(h)
        w, b = self.pre_affine_weight, self.pre_affine_bias
        if self.pre_mode == "center" and self.fused and self._fast(self.pre_norm, h):
            x = self._batch_fn(_Center, self.pre_norm, h, w, b)
        elif self.pre_norm is not None:
            x = self.pre_norm.standardize(h, w, b)
        else:
            x = channel_affine(h, w, b)
        x = torch.relu_(x) if (relu and x is not h) else self.act(x)  # fresh tensor: in place
        stats, w, b = self.post_norm, self.post_affine_weight, self.post_affine_bias
        if stats is None:
            return channel_affine(x, w, b)
        if self.post_mode in ("center", "scale_post") and self.fused and self._fast(stats, x):
            fn = _Center if self.post_mode == "center" else _ScaleStd
            return self._batch_fn(fn, stats, x, w, b, *((stats.eps,) if fn is _ScaleStd else ()))
        if self.post_mode == "scale_post":
            _, var = self._scale_moments(stats, x)
            acc = stats_dtype(x.dtype)
            scale = torch.rsqrt(var + stats.eps)
            if w is not None:
                scale = scale * w.to(acc)
            return channel_affine(x.to(acc), scale, None if b is None else b.to(acc)).to(h.dtype)
        return stats.standardize(x, w, b)

    def _split_pre(self, h: Tensor, relu: bool) -> Tensor:
        """split_pre with autograd (any activation, eval mode, half dtypes, synchronised stats)."""
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

    def extra_repr(self) -> str:
        return (f"{self.num_features}, preset={self.preset!r}, pre_norm={self.pre_mode!r}, "
                f"pre_affine={self.pre_affine_weight is not None}, post_norm={self.post_mode!r}, "
                f"post_affine={self.post_affine_weight is not None}, dims={self.dims}")


def _validate(cfg: dict[str, Any]) -> None:
    """Reject flag combinations that make no sense (ValueError naming the flags)."""
    if cfg["pre_norm"] not in PRE_NORMS:
        raise ValueError(f"pre_norm must be one of {PRE_NORMS}, got {cfg['pre_norm']!r}")
    if cfg["post_norm"] not in POST_NORMS:
        raise ValueError(f"post_norm must be one of {POST_NORMS}, got {cfg['post_norm']!r}")
    for flag in ("pre_affine", "post_affine"):
        if not isinstance(cfg[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {cfg[flag]!r}")
    if cfg["pre_norm"] == "none" and cfg["post_norm"] == "none":
        raise ValueError("pre_norm='none' with post_norm='none' normalises nothing; use a plain activation")
    if cfg["post_norm"] == "scale_pre" and cfg["pre_norm"] != "center":
        raise ValueError(f"post_norm='scale_pre' divides by sigma_B(h) and needs pre_norm='center', "
                         f"got pre_norm={cfg['pre_norm']!r}")
    if cfg["post_affine"] and cfg["post_norm"] in ("none", "scale_pre"):
        raise ValueError(f"post_affine=True needs a post-activation norm, got post_norm={cfg['post_norm']!r}")


# -- placement in models (cbn.md Sec. 5.2) ---------------------------------------------------
_FAMILY_OPTIONS = {"eps", "momentum", "track_running_stats", "sync_stats"}
_FLAG_OPTIONS = {"pre_norm", "pre_affine", "post_norm", "post_affine"}


@dataclass
class CBNFamily(NormFamily):
    """Where CBN sits in a network (cbn.md Sec. 5.2), for the model zoo's three hooks.

    ``norm_act`` (weight -> norm -> phi) is ``CompleteBatchNorm(C, act, preset)``. The end of a
    residual branch / projection shortcut (``norm``) and what follows the addition (``post_add``):

    ============  ===========================  ===============================
    preset        norm(C)                      post_add(C)
    ============  ===========================  ===============================
    vanilla       BN (affine)                  phi
    decoupled     Affine                       Std(phi(.))
    post_bn       Identity (conv bias on)      A(Std(phi(.)))   (BN after phi)
    double        BN (affine)                  Std(phi(.))
    split_pre     BN (affine)                  phi              (= vanilla for ReLU)
    split_post    A(h - mu_B(h))               phi(.) / sigma_B(phi(.))
    post_center   BN (affine)                  phi(.) - mu_B(phi(.))
    ============  ===========================  ===============================

    ``options``: ``eps, momentum, track_running_stats, sync_stats`` (every unit) and the flag
    overrides ``pre_norm, pre_affine, post_norm, post_affine`` (``norm_act`` units only).
    """

    name: str = "cbn"
    preset: str = DEFAULT_PRESET

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"norm 'cbn:{self.preset}': unknown preset {self.preset!r}; "
                             f"expected one of {', '.join(PRESETS)}")
        unknown = set(self.options) - _FAMILY_OPTIONS - _FLAG_OPTIONS
        if unknown:
            raise ValueError(f"norm 'cbn': unknown option(s) {sorted(unknown)}; "
                             f"expected {sorted(_FAMILY_OPTIONS | _FLAG_OPTIONS)}")
        make_activation(self.act)
        self.conv_bias = self.preset in _CONV_BIAS
        self._bn = {k: v for k, v in self.options.items() if k in _FAMILY_OPTIONS}
        self._flags = {k: v for k, v in self.options.items() if k in _FLAG_OPTIONS}
        if self._flags:  # validate the combination once, before any model is built
            _validate({**PRESETS[self.preset], **self._flags})

    def _cbn(self, c: int, dims: int, preset: str, **flags: Any) -> CompleteBatchNorm:
        return CompleteBatchNorm(c, make_activation(self.act), preset, dims=dims, **self._bn, **flags)

    def norm_act(self, num_features: int, dims: int = 2) -> nn.Module:
        return self._cbn(num_features, dims, self.preset, **self._flags)

    def norm(self, num_features: int, dims: int = 2) -> nn.Module:
        p = self.preset
        if p == "decoupled":
            return Affine(num_features)
        if p == "post_bn":
            return nn.Identity()
        if p == "split_post":
            return CompleteBatchNorm(num_features, None, "split_post", dims=dims, post_norm="none",
                                     **self._bn)
        return BatchNormAct(num_features, None, dims=dims, **self._bn)

    def post_add(self, num_features: int, dims: int = 2) -> nn.Module:
        p = self.preset
        if p in ("vanilla", "split_pre"):
            return make_activation(self.act)
        if p in ("decoupled", "double"):
            return self._cbn(num_features, dims, "decoupled", pre_affine=False)
        if p == "post_bn":
            return self._cbn(num_features, dims, "post_bn")
        if p == "split_post":
            return self._cbn(num_features, dims, "decoupled", pre_affine=False, post_norm="scale_post")
        return self._cbn(num_features, dims, "decoupled", pre_affine=False, post_norm="center")


def _build_family(act: str = "relu", variant: str | None = None, **options: Any) -> CBNFamily:
    """``get_norm("cbn[:<preset>]", act, **options)`` builder."""
    return CBNFamily(act=act, options=dict(options), preset=variant or DEFAULT_PRESET)


register_norm("cbn", _build_family)
