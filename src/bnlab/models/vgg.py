"""VGG-11/16, CIFAR variant: 3x3 convs with ``norm_act``, 2x2 max-pools, one linear classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.factory import NormFamily
from .units import ConvUnit, conv3x3, init_weights

__all__ = ["VGG", "VGG_CFGS"]

VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """``self.features``: Sequential of :class:`ConvUnit` and MaxPool2d (ceil mode, so 28x28 and
    8x8 inputs work); global average pooling; ``self.fc``. The post-norm of a CBN unit sits before
    the pool (cbn.md Sec. 5.2)."""

    def __init__(
        self, cfg: list[int | str], width: float, num_classes: int, in_channels: int, family: NormFamily
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                w = max(1, int(round(int(v) * width)))
                layers.append(ConvUnit(conv3x3(cin, w, 1, family.conv_bias), family.norm_act(w)))
                cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"VGG expects input (N, {self.in_channels}, H, W), got {list(x.shape)}")
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d) and min(x.shape[-2:]) < 2:
                continue  # small inputs (e.g. 8x8 digits): skip pools that would empty the map
            x = layer(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
