"""CBN preset sweep (cbn.md Sec. 7.4) at CPU scale, through the lead's trainer.

Grid: presets x activations x seeds, ResNet-20 (width 0.5) on a CIFAR-10 subset, with the three
effects (bnlab.diagnostics.three_effects) measured at the end of training. Runs are ordered by seed
so an interrupted sweep still gives complete seed-0 (then seed-1) tables; finished runs (a line in
``<out>/results.jsonl``) are skipped on restart.

    python experiments/cbn_sweep.py --out runs/cbn_sweep            # the sweep of docs/results/cbn.md
    python experiments/cbn_sweep.py --out runs/cbn_sweep --table    # print the markdown table only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

PRESETS = ["vanilla", "decoupled", "post_bn", "double", "split_pre", "split_post", "post_center"]
ACTS = ["sigmoid", "tanh", "selu", "relu", "silu"]


def configs(args: argparse.Namespace):
    from bnlab.train.config import RunConfig

    for seed in args.seeds:
        for act in args.acts:
            for preset in args.presets:
                name = f"{act}-{preset}-s{seed}"
                yield name, RunConfig(
                    name=name, out_dir=str(Path(args.out) / name), model=args.model, width=args.width,
                    norm=f"cbn:{preset}", act=act, data=args.data, data_dir=args.data_dir,
                    train_subset=args.train_subset, test_subset=args.test_subset, epochs=args.epochs,
                    batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                    seed=seed, device="cpu", eval_every=args.epochs, checkpoint_every=args.epochs,
                    diagnostics_every=args.epochs, diagnostics_batches=args.diag_batches,
                )


def run(args: argparse.Namespace) -> None:
    from bnlab.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    lines = results.read_text().splitlines() if results.exists() else []
    done = {json.loads(line)["name"] for line in lines}
    for name, cfg in configs(args):
        if name in done:
            continue
        t0 = time.process_time()
        summary = train(cfg, quiet=True)
        last = json.loads((Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()[-1])
        row = {"name": name, "act": cfg.act, "preset": cfg.norm.split(":")[1], "seed": cfg.seed,
               "test_acc": summary["test_acc"], "train_loss": summary["train_loss"],
               "cpu_s": time.process_time() - t0,
               **{k[5:]: v for k, v in last.items() if k.startswith("diag/")}}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{m:.3g} ± {s:.2g}" if abs(m) < 0.01 or abs(m) >= 100 else f"{m:.3f} ± {s:.3f}"


def table(out: str) -> str:
    rows = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["act"], r["preset"]), []).append(r)
    lines = ["| act | preset | seeds | test acc | final train loss | L_eff | E‖g‖² | Var(g) | "
             "Σ E‖g_W‖²‖W‖² |", "|---|---|---|---|---|---|---|---|---|"]
    for act in ACTS:
        for preset in PRESETS:
            rs = cells.get((act, preset))
            if not rs:
                continue

            def col(k: str, rs: list[dict] = rs) -> str:
                return _ms([float(r[k]) for r in rs])

            lines.append(f"| {act} | {preset} | {len(rs)} | {col('test_acc')} | {col('train_loss')} | "
                         f"{col('lipschitz')} | {col('grad_sq_norm')} | {col('grad_variance')} | "
                         f"{col('scaled_grad_sq_norm')} |")
    lines += ["", "Δ test accuracy vs vanilla (percentage points, mean over the seeds both ran):", "",
              "| act | " + " | ".join(p for p in PRESETS[1:]) + " |", "|---|" + "---|" * (len(PRESETS) - 1)]
    for act in ACTS:
        van = {r["seed"]: r["test_acc"] for r in cells.get((act, "vanilla"), [])}
        row = []
        for preset in PRESETS[1:]:
            d = [100 * (r["test_acc"] - van[r["seed"]]) for r in cells.get((act, preset), []) if r["seed"] in van]
            row.append(f"{sum(d) / len(d):+.1f} (n={len(d)})" if d else "–")
        if van:
            lines.append(f"| {act} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/cbn_sweep")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--data", default="cifar10")
    p.add_argument("--data-dir", default="/work/shared/data/cifar10.npz")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--diag-batches", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--acts", nargs="+", default=ACTS)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--table", action="store_true", help="only print the table of finished runs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.table:
        run(args)
    print(table(args.out))


if __name__ == "__main__":
    sys.exit(main())
