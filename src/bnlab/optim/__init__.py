"""Optimisers: ``PSISGD`` (Yi et al., UAI 2022), ``GSGD`` (Meng et al., ICLR 2019), and the
registry the trainer uses to build an optimiser by name (``--optim sgd|psi-sgd|psi-sgdm|gsgd``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["make_optimizer", "optimizer_names", "register_optimizer", "PSISGD", "GSGD",
           "psi_param_groups", "find_scale_invariant"]

# name -> builder(model, lr, momentum, weight_decay, nesterov, **options) -> Optimizer
_REGISTRY: dict[str, Callable[..., torch.optim.Optimizer]] = {}
# names registered on import of a module (so a method's optimiser plugs in without edits here)
_LAZY = {"psi-sgd": "bnlab.optim.psi", "psi-sgdm": "bnlab.optim.psi", "psi-gd": "bnlab.optim.psi",
         "gsgd": "bnlab.optim.gsgd"}
_LAZY_ATTRS = {"PSISGD": "bnlab.optim.psi", "psi_param_groups": "bnlab.optim.psi",
               "find_scale_invariant": "bnlab.optim.invariance", "GSGD": "bnlab.optim.gsgd"}


def register_optimizer(name: str, builder: Callable[..., torch.optim.Optimizer]) -> None:
    """Register ``builder(model, lr=, momentum=, weight_decay=, nesterov=, **options)``."""
    _REGISTRY[name] = builder


def _sgd(model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
         nesterov: bool = False, **options: Any) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` on all parameters (no decay on norm parameters and biases if
    ``no_decay_norm=True``)."""
    no_decay_norm = bool(options.pop("no_decay_norm", False))
    if options:
        raise ValueError(f"optimizer 'sgd': unknown option(s) {sorted(options)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if no_decay_norm:
        decay = [p for p in params if p.dim() > 1]
        rest = [p for p in params if p.dim() <= 1]
        groups: Any = [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
    else:
        groups = params
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


register_optimizer("sgd", _sgd)


def optimizer_names() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY))


def make_optimizer(name: str, model: nn.Module, lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0, nesterov: bool = False, **options: Any) -> torch.optim.Optimizer:
    """Build optimiser ``name`` for ``model``. Raises ``ValueError`` naming the bad value."""
    if not isinstance(name, str):
        raise ValueError(f"optimizer must be a name, got {name!r}")
    key = name.lower()
    if key not in _REGISTRY and key in _LAZY:
        importlib.import_module(_LAZY[key])
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(optimizer_names())}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    return _REGISTRY[key](model, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                          **options)


def __getattr__(name: str):
    if name in _LAZY_ATTRS:
        return getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    raise AttributeError(f"module 'bnlab.optim' has no attribute {name!r}")
