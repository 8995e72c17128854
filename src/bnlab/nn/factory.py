"""Normalisation methods by name, and where they sit in a network.

A model never instantiates a norm layer directly. It asks a :class:`NormFamily` for one of three
units, which lets a method such as CBN own the activation and reshape a residual block:

* ``family.norm_act(C)``: ``weight -> norm -> act`` (the usual ``conv-BN-ReLU``);
* ``family.norm(C)``: ``weight -> norm`` with no activation (last conv of a residual branch,
  projection shortcut);
* ``family.post_add(C)``: what follows a residual addition (the activation for BN; CBN may add a
  standardisation after it).

``family.conv_bias`` says whether the weight layers before the norm carry a bias. A family is also
callable with one positional ``num_features`` (returns ``norm_act``) so it plugs into
torchvision/timm-style ``norm_layer=`` arguments.

Names: ``"bn"``, ``"none"``, ``"cbn"`` / ``"cbn:<preset>"`` (registered by :mod:`bnlab.nn.cbn`);
``"pbn"`` is a conversion of a ``"bn"`` network into path space, done by
:func:`bnlab.models.build` through :func:`bnlab.path.to_path_space`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .activations import make_activation
from .norm_act import BatchNormAct

__all__ = ["NormFamily", "BNFamily", "NoNormFamily", "register_norm", "get_norm", "norm_names"]


@dataclass
class NormFamily:
    """Base: how a normalisation method is placed. Subclasses override the three units."""

    act: str = "relu"
    options: dict[str, Any] = field(default_factory=dict)
    name: str = "base"
    conv_bias: bool = False

    def norm_act(self, num_features: int, dims: int = 2) -> nn.Module:
        raise NotImplementedError

    def norm(self, num_features: int, dims: int = 2) -> nn.Module:
        raise NotImplementedError

    def post_add(self, num_features: int, dims: int = 2) -> nn.Module:
        return make_activation(self.act)

    def __call__(self, num_features: int, dims: int = 2) -> nn.Module:
        return self.norm_act(num_features, dims)


_BN_OPTIONS = {"eps", "momentum", "affine", "track_running_stats", "sync_stats"}


@dataclass
class BNFamily(NormFamily):
    """Reference placement: ``weight -> BatchNorm -> act`` (``torch.nn.BatchNorm*`` semantics)."""

    name: str = "bn"

    def __post_init__(self) -> None:
        unknown = set(self.options) - _BN_OPTIONS
        if unknown:
            raise ValueError(f"norm 'bn': unknown option(s) {sorted(unknown)}; expected {sorted(_BN_OPTIONS)}")

    def norm_act(self, num_features: int, dims: int = 2) -> nn.Module:
        return BatchNormAct(num_features, self.act, dims=dims, **self.options)

    def norm(self, num_features: int, dims: int = 2) -> nn.Module:
        return BatchNormAct(num_features, None, dims=dims, **self.options)


@dataclass
class NoNormFamily(NormFamily):
    """No normalisation: ``weight(+bias) -> act``."""

    name: str = "none"
    conv_bias: bool = True

    def norm_act(self, num_features: int, dims: int = 2) -> nn.Module:
        return make_activation(self.act)

    def norm(self, num_features: int, dims: int = 2) -> nn.Module:
        return nn.Identity()


_REGISTRY: dict[str, Callable[..., NormFamily]] = {
    "bn": lambda act, variant=None, **opt: BNFamily(act=act, options=opt),
    "none": lambda act, variant=None, **opt: NoNormFamily(act=act, options=opt),
}
# Names whose builder registers itself on import of the given module.
_LAZY = {"cbn": "bnlab.nn.cbn"}


def register_norm(name: str, builder: Callable[..., NormFamily]) -> None:
    """Register ``builder(act, variant=None, **options) -> NormFamily`` under ``name``."""
    _REGISTRY[name] = builder


def norm_names() -> list[str]:
    """Accepted norm names (``pbn`` is handled by :func:`bnlab.models.build`)."""
    return sorted(set(_REGISTRY) | set(_LAZY) | {"pbn"})


def get_norm(spec: str | NormFamily, act: str = "relu", **options: Any) -> NormFamily:
    """The :class:`NormFamily` for ``spec`` (``"bn"``, ``"none"``, ``"cbn"``, ``"cbn:<preset>"``).

    ``act`` is validated here so a bad name fails before any layer is built.
    """
    if isinstance(spec, NormFamily):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"norm must be a name or a NormFamily, got {spec!r}")
    make_activation(act)
    base, _, variant = spec.partition(":")
    base = base.lower()
    if base not in _REGISTRY and base in _LAZY:
        importlib.import_module(_LAZY[base])
    if base not in _REGISTRY:
        raise ValueError(f"unknown norm {spec!r}; expected one of {', '.join(norm_names())}")
    if variant and base in ("bn", "none"):
        raise ValueError(f"norm {base!r} takes no variant, got {spec!r}")
    return _REGISTRY[base](act, variant=variant or None, **options)
