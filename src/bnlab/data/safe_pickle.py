"""A restricted unpickler for the CIFAR python batches: data only, never code.

Unpickling runs whatever callable a pickle names, so the official CIFAR batch files are read with
:class:`RestrictedUnpickler`, whose ``find_class`` resolves only the globals those files need:

* ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (array
  skeleton; non-object dtype code), ``numpy.ndarray`` (only as that function's class argument,
  never called), ``numpy.dtype`` (non-object dtypes only);
* ``_codecs.encode`` with the ``latin1`` codec only (how Python 3 protocol-2 pickles store bytes).

Everything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ``numpy.load``...) raises
:class:`UnsafePickleError` *before* anything is called. Dicts, lists, tuples, str/bytes, ints,
floats, bools and None are built by the pickle machine itself and need no global. Persistent ids
are refused. Arrays with object dtype are refused (they could smuggle arbitrary objects).
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "safe_loads", "ALLOWED_GLOBALS"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global (callable/class) outside the allow-list."""


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_reconstruct = _numpy_reconstruct()


def _ndarray_token(*args: Any, **kwargs: Any) -> None:
    """What the global ``numpy.ndarray`` resolves to: a marker accepted only as ``_reconstruct``'s
    class argument. Calling it (``REDUCE``/``NEWOBJ`` on ``numpy.ndarray``) is refused, so a pickle
    cannot build arrays of arbitrary dtype through the ndarray constructor."""
    raise UnsafePickleError("refusing to call numpy.ndarray directly; arrays are rebuilt via _reconstruct")


def _safe_reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if cls is not _ndarray_token:
        raise UnsafePickleError(
            f"numpy _reconstruct called with class {cls!r}; only numpy.ndarray is allowed"
        )
    if not isinstance(dtype_code, (str, bytes)):
        raise UnsafePickleError(f"numpy _reconstruct dtype must be a type string, got {type(dtype_code).__name__}")
    code = dtype_code.decode("latin1") if isinstance(dtype_code, bytes) else dtype_code
    if np.dtype(code).hasobject:
        raise UnsafePickleError(f"numpy _reconstruct dtype {code!r} holds Python objects; refused")
    return _reconstruct(np.ndarray, shape, code)


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, (str, bytes)):
        raise UnsafePickleError(f"numpy.dtype spec must be a type string, got {type(spec).__name__}")
    spec_s = spec.decode("latin1") if isinstance(spec, bytes) else spec
    dt = np.dtype(spec_s, align=bool(align), copy=bool(copy))
    if dt.hasobject:
        raise UnsafePickleError(f"numpy.dtype {spec_s!r} holds Python objects; refused")
    return dt


def _safe_codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}; only 'latin1' is allowed")
    if not isinstance(obj, str):
        raise UnsafePickleError(f"_codecs.encode of {type(obj).__name__}; only str is allowed")
    return codecs.encode(obj, "latin1", errors)


#: (module, name) -> the object handed to the pickle machine
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): _ndarray_token,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _safe_codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and plain Python "
                f"containers are allowed in dataset files (possible malicious or non-dataset pickle)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing persistent id {pid!r} in a dataset pickle")


def safe_loads(data: bytes, *, encoding: str = "latin1", source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` decodes Python 2 ``str`` (as in the official CIFAR batches) to ``str``,
    which is also what numpy needs to rebuild Python 2 array buffers. Any unpickling failure is
    re-raised as ``pickle.UnpicklingError`` naming ``source``.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{source}: {e}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
    ) as e:
        raise pickle.UnpicklingError(
            f"{source}: not a valid dataset pickle ({type(e).__name__}: {e})"
        ) from None
