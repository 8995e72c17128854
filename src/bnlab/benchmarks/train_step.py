"""Full training steps and ``bnlab train`` throughput.

* ``train/<norm>+<optim>``: one step (forward, cross-entropy, backward, optimiser step) of
  resnet20 for each norm x optimiser pair, against resnet20 with ``bn`` + ``torch.optim.SGD``
  (momentum 0.9, foreach) on the same batch, timed interleaved.
* ``train/e2e``: seconds per training batch of :func:`bnlab.train.train` (one epoch on a CIFAR-10
  subset, ``epoch_time`` of metrics.jsonl, so evaluation and checkpointing are excluded) against a
  minimal hand-written loop doing the same work (same model, same uint8 data on the device,
  batched crop/flip, normalisation, forward, backward, SGD step). Images/second in ``extra``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .timing import Result, Settings, Skip, compare

__all__ = ["run", "PAIRS"]

TARGET = 1.15
#: (norm, optimiser) pairs timed against bn + sgd.
PAIRS = [("bn", "sgd"), ("bn", "psi-sgdm"), ("cbn", "sgd"), ("cbn", "psi-sgdm"), ("pbn", "sgd"),
         ("pbn", "gsgd")]
#: pairs also timed with the proposed CBN forward (:mod:`.proposals`) swapped in
PROPOSED: list[tuple[str, str]] = []  # rows timing a proposed (not yet adopted) module; none now
CIFAR = "/work/shared/data/cifar10.npz"


def _step_fn(norm: str, optim: str, x: torch.Tensor, y: torch.Tensor, width: float,
             device: torch.device, proposed: bool = False) -> Callable[[], None]:
    from ..models import build
    from ..optim import make_optimizer

    torch.manual_seed(0)
    model = build("resnet20", norm=norm, width=width, input_size=x.shape[-1]).to(device).train()
    if proposed:
        from ..nn.cbn import CompleteBatchNorm
        from .proposals import fast_cbn_forward

        for m in model.modules():
            if isinstance(m, CompleteBatchNorm):
                m.forward = types.MethodType(fast_cbn_forward, m)
    if optim == "sgd":  # the registry's "sgd" is torch.optim.SGD with the default foreach choice
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    else:
        opt = make_optimizer(optim, model, lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _steps(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    n, size, width = (8, 16, 0.25) if quick else (64, 32, 1.0)
    torch.manual_seed(0)
    x = torch.randn(n, 3, size, size, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    base = _step_fn("bn", "sgd", x, y, width, device)
    for norm, optim, proposed in [(*p, False) for p in PAIRS] + [(*p, True) for p in PROPOSED]:
        label = f"train/{norm}+{optim}" + (" [proposed CBN]" if proposed else "")
        try:
            ours = _step_fn(norm, optim, x, y, width, device, proposed)
        except (ImportError, ValueError) as e:
            print(f"  skip {label}: {type(e).__name__}: {e}")
            continue
        o, b = compare(ours, base, settings, device)
        yield Result(label, o, b, f"resnet20 w{width} batch {n}x3x{size}x{size}", "float32",
                     device.type, baseline="resnet20 bn + SGD(foreach)", target=TARGET)


def _dataset(quick: bool):
    from ..data import load

    n_train = 256 if quick else 2048
    if not quick and os.path.exists(CIFAR):  # quick: the embedded digits set (loading CIFAR takes ~30 s)
        return load("cifar10", root=CIFAR, train_subset=n_train, test_subset=64), "cifar10", CIFAR
    return load("digits", train_subset=n_train, test_subset=64), "digits", None


def _minimal_loop(ds, batch: int, width: float, device: torch.device, epochs: int) -> float:
    """Seconds per batch of the hand-written loop (the baseline of ``train/e2e``)."""
    from ..data import augment_batch, normalize_batch
    from ..models import build

    torch.manual_seed(0)
    model = build("resnet20", norm="bn", width=width, num_classes=ds.num_classes, in_channels=ds.in_channels,
                  input_size=ds.input_size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=True)
    xs, ys = ds.x_train.to(device), ds.y_train.to(device)
    mean = torch.as_tensor(ds.mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(ds.std, dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(0)
    steps = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g).to(device)
        for i in range(len(xs) // batch):
            sel = perm[i * batch:(i + 1) * batch]
            xb = normalize_batch(augment_batch(xs[sel], ds.crop_padding, ds.flip, g), mean, std)
            loss = nn.functional.cross_entropy(model(xb), ys[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(steps, 1)


def _bnlab_train(ds_name: str, root: str | None, n_train: int, batch: int, width: float,
                 device: torch.device, epochs: int) -> float:
    """Seconds per batch of ``bnlab.train.train`` (training time of the epochs, from metrics.jsonl)."""
    from ..train import train
    from ..train.config import RunConfig

    deterministic = torch.are_deterministic_algorithms_enabled()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(name="bench", out_dir=tmp, model="resnet20", norm="bn", width=width, data=ds_name,
                        data_dir=root, train_subset=n_train, test_subset=64, epochs=epochs, batch_size=batch,
                        optim="sgd", lr=0.05, device=device.type, deterministic=False, checkpoint_every=10**6,
                        schedule="constant")
        try:
            train(cfg, quiet=True)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        rows = [json.loads(line) for line in Path(tmp, "metrics.jsonl").read_text().splitlines()]
    steps = sum(1 for _ in range(epochs)) * (n_train // batch)
    return sum(r["epoch_time"] for r in rows) / max(steps, 1)


def _e2e(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    try:
        ds, ds_name, root = _dataset(quick)
        from ..train import train  # noqa: F401
    except (ImportError, ValueError, OSError) as e:
        raise Skip(f"trainer or data not available ({type(e).__name__}: {e})") from e
    batch, width = (64, 0.25) if quick else (128, 1.0)
    n_train = len(ds.x_train)
    rounds = 1 if quick else 3
    ours, base = [], []
    for r in range(rounds):  # interleaved rounds, medians
        pair = [lambda: _bnlab_train(ds_name, root, n_train, batch, width, device, 1),
                lambda: _minimal_loop(ds, batch, width, device, 1)]
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            (ours if k == 0 else base).append(pair[k]())
    o = sorted(ours)[len(ours) // 2] * 1e3
    b = sorted(base)[len(base) // 2] * 1e3
    yield Result("train/e2e bnlab train", o, b, f"resnet20 w{width} {ds_name} {n_train} imgs batch {batch}",
                 "float32", device.type, baseline="hand-written loop", unit="ms/b",
                 extra={"images_per_s": batch / (o / 1e3), "baseline_images_per_s": batch / (b / 1e3)},
                 note=f"{batch / (o / 1e3):.0f} img/s vs {batch / (b / 1e3):.0f} img/s")


def run(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    yield from _steps(quick, device, settings)
    yield from _e2e(quick, device, settings)
