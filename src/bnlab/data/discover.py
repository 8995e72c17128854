"""Find datasets already on disk (for ``bnlab info``), without loading them.

Default roots, in order: every entry of ``$BNLAB_DATA`` (``os.pathsep``-separated), ``~/data``,
``./data``, ``../shared/data``. For each root the loaders' own ``find_source`` rules are applied
(IDX folders, CIFAR batch folders/tarballs, ``<name>.npz``); ImageNet-style trees are reported as
``imagefolder`` when ``<root>/imagenet/train`` (or ``<root>/train``) has class sub-folders. The first
root that has a dataset wins.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import cifar, mnist

__all__ = ["find_datasets", "default_roots", "DATA_ENV"]

DATA_ENV = "BNLAB_DATA"


def default_roots() -> list[str]:
    """``$BNLAB_DATA`` entries, then ``~/data``, ``./data``, ``../shared/data``."""
    env = [p for p in os.environ.get(DATA_ENV, "").split(os.pathsep) if p.strip()]
    return env + [str(Path("~/data").expanduser()), "data", str(Path("..") / "shared" / "data")]


def _imagefolder(root: Path) -> Path | None:
    for cand in (root / "imagenet", root):
        train = cand / "train"
        if train.is_dir() and any(d.is_dir() for d in train.iterdir()):
            return cand
    return None


def _file_dataset(path: Path) -> str | None:
    """The dataset a single file is for, judged by its name (``mnist.npz``, ``cifar-10-python.tar.gz``)."""
    for name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        if path.name == f"{name}.npz":
            return name
    for name, spec in cifar.SPECS.items():
        if path.name == spec.tarball:
            return name
    return None


def find_datasets(roots: list[str] | None = None) -> dict[str, str]:
    """``{dataset name: path}`` for each dataset found under ``roots`` (default: :func:`default_roots`).

    The path is what ``bnlab.data.load(name, root=path)`` accepts.
    """
    found: dict[str, str] = {}
    for r in default_roots() if roots is None else roots:
        root = Path(r).expanduser()
        if not root.exists():
            continue
        try:
            if root.is_file():
                name = _file_dataset(root)
                if name is not None and name not in found:
                    found[name] = str(root)
                continue
            for name in ("mnist", "fashion_mnist"):
                if name not in found and (p := mnist.find_source(root, name)) is not None:
                    found[name] = str(p)
            for name in ("cifar10", "cifar100"):
                if name not in found and (p := cifar.find_source(root, name)) is not None:
                    found[name] = str(p)
            if "imagefolder" not in found and (p := _imagefolder(root)) is not None:
                found["imagefolder"] = str(p)
        except OSError:  # unreadable root: skip it
            continue
    return dict(sorted(found.items()))
