"""PSI-SGD(M) vs SGD(M) at CPU scale on a CIFAR-10 subset, through the lead's trainer.

Yi, UAI 2022, Table 1 protocol scaled down (psi_manifold.md Sec. 5.9): ResNet-20 (width 0.5),
no weight decay anywhere, LR x0.2 at 50 % and 75 % of the run, batch 128, crop+flip augmentation.
PSI runs update the non-PSI parameters (BN gamma/beta, classifier) with SGD lr 0.1, momentum 0.9.

Phase 1 (seed 0): a two-point learning-rate grid per method; the LR with the lowest final training
loss is kept (no test-set tuning). Phase 2: seeds 1 and 2 at the kept LR. Finished runs (a line in
``<out>/results.jsonl``) are skipped on restart.

    python experiments/psi_cifar.py --out runs/psi_cifar            # the runs of docs/results/psi.md
    python experiments/psi_cifar.py --out runs/psi_cifar --table    # print the tables only
    (docs/results/psi.md ran it as two processes: --methods SGD SGDM and --methods PSI-SGD PSI-SGDM)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

# method -> (optimizer, momentum, lr grid, which lr the grid sets)
METHODS = {
    "SGD": ("sgd", 0.0, [0.1, 0.4], "lr"),
    "SGDM": ("sgd", 0.9, [0.03, 0.1], "lr"),
    "PSI-SGD": ("psi-sgd", 0.9, [0.5, 1.0], "psi_lr"),
    "PSI-SGDM": ("psi-sgdm", 0.9, [0.05, 0.1], "psi_lr"),
}
THRESHOLDS = (2.0, 1.9, 1.8, 1.7)  # set after seeing the 8-epoch losses (1.6 and 1.4 were not reached)


def make_config(args: argparse.Namespace, method: str, lr: float, seed: int):
    from bnlab.train.config import RunConfig

    optim, momentum, _, key = METHODS[method]
    name = f"{method}-lr{lr:g}-s{seed}"
    options = {"psi_lr": lr} if key == "psi_lr" else {}
    return name, RunConfig(
        name=name, out_dir=str(Path(args.out) / name), model=args.model, width=args.width, data="cifar10",
        data_dir=args.data_dir, train_subset=args.train_subset, test_subset=args.test_subset,
        epochs=args.epochs, batch_size=128, optim=optim, lr=lr if key == "lr" else 0.1, momentum=momentum,
        weight_decay=0.0, optim_options=options, schedule="multistep", milestones=[0.5, 0.75], gamma=0.2,
        seed=seed, device="cpu", checkpoint_every=args.epochs,
    )


def _load(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _run_one(args: argparse.Namespace, method: str, lr: float, seed: int, done: set[str]) -> None:
    from bnlab.train import train

    name, cfg = make_config(args, method, lr, seed)
    done |= {r["name"] for r in _load(Path(args.out))}  # another process may have run it
    if name in done:
        return
    t0 = time.process_time()
    summary = train(cfg, quiet=True)
    metrics = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    row = {"name": name, "method": method, "lr": lr, "seed": seed, "test_acc": summary["test_acc"],
           "train_loss": summary["train_loss"], "wall_s": summary["wall_time_s"],
           "cpu_s": time.process_time() - t0,
           "curve": [m["train_loss"] for m in metrics], "epoch_time": [m["epoch_time"] for m in metrics],
           "test_curve": [m.get("test_acc") for m in metrics],
           "norm_max": [m.get("opt/psi_norm_max") for m in metrics],
           "angle_mean": [m.get("opt/psi_angle_mean") for m in metrics]}
    with (Path(args.out) / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    done.add(name)
    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)


def best_lr(rows: list[dict], method: str) -> float | None:
    tuned = [r for r in rows if r["method"] == method and r["seed"] == 0]
    if len(tuned) < len(METHODS[method][2]):
        return None
    return min(tuned, key=lambda r: r["train_loss"])["lr"]


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["name"] for r in _load(out)}
    for method in args.methods:
        for lr in METHODS[method][2]:
            _run_one(args, method, lr, 0, done)
    rows = _load(out)
    for seed in args.seeds[1:]:
        for method in args.methods:
            _run_one(args, method, best_lr(rows, method), seed, done)


def _ms(xs: list[float], fmt: str = "{:.3f}") -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return f"{fmt.format(m)} ± {fmt.format(s)}"


def _reach(r: dict, thr: float) -> tuple[float | None, float | None]:
    """(epochs, cumulative training seconds) until the epoch's mean training loss <= thr."""
    t = 0.0
    for i, (loss, dt) in enumerate(zip(r["curve"], r["epoch_time"])):
        t += dt
        if loss <= thr:
            return float(i + 1), t
    return None, None


def table(out: str) -> str:
    rows = _load(Path(out))
    lines = ["Learning-rate grid (seed 0; kept: lowest final training loss)", "",
             "| method | lr | final train loss | test acc |", "|---|---|---|---|"]
    for r in rows:
        if r["seed"] == 0:
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['train_loss']:.3f} | {r['test_acc']:.3f} |")
    head = " | ".join(f"epochs to {t} (s)" for t in THRESHOLDS)
    lines += ["", f"| method | lr | seeds | final train loss | test acc | {head} | s/epoch |",
              "|---|---|---|---|---|" + "---|" * len(THRESHOLDS) + "---|"]
    for method in METHODS:
        lr = best_lr(rows, method)
        rs = [r for r in rows if r["method"] == method and r["lr"] == lr]
        if not rs:
            continue
        cells = []
        for thr in THRESHOLDS:
            reach = [_reach(r, thr) for r in rs]
            ok = [e for e in reach if e[0] is not None]
            cell = f"{_ms([e[0] for e in ok], '{:.1f}')} ({_ms([e[1] for e in ok], '{:.0f}')})"
            cells.append(cell + ("" if len(ok) == len(rs) else f" [{len(ok)}/{len(rs)} reached]"))
        per_epoch = [sum(r["epoch_time"]) / len(r["epoch_time"]) for r in rs]
        lines.append(f"| {method} | {lr:g} | {len(rs)} | {_ms([r['train_loss'] for r in rs])} | "
                     f"{_ms([r['test_acc'] for r in rs])} | {' | '.join(cells)} | "
                     f"{_ms(per_epoch, '{:.1f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/psi_cifar")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--data-dir", default="/work/shared/data/cifar10.npz")
    p.add_argument("--train-subset", type=int, default=2000)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="run only these methods (e.g. two processes, one per half)")
    p.add_argument("--table", action="store_true", help="only print the tables of finished runs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.table:
        run(args)
    print(table(args.out))


if __name__ == "__main__":
    sys.exit(main())
