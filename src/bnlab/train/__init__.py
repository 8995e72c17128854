"""Training: ``RunConfig`` (TOML <-> dataclass), ``train(cfg)``, checkpoints, torch.distributed."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig
from .trainer import NonFiniteLossError, TrainingError, build_model, prepare_data, train

__all__ = ["RunConfig", "ConfigError", "train", "TrainingError", "NonFiniteLossError", "CheckpointError",
           "load_checkpoint", "save_checkpoint", "build_model", "prepare_data"]
