"""``RunConfig``: one training run, as a dataclass that round-trips through TOML."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["RunConfig", "ConfigError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what is expected."""


_CHOICES: dict[str, tuple[str, ...]] = {
    "schedule": ("constant", "multistep", "cosine"),
    "amp": ("none", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
}


@dataclass
class RunConfig:
    """Everything that defines a run. ``bnlab train`` flags override the fields of a TOML file."""

    name: str = "run"
    out_dir: str = "runs/run"
    # model
    model: str = "resnet20"
    norm: str = "bn"
    act: str = "relu"
    width: float = 1.0
    model_options: dict[str, Any] = field(default_factory=dict)
    # data
    data: str = "digits"
    data_dir: str | None = None
    train_subset: int | None = None   # first-n stratified subset of the training split
    test_subset: int | None = None
    augment: bool = True
    download: bool = False            # fetch the official archive into data_dir if missing
    data_options: dict[str, Any] = field(default_factory=dict)  # passed to bnlab.data.load
    num_workers: int = 4              # decoding workers (imagefolder only)
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    optim: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    optim_options: dict[str, Any] = field(default_factory=dict)
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # execution
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True
    threads: int | None = None        # intra-op CPU threads (None: torch's default); 1 suits tiny models
    sync_stats: bool = True           # synchronise norm statistics across processes under DDP
    eval_every: int = 1
    diagnostics_every: int = 0        # log three_effects every N epochs (0: never)
    diagnostics_batches: int = 8
    checkpoint_every: int = 1
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        hints = get_type_hints(RunConfig)
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"config field {name!r}: got {getattr(self, name)!r}, expected one of {choices}")
        positive = ["epochs", "batch_size", "eval_every", "checkpoint_every", "diagnostics_batches"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r}: got {getattr(self, name)!r}, expected an int >= 1")
        for name in ("lr", "width", "momentum", "weight_decay", "warmup_epochs", "gamma", "label_smoothing"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"config field {name!r}: got {getattr(self, name)!r}, expected a finite number")
        for name in ("lr", "width"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"config field {name!r}: got {getattr(self, name)!r}, expected > 0")
        for name in ("momentum", "weight_decay", "warmup_epochs", "diagnostics_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field {name!r}: got {getattr(self, name)!r}, expected >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"config field 'label_smoothing': got {self.label_smoothing!r}, expected in [0, 1)")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"config field 'gamma': got {self.gamma!r}, expected in (0, 1]")
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise ConfigError(f"config field 'milestones': got {self.milestones!r}, expected fractions in (0, 1)")
        for name in ("train_subset", "test_subset", "max_steps_per_epoch", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"config field {name!r}: got {v!r}, expected None or an int >= 1")

    # -- TOML -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps({k: v for k, v in self.to_dict().items() if v is not None})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Check ``value`` against a simple type hint (int/float/str/bool/None unions, list, dict)."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        errors = 0
        for opt in options:
            try:
                _check_type(name, value, opt)
                return
            except ConfigError:
                errors += 1
        raise ConfigError(f"config field {name!r}: got {value!r}, expected {_hint_name(hint)}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"config field {name!r}: got {value!r}, expected None")
        return
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config field {name!r}: got {value!r}, expected a list")
        (inner,) = typing.get_args(hint)
        for v in value:
            _check_type(name, v, inner)
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field {name!r}: got {value!r}, expected a table/dict")
        return
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"config field {name!r}: got {value!r}, expected {_hint_name(hint)}")


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
