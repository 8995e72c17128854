"""MNIST and Fashion-MNIST from the official IDX files (``.gz`` or uncompressed) or a ``.npz``.

``root`` may be an ``.npz`` file, or a folder searched in this order:

1. the four official IDX files (``train-images-idx3-ubyte[.gz]`` ..., also the ``.idx3-ubyte``
   spelling) in ``root/MNIST/raw`` (mnist) or ``root/FashionMNIST/raw`` (fashion_mnist),
   ``root/<name>``, then ``root`` itself; a folder whose ``train-labels-idx1-ubyte.gz`` is the
   *other* dataset's official file (md5) is skipped (both datasets use the same file names);
2. ``root/<name>.npz`` (the ``shared/data`` layout).

``download=True`` fetches into ``root/MNIST/raw`` / ``root/FashionMNIST/raw`` (torchvision's layout).

IDX format (big-endian): magic ``00 00 <type> <ndim>``, ``ndim`` uint32 sizes, then the data in C
order. Images are ``(N, 28, 28)`` uint8 (magic 2051), labels ``(N,)`` uint8 (magic 2049).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .archives import DEFAULT_MAX_BYTES, read_bytes
from .dataset import ImageDataset, from_numpy, reject_unknown_options

__all__ = ["load_mnist", "load_fashion_mnist", "parse_idx", "read_idx", "find_source", "IDX_FILES"]

#: IDX type code -> numpy dtype (big-endian for multi-byte types)
_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: split -> (images file, labels file), official names without ``.gz``
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
_RAW_DIR = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
#: cap on one decompressed IDX file of the MNIST family (official train images: 47,040,016 bytes)
MAX_IDX_BYTES = 256 << 20


def parse_idx(data: bytes, *, source: str = "<bytes>", expect_ndim: int | None = None) -> np.ndarray:
    """Decode an IDX buffer to a numpy array (native byte order).

    Validates the magic number (two zero bytes, a known type code, ``ndim >= 1``), ``expect_ndim``,
    and that the payload has exactly ``prod(dims) * itemsize`` bytes (truncated or padded files
    raise ``ValueError`` naming ``source``).
    """
    if len(data) < 4:
        raise ValueError(f"{source}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(
            f"{source}: bad IDX magic {data[:4].hex()}; expected 0000<type><ndim> with type in "
            f"{{{', '.join(f'{t:02x}' for t in _IDX_TYPES)}}}"
        )
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    if ndim == 0 or (expect_ndim is not None and ndim != expect_ndim):
        raise ValueError(f"{source}: IDX has {ndim} dims, expected {expect_ndim if expect_ndim else '>= 1'}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: IDX payload {what}: {got} bytes for dims {dims} of {dtype.name}, expected {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike, *, expect_ndim: int | None = None,
             max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from its bytes), at most ``max_bytes`` once
    decompressed (gzip bombs), see :func:`parse_idx`."""
    return parse_idx(read_bytes(path, max_bytes=max_bytes), source=str(path), expect_ndim=expect_ndim)


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The file for official name ``stem`` in ``folder`` (``.gz`` or not, ``-idx`` or ``.idx``)."""
    alt = stem.replace("-idx", ".idx")
    for cand in (stem + ".gz", stem, alt + ".gz", alt):
        p = folder / cand
        if p.is_file():
            return p
    return None


def _is_other_official(folder: Path, name: str) -> bool:
    """Whether ``folder``'s ``train-labels-idx1-ubyte.gz`` is the other dataset's official file (md5).

    MNIST and Fashion-MNIST use the *same* file names, so a folder of IDX files is ambiguous; the
    official label files' md5 (``download.RESOURCES``) tell them apart. Unknown files: ``False``.
    """
    path = folder / "train-labels-idx1-ubyte.gz"
    if not path.is_file() or path.stat().st_size > 1 << 20:  # official: ~29 KB
        return False
    from .archives import md5_file
    from .download import RESOURCES

    def official(ds: str) -> bool:
        return any(r.filename == path.name and r.md5 == digest for r in RESOURCES.get(ds, ()))

    digest = md5_file(path)
    return not official(name) and any(official(ds) for ds in _RAW_DIR if ds != name)


def find_source(root: str | os.PathLike, name: str) -> Path | None:
    """Where ``name`` lives under ``root``: a folder holding the four IDX files, or an ``.npz``.

    Folders are tried most specific first (``root/MNIST/raw`` or ``root/FashionMNIST/raw``,
    ``root/<name>``, then ``root``); a folder whose label file is the *other* dataset's official one
    (md5) is skipped, so MNIST files are never loaded as Fashion-MNIST or vice versa.
    """
    root = Path(root).expanduser()
    if root.is_file():
        return root if root.suffix == ".npz" else None
    if not root.is_dir():
        return None
    stems = [s for pair in IDX_FILES.values() for s in pair]
    for folder in (root / _RAW_DIR[name] / "raw", root / name, root):
        if all(_idx_path(folder, s) is not None for s in stems) and not _is_other_official(folder, name):
            return folder
    npz = root / f"{name}.npz"
    return npz if npz.is_file() else None


def _load_idx_folder(folder: Path, name: str) -> dict[str, np.ndarray]:
    out = {}
    for split, (img_stem, lab_stem) in IDX_FILES.items():
        img_path, lab_path = _idx_path(folder, img_stem), _idx_path(folder, lab_stem)
        if img_path is None or lab_path is None:
            raise FileNotFoundError(f"{name}: {folder} lacks {img_stem}[.gz] or {lab_stem}[.gz]")
        x = read_idx(img_path, expect_ndim=3, max_bytes=MAX_IDX_BYTES)
        y = read_idx(lab_path, expect_ndim=1, max_bytes=MAX_IDX_BYTES)
        if x.dtype != np.uint8 or x.shape[1:] != (28, 28):
            raise ValueError(
                f"{name}: {img_path} holds {x.dtype} images of shape {x.shape[1:]}, expected uint8 (28, 28)"
            )
        if y.dtype != np.uint8:
            raise ValueError(f"{name}: {lab_path} holds {y.dtype} labels, expected uint8")
        if len(x) != len(y):
            raise ValueError(f"{name}: {img_path} has {len(x)} images but {lab_path} has {len(y)} labels")
        if len(y) and y.max() > 9:
            raise ValueError(f"{name}: {lab_path} has label {int(y.max())}, expected 0..9")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.int64)
    return out


def _load(name: str, root: str | os.PathLike | None, download: bool, progress: bool = True) -> ImageDataset:
    if root is None:
        raise ValueError(
            f"{name}: root is required (a folder with the IDX files or {name}.npz, or an .npz path)"
        )
    root_p = Path(root).expanduser()
    src = find_source(root_p, name)
    if src is None and download:
        from .download import download_dataset

        if root_p.suffix == ".npz":
            raise ValueError(f"{name}: cannot download into an .npz path {root_p}; pass a folder as root")
        # torchvision's layout, so MNIST and Fashion-MNIST (same file names) can share a root
        download_dataset(name, root_p / _RAW_DIR[name] / "raw", progress=progress)
        src = find_source(root_p, name)
    if src is None:
        raise FileNotFoundError(
            f"{name}: no data under root={str(root)!r}; expected the IDX files "
            f"(train-images-idx3-ubyte.gz, ...) in root, root/{_RAW_DIR[name]}/raw or root/{name}, or "
            f"root/{name}.npz, or root itself an .npz; pass download=True to fetch the official files"
        )
    if src.is_file():
        from .npz import load_npz_arrays

        arrays = load_npz_arrays(src, name=name, image_shape=(28, 28), num_classes=10)
        classes = arrays.pop("classes") or CLASSES[name]
    else:
        arrays, classes = _load_idx_folder(src, name), CLASSES[name]
    return from_numpy(
        name,
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        classes,
        crop_padding=2,
        flip=False,
        source=str(src),
    )


def load_mnist(
    root: str | os.PathLike | None = None, download: bool = False, progress: bool = True, **kwargs: object
) -> ImageDataset:
    """MNIST: train (60000, 1, 28, 28), test (10000, 1, 28, 28) uint8; see the module doc for ``root``."""
    reject_unknown_options("mnist", kwargs, "root, download, progress")
    return _load("mnist", root, download, progress)


def load_fashion_mnist(
    root: str | os.PathLike | None = None, download: bool = False, progress: bool = True, **kwargs: object
) -> ImageDataset:
    """Fashion-MNIST: same shapes and formats as MNIST, classes T-shirt/top ... Ankle boot."""
    reject_unknown_options("fashion_mnist", kwargs, "root, download, progress")
    return _load("fashion_mnist", root, download, progress)
