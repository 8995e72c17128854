"""Theorem 1 of Yi, UAI 2022 on a real network: two positively-scale-equivalent copies of a ResNet-20
(every PSI unit of copy B rescaled by a_j ~ U[0.2, 5]) trained on the same CIFAR-10 batches stay
equivalent under PSI-SGD(M) and drift apart under SGD(M). float64, BN eps 1e-12.

    python experiments/psi_equivalence.py            # prints the markdown table of docs/results/psi.md
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch
from torch import nn

import bnlab
from bnlab.optim import PSISGD, find_scale_invariant, psi_param_groups

DT = torch.float64


def cifar_batches(path: str, n_batches: int, batch: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    with np.load(path) as d:
        x = torch.from_numpy(d["x_train"][: n_batches * batch + 64]).permute(0, 3, 1, 2).to(DT) / 255
        y = torch.from_numpy(d["y_train"][: n_batches * batch + 64]).long()
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)
    sl = [idx[i * batch:(i + 1) * batch] for i in range(n_batches + 1)]
    return [(x[i], y[i]) for i in sl]


def rescale(model: nn.Module, units, lo: float, hi: float, seed: int) -> nn.Module:
    other = copy.deepcopy(model)
    params = dict(other.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for u in units:
            w = params[u.weight]
            a = lo + (hi - lo) * torch.rand(w.shape[u.out_dim], generator=g, dtype=DT)
            shape = [1] * w.dim()
            shape[u.out_dim] = -1
            w.mul_(a.view(shape))
            if u.bias is not None:
                params[u.bias].mul_(a)
    return other


def directions(model: nn.Module, units) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    out = []
    for u in units:
        th = params[u.weight].detach().movedim(u.out_dim, 0).flatten(1)
        if u.bias is not None:
            th = torch.cat([th, params[u.bias].detach()[:, None]], 1)
        out.append(th / th.norm(dim=1, keepdim=True))
    return out


def make_opt(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "SGD":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    if name == "SGDM":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    psi_lr, psi_m = (1.0, 0.0) if name == "PSI-SGD" else (0.1, 0.9)
    groups = psi_param_groups(model, lr=0.1, momentum=0.9, psi_lr=psi_lr, psi_momentum=psi_m)
    return PSISGD(groups, lr=0.1, bn_stats=model)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default="/work/shared/data/cifar10.npz")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = cifar_batches(args.data_dir, args.steps, args.batch, args.seed)
    probe = data[-1][0]
    torch.manual_seed(args.seed)
    base = bnlab.models.build("resnet20", width=args.width, norm_options={"eps": 1e-12}).to(DT)
    units = find_scale_invariant(base, probe[:4])
    loss_fn = nn.CrossEntropyLoss()
    checks = sorted({1, 5, 10, args.steps})
    print(f"ResNet-20 width {args.width}: {len(units)} PSI layers, "
          f"{sum(dict(base.named_parameters())[u.weight].shape[u.out_dim] for u in units)} units; "
          f"{args.steps} steps of batch {args.batch}, float64, BN eps 1e-12\n")
    print("| optimiser | copy B | gap at start | " + " | ".join(f"after {c}" for c in checks)
          + " | eval-mode gap at end | min direction change of A's units |")
    print("|---|---|---|" + "---|" * len(checks) + "---|---|")
    runs = [("PSI-SGD", "rescaled"), ("PSI-SGDM", "rescaled"), ("SGD", "rescaled"), ("SGDM", "rescaled"),
            ("PSI-SGD", "noise 1e-12"), ("PSI-SGDM", "noise 1e-12"), ("SGDM", "noise 1e-12")]
    for name, kind in runs:
        a = copy.deepcopy(base)
        b = rescale(base, units, 0.2, 5.0, seed=args.seed + 1) if kind == "rescaled" else perturb(base, 1e-12)
        with torch.no_grad():
            gaps = [(a(probe) - b(probe)).abs().max().item()]
        start = directions(a, units)
        oa, ob = make_opt(name, a), make_opt(name, b)
        for t, (x, y) in enumerate(data[:-1]):
            for net, opt in ((a, oa), (b, ob)):
                opt.zero_grad()
                loss_fn(net(x), y).backward()
                opt.step()
            if t + 1 in checks:
                with torch.no_grad():
                    gaps.append((a(probe) - b(probe)).abs().max().item())
        with torch.no_grad():
            a.eval()
            b.eval()
            gap_eval = (a(probe) - b(probe)).abs().max().item()
        moved = min((d1 - d0).norm(dim=1).min().item() for d0, d1 in zip(start, directions(a, units)))
        print(f"| {name} | {kind} | " + " | ".join(f"{g:.1e}" for g in gaps) + f" | {gap_eval:.1e} | {moved:.3f} |")


def perturb(model: nn.Module, rel: float) -> nn.Module:
    """A copy with every parameter multiplied by (1 + rel * N(0, 1)): a rounding-level control."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other

if __name__ == "__main__":
    sys.exit(main())
