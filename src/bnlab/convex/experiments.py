"""Data helpers and experiment runners for the convex BN-ReLU method (docs/results/convex.md).

* :func:`load_flat`: seeded class-stratified subsets of the shared image data sets, flattened, /255.
* :func:`compare_convex_vs_nonconvex`: convex optimum (for each E1 truncation k) vs non-convex optimisers.
* :func:`convex_vs_restarts` (deliverable 8a): the convex E1-k optimum vs SGD and Adam from several
  random starts on the *same* restricted (NC) objective (first layer in span V_k, width = recovered width).
* :func:`implicit_vs_gd` (deliverable 8b, spec §5): E1 top-k and E2 spectral variants vs full-batch GD on
  the unrestricted non-convex BN net: (NC), accuracy and the §5.3 energy (top-j mass) of each network.
* :func:`restart_summary`: best / mean over the random starts of :func:`convex_vs_restarts` rows.
* :func:`realised_patterns` / :func:`fit_with_patterns`: "pattern seeding": solve (C-BN) over the sampled
  patterns *plus* the activation patterns realised by a trained network (spec §8 item 8). The trained
  network is then a feasible point of the program, so the certified convex network's (NC) is <= its (NC).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

__all__ = ["load_flat", "compare_convex_vs_nonconvex", "convex_vs_restarts", "implicit_vs_gd",
           "restart_summary", "realised_patterns", "fit_with_patterns", "main"]


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


def _targets(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, C') targets of the classifier's (NC): ±1 column for 2 classes, one-hot 0/1 otherwise."""
    yi = np.searchsorted(classes, y)
    return (2.0 * yi - 1)[:, None] if len(classes) == 2 else np.eye(len(classes))[yi]


def _fit_row(clf, label: str, Xtr, ytr, Xte, yte, beta: float, wh_ref=None, tops=(), fit=None) -> dict:
    """Fit ``clf`` (timed; ``fit()`` instead of ``clf.fit(Xtr, ytr)`` when given) and return the common row:
    (NC) of the final network with full-batch BN statistics, certificate, width, train/test accuracy,
    wall time and (with ``wh_ref``) the §5.3
    top-j energy masses ``E_top{j}``."""
    from .implicit import top_energy
    from .recover import nc_objective

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(Xtr, ytr) if fit is None else fit()
    dt = time.perf_counter() - t0
    Y = _targets(clf.classes_, ytr)
    with torch.no_grad():
        nc = float(nc_objective(clf.to_torch(), torch.as_tensor(Xtr), torch.as_tensor(Y), clf.beta))
    cert = clf.certificate_
    row = {"model": label, "NC_objective": nc, "convex_objective": cert["objective"],
           "dual_bound": cert["dual_bound"], "gap": cert["relative_gap"], "width": clf.params_.width,
           "train_acc": float(clf.score(Xtr, ytr)), "test_acc": float(clf.score(Xte, yte)), "time_s": dt,
           "iterations": int(cert["iterations"])}
    if wh_ref is not None and tops:
        row.update({f"E_top{j}": float(e) for j, e in zip(tops, top_energy(clf.params_, wh_ref, Xtr, tops))})
    return row


def realised_patterns(clf, X: np.ndarray) -> np.ndarray:
    """(n, m) bool activation patterns ``1[BN(X w_j) >= 0]`` of a fitted estimator's network on its
    training data X (n, d) (paper-convention BN with the training statistics ``bn_mean_``, ``bn_norm_``)."""
    p = clf.params_
    safe = np.where(clf.bn_norm_ > 0, clf.bn_norm_, 1.0)
    Hn = (np.asarray(X, dtype=np.float64) @ p.W - clf.bn_mean_) / safe * p.gamma + p.alpha / np.sqrt(X.shape[0])
    return Hn >= 0


