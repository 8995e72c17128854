"""PSI-SGD(M) vs SGD(M) (Yi, UAI 2022, Table 1 protocol at CPU scale; docs/results/psi.md).

``quick``: ResNet-20 (width 0.25) on the embedded digits, 4 epochs, 2 seeds (about a minute).
Full: ResNet-20 (width 0.5) on a 2000/1000-image CIFAR-10 subset, 8 epochs, 3 seeds, at the
learning rates kept by ``experiments/psi_cifar.py``'s grid. No weight decay anywhere (Table 1);
LR x0.2 at 50 % and 75 %; the non-PSI parameters of the PSI runs use SGD lr 0.1, momentum 0.9.
"""

from __future__ import annotations

from ..train.config import RunConfig
from . import Suite

# learning rates kept by the seed-0 grid of experiments/psi_cifar.py (lowest final training loss)
CIFAR_LR = {"SGD": 0.4, "SGDM": 0.1, "PSI-SGD": 0.5, "PSI-SGDM": 0.1}


def suite(quick: bool = False, data_dir: str | None = None) -> Suite:
    if quick:
        base = RunConfig(model="resnet20", width=0.25, data="digits", epochs=4, batch_size=64,
                         weight_decay=0.0, schedule="multistep", milestones=[0.5, 0.75], gamma=0.2,
                         augment=False)
        lrs = {"SGD": 0.1, "SGDM": 0.1, "PSI-SGD": 1.0, "PSI-SGDM": 0.1}
    else:
        base = RunConfig(model="resnet20", width=0.5, data="cifar10", data_dir=data_dir, train_subset=2000,
                         test_subset=1000, epochs=8, batch_size=128, weight_decay=0.0, schedule="multistep",
                         milestones=[0.5, 0.75], gamma=0.2)
        lrs = CIFAR_LR
    configs = [
        base.replace(name="SGD", optim="sgd", lr=lrs["SGD"], momentum=0.0),
        base.replace(name="SGDM", optim="sgd", lr=lrs["SGDM"], momentum=0.9),
        base.replace(name="PSI-SGD", optim="psi-sgd", lr=0.1, momentum=0.9,
                     optim_options={"psi_lr": lrs["PSI-SGD"]}),
        base.replace(name="PSI-SGDM", optim="psi-sgdm", lr=0.1, momentum=0.9,
                     optim_options={"psi_lr": lrs["PSI-SGDM"]}),
    ]
    return Suite(
        name="psi",
        description=("PSI-SGD / PSI-SGDM (Yi, UAI 2022) vs SGD / SGD-momentum, "
                     + ("ResNet-20 x0.25 on digits (quick)." if quick else
                        "ResNet-20 x0.5 on a CIFAR-10 subset (2000 train / 1000 test).")),
        configs=configs,
        seeds=[0, 1] if quick else [0, 1, 2],
        columns=["opt/psi_angle_mean", "opt/psi_norm_max"],
        notes="No weight decay (paper Table 1). PSI runs: the PSI units (every conv) follow the PSI rule "
              "at psi_lr; BN gamma/beta and the classifier use SGD lr 0.1, momentum 0.9.",
    )
