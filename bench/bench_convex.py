"""Time-to-objective for (C-BN): bnlab ADMM (torch) vs CVXPY (Clarabel, SCS) vs pyscnn AL.

Data: CIFAR-10 airplane/automobile (0/1) flattened /255 (``/work/shared/data/cifar10.npz``, seeded subset) for
n > 300, else sklearn digits 0/1; top-k whitening (q = k+1), patterns from whitened Gaussian gates (seed 0).
Reference objective p_ref: Clarabel with tol_gap_rel = tol_gap_abs = tol (its own certificate). Every solver's
W is re-evaluated by bnlab on the same patterns: "rel" = (objective - p_ref)/|p_ref|, "viol" = max relative
cone violation. bnlab's time is to a *certified* relative duality gap <= tol: "ADMM" certifies the program
(repair + certify: an exactly cone-feasible point, violation <= 1e-13, whose objective is within tol of a
valid dual bound); "ADMM-network" certifies the recovered ReLU network (its (NC) value <= dual bound + tol).
Times are process CPU seconds (single-threaded solvers; robust to the load of other jobs on a shared machine),
wall seconds are reported alongside. pyscnn is optional (PYSCNN_PATH adds a site dir; missing: skipped).

    python bench/bench_convex.py [--quick] [--tol 1e-4] [--sizes 1000,20,200 ...] [--baselines clarabel,scs]
        [--no-program] [--repeat 5] [--baseline-json clarabel_1000.json]
--no-program skips the (slow) program-certificate solve; --repeat k runs each bnlab solve k times and reports
the median CPU time; --baseline-json takes the Clarabel row from bench/convex_clarabel_baseline.py's JSON
(one per size, same data/whitening/patterns; baseline CPU = its process_time around CVXPY's Problem.solve,
i.e. compilation + Clarabel, without data loading) instead of solving it in this process.
    bench_rows(quick) -> list[dict]   (name, size, ours_ms, baseline_ms, ratio = ours/baseline, speedup,
                                       rel_gap = (ours - baseline objective)/|baseline objective|, ...)
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
FULL_SIZES = [(500, 20, 100), (1000, 20, 200), (2000, 20, 400)]
BASELINES = ("clarabel", "scs", "pyscnn")
TARGET = 0.05                                  # the target: >= 20x faster than CVXPY/Clarabel


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
    """CIFAR-10 0/1 (airplane/automobile) if the shared file exists and n > 300, else sklearn digits 0/1
    (n <= 360). Returns (label, X (n, d), y (n,) in {-1, 1}, beta)."""
    from bnlab.convex.experiments import load_flat

    path = "/work/shared/data/cifar10.npz"
    if os.path.exists(path) and n > 300:
        X, y, _, _ = load_flat("cifar10", path, [0, 1], n, 10, seed=0)
        return "cifar10 0/1", X, np.where(y == 1, 1.0, -1.0), 1.0
    X, y, _, _ = load_flat("digits", None, [0, 1])
    return "digits 0/1", X[:n], np.where(y[:n] == 1, 1.0, -1.0), 0.05


def _timed(fn, *a, repeat: int = 1, **k):
    """(result, wall s, process CPU s); ``repeat`` > 1: the run with the median CPU time."""
    runs = []
    for _ in range(max(1, repeat)):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*a, **k)
        runs.append((out, time.perf_counter() - t, time.process_time() - c))
    return sorted(runs, key=lambda r: r[2])[len(runs) // 2]


class _Ext:
    """A baseline measured in another process (bench/convex_clarabel_baseline.py's JSON)."""

    def __init__(self, path: str):
        import json

        with open(path) as f:
            self.row = json.load(f)
        self.objective = float(self.row["objective"])
        self.violation = float(self.row["violation"])


def bench_rows(quick: bool = True, tol: float = 1e-4, sizes=None, baselines=BASELINES, pyscnn_tol: float = 1e-6,
               program_max_iter: int = 20000, network: bool = True, program: bool = True, repeat: int = 1,
               baseline_json=None) -> list[dict]:
    """One row per (size, baseline): ``ours_ms`` = bnlab ADMM's CPU time to a certified gap <= tol
    (program certificate; capped at ``program_max_iter``, then ``certified`` is False), ``baseline_ms`` = the
    baseline's CPU time at tolerance ``tol`` (Clarabel/SCS) or ``pyscnn_tol``; ``ratio`` = ours/baseline
    (``target`` 0.05 on the Clarabel row), ``speedup`` = baseline/ours, ``rel_gap`` = (our objective -
    baseline objective)/|baseline objective|. Plus one "ADMM-network vs Clarabel" row (``network``)."""
    return [r for rows in iter_rows(quick, tol, sizes, baselines, pyscnn_tol, program_max_iter, network, program,
                                    repeat, baseline_json) for r in rows]


def iter_rows(quick: bool = True, tol: float = 1e-4, sizes=None, baselines=BASELINES, pyscnn_tol: float = 1e-6,
              program_max_iter: int = 20000, network: bool = True, program: bool = True, repeat: int = 1,
              baseline_json=None):
    """As :func:`bench_rows`, yielding the rows of one size at a time. ``program=False``: no program-certificate
    solve (its row fields are NaN); ``baseline_json``: list (one per size) of JSON files of
    bench/convex_clarabel_baseline.py used as the Clarabel row instead of solving it here."""
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"baselines must be a subset of {BASELINES}, got {list(baselines)!r}")
    torch.set_num_threads(1)
    if os.environ.get("PYSCNN_PATH") and os.environ["PYSCNN_PATH"] not in sys.path:
        sys.path.insert(0, os.environ["PYSCNN_PATH"])
    for si, (n, k, gates) in enumerate(sizes or (QUICK_SIZES if quick else FULL_SIZES)):
        rows = []
        label, X, y, beta = _data(n)
        n = len(y)
        wh = whiten(X, k)
        cands = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            D = sample_patterns(wh.Up, gates, seed=0)
            prob = ConvexBNProblem(T(wh.Up), T(D), T(y), beta)
            if program:
                ours, w_ours, t_ours = _timed(solve, prob, "admm", tol=tol, max_iter=program_max_iter, repeat=repeat)
            if network:
                net, w_net, t_net = _timed(solve, prob, "admm-network", tol=tol, max_iter=100000, repeat=repeat)
                if not program:                                   # the network row only
                    ours, w_ours, t_ours = net, float("nan"), float("nan")
            if baseline_json:
                ext = _Ext(baseline_json[si])
                cands.append(("ADMM vs Clarabel", f"CVXPY+Clarabel (tol {tol:g}, separate process)",
                              float(ext.row["solve_wall_s"]), float(ext.row["solve_cpu_s"]), ext.objective,
                              ext.violation))
            elif "clarabel" in baselines:
                cl, w_cl, t_cl = _timed(solve, prob, "clarabel", tol=tol,
                                        solver_opts={"tol_gap_rel": tol, "tol_gap_abs": tol, "tol_feas": 1e-6})
                cands.append(("ADMM vs Clarabel", f"CVXPY+Clarabel (tol {tol:g})", w_cl, t_cl, cl.objective,
                              cl.violation))
            if "scs" in baselines:
                scs, w_scs, t_scs = _timed(solve, prob, "scs", tol=tol, solver_opts={"eps_abs": tol, "eps_rel": tol})
                cands.append(("ADMM vs SCS", f"CVXPY+SCS (eps {tol:g})", w_scs, t_scs, scs.objective, scs.violation))
            if "pyscnn" in baselines:
                c0 = time.process_time()
                ps = run_pyscnn(wh.Up, y, beta, gates, 0, pyscnn_tol)
                if ps is not None:
                    dt, W, Dp = ps
                    c_ps = time.process_time() - c0
                    pp = ConvexBNProblem(T(wh.Up), T(Dp), T(y), beta)
                    cands.append(("ADMM vs pyscnn", f"pyscnn AL (tol {pyscnn_tol:g})", dt, c_ps,
                                  float(pp.objective(T(W))), float(pp.violation(T(W)))))
        p_ref = cands[0][4] if cands and cands[0][0] == "ADMM vs Clarabel" else float("nan")
        size = f"{label} n={n} q={wh.q} P={D.shape[1]}"
        load = os.getloadavg()[0]
        if not program and not network:
            raise ValueError("nothing to run: program=False and network=False")
        base = {"size": size, "ours_ms": 1e3 * t_ours, "ours_wall_ms": 1e3 * w_ours, "gap": ours.gap,
                "objective": ours.objective, "dual_bound": ours.dual_bound,
                "ours_rel": (ours.objective - p_ref) / abs(p_ref),
                "ours_viol": ours.violation, "certified": ours.converged, "iterations": ours.iterations,
                "dtype": "float64", "device": "cpu", "load1": load}
        for name, bl, w_b, t_b, obj, viol in cands if program else []:
            rows.append(dict(base, name=name, baseline=bl, baseline_ms=1e3 * t_b, baseline_wall_ms=1e3 * w_b,
                             ratio=t_ours / t_b, speedup=t_b / t_ours, rel_gap=(ours.objective - obj) / abs(obj),
                             baseline_objective=obj, baseline_rel=(obj - p_ref) / abs(p_ref), baseline_viol=viol,
                             target=TARGET if name == "ADMM vs Clarabel" else None))
        if network and cands:
            _, bl, w_b, t_b, obj, viol = cands[0]
            rows.append(dict(base, name=f"ADMM-network {cands[0][0][5:]}", ours_ms=1e3 * t_net,
                             ours_wall_ms=1e3 * w_net, gap=net.gap, objective=net.objective,
                             dual_bound=net.dual_bound, ours_rel=(net.objective - p_ref) / abs(p_ref),
                             ours_viol=net.violation, certified=net.converged, iterations=net.iterations,
                             baseline=bl, baseline_ms=1e3 * t_b, baseline_wall_ms=1e3 * w_b, ratio=t_net / t_b,
                             speedup=t_b / t_net, rel_gap=(net.objective - obj) / abs(obj), baseline_objective=obj,
                             baseline_rel=(obj - p_ref) / abs(p_ref), baseline_viol=viol,
                             target=TARGET if cands[0][0] == "ADMM vs Clarabel" else None))
        if not cands and not program:
            rows.append(dict(base, name="ADMM-network (no baseline)", baseline="none", baseline_ms=float("nan"),
                             baseline_wall_ms=float("nan"), ratio=float("nan"), speedup=float("nan"),
                             rel_gap=float("nan"), baseline_objective=float("nan"), baseline_rel=float("nan"),
                             baseline_viol=float("nan"), target=None, ours_ms=1e3 * t_net, ours_wall_ms=1e3 * w_net))
        elif not cands:                                   # ours only (e.g. the baseline was run separately)
            rows.append(dict(base, name="ADMM (no baseline)", baseline="none", baseline_ms=float("nan"),
                             baseline_wall_ms=float("nan"), ratio=float("nan"), speedup=float("nan"),
                             rel_gap=float("nan"), baseline_objective=float("nan"), baseline_rel=float("nan"),
                             baseline_viol=float("nan"), target=None))
            if network:
                rows.append(dict(rows[-1], name="ADMM-network (no baseline)", ours_ms=1e3 * t_net,
                                 ours_wall_ms=1e3 * w_net, gap=net.gap, objective=net.objective,
                                 dual_bound=net.dual_bound, ours_viol=net.violation, certified=net.converged,
                                 iterations=net.iterations))
        yield rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--pyscnn-tol", type=float, default=1e-6, help="pyscnn AL tol and constraint_tol")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="comma list from clarabel,scs,pyscnn ('' = none)")
    ap.add_argument("--no-network", action="store_true", help="skip the admm-network rows")
    ap.add_argument("--sizes", nargs="*", default=None, help="n,k,gates triples")
    ap.add_argument("--program-max-iter", type=int, default=20000)
    ap.add_argument("--no-program", action="store_true", help="skip the (slow) program-certificate admm solve")
    ap.add_argument("--repeat", type=int, default=1, help="bnlab solves per size (median CPU reported)")
    ap.add_argument("--baseline-json", nargs="*", default=None,
                    help="Clarabel rows from bench/convex_clarabel_baseline.py JSON files (one per size)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split(",")) for s in a.sizes] if a.sizes else None
    bls = tuple(b for b in a.baselines.split(",") if b)
    print(f"tol={a.tol}; CPU s (wall s); rel = objective relative to Clarabel; ratio = ours/baseline (CPU)")
    print("size | row | ours CPU s (wall) (rel, gap, viol, certified, iters) | baseline | baseline CPU s (wall) "
          "(rel, viol) | ratio | speedup | load1")
    allrows = []
    for rows in iter_rows(a.quick, a.tol, sizes, bls, a.pyscnn_tol, a.program_max_iter, not a.no_network,
                          not a.no_program, a.repeat, a.baseline_json):
        for r in rows:
            allrows.append(r)
            print(f"{r['size']} | {r['name']} | {r['ours_ms'] / 1e3:.2f} ({r['ours_wall_ms'] / 1e3:.2f}) "
                  f"({r['ours_rel']:+.1e}, {r['gap']:.1e}, {r['ours_viol']:.0e}, certified={r['certified']}, "
                  f"{r['iterations']}) | {r['baseline']} | {r['baseline_ms'] / 1e3:.2f} "
                  f"({r['baseline_wall_ms'] / 1e3:.2f}) ({r['baseline_rel']:+.1e}, {r['baseline_viol']:.0e}) | "
                  f"{r['ratio']:.3f} | x{r['speedup']:.2f} | {r['load1']:.1f}", flush=True)
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(allrows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
