"""ImageNet-style folder trees (``train/<class>/*.JPEG``, ``val/<class>/...``), decoded with Pillow in
``torch.utils.data.DataLoader`` worker processes.

Unlike the other datasets this cannot be an in-memory :class:`~bnlab.data.dataset.ImageDataset`
(ImageNet is ~150 GB of JPEG), so :func:`load_imagefolder` returns an :class:`ImageFolderData`
with ``classes`` and ``train_loader(...)`` / ``test_loader(...)`` that yield normalised float batches
``(B, 3, S, S)`` and int64 labels, like :class:`~bnlab.data.loader.DeviceLoader`.

Transforms (the standard ImageNet recipe, written here without torchvision):

* train: RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3)) with torchvision's sampling rule
  (10 tries, then a centred crop with the ratio clamped), bilinear resize, horizontal flip p=0.5;
* test: Resize(R) of the shorter side (bilinear), CenterCrop(S); defaults S=224, R=256.

Randomness is a pure function of ``(seed, epoch, sample index)``: each sample gets its own
``random.Random``, so batches are identical for any number of workers and reproducible on resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .loader import normalize_batch

__all__ = [
    "load_imagefolder",
    "ImageFolderData",
    "FolderDataset",
    "FolderLoader",
    "scan_split",
    "random_resized_crop_params",
    "resize_center_crop_box",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """Samples ``(path, label)`` of ``folder/<class>/**/<image>`` (sorted) and the class list.

    ``classes=None`` takes the sorted sub-folder names; otherwise every sub-folder must be one of
    ``classes`` (so val labels use the train indices). Files whose extension is not an image
    extension are skipped.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"imagefolder: {folder} is not a folder")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"imagefolder: {folder} has class folders {unknown[:5]} absent from the train split"
            )
    if not classes:
        raise ValueError(f"imagefolder: {folder} has no class sub-folders, expected {folder}/<class>/<image>")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for c in found:
        seen: set[str] = set()  # real paths walked: a symlink cycle is visited once, not ~40 times
        for dirpath, dirnames, filenames in os.walk(folder / c, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), index[c]))
    if not samples:
        raise ValueError(f"imagefolder: no images ({', '.join(IMG_EXTENSIONS)}) under {folder}")
    return samples, classes


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: ``(top, left, h, w)`` of a crop covering a
    fraction in ``scale`` of the area with aspect ratio (w/h) log-uniform in ``ratio``; after 10
    failed tries, a centred crop of the whole image with its ratio clamped to ``ratio``."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_center_crop_box(width: int, height: int, resize: int, crop: int) -> tuple[tuple[int, int], tuple]:
    """Resize(resize) of the shorter side then CenterCrop(crop): the resized ``(w, h)`` and the crop
    box ``(left, top, right, bottom)`` in resized pixels (torchvision's rounding)."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    return (new_w, new_h), (left, top, left + crop, top + crop)


class FolderDataset(torch.utils.data.Dataset):
    """Decode ``samples[i]`` with Pillow and transform it; items are ``(uint8 (3, S, S), label)``.

    Index with ``i`` or ``(i, epoch)``; the random draws come from ``random.Random`` seeded by
    ``(seed, epoch, i)``.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        train: bool,
        image_size: int,
        resize_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        flip: bool,
        seed: int = 0,
    ) -> None:
        self.samples, self.train, self.image_size, self.resize_size = samples, train, image_size, resize_size
        self.scale, self.ratio, self.flip, self.seed = scale, ratio, flip, seed

    def __len__(self) -> int:
        return len(self.samples)

    def transform(self, img, rng: random.Random | None) -> np.ndarray:
        """PIL RGB image -> uint8 (S, S, 3) array (train: random crop + flip from ``rng``)."""
        from PIL import Image

        s = self.image_size
        if self.train:
            top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, rng)
            out = img.crop((left, top, left + w, top + h)).resize((s, s), Image.BILINEAR)  # as torchvision
            arr = np.asarray(out)
            if self.flip and rng.random() < 0.5:
                arr = arr[:, ::-1]
            return arr
        size, box = resize_center_crop_box(img.width, img.height, self.resize_size, s)
        return np.asarray(img.resize(size, Image.BILINEAR).crop(box))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        from PIL import Image

        i, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise ValueError(f"imagefolder: cannot decode {path} ({e})") from None
        rng = random.Random(f"{self.seed}/{epoch}/{i}") if self.train else None
        arr = self.transform(img, rng)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label


