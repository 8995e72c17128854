"""Device-resident batches with batched augmentation (no per-sample Python work).

The whole split stays on the training device as uint8. Each epoch draws one permutation from a
generator seeded by ``(seed, epoch)``, so an epoch's batches are a pure function of the seed and the
epoch number: resuming at epoch e reproduces them exactly, and every DDP rank draws the same
permutation and takes its own shard.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["DeviceLoader", "augment_batch", "normalize_batch"]


def normalize_batch(x: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (N, C, H, W) -> float ``(x / 255 - mean) / std``; mean/std are (C,) on the [0, 1] scale."""
    scale = (1.0 / (255.0 * std)).to(dtype).view(1, -1, 1, 1)
    shift = (mean / std).to(dtype).view(1, -1, 1, 1)
    return x.to(dtype) * scale - shift


def augment_batch(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding ``padding`` and random horizontal flip, batched.

    x: (N, C, H, W) any dtype, on any device; the random draws come from ``generator`` (CPU) so
    the result is identical on every device for the same seed.
    """
    n, _, h, w = x.shape
    if padding > 0:
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # (N, H)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # (N, W)
        idx_r = rows.view(n, 1, h, 1).expand(n, x.shape[1], h, padded.shape[-1])
        x = padded.gather(2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = x.gather(3, idx_c)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x


class DeviceLoader:
    """Iterate ``(inputs, labels)`` batches of a uint8 image tensor kept on ``device``.

    Args:
        x: uint8 (N, C, H, W); y: int64 (N,).
        mean, std: per-channel normalisation on the [0, 1] scale.
        batch_size: per-process batch size.
        shuffle, augment, crop_padding, flip: sampling and augmentation.
        seed: base seed; epoch ``e`` uses ``seed * 1_000_003 + e``.
        rank, world_size: shard for distributed training (every rank sees ``len // world`` samples).
        drop_last: drop the last incomplete batch (default for training).
        channels_last, dtype: layout and dtype of the returned inputs.
    """

    def __init__(self, x: Tensor, y: Tensor, mean, std, batch_size: int, *, shuffle: bool = True,
                 augment: bool = False, crop_padding: int = 4, flip: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32, max_batches: int | None = None) -> None:
        for arg, v in (("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be an int >= 1, got {v!r}")
        if len(x) == 0:
            raise ValueError("cannot iterate an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.channels_last, self.dtype, self.max_batches = channels_last, dtype, max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor:
        """This rank's sample order for the current epoch.

        Training (``drop_last``): equal contiguous shards of one global permutation, so every rank
        takes the same number of steps (DDP needs that). Otherwise strided shards that together
        cover every sample exactly once (evaluation).
        """
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        if self.world_size == 1:
            return perm
        if self.drop_last:
            per_rank = n // self.world_size
            return perm[self.rank * per_rank:(self.rank + 1) * per_rank]
        return perm[self.rank::self.world_size]

    def __len__(self) -> int:
        n = len(self._indices())
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self.max_batches is not None:
            batches = min(batches, self.max_batches)
        return max(batches, 0)

    def _batch_generator(self, b: int) -> torch.Generator:
        """Augmentation RNG of batch ``b``: a pure function of (seed, epoch, rank, b), so a run
        resumed in the middle of an epoch draws exactly the same crops and flips."""
        key = ((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) * 100_003 + b
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start_batch, start_batch + 1, ...`` of the current epoch (for resuming)."""
        idx = self._indices().to(self.device)
        for b in range(start_batch, len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            xb = self.x.index_select(0, sel)
            if self.augment:
                xb = augment_batch(xb, self.crop_padding, self.flip, self._batch_generator(b))
            xb = normalize_batch(xb, self.mean, self.std, self.dtype)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y.index_select(0, sel)
