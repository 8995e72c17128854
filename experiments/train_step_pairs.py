"""All resnet20 training-step pairs vs bn+SGD(foreach), allocator tuned, interleaved (bnlab.benchmarks.norms.cbn_train_steps)."""
import sys, torch
from bnlab.train.allocator import tune_cpu_allocator
from bnlab.benchmarks.norms import cbn_train_steps
from bnlab.benchmarks.timing import Settings, machine_info
tune_cpu_allocator(); torch.set_num_threads(1)
print(machine_info())
pairs = (("bn", "sgd"), ("bn", "psi-sgdm"), ("cbn", "sgd"), ("cbn", "psi-sgdm"), ("pbn", "sgd"), ("pbn", "gsgd"))
for rnd in range(int(sys.argv[1])):
    for r in cbn_train_steps(1, Settings(), pairs=pairs):
        print(f"round {rnd} {r.name:22s} {r.ours_ms:8.2f} / {r.baseline_ms:8.2f} ms = {r.ratio:.2f} load {r.extra['load1']:.1f}", flush=True)
