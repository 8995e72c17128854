"""The path space of ReLU networks (Meng et al., ICLR 2019; Luo et al., UAI 2021).

* :mod:`bnlab.path.skeleton`: blocks, roles, skeleton masks, the design-rule check;
* :mod:`bnlab.path.reparam`: :func:`to_path_space` (exact reparameterisation, Path-BN placement),
  :func:`param_groups` (for :class:`bnlab.optim.GSGD`), :func:`path_values` (analysis).
"""

from __future__ import annotations

import importlib

from .skeleton import ROLES, BlockSpec, check_block, roles_for, skeleton_mask, skeleton_pairs

__all__ = [
    "ROLES", "BlockSpec", "check_block", "roles_for", "skeleton_mask", "skeleton_pairs",
    "find_blocks", "to_path_space", "path_blocks", "param_groups", "path_values", "is_path_space",
]

_REPARAM = {"find_blocks", "to_path_space", "path_blocks", "param_groups", "path_values", "is_path_space"}


def __getattr__(name: str):
    # reparam imports bnlab.nn.path_bn, which imports .skeleton: load it lazily to avoid the cycle.
    if name in _REPARAM:
        return getattr(importlib.import_module("bnlab.path.reparam"), name)
    raise AttributeError(f"module 'bnlab.path' has no attribute {name!r}")
