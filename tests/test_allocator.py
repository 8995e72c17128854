"""``bnlab.train.allocator.tune_cpu_allocator``: applied once on glibc, skipped on opt-out."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from bnlab.train import allocator


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    return allocator


@pytest.mark.parametrize("env", [{"BNLAB_MALLOC_TUNING": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1"},
                                 {"MALLOC_MMAP_THRESHOLD_": "1"}])
def test_opt_out_and_glibc_variables_skip(fresh, env):
    assert fresh.tune_cpu_allocator(env) is False
    assert fresh.tune_cpu_allocator({}) is False  # decided once per process


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_applied_in_a_fresh_process_and_memory_still_works():
    code = ("import torch; from bnlab.train.allocator import tune_cpu_allocator as t; "
            "assert t({}) is True and t({'BNLAB_MALLOC_TUNING': '0'}) is True; "
            "x = [torch.ones(1 << 20) for _ in range(8)]; del x; y = torch.ones(1 << 24); "
            "assert float(y.sum()) == 2**24")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
