"""PSISGD step vs torch.optim.SGD(foreach=True) on ResNet-56 parameters (interleaved medians).

Usage: ``python experiments/psi_step_bench.py [--repeats 3] [--reps 9] [--track-angles 0|1]``.
Prints one line per repeat and the median ratio. Uses ``bnlab.benchmarks.optim._pair`` (read-only):
gradients from one real forward/backward, the guard steps taken during set-up, then only ``step()``
is timed with gradients held fixed.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bnlab.benchmarks.optim import _pair, _with_grads
from bnlab.benchmarks.timing import Settings, compare, machine_info
from bnlab.models import build


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--track-angles", type=int, default=1)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _with_grads(build(args.model, norm="bn"), torch.device("cpu"), 32)
    ours, base = _pair(model, "psi-sgdm", lr=args.lr, momentum=0.9, input_size=32,
                       track_angles=bool(args.track_angles))
    print(machine_info())
    for _ in range(20):
        ours()  # steady state: buffers, layouts; with fixed grads norms grow, the guard may fire
    opt = ours.__self__
    fired = sum(float(st.get("renorm_count", 0)) for st in opt.state.values())
    print(f"guard firings (rows) during 20 warm-up steps: {fired:.0f}")
    ratios = []
    for r in range(args.repeats):
        o, b = compare(ours, base, Settings(warmup=3, reps=args.reps, min_sample_s=0.05))
        ratios.append(o / b)
        print(f"repeat {r}: psi-sgdm {o:.3f} ms  sgd(foreach) {b:.3f} ms  ratio {o / b:.2f}")
    print(f"median ratio {statistics.median(ratios):.2f} (track_angles={bool(args.track_angles)}, lr={args.lr})")


if __name__ == "__main__":
    main()
