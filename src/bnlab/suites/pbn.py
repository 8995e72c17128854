"""Path-BN paper, Table 1 at CPU scale (Luo et al., UAI 2021; pbn.md Sec. 5).

Methods: SGD+BN, G-SGD+BN, G-SGD+BN(wnorm), G-SGD+Path-BN, SGD+Path-BN (S2 Table 1), with the paper's
schedule shape: no momentum, weight decay 1e-4 (path-space decay for G-SGD), x0.1 at 50 % and 75 % of
the run. Full version: narrow PlainNet-18 and ResNet-18 (width 0.125) on a 3000-image stratified
CIFAR-10 subset (test: 2000 test images), 5 epochs, batch 64, 3 seeds (see docs/results/pbn.md).
``quick=True``: MLP 3x64 on scikit-learn digits, 2 seeds, about a minute.

Learning rates: SGD+BN 0.1 and G-SGD+BN(wnorm) 1.0 (the paper's values); SGD+Path-BN 0.1;
G-SGD+BN and G-SGD+Path-BN use ``GSGD_LR``, chosen on a held-out split of the training set from the
paper's grid {0.1, 0.2, 0.5, 1.0} by ``experiments/pbn_table1.py --phase sweep``.
"""

from __future__ import annotations

from ..train.config import RunConfig
from . import Suite

# chosen by experiments/pbn_table1.py --phase sweep (held-out split, PlainNet-18, seed 0)
GSGD_LR = {"G-SGD+BN": 1.0, "G-SGD+Path-BN": 0.2}

_BN_PATH = {"path_options": {"path_bn": False, "init": "paper"}}   # G-SGD+BN: conventional BN, S5 init


def method_configs(base: RunConfig, prefix: str = "", gsgd_lr: dict[str, float] | None = None,
                   ) -> list[RunConfig]:
    """The five Table-1 methods on ``base`` (its model/data/schedule), names prefixed by ``prefix``."""
    lrs = {**GSGD_LR, **(gsgd_lr or {})}
    return [
        base.replace(name=f"{prefix}SGD+BN", norm="bn", optim="sgd", lr=0.1),
        base.replace(name=f"{prefix}G-SGD+BN", norm="pbn", optim="gsgd", lr=lrs["G-SGD+BN"],
                     model_options=_BN_PATH),
        base.replace(name=f"{prefix}G-SGD+BN(wnorm)", norm="pbn", optim="gsgd", lr=1.0,
                     model_options=_BN_PATH, optim_options={"wnorm": True}),
        base.replace(name=f"{prefix}G-SGD+Path-BN", norm="pbn", optim="gsgd", lr=lrs["G-SGD+Path-BN"]),
        base.replace(name=f"{prefix}SGD+Path-BN", norm="pbn", optim="sgd", lr=0.1),
    ]


def cifar_base(model: str, data_dir: str | None) -> RunConfig:
    return RunConfig(model=model, width=0.125, data="cifar10",
                     data_dir=data_dir or "/work/shared/data/cifar10.npz", train_subset=3000,
                     test_subset=2000, epochs=5, batch_size=64, momentum=0.0, weight_decay=1e-4,
                     schedule="multistep", milestones=[0.5, 0.75], gamma=0.1, augment=True)


def suite(quick: bool = False, data_dir: str | None = None) -> Suite:
    if quick:
        base = RunConfig(model="mlp", model_options={}, data="digits", epochs=6, batch_size=64,
                         momentum=0.0, weight_decay=1e-4, schedule="multistep", augment=False)
        configs = []
        for cfg in method_configs(base):
            opts = dict(cfg.model_options)
            opts.update(depth=3, hidden=[64, 64, 64])
            configs.append(cfg.replace(model_options=opts))
        return Suite(name="pbn", description="Path-BN Table 1 methods, MLP 3x64 on digits (quick).",
                     configs=configs, seeds=[0, 1],
                     notes="No momentum, wd 1e-4, x0.1 at 50%/75%; G-SGD lr from GSGD_LR.")
    configs = []
    for model, label in (("plainnet18", "PlainNet-18 "), ("resnet18", "ResNet-18 ")):
        configs += method_configs(cifar_base(model, data_dir), prefix=label)
    return Suite(
        name="pbn",
        description="Path-BN Table 1 at CPU scale: PlainNet-18 / ResNet-18 at width 0.125 on 3000 CIFAR-10 "
                    "training images (2000 test images), 5 epochs, batch 64.",
        configs=configs, seeds=[0, 1, 2],
        notes="No momentum, wd 1e-4 (path-space for G-SGD), x0.1 at 50%/75%; lambda = 1 (PlainNet), "
              "0.1 (ResNet); G-SGD init: skeleton and v_k = 1.",
    )
