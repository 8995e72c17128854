"""Command line: ``bnlab train | compare | convex | diagnose | report | bench | info``.

User mistakes (bad names, bad values, missing files) end with one line ``bnlab: error: ...`` and
exit status 2, never a traceback; ``BNLAB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import typing
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

# RunConfig fields exposed as flags (name -> help); dict fields take JSON.
_TRAIN_FLAGS: dict[str, str] = {
    "name": "run name (labels reports)",
    "model": "model name (bnlab info lists them)",
    "norm": "bn | none | cbn | cbn:<preset> | pbn",
    "act": "relu | sigmoid | tanh | selu | silu | gelu",
    "width": "width multiplier",
    "model_options": "JSON object of model options, e.g. '{\"shortcut\": \"B\"}'",
    "data": "digits | mnist | fashion_mnist | cifar10 | cifar100",
    "data_dir": "folder or file holding the dataset",
    "train_subset": "use a stratified subset of this many training images",
    "test_subset": "use a stratified subset of this many test images",
    "augment": "random crop + flip (true/false)",
    "epochs": "epochs", "batch_size": "per-process batch size",
    "optim": "sgd | psi-sgd | psi-sgdm | psi-gd | gsgd",
    "lr": "base learning rate", "momentum": "momentum", "nesterov": "Nesterov momentum (true/false)",
    "weight_decay": "weight decay", "optim_options": "JSON object of optimiser options",
    "schedule": "constant | multistep | cosine", "milestones": "comma-separated fractions, e.g. 0.5,0.75",
    "gamma": "multistep factor", "warmup_epochs": "linear warm-up epochs",
    "label_smoothing": "label smoothing", "seed": "random seed", "device": "auto | cpu | cuda",
    "amp": "none | bf16 | fp16", "channels_last": "channels_last memory format (true/false)",
    "compile": "torch.compile the model (true/false)", "deterministic": "deterministic algorithms",
    "sync_stats": "synchronise norm statistics across processes (true/false)",
    "eval_every": "evaluate every N epochs", "diagnostics_every": "log three_effects every N epochs",
    "checkpoint_every": "checkpoint every N epochs",
    "threads": "intra-op CPU threads (default: torch's; 1 is fastest for tiny models)",
    "max_steps_per_epoch": "cap on steps per epoch",
}


class UserError(Exception):
    """A mistake in the command line or its inputs."""


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _json_obj(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    return parse


def _flag_type(hint: Any):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is not None and type(None) in typing.get_args(hint):
        return _none_or(_flag_type(args[0]))
    if hint is bool:
        return _bool
    if hint in (int, float, str):
        return hint
    if origin is dict:
        return _json_obj
    if origin is list:
        return _floats
    return str


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name == "out_dir":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_flag_type(hints[f.name]),
                       default=None, help=_TRAIN_FLAGS.get(f.name, f.name))
    p.add_argument("--out", dest="out_dir", default=None, help="run folder (default runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch-normalisation research library.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one configuration (TOML config and/or flags)")
    p.add_argument("--config", help="TOML file with RunConfig fields; flags override it")
    _add_train_flags(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt (must exist)")
    g.add_argument("--auto-resume", action="store_true",
                   help="continue if a checkpoint exists, else start (for torchrun --max-restarts)")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("compare", help="run a suite of methods over seeds; write report.md")
    p.add_argument("suite", nargs="?", default="quick", help="suite name (default: quick)")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated seeds (default: the suite's)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster version of the suite")
    p.add_argument("--data-dir", default=None, help="where the suite's dataset is")
    p.add_argument("--list", action="store_true", help="list suites and exit")

    try:
        from .convex.cli import add_parser as add_convex
    except ImportError:
        add_convex = None
    if add_convex is not None:
        add_convex(sub)

    p = sub.add_parser("diagnose", help="three-effects diagnostics (CBN paper) of a run or checkpoint")
    p.add_argument("target", help="run folder or checkpoint.pt")
    p.add_argument("--batches", type=int, default=16, help="mini-batches to average over")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", dest="json_out", default=None, help="also write the result as JSON")

    p = sub.add_parser("report", help="tables and plots from finished run folders")
    p.add_argument("runs", nargs="+", help="run folders, or folders containing them")
    p.add_argument("--out", default=None, help="write report.md and plots here")

    p = sub.add_parser("bench", help="speed against PyTorch's own BN/SGD, CVXPY, pyscnn (ratios)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", dest="json_out", default=None, help="write results as JSON")
    p.add_argument("--only", default=None, help="comma-separated benchmark names")

    sub.add_parser("info", help="versions, devices, models, norms, optimisers, datasets found")
    return parser


def _train_config(args: argparse.Namespace):
    from .train.config import RunConfig

    cfg = RunConfig.from_toml(args.config) if args.config else RunConfig()
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
               if getattr(args, f.name, None) is not None}
    if "out_dir" not in changes and not args.config:
        changes["out_dir"] = str(Path("runs") / (changes.get("name") or cfg.name))
    return cfg.replace(**changes)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = _train_config(args)
    resume = args.resume or (args.auto_resume and (Path(cfg.out_dir) / "checkpoint.pt").is_file())
    summary = train(cfg, resume=resume, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("name", "epochs", "train_loss", "test_acc", "wall_time_s")}))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .suites import get_suite, suite_names
    from .train.compare import run_suite

    if args.list:
        for name in suite_names():
            print(f"{name:10s} {get_suite(name, quick=True).description}")
        return 0
    suite = get_suite(args.suite, quick=args.quick, data_dir=args.data_dir)
    print(run_suite(suite, args.out, args.seeds, args.quick))
    print(f"report written to {Path(args.out) / suite.name / 'report.md'}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import find_runs, format_table, write_report

    runs = find_runs(args.runs)
    if not runs:
        raise UserError(f"no finished runs (summary.json) under {args.runs}")
    if args.out:
        print(write_report(runs, args.out))
    else:
        print(format_table(runs))
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .diagnostics.cli import diagnose

    return diagnose(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import run_benchmarks

    return run_benchmarks(quick=args.quick, device=args.device, json_out=args.json_out,
                          only=args.only.split(",") if args.only else None)


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import __version__
    from .data import dataset_names
    from .models import model_names
    from .nn import activation_names, norm_names
    from .optim import optimizer_names

    print(f"bnlab {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    cuda = torch.cuda.is_available()
    print(f"devices: cpu ({os.cpu_count()} cores)" + (f", cuda: {torch.cuda.get_device_name(0)}" if cuda else ""))
    print(f"models: {', '.join(model_names())}")
    print(f"norms: {', '.join(norm_names())}; activations: {', '.join(activation_names())}")
    print(f"optimizers: {', '.join(optimizer_names())}")
    print(f"datasets: {', '.join(dataset_names())}")
    try:
        from .data.discover import find_datasets
    except ImportError:
        return 0
    found = find_datasets()
    print("datasets found: " + (", ".join(f"{k} ({v})" for k, v in sorted(found.items())) or "none "
                                "(digits is embedded)"))
    return 0


_COMMANDS = {"train": _cmd_train, "compare": _cmd_compare, "report": _cmd_report, "diagnose": _cmd_diagnose,
             "bench": _cmd_bench, "info": _cmd_info}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = _COMMANDS.get(args.command)
    if handler is None and args.command == "convex":
        from .convex.cli import run as handler
    from .train.checkpoint import CheckpointError
    from .train.config import ConfigError
    from .train.trainer import TrainingError

    # OSError: full disk, read-only or missing folders, I/O errors (one line, not a traceback)
    # UnpicklingError: a dataset pickle refused by the restricted unpickler (bnlab.data.safe_pickle)
    user_errors = (UserError, ConfigError, CheckpointError, TrainingError, ValueError, OSError,
                   pickle.UnpicklingError)
    if args.command in ("train", "compare", "bench", "convex"):
        from .train.allocator import tune_cpu_allocator

        tune_cpu_allocator()  # glibc heap trimming cost the CBN resnet20 step ~12 % (train/allocator.py)
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt as e:
        print(f"bnlab: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except user_errors as e:
        if os.environ.get("BNLAB_DEBUG"):
            raise
        print(f"bnlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
