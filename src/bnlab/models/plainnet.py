"""PlainNet-18/34 (Path-BN paper, pbn.md Sec. 5.2): ResNet-18/34 without shortcuts.

Stem ``conv3x3 + norm_act``; four stages (``self.stages``, each a Sequential of
:class:`ConvUnit` = ``conv3x3 + norm_act``), widths 64/128/256/512, the first conv of stages 2-4 has
stride 2; global average pooling; linear classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.factory import NormFamily
from .units import ConvUnit, conv3x3, init_weights

__all__ = ["PlainNet"]


class PlainNet(nn.Module):
    def __init__(
        self, layers: list[int], widths: list[int], num_classes: int, in_channels: int, family: NormFamily
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = ConvUnit(conv3x3(in_channels, widths[0], 1, family.conv_bias), family.norm_act(widths[0]))
        cin = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            units = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                units.append(ConvUnit(conv3x3(cin, w, stride, family.conv_bias), family.norm_act(w)))
                cin = w
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"PlainNet expects input (N, {self.in_channels}, H, W), got {list(x.shape)}")
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
