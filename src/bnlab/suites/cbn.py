"""Complete BN preset sweep (Peng et al., TPAMI 2024; cbn.md Sec. 7.4) at CPU scale.

Every (activation, preset) cell is one RunConfig named ``"<act> <preset>"``; the three effects
(:func:`bnlab.diagnostics.three_effects`: L_eff, E||g||^2, Var(g)) are logged at the last epoch.

Full version (docs/results/cbn.md): ResNet-20 at width 0.5 on a 2000-image stratified CIFAR-10
subset (1000 test images), 3 epochs, batch 128, SGD momentum 0.9, lr 0.1 cosine, weight decay 5e-4,
crop + flip, presets vanilla/decoupled/post_bn/double/split_post/post_center x
sigmoid/tanh/selu/relu/silu, 3 seeds. ``quick=True``: MLP 2x64 on scikit-learn digits, sigmoid and
relu, presets vanilla/decoupled/post_bn, 3 epochs, two seeds (about a minute on a 2-core CPU).
"""

from __future__ import annotations

from ..train.config import RunConfig
from . import Suite

PRESETS = ["vanilla", "decoupled", "post_bn", "double", "split_post", "post_center"]
ACTS = ["sigmoid", "tanh", "selu", "relu", "silu"]
COLUMNS = ["diag/lipschitz", "diag/grad_sq_norm", "diag/grad_variance", "diag/scaled_grad_sq_norm"]


def grid(base: RunConfig, acts: list[str], presets: list[str]) -> list[RunConfig]:
    """One config per (activation, preset) on ``base``, diagnostics at the final epoch."""
    return [base.replace(name=f"{act} {preset}", norm=f"cbn:{preset}", act=act,
                         diagnostics_every=base.epochs, diagnostics_batches=4)
            for act in acts for preset in presets]


def suite(quick: bool = False, data_dir: str | None = None) -> Suite:
    if quick:
        base = RunConfig(model="mlp", model_options={"depth": 2, "hidden": [64, 64]}, data="digits",
                         epochs=3, batch_size=64, lr=0.1, momentum=0.9, weight_decay=5e-4,
                         schedule="cosine", augment=False)
        return Suite(name="cbn", description="CBN presets vs vanilla BN, MLP 2x64 on digits (quick).",
                     configs=grid(base, ["sigmoid", "relu"], ["vanilla", "decoupled", "post_bn"]),
                     seeds=[0, 1], columns=COLUMNS,
                     notes="SGD m=0.9, lr 0.1 cosine, wd 5e-4; three effects at the last epoch.")
    base = RunConfig(model="resnet20", width=0.5, data="cifar10",
                     data_dir=data_dir or "/work/shared/data/cifar10.npz", train_subset=2000,
                     test_subset=1000, epochs=3, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                     schedule="cosine", augment=True)
    return Suite(
        name="cbn",
        description="CBN preset sweep (cbn.md Sec. 7.4): ResNet-20 width 0.5 on 2000 CIFAR-10 training "
                    "images (1000 test), 3 epochs, batch 128, 6 presets x 5 activations.",
        configs=grid(base, ACTS, PRESETS), seeds=[0, 1, 2], columns=COLUMNS,
        notes="SGD m=0.9, lr 0.1 cosine, wd 5e-4 on all parameters, crop+flip; identical settings for "
              "every preset; three effects (4 training batches) at the last epoch.",
    )
