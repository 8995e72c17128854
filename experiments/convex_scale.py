"""Deliverable 8 of the convex BN issue at scale (docs/results/convex.md §3-§4).

Part a: convex optimum (E1 top-k, sampled patterns, admm-network) vs SGD / Adam from several random starts on
the same restricted (NC), width = recovered width, then the convex program seeded with the best run's patterns.
Part b: E1 top-k and E2 spectral variants vs full-batch GD on the full-input non-convex BN net (spec §5).

    python experiments/convex_scale.py a --data cifar10 --classes 0,1 --n 2000 --k 20 --patterns 200
    python experiments/convex_scale.py b --data fashion_mnist --classes 0,6 --n 2000

Rows are printed as markdown and written as JSON to ``--out``. Learning rates scale as 1/n because (NC) sums
the loss over the n samples (tuned once on Fashion 0/6 n=500: SGD lr 1e-4, batch 50).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bnlab.convex.experiments import convex_vs_restarts, implicit_vs_gd, load_flat, restart_summary


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["a", "b"])
    ap.add_argument("--data", default="cifar10", choices=["cifar10", "fashion_mnist"])
    ap.add_argument("--classes", default="0,1", help="comma list; empty: all 10 classes")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=20, help="part a: E1 truncation")
    ap.add_argument("--patterns", type=int, default=200)
    ap.add_argument("--starts", type=int, default=3, help="part a: random starts per optimiser")
    ap.add_argument("--epochs", type=int, default=150, help="Adam (part a) / GD (part b) full-batch epochs")
    ap.add_argument("--sgd-epochs", type=int, default=30)
    ap.add_argument("--ks", default="5,20,50", help="part b: E1 truncations")
    ap.add_argument("--spectral", default="100:0.5,100:1", help="part b: E2 k:p pairs")
    ap.add_argument("--gd-width", type=int, default=200)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-seeded", action="store_true", help="part a: skip the pattern-seeded convex row")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    classes = [int(c) for c in a.classes.split(",")] if a.classes else None
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = load_flat(a.data, f"/work/shared/data/{a.data}.npz", classes, a.n, a.n_test, a.seed)
    n = len(ytr)
    label = f"{a.data} {len(np.unique(ytr))}-class n={n}"
    if a.part == "a":
        opts = (("sgd", {"lr": 0.05 / n, "epochs": a.sgd_epochs, "batch_size": max(2, n // 10)}),
                ("adam", {"lr": 3e-2, "epochs": a.epochs}))
        rows = convex_vs_restarts(Xtr, ytr, Xte, yte, a.beta, a.k, a.patterns, opts, tuple(range(a.starts)),
                                  a.seed, tol=a.tol, max_iter=a.max_iter, seeded=not a.no_seeded)
        cols = ["model", "runs", "diverged", "NC_best", "NC_mean", "excess_best", "dual_bound", "gap", "width",
                "train_acc", "test_acc", "test_acc_std", "time_s"]
        table = restart_summary(rows)
    else:
        ks = tuple(int(k) for k in a.ks.split(",") if k)
        spectral = tuple((int(kp.split(":")[0]), float(kp.split(":")[1])) for kp in a.spectral.split(",") if kp)
        gd = (("sgd", {"lr": 0.05 / n, "epochs": a.epochs, "width": a.gd_width}),)
        rows = implicit_vs_gd(Xtr, ytr, Xte, yte, a.beta, ks, spectral, a.patterns, gd, a.seed, tol=a.tol,
                              max_iter=a.max_iter, tops=(5, 20, 50, 100))
        cols = ["model", "NC_objective", "convex_objective", "dual_bound", "gap", "width", "train_acc", "test_acc",
                "E_top5", "E_top20", "E_top50", "E_top100", "time_s"]
        table = rows
    print(f"# {label} part {a.part}, beta={a.beta}, P={a.patterns}, seed={a.seed}, "
          f"total {time.perf_counter() - t0:.0f} s")
    print("| data | " + " | ".join(cols) + " |")
    for r in table:
        print(f"| {label} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"args": vars(a), "rows": rows, "summary": table}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
