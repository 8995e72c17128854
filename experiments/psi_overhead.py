"""Cost of one PSISGD step vs torch.optim.SGD and vs a forward+backward pass (process CPU time).

ResNet-20 (width 1), batch 32 of 32x32 inputs, one thread; the paper measures +7 % per epoch for
PSI-SGD over SGD on a V100 (psi_manifold.md Sec. 5.3).

    python experiments/psi_overhead.py
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

import bnlab
from bnlab.optim import make_optimizer


def main() -> None:
    torch.set_num_threads(1)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    print("| optimiser | options | step (ms) | forward+backward (ms) |")
    print("|---|---|---|---|")
    for name, kw in [("sgd", {}), ("psi-sgdm", {}),
                     ("psi-sgdm", {"track_angles": False, "check_finite": False}),
                     ("psi-sgdm", {"track_angles": False, "check_finite": False, "renorm_threshold": None})]:
        torch.manual_seed(0)
        model = bnlab.models.build("resnet20")
        opt = make_optimizer(name, model, lr=1e-9, momentum=0.9, **kw)
        fb = []
        for _ in range(3):
            t = time.process_time()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            fb.append(time.process_time() - t)
        for _ in range(5):
            opt.step()
        t = time.process_time()
        for _ in range(50):
            opt.step()
        step = (time.process_time() - t) / 50
        print(f"| {name} | {kw or 'defaults'} | {step * 1e3:.2f} | {min(fb) * 1e3:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
