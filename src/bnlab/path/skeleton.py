"""Blocks, skeleton masks and roles of the path space of a ReLU network (pbn.md Sec. 1).

A *block* is a chain of weight layers ``W^1 .. W^n`` (an MLP, a PlainNet stage or a residual
branch) whose hidden nodes (channels) are the outputs of layers ``1..n-1``. Each layer has a role:

* ``"first"``: layer 1, the *skeleton layer*; its skeleton entries ``(o, o mod C_in)`` at the kernel
  centre are the trainable skeleton path values ``v_k``;
* ``"mid"``: layers ``2..n-1``; skeleton entries ``(k, k)`` (identity, the design rule makes them
  square);
* ``"last"``: layer ``n``; skeleton entries ``(i mod C_out, i)`` for every input ``i``.

Skeleton entries of ``mid``/``last`` layers are the constants fixed by the path reparameterisation
(pbn.md Sec. 2.1). Masks follow the official G-SGD code's modulo rule (pbn.md Sec. 1.2).

Design rule (pbn.md Sec. 1.2, Sec. 7 #17): all hidden widths of a block are equal; only the block's
input and output widths may differ. :func:`check_block` enforces it with an error naming the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "ROLES",
    "BlockSpec",
    "check_block",
    "roles_for",
    "skeleton_mask",
    "skeleton_pairs",
]

ROLES = ("first", "mid", "last")


def roles_for(n: int) -> list[str]:
    """Roles of the ``n >= 2`` layers of a block: ``first, mid, ..., mid, last``."""
    if n < 2:
        raise ValueError(f"a path-space block needs at least 2 weight layers, got {n}")
    return ["first"] + ["mid"] * (n - 2) + ["last"]


def skeleton_pairs(c_out: int, c_in: int, role: str, device=None) -> tuple[Tensor, Tensor]:
    """Index pairs ``(o_idx, i_idx)`` (LongTensors of equal length) of the skeleton entries.

    ``first``: ``(o, o mod c_in)`` for every output o; ``last``: ``(i mod c_out, i)`` for every
    input i; ``mid``: the ``last`` rule if ``c_in > c_out`` else the ``first`` rule (identity when
    square).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    by_input = role == "last" or (role == "mid" and c_in > c_out)
    if by_input:
        i_idx = torch.arange(c_in, device=device)
        return i_idx % c_out, i_idx
    o_idx = torch.arange(c_out, device=device)
    return o_idx, o_idx % c_in


def skeleton_mask(shape: torch.Size | tuple[int, ...], role: str, device=None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """0/1 mask of a weight of ``shape`` (C_out, C_in) or (C_out, C_in, kh, kw): 1 at the kernel
    centre ``(kh // 2, kw // 2)`` of every skeleton pair (pbn.md Sec. 1.3)."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"weight shape must be (C_out, C_in, *kernel), got {shape}")
    o_idx, i_idx = skeleton_pairs(shape[0], shape[1], role, device)
    mask = torch.zeros(shape, device=device, dtype=dtype)
    centre = tuple(k // 2 for k in shape[2:])
    mask[(o_idx, i_idx, *centre)] = 1
    return mask


@dataclass
class BlockSpec:
    """A block of a model, by module references.

    ``units``: the weight+norm units of the block in order (``ConvUnit`` / ``PathUnit``, or a bare
    ``nn.Linear`` for an MLP classifier); ``roles``: their roles; ``name``: a dotted path used in
    error messages and parameter groups; ``lam``: Path-BN skip coefficient for layers >= 2.
    """

    name: str
    units: list[nn.Module]
    roles: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.roles:
            self.roles = roles_for(len(self.units))

    @property
    def weights(self) -> list[nn.Module]:
        """The weight layers (Conv2d / Linear) of the block."""
        return [weight_layer(u) for u in self.units]

    @property
    def norms(self) -> list[nn.Module | None]:
        """The norm unit after each weight layer (``None`` for a bare classifier)."""
        return [getattr(u, "norm", None) for u in self.units]

    @property
    def hidden_width(self) -> int:
        return int(self.weights[0].weight.shape[0])


def weight_layer(unit: nn.Module) -> nn.Module:
    """The Conv2d / Linear of a unit (the unit itself for a bare layer)."""
    return unit.conv if hasattr(unit, "conv") else unit


def _describe(layer: nn.Module) -> str:
    return f"{type(layer).__name__}{tuple(layer.weight.shape)}"


def check_block(spec: BlockSpec) -> None:
    """Raise ``ValueError`` naming the block/layer when ``spec`` breaks the design rule or holds a
    layer the path space does not support (grouped/dilated convs, biases before a norm, even
    kernels, a non-ReLU hidden activation, a norm that is not a BN)."""
    from ..nn.norm_act import BatchNormAct

    layers = spec.weights
    n = len(layers)
    if n < 2:
        raise ValueError(f"block {spec.name!r}: needs at least 2 weight layers, got {n}")
    for idx, (layer, norm, role) in enumerate(zip(layers, spec.norms, spec.roles)):
        desc = _describe(layer) if hasattr(layer, "weight") else type(layer).__name__
        where = f"block {spec.name!r}, layer {idx + 1} ({desc})"
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
                raise ValueError(f"{where}: only groups=1, dilation=1, zero-padded convs are supported, "
                                 f"got groups={layer.groups}, dilation={layer.dilation}, "
                                 f"padding_mode={layer.padding_mode!r}")
            if any(k % 2 == 0 for k in layer.kernel_size):
                raise ValueError(f"{where}: kernel must have odd sides (a centre tap), "
                                 f"got {layer.kernel_size}")
        elif not isinstance(layer, nn.Linear):
            raise ValueError(f"{where}: unsupported layer type {type(layer).__name__}; "
                             "expected Conv2d or Linear")
        if norm is not None and not isinstance(norm, BatchNormAct):
            raise ValueError(f"{where}: unsupported norm {type(norm).__name__}; path space needs a BN "
                             "(build the model with norm='bn')")
        if layer.bias is not None and (role != "last" or norm is not None):
            raise ValueError(f"{where}: weight layers inside a block must have bias=False "
                             "(only a block's final, un-normalised classifier may carry a bias)")
        if role != "last":
            act = getattr(norm, "act", None)
            if not isinstance(act, nn.ReLU):
                got = type(act).__name__ if act is not None else None
                raise ValueError(f"{where}: hidden nodes must be ReLU (path space is defined for ReLU "
                                 f"networks), got activation {got}")
    for idx in range(n - 1):
        out_w, in_next = layers[idx].weight.shape[0], layers[idx + 1].weight.shape[1]
        if out_w != in_next:
            raise ValueError(f"block {spec.name!r}: layer {idx + 1} has {out_w} outputs but layer {idx + 2} "
                             f"has {in_next} inputs")
    hidden = [int(w.weight.shape[0]) for w in layers[:-1]]
    if len(set(hidden)) != 1:
        raise ValueError(f"block {spec.name!r} breaks the design rule: hidden widths {hidden} must be equal "
                         "(only the block's input and output widths may differ)")
