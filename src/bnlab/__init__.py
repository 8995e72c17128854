"""bnlab: batch-normalisation research library.

Sub-packages: ``nn`` (norm layers), ``models``, ``data``, ``train``, ``optim`` (PSISGD, GSGD),
``path`` (path space of ReLU networks), ``convex`` (exact convex BN-ReLU training),
``diagnostics``, ``report``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["convex", "data", "diagnostics", "models", "nn", "optim", "path", "report", "train", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"bnlab.{name}")
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
