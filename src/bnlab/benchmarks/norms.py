"""Norm-activation forward+backward against ``nn.BatchNorm2d`` + activation.

Modules: ``BatchNormAct`` and every ``CompleteBatchNorm`` preset (baseline ``BatchNorm2d -> ReLU``),
and the Path-BN conv layer ``PathUnit(PathConv2d, PathBatchNorm)`` (baseline ``Conv2d -> BatchNorm2d
-> ReLU``). One call = forward + ``autograd.grad`` w.r.t. the input and every parameter (training
mode, running statistics updated). CPU: fp32, contiguous. CUDA: bf16 and fp16 inputs in
channels_last under autocast (parameters fp32, as in mixed-precision training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .timing import Result, Settings, Skip, compare

__all__ = ["run", "SHAPES"]

#: (N, C, H, W) activation shapes (ResNet stages); the conv layer uses a smaller batch on CPU.
SHAPES = {"full": [(128, 64, 32, 32), (128, 256, 8, 8)], "quick": [(8, 16, 8, 8)]}
TARGET = 1.3


def _fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor, ctx: Callable[[], contextlib.AbstractContextManager]
             ) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def call() -> None:
        with ctx():
            out = module(x)
        torch.autograd.grad(out, [x, *params], grad)

    return call


def _dtypes(device: torch.device) -> list[torch.dtype]:
    return [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float16]


def _input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.randn(shape, device=device).to(dtype)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


def _ctx_factory(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def _norm_modules(c: int) -> dict[str, Callable[[], nn.Module]]:
    from ..nn.norm_act import BatchNormAct

    mods: dict[str, Callable[[], nn.Module]] = {"BatchNormAct": lambda: BatchNormAct(c, "relu", dims=2)}
    try:
        from ..nn.cbn import PRESETS, CompleteBatchNorm
    except ImportError as e:
        print(f"  skip CompleteBatchNorm: not importable ({e})")
        return mods
    for preset in PRESETS:
        mods[f"cbn:{preset}"] = (lambda p=preset: CompleteBatchNorm(c, "relu", preset=p))
    return mods


def _path_conv(c: int) -> tuple[nn.Module, nn.Module]:
    try:
        from ..nn.path_bn import PathBatchNorm, PathConv2d, PathUnit
    except ImportError as e:
        raise Skip(f"bnlab.nn.path_bn not importable ({e})") from e
    ours = PathUnit(PathConv2d(c, c, 3, padding=1, role="mid"), PathBatchNorm(c, act="relu"))
    base = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
    with torch.no_grad():
        base[0].weight.copy_(ours.conv.weight)
    return ours, base


def run(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    """Time every norm-act module (and the Path-BN conv layer) at each shape and dtype."""
    for shape in SHAPES["quick" if quick else "full"]:
        c = shape[1]
        for dtype in _dtypes(device):
            ctx = _ctx_factory(device, dtype)
            x = _input(shape, dtype, device)
            g = torch.randn(shape, device=device).to(dtype)
            base = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()).to(device)
            base_call = _fwd_bwd(base, x, g, ctx)
            for name, make in _norm_modules(c).items():
                ours = make().to(device)
                o, b = compare(_fwd_bwd(ours, x, g, ctx), base_call, settings, device)
                yield (Result(f"norm/{name}", o, b, "x".join(map(str, shape)), str(dtype)[6:],
                                      device.type, baseline="BatchNorm2d+ReLU", target=TARGET))
            # Path-BN conv layer: conv cost dominates, so use a quarter of the batch on CPU.
            n = shape[0] if (quick or device.type == "cuda") else max(shape[0] // 4, 2)
            cshape = (n, *shape[1:])
            try:
                ours, base_conv = (m.to(device) for m in _path_conv(c))
            except Skip as e:
                print(f"  skip norm/PathBatchNorm-conv: {e}")
                continue
            xc = _input(cshape, dtype, device)
            gc = torch.randn(cshape, device=device).to(dtype)
            if device.type == "cuda":
                ours = ours.to(memory_format=torch.channels_last)
                base_conv = base_conv.to(memory_format=torch.channels_last)
            o, b = compare(_fwd_bwd(ours, xc, gc, ctx), _fwd_bwd(base_conv, xc, gc, ctx), settings, device)
            yield (Result("norm/PathBN-conv3x3", o, b, "x".join(map(str, cshape)), str(dtype)[6:],
                                  device.type, baseline="Conv2d+BatchNorm2d+ReLU", target=TARGET))


# -- issue 7: every CompleteBatchNorm preset against BN+ReLU, repeated (docs/results/speed_cbn.md) --
def cbn_presets(rounds: int, settings: Settings, shapes: list[tuple[int, ...]] | None = None,
                presets: list[str] | None = None) -> Iterator[Result]:
    """``rounds`` repetitions of: each CBN preset (ReLU, fp32 CPU, training mode) forward+backward
    against ``nn.Sequential(nn.BatchNorm2d, nn.ReLU)`` on the same input, interleaved by
    :func:`compare`. ``extra``: round, 1-min load average, whether the fused path ran."""
    import os

    from ..nn.cbn import PRESETS, CompleteBatchNorm

    for rnd in range(rounds):
        for shape in shapes or SHAPES["full"]:
            torch.manual_seed(0)
            c = shape[1]
            x = torch.randn(shape).requires_grad_(True)
            g = torch.randn(shape)
            base = _fwd_bwd(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()), x, g, contextlib.nullcontext)
            for preset in presets or list(PRESETS):
                m = CompleteBatchNorm(c, "relu", preset)
                fused = type(m(x).grad_fn).__name__
                o, b = compare(_fwd_bwd(m, x, g, contextlib.nullcontext), base, settings)
                yield Result(f"norm/cbn:{preset}", o, b, "x".join(map(str, shape)), "float32", "cpu",
                             baseline="BatchNorm2d+ReLU", target=TARGET,
                             extra={"round": rnd, "load1": os.getloadavg()[0], "grad_fn": fused})


def cbn_train_steps(rounds: int, settings: Settings,
                    pairs: tuple[tuple[str, str], ...] = (("cbn", "sgd"), ("cbn", "psi-sgdm"))) -> Iterator[Result]:
    """``rounds`` repetitions of the resnet20 training steps ``train/<norm>+<optim>`` of
    :mod:`.train_step` (batch 64x3x32x32, width 1) against ``bn`` + ``SGD(foreach)``, interleaved."""
    import os

    from .train_step import _step_fn

    device = torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    base = _step_fn("bn", "sgd", x, y, 1.0, device)
    for rnd in range(rounds):
        for norm, optim in pairs:
            o, b = compare(_step_fn(norm, optim, x, y, 1.0, device), base, settings)
            yield Result(f"train/{norm}+{optim}", o, b, "resnet20 w1.0 batch 64x3x32x32", "float32", "cpu",
                         baseline="resnet20 bn + SGD(foreach)", target=1.15,
                         extra={"round": rnd, "load1": os.getloadavg()[0]})
