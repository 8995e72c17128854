"""PSISGD step vs torch.optim.SGD(foreach=True) on ResNet-56 parameters (interleaved medians).

Usage::

    python experiments/psi_step_bench.py [--repeats 3] [--reps 9] [--lr 0.1] [--track-angles 0|1]
                                         [--old-commit SHA]

Gradients from one real forward/backward (``bnlab.benchmarks.optim._with_grads``, read-only use);
the invariance-check steps and 20 warm-up steps run first, then only ``step()`` is timed with the
gradients held fixed. ``--old-commit`` also times the PSISGD of that commit (its
``src/bnlab/optim/psi.py`` loaded from git as a private module) on a third copy of the model: old,
new and SGD are interleaved (``bnlab.benchmarks.timing.compare`` pairs: new/SGD then old/SGD).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys

import torch

from bnlab.benchmarks.optim import _with_grads
from bnlab.benchmarks.timing import Settings, compare, machine_info
from bnlab.models import build
from bnlab.optim import make_optimizer


def _old_builder(commit: str):
    src = subprocess.run(["git", "show", f"{commit}:src/bnlab/optim/psi.py"], capture_output=True, text=True,
                         check=True).stdout
    src = src.replace("from . import register_optimizer", "def register_optimizer(*a, **k):\n    pass")
    src = src.replace("from .invariance import", "from bnlab.optim.invariance import")
    spec = importlib.util.spec_from_loader("_psi_old", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_psi_old"] = mod
    exec(compile(src, f"psi.py@{commit}", "exec"), mod.__dict__)
    return mod._builder("psi-sgdm")


def _warm(model, opt, steps: int, grad_scale: float) -> None:
    for _ in range(getattr(opt, "guard_steps", 0)):
        _with_grads(model, torch.device("cpu"), 32)
        opt.step()
    _with_grads(model, torch.device("cpu"), 32)
    for p in model.parameters():
        p.grad.mul_(grad_scale)
    for _ in range(steps):
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--track-angles", type=int, default=1)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--old-commit", default=None)
    ap.add_argument("--grad-scale", type=float, default=1.0,
                    help="scale the fixed timing gradients (e.g. 1e-4: norms stay put, the guard never fires)")
    ap.add_argument("--renorm-threshold", type=float, default=1e4,
                    help="PSI guard threshold (default: the paper's 1e4); with gradients held fixed the norms "
                         "grow every step and the guard fires on some rows; 1e30 times the no-firing path")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _with_grads(build(args.model, norm="bn"), torch.device("cpu"), 32)
    start = copy.deepcopy(model)
    opt = make_optimizer("psi-sgdm", model, lr=args.lr, momentum=0.9, track_angles=bool(args.track_angles),
                         renorm_threshold=args.renorm_threshold)
    _warm(model, opt, 20, args.grad_scale)
    fired = sum(float(st.get("renorm_count", 0)) for st in opt.state.values())
    base_model = copy.deepcopy(model)
    for p, q in zip(model.parameters(), base_model.parameters()):
        q.grad = p.grad.clone()
    base = torch.optim.SGD(base_model.parameters(), lr=args.lr, momentum=0.9, foreach=True)
    old = None
    if args.old_commit:
        old_model = copy.deepcopy(start)
        old = _old_builder(args.old_commit)(old_model, lr=args.lr, momentum=0.9,
                                            track_angles=bool(args.track_angles),
                                            renorm_threshold=args.renorm_threshold)
        _warm(old_model, old, 20, args.grad_scale)
    print(machine_info())
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters())} params; lr {args.lr}, momentum 0.9; "
          f"guard firings (rows) in 20 warm-up steps: {fired:.0f}")
    ratios, old_ratios = [], []
    for r in range(args.repeats):
        settings = Settings(warmup=3, reps=args.reps, min_sample_s=0.05)
        o, b = compare(opt.step, base.step, settings)
        ratios.append(o / b)
        line = f"repeat {r}: new {o:.3f} ms  sgd(foreach) {b:.3f} ms  ratio {o / b:.2f}"
        if old is not None:
            o2, b2 = compare(old.step, base.step, settings)
            old_ratios.append(o2 / b2)
            line += f" | old {o2:.3f} ms  sgd(foreach) {b2:.3f} ms  ratio {o2 / b2:.2f}"
        print(line, flush=True)
    msg = f"median ratio new {statistics.median(ratios):.2f}"
    if old_ratios:
        msg += f", old {statistics.median(old_ratios):.2f}"
    fired = sum(float(st.get("renorm_count", 0)) for st in opt.state.values())
    print(msg + f" (track_angles={bool(args.track_angles)}, lr={args.lr}, renorm_threshold="
          f"{args.renorm_threshold:g}, grad_scale={args.grad_scale:g}; guard firings (rows) in all steps: {fired:.0f})")


if __name__ == "__main__":
    main()
