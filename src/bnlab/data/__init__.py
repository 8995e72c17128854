"""Datasets: ``load(name, root=None, download=False, ...)`` and the device-resident loader.

Names: ``digits`` (embedded, scikit-learn), ``mnist``, ``fashion_mnist`` (IDX ``.gz`` or ``.npz``),
``cifar10``, ``cifar100`` (official python tarball / batch folder, or ``.npz``), ``imagefolder``
(ImageNet-style trees, Pillow decoding).
"""

from __future__ import annotations

import importlib
from typing import Any

from .dataset import ImageDataset, from_numpy, stratified_subset
from .loader import DeviceLoader, augment_batch, normalize_batch

__all__ = ["load", "dataset_names", "ImageDataset", "DeviceLoader", "augment_batch", "normalize_batch",
           "from_numpy", "stratified_subset"]

# name -> (module, function); modules are imported on first use
_LOADERS: dict[str, tuple[str, str]] = {
    "digits": ("bnlab.data.digits", "load_digits"),
    "mnist": ("bnlab.data.mnist", "load_mnist"),
    "fashion_mnist": ("bnlab.data.mnist", "load_fashion_mnist"),
    "cifar10": ("bnlab.data.cifar", "load_cifar10"),
    "cifar100": ("bnlab.data.cifar", "load_cifar100"),
    "imagefolder": ("bnlab.data.imagefolder", "load_imagefolder"),
}


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def load(name: str, root: str | None = None, download: bool = False, train_subset: int | None = None,
         test_subset: int | None = None, seed: int = 0, **kwargs: Any) -> ImageDataset:
    """Load dataset ``name`` from ``root`` (a folder or file; see each loader), optionally
    downloading the official archive, and optionally take class-stratified subsets."""
    if not isinstance(name, str) or name.lower() not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(dataset_names())}")
    module, func = _LOADERS[name.lower()]
    try:
        ds = getattr(importlib.import_module(module), func)(root=root, download=download, **kwargs)
    except TypeError as e:  # an unknown data option is a user mistake, not a bug
        if "unexpected keyword" in str(e):
            raise ValueError(f"dataset {name!r}: {e}") from None
        raise
    if train_subset is not None or test_subset is not None:
        ds = ds.subset(train_subset, test_subset, seed=seed)
    return ds
