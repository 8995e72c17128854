"""Suite ``convex``: convex optimum vs SGD/Adam on the same BN-ReLU net, implicit-regularisation
variants (E1 truncated whitening, E2 spectral weighting) vs GD (ICLR 2022 convex BN; docs/results/convex.md).

Full mode = the deliverable-8 grid of docs/results/convex.md §3-§4: CIFAR-10 (airplane/automobile) and
Fashion-MNIST (T-shirt/shirt), 2 and 10 classes, n in {500, 2000, 10000}: convex E1 (admm-network) vs SGD and
Adam from 3 random starts at the recovered width, plus the pattern-seeded convex row; then (part b, n=2000,
2 classes) E1 k in {5, 20, 50} and E2 (k=50, p in {0.5, 1}) vs full-batch GD on the full input. Hours of CPU.
Quick mode: the same two parts on tiny sklearn-digits subsets with Clarabel (a few seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

from bnlab.suites import Suite

_COLS_A = ["model", "runs", "diverged", "NC_best", "NC_mean", "excess_best", "dual_bound", "gap", "width",
           "train_acc", "test_acc", "time_s"]
_COLS_B = ["model", "NC_objective", "convex_objective", "gap", "width", "train_acc", "test_acc", "E_top5",
           "E_top20", "time_s"]


def _table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(["data"] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [r["data"]] + [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def grid(quick: bool, root: Path) -> tuple[list[dict], list[dict]]:
    """(part a setups, part b setups): dicts with data name, npz path, classes, n, n_test, beta, k, P."""
    if quick:
        a = [dict(label="digits 0/1", name="digits", root=None, classes=[0, 1], n=60, n_test=100, beta=0.05,
                  k=5, P=20),
             dict(label="digits 3-class", name="digits", root=None, classes=[0, 1, 2], n=60, n_test=100,
                  beta=0.1, k=4, P=10)]
        b = [dict(label="digits 0/1", name="digits", root=None, classes=[0, 1], n=60, n_test=100, beta=0.05,
                  ks=(3, 8), spectral=((8, 1.0),), P=20)]
        return a, b
    data = [("cifar10", [0, 1]), ("fashion_mnist", [0, 6])]
    a = [dict(label=f"{name} {'2' if two else '10'}-class", name=name, root=str(root / f"{name}.npz"),
              classes=cl if two else None, n=n, n_test=2000, beta=1.0, k=20, P=200 if two else 50)
         for name, cl in data for two in (True, False) for n in (500, 2000, 10000)]
    b = [dict(label=f"{name} 2-class", name=name, root=str(root / f"{name}.npz"), classes=cl, n=2000,
              n_test=2000, beta=1.0, ks=(5, 20, 50), spectral=((50, 0.5), (50, 1.0)), P=200) for name, cl in data]
    return a, b


def suite(quick: bool = False, data_dir: str | None = None) -> Suite:
    root = Path(data_dir) if data_dir else Path("/work/shared/data")

    def runner(out_dir: Path, seeds: list[int], quick_run: bool) -> str:
        from bnlab.convex.experiments import convex_vs_restarts, implicit_vs_gd, load_flat, restart_summary

        q = quick or quick_run
        setups_a, setups_b = grid(q, root)
        solver = "clarabel" if q else "admm-network"
        rows_a, rows_b = [], []
        for seed in seeds[:1] if q else seeds:
            for s in setups_a:
                Xtr, ytr, Xte, yte = load_flat(s["name"], s["root"], s["classes"], s["n"], s["n_test"], seed)
                n = len(ytr)
                opts = (("sgd", {"lr": 0.05 / n, "epochs": 5 if q else 30, "batch_size": max(2, n // 10)}),
                        ("adam", {"lr": 3e-2, "epochs": 20 if q else 150}))
                rows = convex_vs_restarts(Xtr, ytr, Xte, yte, s["beta"], s["k"], s["P"], opts,
                                          (0,) if q else (0, 1, 2), seed, solver=solver, tol=1e-4, max_iter=5000)
                for r in restart_summary(rows):
                    rows_a.append({**r, "data": f"{s['label']} n={n} beta={s['beta']} seed={seed}"})
            for s in setups_b:
                Xtr, ytr, Xte, yte = load_flat(s["name"], s["root"], s["classes"], s["n"], s["n_test"], seed)
                n = len(ytr)
                gd = (("sgd", {"lr": 0.05 / n, "epochs": 20 if q else 150, "width": 50 if q else 200}),)
                for r in implicit_vs_gd(Xtr, ytr, Xte, yte, s["beta"], s["ks"], s["spectral"], s["P"], gd, seed,
                                        solver=solver, tol=1e-4, max_iter=5000, tops=(5, 20)):
                    rows_b.append({**r, "data": f"{s['label']} n={n} beta={s['beta']} seed={seed}"})
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "convex_rows.json").write_text(json.dumps({"a": rows_a, "b": rows_b}, indent=1))
        return ("## Convex BN-ReLU: convex optimum vs non-convex training\n\n"
                "(NC) objective evaluated on each final network with full-batch BN statistics. (a) convex rows "
                "solve the E1-restricted program over the sampled patterns (an upper bound on its optimum); the "
                "non-convex nets (best / mean over starts) train the same restricted (NC) at the recovered width; "
                "the last convex row adds the best run's patterns (certified <= that run).\n\n"
                + _table(rows_a, _COLS_A)
                + "\n\n(b) implicit regularisation: E1 / E2 convex variants vs full-batch GD on the full input; "
                "E_topj = §5.3 energy in the top-j whitened directions.\n\n" + _table(rows_b, _COLS_B))

    return Suite(name="convex", description="exact convex BN-ReLU training vs SGD/Adam; E1/E2 vs GD",
                 seeds=[0], runner=runner)
