"""Generators of small dataset files in every official format, for the data tests.

Nothing here reads the network; everything is written under a caller-given folder.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_CODE = {
    np.dtype("u1"): 0x08,
    np.dtype("i1"): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


# ---------------------------------------------------------------- IDX (MNIST family)
def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as an IDX buffer (big-endian header and data), the official format."""
    dt = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    header = bytes([0, 0, _IDX_CODE[dt], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=dt).tobytes()


def mnist_arrays(n_train: int = 30, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % 10,
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test, dtype=np.int64) * 3) % 10,
    }


def write_idx_folder(
    folder: Path, arrays: dict[str, np.ndarray], gz: bool = True, dot_names: bool = False
) -> Path:
    """Write the four official IDX files (gzipped or not) of ``arrays`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (img, lab) in IDX_NAMES.items():
        for stem, arr in ((img, arrays[f"x_{split}"]), (lab, arrays[f"y_{split}"].astype(np.uint8))):
            if dot_names:
                stem = stem.replace("-idx", ".idx")
            data = idx_bytes(arr)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return folder


# ---------------------------------------------------------------- Python 2 style pickles (CIFAR)
def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(i: int) -> bytes:
    return (b"K" + bytes([i])) if 0 <= i < 256 else (b"J" + struct.pack("<i", i))


def _py2_obj(o) -> bytes:
    if isinstance(o, str):
        return _py2_str(o.encode("latin1"))
    if isinstance(o, bytes):
        return _py2_str(o)
    if isinstance(o, (int, np.integer)):
        return _py2_int(int(o))
    if isinstance(o, list):
        return b"](" + b"".join(_py2_obj(v) for v in o) + b"e"
    if isinstance(o, dict):
        return b"}(" + b"".join(_py2_obj(k) + _py2_obj(v) for k, v in o.items()) + b"u"
    if isinstance(o, np.ndarray):
        assert o.dtype == np.uint8
        shape = b"(" + b"".join(_py2_int(s) for s in o.shape) + b"t"
        dtype = (
            b"cnumpy\ndtype\n"
            + _py2_str(b"u1")
            + _py2_int(0)
            + _py2_int(1)
            + b"\x87R"
            + b"("
            + _py2_int(3)
            + _py2_str(b"|")
            + b"NNN"
            + _py2_int(-1)
            + _py2_int(-1)
            + _py2_int(0)
            + b"tb"
        )
        return (
            b"cnumpy.core.multiarray\n_reconstruct\n"
            + b"cnumpy\nndarray\n"
            + b"("
            + _py2_int(0)
            + b"t"
            + _py2_str(b"b")
            + b"\x87R"
            + b"("
            + _py2_int(1)
            + shape
            + dtype
            + b"\x89"
            + _py2_str(np.ascontiguousarray(o).tobytes())
            + b"tb"
        )
    raise TypeError(type(o))


def py2_pickle(obj) -> bytes:
    """A protocol-2 pickle byte-for-byte in the style of Python 2 ``cPickle`` + numpy (the official
    CIFAR batches): ``str`` as SHORT_BINSTRING/BINSTRING, arrays through ``numpy.core.multiarray``."""
    return b"\x80\x02" + _py2_obj(obj) + b"."


CIFAR_SPEC = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        meta="batches.meta",
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        train=["train"],
        test=["test"],
        meta="meta",
    ),
}


def cifar_arrays(name: str, n_per_file: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Random NHWC uint8 images and labels for the generated CIFAR files."""
    spec = CIFAR_SPEC[name]
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100
    n_tr, n_te = n_per_file * len(spec["train"]), n_per_file * len(spec["test"])
    out = {
        "x_train": rng.integers(0, 256, (n_tr, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, k, n_tr).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_te, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, k, n_te).astype(np.int64),
    }
    if name == "cifar100":
        out["c_train"] = out["y_train"] // 5
        out["c_test"] = out["y_test"] // 5
    return out


