"""CPU allocator tuning for training processes (glibc ``mallopt``).

PyTorch's CPU allocator takes every tensor from ``malloc``. With glibc's defaults, the heap top is
returned to the kernel (``brk`` shrink) whenever more than ``M_TRIM_THRESHOLD`` bytes are free there,
and the next step's activations fault those pages in again. Measured on resnet20 (batch 64, 1 thread,
docs/results/speed_cbn.md): the CBN (decoupled) model paid ~24 ms/step of kernel time for it (the BN
model ~0), i.e. a training step 1.22-1.29x BN+SGD instead of 1.07-1.11x with the thresholds raised.

:func:`tune_cpu_allocator` raises ``M_TRIM_THRESHOLD`` (1 GiB) and ``M_MMAP_THRESHOLD`` (256 MiB) once
per process, so freed activation memory stays in the heap for the next step (PyTorch's own CPU
performance guide recommends a caching allocator, jemalloc/tcmalloc, for the same reason). The cost is
a resident set that does not shrink between steps. The CLI applies it to ``bnlab train``, ``compare``,
``bench`` and ``convex`` (an n=10,000 convex run spent 107 s of 587 s CPU in page faults); set
``BNLAB_MALLOC_TUNING=0`` to opt out, or export glibc's own
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` (which take precedence: nothing is changed
then). A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune_cpu_allocator", "allocator_tuned"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_TRIM_BYTES = 1 << 30
_MMAP_BYTES = 256 << 20
_applied: bool | None = None


def tune_cpu_allocator(env: dict[str, str] | None = None) -> bool:
    """Raise glibc's trim and mmap thresholds for this process. Returns True when applied (now or
    earlier), False when skipped (not glibc, opted out, or glibc's own variables are set)."""
    global _applied
    env = os.environ if env is None else env
    if _applied is not None:
        return _applied
    if (env.get("BNLAB_MALLOC_TUNING", "1") == "0" or "MALLOC_TRIM_THRESHOLD_" in env
            or "MALLOC_MMAP_THRESHOLD_" in env or platform.system() != "Linux"
            or platform.libc_ver()[0] != "glibc"):
        _applied = False
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES))
    except (OSError, AttributeError):
        ok = False
    _applied = ok
    return ok


def allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` has changed this process's allocator."""
    return bool(_applied)
