"""Model-level conversions of bnlab norm layers.

* :func:`sync` / :func:`unsync`: switch cross-process batch statistics on every
  :class:`~bnlab.nn.stats.BatchStats` (the statistics core under every bnlab norm: ``BatchNormAct``,
  ``CompleteBatchNorm`` and its presets, ``PathBatchNorm``, and any later one). With ``sync_stats``
  each layer does one differentiable all-reduce of ``cat(sum, sum_sq, count)`` per forward, so N
  processes with batch b have the statistics, outputs, gradients and running buffers of one process
  with batch N*b. This replaces ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
* :func:`guard_sync_batchnorm`: makes the stock converter refuse models that contain bnlab layers
  (it would rebuild every ``_BatchNorm`` subclass as a bare ``SyncBatchNorm`` and silently drop
  activations, ``center_only`` and the CBN/Path-BN logic). Installed on import of this module.
* :func:`replace_norms`: swap the norm units of a built model for another :class:`NormFamily`.
* :func:`fold_bn`: fold eval-mode ``BatchNormAct`` into the preceding conv/linear layer
  (``W' = W * gamma / sqrt(running_var + eps)``, ``b' = (b - running_mean) * gamma /
  sqrt(running_var + eps) + beta``; Ioffe & Szegedy 2015, Sec. 3.1 inference transform).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from .activations import ACTIVATIONS
from .factory import NormFamily, get_norm
from .norm_act import BatchNormAct
from .stats import BatchStats, iter_stats_layers

__all__ = ["sync", "unsync", "guard_sync_batchnorm", "unguard_sync_batchnorm", "replace_norms", "fold_bn"]


# -- cross-process statistics ----------------------------------------------------------------
def _check_module(model: Any, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Reduce batch statistics across ``process_group`` (default: the whole job) in every bnlab norm.

    Sets ``sync_stats=True`` and ``process_group`` on every :class:`BatchStats` inside ``model``
    and returns ``model`` (modified in place). Without an initialised process group, or with one
    process, the layers behave exactly as unsynchronised ones. Call before wrapping in DDP; use
    ``DistributedDataParallel(..., broadcast_buffers=False)`` since the running buffers are already
    identical on every rank.
    """
    _check_module(model, "sync")
    for layer in iter_stats_layers(model):
        layer.sync_stats = True
        layer.process_group = process_group
    return model


def unsync(model: nn.Module) -> nn.Module:
    """Undo :func:`sync`: local statistics in every bnlab norm (in place; returns ``model``)."""
    _check_module(model, "unsync")
    for layer in iter_stats_layers(model):
        layer.sync_stats = False
        layer.process_group = None
    return model


_GUARD_FLAG = "_bnlab_guard"


def _bnlab_layers(module: nn.Module) -> list[str]:
    return [f"{name or '<root>'} ({type(m).__name__})" for name, m in module.named_modules()
            if isinstance(m, BatchStats)]


def guard_sync_batchnorm() -> None:
    """Make ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` raise ``TypeError`` on bnlab layers.

    The stock converter replaces every ``_BatchNorm`` instance by a plain ``SyncBatchNorm``; bnlab
    layers subclass ``_BatchNorm`` (through :class:`BatchStats`), so it would silently drop their
    activation and method logic. Models without bnlab layers convert as before. Idempotent.
    """
    cls = torch.nn.SyncBatchNorm
    current = cls.__dict__["convert_sync_batchnorm"]
    original = current.__func__
    if getattr(original, _GUARD_FLAG, False):
        return

    @functools.wraps(original)
    def convert_sync_batchnorm(klass, module, process_group=None):
        found = _bnlab_layers(module) if isinstance(module, nn.Module) else []
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise TypeError(
                f"torch.nn.SyncBatchNorm.convert_sync_batchnorm would replace bnlab norm layers by "
                f"plain SyncBatchNorm and drop their behaviour (activation, CBN/Path-BN logic); got "
                f"{shown}. Use bnlab.nn.convert.sync(model, process_group) instead (cross-process "
                f"statistics for every bnlab norm)."
            )
        return original(klass, module, process_group)

    setattr(convert_sync_batchnorm, _GUARD_FLAG, True)
    convert_sync_batchnorm.__wrapped_original__ = original  # type: ignore[attr-defined]
    cls.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)


