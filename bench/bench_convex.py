"""Time-to-same-objective for (C-BN): bnlab AL (torch) vs CVXPY (Clarabel, SCS) vs pyscnn AL.

Reference optimum: Clarabel. Each solver's objective is re-evaluated by bnlab on the same patterns;
"rel" = (objective - Clarabel) / Clarabel, "viol" = max cone violation (relative). Prints absolute times
and ratios to bnlab's time. pyscnn is optional (``pip install pyscnn``; PYSCNN_PATH adds a site dir).

    python bench/bench_convex.py [--quick] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch

from bnlab.convex import ConvexBNProblem, sample_patterns, solve, whiten
from bnlab.convex.experiments import load_flat

T = torch.as_tensor


def run_pyscnn(Up, y, beta, n_gates, seed, tol):
    """§7.4 recipe; returns (seconds, W (1, 2P, q), D (n, P)) or None if pyscnn is unavailable."""
    try:
        from scnn.metrics import Metrics
        from scnn.models import ConvexReLU
        from scnn.optimize import optimize_model
        from scnn.regularizers import NeuronGL1
        from scnn.solvers import AL
    except ImportError:
        return None
    n, q = Up.shape
    G = torch.randn(q, n_gates, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    model = ConvexReLU(G, c=1)
    t0 = time.perf_counter()
    fit, _ = optimize_model(model, AL(model, tol=tol, constraint_tol=tol), Metrics(), Up, y[:, None],
                            regularizer=NeuronGL1(beta / n), return_convex=True, unitize_data=False,
                            device="cpu", dtype="float64")
    dt = time.perf_counter() - t0
    D = (Up @ fit.G >= 0)
    W = np.concatenate([fit.parameters[0], fit.parameters[1]], 1)
    return dt, W, D


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--pyscnn-tol", type=float, default=1e-6, help="pyscnn AL tol and constraint_tol")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if os.environ.get("PYSCNN_PATH"):
        sys.path.insert(0, os.environ["PYSCNN_PATH"])
    sizes = [(60, 5, 30)] if a.quick else [(100, 10, 50), (200, 10, 100), (400, 20, 100)]
    Xa, ya, _, _ = load_flat("digits", None, [0, 1])
    print(f"digits 0/1, beta=0.05, tol={a.tol}; times in s; rel = objective rel. to Clarabel")
    print("n, k, P | Clarabel | SCS (rel, ratio) | bnlab AL (rel, viol) | pyscnn AL (rel, viol, ratio)")
    for n, k, gates in sizes:
        X, y = Xa[:n], np.where(ya[:n] == 1, 1.0, -1.0)
        wh = whiten(X, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            D = sample_patterns(wh.Up, gates, seed=0)
            prob = ConvexBNProblem(T(wh.Up), T(D), T(y), 0.05)
            ref, t_cl = timed(solve, prob, "clarabel")
            scs, t_scs = timed(solve, prob, "scs", solver_opts={"eps": a.tol})
            al, t_al = timed(solve, prob, "al", tol=a.tol, max_iter=200000)
            ps = run_pyscnn(wh.Up, y, 0.05, gates, 0, a.pyscnn_tol)
        p_ref = ref.objective

        def rel(v, p_ref=p_ref):
            return (v - p_ref) / p_ref
        line = (f"{n}, {k}, {D.shape[1]} | {t_cl:.2f} | {t_scs:.2f} ({rel(scs.objective):+.1e}, x{t_scs / t_al:.2f}) | "
                f"{t_al:.2f} ({rel(al.objective):+.1e}, {al.violation:.0e}) | ")
        if ps is None:
            line += "not installed"
        else:
            dt, W, Dp = ps
            pp = ConvexBNProblem(T(wh.Up), T(Dp), T(y), 0.05)
            Wt = T(W)
            line += f"{dt:.2f} ({rel(float(pp.objective(Wt))):+.1e}, {float(pp.violation(Wt)):.0e}, x{dt / t_al:.2f})"
        print(line + f" | Clarabel/bnlab x{t_cl / t_al:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
