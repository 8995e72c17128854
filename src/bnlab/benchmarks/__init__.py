"""``bnlab bench``: speed of bnlab components against their baselines, as ratios (ours / baseline).

Families (``only=`` names): ``norms`` (norm-act forward+backward vs BatchNorm2d + activation),
``optim`` (PSISGD / GSGD step vs SGD foreach), ``train`` (resnet20 training step per norm x
optimiser vs BN + SGD; ``bnlab train`` end to end vs a hand-written loop), ``convex`` (delegated to
``bench/bench_convex.py``), ``data`` (DeviceLoader vs per-sample Python augmentation). Each result
is timed interleaved with its baseline in this process (warm-up, medians; see :mod:`.timing`).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .timing import Result, Settings, Skip, format_row, machine_info

__all__ = ["run_benchmarks", "collect", "FAMILIES", "Result", "Settings"]

#: family name -> module (each exposes ``run(quick, device, settings) -> Iterator[Result]``)
FAMILIES = {"norms": "norms", "optim": "optim", "train": "train_step", "convex": "convex", "data": "data"}


def _settings(quick: bool) -> Settings:
    if quick:
        return Settings(warmup=1, reps=2, min_sample_s=0.0)
    return Settings(warmup=3, reps=9, min_sample_s=0.05)


def _resolve(device: str) -> torch.device:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    return torch.device(device)


def _families(only: Iterable[str] | None) -> list[str]:
    if only is None:
        return list(FAMILIES)
    names = [n.strip() for n in only if n.strip()]
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise ValueError(f"only must name benchmark families from {', '.join(FAMILIES)}; got {list(only)!r}")
    return names


def collect(quick: bool = False, device: str = "cpu", only: Iterable[str] | None = None,
            settings: Settings | None = None, verbose: bool = True) -> tuple[list[Result], dict[str, str]]:
    """Run the chosen families; returns ``(results, skipped)`` where ``skipped`` maps a family
    (or benchmark) name to the reason it did not run."""
    dev = _resolve(device)
    names = _families(only)
    st = settings or _settings(quick)
    results: list[Result] = []
    skipped: dict[str, str] = {}
    for fam in names:
        if verbose:
            print(f"== {fam}", flush=True)
        try:
            mod = importlib.import_module(f"{__name__}.{FAMILIES[fam]}")
            for r in mod.run(quick, dev, st):
                results.append(r)
                if verbose:
                    print(format_row(r), flush=True)
        except Skip as e:
            skipped[fam] = str(e)
            if verbose:
                print(f"  skip {fam}: {e}", flush=True)
    return results, skipped


def run_benchmarks(quick: bool = False, device: str = "cpu", json_out: str | None = None,
                   only: list[str] | None = None, threads: int | None = None) -> int:
    """Run, print a table, optionally write JSON (machine info + rows). Returns an exit status:
    0 when every result is a finite number, 1 otherwise. ``threads`` sets torch's intra-op
    threads for the run (restored afterwards)."""
    _resolve(device)
    _families(only)
    old_threads = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        info = machine_info(device)
        print("bnlab bench: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        results, skipped = collect(quick, device, only)
    finally:
        torch.set_num_threads(old_threads)
    met = [r for r in results if r.met is not None]
    print(f"== {len(results)} results; targets met {sum(bool(r.met) for r in met)}/{len(met)}; "
          f"skipped: {', '.join(skipped) or 'none'}")
    if json_out:
        doc: dict[str, Any] = {"machine": info, "quick": quick, "results": [r.to_dict() for r in results],
                               "skipped": skipped}
        Path(json_out).write_text(json.dumps(doc, indent=2, default=str))
    finite = all(math.isfinite(r.ours_ms) and math.isfinite(r.baseline_ms) for r in results)
    return 0 if finite else 1
