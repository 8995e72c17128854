"""Validated ``.npz`` datasets (the layout of ``shared/data``): keys ``x_train, y_train, x_test, y_test``
and optional ``classes``, read with ``np.load(..., allow_pickle=False)``.

Images are uint8 ``(N, H, W)`` (grey) or ``(N, H, W, C)`` (channels last, as in the official files);
labels are a 1-D integer array with one entry per image and values in ``[0, num_classes)``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["NPZ_KEYS", "load_npz_arrays"]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz_arrays(
    path: str | os.PathLike,
    *,
    name: str,
    image_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray | list[str] | None]:
    """Read and validate a dataset ``.npz``.

    Args:
        path: the ``.npz`` file.
        name: dataset name for error messages.
        image_shape: expected per-image shape, e.g. ``(28, 28)`` or ``(32, 32, 3)``; ``None`` = any
            ``(H, W)`` / ``(H, W, C)`` shared by both splits.
        num_classes: expected number of classes (labels must lie in ``[0, num_classes)``; a
            ``classes`` array, if present, must have this length).
        max_bytes: refuse an archive whose members inflate to more than this (zip bombs);
            default :data:`bnlab.data.archives.DEFAULT_MAX_BYTES`.

    Returns:
        dict with ``x_train, y_train, x_test, y_test`` (numpy) and ``classes`` (list of str or None).
    """
    path = Path(path)
    from .archives import DEFAULT_MAX_BYTES

    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(path) as zf:  # the declared sizes bound what zipfile will inflate
            total = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        total = 0  # np.load below reports the unreadable file
    if total > limit:
        raise ValueError(f"{name}: {path} inflates to {total} bytes, exceeds max_bytes={limit} (zip bomb?)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{name}: cannot read {path} as .npz ({type(e).__name__}: {e})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{name}: {path} is a single .npy array, expected an .npz with keys {', '.join(NPZ_KEYS)}"
        )
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(
                f"{name}: {path} lacks keys {missing}; has {sorted(npz.files)}, "
                f"expected {', '.join(NPZ_KEYS)} (+ optional classes)"
            )
        try:
            out: dict = {k: npz[k] for k in NPZ_KEYS}
            classes_arr = npz["classes"] if "classes" in npz.files else None
        except ValueError as e:  # object arrays need pickle: refused
            raise ValueError(
                f"{name}: {path} holds an array that needs pickle to load ({e}); "
                f"only plain numeric/string arrays are accepted"
            ) from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{name}: {path} is corrupt ({type(e).__name__}: {e})") from None
    shapes = {}
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        if x.dtype != np.uint8:
            raise ValueError(f"{name}: {path} x_{split} has dtype {x.dtype}, expected uint8 pixels")
        if x.ndim not in (3, 4):
            raise ValueError(
                f"{name}: {path} x_{split} has shape {x.shape}, expected (N, H, W) or (N, H, W, C)"
            )
        if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
            raise ValueError(
                f"{name}: {path} x_{split} has shape {x.shape}, expected (N, "
                f"{', '.join(map(str, image_shape))})"
            )
        shapes[split] = x.shape[1:]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{name}: {path} y_{split} has dtype {y.dtype} shape {y.shape}, expected a 1-D integer array"
            )
        if len(y) != len(x):
            raise ValueError(f"{name}: {path} has {len(x)} x_{split} images but {len(y)} y_{split} labels")
        if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
            raise ValueError(
                f"{name}: {path} y_{split} has labels in [{y.min()}, {y.max()}], "
                f"expected [0, {num_classes if num_classes is not None else 'K'})"
            )
    if shapes["train"] != shapes["test"]:
        raise ValueError(
            f"{name}: {path} train images {shapes['train']} and test images {shapes['test']} differ"
        )
    classes = None
    if classes_arr is not None:
        if classes_arr.ndim != 1 or classes_arr.dtype.kind not in "US":
            raise ValueError(
                f"{name}: {path} classes has dtype {classes_arr.dtype} shape {classes_arr.shape}, "
                f"expected a 1-D string array"
            )
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes_arr.tolist()]
        if num_classes is not None and len(classes) != num_classes:
            raise ValueError(f"{name}: {path} classes has {len(classes)} names, expected {num_classes}")
    out["classes"] = classes
    return out
