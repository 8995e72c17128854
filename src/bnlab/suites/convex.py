"""Suite ``convex``: convex optimum vs SGD/Adam on the same BN-ReLU net, implicit-regularisation
variants (truncated whitening E1) and timings (ICLR 2022 convex BN; docs/results/convex.md)."""

from __future__ import annotations

import json
from pathlib import Path

from bnlab.suites import Suite


def _table(rows: list[dict]) -> str:
    cols = ["model", "NC_objective", "dual_bound", "gap", "width", "train_acc", "test_acc", "time_s"]
    out = ["| " + " | ".join(["data"] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [r["data"]] + [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def suite(quick: bool = False, data_dir: str | None = None) -> Suite:
    root = Path(data_dir) if data_dir else Path("/work/shared/data")

    def runner(out_dir: Path, seeds: list[int], quick_run: bool) -> str:
        from bnlab.convex.experiments import compare_convex_vs_nonconvex, load_flat

        q = quick or quick_run
        if q:
            setups = [("digits 0/1", "digits", None, [0, 1], 100, 0.05, (None, 5)),
                      ("digits 3-class", "digits", None, [0, 1, 2], 90, 0.1, (5,))]
            gd = (("adam", {"lr": 1e-2, "epochs": 100, "width": 50}),)
            P = 30
        else:
            setups = [("cifar10 2-class", "cifar10", root / "cifar10.npz", [0, 1], 2000, 1.0, (10, 50)),
                      ("fashion 2-class", "fashion_mnist", root / "fashion_mnist.npz", [0, 6], 2000, 1.0, (10, 50))]
            gd = (("adam", {"lr": 1e-2, "epochs": 300, "width": 100}),
                  ("sgd", {"lr": 1e-5, "epochs": 100, "width": 100, "batch_size": 100}))
            P = 300
        rows = []
        for seed in seeds[:1] if q else seeds:
            for label, name, r, classes, n, beta, ks in setups:
                Xtr, ytr, Xte, yte = load_flat(name, str(r) if r else None, classes, n, 1000, seed)
                for row in compare_convex_vs_nonconvex(Xtr, ytr, Xte, yte, beta, P, ks, gd, seed,
                                                       solver="clarabel" if q else "admm-network", tol=1e-4):
                    row.update(data=f"{label} n={n} beta={beta} seed={seed}")
                    rows.append(row)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "convex_rows.json").write_text(json.dumps(rows, indent=1))
        return ("## Convex BN-ReLU: convex optimum vs non-convex training\n\n"
                "(NC) objective evaluated on each final network with full-batch BN statistics; convex rows "
                "solve over the sampled patterns (an upper bound on the true optimum p*).\n\n" + _table(rows))

    return Suite(name="convex", description="exact convex BN-ReLU training vs SGD/Adam; truncated whitening",
                 seeds=[0], runner=runner)
