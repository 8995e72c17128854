"""Data helpers and experiment runners for the convex BN-ReLU method (docs/results/convex.md)."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

__all__ = ["load_flat", "compare_convex_vs_nonconvex"]


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
                                seed: int = 0, solver: str = "auto") -> list[dict]:
    """Fit the convex classifier (for each k) and the non-convex BN net (for each optimiser) with the
    same (NC) objective; return rows with objective, certificate, train/test accuracy and time."""
    from .estimator import ConvexBNClassifier
    from .recover import nc_objective

    rows = []
    torch.set_num_threads(1)
    configs = [(f"convex k={k}", dict(solver=solver, k=k, n_patterns=n_patterns)) for k in ks]
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
