"""The default suite of ``bnlab compare``: every norm/optimiser combination on embedded digits.

An MLP (3 x 256, the one architecture every method supports) on scikit-learn's digits, 3 seeds.
Finishes in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from ..train.config import RunConfig
from . import Suite


def suite(quick: bool = False, data_dir: str | None = None) -> Suite:
    epochs = 4 if quick else 15
    base = RunConfig(model="mlp", data="digits", epochs=epochs, batch_size=64, lr=0.1, momentum=0.9,
                     weight_decay=5e-4, schedule="cosine", augment=False, threads=1)
    plain = dict(momentum=0.0, weight_decay=1e-4, schedule="multistep")  # the Path-BN paper's recipe
    configs = [
        base.replace(name="none + SGD(m)", norm="none", lr=0.05),
        base.replace(name="BN + SGD(m)"),
        base.replace(name="BN + PSI-SGDM", optim="psi-sgdm"),
        base.replace(name="CBN + SGD(m)", norm="cbn"),
        base.replace(name="BN + SGD", **plain),
        base.replace(name="G-SGD + BN", norm="pbn", optim="gsgd",
                     model_options={"path_options": {"path_bn": False, "init": "paper"}}, **plain),
        base.replace(name="G-SGD + Path-BN", norm="pbn", optim="gsgd", **plain),
        base.replace(name="SGD + Path-BN", norm="pbn", **plain),
    ]
    return Suite(
        name="quick",
        description="Every normalisation x optimiser available, MLP 3x256 (ReLU) on scikit-learn digits "
                    "(1347 train / 450 test, no augmentation).",
        configs=configs,
        seeds=[0, 1] if quick else [0, 1, 2],
        notes="SGD(m): momentum 0.9, wd 5e-4, cosine. Rows without (m) follow the Path-BN paper's recipe: "
              "no momentum, wd 1e-4, x0.1 at 50% and 75%.",
    )
