"""The data path: ``DeviceLoader`` with crop/flip augmentation against a per-sample Python loop.

Both produce the same kind of batch (uint8 (N, 3, 32, 32) on the device -> random 4-pixel-padded
crop and horizontal flip -> normalised float32). The baseline crops and flips one image at a time
in Python (what a ``torchvision.transforms`` pipeline without workers does) and stacks the batch.
One call = one full pass over the data; the result is reported per batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .timing import Result, Settings, Skip, compare

__all__ = ["run", "naive_batches"]


def naive_batches(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch: int, padding: int,
                  g: torch.Generator) -> Iterator[torch.Tensor]:
    """Per-sample crop/flip in Python (the baseline). x: uint8 (N, C, H, W)."""
    n, _, h, w = x.shape
    perm = torch.randperm(n, generator=g)
    m, s = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    for i in range(n // batch):
        out = []
        for j in perm[i * batch:(i + 1) * batch].tolist():
            img = torch.nn.functional.pad(x[j], (padding,) * 4)
            dy, dx = (int(v) for v in torch.randint(0, 2 * padding + 1, (2,), generator=g))
            img = img[:, dy:dy + h, dx:dx + w]
            if torch.rand((), generator=g) < 0.5:
                img = img.flip(2)
            out.append((img.float() / 255 - m) / s)
        yield torch.stack(out)


def run(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    try:
        from ..data import DeviceLoader
    except ImportError as e:
        raise Skip(f"bnlab.data.DeviceLoader not importable ({e})") from e
    n, batch = (256, 64) if quick else (4096, 256)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    loader = DeviceLoader(x, y, mean, std, batch, shuffle=True, augment=True, crop_padding=4, flip=True,
                          device=device, drop_last=True)
    md, sd = mean.to(device), std.to(device)

    def ours() -> None:
        for _xb, _yb in loader:
            pass

    def base() -> None:
        for _xb in naive_batches(x, md, sd, batch, 4, g):
            pass

    o, b = compare(ours, base, settings, device)
    nb = n // batch
    yield Result("data/DeviceLoader augment", o / nb, b / nb, f"{n}x3x32x32 uint8, batch {batch}",
                 "uint8->float32", device.type, baseline="per-sample Python crop/flip", unit="ms/b",
                 extra={"batches_per_s": 1e3 * nb / o, "baseline_batches_per_s": 1e3 * nb / b},
                 note=f"{1e3 * nb / o:.0f} vs {1e3 * nb / b:.0f} batches/s")
