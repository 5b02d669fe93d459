"""shapee.train: the one training loop (DDP, precision, EMA, checkpoints, logging) shared by every stage."""

from shapee.train.config import TrainerConfig, resolve_trainer_config
from shapee.train.ema import EMA, ema_beta
from shapee.train.loop import lr_factor, train, weighted_total

__all__ = [
    "EMA",
    "TrainerConfig",
    "ema_beta",
    "lr_factor",
    "resolve_trainer_config",
    "train",
    "weighted_total",
]
