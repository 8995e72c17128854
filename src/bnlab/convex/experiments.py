"""Data helpers and experiment runners for the convex BN-ReLU method (docs/results/convex.md)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

__all__ = ["load_flat", "compare_convex_vs_nonconvex", "main"]


def load_flat(name: str = "digits", root: str | None = None, classes: list[int] | None = None,
              n_train: int | None = None, n_test: int | None = None, seed: int = 0):
    """(Xtr, ytr, Xte, yte) float64, flattened, scaled to [0, 1], optional class subset and sizes
    (class-stratified random subsets, seeded). Uses ``bnlab.data.load``."""
    from bnlab.data import load

    ds = load(name, root=root)
    out = []
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        x = ds.__getattribute__(f"x_{split}").reshape(len(ds.__getattribute__(f"y_{split}")), -1).numpy()
        y = ds.__getattribute__(f"y_{split}").numpy()
        keep = np.isin(y, classes) if classes else np.ones(len(y), bool)
        idx = np.flatnonzero(keep)
        if n is not None and n < len(idx):
            idx = np.sort(rng.choice(idx, size=int(n), replace=False))
        out += [x[idx].astype(np.float64) / 255.0, y[idx]]
    return tuple(out)


def compare_convex_vs_nonconvex(Xtr, ytr, Xte, yte, beta: float, n_patterns: int = 200,
                                ks=(None,), gd=(("adam", {"lr": 1e-2, "epochs": 300}),),
                                seed: int = 0, solver: str = "auto", tol: float = 1e-6,
                                max_iter: int = 20000) -> list[dict]:
    """Fit the convex classifier (for each k) and the non-convex BN net (for each optimiser) with the
    same (NC) objective; return rows with objective, certificate, train/test accuracy and time."""
    from .estimator import ConvexBNClassifier
    from .recover import nc_objective

    rows = []
    torch.set_num_threads(1)
    configs = [(f"convex k={k} ({solver})", dict(solver=solver, k=k, n_patterns=n_patterns, tol=tol,
                                                  max_iter=max_iter)) for k in ks]
    configs += [(f"non-convex {name}", dict(solver=name, gd_options=opts)) for name, opts in gd]
    for label, kw in configs:
        clf = ConvexBNClassifier(beta=beta, random_state=seed, **kw)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(Xtr, ytr)
        dt = time.perf_counter() - t0
        C = len(clf.classes_)
        yi = np.searchsorted(clf.classes_, ytr)
        Y = (2.0 * yi - 1)[:, None] if C == 2 else np.eye(C)[yi]
        net = clf.to_torch()
        with torch.no_grad():
            nc = float(nc_objective(net, torch.as_tensor(Xtr), torch.as_tensor(Y), beta))
        cert = clf.certificate_
        rows.append({"model": label, "NC_objective": nc, "convex_objective": cert["objective"],
                     "dual_bound": cert["dual_bound"], "gap": cert["relative_gap"],
                     "width": clf.params_.width, "train_acc": clf.score(Xtr, ytr),
                     "test_acc": clf.score(Xte, yte), "time_s": dt})
    return rows


def main(argv=None) -> int:
    """``python -m bnlab.convex.experiments --data cifar10 --classes 0,1 --n 2000 --k 50 --patterns 300``:
    one table row per model (markdown), rows also written as JSON to ``--out``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--root", default=None, help="npz path (default /work/shared/data/<data>.npz)")
    ap.add_argument("--classes", default="0,1")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--k", type=int, nargs="*", default=[50])
    ap.add_argument("--patterns", type=int, default=300)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--solver", default="admm-network")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=20000)
    ap.add_argument("--adam-epochs", type=int, default=0, help="0: no Adam baseline")
    ap.add_argument("--sgd-epochs", type=int, default=0, help="0: no SGD baseline")
    ap.add_argument("--width", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    root = a.root or (None if a.data == "digits" else f"/work/shared/data/{a.data}.npz")
    classes = [int(c) for c in a.classes.split(",")] if a.classes else None
    Xtr, ytr, Xte, yte = load_flat(a.data, root, classes, a.n, a.n_test, a.seed)
    gd = []
    if a.adam_epochs:
        gd.append(("adam", {"lr": 1e-2, "epochs": a.adam_epochs, "width": a.width}))
    if a.sgd_epochs:
        gd.append(("sgd", {"lr": 1e-5, "epochs": a.sgd_epochs, "width": a.width, "batch_size": 100}))
    rows = compare_convex_vs_nonconvex(Xtr, ytr, Xte, yte, a.beta, a.patterns, tuple(a.k), tuple(gd), a.seed,
                                       solver=a.solver, tol=a.tol, max_iter=a.max_iter)
    label = f"{a.data} {len(np.unique(ytr))}-class n={len(ytr)} beta={a.beta} P={a.patterns} seed={a.seed}"
    for r in rows:
        print(f"| {label} | {r['model']} | {r['NC_objective']:.5g} | {r['dual_bound']:.5g} | {r['gap']:.1e} | "
              f"{r['width']} | {r['train_acc']:.3f} | {r['test_acc']:.3f} | {r['time_s']:.1f} |", flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
