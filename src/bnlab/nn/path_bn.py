"""Path-reparameterised weight layers and Path-BN (Luo et al., UAI 2021, Sec. 4, eqs 8-10).

For a layer ``l >= 2`` of a block with skeleton mask ``M`` (kernel-centre 0/1, see
:mod:`bnlab.path.skeleton`) Path-BN computes (pbn.md Sec. 3.2)::

    z = act( BN(conv(z_prev, U * (1 - M))) + lam * conv(z_prev, M) )

i.e. BN only on the trainable (off-skeleton) partial sum; the skeleton term is added back
un-normalised. ``conv(z_prev, M)`` is never run as a convolution: it is the identity (stride 1, square),
a strided slice ``z_prev[..., ::s, ::s]``, a channel gather (``first`` rule) or a channel scatter-add
(``last`` rule). Running statistics track the partial sum (pbn.md Sec. 3.4).

* :class:`PathConv2d` / :class:`PathLinear`: ``nn.Conv2d`` / ``nn.Linear`` carrying a ``role`` and
  the ``skeleton_mask`` buffer; ``offdiag(x)`` and ``skeleton(x)`` give the two terms. Their plain
  ``forward`` uses the full weight (the "G-SGD + BN" network) unless ``path_forward=True``
  (then ``offdiag(x) + skeleton(x)``: same function when the constants are 1, zero gradient on them).
* :class:`PathBatchNorm`: ``act(BN(o_tilde) + lam * skip)``, the BN being
  :class:`~bnlab.nn.stats.BatchStats` (exact BN semantics, cross-process sync).
* :class:`PathUnit`: a :class:`~bnlab.models.units.ConvUnit` that routes the two terms when its norm
  is a ``PathBatchNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.units import ConvUnit
from ..path.skeleton import ROLES, skeleton_mask, skeleton_pairs
from .activations import make_activation
from .stats import BatchStats

__all__ = ["PathBatchNorm", "PathConv2d", "PathLinear", "PathUnit", "PathLayerMixin"]


class PathLayerMixin:
    """Shared skeleton machinery of :class:`PathConv2d` and :class:`PathLinear`."""

    weight: Tensor
    role: str
    path_forward: bool

    def _init_path(self, role: str, path_forward: bool, block: str = "", index: int = 0) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.path_forward = bool(path_forward)
        self.block = block
        self.layer_index = index
        w = self.weight
        mask = skeleton_mask(w.shape, role, w.device, w.dtype)
        self.register_buffer("skeleton_mask", mask, persistent=False)
        o_idx, i_idx = skeleton_pairs(w.shape[0], w.shape[1], role, w.device)
        self.register_buffer("skel_out", o_idx, persistent=False)
        self.register_buffer("skel_in", i_idx, persistent=False)
        c_out, c_in = w.shape[0], w.shape[1]
        identity = c_out == c_in and bool((o_idx == i_idx).all()) and o_idx.numel() == c_out
        # "copy": skip channel o = input channel o; "gather": out o <- in i_idx[o];
        # "scatter": out o <- sum of inputs mapped to o (index_add).
        by_output = o_idx.numel() == c_out and bool((o_idx == torch.arange(c_out, device=w.device)).all())
        self._channel_map = "copy" if identity else ("gather" if by_output else "scatter")

    def masked_weight(self) -> Tensor:
        """``U * (1 - M)``: the trainable (off-skeleton) part of the weight."""
        return self.weight * (1 - self.skeleton_mask)

    def _spatial_skip(self, x: Tensor) -> Tensor:
        return x

    def skeleton(self, x: Tensor) -> Tensor:
        """``conv(x, M)`` without a convolution. (N, C_in, *) -> (N, C_out, *out_spatial)."""
        xs = self._spatial_skip(x)
        c_out = self.weight.shape[0]
        if self._channel_map == "copy":
            return xs
        if self._channel_map == "gather":
            return xs.index_select(1, self.skel_in)
        out = xs.new_zeros((xs.shape[0], c_out, *xs.shape[2:]))
        return out.index_add(1, self.skel_out, xs.index_select(1, self.skel_in))

    def path_extra_repr(self) -> str:
        return f"role={self.role!r}" + (", path_forward=True" if self.path_forward else "")


class PathConv2d(PathLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` in path coordinates. Input (N, C_in, H, W) -> (N, C_out, H', W').

    ``forward``: ``conv(x, U)`` (full weight), or ``offdiag(x) + skeleton(x)`` with ``path_forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = False, role: str = "mid", path_forward: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        self._init_path(role, path_forward)
        pads = self.padding if isinstance(self.padding, tuple) else None
        self._slice_ok = pads is not None and all(
            p == k // 2 for p, k in zip(pads, self.kernel_size)) and self.dilation == (1, 1)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, role: str, path_forward: bool = False) -> PathConv2d:
        """A PathConv2d with ``conv``'s hyper-parameters and a copy of its weight (and bias)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.bias is not None, role, path_forward, conv.weight.device, conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.train(conv.training)
        return new

    def offdiag(self, x: Tensor) -> Tensor:
        """``conv(x, U * (1 - M))`` (no bias). (N, C_in, H, W) -> (N, C_out, H', W')."""
        return self._conv_forward(x, self.masked_weight(), None)

    def _spatial_skip(self, x: Tensor) -> Tensor:
        if self._slice_ok:
            sh, sw = self.stride
            return x if (sh, sw) == (1, 1) else x[:, :, ::sh, ::sw]
        # general geometry: a depthwise conv with the centre tap (still no C_out x C_in conv)
        c = x.shape[1]
        kh, kw = self.kernel_size
        k = x.new_zeros((c, 1, kh, kw))
        k[:, :, kh // 2, kw // 2] = 1
        return F.conv2d(x, k, None, self.stride, self.padding, self.dilation, groups=c)

    def forward(self, x: Tensor) -> Tensor:
        if self.path_forward:
            out = self.offdiag(x) + self.skeleton(x)
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.path_extra_repr()


class PathLinear(PathLayerMixin, nn.Linear):
    """``nn.Linear`` in path coordinates. Input (N, in_features) -> (N, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, role: str = "mid",
                 path_forward: bool = False, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_path(role, path_forward)

    @classmethod
    def from_linear(cls, lin: nn.Linear, role: str, path_forward: bool = False) -> PathLinear:
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, role, path_forward,
                  lin.weight.device, lin.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        new.train(lin.training)
        return new

    def offdiag(self, x: Tensor) -> Tensor:
        """``x @ (U * (1 - M)).T`` (no bias)."""
        return F.linear(x, self.masked_weight())

    def forward(self, x: Tensor) -> Tensor:
        if self.path_forward:
            out = self.offdiag(x) + self.skeleton(x)
            return out if self.bias is None else out + self.bias
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.path_extra_repr()


class PathBatchNorm(BatchStats):
    """Path-BN (eqs 8-10): ``act(BN(o_tilde) + lam * skip)``.

    ``forward(o_tilde, skip)``: both (N, C, *) of the same shape -> (N, C, *). ``o_tilde`` is the
    off-skeleton partial sum, ``skip`` the skeleton term. BN parameters, buffers and state-dict keys
    are those of ``torch.nn.BatchNorm*`` and describe ``o_tilde`` (running stats of the partial sum).
    ``act=None`` for the last layer of a residual branch (the block adds the shortcut, then ReLU).
    """

    def __init__(self, num_features: int, lam: float = 1.0, act: str | nn.Module | None = "relu",
                 eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dims: int | None = 2, sync_stats: bool = False,
                 process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dims=dims,
                         sync_stats=sync_stats, process_group=process_group, device=device, dtype=dtype)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise TypeError(f"lam must be a float, got {lam!r}")
        self.lam = float(lam)
        self.act = make_activation(act)

    def forward(self, o_tilde: Tensor, skip: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if skip is None:
            raise TypeError("PathBatchNorm.forward needs (o_tilde, skip): the off-skeleton partial sum and "
                            "the skeleton term (use PathUnit to route them)")
        if skip.shape != o_tilde.shape:
            raise ValueError(f"PathBatchNorm: skip shape {list(skip.shape)} must equal o_tilde shape "
                             f"{list(o_tilde.shape)}")
        out = self.standardize(o_tilde)
        if self.lam != 0.0:
            out = out + self.lam * skip
        return self.act(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lam={self.lam}"


class PathUnit(ConvUnit):
    """``ConvUnit`` in path space: ``norm(conv.offdiag(x), conv.skeleton(x))`` when ``norm`` is a
    :class:`PathBatchNorm`, else ``norm(conv(x))`` (full weight, conventional BN)."""

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, PathBatchNorm):
            return self.norm(self.conv.offdiag(x), self.conv.skeleton(x))
        return self.norm(self.conv(x))
