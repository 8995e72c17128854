"""Optimiser step against ``torch.optim.SGD(foreach=True)`` on the same parameters.

* PSISGD (``make_optimizer("psi-sgdm", resnet56)``) vs SGD(momentum, foreach) on ResNet-56 (BN).
* GSGD (``make_optimizer("gsgd", resnet56 pbn)``, and a ResNet-18 at width 0.5) vs SGD(momentum, foreach)
  on the same model.

Gradients come from one real forward/backward (so PSISGD's scale-invariance guard, active on its
first steps, sees genuine gradients); the first steps run during warm-up, then only ``step()`` is
timed with the gradients held fixed. Copies of the model are used so the two optimisers never
touch the same tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .timing import Result, Settings, Skip, compare

__all__ = ["run"]

TARGET = 1.5


def _with_grads(model: nn.Module, device: torch.device, input_size: int, batch: int = 4) -> nn.Module:
    """``model`` on ``device`` in training mode with ``.grad`` from one forward/backward."""
    model = model.to(device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, input_size, input_size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return model


def _pair(model: nn.Module, name: str, lr: float, momentum: float, input_size: int,
          **options) -> tuple[Callable[[], None], Callable[[], None]]:
    """Step functions of optimiser ``name`` on ``model`` and of SGD(foreach) on a deep copy.

    PSISGD's invariance guard runs on its first ``guard_steps`` steps; those steps are taken here
    with fresh gradients, so the timed steps are the steady-state ones."""
    from ..optim import make_optimizer

    ours = make_optimizer(name, model, lr=lr, momentum=momentum, **options)
    for _ in range(getattr(ours, "guard_steps", 0)):
        _with_grads(model, next(model.parameters()).device, input_size)
        ours.step()
    _with_grads(model, next(model.parameters()).device, input_size)
    for p in model.parameters():
        if p.grad is not None:
            # The timed steps reuse one fixed gradient hundreds of times; scaled down, the weight
            # norms stay put, as in training, so PSISGD's 1e4 norm guard does not fire every step.
            p.grad.mul_(1e-4)
    base_model = copy.deepcopy(model)
    for p, q in zip(model.parameters(), base_model.parameters()):
        q.grad = None if p.grad is None else p.grad.clone()
    base = torch.optim.SGD(base_model.parameters(), lr=lr, momentum=momentum, foreach=True)
    return ours.step, base.step


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(quick: bool, device: torch.device, settings: Settings) -> Iterator[Result]:
    from ..models import build

    # PSISGD on ResNet-56 (BN); quick: resnet20 at quarter width.
    name, width = ("resnet20", 0.25) if quick else ("resnet56", 1.0)
    torch.manual_seed(0)
    size = 16 if quick else 32
    model = _with_grads(build(name, norm="bn", width=width), device, size)
    try:
        ours, base = _pair(model, "psi-sgdm", lr=0.01, momentum=0.9, input_size=size)
    except (ImportError, ValueError) as e:
        print(f"  skip optim/psi-sgdm: {type(e).__name__}: {e}")
    else:
        o, b = compare(ours, base, settings, device)
        yield Result("optim/psi-sgdm step", o, b, f"{name} w{width} ({_count(model)} params)", "float32",
                     device.type, baseline="SGD(momentum, foreach)", target=TARGET)
    # GSGD on the same ResNet-56, in path space (the parameter set), and on a wider ResNet-18 (2.8M
    # parameters: the memory-bound regime); quick: resnet20 at quarter width only.
    cases = [("resnet20", 0.25)] if quick else [("resnet56", 1.0), ("resnet18", 0.5)]
    for name, width in cases:
        try:
            torch.manual_seed(0)
            size = 16 if quick else 32
            pmodel = _with_grads(build(name, norm="pbn", width=width), device, size)
            # lr 1e-4: the timed steps reuse one gradient (~100 steps); at 1e-2 the skeleton path ratios go
            # negative and explode after a few dozen steps (same work per step, but warnings and a
            # degenerate state); 1e-4 keeps R_k in [0.9997, 1.0001] over 400 steps
            ours, base = _pair(pmodel, "gsgd", lr=1e-4, momentum=0.9, input_size=size)
        except (ImportError, ValueError) as e:
            raise Skip(f"gsgd / pbn model not available ({type(e).__name__}: {e})") from e
        o, b = compare(ours, base, settings, device)
        yield Result("optim/gsgd step", o, b, f"{name}-pbn w{width} ({_count(pmodel)} params)", "float32",
                     device.type, baseline="SGD(momentum, foreach)", target=TARGET)


def gsgd_before_after(old_path: str, width: float = 0.5, rounds: int = 3,
                      settings: Settings | None = None) -> list[dict[str, float]]:
    """Interleaved medians (``compare``) of the G-SGD step of an earlier ``optim/gsgd.py`` (a file at
    ``old_path``, e.g. ``git show ed8c8e0:src/bnlab/optim/gsgd.py``), of the current one and of
    SGD(momentum, foreach), on three copies of ``resnet18`` pbn with the same gradients; ``rounds``
    repetitions. Returns one dict per round: ``old_ms``, ``new_ms``, ``sgd_ms`` (each pair timed
    interleaved; ``new_ms`` from the new-vs-SGD pair) and ``old_vs_new`` (old / new, timed together).
    """
    from ..models import build
    from ..path.reparam import param_groups

    old = _load_old(old_path, "_gsgd_before")
    from ..optim.gsgd import GSGD

    settings = settings or Settings()
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = _with_grads(build("resnet18", norm="pbn", width=width), device, 32)
    copies = [copy.deepcopy(model) for _ in range(3)]
    for c in copies:
        for p, q in zip(model.parameters(), c.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
    o_old = old.GSGD(param_groups(copies[0]), lr=1e-4, momentum=0.9)
    o_new = GSGD(param_groups(copies[1]), lr=1e-4, momentum=0.9)
    o_sgd = torch.optim.SGD(copies[2].parameters(), lr=1e-4, momentum=0.9, foreach=True)
    out = []
    for _ in range(rounds):
        old_ms, sgd1 = compare(o_old.step, o_sgd.step, settings, device)
        new_ms, sgd2 = compare(o_new.step, o_sgd.step, settings, device)
        a, b = compare(o_old.step, o_new.step, settings, device)
        out.append(dict(old_ms=old_ms, new_ms=new_ms, sgd_ms=(sgd1 + sgd2) / 2, old_vs_sgd=old_ms / sgd1,
                        new_vs_sgd=new_ms / sgd2, old_vs_new=a / b))
    return out


def gsgd_flat_vs_per_block(model_name: str = "resnet56", width: float = 1.0, rounds: int = 3,
                           settings: Settings | None = None) -> list[dict[str, float]]:
    """Thread-CPU interleaved medians (:func:`compare_cpu`) of the G-SGD step with the flat fast path
    (default), with ``flat=False`` (the per-block path) and of SGD(momentum, foreach), on three copies of
    ``build(model_name, norm="pbn", width=width)`` with the same gradients (x 1e-4, held fixed), lr 1e-4,
    momentum 0.9. One dict per round: ``flat_ms``, ``per_block_ms``, ``sgd_ms`` and the ratios."""
    from ..models import build
    from ..optim.gsgd import GSGD
    from ..path.reparam import param_groups

    settings = settings or Settings(reps=11)
    torch.manual_seed(0)
    model = _with_grads(build(model_name, norm="pbn", width=width), torch.device("cpu"), 32)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(1e-4)
    copies = [copy.deepcopy(model) for _ in range(3)]
    for c in copies:
        for p, q in zip(model.parameters(), c.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
    o_flat = GSGD(param_groups(copies[0]), lr=1e-4, momentum=0.9)
    o_blk = GSGD(param_groups(copies[1]), lr=1e-4, momentum=0.9, flat=False)
    o_sgd = torch.optim.SGD(copies[2].parameters(), lr=1e-4, momentum=0.9, foreach=True)
    for _ in range(3):
        for o in (o_flat, o_blk, o_sgd):
            o.step()
    out = []
    for _ in range(rounds):
        f, s1 = compare_cpu(o_flat.step, o_sgd.step, settings)
        b, s2 = compare_cpu(o_blk.step, o_sgd.step, settings)
        out.append(dict(flat_ms=f, per_block_ms=b, sgd_ms=(s1 + s2) / 2, flat_vs_sgd=f / s1,
                        per_block_vs_sgd=b / s2))
    return out


def gsgd_op_counts(model_name: str = "resnet56", width: float = 1.0, steps: int = 10) -> dict[str, float]:
    """ATen calls per G-SGD step (``torch.profiler``, all ``aten::`` ops, views and copies included) of the
    flat path and of the per-block path (``flat=False``), momentum 0.9, after 3 warm-up steps."""
    from torch.profiler import profile

    from ..models import build
    from ..optim.gsgd import GSGD
    from ..path.reparam import param_groups

    torch.manual_seed(0)
    model = _with_grads(build(model_name, norm="pbn", width=width), torch.device("cpu"), 32)
    out = {}
    for flat in (True, False):
        opt = GSGD(param_groups(model), lr=1e-4, momentum=0.9, flat=flat)
        for _ in range(3):
            opt.step()
        with profile() as prof:
            for _ in range(steps):
                opt.step()
        calls = sum(k.count for k in prof.key_averages() if k.key.startswith("aten::"))
        out["flat_calls" if flat else "per_block_calls"] = calls / steps
    return out


def compare_cpu(ours: Callable[[], Any], base: Callable[[], Any], settings: Settings) -> tuple[float, float]:
    """:func:`bnlab.benchmarks.timing.compare` with this thread's CPU time (``time.thread_time``) instead
    of wall time (CPU only): on a machine shared with many processes (load average >> cores) wall-time
    samples mostly measure the scheduler; thread CPU time leaves that out (cache and memory-bandwidth
    contention stay in). Same interleaving, warm-up and median; milliseconds per call."""
    import math
    import statistics
    import time

    def run(fn: Callable[[], Any], n: int) -> float:
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        return time.thread_time() - t0

    first = [0.0, 0.0]
    for _ in range(max(settings.warmup, 1)):
        for k, fn in enumerate((ours, base)):
            first[k] = run(fn, 1)
    inner = max(1, math.ceil(settings.min_sample_s / max(max(first), 1e-6)))
    samples: list[list[float]] = [[], []]
    for r in range(settings.reps):
        for k in ((0, 1) if r % 2 == 0 else (1, 0)):
            samples[k].append(run(ours if k == 0 else base, inner) / inner)
    return statistics.median(samples[0]) * 1e3, statistics.median(samples[1]) * 1e3


def _load_old(old_path: str, name: str) -> Any:
    """Import an earlier ``bnlab/optim/<file>.py`` (a file at ``old_path``) as a private submodule of
    ``bnlab.optim`` (its relative imports resolve); the optimiser registry is left as it was."""
    import importlib.util

    from .. import optim as registry

    saved = dict(registry._REGISTRY)
    spec = importlib.util.spec_from_file_location(f"bnlab.optim.{name}", old_path)
    if spec is None or spec.loader is None:
        raise ValueError(f"old_path: cannot load a module from {old_path!r}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)  # the old module re-registers its names
    return mod


def psi_before_after(old_path: str | None, rounds: int = 3, track_angles: bool = True, fused: bool = False,
                     model_name: str = "resnet56", settings: Settings | None = None,
                     clock: str = "wall") -> dict[str, Any]:
    """Interleaved medians (``compare``) of the PSI-SGDM step (``make_optimizer("psi-sgdm")``, lr 0.01,
    momentum 0.9) of an earlier ``optim/psi.py`` (``old_path``, e.g. ``git show 997ffbc:src/bnlab/optim/
    psi.py``; None: skip), of the current one (eager; and ``fused=True`` when asked) and of
    ``SGD(momentum=0.9, foreach=True)``, on copies of ``model_name`` (BN) with the same gradients
    (one real forward/backward, x 1e-4 so the 1e4 guard never fires; invariance-check steps and 5
    warm-up steps first). Returns ``{"compile_s": first fused step (s) or None, "rounds": [...]}``,
    one dict per round with ``new_ms``/``sgd_ms``/``new_vs_sgd`` (and ``old_*``, ``fused_*``,
    ``old_vs_new`` timed together). ``clock``: ``"wall"`` (``compare``) or ``"cpu"`` (:func:`compare_cpu`).
    """
    import time

    from ..models import build
    from ..optim import make_optimizer

    settings = settings or Settings()
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = _with_grads(build(model_name, norm="bn"), device, 32)
    old_mod = _load_old(old_path, "_psi_before") if old_path else None
    kinds = ["new", "sgd"] + (["old"] if old_mod else []) + (["fused"] if fused else [])
    copies = {k: copy.deepcopy(model) for k in kinds}
    steps: dict[str, Callable[[], Any]] = {}
    compile_s = None
    for k, m in copies.items():
        if k == "sgd":
            continue
        build_opt = old_mod._builder("psi-sgdm") if k == "old" else (  # type: ignore[union-attr]
            lambda mm, **kw: make_optimizer("psi-sgdm", mm, **kw))
        kw: dict[str, Any] = dict(lr=0.01, momentum=0.9, track_angles=track_angles)
        if k == "fused":
            kw["fused"] = True
        opt = build_opt(m, **kw)
        for _ in range(opt.guard_steps):
            _with_grads(m, device, 32)
            opt.step()
        _with_grads(m, device, 32)
        for p in m.parameters():
            p.grad.mul_(1e-4)
        t0 = time.perf_counter()
        opt.step()
        if k == "fused":
            compile_s = time.perf_counter() - t0
        for _ in range(5):
            opt.step()
        steps[k] = opt.step
    ref = copies["new"]
    for p, q in zip(ref.parameters(), copies["sgd"].parameters()):
        q.grad = p.grad.clone()
    steps["sgd"] = torch.optim.SGD(copies["sgd"].parameters(), lr=0.01, momentum=0.9, foreach=True).step
    timer = (lambda x, y: compare(x, y, settings, device)) if clock == "wall" else (
        lambda x, y: compare_cpu(x, y, settings))
    out = []
    for _ in range(rounds):
        row: dict[str, float] = {}
        for k in ("new", "old", "fused"):
            if k in steps:
                a, b = timer(steps[k], steps["sgd"])
                row.update({f"{k}_ms": a, f"sgd_{k}_ms": b, f"{k}_vs_sgd": a / b})
        if "old" in steps:
            a, b = timer(steps["old"], steps["new"])
            row["old_vs_new"] = a / b
        out.append(row)
    return {"compile_s": compile_s, "rounds": out}


if __name__ == "__main__":  # python -m bnlab.benchmarks.optim {gsgd OLD | gsgd-flat [--model M] | psi [OLD] ...}
    import argparse
    import json

    ap = argparse.ArgumentParser(description="optimiser step before/after vs SGD(foreach)")
    ap.add_argument("kind", help="gsgd | gsgd-flat | gsgd-ops | psi (a path ending in .py: gsgd with that old file)")
    ap.add_argument("--model", default="resnet56", help="gsgd-flat: model name (pbn)")
    ap.add_argument("--width", type=float, default=1.0, help="gsgd-flat: model width")
    ap.add_argument("old", nargs="?", default=None, help="path of the earlier optim/<kind>.py")
    ap.add_argument("--fused", action="store_true", help="psi: also time fused=True (compile time reported)")
    ap.add_argument("--angles", type=int, default=1, help="psi: track_angles (default 1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="psi: wall or thread CPU time")
    ap.add_argument("--reps", type=int, default=9, help="samples per side (Settings.reps)")
    a = ap.parse_args()
    if a.kind.endswith(".py"):
        a.kind, a.old = "gsgd", a.kind
    if a.kind not in ("gsgd", "gsgd-flat", "gsgd-ops", "psi"):
        ap.error(f"kind must be gsgd, gsgd-flat, gsgd-ops or psi, got {a.kind!r}")
    torch.set_num_threads(1)
    if a.kind == "gsgd-ops":
        print(gsgd_op_counts(a.model, a.width))
    elif a.kind == "gsgd-flat":
        for row in gsgd_flat_vs_per_block(a.model, a.width, rounds=a.rounds, settings=Settings(reps=a.reps)):
            print({k: round(v, 3) for k, v in row.items()})
    elif a.kind == "gsgd":
        if a.old is None:
            ap.error("gsgd needs the path of the earlier optim/gsgd.py")
        for row in gsgd_before_after(a.old, rounds=a.rounds):
            print({k: round(v, 3) for k, v in row.items()})
    else:
        res = psi_before_after(a.old, rounds=a.rounds, track_angles=bool(a.angles), fused=a.fused,
                               settings=Settings(reps=a.reps), clock=a.clock)
        print(json.dumps({"compile_s": res["compile_s"]}))
        for row in res["rounds"]:
            print({k: round(v, 3) for k, v in row.items()})
