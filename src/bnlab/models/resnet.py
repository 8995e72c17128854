"""ResNets: CIFAR ResNet-20..110 (He et al. 2016, Sec. 4.2) and CIFAR-stem ResNet-18/34/50.

Residual blocks follow the v1 (post-activation) layout
``out = post_add(norm(conv2(norm_act(conv1(x)))) + shortcut(x))``; the three norm units come from a
:class:`~bnlab.nn.factory.NormFamily`, so CBN can reshape the block (see cbn.md Sec. 5.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.factory import NormFamily
from .units import ConvUnit, conv1x1, conv3x3, init_weights

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ShortcutA"]


class ShortcutA(nn.Module):
    """Option-A shortcut: spatial subsampling and zero-padding of the extra channels (no params)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        pad = self.cout - self.cin
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2)) if pad else x


def _shortcut(cin: int, cout: int, stride: int, kind: str, family: NormFamily) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return ShortcutA(cin, cout, stride)
    return ConvUnit(conv1x1(cin, cout, stride, bias=family.conv_bias), family.norm(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs. Attributes: ``unit1`` (conv1 + norm_act), ``unit2`` (conv2 + norm),
    ``shortcut``, ``post`` (after the addition)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, family: NormFamily, shortcut: str = "B") -> None:
        super().__init__()
        cout = width * self.expansion
        self.unit1 = ConvUnit(conv3x3(cin, width, stride, family.conv_bias), family.norm_act(width))
        self.unit2 = ConvUnit(conv3x3(width, cout, 1, family.conv_bias), family.norm(cout))
        self.shortcut = _shortcut(cin, cout, stride, shortcut, family)
        self.post = family.post_add(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.unit2(self.unit1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4). Attributes ``unit1..unit3``, ``shortcut``, ``post``."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, family: NormFamily, shortcut: str = "B") -> None:
        super().__init__()
        cout = width * self.expansion
        self.unit1 = ConvUnit(conv1x1(cin, width, 1, family.conv_bias), family.norm_act(width))
        self.unit2 = ConvUnit(conv3x3(width, width, stride, family.conv_bias), family.norm_act(width))
        self.unit3 = ConvUnit(conv1x1(width, cout, 1, family.conv_bias), family.norm(cout))
        self.shortcut = _shortcut(cin, cout, stride, shortcut, family)
        self.post = family.post_add(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.post(self.unit3(self.unit2(self.unit1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem ``conv3x3 + norm_act``, stages of residual blocks (``self.stages``), global average
    pooling, linear classifier (``self.fc``). Input (N, in_channels, H, W) -> logits (N, classes)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        widths: list[int],
        num_classes: int,
        in_channels: int,
        family: NormFamily,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.in_channels = in_channels
        self.stem = ConvUnit(conv3x3(in_channels, widths[0], 1, family.conv_bias), family.norm_act(widths[0]))
        cin = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, w, stride, family, shortcut))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input (N, {self.in_channels}, H, W), got {list(x.shape)}"
            )
        return torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
