"""Worker functions for the 2-process gloo tests (imported by spawned children, so module level).

Every case is built from a seed, so the parent process rebuilds the same layer/model and runs the
single-process reference on the concatenated batch. Workers save their results with ``torch.save``
to ``<out>/rank<r>.pt``; the tests compare.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable, *args: Any, world: int = WORLD) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` fresh processes (gloo on 127.0.0.1)."""
    import torch.multiprocessing as mp

    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="spawn")


def init_gloo(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


# -- layer cases: (name, builder, global input shape, per-rank batch sizes) ------------------------
def _cbn(preset: str, dims: int = 2, act: str = "tanh", **kw):
    def make():
        from bnlab.nn.cbn import CompleteBatchNorm

        return CompleteBatchNorm(3 if dims == 2 else 4, act, preset, dims=dims, **kw)

    return make


def _bna(cls_name: str, c: int, act: str, **kw):
    def make():
        import bnlab.nn as bnn

        return getattr(bnn, cls_name)(c, act, **kw)

    return make


def _pbn(**kw):
    def make():
        from bnlab.nn.path_bn import PathBatchNorm

        return PathBatchNorm(3, lam=0.5, act="relu", dims=2, **kw)

    return make


def layer_cases() -> list[tuple[str, Callable[[], nn.Module], tuple[int, ...], tuple[int, int]]]:
    cases = [
        ("bna1d_NC", _bna("BatchNormAct1d", 4, "tanh"), (8, 4), (3, 5)),
        ("bna1d_NCL_cumulative", _bna("BatchNormAct1d", 4, "sigmoid", momentum=None), (8, 4, 5), (3, 5)),
        ("bna2d", _bna("BatchNormAct2d", 3, "relu"), (6, 3, 4, 4), (2, 4)),
        ("bna2d_no_running_stats", _bna("BatchNormAct2d", 3, "gelu", affine=False, track_running_stats=False),
         (6, 3, 4, 4), (3, 3)),
        ("cbn_split_post_1d", _cbn("split_post", dims=1), (8, 4), (3, 5)),
        ("pbn", _pbn(), (6, 3, 4, 4), (2, 4)),
        ("pbn_cumulative", _pbn(momentum=None), (6, 3, 4, 4), (3, 3)),
    ]
    for preset in ("vanilla", "decoupled", "post_bn", "double", "split_pre", "split_post", "post_center"):
        cases.append((f"cbn_{preset}", _cbn(preset), (6, 3, 3, 3), (2, 4)))
    return cases


def _randomise(layer: nn.Module, seed: int) -> None:
    """Non-trivial affine parameters (all ones/zeros would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (1.0 if p.dim() == 1 else 0.0))


def case_data(shape: tuple[int, ...], step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (x, skip, upstream weight) of one step, float64, identical in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5
    skip = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, skip, w


def make_layer(builder: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    layer = builder().double()
    _randomise(layer, 7)
    return layer


def run_layer(layer: nn.Module, shape: tuple[int, ...], rows: slice, steps: int = 2) -> dict[str, Any]:
    """Train-mode steps on ``x[rows]`` (loss = sum(out * w)), then one eval forward. Returns the
    outputs, input grads and parameter grads of every step, and the final buffers."""
    from bnlab.nn.path_bn import PathBatchNorm

    res: dict[str, Any] = {}
    layer.train()
    for step in range(steps):
        x, skip, w = case_data(shape, step)
        x = x[rows].clone().requires_grad_(True)
        skip = skip[rows].clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(x, skip) if isinstance(layer, PathBatchNorm) else layer(x)
        (out * w[rows]).sum().backward()
        res[f"out{step}"] = out.detach()
        res[f"xgrad{step}"] = x.grad.detach()
        res[f"skipgrad{step}"] = skip.grad.detach() if skip.grad is not None else torch.zeros(0)
        for name, p in layer.named_parameters():
            res[f"grad{step}/{name}"] = p.grad.detach().clone()
    layer.eval()
    x, skip, _ = case_data(shape, steps)
    with torch.no_grad():
        res["eval_out"] = layer(x[rows], skip[rows]) if isinstance(layer, PathBatchNorm) else layer(x[rows])
    for name, b in layer.named_buffers():
        res[f"buffer/{name}"] = b.detach().clone()
    return res


def _rows(rank: int, split: tuple[int, ...]) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


# -- model cases: (name, build kwargs, optimizer, optimizer kwargs) ------------------------------
def model_cases() -> list[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    small = dict(num_classes=3, in_channels=2, input_size=6)
    return [
        ("resnet_bn_sgd", dict(name="resnet20", norm="bn", width=0.25, **small), "sgd",
         dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
        ("resnet_cbn_sgd", dict(name="resnet20", norm="cbn", act="tanh", width=0.25, **small), "sgd",
         dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        ("resnet_cbn_double_sgd", dict(name="resnet20", norm="cbn:double", act="silu", width=0.25,
                                       **small), "sgd", dict(lr=0.1, momentum=0.9)),
        ("resnet_cbn_split_post_sgd", dict(name="resnet20", norm="cbn:split_post", act="tanh", width=0.25,
                                           **small), "sgd", dict(lr=0.1, momentum=0.9)),
        ("resnet_bn_psi_sgdm", dict(name="resnet20", norm="bn", width=0.25, **small), "psi-sgdm",
         dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        ("mlp_pbn_gsgd", dict(name="mlp", norm="pbn", hidden=[8, 8, 8], **small), "gsgd",
         dict(lr=0.05, momentum=0.9, weight_decay=1e-4)),
        ("resnet_pbn_gsgd", dict(name="resnet20", norm="pbn", width=0.25, **small), "gsgd",
         dict(lr=0.05, momentum=0.9)),
    ]


def model_data(step: int, batch: int = 8, in_channels: int = 2, size: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(5000 + step)
    x = torch.randn(batch, in_channels, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, y


def make_model(spec: dict[str, Any], optim: str, okw: dict[str, Any]):
    """(model, optimizer) in float64 from a seed; raises ImportError/NotImplementedError when a
    method has not landed."""
    from bnlab.models import build
    from bnlab.optim import make_optimizer

    spec = dict(spec)
    torch.manual_seed(0)
    model = build(spec.pop("name"), **spec).double()
    return model, make_optimizer(optim, model, **okw)


def train_model(model: nn.Module, opt: torch.optim.Optimizer, rows: slice, steps: int = 3,
                wrapped: nn.Module | None = None) -> None:
    net = wrapped if wrapped is not None else model
    model.train()
    for step in range(steps):
        x, y = model_data(step)
        loss = F.cross_entropy(net(x[rows]), y[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def model_result(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    res = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    x, _ = model_data(99)
    with torch.no_grad():
        res["eval_out"] = model(x)
    res["opt"] = opt.state_dict()
    return res


# -- the one spawned job ---------------------------------------------------------------------------
def run_all(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every layer case and every model case (DDP, sync_stats) on this rank; saves rank<r>.pt."""
    from bnlab.nn.convert import sync

    init_gloo(rank, world, port)
    results: dict[str, Any] = {}
    ddp = None
    try:
        for name, builder, shape, split in layer_cases():
            try:
                layer = make_layer(builder)
            except ImportError as e:
                results[name] = {"skip": f"not importable: {e}"}
                continue
            sync(layer)
            results[name] = run_layer(layer, shape, _rows(rank, split))
        for name, spec, optim, okw in model_cases():
            try:
                model, opt = make_model(spec, optim, okw)
            except (ImportError, NotImplementedError, ValueError) as e:
                results[name] = {"skip": f"{type(e).__name__}: {e}"}
                continue
            sync(model)
            ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            per = 8 // world
            train_model(model, opt, slice(rank * per, (rank + 1) * per), wrapped=ddp)
            results[name] = model_result(model, opt)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # free the last DDP wrapper (its reducer holds the gloo group) while the group is alive: a reducer
        # destroyed after destroy_process_group can hang joining gloo's threads (seen in the 1-rank test)
        ddp = None  # noqa: F841
        gc.collect()
        dist.destroy_process_group()