class FolderLoader:
    """Batches ``(float (B, 3, S, S) normalised, int64 (B,))`` from a :class:`FolderDataset`, decoded
    by ``num_workers`` DataLoader processes. Sampling follows ``DeviceLoader``: epoch ``e`` uses
    the permutation of ``torch.Generator`` seeded ``seed * 1_000_003 + e``; rank ``r`` of ``world``
    takes the ``r``-th of ``world`` equal contiguous shards with ``drop_last`` (training), else
    every ``world``-th sample from ``r`` (evaluation covers each sample exactly once)."""

    def __init__(
        self,
        dataset: FolderDataset,
        batch_size: int,
        *,
        mean,
        std,
        shuffle: bool,
        seed: int = 0,
        num_workers: int = 4,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        max_batches: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.num_workers, self.rank, self.world_size, self.drop_last = (
            num_workers,
            rank,
            world_size,
            drop_last,
        )
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.max_batches = max_batches
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> Tensor:
        """The sample indices this rank visits in the current epoch, in order (``DeviceLoader``'s
        rule: equal contiguous shards when ``drop_last``, else strided shards covering every sample)."""
        n = len(self.dataset)
        if self.shuffle:
            perm = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            )
        else:
            perm = torch.arange(n)
        if self.world_size == 1:
            return perm
        if self.drop_last:
            per = n // self.world_size
            return perm[self.rank * per : (self.rank + 1) * per]
        return perm[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.indices())
        b = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return min(b, self.max_batches) if self.max_batches is not None else b

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of the current epoch, without decoding the
        skipped ones (a batch is a pure function of (seed, epoch, its sample indices))."""
        n_batches = len(self)
        keys = [(int(i), self.epoch) for i in self.indices()[start_batch * self.batch_size:
                                                              n_batches * self.batch_size]]
        dl = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=keys,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
        )
        for b, (x, y) in enumerate(dl, start_batch):
            if b >= n_batches:
                break
            x = normalize_batch(x.to(self.device, non_blocking=True), self.mean, self.std, self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)


@dataclass
class ImageFolderData:
    """An ImageNet-style tree: ``classes``, sample lists and loader factories (not in memory)."""

    name: str
    root: Path
    classes: list[str]
    train_samples: list[tuple[str, int]]
    test_samples: list[tuple[str, int]]
    image_size: int = 224
    resize_size: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def input_size(self) -> int:
        return self.image_size

    def dataset(self, train: bool, seed: int = 0) -> FolderDataset:
        return FolderDataset(
            self.train_samples if train else self.test_samples,
            train,
            self.image_size,
            self.resize_size,
            self.scale,
            self.ratio,
            self.flip,
            seed,
        )

    def train_loader(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        num_workers: int = 4,
        shuffle: bool = True,
        drop_last: bool = True,
        **kwargs,
    ) -> FolderLoader:
        """Random-resized-crop + flip batches; ``kwargs``: rank, world_size, device, dtype,
        channels_last, max_batches (see :class:`FolderLoader`)."""
        return FolderLoader(
            self.dataset(True, seed),
            batch_size,
            mean=self.mean,
            std=self.std,
            shuffle=shuffle,
            seed=seed,
            num_workers=num_workers,
            drop_last=drop_last,
            **kwargs,
        )

    def test_loader(self, batch_size: int, *, num_workers: int = 4, **kwargs) -> FolderLoader:
        """Resize + centre-crop batches in file order (no shuffling)."""
        return FolderLoader(
            self.dataset(False),
            batch_size,
            mean=self.mean,
            std=self.std,
            shuffle=False,
            num_workers=num_workers,
            **kwargs,
        )

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> ImageFolderData:
        """Class-stratified seeded subsets of the sample lists (``None`` keeps a split whole), with
        :func:`~bnlab.data.dataset.stratified_subset`'s rule, as ``ImageDataset.subset`` (so
        ``load("imagefolder", train_subset=..., test_subset=...)`` works). Nothing is decoded."""
        from .dataset import stratified_subset

        def pick(samples: list[tuple[str, int]], n: int | None, s: int) -> list[tuple[str, int]]:
            if n is None:
                return samples
            idx = stratified_subset(torch.tensor([lab for _, lab in samples], dtype=torch.int64), n, s)
            return [samples[i] for i in idx.tolist()]

        return dataclasses.replace(self, train_samples=pick(self.train_samples, train, seed),
                                   test_samples=pick(self.test_samples, test, seed + 1))

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.train_samples)} train / {len(self.test_samples)} test images "
            f"in {self.root}, {self.num_classes} classes, crops {self.image_size}"
        )


def load_imagefolder(
    root: str | os.PathLike | None = None,
    download: bool = False,
    *,
    train_dir: str = "train",
    test_dir: str | None = None,
    image_size: int = 224,
    resize_size: int = 256,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    name: str = "imagefolder",
) -> ImageFolderData:
    """Scan ``root/train_dir`` and ``root/test_dir`` (default: ``val``, else ``test``).

    Returns an :class:`ImageFolderData`; nothing is decoded until a loader is iterated.
    """
    if download:
        raise ValueError("imagefolder: download=True is not supported (ImageNet needs a manual download)")
    if root is None:
        raise ValueError(
            "imagefolder: root is required (a folder with train/<class>/... and val/<class>/...)"
        )
    for arg, v in (("image_size", image_size), ("resize_size", resize_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"imagefolder: {arg} must be an int >= 1, got {v!r}")
    if resize_size < image_size:
        raise ValueError(f"imagefolder: resize_size={resize_size} must be >= image_size={image_size}")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"imagefolder: scale must satisfy 0 < lo <= hi <= 1, got {scale!r}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"imagefolder: ratio must satisfy 0 < lo <= hi, got {ratio!r}")
    root_p = Path(root).expanduser()
    train_samples, classes = scan_split(root_p / train_dir)
    if test_dir is None:
        test_dir = next((d for d in ("val", "test") if (root_p / d).is_dir()), "val")
    test_samples, _ = scan_split(root_p / test_dir, classes)
    return ImageFolderData(
        name,
        root_p,
        classes,
        train_samples,
        test_samples,
        image_size,
        resize_size,
        tuple(scale),
        tuple(ratio),
        flip,
        tuple(mean),
        tuple(std),
    )
