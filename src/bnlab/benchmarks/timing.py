"""Shared timing helper: interleaved, warmed-up, median timings of "ours" against a baseline.

Both callables run in the same process, alternating (ours, base, base, ours, ...) so that load
from other processes on a shared machine hits both equally; each sample times ``inner`` calls
(calibrated so a sample lasts at least ``min_sample_s``) and the reported time is the median over
samples, per call, in milliseconds.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Result", "Skip", "Settings", "compare", "machine_info", "sync", "format_row", "markdown_table"]


class Skip(Exception):
    """A benchmark whose component has not landed (or cannot run here); the message says why."""


@dataclass
class Settings:
    """How hard to time: warm-up calls per side, samples per side, minimum seconds per sample."""

    warmup: int = 3
    reps: int = 9
    min_sample_s: float = 0.02


@dataclass
class Result:
    """One row: ``ratio = ours_ms / baseline_ms`` (lower is better; 1.0 = as fast as the baseline)."""

    name: str
    ours_ms: float
    baseline_ms: float
    shape: str
    dtype: str
    device: str
    baseline: str = ""
    target: float | None = None
    unit: str = "ms"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.baseline_ms > 0 and math.isfinite(self.baseline_ms):
            return self.ours_ms / self.baseline_ms
        return float("nan")

    @property
    def met(self) -> bool | None:
        """Whether the ratio meets ``target`` (None when there is no target)."""
        return None if self.target is None else bool(self.ratio <= self.target)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["met"] = self.met
        return d


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn: Callable[[], Any], n: int, device: torch.device | str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def compare(ours: Callable[[], Any], base: Callable[[], Any], settings: Settings,
            device: torch.device | str = "cpu") -> tuple[float, float]:
    """Median milliseconds per call of ``ours`` and ``base``, timed interleaved.

    ``settings.warmup`` calls of each first (alternating), then ``settings.reps`` samples of each,
    the order flipping every round. Returns ``(ours_ms, base_ms)``.
    """
    if settings.reps < 1:
        raise ValueError(f"reps must be >= 1, got {settings.reps}")
    first = [0.0, 0.0]
    for _ in range(max(settings.warmup, 1)):
        for k, fn in enumerate((ours, base)):
            first[k] = _time_calls(fn, 1, device)
    slowest = max(max(first), 1e-6)
    inner = max(1, math.ceil(settings.min_sample_s / slowest))
    samples: list[list[float]] = [[], []]
    for r in range(settings.reps):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for k in order:
            fn = ours if k == 0 else base
            samples[k].append(_time_calls(fn, inner, device) / inner)
    return statistics.median(samples[0]) * 1e3, statistics.median(samples[1]) * 1e3


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model, cores, torch threads, torch/python versions, GPU name (CUDA), load, UTC date."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    from ..train.allocator import allocator_tuned

    info["malloc_tuned"] = allocator_tuned()  # bnlab.train.allocator (the CLI and bench/ apply it)
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def format_row(r: Result) -> str:
    """One printed line: name, ours, baseline, ratio, target mark, shape, dtype, device."""
    mark = "" if r.target is None else (f"  ok (<= {r.target})" if r.met else f"  MISS (> {r.target})")
    return (f"{r.name:<34} ours {r.ours_ms:10.3f} {r.unit:<5} base {r.baseline_ms:10.3f} {r.unit:<5} "
            f"ratio {r.ratio:6.3f}{mark:<16} {r.shape} {r.dtype} {r.device}"
            + (f"  [{r.note}]" if r.note else ""))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows of a ``--json`` file as a Markdown table (name, ours, baseline, ratio, target)."""
    out = ["| benchmark | shape / size | dtype | ours | baseline | ratio | target |",
           "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        unit = r.get("unit", "ms")
        tgt = "" if r.get("target") is None else (f"<= {r['target']}: " + ("met" if r["met"] else "**missed**"))
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(f"| {r['name']}{note} | {r['shape']} | {r['dtype']} | {r['ours_ms']:.2f} {unit} | "
                   f"{r['baseline_ms']:.2f} {unit} ({r.get('baseline', '')}) | {r['ratio']:.2f} | {tgt} |")
    return "\n".join(out)