def fit_with_patterns(clf, X: np.ndarray, y: np.ndarray, extra: np.ndarray | None = None):
    """Fit the convex ``ConvexBNClassifier`` ``clf`` (squared loss, no E2) like ``clf.fit`` but over the
    sampled patterns united with ``extra`` (n, m) bool (e.g. :func:`realised_patterns` of a trained net);
    duplicates and the zero pattern are dropped. Returns ``clf`` fitted (same attributes as ``fit``)."""
    from sklearn.utils import check_random_state

    from .patterns import sample_patterns, whiten
    from .problem import ConvexBNProblem
    from .recover import recover
    from .solvers import solve

    if clf.loss != "squared" or clf.spectral_p != 0 or clf.solver in ("gd", "sgd", "adam"):
        raise ValueError(f"fit_with_patterns needs a convex solver, loss='squared', spectral_p=0; got "
                         f"solver={clf.solver!r}, loss={clf.loss!r}, spectral_p={clf.spectral_p!r}")
    X = np.asarray(X, dtype=np.float64)
    if extra is not None and (extra.ndim != 2 or extra.shape[0] != X.shape[0]):
        raise ValueError(f"extra must be a bool array of shape (n_samples={X.shape[0]}, m), got shape "
                         f"{np.shape(extra)}")
    clf.classes_ = np.unique(y)
    clf.n_features_in_ = X.shape[1]
    Y = _targets(clf.classes_, y).T                                     # (C', n) as in ConvexBNClassifier.fit
    wh = whiten(X, clf.k)
    seed = int(check_random_state(clf.random_state).randint(2**31 - 1))   # the estimator's gate seed
    D = sample_patterns(wh.Up, int(clf.n_patterns), seed, clf.pattern_space, X=X, warn=False)
    if extra is not None:
        D = np.unique(np.hstack([D, extra.astype(bool)]).T, axis=0).T
        D = D[:, D.any(0)]
    T = torch.as_tensor
    prob = ConvexBNProblem(T(wh.Up), T(D), T(Y), float(clf.beta), "squared")
    kw = {} if clf.solver in ("cvxpy", "clarabel", "scs") else {"max_iter": clf.max_iter, "device": clf.device}
    sol = solve(prob, "admm-network" if clf.solver == "auto" else clf.solver, tol=clf.tol, **kw)
    clf.whitening_, clf.solution_, clf.patterns_, clf.n_iter_ = wh, sol, D, max(1, sol.iterations)
    clf.params_ = recover(sol.W, wh)
    H = X @ clf.params_.W
    clf.bn_mean_ = H.mean(0)
    clf.bn_norm_ = np.linalg.norm(H - clf.bn_mean_, axis=0)
    return clf


def compare_convex_vs_nonconvex(Xtr, ytr, Xte, yte, beta: float, n_patterns: int = 200,
                                ks=(None,), gd=(("adam", {"lr": 1e-2, "epochs": 300}),),
                                seed: int = 0, solver: str = "auto", tol: float = 1e-6,
                                max_iter: int = 20000) -> list[dict]:
    """Fit the convex classifier (for each k) and the non-convex BN net (for each optimiser) with the
    same (NC) objective; return rows with objective, certificate, train/test accuracy and time."""
    from .estimator import ConvexBNClassifier

    rows = []
    configs = [(f"convex k={k} ({solver})", dict(solver=solver, k=k, n_patterns=n_patterns, tol=tol,
                                                  max_iter=max_iter)) for k in ks]
    configs += [(f"non-convex {name}", dict(solver=name, gd_options=opts)) for name, opts in gd]
    for label, kw in configs:
        clf = ConvexBNClassifier(beta=beta, random_state=seed, **kw)
        rows.append(_fit_row(clf, label, Xtr, ytr, Xte, yte, beta))
    return rows


def convex_vs_restarts(Xtr, ytr, Xte, yte, beta: float, k: int | None, n_patterns: int,
                       optimizers=(("sgd", {"lr": 1e-2, "epochs": 50, "batch_size": 100}),
                                   ("adam", {"lr": 1e-2, "epochs": 200})),
                       starts=(0, 1, 2), seed: int = 0, solver: str = "admm-network", tol: float = 1e-4,
                       max_iter: int = 20000, width: int | None = None, seeded: bool = True) -> list[dict]:
    """Deliverable 8a. One convex row (E1 truncation ``k``, ``n_patterns`` gates, ``solver``) and, for each
    optimiser ``(name, options)`` and random start, one row of the non-convex BN net on the **same**
    (NC): first layer restricted to span(V_k) (trained on the PCA-k whitened coordinates, as the estimator
    does for ``k``), same β, width = the convex network's recovered width (or ``width``). Rows carry
    ``start`` (init seed; None for the convex row) and ``excess`` = NC / convex NC - 1. With ``seeded``, a
    last convex row solves over the sampled patterns plus those realised by the best non-convex run
    (:func:`fit_with_patterns`): its (NC) is certified <= that run's (NC) (up to ``tol``)."""
    from .estimator import ConvexBNClassifier

    cvx = ConvexBNClassifier(beta=beta, random_state=seed, solver=solver, k=k, n_patterns=n_patterns,
                             tol=tol, max_iter=max_iter)
    rows = [_fit_row(cvx, f"convex k={k} P={n_patterns} ({solver})", Xtr, ytr, Xte, yte, beta)]
    rows[0]["start"] = None
    m = int(width or rows[0]["width"])
    fitted = []
    for name, opts in optimizers:
        for s in starts:
            clf = ConvexBNClassifier(beta=beta, random_state=s, solver=name, k=k,
                                     gd_options={**opts, "width": m})
            r = _fit_row(clf, f"non-convex {name} k={k} m={m}", Xtr, ytr, Xte, yte, beta)
            r["start"] = s
            rows.append(r)
            fitted.append((r["NC_objective"], clf))
    fitted = [f for f in fitted if np.isfinite(f[0])]
    if seeded and fitted:
        best = min(fitted, key=lambda f: f[0])[1]
        extra = realised_patterns(best, Xtr)
        sd = ConvexBNClassifier(beta=beta, random_state=seed, solver=solver, k=k, n_patterns=n_patterns,
                                tol=tol, max_iter=max_iter)
        r = _fit_row(sd, f"convex k={k} P={n_patterns} + patterns of best non-convex run ({solver})", Xtr,
                     ytr, Xte, yte, beta, fit=lambda: fit_with_patterns(sd, Xtr, ytr, extra))
        r["start"] = None
        rows.append(r)
    for r in rows:
        r["excess"] = r["NC_objective"] / rows[0]["NC_objective"] - 1.0
    return rows


