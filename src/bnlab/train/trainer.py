"""The training loop: one :class:`RunConfig` in, one run folder out.

Run folder: ``config.toml``, ``metrics.jsonl`` (one JSON line per epoch), ``checkpoint.pt``
(atomic, ``weights_only``-loadable, written every ``checkpoint_every`` epochs and on
SIGINT/SIGTERM), ``summary.json``. ``resume=True`` continues from ``checkpoint.pt``; on CPU the
continuation is bit-identical to an uninterrupted run (batches and augmentation are pure functions
of (seed, epoch, batch); the LR schedule is a pure function of the step).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..data import DeviceLoader, ImageDataset, load
from ..models import build
from ..nn.convert import sync
from ..optim import make_optimizer
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig
from .distributed import DistInfo, all_reduce_sum, cleanup_distributed, setup_distributed
from .schedule import lr_factor

__all__ = ["train", "TrainingError", "NonFiniteLossError", "prepare_data", "build_model", "make_loaders"]


class TrainingError(RuntimeError):
    """A run could not continue; the message says why and what was kept."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class _Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0             # epochs completed
    step: int = 0              # optimisation steps completed in total
    batch_in_epoch: int = 0    # batches of the current (unfinished) epoch already done
    loss_sum: float = 0.0      # running sums of the unfinished epoch
    correct: float = 0.0
    seen: float = 0.0
    best_test_acc: float = 0.0
    elapsed: float = 0.0       # training seconds before this process started
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


_DATA_CACHE: dict[tuple, ImageDataset] = {}


def prepare_data(cfg: RunConfig) -> ImageDataset:
    """Load ``cfg.data`` with the configured subsets (subset choice seeded by 0, the same for all
    seeds, so seeds differ only in initialisation and batch order).

    The last two datasets loaded in this process are kept (their tensors are never modified), so a
    suite of runs on one dataset decompresses it once; a changed file (mtime/size) is re-read.
    """
    root = Path(cfg.data_dir) if cfg.data_dir else None
    stamp = (root.stat().st_mtime_ns, root.stat().st_size) if root is not None and root.is_file() else None
    key = (cfg.data, str(root), stamp, cfg.train_subset, cfg.test_subset,
           json.dumps(cfg.data_options, sort_keys=True, default=str))
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    ds = load(cfg.data, root=cfg.data_dir, download=cfg.download, train_subset=cfg.train_subset,
              test_subset=cfg.test_subset, seed=0, **dict(cfg.data_options))
    if isinstance(ds, ImageDataset):
        while len(_DATA_CACHE) >= 2:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = ds
    return ds


def make_loaders(cfg: RunConfig, ds, info: DistInfo):
    """(train, test) batch iterators: device-resident for in-memory datasets, Pillow-decoding
    workers for ``imagefolder``. Both shard by rank and are deterministic per (seed, epoch)."""
    common = dict(device=info.device, rank=info.rank, world_size=info.world_size,
                  channels_last=cfg.channels_last)
    drop_last = _train_size(ds) // info.world_size >= cfg.batch_size
    if not isinstance(ds, ImageDataset):  # imagefolder
        train_ld = ds.train_loader(cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers,
                                   drop_last=drop_last, max_batches=cfg.max_steps_per_epoch, **common)
        test_ld = ds.test_loader(cfg.batch_size, num_workers=cfg.num_workers, **common)
        return train_ld, test_ld
    common.update(mean=ds.mean, std=ds.std, seed=cfg.seed)
    train_ld = DeviceLoader(ds.x_train, ds.y_train, batch_size=cfg.batch_size, shuffle=True,
                            augment=cfg.augment, crop_padding=ds.crop_padding, flip=ds.flip,
                            drop_last=drop_last, max_batches=cfg.max_steps_per_epoch, **common)
    test_ld = DeviceLoader(ds.x_test, ds.y_test, batch_size=max(cfg.batch_size, 256), shuffle=False, **common)
    return train_ld, test_ld


def _train_size(ds) -> int:
    return len(ds.x_train) if isinstance(ds, ImageDataset) else len(ds.train_samples)


