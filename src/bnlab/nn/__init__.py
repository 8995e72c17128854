"""Normalisation layers: the statistics core, norm-activation modules, factories by name."""

from . import convert  # noqa: E402,I001  (installs the SyncBatchNorm.convert_sync_batchnorm guard)
from .activations import activation_names, make_activation
from .factory import BNFamily, NoNormFamily, NormFamily, get_norm, norm_names, register_norm
from .norm_act import Affine, BatchNormAct, BatchNormAct1d, BatchNormAct2d
from .stats import BatchStats, batch_moments

__all__ = [
    "Affine", "BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchStats", "BNFamily",
    "NoNormFamily", "NormFamily", "activation_names", "batch_moments", "get_norm", "make_activation",
    "norm_names", "register_norm", "convert",
]


def __getattr__(name: str):
    # Method layers are imported lazily so that a half-built method never breaks the core.
    if name == "CompleteBatchNorm":
        from .cbn import CompleteBatchNorm

        return CompleteBatchNorm
    if name in ("PathBatchNorm", "PathConv2d", "PathLinear"):
        from . import path_bn

        return getattr(path_bn, name)
    raise AttributeError(f"module 'bnlab.nn' has no attribute {name!r}")
