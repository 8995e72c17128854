"""Shared argument parsing of the thin ``bench/*.py`` scripts (they call :mod:`bnlab.benchmarks`)."""

from __future__ import annotations

import argparse

from bnlab.benchmarks import run_benchmarks
from bnlab.train.allocator import tune_cpu_allocator


def main(only: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", dest="json_out", default=None, help="write results as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the machine is shared)")
    a = p.parse_args()
    tune_cpu_allocator()  # as `bnlab bench` does (bnlab.train.allocator; BNLAB_MALLOC_TUNING=0 opts out)
    return run_benchmarks(quick=a.quick, device=a.device, json_out=a.json_out, only=only, threads=a.threads)
