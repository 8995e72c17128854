"""Path reparameterisation of bnlab models (Luo et al., UAI 2021, Sec. 3; pbn.md Sec. 2-3).

:func:`to_path_space` rewrites an MLP / PlainNet / ResNet built with ``norm="bn"`` in place:

* every block (MLP: hidden layers + classifier; PlainNet: one stage; ResNet: one residual branch,
  pbn.md Sec. 1.4) gets :class:`~bnlab.nn.path_bn.PathUnit` s with ``PathConv2d`` / ``PathLinear``
  weights carrying skeleton masks; stem, shortcuts and (for conv nets) the classifier stay as they are;
* ``init="preserve"``: rescale hidden node ``k`` of layer ``l-1`` by ``c = |U^l[skeleton out of k]|``
  so that every skeleton entry of layers ``>= 2`` becomes ``sign(c) = +-1`` (pbn.md Sec. 2.1). With a
  BN after layer ``l-1`` the scale cannot go into that layer's weights (BN would cancel it), so it goes
  into the BN's ``gamma`` and ``beta``: ``relu(c*(gamma*x_hat + beta)) = c*relu(gamma*x_hat + beta)``.
  The function is unchanged exactly (train and eval mode, BN buffers untouched);
* ``init="paper"``: set every skeleton entry, including ``v_k``, to 1 (S1 Sec. 3.2, official code);
  other weights keep their initialisation. Not function preserving (a training start point);
* ``path_bn=True``: layers ``>= 2`` use Path-BN (:class:`~bnlab.nn.path_bn.PathBatchNorm`, fresh
  running stats, gamma/beta copied) with skip coefficient ``lam`` (default 1 for MLP/PlainNet, 0.1 for
  ResNet, S2 Sec. 3.1), the MLP classifier computes ``offdiag(z) + skeleton(z)``; skeleton entries are
  set to +1 (the skip is the fixed 0/1 mask).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .skeleton import BlockSpec, check_block, skeleton_mask, weight_layer

__all__ = ["find_blocks", "to_path_space", "path_blocks", "param_groups", "path_values", "is_path_space"]

_INITS = ("auto", "preserve", "paper")


def find_blocks(model: nn.Module) -> list[BlockSpec]:
    """The blocks of a bnlab ``MLP`` / ``PlainNet`` / ``ResNet`` (before or after conversion)."""
    from ..models.mlp import MLP
    from ..models.plainnet import PlainNet
    from ..models.resnet import BasicBlock, Bottleneck, ResNet

    if isinstance(model, MLP):
        return [BlockSpec("layers+fc", [*model.layers, model.fc])]
    if isinstance(model, PlainNet):
        return [BlockSpec(f"stages.{i}", list(stage)) for i, stage in enumerate(model.stages)]
    if isinstance(model, ResNet):
        specs = []
        for name, m in model.named_modules():
            if isinstance(m, BasicBlock):
                specs.append(BlockSpec(name, [m.unit1, m.unit2]))
            elif isinstance(m, Bottleneck):
                specs.append(BlockSpec(name, [m.unit1, m.unit2, m.unit3]))
        return specs
    raise TypeError(f"to_path_space: unsupported model {type(model).__name__}; expected a bnlab MLP, "
                    "PlainNet or ResNet (bnlab.models.build(name, norm='bn'))")


def _default_lam(model: nn.Module) -> float:
    from ..models.resnet import ResNet

    return 0.1 if isinstance(model, ResNet) else 1.0


@torch.no_grad()
def _rescale_preserve(spec: BlockSpec) -> None:
    """Make skeleton entries of layers >= 2 equal to +-1 by node rescaling (exact, see module doc)."""
    layers, norms = spec.weights, spec.norms
    for l in range(len(layers) - 1, 0, -1):
        w = layers[l].weight
        m = skeleton_mask(w.shape, spec.roles[l], w.device, w.dtype)
        dims = (0, *range(2, w.dim()))
        c = (w * m).sum(dims)                       # value of the one outgoing skeleton edge of node k
        tiny = torch.finfo(w.dtype).tiny ** 0.5
        if bool((c.abs() < tiny).any()) or not bool(torch.isfinite(c).all()):
            k = int(torch.argmin(c.abs()))
            raise ValueError(f"to_path_space: block {spec.name!r}, layer {l + 1}: skeleton weight of input "
                             f"channel {k} is {float(c[k])!r}; cannot rescale by it (use init='paper')")
        a = c.abs()
        w.div_(a.view(1, -1, *([1] * (w.dim() - 2))))
        prev_norm = norms[l - 1]
        if prev_norm is not None:
            if not prev_norm.affine:
                raise ValueError(f"to_path_space: block {spec.name!r}, layer {l}: init='preserve' needs an "
                                 "affine BN (gamma, beta) to absorb the node scale; got affine=False")
            prev_norm.weight.mul_(a.to(prev_norm.weight.dtype))
            prev_norm.bias.mul_(a.to(prev_norm.bias.dtype))
        else:
            prev = layers[l - 1]
            prev.weight.mul_(a.view(-1, *([1] * (prev.weight.dim() - 1))))
            if prev.bias is not None:
                prev.bias.mul_(a)


def _path_norm(norm: nn.Module, lam: float) -> nn.Module:
    """A PathBatchNorm with ``norm``'s configuration, activation and gamma/beta (fresh buffers)."""
    from ..nn.path_bn import PathBatchNorm

    new = PathBatchNorm(norm.num_features, lam=lam, act=norm.act, eps=norm.eps, momentum=norm.momentum,
                        affine=norm.affine, track_running_stats=norm.track_running_stats, dims=norm.dims,
                        sync_stats=norm.sync_stats, process_group=norm.process_group,
                        device=norm.running_mean.device if norm.running_mean is not None else None,
                        dtype=norm.weight.dtype if norm.affine else None)
    if norm.affine:
        with torch.no_grad():
            new.weight.copy_(norm.weight)
            new.bias.copy_(norm.bias)
    new.train(norm.training)
    return new