def unguard_sync_batchnorm() -> None:
    """Restore the stock ``convert_sync_batchnorm`` (undo :func:`guard_sync_batchnorm`)."""
    cls = torch.nn.SyncBatchNorm
    fn = cls.__dict__["convert_sync_batchnorm"].__func__
    if getattr(fn, _GUARD_FLAG, False):
        cls.convert_sync_batchnorm = classmethod(fn.__wrapped_original__)


guard_sync_batchnorm()


# -- swapping norm families ------------------------------------------------------------------
def _act_name(module: nn.Module) -> str | None:
    """The registered name of an activation module (``None`` if it is not one)."""
    for name, make in ACTIVATIONS.items():
        if name in ("none", "identity", "swish"):
            continue
        ref = make()
        if type(module) is type(ref):
            return name
    return None


def _infer_act(model: nn.Module) -> str:
    for m in model.modules():
        act = getattr(m, "act", None)
        if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
            name = _act_name(act)
            if name is not None:
                return name
    for m in model.modules():
        name = _act_name(m)
        if name is not None:
            return name
    return "relu"


_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _is_unit(m: nn.Module) -> bool:
    """A ``ConvUnit``-like module: a conv/linear ``conv`` followed by a ``norm`` unit."""
    return isinstance(getattr(m, "conv", None), _WEIGHT_LAYERS) and hasattr(m, "norm")


def _in_path_space(model: nn.Module) -> bool:
    from .path_bn import PathBatchNorm, PathLayerMixin

    return any(isinstance(m, (PathBatchNorm, PathLayerMixin)) for m in model.modules())


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _dims(layer: nn.Module) -> int:
    return {nn.Linear: 1, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(layer)]


def _set_conv_bias(layer: nn.Module, want: bool) -> None:
    """Give ``layer`` a zero bias (function-preserving) or remove its bias, as the family needs."""
    has = layer.bias is not None
    if want and not has:
        w = layer.weight
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
    elif not want and has:
        layer.register_parameter("bias", None)


def _place(new: nn.Module, like: torch.Tensor) -> nn.Module:
    return new.to(device=like.device, dtype=like.dtype)


def replace_norms(model: nn.Module, family_or_name: str | NormFamily, act: str | None = None,
                  inplace: bool = False, **options: Any) -> nn.Module:
    """Swap every norm unit of a bnlab model for those of another normalisation family.

    Every ``ConvUnit`` (``conv`` + ``norm``) gets ``family.norm_act(C)``, except the last unit of a
    residual block and a projection shortcut, which get ``family.norm(C)``; a block's ``post``
    module becomes ``family.post_add(C)``. Conv biases are added (zero) or removed according to
    ``family.conv_bias``, so the result has the structure (and state-dict keys) of
    ``bnlab.models.build(name, norm=family_or_name, act=act)``; new layers start at their
    initialisation (weights of convs and classifiers are kept).

    Args:
        model: a model of :mod:`bnlab.models` (or any model built from ``ConvUnit``).
        family_or_name: ``"bn"``, ``"none"``, ``"cbn"``, ``"cbn:<preset>"`` or a NormFamily
            (``"pbn"`` is a reparameterisation: use :func:`bnlab.path.to_path_space`).
        act: activation name; ``None`` keeps the model's current one.
        inplace: modify ``model`` instead of a deep copy.
        options: norm options passed to the family (``eps``, ``momentum``, ``sync_stats``, ...).
    """
    _check_module(model, "replace_norms")
    if isinstance(family_or_name, str) and family_or_name.lower() == "pbn":
        raise ValueError("replace_norms: norm 'pbn' is a path-space reparameterisation, not a norm swap; "
                         "use bnlab.path.to_path_space(model) on a 'bn' model")
    if not isinstance(family_or_name, (str, NormFamily)):
        raise TypeError(f"replace_norms: family_or_name must be a norm name or a NormFamily, "
                        f"got {type(family_or_name).__name__}")
    if _in_path_space(model):
        raise ValueError("replace_norms: model is in path space (Path-BN); swap norms on the 'bn' model "
                         "before bnlab.path.to_path_space")
    family = get_norm(family_or_name, act if act is not None else _infer_act(model), **options)
    if not inplace:
        model = copy.deepcopy(model)
    units = [m for m in model.modules() if _is_unit(m)]
    if not units:
        raise ValueError("replace_norms: model has no ConvUnit (conv + norm) to rewrite; "
                         "expected a model built by bnlab.models.build")
    plain_units: set[int] = set()
    blocks = [m for m in model.modules() if hasattr(m, "post") and hasattr(m, "shortcut")]
    for block in blocks:
        names = sorted((n for n, c in block.named_children() if n.startswith("unit") and _is_unit(c)),
                       key=lambda n: int(n[4:]) if n[4:].isdigit() else -1)
        last = getattr(block, names[-1]) if names else None
        if last is not None:
            plain_units.add(id(last))
        if _is_unit(block.shortcut):
            plain_units.add(id(block.shortcut))
        if last is not None:
            block.post = _place(family.post_add(_out_features(last.conv), _dims(last.conv)), last.conv.weight)
    for unit in units:
        c, d = _out_features(unit.conv), _dims(unit.conv)
        new = family.norm(c, d) if id(unit) in plain_units else family.norm_act(c, d)
        unit.norm = _place(new, unit.conv.weight)
        _set_conv_bias(unit.conv, family.conv_bias)
    return model


