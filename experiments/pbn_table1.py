"""Path-BN Table 1 at CPU scale (docs/results/pbn.md).

    python experiments/pbn_table1.py --phase sweep   # G-SGD lr on a held-out split of the train set
    python experiments/pbn_table1.py --phase main    # the suite's 10 configs x 3 seeds

Runs exactly the configs of ``bnlab.suites.pbn`` through ``bnlab.train.train``; the only difference
from ``bnlab compare pbn`` is that the CIFAR-10 npz is decompressed once per process (a cached
``prepare_data``) instead of once per run. Single thread (shared CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

import bnlab.train.trainer as trainer
from bnlab.data import load
from bnlab.data.dataset import ImageDataset
from bnlab.suites.pbn import cifar_base, method_configs, suite
from bnlab.train import train

torch.set_num_threads(1)
OUT = Path("/tmp/pbn_runs")


@functools.cache
def _full(root: str) -> ImageDataset:
    return load("cifar10", root=root)


def _cached_prepare(cfg):
    ds = _full(cfg.data_dir)
    if getattr(cfg, "_holdout", False) or cfg.name.startswith("sweep:"):
        # held-out split of the TRAINING set: 3000 stratified images, first 2000 train, last 1000 validate
        sub = ds.subset(train=3000, seed=7)
        return ImageDataset(ds.name, sub.x_train[:2000], sub.y_train[:2000], sub.x_train[2000:],
                            sub.y_train[2000:], ds.classes, crop_padding=ds.crop_padding, flip=ds.flip)
    return ds.subset(train=cfg.train_subset, test=cfg.test_subset, seed=0)


trainer.prepare_data = _cached_prepare


def _run(cfg, seed: int, tag: str) -> dict:
    out = OUT / tag / cfg.name.replace(" ", "_").replace(":", "_") / f"seed{seed}"
    cfg = cfg.replace(seed=seed, out_dir=str(out), device="cpu")
    t = time.process_time()
    s = train(cfg, quiet=True)
    s = {k: v for k, v in s.items() if isinstance(v, (int, float, str))}
    s.update(name=cfg.name, seed=seed, lr=cfg.lr, cpu_s=time.process_time() - t)
    print(json.dumps(s), flush=True)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["sweep", "main"], required=True)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--model", default=None, help="only configs whose name starts with this label")
    ap.add_argument("--methods", nargs="*", default=None, help="only these methods (e.g. SGD+Path-BN)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    results = []
    if args.phase == "sweep":
        base = cifar_base("plainnet18", None).replace(epochs=3)   # held-out: 2000 train / 1000 val
        for lr in (0.1, 0.2, 0.5, 1.0):
            for cfg in method_configs(base, gsgd_lr={"G-SGD+BN": lr, "G-SGD+Path-BN": lr}):
                if cfg.name in ("G-SGD+BN", "G-SGD+Path-BN"):
                    results.append(_run(cfg.replace(name=f"sweep:{cfg.name}@{lr}"), 0, "sweep"))
    else:
        for cfg in suite().configs:
            if args.model and not cfg.name.startswith(args.model):
                continue
            if args.methods and cfg.name.split(" ", 1)[-1] not in args.methods:
                continue
            for seed in args.seeds:
                results.append(_run(cfg, seed, "main"))
    tag = (f"_{args.model.replace('-', '').lower()}" if args.model else "") + args.tag
    Path(f"experiments/pbn_{args.phase}{tag}_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