def restart_summary(rows: list[dict]) -> list[dict]:
    """Collapse rows of :func:`convex_vs_restarts` per model: best (min) and mean (NC) over the finite runs,
    ``diverged`` = number of runs with a non-finite (NC), mean ± std of test accuracy (all runs), mean train
    accuracy and time, number of starts ``runs``."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    summ = []
    for model, rs in out.items():
        nc = np.array([r["NC_objective"] for r in rs])
        ok = np.isfinite(nc)
        te = np.array([r["test_acc"] for r in rs])
        best = float(nc[ok].min()) if ok.any() else float("nan")
        ex = [r["excess"] for r in rs if np.isfinite(r["excess"])]
        summ.append({"model": model, "runs": len(rs), "diverged": int((~ok).sum()), "NC_best": best,
                     "NC_mean": float(nc[ok].mean()) if ok.any() else float("nan"),
                     "excess_best": min(ex) if ex else float("nan"), "gap": rs[0]["gap"],
                     "dual_bound": rs[0]["dual_bound"], "width": rs[0]["width"],
                     "train_acc": float(np.mean([r["train_acc"] for r in rs])), "test_acc": float(te.mean()),
                     "test_acc_std": float(te.std()), "time_s": float(np.mean([r["time_s"] for r in rs]))})
    return summ


def implicit_vs_gd(Xtr, ytr, Xte, yte, beta: float, ks=(5, 20, 50), spectral=((100, 0.5), (100, 1.0)),
                   n_patterns: int = 300, gd=(("sgd", {"lr": 1e-5, "epochs": 300, "width": 100}),),
                   seed: int = 0, solver: str = "admm-network", tol: float = 1e-4, max_iter: int = 20000,
                   tops=(5, 20, 50), ref_k: int | None = None) -> list[dict]:
    """Deliverable 8b (spec §5.3-§5.4): convex E1 for each ``k`` in ``ks``, convex E2 for each ``(k, p)`` in
    ``spectral`` (truncation k, weights σ_1^p Σ^{-p}), and the non-convex BN net on the **full** input
    trained by each optimiser in ``gd`` (``("sgd", {...})`` with no ``batch_size`` = full-batch GD with
    heavy-ball momentum). Rows: (NC) of the *realised* network (for E2 also the unweighted BN objective),
    train/test accuracy, time, and the §5.3 energy ``E_top{j}`` for j in ``tops`` (whitening of Xtr with
    ``ref_k`` = max(tops) directions kept by default)."""
    from .estimator import ConvexBNClassifier
    from .patterns import whiten

    wh_ref = whiten(Xtr, ref_k or max(tops))
    rows = []
    for k in ks:
        clf = ConvexBNClassifier(beta=beta, random_state=seed, solver=solver, k=k, n_patterns=n_patterns,
                                 tol=tol, max_iter=max_iter)
        rows.append(_fit_row(clf, f"E1 k={k}", Xtr, ytr, Xte, yte, beta, wh_ref, tops))
    for k, p in spectral:
        clf = ConvexBNClassifier(beta=beta, random_state=seed, solver=solver, k=k, spectral_p=p,
                                 n_patterns=n_patterns, tol=tol, max_iter=max_iter)
        rows.append(_fit_row(clf, f"E2 k={k} p={p}", Xtr, ytr, Xte, yte, beta, wh_ref, tops))
    for name, opts in gd:
        label = "GD (full batch)" if name == "gd" or (name == "sgd" and "batch_size" not in opts) else name
        clf = ConvexBNClassifier(beta=beta, random_state=seed, solver=name, gd_options=opts)
        rows.append(_fit_row(clf, f"non-convex {label}, full input", Xtr, ytr, Xte, yte, beta, wh_ref, tops))
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