# -- folding for inference ---------------------------------------------------------------------
def _foldable(norm: nn.Module) -> bool:
    return (isinstance(norm, BatchNormAct) and norm.track_running_stats and not norm.center_only
            and norm.running_mean is not None)


@torch.no_grad()
def _folded(conv: nn.Module, bn: BatchNormAct) -> nn.Module:
    """A copy of ``conv`` computing ``BN_eval(conv(x))`` (per-output-channel scale and shift)."""
    w = conv.weight
    acc = torch.float64
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    shift = -bn.running_mean.to(acc) * scale
    if bn.affine:
        scale, shift = scale * bn.weight.to(acc), shift * bn.weight.to(acc) + bn.bias.to(acc)
    bias = conv.bias.to(acc) if conv.bias is not None else torch.zeros(w.shape[0], dtype=acc, device=w.device)
    out = copy.deepcopy(conv)
    shape = [-1] + [1] * (w.dim() - 1)
    out.weight = nn.Parameter((w.to(acc) * scale.view(shape)).to(w.dtype))
    out.bias = nn.Parameter((bias * scale + shift).to(w.dtype))
    return out


def fold_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold eval-mode ``BatchNormAct`` layers into the conv/linear layer before them.

    Each ``ConvUnit`` whose ``norm`` is a :class:`BatchNormAct` with running statistics becomes
    ``act(conv'(x))`` with ``conv'`` as in the module docstring (computed in float64, stored in the
    weight's dtype); consecutive ``(conv, BatchNormAct)`` pairs inside ``nn.Sequential`` are folded
    the same way. Other norms (CBN, Path-BN, ``center_only`` or ``track_running_stats=False``
    layers, BN after a path-space weight layer) are left as they are, so the result always
    computes ``model.eval()``'s function.
    Returns the folded model in eval mode (a deep copy unless ``inplace``).
    """
    _check_module(model, "fold_bn")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for unit in [m for m in model.modules() if _is_unit(m)]:
        if type(unit.conv) in _WEIGHT_LAYERS and _foldable(unit.norm):
            act = unit.norm.act
            unit.conv = _folded(unit.conv, unit.norm)
            unit.norm = act
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for a, b in zip(keys[:-1], keys[1:]):
            conv, norm = seq._modules[a], seq._modules[b]
            if type(conv) in _WEIGHT_LAYERS and _foldable(norm):
                seq._modules[a] = _folded(conv, norm)
                seq._modules[b] = norm.act
    return model.eval()
