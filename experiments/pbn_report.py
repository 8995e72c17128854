"""Markdown tables for docs/results/pbn.md from experiments/pbn_main_*.jsonl (the runs' JSON lines)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PAPER = {  # S1 Table 1 / S2 Table 1, CIFAR-10 test error (%), mean (std) over 5 runs
    "SGD+BN": {"PlainNet-18": "6.93 (0.12)", "ResNet-18": "6.76 (0.10)"},
    "G-SGD+BN": {"PlainNet-18": "6.66 (0.12)", "ResNet-18": "6.84 (0.30)"},
    "G-SGD+BN(wnorm)": {"PlainNet-18": "6.26 (0.17)", "ResNet-18": "6.31 (0.14)"},
    "G-SGD+Path-BN": {"PlainNet-18": "5.99 (0.13)", "ResNet-18": "6.04 (0.14)"},
    "SGD+Path-BN": {"PlainNet-18": "7.00 (0.08)", "ResNet-18": "6.78 (0.15)"},
}


def main() -> None:
    rows: dict[tuple[str, str], list[dict]] = {}
    records = []
    for path in sorted(Path("experiments").glob("pbn_main_*.jsonl")):   # one JSON line per finished run
        records += [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    for r in records:
        arch, method = r["name"].split(" ", 1)
        rows.setdefault((method, arch), []).append(r)
    archs = ["PlainNet-18", "ResNet-18"]
    print("| Method | lr | " + " | ".join(f"{a}: ours, test err % (± std, n)" for a in archs)
          + " | " + " | ".join(f"{a}: paper" for a in archs) + " |")
    print("|---|---|" + "---|" * (2 * len(archs)))
    for method in PAPER:
        cells, lr = [], ""
        for arch in archs:
            rs = rows.get((method, arch), [])
            if not rs:
                cells.append("not run")
                continue
            lr = str(rs[0]["lr"])
            errs = [100 * (1 - r["test_acc"]) for r in rs]
            sd = statistics.stdev(errs) if len(errs) > 1 else float("nan")
            cells.append(f"{statistics.mean(errs):.1f} (± {sd:.1f}, n={len(errs)})")
        print(f"| {method} | {lr} | " + " | ".join(cells) + " | "
              + " | ".join(PAPER[method][a] for a in archs) + " |")
    print()
    print("| Method | arch | final train loss (mean) | CPU s per run (mean) |")
    print("|---|---|---|---|")
    for (method, arch), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], list(PAPER).index(kv[0][0]))):
        print(f"| {method} | {arch} | {statistics.mean(r['train_loss'] for r in rs):.3f} | "
              f"{statistics.mean(r['cpu_s'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
