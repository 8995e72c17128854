"""CVXPY + Clarabel baseline for issue 7, one size per process (bench_convex.py's data, whitening, patterns).

Reports the CPU of the whole process, of data loading / whitening / patterns, of CVXPY's ``Problem.solve``
(compilation + Clarabel), CVXPY's ``compilation_time``, Clarabel's own ``solver_stats.solve_time`` and the peak
RSS. Exactly the bench's settings: ``solve(prob, "clarabel", tol=tol, solver_opts={"tol_gap_rel": tol,
"tol_gap_abs": tol, "tol_feas": 1e-6})``.

    python bench/convex_clarabel_baseline.py --size 2000,20,400 [--tol 1e-4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch

C_START = time.process_time()                          # after the interpreter + numpy/torch imports


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", required=True, help="n,k,gates")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    n, k, gates = (int(v) for v in a.size.split(","))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cvxpy as cp
    from bench_convex import _data

    from bnlab.convex import ConvexBNProblem, sample_patterns, solve, whiten

    stats: list[dict] = []
    orig = cp.Problem.solve

    def timed_solve(self, *args, **kw):                 # CPU / wall of CVXPY's solve (compile + Clarabel)
        c, w = time.process_time(), time.perf_counter()
        out = orig(self, *args, **kw)
        st = self.solver_stats
        stats.append({"solve_cpu_s": time.process_time() - c, "solve_wall_s": time.perf_counter() - w,
                      "clarabel_solve_time_s": st.solve_time, "clarabel_iters": st.num_iters,
                      "cvxpy_compilation_time_s": getattr(self, "compilation_time", float("nan")),
                      "status": self.status})
        return out

    cp.Problem.solve = timed_solve
    c0, w0 = time.process_time(), time.perf_counter()
    label, X, y, beta = _data(n)
    wh = whiten(X, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        D = sample_patterns(wh.Up, gates, seed=0)
    T = torch.as_tensor
    prob = ConvexBNProblem(T(wh.Up), T(D), T(y), beta)
    c_data, w_data = time.process_time() - c0, time.perf_counter() - w0
    c1, w1 = time.process_time(), time.perf_counter()
    sol = solve(prob, "clarabel", tol=a.tol, solver_opts={"tol_gap_rel": a.tol, "tol_gap_abs": a.tol,
                                                          "tol_feas": 1e-6})
    c_call, w_call = time.process_time() - c1, time.perf_counter() - w1
    row = {"size": f"{label} n={len(y)} q={wh.q} P={D.shape[1]}", "tol": a.tol, "objective": sol.objective,
           "dual_bound": sol.dual_bound, "gap": sol.gap, "violation": sol.violation, "solver": sol.solver,
           "data_cpu_s": c_data, "data_wall_s": w_data, "solve_call_cpu_s": c_call, "solve_call_wall_s": w_call,
           **stats[-1], "process_cpu_s": time.process_time(), "process_cpu_after_imports_s": C_START,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
           "load1_end": os.getloadavg()[0], "utc_end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "cvxpy": cp.__version__, "W_norm": float(np.abs(sol.W).sum())}
    print(json.dumps(row, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
