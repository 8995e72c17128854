"""Markdown tables of runs grouped by name: mean ± std over seeds."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from .runs import Run

__all__ = ["group_runs", "mean_std", "format_table", "DEFAULT_COLUMNS"]

DEFAULT_COLUMNS = [("test_acc", "test acc (%)", 100.0), ("best_test_acc", "best test acc (%)", 100.0),
                   ("train_loss", "final train loss", 1.0), ("wall_time_s", "time (s)", 1.0)]


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.name].append(r)
    return dict(groups)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for no finite value."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _fmt(m: float, s: float, scale: float) -> str:
    if math.isnan(m):
        return "–"
    digits = 2 if scale == 100.0 else 1 if abs(m) >= 10 else 4
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def format_table(runs: list[Run], columns: list[tuple[str, str, float]] | None = None,
                 extra: list[str] | None = None) -> str:
    """One row per run name: ``n`` seeds, then mean ± std of each column."""
    cols = list(columns or DEFAULT_COLUMNS) + [(k, k, 1.0) for k in (extra or [])]
    head = "| method | seeds | " + " | ".join(c[1] for c in cols) + " |"
    sep = "|---|---|" + "---|" * len(cols)
    lines = [head, sep]
    for name, group in group_runs(runs).items():
        cells = []
        for key, _, scale in cols:
            m, s = mean_std([_get(r, key) for r in group])
            cells.append(_fmt(m, s, scale) if key != "wall_time_s" or math.isnan(m) else f"{m:.1f} ± {s:.1f}")
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _get(run: Run, key: str) -> Any:
    if key in run.summary:
        return run.summary[key]
    for row in reversed(run.metrics):
        if key in row:
            return row[key]
    return None
