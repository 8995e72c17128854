"""PNG plots of training curves (mean over seeds, shaded ± std)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .runs import Run
from .tables import group_runs

__all__ = ["plot_curves"]


def plot_curves(runs: list[Run], out_dir: str | Path, keys: tuple[str, ...] = ("train_loss", "test_acc")) -> list[Path]:
    """One PNG per metric key; returns the written paths (empty if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        plotted = False
        for name, group in group_runs(runs).items():
            curves = [[row.get(key) for row in r.metrics] for r in group]
            curves = [[np.nan if v is None else v for v in c] for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves], dtype=float)
            if np.all(np.isnan(arr)):
                continue
            epochs = np.arange(1, n + 1)
            m, s = np.nanmean(arr, 0), np.nanstd(arr, 0)
            ax.plot(epochs, m, label=name)
            ax.fill_between(epochs, m - s, m + s, alpha=0.2)
            plotted = True
        if plotted:
            ax.set_xlabel("epoch")
            ax.set_ylabel(key)
            if key.endswith("loss"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{key}.png"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written
