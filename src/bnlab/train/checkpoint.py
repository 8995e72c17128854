"""Atomic checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is written to ``<path>.tmp`` in the same folder, flushed and fsynced, then renamed
over ``<path>`` with ``os.replace`` (atomic on POSIX) and the folder is fsynced. A crash at any
moment therefore leaves either the previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` atomically to ``path``; on failure the previous file is kept untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {str(path)!r}: {e}; the previous checkpoint "
                              "(if any) is unchanged") from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors of many kinds: corrupt, truncated or hostile file
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a bnlab checkpoint: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a bnlab checkpoint (no 'model' entry)")
    return state


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
