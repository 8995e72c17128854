"""Reading finished run folders (``summary.json``, ``metrics.jsonl``, ``config.toml``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "read_run", "find_runs"]


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or self.path.name)


def read_run(path: str | Path) -> Run:
    """One run folder. Raises ``FileNotFoundError`` naming the folder if it has no summary."""
    path = Path(path)
    summary_file = path / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a finished run folder (no summary.json)")
    summary = json.loads(summary_file.read_text())
    metrics = []
    mfile = path / "metrics.jsonl"
    if mfile.is_file():
        for line in mfile.read_text().splitlines():
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line of a killed run: keep what is complete
    return Run(path, summary, metrics)


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Every finished run at or below each of ``paths`` (sorted by path)."""
    found: dict[Path, Run] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{str(p)!r} does not exist")
        candidates = [p] if (p / "summary.json").is_file() else [s.parent for s in p.rglob("summary.json")]
        for c in candidates:
            found[c.resolve()] = read_run(c)
    return [found[k] for k in sorted(found)]
