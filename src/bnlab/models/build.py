"""``build(name, ...)``: every model of the zoo by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..nn.factory import NormFamily, get_norm
from .mlp import MLP
from .plainnet import PlainNet
from .resnet import BasicBlock, Bottleneck, ResNet
from .vgg import VGG, VGG_CFGS

__all__ = ["build", "model_names"]

_CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
_IMAGENET_STYLE = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
_PLAIN = {"plainnet18": [4, 4, 4, 4], "plainnet34": [6, 8, 12, 6]}


def model_names() -> list[str]:
    return sorted(["mlp", *_CIFAR_RESNET_DEPTHS, *_IMAGENET_STYLE, *_PLAIN, *VGG_CFGS])


def _scaled(widths: list[int], width: float) -> list[int]:
    return [max(1, int(round(w * width))) for w in widths]


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def build(
    name: str,
    norm: str | NormFamily = "bn",
    act: str = "relu",
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    input_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` with normalisation ``norm`` and activation ``act``.

    Args:
        name: one of :func:`model_names`.
        norm: ``"bn"``, ``"none"``, ``"cbn"``, ``"cbn:<preset>"``, ``"pbn"``, or a NormFamily.
        act: ``relu, sigmoid, tanh, selu, silu, gelu``.
        num_classes, in_channels: output classes and input channels.
        width: multiplier of every hidden width.
        input_size: spatial side of the input (used by ``mlp`` to size its first layer).
        kwargs: model options: ``shortcut`` ("A"/"B") for ResNets, ``hidden`` (list) and
            ``depth`` for ``mlp``, ``norm_options`` (dict) passed to the norm family,
            ``path_options`` (dict) passed to :func:`bnlab.path.to_path_space` for ``pbn``.
    """
    if not isinstance(name, str) or name.lower() not in model_names():
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(model_names())}")
    name = name.lower()
    _check_int("num_classes", num_classes, 1)
    _check_int("in_channels", in_channels, 1)
    if not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    norm_options = dict(kwargs.pop("norm_options", {}) or {})
    path_options = dict(kwargs.pop("path_options", {}) or {})
    if isinstance(norm, str) and norm.lower() == "pbn":
        if act != "relu":
            raise ValueError(f"norm 'pbn' (path space) is defined for ReLU networks only, got act={act!r}")
        model = build(name, "bn", act, num_classes, in_channels, width, input_size,
                      norm_options=norm_options, **kwargs)
        from ..path import to_path_space

        return to_path_space(model, **path_options)
    family = get_norm(norm, act, **norm_options)

    if name == "mlp":
        depth = _check_int("depth", kwargs.pop("depth", 3), 1)
        hidden = kwargs.pop("hidden", None) or _scaled([256] * depth, width)
        _reject(name, kwargs)
        return MLP(in_channels * input_size * input_size, list(hidden), num_classes, family)
    if name in _CIFAR_RESNET_DEPTHS:
        shortcut = kwargs.pop("shortcut", "A")
        _reject(name, kwargs)
        n = _CIFAR_RESNET_DEPTHS[name]
        return ResNet(BasicBlock, [n, n, n], _scaled([16, 32, 64], width), num_classes, in_channels,
                      family, shortcut)
    if name in _IMAGENET_STYLE:
        shortcut = kwargs.pop("shortcut", "B")
        _reject(name, kwargs)
        block, layers = _IMAGENET_STYLE[name]
        return ResNet(block, layers, _scaled([64, 128, 256, 512], width), num_classes, in_channels,
                      family, shortcut)
    if name in _PLAIN:
        _reject(name, kwargs)
        return PlainNet(_PLAIN[name], _scaled([64, 128, 256, 512], width), num_classes, in_channels, family)
    _reject(name, kwargs)
    return VGG(VGG_CFGS[name], width, num_classes, in_channels, family)


def _reject(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"model {name!r}: unknown option(s) {sorted(kwargs)}")
