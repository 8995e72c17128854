"""Eval-time folding of CBN's post-activation normalisation into the next weight layer.

In eval mode the post-norm (and post-affine) of a :class:`~bnlab.nn.cbn.CompleteBatchNorm` is a
per-channel affine map a -> s * a + t (cbn.md Sec. 5.1, "Deployment folding"). For the next layer
z = W y + b it folds exactly into W' = W diag(s), b' = b + W t for linear layers and for
convolutions with padding 0. With zero padding > 0 the padded border pixels of y are 0 while the
folded layer pads a with 0, i.e. y = t at the border: outputs differ within ``padding`` pixels of the
edge, so folding a padded conv needs ``allow_padding=True``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .cbn import CompleteBatchNorm

__all__ = ["post_norm_affine", "fold_post_norm", "fold_model"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def post_norm_affine(m: CompleteBatchNorm) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (C,), with ``post(a) = scale * a + shift`` per channel in eval mode."""
    if not isinstance(m, CompleteBatchNorm):
        raise TypeError(f"expected a CompleteBatchNorm, got {type(m).__name__}")
    stats = m.post_norm
    if stats is None:
        raise ValueError(f"CompleteBatchNorm with post_norm={m.post_mode!r} has no foldable post-norm")
    if m.training or not stats.track_running_stats:
        raise ValueError("folding needs eval mode and track_running_stats=True "
                         "(batch statistics cannot fold)")
    rm, rv = stats.running_mean, stats.running_var
    inv = torch.rsqrt(rv + stats.eps)
    if m.post_mode == "standardize":
        scale, shift = inv, -rm * inv
    elif m.post_mode == "center":
        scale, shift = torch.ones_like(rm), -rm
    else:  # scale_post
        scale, shift = inv, torch.zeros_like(rm)
    if m.post_affine_weight is not None:
        scale = scale * m.post_affine_weight
        shift = shift * m.post_affine_weight + m.post_affine_bias
    return scale, shift


@torch.no_grad()
def fold_post_norm(m: CompleteBatchNorm, layer: nn.Module, allow_padding: bool = False
                   ) -> tuple[CompleteBatchNorm, nn.Module]:
    """Fold ``m``'s eval post-norm into the following ``layer`` (Linear or Conv with groups=1).

    Returns new modules ``(m', layer')`` with ``layer'(m'(x)) == layer(m(x))`` (exact for Linear and
    padding 0; differs at the border for padding > 0, which needs ``allow_padding=True``). The inputs
    are not modified. ``layer'`` always carries a bias.
    """
    scale, shift = post_norm_affine(m)
    if not isinstance(layer, _FOLDABLE):
        raise TypeError(f"layer must be nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}")
    c_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if c_in != m.num_features:
        raise ValueError(f"layer expects {c_in} input channels, the norm has {m.num_features}")
    if not isinstance(layer, nn.Linear):
        if layer.groups != 1:
            raise ValueError(f"folding supports groups=1 convolutions, got groups={layer.groups}")
        padded = layer.padding == "same" or any(p != 0 for p in layer.padding)
        if padded and not allow_padding:
            raise ValueError(
                f"conv padding={layer.padding!r}: folding is exact only with padding 0 (the border differs); "
                "pass allow_padding=True to fold anyway"
            )
    w = layer.weight
    view = [1, -1] + [1] * (w.dim() - 2)
    new_w = w * scale.to(w.dtype).view(view)
    extra = (w.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w) @ shift.to(w.dtype)
    new_layer = copy.deepcopy(layer)
    new_layer.weight = nn.Parameter(new_w)
    old_b = layer.bias if layer.bias is not None else torch.zeros_like(extra)
    new_layer.bias = nn.Parameter(old_b + extra)
    new_m = copy.deepcopy(m)
    new_m.post_norm = None
    new_m.post_mode = "none"
    new_m.post_affine_weight = None
    new_m.post_affine_bias = None
    return new_m, new_layer


def _conv_of(unit: nn.Module) -> nn.Module | None:
    if isinstance(unit, _FOLDABLE):
        return unit
    conv = getattr(unit, "conv", None)  # bnlab.models.ConvUnit
    return conv if isinstance(conv, _FOLDABLE) else None


def _foldable_norm(unit: nn.Module) -> CompleteBatchNorm | None:
    norm = getattr(unit, "norm", unit)
    if isinstance(norm, CompleteBatchNorm) and norm.post_norm is not None:
        return norm
    return None


@torch.no_grad()
def fold_model(model: nn.Module, allow_padding: bool = False) -> nn.Module:
    """A folded copy of an eval-mode ``model``: in every ``nn.Sequential``/``nn.ModuleList`` of
    units (``ConvUnit`` or bare layers), and from an MLP's last layer into ``fc``, the post-norm of a
    ``CompleteBatchNorm`` is folded into the directly following weight layer where
    :func:`fold_post_norm` allows it (others are left as they are)."""
    model = copy.deepcopy(model).eval()

    def try_fold(unit: nn.Module, set_norm, nxt: nn.Module | None, set_next) -> None:
        norm = _foldable_norm(unit)
        if norm is None or nxt is None:
            return
        try:
            new_norm, new_layer = fold_post_norm(norm, nxt, allow_padding)
        except ValueError:
            return
        set_norm(new_norm)
        set_next(new_layer)

    for container in list(model.modules()):
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        for i in range(len(container) - 1):
            unit, nxt = container[i], container[i + 1]
            conv = _conv_of(nxt)
            if conv is None:
                continue

            def set_norm(n, unit=unit, i=i, container=container):
                if isinstance(unit, CompleteBatchNorm):
                    container[i] = n
                else:
                    unit.norm = n

            def set_next(layer, nxt=nxt, i=i, container=container, conv=conv):
                if nxt is conv:
                    container[i + 1] = layer
                else:
                    nxt.conv = layer

            try_fold(unit, set_norm, conv, set_next)
    layers, fc = getattr(model, "layers", None), getattr(model, "fc", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and isinstance(fc, nn.Linear):
        last = layers[-1]
        try_fold(last, lambda n: setattr(last, "norm", n), fc, lambda layer: setattr(model, "fc", layer))
    return model
