"""The one statistics core shared by every bnlab normalisation layer.

Every norm in bnlab (``BatchNormAct``, ``CompleteBatchNorm`` and its presets, ``PathBatchNorm``)
standardises through :class:`BatchStats`, a ``torch.nn.modules.batchnorm._BatchNorm`` subclass, so
it inherits PyTorch's constructor contract, buffers (``running_mean``, ``running_var``,
``num_batches_tracked``), state-dict keys and running-statistics rule exactly:

* training: normalise with the *biased* batch variance, store the *unbiased* one in
  ``running_var``; ``momentum`` is the weight of the new value, ``momentum=None`` a cumulative
  average; ``num_batches_tracked`` counts updates;
* eval (with tracked stats): normalise with the running buffers.

Two things are added on top of PyTorch:

1. ``sync_stats``: when ``torch.distributed`` is initialised with more than one process, the batch
   moments are reduced across processes with **one** all-reduce of ``(sum, sum of squares, count)``
   per layer. The all-reduce is differentiable (``torch.distributed.nn.functional.all_reduce``), so
   the backward pass performs the matching reduction and N processes with batch b give the outputs,
   gradients and buffers of one process with batch N*b. Works with gloo (CPU) and NCCL.
2. ``center_only``: subtract the batch mean, keep the scale (needed by CBN's ``split_*`` and
   ``post_center`` presets). The running variance is still tracked, for diagnostics and folding.

Statistics are computed in at least float32, also under autocast with fp16/bf16 activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

# torch flags the autograd-aware collective as deprecated in favour of the private
# _functional_collectives; bnlab keeps the public one, whose backward (an all-reduce of the
# gradient) the synchronised statistics rely on and which tests/test_distributed.py checks.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated", category=FutureWarning
)

__all__ = [
    "BatchStats",
    "batch_moments",
    "channel_affine",
    "check_batch_size",
    "reduce_dims",
    "stats_dtype",
    "world_size",
]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: float32 for half types, else the input's."""
    return torch.promote_types(dtype, torch.float32)


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Dimensions a per-channel statistic reduces over: all but dim 1 (N, C, *spatial)."""
    return (0,) + tuple(range(2, x.dim()))


def world_size(process_group=None) -> int:
    """Number of processes in ``process_group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def check_batch_size(x: Tensor, world: int = 1) -> None:
    """Raise like ``torch.nn.BatchNorm*`` when training sees one value per channel."""
    size = x.numel() // max(x.shape[1], 1) * world
    if size <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {list(x.shape)}"
        )


def batch_moments(
    x: Tensor, sync: bool = False, process_group=None
) -> tuple[Tensor, Tensor, int]:
    """Per-channel batch mean and biased variance of ``x`` (N, C, *), in :func:`stats_dtype`.

    With ``sync`` and more than one process, one differentiable all-reduce of
    ``cat(sum, sum_sq, count)`` makes the moments those of the concatenated global batch.
    Returns ``(mean (C,), var_biased (C,), count)`` where count is the global number of values
    per channel.
    """
    dims = reduce_dims(x)
    acc = stats_dtype(x.dtype)
    xf = x.to(acc)
    local_count = x.numel() // x.shape[1]
    if sync and world_size(process_group) > 1:
        from torch.distributed.nn.functional import all_reduce

        s = xf.sum(dims)
        ss = (xf * xf).sum(dims)
        cnt = torch.full((1,), float(local_count), dtype=acc, device=x.device)
        packed = all_reduce(torch.cat([s, ss, cnt]), group=process_group)
        c = x.shape[1]
        count = int(packed[-1].item())
        mean = packed[:c] / count
        var = (packed[c : 2 * c] / count - mean * mean).clamp_min(0.0)
        return mean, var, count
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    return mean, var, local_count


def channel_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Per-channel ``x * weight + bias`` in one fused pass forward and one backward.

    x: (N, C, *) -> same shape/dtype/memory format; weight, bias: (C,) or None. Runs PyTorch's
    inference-mode batch-norm kernel with mean 0, variance 1 and eps 0, i.e. exactly
    ``(x - 0) / sqrt(1 + 0) * weight + bias``: forward is one elementwise pass (instead of a
    multiply and an add, each allocating), backward one pass giving d/dx, d/dweight, d/dbias.
    Results equal ``x * w + b`` up to one rounding (the kernel may fuse the multiply-add).
    Mixed dtypes the kernel rejects (e.g. CPU half input with fp32 parameters) take the plain path.
    """
    if weight is None and bias is None:
        return x
    ref = weight if weight is not None else bias
    half = x.dtype in (torch.float16, torch.bfloat16)
    mixed_ok = x.dtype == ref.dtype or (x.device.type == "cuda" and half and ref.dtype == torch.float32)
    if x.dim() < 2 or not mixed_ok:
        shape = _broadcast_shape(x)
        out = x if weight is None else x * weight.to(x.dtype).view(shape)
        return out if bias is None else out + bias.to(x.dtype).view(shape)
    c = x.shape[1]
    mean, var = _unit_stats(c, ref.dtype, x.device)
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, 0.0)


_UNIT_STATS: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def _unit_stats(c: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Cached constant (zeros(C), ones(C)) "running statistics" for :func:`channel_affine`."""
    key = (c, dtype, device)
    out = _UNIT_STATS.get(key)
    if out is None:
        out = (torch.zeros(c, dtype=dtype, device=device), torch.ones(c, dtype=dtype, device=device))
        if len(_UNIT_STATS) < 256:
            _UNIT_STATS[key] = out
    return out


