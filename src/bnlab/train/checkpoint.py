"""Atomic, verified checkpoints that load with ``torch.load(weights_only=True)``.

Writing (:func:`save_checkpoint`):

1. refuse a state whose model tensors hold NaN/Inf (``require_finite``): a diverged model never
   replaces the last good checkpoint;
2. serialise ``state`` into memory and load it back with ``weights_only=True``: a state that could
   not be resumed (a non-allow-listed object somewhere in it) is refused before the disk is touched;
3. write the bytes to ``<path>.tmp`` in the same folder, flush and fsync, ``os.replace`` it over
   ``<path>`` (atomic on POSIX) and fsync the folder.

A crash (``kill -9``, power loss after the fsync) at any moment therefore leaves either the
previous complete checkpoint or the new complete one; a stale ``<path>.tmp`` is harmless and is
overwritten by the next save. Any failure (full disk, read-only or vanished folder, I/O error)
removes the temporary file, leaves ``<path>`` untouched and raises :class:`CheckpointError` naming
the path and the cause (e.g. ``[Errno 28] No space left on device``).

Reading (:func:`load_checkpoint`) always uses ``weights_only=True``: a checkpoint carrying a pickled
callable (``os.system``...) is refused by torch's restricted unpickler and nothing runs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "nonfinite_tensors"]

#: bytes per ``write`` call when writing the serialised checkpoint
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


def nonfinite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Keys of the floating-point tensors in ``tensors`` that hold a NaN or an Inf (in key order)."""
    bad = []
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            if value.numel() and not bool(torch.isfinite(value).all()):
                bad.append(key)
    return bad


def _serialise(state: dict[str, Any], path: Path) -> bytes:
    """``state`` as the bytes of a ``torch.save`` file, checked to load with ``weights_only=True``."""
    buf = io.BytesIO()
    try:
        torch.save(state, buf)
    except Exception as e:  # unpicklable object in the state: a programming error, named clearly
        raise CheckpointError(f"could not serialise checkpoint {str(path)!r}: {type(e).__name__}: {e}; "
                              "the previous checkpoint (if any) is unchanged") from e
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(path)!r} would not load with weights_only=True "
                              f"({type(e).__name__}: {e}); refusing to write it, the previous checkpoint "
                              "(if any) is unchanged") from e
    return data


def _write_all(f, data: bytes) -> None:
    """Write ``data`` to the open binary file ``f`` (chunked; a short write raises ``OSError``)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        chunk = view[start:start + _CHUNK]
        written = f.write(chunk)
        if written is not None and written != len(chunk):
            raise OSError(f"short write ({written} of {len(chunk)} bytes)")


def save_checkpoint(state: dict[str, Any], path: str | Path, *, require_finite: bool = True) -> None:
    """Write ``state`` atomically to ``path``; on any failure the previous file is kept untouched.

    ``state`` must be a dict with a ``"model"`` state dict (tensors). With ``require_finite`` a
    NaN/Inf in any floating tensor of ``state["model"]`` raises :class:`CheckpointError` and
    nothing is written.
    """
    path = Path(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"save_checkpoint({str(path)!r}): state must be a dict with a 'model' state dict, "
                              f"got {type(state).__name__}" + (f" with keys {sorted(state)}"
                                                               if isinstance(state, dict) else ""))
    if require_finite:
        bad = nonfinite_tensors(state["model"])
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CheckpointError(f"refusing to write checkpoint {str(path)!r}: model tensors hold NaN/Inf "
                                  f"({shown}); the previous checkpoint (if any) is unchanged")
    data = _serialise(state, path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise CheckpointError(f"could not write checkpoint {str(path)!r}: {e}; the previous checkpoint "
                              "(if any) is unchanged") from e
    _fsync_dir(path.parent)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code execution).

    Raises :class:`CheckpointError` for a missing, truncated, corrupt, hostile or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors of many kinds: corrupt, truncated or hostile file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt, truncated or not a bnlab checkpoint "
                              f"(refused by the weights_only loader: {first})") from e
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a bnlab checkpoint (no 'model' state dict)")
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
