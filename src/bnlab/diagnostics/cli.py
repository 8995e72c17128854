"""``bnlab diagnose RUN_OR_CHECKPOINT``: the three effects of a trained model, printed."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from torch import nn

__all__ = ["diagnose"]


def diagnose(args: argparse.Namespace) -> int:
    """Load a run folder or checkpoint, rebuild its model and data, and print
    :func:`bnlab.diagnostics.three_effects` on ``args.batches`` training mini-batches."""
    from ..train import RunConfig, load_checkpoint
    from ..train.distributed import DistInfo
    from ..train.trainer import build_model, make_loaders, prepare_data
    from .three_effects import three_effects

    target = Path(args.target)
    ckpt = target / "checkpoint.pt" if target.is_dir() else target
    state = load_checkpoint(ckpt)
    cfg = RunConfig.from_dict(state["config"])
    if args.data_dir:
        cfg = cfg.replace(data_dir=args.data_dir)
    cfg = cfg.replace(device="cpu", max_steps_per_epoch=None)
    ds = prepare_data(cfg)
    model = build_model(cfg, ds)
    model.load_state_dict(state["model"])
    train_loader, _ = make_loaders(cfg, ds, DistInfo())
    train_loader.set_epoch(int(state["progress"]["epoch"]))
    batches = list(itertools.islice(iter(train_loader), max(2, args.batches)))
    lr = float(state["optimizer"]["param_groups"][0]["lr"])
    rep = three_effects(model, nn.CrossEntropyLoss(), batches, lr=lr)
    print(f"three effects of {cfg.model}/{cfg.norm}/{cfg.act} ({cfg.optim}) at epoch "
          f"{state['progress']['epoch']}, {len(batches)} batches of {cfg.batch_size}, lr {lr:.4g}")
    for key, value in rep.scalars().items():
        print(f"  {key:22s} {value:.6g}")
    layers = sorted(rep.per_layer.items(), key=lambda kv: -kv[1].get("grad_sq_norm", 0.0))[:10]
    if layers:
        print("  largest per-layer E||g||^2 (with ||g||^2 ||W||^2):")
        for name, d in layers:
            print(f"    {name:40s} {d.get('grad_sq_norm', float('nan')):.4g}  "
                  f"{d.get('scaled_grad_sq_norm', float('nan')):.4g}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rep.to_dict(), indent=2))
    return 0
