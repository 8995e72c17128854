"""Reports from run folders: mean ± std tables (markdown) and PNG training curves."""

from .plots import plot_curves
from .runs import Run, find_runs, read_run
from .tables import format_table, group_runs, mean_std

__all__ = ["Run", "find_runs", "read_run", "format_table", "group_runs", "mean_std", "plot_curves",
           "write_report"]


def write_report(runs, out_dir, title: str = "bnlab report", notes: str = "", extra_columns=None) -> str:
    """Write ``report.md`` (+ PNG plots) for ``runs`` into ``out_dir``; return the markdown."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(runs, out_dir)
    md = [f"# {title}", ""]
    if notes:
        md += [notes, ""]
    md += [format_table(runs, extra=extra_columns), ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    text = "\n".join(md) + "\n"
    (out_dir / "report.md").write_text(text)
    return text
