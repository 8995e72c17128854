"""Time-to-objective for (C-BN): bnlab ADMM (torch) vs CVXPY (Clarabel, SCS) vs pyscnn AL.

Reference objective p_ref: Clarabel run with tol_gap_rel = tol_gap_abs = tol (its own certificate).
Every solver's W is re-evaluated by bnlab on the same patterns: "rel" = (objective - p_ref)/p_ref,
"viol" = max relative cone violation. bnlab's time is to a *certified* relative duality gap <= tol:
"ADMM" certifies the program (gap and violation <= tol); "ADMM-network" certifies the recovered ReLU
network (its (NC) value <= dual bound of the sampled program + tol; cone violation then irrelevant).
pyscnn is optional (PYSCNN_PATH adds a site dir; missing: its rows are skipped).

    python bench/bench_convex.py [--quick] [--tol 1e-4] [--sizes 1000,20,200 ...] [--no-pyscnn]
    bench_rows(quick) -> list[dict]   (name, ours_ms, baseline_ms, ratio = baseline/ours, size, gap, ...)
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

T = torch.as_tensor
QUICK_SIZES = [(60, 5, 30), (200, 10, 100)]
FULL_SIZES = [(200, 10, 100), (500, 20, 100), (1000, 20, 200)]


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


def _data(n: int):
    """Fashion-MNIST T-shirt(0) vs shirt(6) if the shared file exists, else sklearn digits 0/1 (n <= 360)."""
    from bnlab.convex.experiments import load_flat

    path = "/work/shared/data/fashion_mnist.npz"
    if os.path.exists(path) and n > 300:
        X, y, _, _ = load_flat("fashion_mnist", path, [0, 6], n, 10, seed=0)
        return "fashion 0/6", X, np.where(y == 6, 1.0, -1.0), 1.0
    X, y, _, _ = load_flat("digits", None, [0, 1])
    return "digits 0/1", X[:n], np.where(y[:n] == 1, 1.0, -1.0), 0.05


def _timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def bench_rows(quick: bool = True, tol: float = 1e-4, sizes=None, pyscnn: bool = True,
               pyscnn_tol: float = 1e-6, program_max_iter: int = 5000) -> list[dict]:
    """One row per (size, baseline): ``ours_ms`` = bnlab ADMM to a certified gap <= tol, ``baseline_ms`` =
    the baseline's time at tolerance ``tol`` (Clarabel/SCS) or pyscnn_tol; ``ratio`` = baseline/ours.
    The "program" ADMM run stops at ``program_max_iter`` (then ``certified`` is False)."""
    return [r for rows in iter_rows(quick, tol, sizes, pyscnn, pyscnn_tol, program_max_iter) for r in rows]


def iter_rows(quick: bool = True, tol: float = 1e-4, sizes=None, pyscnn: bool = True, pyscnn_tol: float = 1e-6,
              program_max_iter: int = 5000):
    """As :func:`bench_rows`, yielding the rows of one size at a time."""
    torch.set_num_threads(1)
    if os.environ.get("PYSCNN_PATH") and os.environ["PYSCNN_PATH"] not in sys.path:
        sys.path.insert(0, os.environ["PYSCNN_PATH"])
    for n, k, gates in sizes or (QUICK_SIZES if quick else FULL_SIZES):
        rows = []
        label, X, y, beta = _data(n)
        n = len(y)
        wh = whiten(X, k)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            D = sample_patterns(wh.Up, gates, seed=0)
            prob = ConvexBNProblem(T(wh.Up), T(D), T(y), beta)
            cl, t_cl = _timed(solve, prob, "clarabel", tol=tol,
                              solver_opts={"tol_gap_rel": tol, "tol_gap_abs": tol, "tol_feas": 1e-6})
            scs, t_scs = _timed(solve, prob, "scs", tol=tol, solver_opts={"eps_abs": tol, "eps_rel": tol})
            ours, t_ours = _timed(solve, prob, "admm", tol=tol, max_iter=program_max_iter)
            net, t_net = _timed(solve, prob, "admm", tol=tol, max_iter=100000, certify="network")
            ps = run_pyscnn(wh.Up, y, beta, gates, 0, pyscnn_tol) if pyscnn else None
        p_ref = cl.objective
        size = f"{label} n={n} q={wh.q} P={D.shape[1]}"
        base = {"size": size, "ours_ms": 1e3 * t_ours, "gap": ours.gap, "ours_rel": (ours.objective - p_ref) / p_ref,
                "ours_viol": ours.violation, "certified": ours.converged,
                "dtype": "float64", "device": "cpu"}
        cands = [("ADMM vs Clarabel", "CVXPY+Clarabel (tol 1e-4)", t_cl, cl.objective, cl.violation),
                 ("ADMM vs SCS", "CVXPY+SCS (eps 1e-4)", t_scs, scs.objective, scs.violation)]
        if ps is not None:
            dt, W, Dp = ps
            pp = ConvexBNProblem(T(wh.Up), T(Dp), T(y), beta)
            cands.append(("ADMM vs pyscnn", f"pyscnn AL (tol {pyscnn_tol:g})", dt, float(pp.objective(T(W))),
                          float(pp.violation(T(W)))))
        for name, bl, t_b, obj, viol in cands:
            rows.append(dict(base, name=name, baseline=bl, baseline_ms=1e3 * t_b, ratio=t_b / t_ours,
                             baseline_rel=(obj - p_ref) / p_ref, baseline_viol=viol))
        nb = dict(base, ours_ms=1e3 * t_net, gap=net.gap, ours_rel=(net.objective - p_ref) / p_ref,
                  ours_viol=net.violation, certified=net.converged)
        rows.append(dict(nb, name="ADMM-network vs Clarabel", baseline=cands[0][1], baseline_ms=1e3 * t_cl,
                         ratio=t_cl / t_net, baseline_rel=0.0, baseline_viol=cl.violation))
        yield rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--pyscnn-tol", type=float, default=1e-6, help="pyscnn AL tol and constraint_tol")
    ap.add_argument("--no-pyscnn", action="store_true")
    ap.add_argument("--sizes", nargs="*", default=None, help="n,k,gates triples")
    ap.add_argument("--program-max-iter", type=int, default=5000)
    a = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split(",")) for s in a.sizes] if a.sizes else None
    print(f"tol={a.tol}; times in s; rel = objective relative to Clarabel; ratio = baseline time / ours")
    print("size | row | ours s (rel, gap, viol, certified) | baseline | baseline s (rel, viol) | ratio")
    for rows in iter_rows(a.quick, a.tol, sizes, not a.no_pyscnn, a.pyscnn_tol, a.program_max_iter):
        for r in rows:
            print(f"{r['size']} | {r['name']} | {r['ours_ms'] / 1e3:.2f} ({r['ours_rel']:+.1e}, {r['gap']:.1e}, "
                  f"{r['ours_viol']:.0e}, certified={r['certified']}) | {r['baseline']} | "
                  f"{r['baseline_ms'] / 1e3:.2f} ({r['baseline_rel']:+.1e}, {r['baseline_viol']:.0e}) | "
                  f"x{r['ratio']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