def _test_size(ds) -> int:
    return len(ds.x_test) if isinstance(ds, ImageDataset) else len(ds.test_samples)


def _batches_from(loader, start: int):
    """Batches ``start..`` of the current epoch (exact: batches are pure functions of the index)."""
    if hasattr(loader, "iter_from"):
        return loader.iter_from(start)
    return itertools.islice(iter(loader), start, None)


def build_model(cfg: RunConfig, ds: ImageDataset) -> nn.Module:
    return build(cfg.model, norm=cfg.norm, act=cfg.act, num_classes=ds.num_classes,
                 in_channels=ds.in_channels, width=cfg.width, input_size=ds.input_size,
                 **dict(cfg.model_options))


def _set_determinism(cfg: RunConfig, device: torch.device) -> None:
    if cfg.deterministic:
        torch.backends.cudnn.benchmark = False
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _autocast(cfg: RunConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Log:
    """Progress output: a tqdm bar on a terminal, plain lines otherwise; only rank 0 prints."""

    def __init__(self, info: DistInfo, quiet: bool) -> None:
        self.enabled = info.is_main and not quiet
        self.tty = sys.stderr.isatty()

    def bar(self, total: int, desc: str):
        if not (self.enabled and self.tty):
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def line(self, msg: str) -> None:
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


def _evaluate(model: nn.Module, loader: DeviceLoader, cfg: RunConfig, device: torch.device,
              info: DistInfo) -> tuple[float, float]:
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad(), _autocast(cfg, device):
        for xb, yb in loader:
            out = model(xb)
            sums[0] += F.cross_entropy(out.float(), yb, reduction="sum").double()
            sums[1] += (out.argmax(1) == yb).sum()
            sums[2] += len(yb)
    sums = all_reduce_sum(sums, info)
    model.train()
    n = max(sums[2].item(), 1.0)
    return sums[0].item() / n, sums[1].item() / n


def _diagnostics(model: nn.Module, loader, cfg: RunConfig, lr: float) -> dict[str, float]:
    """The CBN paper's three effects at the current weights, on the next training batches."""
    from ..diagnostics import three_effects

    batches = list(itertools.islice(iter(loader), cfg.diagnostics_batches))
    if len(batches) < 2:
        return {}
    report = three_effects(model, nn.CrossEntropyLoss(), batches, lr=lr)
    return report.scalars(prefix="diag/")


def _state(model: nn.Module, opt: torch.optim.Optimizer, scaler, progress: _Progress,
           cfg: RunConfig) -> dict[str, Any]:
    return {
        "format": "bnlab-checkpoint-1",
        "bnlab_version": __version__,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": progress.__dict__.copy(),
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _rewrite_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl = exactly the epochs of the checkpoint (drops lines of a lost epoch)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))
    os.replace(tmp, path)