def _broadcast_shape(x: Tensor) -> list[int]:
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    return shape


class BatchStats(_BatchNorm):
    """Per-channel standardisation with exact ``torch.nn.BatchNorm*`` semantics.

    Shapes: input (N, C) / (N, C, L) / (N, C, H, W) / (N, C, D, H, W) -> same shape.
    ``dims`` fixes the accepted input rank (1: 2-D or 3-D input like BatchNorm1d, 2: 4-D,
    3: 5-D); ``None`` accepts any rank >= 2.

    Implements y = (x - E[x]) / sqrt(Var[x] + eps) * gamma + beta (Ioffe & Szegedy 2015, Alg. 1),
    or y = (x - E[x]) * gamma + beta with ``center_only``.
    """

    _RANKS = {1: (2, 3), 2: (4,), 3: (5,)}

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dims: int | None = None,
        center_only: bool = False,
        sync_stats: bool = False,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if dims not in (None, 1, 2, 3):
            raise ValueError(f"dims must be 1, 2, 3 or None, got {dims!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.dims = dims
        self.center_only = center_only
        self.sync_stats = sync_stats
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        ranks = self._RANKS.get(self.dims) if self.dims is not None else None
        if input.dim() < 2 or (ranks is not None and input.dim() not in ranks):
            want = " or ".join(f"{r}D" for r in ranks) if ranks else ">=2D"
            raise ValueError(
                f"{type(self).__name__}: expected {want} input (N, C, ...), got {input.dim()}D input "
                f"of shape {list(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} channels in dim 1, "
                f"got input of shape {list(input.shape)}"
            )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.center_only:
            s += ", center_only=True"
        if self.sync_stats:
            s += ", sync_stats=True"
        return s

    # -- the core -------------------------------------------------------------------------
    def _momentum_factor(self) -> float:
        """The weight of the new value in the running average (torch.nn.BatchNorm rule)."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def standardize(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """Normalise ``x`` (and apply gamma/beta when affine). Updates buffers in training.

        ``weight``/``bias`` (C,): an affine applied *inside* the same fused kernel instead of the
        layer's own parameters (for layers built with ``affine=False`` whose owner keeps the affine,
        e.g. CBN's ``A(Std(h))``); ``None`` uses ``self.weight``/``self.bias``.
        """
        self._check_input_dim(x)
        use_batch = self._use_batch_stats()
        if use_batch and self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        sync = self.sync_stats and use_batch and world_size(self.process_group) > 1
        if not sync and not self.center_only:
            return self._native(x, use_batch, weight, bias)
        return self._explicit(x, use_batch, sync, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.standardize(x)

    def _native(self, x: Tensor, use_batch: bool, weight: Tensor | None = None,
                bias: Tensor | None = None) -> Tensor:
        """PyTorch's fused batch_norm kernel (cuDNN / native CPU); stats in fp32. ``weight``/``bias``
        None: the layer's own."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if use_batch:
            if self.training:
                check_batch_size(x)
            momentum = self._momentum_factor() if (self.training and self.track_running_stats) else 0.0
            rm = self.running_mean if self.training and self.track_running_stats else None
            rv = self.running_var if self.training and self.track_running_stats else None
        else:
            momentum, rm, rv = 0.0, self.running_mean, self.running_var
        if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
            # The CPU kernel wants matching dtypes; compute in fp32 and cast back.
            out = F.batch_norm(x.float(), rm, rv, _f32(weight), _f32(bias), use_batch, momentum, self.eps)
            return out.to(x.dtype)
        return F.batch_norm(x, rm, rv, weight, bias, use_batch, momentum, self.eps)

    def _explicit(self, x: Tensor, use_batch: bool, sync: bool, weight: Tensor | None = None,
                  bias: Tensor | None = None) -> Tensor:
        """Moments by hand: cross-process reduction and/or centring only. ``weight``/``bias`` None:
        the layer's own."""
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        acc = stats_dtype(x.dtype)
        if use_batch:
            if self.training:
                check_batch_size(x, world_size(self.process_group) if sync else 1)
            mean, var, count = batch_moments(x, sync=sync, process_group=self.process_group)
            if self.training and self.track_running_stats:
                self._update_running(mean.detach(), var.detach(), count)
        else:
            mean = self.running_mean.to(acc)
            var = self.running_var.to(acc)
        # y = (x - mean) * scale + bias = x * scale + (bias - mean * scale): one fused pass
        # (channel_affine) instead of a subtract, multiplies and adds, each a full pass.
        scale = None if self.center_only else torch.rsqrt(var + self.eps)
        if weight is not None:
            scale = weight.to(acc) if scale is None else scale * weight.to(acc)
        shift = -mean if scale is None else -mean * scale
        if bias is not None:
            shift = shift + bias.to(acc)
        return channel_affine(x.to(acc), scale, shift).to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var_biased: Tensor, count: int) -> None:
        m = self._momentum_factor()
        unbiased = var_biased * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.float()


def iter_stats_layers(module: torch.nn.Module) -> Sequence[BatchStats]:
    """All :class:`BatchStats` layers inside ``module`` (the layers that sync_stats controls)."""
    return [m for m in module.modules() if isinstance(m, BatchStats)]
