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

Every statistic goes through :class:`bnlab.nn.stats.BatchStats` (affine=False): PyTorch's BN kernel
for ``standardize``, ``center_only=True`` for ``center``; the scale-only post-norms of the split
presets use :func:`bnlab.nn.stats.batch_moments` with the same buffers and running-statistics rule.
The module also registers the ``"cbn"`` norm family (Sec. 5.2 placement) with
:func:`bnlab.nn.factory.register_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .activations import make_activation
from .factory import NormFamily, register_norm
from .norm_act import Affine, BatchNormAct
from .stats import BatchStats, batch_moments, check_batch_size, stats_dtype, world_size

__all__ = ["CompleteBatchNorm", "CBNFamily", "PRESETS", "DEFAULT_PRESET", "preset_names"]

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
                stats._update_running(mean.detach(), var.detach(), count)
            return mean, var
        acc = stats_dtype(x.dtype)
        return stats.running_mean.to(acc), stats.running_var.to(acc)

    @staticmethod
    def _affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        shape = _shape(x)
        if weight is not None:
            x = x * weight.to(x.dtype).view(shape)
        if bias is not None:
            x = x + bias.to(x.dtype).view(shape)
        return x

    # -- forward --------------------------------------------------------------------------
    def forward(self, h: Tensor) -> Tensor:
        self._check_input(h)
        if self.post_mode == "scale_pre":  # split_pre: gamma / sigma_B(h) * phi(h - mu_B(h) + beta)
            stats = self.pre_norm
            mean, var = self._scale_moments(stats, h)
            acc = stats_dtype(h.dtype)
            shape = _shape(h)
            t = h.to(acc) - mean.view(shape)
            t = self.act(self._affine(t, None, self.pre_affine_bias))
            t = t * torch.rsqrt(var + stats.eps).view(shape)
            return self._affine(t, self.pre_affine_weight, None).to(h.dtype)
        x = h if self.pre_norm is None else self.pre_norm(h)
        x = self.act(self._affine(x, self.pre_affine_weight, self.pre_affine_bias))
        if self.post_mode == "scale_post":
            _, var = self._scale_moments(self.post_norm, x)
            acc = stats_dtype(x.dtype)
            x = (x.to(acc) * torch.rsqrt(var + self.post_norm.eps).view(_shape(x))).to(h.dtype)
        elif self.post_norm is not None:
            x = self.post_norm(x)
        return self._affine(x, self.post_affine_weight, self.post_affine_bias)

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
