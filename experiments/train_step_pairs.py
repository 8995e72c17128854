"""Every resnet20 training-step pair vs bn + SGD(foreach), interleaved, allocator tuned.

    OMP_NUM_THREADS=1 python experiments/train_step_pairs.py ROUNDS

Uses ``bnlab.benchmarks.norms.cbn_train_steps`` (forward, cross-entropy, backward, optimiser step of
resnet20, batch 64x3x32x32); results in docs/results/speed_cbn.md.
"""

import sys

import torch

from bnlab.benchmarks.norms import cbn_train_steps
from bnlab.benchmarks.timing import Settings, machine_info
from bnlab.train.allocator import tune_cpu_allocator

PAIRS = (("bn", "sgd"), ("bn", "psi-sgdm"), ("cbn", "sgd"), ("cbn", "psi-sgdm"), ("pbn", "sgd"), ("pbn", "gsgd"))


def main(rounds: int) -> None:
    tune_cpu_allocator()
    torch.set_num_threads(1)
    print(machine_info())
    for rnd in range(rounds):
        for r in cbn_train_steps(1, Settings(), pairs=PAIRS):
            print(f"round {rnd} {r.name:22s} {r.ours_ms:8.2f} / {r.baseline_ms:8.2f} ms = {r.ratio:.2f} "
                  f"load {r.extra['load1']:.1f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
