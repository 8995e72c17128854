"""The building unit shared by every model: ``weight layer -> norm unit``."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvUnit", "conv3x3", "conv1x1", "init_weights"]


class ConvUnit(nn.Module):
    """``norm(conv(x))``: ``conv`` is a Conv2d or Linear, ``norm`` a unit from a NormFamily.

    Keeping the pair in one module with fixed attribute names (``conv``, ``norm``) is what lets
    :func:`bnlab.path.to_path_space` and :func:`bnlab.nn.convert` find and rewrite layers.
    """

    def __init__(self, conv: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=bias)


def init_weights(model: nn.Module) -> None:
    """He (fan_out) init for convs, PyTorch default for linear layers; norms at gamma=1, beta=0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