def _replace(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, new)
                return
    raise RuntimeError("internal error: unit not found in model")  # pragma: no cover


def to_path_space(model: nn.Module, path_bn: bool = True, lam: float | None = None,
                  init: str = "auto") -> nn.Module:
    """Convert ``model`` (a bnlab MLP / PlainNet / ResNet with plain BN) to path coordinates in place.

    Args:
        path_bn: ``True``: Path-BN in layers >= 2 of every block (the paper's P-BN network; the
            function differs by design). ``False``: conventional BN on the full weights ("G-SGD + BN").
        lam: Path-BN skip coefficient; ``None``: 1 for MLP/PlainNet, 0.1 for ResNet.
        init: ``"preserve"`` (exact, function-preserving rescaling), ``"paper"`` (all skeleton entries
            and ``v_k`` set to 1), ``"auto"``: ``"preserve"`` without Path-BN, ``"paper"`` with it.
    Returns the same ``model`` object (``model.path_space`` describes the conversion).
    """
    from ..nn.path_bn import PathConv2d, PathLinear, PathUnit

    if getattr(model, "path_space", None):
        raise ValueError("to_path_space: model is already in path space")
    if not isinstance(path_bn, bool):
        raise TypeError(f"path_bn must be a bool, got {path_bn!r}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
        raise TypeError(f"lam must be a float or None, got {lam!r}")
    lam = _default_lam(model) if lam is None else float(lam)
    if init == "auto":
        init = "paper" if path_bn else "preserve"
    specs = find_blocks(model)
    for spec in specs:
        check_block(spec)
    for spec in specs:
        if init == "preserve":
            _rescale_preserve(spec)
        for idx, (unit, role) in enumerate(zip(spec.units, spec.roles)):
            layer = weight_layer(unit)
            bare = unit is layer
            path_fwd = bool(path_bn and bare and idx > 0)
            if isinstance(layer, nn.Conv2d):
                new_layer = PathConv2d.from_conv(layer, role, path_fwd)
            else:
                new_layer = PathLinear.from_linear(layer, role, path_fwd)
            new_layer.block, new_layer.layer_index = spec.name, idx
            with torch.no_grad():
                m = new_layer.skeleton_mask
                if init == "paper" or (path_bn and idx > 0):
                    new_layer.weight.mul_(1 - m).add_(m)
            if bare:
                new = new_layer
            else:
                norm = unit.norm
                if path_bn and idx > 0:
                    norm = _path_norm(norm, lam)
                new = PathUnit(new_layer, norm)
                new.train(unit.training)
            _replace(model, unit, new)
    model.path_space = {"path_bn": path_bn, "lam": lam, "init": init, "blocks": [s.name for s in specs]}
    return model


def is_path_space(model: nn.Module) -> bool:
    """Whether ``model`` holds path-space layers (after :func:`to_path_space`)."""
    from ..nn.path_bn import PathLayerMixin

    return any(isinstance(m, PathLayerMixin) for m in model.modules())


def path_blocks(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """``[(block_name, [path layers in order])]`` of a converted model, found from its modules."""
    from ..nn.path_bn import PathLayerMixin

    blocks: dict[str, list[nn.Module]] = {}
    for m in model.modules():
        if isinstance(m, PathLayerMixin):
            blocks.setdefault(m.block, []).append(m)
    out = []
    for name, layers in blocks.items():
        layers.sort(key=lambda m: m.layer_index)
        roles = [m.role for m in layers]
        if roles[0] != "first" or roles[-1] != "last" or any(r != "mid" for r in roles[1:-1]):
            raise ValueError(f"block {name!r}: path layers have roles {roles}; expected first, mid..., last")
        out.append((name, layers))
    return out


def param_groups(model: nn.Module, **group_options: Any) -> list[dict[str, Any]]:
    """Parameter groups for :class:`bnlab.optim.GSGD`: one group per block (``params`` = block weights
    in order, ``roles``, ``block``) and one group with every other trainable parameter (stem,
    shortcuts, BN gamma/beta, classifier bias...), updated by plain SGD. ``group_options`` (e.g.
    ``lr``) are copied into every group."""
    blocks = path_blocks(model)
    if not blocks:
        raise ValueError(f"param_groups: {type(model).__name__} has no path-space layers; convert it with "
                         "bnlab.path.to_path_space(model) or build it with norm='pbn'")
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, layers in blocks:
        params = [m.weight for m in layers]
        if not all(p.requires_grad for p in params):
            raise ValueError(f"param_groups: block {name!r} has frozen weights; G-SGD needs every "
                             "block weight")
        seen.update(id(p) for p in params)
        groups.append({"params": params, "roles": [m.role for m in layers], "block": name, **group_options})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if rest:
        groups.append({"params": rest, "roles": None, "block": "", **group_options})
    return groups


@torch.no_grad()
def path_values(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Basis-path values of every block, for analysis (pbn.md Sec. 1.1).

    Returns ``{block: {"skeleton": (H,) values of the skeleton paths, "layers": [v^l]}}`` where
    ``v^l`` has the weight's shape and holds, at each non-skeleton entry, the product of that weight
    with the skeleton weights before it (on its input channel) and after it (on its output channel);
    zeros at skeleton entries. BN gamma is not included (values of the bare weights).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, layers in path_blocks(model):
        ws = [m.weight.detach() for m in layers]
        ms = [m.skeleton_mask for m in layers]
        # per-layer value of the skeleton edge, indexed by input channel (layers >= 2) / output (layer 1)
        v = (ws[0] * ms[0]).sum((1, *range(2, ws[0].dim())))
        s = [(w * m).sum((0, *range(2, w.dim()))) for w, m in zip(ws[1:], ms[1:])]
        n = len(ws)
        ones = torch.ones_like(v)
        prefix = [v]                                    # prefix[l-1]: product up to the input of layer l+1
        for l in range(1, n - 1):
            prefix.append(prefix[-1] * s[l - 1])
        suffix = [ones] * n                             # suffix[l]: product after layer l, by its output
        acc = ones
        for l in range(n - 2, -1, -1):
            acc = acc * s[l]
            suffix[l] = acc
        vals: list[Tensor] = []
        for l, (w, m) in enumerate(zip(ws, ms)):
            shape = [1] * w.dim()
            if l == 0:
                row = suffix[0].view(-1, *shape[1:])
                vals.append(w * (1 - m) * row)
                continue
            col = prefix[l - 1].view(1, -1, *shape[2:])
            row_vec = suffix[l] if l < n - 1 else torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
            vals.append(w * (1 - m) * col * row_vec.view(-1, *shape[1:]))
        out[name] = {"skeleton": prefix[-1] * s[-1] if n > 1 else v, "layers": vals}
    return out
