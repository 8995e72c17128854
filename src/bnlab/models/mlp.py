"""Fully connected network: ``Linear -> norm_act`` x depth, then a linear classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn.factory import NormFamily
from .units import ConvUnit

__all__ = ["MLP"]


class MLP(nn.Module):
    """Input (N, *) is flattened to (N, in_features). ``hidden`` lists the hidden widths.

    ``self.layers[i]`` is a :class:`ConvUnit` (``conv`` = Linear, ``norm`` = norm_act unit);
    ``self.fc`` is the classifier.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, family: NormFamily) -> None:
        super().__init__()
        self.in_features = in_features
        widths = [in_features, *hidden]
        self.layers = nn.ModuleList(
            ConvUnit(nn.Linear(a, b, bias=family.conv_bias), family.norm_act(b, dims=1))
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features, got input of shape {list(x.shape)}")
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)
