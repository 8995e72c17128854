"""Where the admm-network speed-up comes from (session 3): the same problem as bench_convex.py (data,
whitening, patterns), solved by ``solve(prob, "admm-network", tol)`` with the variants

* ``before``: the general ADMM loop (``fast=False``; Anderson acceleration on, its default; float64) = the code
  before session 3;
* ``no-AA``: the general loop without Anderson (``fast=False, anderson=0``);
* ``fast-f64``: the fast path (``admm.admm_network``: (C, N, 2P) layout, arithmetic masks) in float64;
* ``fast-f32``: the fast path with float32 bulk iterations (the default).

Prints process CPU s (median of ``--repeat``), wall s, iterations, the certified value and gap per variant.

    python bench/convex_network_ablation.py --sizes 1000,20,200 2000,20,400 [--repeat 3] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

VARIANTS = {"before": {"fast": False}, "no-AA": {"fast": False, "anderson": 0},
            "fast-f64": {"iter_dtype": torch.float64}, "fast-f32": {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["1000,20,200", "2000,20,400"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_convex import _data

    from bnlab.convex import ConvexBNProblem, sample_patterns, solve, whiten

    print("size | variant | CPU s (median) | wall s | iters | network objective | dual bound | gap | load1")
    for s in a.sizes:
        n, k, gates = (int(v) for v in s.split(","))
        label, X, y, beta = _data(n)
        wh = whiten(X, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            D = sample_patterns(wh.Up, gates, seed=0)
        prob = ConvexBNProblem(torch.as_tensor(wh.Up), torch.as_tensor(D), torch.as_tensor(y), beta)
        for name, opts in VARIANTS.items():
            runs = []
            for _ in range(a.repeat):
                c, w = time.process_time(), time.perf_counter()
                sol = solve(prob, "admm-network", tol=a.tol, max_iter=100000, admm_options=dict(opts))
                runs.append((time.process_time() - c, time.perf_counter() - w, sol))
            cpu, wall, sol = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            print(f"{label} n={len(y)} q={wh.q} P={D.shape[1]} | {name} | {cpu:.2f} | {wall:.2f} | {sol.iterations} | "
                  f"{sol.objective:.6f} | {sol.dual_bound:.6f} | {sol.gap:+.1e} | {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
