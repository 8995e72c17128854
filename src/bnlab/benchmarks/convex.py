"""The convex solver against CVXPY / pyscnn: delegated to the convex engineer's
``bench/bench_convex.py`` (imported by path, never copied). Its function is looked up by name
(``bench_convex``, ``run_benchmarks``, ``run``, ``benchmark``) and called with ``quick=`` (and
``device=`` when it accepts it); rows it returns (mappings with ``name``, ``ours_ms``,
``baseline_ms`` and optionally ``shape``, ``dtype``, ``baseline``) become results."""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .timing import Result, Settings, Skip

__all__ = ["run", "find_bench_script"]

_FUNCS = ("bench_convex", "run_benchmarks", "run", "benchmark")


def find_bench_script() -> Path | None:
    """``bench/bench_convex.py`` of the source checkout (next to ``src/``), or None."""
    root = Path(__file__).resolve().parents[3]
    p = root / "bench" / "bench_convex.py"
    return p if p.is_file() else None


def run(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    path = find_bench_script()
    if path is None:
        raise Skip("not available: bench/bench_convex.py (convex engineer) has not landed")
    spec = importlib.util.spec_from_file_location("_bnlab_bench_convex", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # its dependencies (cvxpy, pyscnn) may be missing
        raise Skip(f"not available: importing {path} failed ({type(e).__name__}: {e})") from e
    fn = next((getattr(mod, n) for n in _FUNCS if callable(getattr(mod, n, None))), None)
    if fn is None:
        raise Skip(f"not available: {path} defines none of {_FUNCS}")
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (("quick", quick), ("device", device.type)) if k in params}
    rows = fn(**kwargs)
    if rows is None:
        raise Skip(f"{path}:{fn.__name__} printed its own table and returned no rows")
    for row in rows:
        if isinstance(row, Result):
            yield row
            continue
        if not isinstance(row, Mapping):
            raise Skip(f"{path}:{fn.__name__} returned {type(row).__name__} rows; expected mappings")
        yield Result(f"convex/{row.get('name', '?')}", float(row.get("ours_ms", math.nan)),
                     float(row.get("baseline_ms", math.nan)), str(row.get("shape", "")),
                     str(row.get("dtype", "float64")), str(row.get("device", device.type)),
                     baseline=str(row.get("baseline", "CVXPY")))
