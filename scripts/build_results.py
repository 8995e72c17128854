"""Assemble docs/results.md from the per-topic sources in docs/results/*.md.

Usage: python scripts/build_results.py   (run after editing any docs/results/<topic>.md)
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["foundation", "cbn", "psi", "pbn", "convex", "convex_solver", "distributed", "speed", "speed_optim",
         "speed_cbn", "reliability"]
HEADER = """# bnlab results

Every number bnlab reports, with the exact command, data, seeds and hardware. This file is generated
by `python scripts/build_results.py` from the per-topic sources in `docs/results/`; edit those.
Unless a section says otherwise, the hardware is a shared 2-core x86-64 CPU (no GPU was available
to the sessions that produced these numbers), torch 2.13.0+cpu, Python 3.11, and the data are the
verified copies of CIFAR-10 / MNIST / Fashion-MNIST described in `shared/data/README.md`.

"""


def demote_headings(text: str) -> str:
    """Each markdown heading one level deeper (code blocks untouched)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out) + "\n"


def main() -> None:
    parts = [HEADER, "## Contents\n"]
    files = {p.stem: p for p in (ROOT / "docs" / "results").glob("*.md")}
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    for n in names:
        title = files[n].read_text().splitlines()[0].lstrip("# ").strip()
        parts.append(f"- [{title}](results/{n}.md)")
    parts.append("")
    for n in names:
        text = files[n].read_text().rstrip() + "\n"
        parts.append(demote_headings(text))
    (ROOT / "docs" / "results.md").write_text("\n".join(parts))
    print(f"wrote docs/results.md from {len(names)} sources")


if __name__ == "__main__":
    main()
