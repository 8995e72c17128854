"""``ImageDataset``: a whole classification dataset in memory as uint8 tensors, with metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageDataset", "from_numpy", "reject_unknown_options", "stratified_subset"]


@dataclass
class ImageDataset:
    """Train/test splits as tensors: ``x_*`` uint8 (N, C, H, W), ``y_*`` int64 (N,).

    ``mean``/``std`` are per-channel statistics of the *training* split on the [0, 1] scale.
    ``crop_padding`` and ``flip`` are the standard augmentation of this dataset (CIFAR: 4, True).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    crop_padding: int = 4
    flip: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name}: x_{split} must be uint8 (N, C, H, W), got {x.dtype} {list(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: y_{split} must be int64 ({x.shape[0]},), got {y.dtype} {list(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise ValueError(
                    f"{self.name}: y_{split} has labels in [{int(y.min())}, {int(y.max())}], "
                    f"expected [0, {len(self.classes) - 1}]"
                )
        if self.x_train.shape[0] == 0:
            raise ValueError(f"{self.name}: the training split is empty")
        if not self.mean:
            self.mean, self.std = channel_stats(self.x_train)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def input_size(self) -> int:
        return int(self.x_train.shape[-1])

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> ImageDataset:
        """A class-stratified random subset (seeded) of each split; ``None`` keeps a split whole.
        Mean/std are recomputed from the training subset."""
        xtr, ytr = self.x_train, self.y_train
        xte, yte = self.x_test, self.y_test
        if train is not None:
            idx = stratified_subset(ytr, train, seed)
            xtr, ytr = xtr[idx], ytr[idx]
        if test is not None:
            idx = stratified_subset(yte, test, seed + 1)
            xte, yte = xte[idx], yte[idx]
        return ImageDataset(self.name, xtr, ytr, xte, yte, self.classes, crop_padding=self.crop_padding,
                            flip=self.flip, source=self.source)

    def describe(self) -> str:
        return (f"{self.name}: train {tuple(self.x_train.shape)}, test {tuple(self.x_test.shape)}, "
                f"{self.num_classes} classes")


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W) on the [0, 1] scale (float64 sums)."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    n = flat.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    ss = torch.zeros(c, dtype=torch.float64)
    for chunk in torch.split(flat, 1 << 22, dim=1):  # bounded memory on big datasets
        f = chunk.double()
        s += f.sum(1)
        ss += (f * f).sum(1)
    mean = s / n
    std = (ss / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def stratified_subset(y: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices of ``n`` samples with classes in proportion to ``y`` (seeded, sorted)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"subset size must be an int >= 1, got {n!r}")
    n = int(n)
    if n >= len(y):
        return torch.arange(len(y))
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    classes, counts = np.unique(yn, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    for i in np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]:
        quota[i] += 1
    picks = [rng.choice(np.flatnonzero(yn == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return torch.from_numpy(np.sort(np.concatenate(picks)))


def from_numpy(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               classes: list[str], **kwargs) -> ImageDataset:
    """Build from numpy arrays: images (N, H, W) or (N, H, W, C) uint8 (channels last, as in the
    official files and ``shared/data``) or already (N, C, H, W) with ``channels_first=True``."""
    channels_first = kwargs.pop("channels_first", False)

    def to_nchw(x: np.ndarray, split: str) -> Tensor:
        x = np.asarray(x)
        if x.dtype != np.uint8:
            raise ValueError(f"{name}: x_{split} must be uint8 pixels, got dtype {x.dtype}")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and not channels_first:
            x = x.transpose(0, 3, 1, 2)
        elif x.ndim != 4:
            raise ValueError(f"{name}: x_{split} must have 3 or 4 dims, got shape {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x))

    def to_labels(y: np.ndarray, split: str) -> Tensor:
        y = np.asarray(y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}: y_{split} must be a 1-D integer array, got {y.dtype} {y.shape}")
        return torch.from_numpy(y.astype(np.int64))

    xtr, xte = to_nchw(x_train, "train"), to_nchw(x_test, "test")
    ytr, yte = to_labels(y_train, "train"), to_labels(y_test, "test")
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if len(x) != len(y):
            raise ValueError(f"{name}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
    return ImageDataset(name, xtr, ytr, xte, yte, list(classes), **kwargs)


def reject_unknown_options(name: str, kwargs: dict, accepted: str) -> None:
    """Raise ``TypeError`` naming loader options ``name`` does not take (``bnlab.data.load`` turns it
    into a ``ValueError`` for users)."""
    if kwargs:
        raise TypeError(f"{name}: unexpected keyword argument(s) {sorted(kwargs)}; accepted: {accepted}")
