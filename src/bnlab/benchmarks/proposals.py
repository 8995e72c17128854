"""Speed fixes proposed for modules this package does not own, kept here so they can be timed and
tested for equality with the current code.

Nothing is pending: the CBN forward proposed here (``fast_cbn_forward``) is now
``CompleteBatchNorm.forward`` (``bnlab/nn/cbn.py``, with fused autograd Functions for the
centring/scale presets). The two names below are kept as aliases only because
``benchmarks/train_step.py`` (``PROPOSED`` pairs) and ``tests/test_bench.py`` still import them;
they add nothing over the plain module and can be deleted with those references.
"""

from __future__ import annotations

from torch import nn

from ..nn.cbn import CompleteBatchNorm

__all__ = ["fast_cbn_forward", "proposed_cbn"]

#: Alias of :meth:`CompleteBatchNorm.forward` (integrated).
fast_cbn_forward = CompleteBatchNorm.forward


def proposed_cbn(*args, **kwargs) -> nn.Module:
    """Alias: a plain :class:`CompleteBatchNorm` (the proposed forward is integrated)."""
    return CompleteBatchNorm(*args, **kwargs)