def cifar_files(name: str, arrays: dict[str, np.ndarray], py2: bool = True) -> dict[str, bytes]:
    """The official member files (batches + meta) of ``arrays`` as pickled bytes."""
    spec = CIFAR_SPEC[name]
    dump = py2_pickle if py2 else (lambda o: pickle.dumps(o, protocol=2))
    files = {}
    for split in ("train", "test"):
        names = spec[split]
        xs = np.array_split(arrays[f"x_{split}"], len(names))
        ys = np.array_split(arrays[f"y_{split}"], len(names))
        cs = np.array_split(arrays.get(f"c_{split}", arrays[f"y_{split}"]), len(names))
        for f, x, y, c in zip(names, xs, ys, cs):
            d = {
                "batch_label": f"generated {f}",
                "data": x.transpose(0, 3, 1, 2).reshape(len(x), 3072).copy(),
            }
            if name == "cifar10":
                d["labels"] = [int(v) for v in y]
            else:
                d["fine_labels"] = [int(v) for v in y]
                d["coarse_labels"] = [int(v) for v in c]
            d["filenames"] = [f"img_{i}.png" for i in range(len(x))]
            files[f] = dump(d)
    if name == "cifar10":
        meta = {
            "num_cases_per_batch": len(arrays["x_train"]) // 5,
            "label_names": [f"c{i}" for i in range(10)],
            "num_vis": 3072,
        }
    else:
        meta = {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"s{i}" for i in range(20)],
        }
    files[spec["meta"]] = dump(meta)
    return files


def write_cifar_folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = root / CIFAR_SPEC[name]["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    for f, data in files.items():
        (folder / f).write_bytes(data)
    return folder


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    """A tar archive (gzip by default) of regular files ``{path: bytes}``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for path, data in members.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_cifar_tarball(root: Path, name: str, files: dict[str, bytes], prefix: str = "") -> Path:
    """The official tarball layout ``<folder>/<file>`` (member names optionally prefixed, e.g. ``./``)."""
    spec = CIFAR_SPEC[name]
    path = root / spec["tarball"]
    root.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes({f"{prefix}{spec['folder']}/{f}": d for f, d in files.items()}))
    return path


def special_tar(kind: str) -> bytes:
    """A gzip tar with one unsafe member.

    ``kind``: ``abs``, ``dotdot``, ``symlink``, ``hardlink``, ``device`` or ``fifo``.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ok = tarfile.TarInfo("safe/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        info = tarfile.TarInfo({"abs": "/tmp/bnlab_evil", "dotdot": "safe/../../evil"}.get(kind, "safe/evil"))
        data = None
        if kind in ("abs", "dotdot"):
            data = b"evil"
            info.size = 4
        elif kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "safe/ok.txt"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        else:
            raise ValueError(kind)
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# ---------------------------------------------------------------- malicious pickles
class _SystemCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecCall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def malicious_pickle(marker: Path, via: str = "system", protocol: int = 2) -> bytes:
    """A pickle that, if loaded with plain ``pickle``, creates ``marker`` (inside a CIFAR-like dict)."""
    payload = _SystemCall(str(marker)) if via == "system" else _ExecCall(str(marker))
    return pickle.dumps({"data": payload, "labels": [0]}, protocol=protocol)


# ---------------------------------------------------------------- npz and image trees
def write_npz(path: Path, arrays: dict[str, np.ndarray], classes: list[str] | None = None, **extra) -> Path:
    kw = {k: v for k, v in arrays.items() if k in ("x_train", "y_train", "x_test", "y_test")}
    if classes is not None:
        kw["classes"] = np.array(classes)
    kw.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **kw)
    return path


def write_image_tree(root: Path, classes=("cat", "dog", "eel"), per_class: int = 3, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.{png,JPEG}`` with tiny images of assorted sizes and modes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (24, 50), (64, 64), (33, 17)]
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = sizes[(ci + i) % len(sizes)]
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(arr)
                if i % 3 == 1:
                    img.convert("L").save(d / f"{c}_{i}.png")
                elif i % 3 == 2:
                    img.save(d / f"{c}_{i}.JPEG", quality=90)
                else:
                    img.save(d / f"{c}_{i}.png")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root