def train(cfg: RunConfig, resume: bool = False, quiet: bool = False,
          stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` and return the summary (also written to ``<out_dir>/summary.json``).

    ``stop_after_epochs``: return after this many epochs of *this call* (checkpoint written), for
    time-sliced jobs; ``resume=True`` continues.

    Raises :class:`NonFiniteLossError` when the loss becomes NaN/Inf (the last good checkpoint
    stays), and :class:`TrainingError` for a missing checkpoint on ``resume``.
    """
    cfg.validate()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field 'device': got 'cuda' but CUDA is not available; expected 'cpu' or 'auto'")
    info = setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    finished = False
    try:
        result = _train(cfg, info, resume, quiet, stop_after_epochs)
        finished = True
        return result
    finally:
        torch.set_num_threads(threads)
        if info.distributed:
            cleanup_distributed(synchronize=finished)


def _train(cfg: RunConfig, info: DistInfo, resume: bool, quiet: bool,
           stop_after_epochs: int | None = None) -> dict[str, Any]:
    device = info.device
    _set_determinism(cfg, device)
    log = _Log(info, quiet)
    out = Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    if info.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"cannot create run folder {str(out)!r}: {e}") from e
        if not os.access(out, os.W_OK):
            raise TrainingError(f"run folder {str(out)!r} is not writable")

    ds = prepare_data(cfg)
    if _test_size(ds) == 0:
        raise TrainingError(f"data {cfg.data!r}: the test split is empty; evaluation needs at least one image")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.distributed and cfg.sync_stats:
        sync(model)
    opt = make_optimizer(cfg.optim, model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         nesterov=cfg.nesterov, **dict(cfg.optim_options))
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None

    progress = _Progress()
    if resume:
        if not ckpt_path.is_file():
            raise TrainingError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
        state = load_checkpoint(ckpt_path, map_location=device)
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            progress = _Progress(**state["progress"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrainingError(f"--resume: checkpoint {str(ckpt_path)!r} does not fit this run (other model, "
                                f"optimizer or bnlab version?): {type(e).__name__}: {first}") from e
        if info.distributed and info.rank != 0:  # rank 0's partial sums must be counted once
            progress.loss_sum = progress.correct = progress.seen = 0.0
        log.line(f"resumed from {ckpt_path} at epoch {progress.epoch}, batch {progress.batch_in_epoch}")
    if info.is_main:
        cfg.save(out / "config.toml.tmp")  # atomic: a kill never leaves a truncated config.toml
        os.replace(out / "config.toml.tmp", out / "config.toml")
        _rewrite_metrics(out / "metrics.jsonl", progress.history)

    train_model: nn.Module = model
    if info.distributed:
        ddp_kwargs = {"broadcast_buffers": not cfg.sync_stats}
        if device.type == "cuda":
            ddp_kwargs["device_ids"] = [device.index]
        train_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    if cfg.compile:
        train_model = torch.compile(train_model)

    train_loader, test_loader = make_loaders(cfg, ds, info)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    log.line(f"[bnlab] {cfg.name}: {cfg.model}/{cfg.norm}/{cfg.act} + {cfg.optim} on {ds.describe()}; "
             f"{cfg.epochs} epochs x {steps_per_epoch} steps, device {device}, world {info.world_size}")

    start = time.perf_counter()
    end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, progress.epoch + stop_after_epochs)
    model.train()
    with _StopFlag() as stop:
        while progress.epoch < end_epoch:
            epoch = progress.epoch
            train_loader.set_epoch(epoch)
            t_epoch = time.perf_counter()
            sums = torch.tensor([progress.loss_sum, progress.correct, progress.seen], dtype=torch.float64,
                                device=device)
            bad = torch.zeros((), dtype=torch.bool, device=device)
            bar = log.bar(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}")
            if bar is not None:
                bar.update(progress.batch_in_epoch)
            for xb, yb in _batches_from(train_loader, progress.batch_in_epoch):
                factor = lr_factor(progress.step, total_steps, cfg.schedule, cfg.milestones, cfg.gamma,
                                   warmup_steps)
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor
                with _autocast(cfg, device):
                    logits = train_model(xb)
                    loss = loss_fn(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    try:
                        opt.step()
                    except FloatingPointError as e:  # e.g. a degenerate G-SGD step (weights unchanged)
                        raise NonFiniteLossError(f"optimizer step failed at epoch {epoch + 1}, step "
                                                 f"{progress.step + 1}: {e}; the last good checkpoint "
                                                 f"{str(ckpt_path)!r} is kept") from e
                with torch.no_grad():
                    lossd = loss.detach()
                    bad |= ~torch.isfinite(lossd)
                    sums += torch.stack([lossd.double() * len(yb), (logits.argmax(1) == yb).sum().double(),
                                         torch.tensor(float(len(yb)), dtype=torch.float64, device=device)])
                progress.step += 1
                progress.batch_in_epoch += 1
                if device.type == "cpu" or progress.batch_in_epoch % 50 == 0:
                    if bool(bad):
                        raise NonFiniteLossError(
                            f"non-finite training loss at epoch {epoch + 1}, step {progress.step} "
                            f"(lr {opt.param_groups[0]['lr']:.4g}); the run stopped and the last good "
                            f"checkpoint {str(ckpt_path)!r} is kept. Lower the learning rate or check the data.")
                if bar is not None:
                    bar.update(1)
                    if progress.batch_in_epoch % 10 == 0:
                        bar.set_postfix(loss=f"{lossd.item():.4f}")
                if stop.signum is not None:
                    break
            if bar is not None:
                bar.close()
            if bool(bad):
                raise NonFiniteLossError(
                    f"non-finite training loss in epoch {epoch + 1}; the run stopped and the last good "
                    f"checkpoint {str(ckpt_path)!r} is kept.")
            progress.loss_sum, progress.correct, progress.seen = (float(v) for v in sums.tolist())
            if stop.signum is not None and progress.batch_in_epoch < steps_per_epoch:
                progress.elapsed += time.perf_counter() - start
                if info.is_main:
                    save_checkpoint(_state(model, opt, scaler, progress, cfg), ckpt_path)
                log.line(f"[bnlab] signal {stop.signum}: checkpoint saved at epoch {epoch + 1}, batch "
                         f"{progress.batch_in_epoch}; resume with --resume")
                raise KeyboardInterrupt(f"stopped by signal {stop.signum}; checkpoint saved")

            # ---- end of epoch: metrics, evaluation, telemetry, checkpoint --------------------
            totals = all_reduce_sum(sums, info)
            n = max(totals[2].item(), 1.0)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": progress.step, "lr": opt.param_groups[0]["lr"],
                "train_loss": totals[0].item() / n, "train_acc": totals[1].item() / n,
                "epoch_time": time.perf_counter() - t_epoch,
            }
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                row["test_loss"], row["test_acc"] = _evaluate(model, test_loader, cfg, device, info)
                progress.best_test_acc = max(progress.best_test_acc, row["test_acc"])
            if hasattr(opt, "telemetry"):
                row.update({f"opt/{k}": float(v) for k, v in opt.telemetry().items()})
            if cfg.diagnostics_every and (epoch + 1) % cfg.diagnostics_every == 0:
                row.update(_diagnostics(model, train_loader, cfg, opt.param_groups[0]["lr"]))
            progress.epoch += 1
            progress.batch_in_epoch = 0
            progress.loss_sum = progress.correct = progress.seen = 0.0
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) and k != "train_loss" else v)
                   for k, v in row.items()}  # strict JSON: NaN diagnostics become null
            progress.history.append(row)
            if info.is_main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
                if (progress.epoch % cfg.checkpoint_every == 0 or progress.epoch in (cfg.epochs, end_epoch)):
                    elapsed_now = progress.elapsed + time.perf_counter() - start
                    snapshot = _Progress(**{**progress.__dict__, "elapsed": elapsed_now})
                    save_checkpoint(_state(model, opt, scaler, snapshot, cfg), ckpt_path)
            msg = (f"epoch {epoch + 1:>3}/{cfg.epochs} loss {row['train_loss']:.4f} "
                   f"acc {row['train_acc']:.4f}")
            if "test_acc" in row:
                msg += f" | test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}"
            log.line(msg + f" | {row['epoch_time']:.1f}s")
            if not math.isfinite(row["train_loss"]):
                raise NonFiniteLossError(f"non-finite training loss in epoch {epoch + 1}")

    wall = progress.elapsed + time.perf_counter() - start
    last = progress.history[-1] if progress.history else {}
    summary = {
        "name": cfg.name, "model": cfg.model, "norm": cfg.norm, "act": cfg.act, "optim": cfg.optim,
        "data": cfg.data, "seed": cfg.seed, "epochs": progress.epoch,
        "train_loss": last.get("train_loss"), "train_acc": last.get("train_acc"),
        "test_loss": last.get("test_loss"), "test_acc": last.get("test_acc"),
        "best_test_acc": progress.best_test_acc, "wall_time_s": wall,
        "train_size": _train_size(ds), "test_size": _test_size(ds),
        "world_size": info.world_size, "device": str(device),
        "versions": {"bnlab": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "hardware": _hardware(device),
    }
    if info.is_main:
        _write_json(out / "summary.json", summary)
    return summary


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
