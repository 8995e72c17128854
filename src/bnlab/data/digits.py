"""scikit-learn's digits (8x8, 10 classes): the embedded dataset, no file or download needed."""

from __future__ import annotations

import numpy as np

from .dataset import ImageDataset, from_numpy, reject_unknown_options

__all__ = ["load_digits"]


def load_digits(root=None, download: bool = False, test_fraction: float = 0.25, split_seed: int = 0,
                **kwargs: object) -> ImageDataset:
    """1797 images, pixel values 0..16 rescaled to uint8 0..255; a fixed stratified split
    (``test_fraction`` of each class to test, chosen by ``split_seed``)."""
    from sklearn.datasets import load_digits as sk_load

    reject_unknown_options("digits", kwargs, "root, download, test_fraction, split_seed")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must be in (0, 1), got {test_fraction!r}")

    d = sk_load()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, size=int(round(len(idx) * test_fraction)), replace=False)] = True
    return from_numpy("digits", x[~test], y[~test], x[test], y[test], [str(i) for i in range(10)],
                      crop_padding=1, flip=False, source="sklearn.datasets.load_digits")
