"""Model zoo: ``build(name, norm=, act=, num_classes=, in_channels=, width=)``.

Models: ``mlp``; CIFAR ResNets ``resnet20/32/44/56/110`` (He et al. 2016, option-A shortcut by
default, ``shortcut="B"`` for 1x1-conv projections); CIFAR-stem ``resnet18/34/50`` and
``plainnet18/34`` (Path-BN paper's definitions, see ``docs/methods/pbn.md``); ``vgg11/16``
(CIFAR variant). Norms come from :func:`bnlab.nn.factory.get_norm`; ``norm="pbn"`` builds the
``"bn"`` model and converts it with :func:`bnlab.path.to_path_space`.
"""

from __future__ import annotations

from .build import build, model_names
from .mlp import MLP
from .plainnet import PlainNet
from .resnet import BasicBlock, Bottleneck, ResNet
from .units import ConvUnit
from .vgg import VGG

__all__ = ["build", "model_names", "MLP", "PlainNet", "ResNet", "BasicBlock", "Bottleneck", "ConvUnit", "VGG"]
