"""CIFAR-10 / CIFAR-100 from the official python tarball, its extracted folder, or a ``.npz``.

``root`` may be an ``.npz`` file, a ``.tar.gz`` file, or a folder searched in this order:
the batch folder itself (``root`` holds ``data_batch_1``/``train``), ``root/cifar-10-batches-py``
(``root/cifar-100-python``), ``root/cifar-10-python.tar.gz`` (``root/cifar-100-python.tar.gz``),
``root/cifar10.npz`` (``root/cifar100.npz``). Tarball members are read straight from the archive
into memory; nothing is extracted.

Safety: the batch pickles are decoded only by :mod:`bnlab.data.safe_pickle` (numpy arrays and
plain containers; any other global is refused, never called). With ``verify=True`` (default) every
file is first checked against its official md5 (ecosystem.md §6); ``verify=False`` skips the md5
(for re-packed or generated files) but never the restricted unpickler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .archives import md5_bytes, read_tar_members
from .dataset import ImageDataset, from_numpy, reject_unknown_options
from .safe_pickle import safe_loads

__all__ = ["load_cifar10", "load_cifar100", "find_source", "CifarSpec", "SPECS", "decode_batch"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass(frozen=True)
class CifarSpec:
    """Layout of one official CIFAR python release."""

    name: str
    folder: str
    tarball: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    num_classes: dict[str, int]  # label mode -> number of classes
    md5: dict[str, str]  # member file name -> official md5


SPECS = {
    "cifar10": CifarSpec(
        "cifar10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        {"": 10},
        {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    ),
    "cifar100": CifarSpec(
        "cifar100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        ("test",),
        "meta",
        {"fine": 100, "coarse": 20},
        {
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
}


def find_source(root: str | os.PathLike, name: str) -> Path | None:
    """The batch folder, tarball or ``.npz`` holding dataset ``name`` under ``root`` (or ``None``)."""
    spec = SPECS[name]
    root = Path(root).expanduser()
    if root.is_file():
        return root if root.suffix == ".npz" or root.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    if not root.is_dir():
        return None
    if (root / spec.train[0]).is_file():
        return root
    for cand in (root / spec.folder, root / spec.tarball, root / f"{name}.npz"):
        if (cand.is_dir() and (cand / spec.train[0]).is_file()) or cand.is_file():
            return cand
    return None


def _read_files(src: Path, spec: CifarSpec) -> dict[str, bytes]:
    """Raw bytes of the batch + meta files from a folder or (without extracting) a tarball."""
    files = spec.train + spec.test + (spec.meta,)
    if src.is_dir():
        return {f: (src / f).read_bytes() for f in files if (src / f).is_file()}
    members = read_tar_members(src, [f"{spec.folder}/{f}" for f in files])
    return {k.rsplit("/", 1)[-1]: v for k, v in members.items()}


def _str_keys(d: Any, source: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a dict, got {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def decode_batch(
    raw: bytes, *, source: str, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle (restricted) one batch: ``data`` (N, 3072) uint8 -> (N, 32, 32, 3); labels (N,) int64."""
    d = _str_keys(safe_loads(raw, source=source), source)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{source}: batch has keys {sorted(d)}, expected 'data' and {label_key!r}")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{source}: 'data' is {desc}, expected a uint8 array (N, 3072)")
    try:
        y = np.asarray(d[label_key])
    except (TypeError, ValueError) as e:  # pragma: no cover - ragged lists
        raise ValueError(f"{source}: {label_key!r} is not a list of ints ({e})") from None
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{source}: {label_key!r} has dtype {y.dtype} shape {y.shape}, expected {len(x)} ints"
        )
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{source}: {label_key!r} values in [{y.min()}, {y.max()}], expected [0, {num_classes})"
        )
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def _load_pickles(src: Path, spec: CifarSpec, label_mode: str, verify: bool) -> dict[str, Any]:
    raw = _read_files(src, spec)
    missing = [f for f in spec.train + spec.test if f not in raw]
    if missing:
        raise FileNotFoundError(f"{spec.name}: {src} lacks {missing}")
    if verify:
        for f, data in raw.items():
            got = md5_bytes(data)
            if got != spec.md5[f]:
                raise ValueError(
                    f"{spec.name}: {src}/{f} has md5 {got}, expected the official {spec.md5[f]}; "
                    f"pass verify=False to load re-packed or generated files (still read with "
                    f"the restricted unpickler)"
                )
    label_key = "labels" if spec.name == "cifar10" else f"{label_mode}_labels"
    k = spec.num_classes[label_mode]
    out: dict[str, Any] = {}
    for split, files in (("train", spec.train), ("test", spec.test)):
        parts = [decode_batch(raw[f], source=f"{src}/{f}", label_key=label_key, num_classes=k) for f in files]
        out[f"x_{split}"] = np.concatenate([p[0] for p in parts])
        out[f"y_{split}"] = np.concatenate([p[1] for p in parts])
    out["classes"] = _classes(raw.get(spec.meta), f"{src}/{spec.meta}", spec, label_mode)
    return out


