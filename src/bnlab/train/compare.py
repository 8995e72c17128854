"""``bnlab compare``: run a named suite over seeds and write ``report.md`` with mean ± std.

Runs land in ``<out>/<suite>/<method>/seed<k>/``. A run whose ``summary.json`` exists is not run
again, so an interrupted compare continues where it stopped (an unfinished run resumes from its
checkpoint). Methods whose optimiser or norm is not available are skipped with a note.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from ..report import find_runs, format_table, plot_curves
from ..suites import Suite, get_suite
from .config import RunConfig
from .trainer import train

__all__ = ["run_suite", "compare"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "run"


def _available(cfg: RunConfig) -> str | None:
    """``None`` if the config's method can be built here, else the reason."""
    from ..data import load
    from ..models import build
    from ..optim import make_optimizer

    try:
        ds = load("digits")
        model = build(cfg.model, norm=cfg.norm, act=cfg.act, num_classes=ds.num_classes,
                      in_channels=ds.in_channels, width=min(cfg.width, 0.25), input_size=ds.input_size,
                      **dict(cfg.model_options))
        make_optimizer(cfg.optim, model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       nesterov=cfg.nesterov, **dict(cfg.optim_options))
    except (ImportError, ModuleNotFoundError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def run_suite(suite: Suite, out: str | Path, seeds: list[int] | None = None, quick: bool = False,
              verbose: bool = True) -> str:
    """Run every config of ``suite`` for every seed; write and return the markdown report."""
    out = Path(out) / suite.name
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds if seeds is not None else suite.seeds)
    t0 = time.perf_counter()
    if suite.runner is not None:
        text = suite.runner(out, seeds, quick)
        (out / "report.md").write_text(text)
        return text
    skipped = []
    total = len(suite.configs) * len(seeds)
    done = 0
    for cfg in suite.configs:
        reason = _available(cfg)
        if reason:
            skipped.append(f"- {cfg.name}: not available ({reason})")
            done += len(seeds)
            continue
        for seed in seeds:
            done += 1
            run_dir = out / _slug(cfg.name) / f"seed{seed}"
            if (run_dir / "summary.json").is_file():
                continue
            run_cfg = cfg.replace(seed=seed, out_dir=str(run_dir))
            if verbose:
                print(f"[compare {suite.name}] {done}/{total}: {cfg.name} seed {seed}", file=sys.stderr, flush=True)
            train(run_cfg, resume=(run_dir / "checkpoint.pt").is_file(), quiet=True)
    runs = [r for r in find_runs([out]) if r.path.parent.parent == out]
    plots = plot_curves(runs, out)
    md = [f"# bnlab compare: {suite.name}", "", suite.description, ""]
    if suite.notes:
        md += [suite.notes, ""]
    cfg0 = suite.configs[0] if suite.configs else None
    if cfg0 is not None:
        sizes = ("full splits" if cfg0.train_subset is None and cfg0.test_subset is None
                 else f"train subset {cfg0.train_subset or 'all'}, test subset {cfg0.test_subset or 'all'}")
        md += [f"Data: `{cfg0.data}` ({sizes}); seeds {seeds}; {cfg0.epochs} epochs.", ""]
    md += [format_table(runs, extra=suite.columns), ""]
    if skipped:
        md += ["Skipped:", *skipped, ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md += ["", f"Total wall time of this invocation: {time.perf_counter() - t0:.1f} s."]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text


def compare(name: str = "quick", out: str | Path = "runs/compare", seeds: list[int] | None = None,
            quick: bool = False, data_dir: str | None = None) -> str:
    return run_suite(get_suite(name, quick=quick, data_dir=data_dir), out, seeds, quick)
