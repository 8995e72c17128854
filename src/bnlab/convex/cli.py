"""``bnlab convex``: exact convex training of a two-layer BN-ReLU network on a dataset by name."""

from __future__ import annotations

import argparse
import json
import time
import warnings

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convex", help="exact convex training of a two-layer BN-ReLU network "
                              "(Ergen, Sahiner et al., ICLR 2022), with a certificate")
    p.add_argument("--data", default="digits", help="dataset name for bnlab.data.load (default: digits)")
    p.add_argument("--data-dir", default=None, help="root/file of the dataset (e.g. /work/shared/data/cifar10.npz)")
    p.add_argument("--classes", default=None, help="comma-separated class subset, e.g. 0,1")
    p.add_argument("--n", type=int, default=None, help="number of training samples (random subset)")
    p.add_argument("--n-test", type=int, default=None, help="number of test samples")
    p.add_argument("--loss", default="squared", choices=["squared", "logistic", "hinge"])
    p.add_argument("--beta", type=float, default=1e-3, help="weight decay beta of (NC)")
    p.add_argument("--patterns", type=int, default=200, help="number of sampled gates")
    p.add_argument("--pattern-space", default="whitened", choices=["whitened", "raw"])
    p.add_argument("--solver", default="auto",
                   choices=["auto", "admm", "admm-network", "al", "fista", "cvxpy", "clarabel", "scs", "gd", "sgd",
                            "adam"])
    p.add_argument("--k", type=int, default=None, help="truncated whitening: keep the top-k directions (E1)")
    p.add_argument("--spectral-p", type=float, default=0.0, help="soft spectral weighting exponent (E2)")
    p.add_argument("--no-closed-form", action="store_true", help="force the iterative solver")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=20000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Fit ConvexBNClassifier and print objective, certificate, time and accuracies; returns 0."""
    from .estimator import ConvexBNClassifier
    from .experiments import load_flat

    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    Xtr, ytr, Xte, yte = load_flat(args.data, args.data_dir, classes, args.n, args.n_test, args.seed)
    clf = ConvexBNClassifier(beta=args.beta, loss=args.loss, n_patterns=args.patterns,
                             pattern_space=args.pattern_space, solver=args.solver, k=args.k,
                             spectral_p=args.spectral_p, closed_form="never" if args.no_closed_form else "auto",
                             tol=args.tol, max_iter=args.max_iter, device=args.device, random_state=args.seed,
                             verbose=not args.quiet)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(Xtr, ytr)
    elapsed = time.perf_counter() - t0
    cert = clf.certificate_
    res = {"data": args.data, "n_train": len(ytr), "n_test": len(yte), "classes": len(clf.classes_),
           "objective": cert["objective"], "dual_bound": cert["dual_bound"], "relative_gap": cert["relative_gap"],
           "max_violation": cert["max_violation"], "certified": cert["converged"], "solver": cert["solver"],
           "width": clf.params_.width, "time_s": elapsed, "train_acc": clf.score(Xtr, ytr),
           "test_acc": clf.score(Xte, yte) if len(yte) else float("nan"),
           "warnings": sorted({str(w.message)[:160] for w in caught})}
    if args.json:
        print(json.dumps(res))
    else:
        status = "certified optimal" if res["certified"] else "NOT certified"
        print(f"{args.data}: n={res['n_train']} classes={res['classes']} loss={args.loss} beta={args.beta}")
        print(f"objective {res['objective']:.6g}  dual bound {res['dual_bound']:.6g}  relative gap "
              f"{res['relative_gap']:.2e}  violation {res['max_violation']:.1e}  ({status}, {res['solver']})")
        print(f"time {elapsed:.2f} s  width {res['width']}  train acc {res['train_acc']:.4f}  "
              f"test acc {res['test_acc']:.4f}")
        for w in res["warnings"]:
            print(f"warning: {w}")
    return 0