def _classes(raw: bytes | None, source: str, spec: CifarSpec, label_mode: str) -> list[str]:
    k = spec.num_classes[label_mode]
    if raw is None:  # meta missing: official CIFAR-10 names, or numbered CIFAR-100 classes
        return list(CIFAR10_CLASSES) if spec.name == "cifar10" else [str(i) for i in range(k)]
    meta = _str_keys(safe_loads(raw, source=source), source)
    key = "label_names" if spec.name == "cifar10" else f"{label_mode}_label_names"
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != k or not all(isinstance(n, (str, bytes)) for n in names):
        raise ValueError(f"{source}: {key!r} must be a list of {k} names, got {type(names).__name__}")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _load(
    name: str, root: str | os.PathLike | None, download: bool, verify: bool, label_mode: str, progress: bool
) -> ImageDataset:
    spec = SPECS[name]
    if label_mode not in spec.num_classes:
        raise ValueError(f"{name}: label_mode={label_mode!r}, expected one of {sorted(spec.num_classes)}")
    if root is None:
        raise ValueError(f"{name}: root is required (a folder, the {spec.tarball} file, or an .npz path)")
    root_p = Path(root).expanduser()
    src = find_source(root_p, name)
    if src is None and download:
        from .download import download_dataset

        if root_p.suffix == ".npz" or root_p.is_file():
            raise ValueError(f"{name}: cannot download into the file path {root_p}; pass a folder as root")
        download_dataset(name, root_p, progress=progress)
        src = find_source(root_p, name)
    if src is None:
        raise FileNotFoundError(
            f"{name}: no data under root={str(root)!r}; expected {spec.folder}/, {spec.tarball} or "
            f"{name}.npz in it (or root itself one of those); download=True fetches the official archive"
        )
    if src.suffix == ".npz":
        from .npz import load_npz_arrays

        arrays: dict[str, Any] = load_npz_arrays(
            src, name=name, image_shape=(32, 32, 3), num_classes=spec.num_classes[label_mode]
        )
        if arrays["classes"] is None:
            arrays["classes"] = _classes(None, str(src), spec, label_mode)
    else:
        arrays = _load_pickles(src, spec, label_mode, verify)
    return from_numpy(
        name,
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        arrays["classes"],
        crop_padding=4,
        flip=True,
        source=str(src),
    )


def load_cifar10(
    root: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
    progress: bool = True,
    **kwargs: object,
) -> ImageDataset:
    """CIFAR-10: train (50000, 3, 32, 32), test (10000, 3, 32, 32) uint8, 10 classes."""
    reject_unknown_options("cifar10", kwargs, "root, download, verify, progress")
    return _load("cifar10", root, download, verify, "", progress)


def load_cifar100(
    root: str | os.PathLike | None = None,
    download: bool = False,
    verify: bool = True,
    label_mode: str = "fine",
    progress: bool = True,
    **kwargs: object,
) -> ImageDataset:
    """CIFAR-100: same shapes; ``label_mode="fine"`` (100 classes) or ``"coarse"`` (20 superclasses)."""
    reject_unknown_options("cifar100", kwargs, "root, download, verify, label_mode, progress")
    return _load("cifar100", root, download, verify, label_mode, progress)
