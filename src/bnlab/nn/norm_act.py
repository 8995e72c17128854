"""Norm-activation modules.

``BatchNormAct1d/2d`` is the reference ``conv -> BN -> act`` unit: its BN part *is*
``torch.nn.BatchNorm*`` (same constructor, buffers, state-dict keys, kernels), followed by an
activation. ``CompleteBatchNorm`` (Peng et al., TPAMI 2024) lives in :mod:`bnlab.nn.cbn` and is
re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .activations import make_activation
from .stats import BatchStats, channel_affine

__all__ = ["BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "Affine"]


class BatchNormAct(BatchStats):
    """``act(BatchNorm(x))`` with the exact semantics of ``torch.nn.BatchNorm*``.

    Shapes: (N, C) or (N, C, L) for ``dims=1``; (N, C, H, W) for ``dims=2``. ``act`` is a name
    (see :func:`bnlab.nn.activations.make_activation`), a module, or ``None`` for no activation.
    State-dict keys of the BN part are those of ``nn.BatchNorm*``; the activation has no state.
    """

    def __init__(
        self,
        num_features: int,
        act: str | nn.Module | None = "relu",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dims: int | None = 2,
        sync_stats: bool = False,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, dims=dims,
            sync_stats=sync_stats, process_group=process_group, device=device, dtype=dtype,
        )
        self.act = make_activation(act)

    def forward(self, x: Tensor) -> Tensor:
        out = self.standardize(x)
        if type(self.act) is nn.ReLU:
            # The BN output is a fresh tensor its backward does not need: rectify it in place
            # (saves one activation-sized allocation and pass; same values and gradients).
            return torch.relu_(out)
        return self.act(out)


class BatchNormAct1d(BatchNormAct):
    """``BatchNormAct`` for (N, C) or (N, C, L) inputs (like ``nn.BatchNorm1d``)."""

    def __init__(self, num_features: int, act: str | nn.Module | None = "relu", **kwargs) -> None:
        kwargs.setdefault("dims", 1)
        super().__init__(num_features, act, **kwargs)


class BatchNormAct2d(BatchNormAct):
    """``BatchNormAct`` for (N, C, H, W) inputs (like ``nn.BatchNorm2d``)."""

    def __init__(self, num_features: int, act: str | nn.Module | None = "relu", **kwargs) -> None:
        kwargs.setdefault("dims", 2)
        super().__init__(num_features, act, **kwargs)


class Affine(nn.Module):
    """Per-channel ``gamma * x + beta`` (no statistics). Input (N, C, *) -> same shape."""

    def __init__(self, num_features: int, weight_init: float = 1.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.full((num_features,), float(weight_init)))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return channel_affine(x, self.weight, self.bias)  # one fused pass (see channel_affine)

    def extra_repr(self) -> str:
        return f"{self.num_features}"
