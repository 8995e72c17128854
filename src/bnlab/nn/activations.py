"""Activation functions by name (the ``act=`` argument of every model and norm-act module)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["ACTIVATIONS", "make_activation", "activation_names"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
    "none": nn.Identity,
}


def activation_names() -> list[str]:
    """The accepted activation names."""
    return sorted(ACTIVATIONS)


def make_activation(act: str | nn.Module | None) -> nn.Module:
    """A fresh activation module from a name (``relu, sigmoid, tanh, selu, silu, gelu``), a module
    (returned as is) or ``None`` (identity)."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    if not isinstance(act, str) or act.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(activation_names())}")
    return ACTIVATIONS[act.lower()]()
