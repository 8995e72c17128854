"""Diagnostics: the three SGD effects of Complete BN (:func:`three_effects`)."""

from .three_effects import ThreeEffects, three_effects

__all__ = ["ThreeEffects", "three_effects"]
