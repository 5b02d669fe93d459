"""The trainer config: every key :func:`shapee.train.train` reads, with its type, default and meaning.

``configs/trainer/default.yaml`` is the YAML face of :class:`TrainerConfig` (a test keeps the two equal);
``configs/trainer/tiny.yaml`` overrides it for seconds-long CPU runs. ``train`` merges whatever it is given onto this
schema, so a typo'd key or a wrong type fails at once with OmegaConf's error naming the key.

Batch sizes: ``batch_size`` is per process (GPU) and per micro-batch; one optimiser step sees
``batch_size × grad_accum_steps × world_size`` samples (the *global batch*).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from shapee.runtime import PRECISIONS


@dataclass
class OptimizerConfig:
    """AdamW (decoupled weight decay)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class LRScheduleConfig:
    """Linear warm-up from 0 over ``warmup_steps``, then ``constant`` or ``cosine`` decay to ``lr × min_lr_ratio``
    at ``max_steps``."""

    warmup_steps: int = 1000
    decay: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.0


@dataclass
class EMAConfig:
    """EMA as a half-life in samples with ramp-up (Karras et al. 2022, EDM ``training_loop.py``)."""

    halflife_ksamples: float = 500.0  # half-life of the EMA weights, in thousands of training samples
    rampup_ratio: Optional[float] = 0.05  # half-life ≤ ratio × samples seen so far; null = no ramp-up


@dataclass
class LoggerConfig:
    """wandb; ``offline`` writes under ``<run_dir>/wandb`` and never needs a network or an account."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "shapee"
    name: Optional[str] = None  # run name; default: the run directory's name
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """Keys of the ``trainer`` config group (see the module docstring for batch-size semantics)."""

    max_steps: int = 100_000  # optimiser steps (skipped non-finite steps count too)
    batch_size: int = 8  # per process, per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimiser step (no_sync on all but the last under DDP)
    num_workers: int = 4  # DataLoader workers per process
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA that supports it, else fp32) | bf16 | fp16 (+GradScaler) | fp32
    grad_clip: Optional[float] = 1.0  # max global gradient L2 norm; null = no clipping (the norm is still logged)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss_weights: dict[str, float] = field(default_factory=dict)  # name → weight; missing names weigh 1.0
    log_every: int = 50  # steps between logged averages
    eval_every: int = 5_000  # steps between eval_fn calls (rank 0, EMA model); 0 = never
    ckpt_every: int = 1_000  # steps between checkpoint + snapshot writes; 0 = only the final one
    resume: Optional[str] = "auto"  # auto (<run_dir>/checkpoints/last.pt if present) | never | <checkpoint path>
    init_from: Optional[str] = None  # checkpoint or snapshot whose (EMA) weights initialise the model
    init_allow_missing: list[str] = field(default_factory=list)  # fnmatch patterns of model keys init may lack
    init_allow_unexpected: list[str] = field(default_factory=list)  # fnmatch patterns of extra keys in the file
    init_allow_partial: bool = False  # true: init_from may be the snapshot of a run that did not finish
    ddp_find_unused_parameters: bool = False  # set true for models whose loss leaves some parameters unused
    compile: Any = False  # torch.compile the model's compile_targets(): false | true (inductor) | a backend name
    max_nonfinite_in_a_row: int = 10  # abort after this many consecutive non-finite steps
    progress_bar: bool = True  # tqdm on rank 0, when stderr is a terminal (SHAPEE_PROGRESS=0/1: never/always)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def resolve_trainer_config(cfg: DictConfig | Mapping[str, Any] | TrainerConfig | None) -> DictConfig:
    """Merge ``cfg`` onto the :class:`TrainerConfig` schema (defaults filled, types checked, unknown keys refused)
    and validate the values that OmegaConf cannot (choices, ranges)."""
    schema = OmegaConf.structured(TrainerConfig)
    m = schema if cfg is None else OmegaConf.merge(schema, cfg)
    checks = [
        (m.max_steps >= 0, f"max_steps must be ≥ 0, got {m.max_steps}"),
        (m.batch_size >= 1, f"batch_size must be ≥ 1, got {m.batch_size}"),
        (m.grad_accum_steps >= 1, f"grad_accum_steps must be ≥ 1, got {m.grad_accum_steps}"),
        (m.num_workers >= 0, f"num_workers must be ≥ 0, got {m.num_workers}"),
        (
            m.precision in PRECISIONS,
            f"precision must be {'|'.join(PRECISIONS)}, got {m.precision!r}",
        ),
        (m.grad_clip is None or m.grad_clip > 0, f"grad_clip must be > 0 or null, got {m.grad_clip}"),
        (len(m.optimizer.betas) == 2, f"optimizer.betas must have two entries, got {list(m.optimizer.betas)}"),
        (
            m.lr_schedule.decay in ("constant", "cosine"),
            f"lr_schedule.decay must be constant|cosine, got {m.lr_schedule.decay!r}",
        ),
        (m.lr_schedule.warmup_steps >= 0, f"lr_schedule.warmup_steps must be ≥ 0, got {m.lr_schedule.warmup_steps}"),
        (m.ema.halflife_ksamples >= 0, f"ema.halflife_ksamples must be ≥ 0, got {m.ema.halflife_ksamples}"),
        (m.log_every >= 1, f"log_every must be ≥ 1, got {m.log_every}"),
        (m.eval_every >= 0, f"eval_every must be ≥ 0, got {m.eval_every}"),
        (m.ckpt_every >= 0, f"ckpt_every must be ≥ 0, got {m.ckpt_every}"),
        (m.max_nonfinite_in_a_row >= 1, f"max_nonfinite_in_a_row must be ≥ 1, got {m.max_nonfinite_in_a_row}"),
        (
            m.logger.mode in ("offline", "online", "disabled"),
            f"logger.mode must be offline|online|disabled, got {m.logger.mode!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"trainer config: {message}")
    return m
