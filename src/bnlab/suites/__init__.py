"""Named experiment suites for ``bnlab compare SUITE``.

A suite is either a list of :class:`~bnlab.train.config.RunConfig` variants run over several seeds
(the runner writes ``report.md`` with mean ± std and plots), or a custom ``runner`` callable for
experiments that are not training runs (the convex suite).

Each suite lives in ``bnlab/suites/<name>.py`` and exposes ``suite(quick: bool = False,
data_dir: str | None = None) -> Suite``; adding a file adds a suite.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Suite", "get_suite", "suite_names"]


@dataclass
class Suite:
    """``configs``: one RunConfig per method (its ``name`` labels the table row); ``seeds``: run
    each config once per seed. ``runner(out_dir, seeds, quick)`` replaces training runs when set
    and returns the markdown report. ``columns``: extra summary keys to tabulate."""

    name: str
    description: str
    configs: list = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    runner: Callable[[Path, list[int], bool], str] | None = None
    columns: list[str] = field(default_factory=list)
    notes: str = ""


def suite_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_suite(name: str, quick: bool = False, data_dir: str | None = None) -> Suite:
    if name not in suite_names():
        raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(suite_names())}")
    return importlib.import_module(f"bnlab.suites.{name}").suite(quick=quick, data_dir=data_dir)
