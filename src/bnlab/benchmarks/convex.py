"""The convex solver against CVXPY / pyscnn: delegated to the convex engineer's
``bench/bench_convex.py`` (imported by path, never copied).

If that module defines a row-returning function (``bench_rows`` (current), ``bench_convex``,
``run_benchmarks``, ``run``, ``benchmark``; called with ``quick=`` and ``device=`` when accepted,
returning mappings with ``name``, ``ours_ms``, ``baseline_ms``, ``size``/``shape`` and optionally ``target``,
``rel_gap``, ``certified``, ``gap``), its rows are used (``bench_rows``: CPU ms of bnlab ADMM to a certified
program gap <= 1e-4 against Clarabel / SCS / pyscnn, target ratio 0.05 against Clarabel).
Otherwise its ``main(argv)`` is run with
stdout captured and the table it prints (``n, k, P | Clarabel s | SCS s (...) | bnlab AL s (...) |
pyscnn ...``) is parsed into rows: bnlab AL against Clarabel and against SCS (CVXPY backends).
Skipped in ``--quick`` (``bench_rows(quick=True)`` still takes ~20 s of CPU; run it with
``python bench/bench_convex.py --quick``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .timing import Result, Settings, Skip

__all__ = ["run", "find_bench_script", "parse_table"]

_FUNCS = ("bench_rows", "bench_convex", "run_benchmarks", "run", "benchmark")
_NUM = r"([0-9.eE+-]+)"
_LINE = re.compile(rf"^\s*(\d+),\s*(\d+),\s*(\d+)\s*\|\s*{_NUM}\s*\|\s*{_NUM}[^|]*\|\s*{_NUM}[^|]*\|\s*([^|]*)")


def find_bench_script() -> Path | None:
    """``bench/bench_convex.py`` of the source checkout (next to ``src/``), or None."""
    root = Path(__file__).resolve().parents[3]
    p = root / "bench" / "bench_convex.py"
    return p if p.is_file() else None


def parse_table(text: str, device: str = "cpu") -> list[Result]:
    """Rows of ``bench_convex.main``'s printed table (times in seconds) as results in ms."""
    rows: list[Result] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        n, k, p = (int(v) for v in m.group(1, 2, 3))
        t_cl, t_scs, t_al = (float(v) * 1e3 for v in m.group(4, 5, 6))
        shape = f"n={n} k={k} P={p}"
        rows.append(Result("convex/AL vs Clarabel", t_al, t_cl, shape, "float64", device,
                           baseline="CVXPY+Clarabel (reference optimum)"))
        rows.append(Result("convex/AL vs SCS", t_al, t_scs, shape, "float64", device, baseline="CVXPY+SCS"))
        ps = re.match(rf"\s*{_NUM}\s*\(", m.group(7))
        if ps:
            rows.append(Result("convex/AL vs pyscnn", t_al, float(ps.group(1)) * 1e3, shape, "float64", device,
                               baseline="pyscnn AL"))
    return rows


_MAIN = ("name", "ours_ms", "baseline_ms", "shape", "size", "dtype", "device", "baseline", "target", "ratio")


def _result(row: Mapping, device: str) -> Result:
    """A ``bench_rows`` mapping as a :class:`Result` (ours/baseline in CPU ms; ``target`` kept, e.g. 0.05 =
    the issue's 20x against Clarabel; objective gap, certificate, iterations, wall times in ``extra``)."""
    tgt = row.get("target")
    note = ""
    if "rel_gap" in row:
        note = (f"rel. objective vs baseline {float(row['rel_gap']):+.1e}, certified={row.get('certified')}, "
                f"gap {float(row.get('gap', math.nan)):.1e}")
    return Result(f"convex/{row.get('name', '?')}", float(row.get("ours_ms", math.nan)),
                  float(row.get("baseline_ms", math.nan)), str(row.get("shape", row.get("size", ""))),
                  str(row.get("dtype", "float64")), str(row.get("device", device)),
                  baseline=str(row.get("baseline", "CVXPY")), target=None if tgt is None else float(tgt),
                  note=note, extra={k: v for k, v in row.items() if k not in _MAIN})


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("_bnlab_bench_convex", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # its dependencies (cvxpy, pyscnn) may be missing
        raise Skip(f"not available: importing {path} failed ({type(e).__name__}: {e})") from e
    return mod


def run(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    path = find_bench_script()
    if path is None:
        raise Skip("not available: bench/bench_convex.py (convex engineer) has not landed")
    if quick:
        raise Skip("skipped in --quick: bench/bench_convex.py --quick alone takes minutes here "
                   "(run `python bench/bench_convex.py --quick` or `bnlab bench --only convex`)")
    mod = _load(path)
    fn = next((getattr(mod, n) for n in _FUNCS if callable(getattr(mod, n, None))), None)
    if fn is not None:
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in (("quick", quick), ("device", device.type)) if k in params}
        for row in fn(**kwargs) or []:
            if isinstance(row, Result):
                yield row
            elif isinstance(row, Mapping):
                yield _result(row, device.type)
        return
    if not callable(getattr(mod, "main", None)):
        raise Skip(f"not available: {path} defines neither {_FUNCS} nor main()")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        mod.main([])
    text = buf.getvalue()
    print("  " + text.replace("\n", "\n  ").rstrip())
    rows = parse_table(text, device.type)
    if not rows:
        raise Skip(f"{path}: main() printed no table rows that could be parsed")
    yield from rows
