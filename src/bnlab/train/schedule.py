"""Learning-rate schedules as pure functions of the step (so resuming needs no scheduler state)."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, total_steps: int, schedule: str, milestones: list[float], gamma: float,
              warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at optimisation step ``step`` (0-based).

    * linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then
    * ``constant``: 1; ``multistep``: ``gamma ** k`` after the k-th milestone (milestones are
      fractions of ``total_steps``; non-compounding beyond gamma**k, as in He et al. 2016);
      ``cosine``: ``0.5 * (1 + cos(pi * t))`` with t the fraction of the post-warm-up steps done.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "multistep":
        k = sum(step >= int(round(m * total_steps)) for m in milestones)
        return gamma**k
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        t = min(max(step - warmup_steps, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule {schedule!r}; expected constant, multistep or cosine")
