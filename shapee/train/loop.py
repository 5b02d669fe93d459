"""The one training loop that every stage (encoder nerf/distill/finetune, diffusion prior) runs.

:func:`train` reads top to bottom in numbered steps (STYLE.md rule 1): dist init, seed, run dir, build/move + init,
DDP, EMA, optimiser, resume, loop, final checkpoint + snapshot; the steps with a body of their own (building the
optimiser, resuming, one optimiser step, reporting, checkpointing) are the helpers below it, each named after its step.
It knows nothing about the model beyond the contract

    model.loss_dict(batch) -> dict[str, Tensor]   # 0-d tensors

where keys starting with ``metric/`` are logged only and every other key is a loss term, weighted by
``cfg.loss_weights[name]`` (default 1.0) and summed in exactly one place (:func:`weighted_total`, STYLE.md rule 5).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from shapee.io.checkpoint import (
    CheckpointError,
    code_version,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_snapshot,
)
from shapee.cli import progress_bar
from shapee.train.config import resolve_trainer_config
from shapee.train.data import DataStream, to_device
from shapee.train.dist import DistInfo, all_reduce_max, cleanup_distributed, init_distributed
from shapee.train.ema import EMA, ema_beta
from shapee.train.logger import IntervalMeter, RunLogger
from shapee.train.rng import capture_rng_state, restore_rng_state, seed_everything
from shapee.runstatus import unfinished_reason, write_status
from shapee.runtime import precision_dtype

EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]


def train(
    cfg: DictConfig | Mapping[str, Any],
    *,
    model: nn.Module,
    train_set: Dataset,
    run_dir: str | os.PathLike,
    collate_fn: Callable | None = None,
    eval_fn: EvalFn | None = None,
    model_config: Mapping[str, Any] | None = None,
    run_config: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Train ``model`` on ``train_set`` with the trainer config ``cfg``; resumable, DDP-aware, rank-0 logging.

    Args:
        cfg: the ``trainer`` config group (keys and defaults: :class:`shapee.train.config.TrainerConfig`,
            ``configs/trainer/default.yaml``).
        model: any module with ``loss_dict(batch) -> dict[str, Tensor]`` of 0-d tensors (see the module docstring).
        train_set: map-style dataset; sharded with ``DistributedSampler`` (shuffled, ``drop_last``).
        run_dir: output directory: ``config.yaml``, ``metrics.jsonl``, ``wandb/``, ``checkpoints/{last,snapshot}.pt``.
        collate_fn: DataLoader collate function (default: torch's).
        eval_fn: ``eval_fn(ema_model, step) -> dict`` of scalars and optional images (numpy ``[H, W, C]`` uint8 or
            float in [0, 1]); called on rank 0 every ``eval_every`` steps, with the training RNG state restored after.
        model_config: plain mapping stored in snapshots to rebuild the model (e.g. the Hydra ``model`` node).
        run_config: the whole resolved run config, stored in checkpoints and ``config.yaml`` (default: ``cfg``).
        device: force a device; default ``cuda:<LOCAL_RANK>`` if available, else CPU.

    Returns:
        Final metrics: ``step``, ``samples_seen``, ``nonfinite_steps``, ``stopped_by_signal`` (0/1), ``finished``
        (1 when ``max_steps`` was reached, 0 when a signal stopped the run before), ``max_steps``, the last logged
        interval averages (``loss/<name>``, ``loss/total``, ``lr``, ``grad_norm``, ``samples_per_s``, ...) and the
        last ``eval/<name>`` scalars.

    Raises:
        FloatingPointError: after ``max_nonfinite_in_a_row`` consecutive steps with a non-finite loss or gradient.
        CheckpointError: ``resume``/``init_from`` points at a missing, corrupt or mismatched file, or ``init_from``
            at the checkpoint/snapshot of a run that did not finish (unless ``init_allow_partial``).

    Whether the run finished is also written to ``run_dir/checkpoints/status.json`` (:mod:`shapee.runstatus`):
    ``finished: false`` before the first step, ``true`` after the final snapshot of a run that reached ``max_steps``.
    """
    cfg = resolve_trainer_config(cfg)
    if not callable(getattr(model, "loss_dict", None)):
        raise TypeError(f"model {type(model).__name__} has no loss_dict(batch) method, which train() requires")

    # 1. Distributed: torchrun env vars → process group (NCCL on CUDA, gloo on CPU); else a single process.
    info = init_distributed(device)
    device = info.device

    # 2. Seed: different per rank so dropout/noise differ across ranks (as EDM); the model init is the caller's,
    #    and DDP broadcasts rank 0's weights below.
    seed_everything(cfg.seed * info.world_size + info.rank)

    # 3. Run directory (rank 0 writes; all ranks read the checkpoint, so run_dir must be on a shared filesystem).
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    saved = _SavedConfigs.of(cfg, run_config, model_config)
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved.run)))
    resume_path = find_resume_checkpoint(cfg.resume, ckpt_dir)

    # 4. Build/move: the model to its device; init_from loads weights only (chaining stages), unless resuming.
    model.to(device).train()
    if cfg.init_from and resume_path is None:
        _init_from(model, cfg, info)

    # 5. DDP: wrap a module whose forward *is* loss_dict, because DDP only hooks forward() to set up gradient sync.
    #    Construction broadcasts rank 0's parameters and buffers, so all ranks start equal.
    loss_module = _loss_module(model, cfg, info)

    # 6. EMA: a copy of the (now synced) weights, frozen and in eval mode (STYLE.md rule 9).
    ema = EMA(model)
    if cfg.compile:  # after the EMA copy (a plain module) and DDP; Module.compile keeps the state-dict names
        compile_for_training(model, cfg.compile)

    # 7. Optimiser, LR schedule, precision policy, and the data stream (sharded, resumable mid-epoch).
    run = _build_run(cfg, info, model, loss_module, ema, train_set, collate_fn)

    # 8. Resume the full training state (all ranks read the same file), or start at step 0.
    if resume_path is not None:
        _resume(run, resume_path, cfg)
    if info.is_main:  # unfinished until the final snapshot of a run that reaches max_steps says otherwise
        write_status(ckpt_dir, finished=False, step=run.step, max_steps=cfg.max_steps, stopped_by_signal=False)

    # 9. The loop. A SIGTERM/SIGINT only sets a flag: the current step finishes, then we checkpoint and return.
    report = _Report(run_dir, cfg, run, saved.run)
    stopped_by_signal, completed = False, False
    last_saved_step = run.step if resume_path is not None else -1
    stop_requested = threading.Event()
    previous_handlers = _install_stop_handlers(stop_requested)
    try:
        while run.step < cfg.max_steps:
            # 9a–9c. Forward/backward, gradient norm, update (or skip a non-finite step), EMA, LR; stop agreed by all.
            stop, lr = _optimiser_step(run, cfg, report.interval, stop_requested)
            report.progress.update(1)

            # 9d. Log, evaluate, checkpoint (rank 0 writes; the RNG gather inside _write_checkpoint is collective).
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps or stop:
                report.log_interval(run, lr)
            if eval_fn is not None and cfg.eval_every and run.step % cfg.eval_every == 0 and info.is_main:
                report.evaluate(eval_fn, ema.module, run.step)
            if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or stop:
                _write_checkpoint(run, cfg, ckpt_dir, saved)
                last_saved_step = run.step
            if stop:
                stopped_by_signal = True
                _print0(info, f"stop requested: checkpoint written at step {run.step}, leaving the loop")
                break

        # 10. Final checkpoint + snapshot (unless this exact step was just written), and whether the run finished.
        _finish(run, cfg, ckpt_dir, saved, written=last_saved_step == run.step, stopped_by_signal=stopped_by_signal)
        completed = True
    finally:
        report.close()
        _restore_handlers(previous_handlers)
        # After a normal end every rank meets before the group goes: a rank that tears gloo down while a peer still
        # finishes its last collective aborts that peer ("terminate called without an active exception", seen in CI).
        # After an error there is no meeting (the peers may never come); leaving the group is all that is left.
        cleanup_distributed(info, synchronize=completed)

    return report.final | dict(
        step=run.step, samples_seen=run.samples_seen, nonfinite_steps=run.nonfinite_total,
        stopped_by_signal=int(stopped_by_signal), finished=int(run.step >= cfg.max_steps), max_steps=cfg.max_steps,
    )


# ----------------------------------------------------------------------------------------------------------------------
# The steps of train() with a name of their own: what a run holds between steps, and what builds, resumes, advances
# and saves it.


@dataclass
class _SavedConfigs:
    """The plain configs a run writes: ``run`` (config.yaml, checkpoints, the logger), ``trainer`` (checkpoints),
    ``model`` (snapshots; ``None`` when the caller gave none), with the code version."""

    run: Any
    trainer: Any
    model: Any
    code_version: Mapping[str, Any]

    @classmethod
    def of(cls, cfg: DictConfig, run_config: Mapping[str, Any] | None, model_config: Mapping[str, Any] | None):
        trainer = _plain(cfg)
        return cls(
            run=_plain(run_config) if run_config is not None else trainer,
            trainer=trainer,
            model=_plain(model_config) if model_config is not None else None,
            code_version=code_version(),
        )


@dataclass
class _Run:
    """What one training run holds between optimiser steps: the pieces a step uses and a checkpoint saves, and the
    counters (``step``, ``samples_seen``, non-finite steps) that resume restores."""

    info: DistInfo
    model: nn.Module
    loss_module: nn.Module  # forward = model.loss_dict; DDP-wrapped under torchrun
    ema: EMA
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp_dtype: torch.dtype
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    data: DataStream
    global_batch: int  # samples per optimiser step over all ranks
    loss_weights: dict[str, float]  # name → weight of the loss terms (weighted_total)
    step: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0


def _loss_module(model: nn.Module, cfg: DictConfig, info: DistInfo) -> nn.Module:
    """Step 5: ``model`` behind a forward that is its ``loss_dict``, wrapped in DDP under torchrun."""
    loss_module: nn.Module = _LossDictForward(model)
    if info.is_distributed:
        device = info.device
        loss_module = DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused_parameters,
        )
    return loss_module


def _init_from(model: nn.Module, cfg: DictConfig, info: DistInfo) -> None:
    """Step 4: ``cfg.init_from``'s weights into ``model``; the file of an unfinished run only with
    ``init_allow_partial`` (then with a warning)."""
    reason = unfinished_reason(cfg.init_from)
    if reason is not None:
        if not cfg.init_allow_partial:
            raise CheckpointError(f"init_from={reason}")
        _print0(info, f"WARNING: init_from={reason} (allowed by init_allow_partial)")
    _load_init_weights(model, cfg.init_from, cfg.init_allow_missing, cfg.init_allow_unexpected)


def _build_run(
    cfg: DictConfig,
    info: DistInfo,
    model: nn.Module,
    loss_module: nn.Module,
    ema: EMA,
    train_set: Dataset,
    collate_fn: Callable | None,
) -> _Run:
    """Step 7: AdamW over the trainable parameters, the warm-up/decay LR schedule, the precision policy (the only
    place precision is decided, STYLE.md rule 8) and the data stream (``DistributedSampler`` sharding, also with world
    size 1: one code path), at step 0."""
    device = info.device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
        fused=use_fused_adamw(device),
    )
    schedule = cfg.lr_schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup_steps=schedule.warmup_steps, decay=schedule.decay, max_steps=cfg.max_steps,
            min_lr_ratio=schedule.min_lr_ratio,
        ),
    )
    amp_dtype = precision_dtype(cfg.precision, device)
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 only, as nanoGPT
    data = DataStream(
        train_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", seed=cfg.seed, rank=info.rank, world_size=info.world_size,
    )
    return _Run(
        info=info, model=model, loss_module=loss_module, ema=ema, params=params, optimizer=optimizer,
        scheduler=scheduler, amp_dtype=amp_dtype, autocast=autocast, scaler=scaler, data=data,
        global_batch=cfg.batch_size * cfg.grad_accum_steps * info.world_size, loss_weights=dict(cfg.loss_weights),
    )


def _resume(run: _Run, path: Path, cfg: DictConfig) -> None:
    """Step 8: the full training state of the checkpoint ``path`` into ``run`` (all ranks read the same file). The
    data position and each rank's RNG streams continue exactly when the world size and batch size are the ones saved;
    otherwise the data order restarts at the next epoch with a fresh seed."""
    info = run.info
    ckpt = load_checkpoint(path, map_location="cpu")
    _load_state(run.model, ckpt["model"], path, "model")
    _load_state(run.ema.module, ckpt["ema"], path, "ema")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.samples_seen = ckpt["step"], ckpt["samples_seen"]
    run.nonfinite_total, run.nonfinite_in_a_row = ckpt["nonfinite"]["total"], ckpt["nonfinite"]["in_a_row"]
    same_layout = ckpt["data"]["world_size"] == info.world_size and ckpt["data"]["batch_size"] == cfg.batch_size
    if same_layout:
        run.data.load_state_dict(ckpt["data"])
        restore_rng_state(ckpt["rng"][info.rank])
    else:
        # Another sharding: the saved positions and per-rank RNG streams mean nothing any more; start a new epoch.
        run.data.load_state_dict({"epoch": ckpt["data"]["epoch"] + 1, "batch_in_epoch": 0})
        seed_everything((cfg.seed + run.step) * info.world_size + info.rank)
        _print0(info, f"resume: world_size/batch_size changed since {path}; data order restarts")
    _print0(info, f"resumed from {path} at step {run.step}")


def _optimiser_step(
    run: _Run, cfg: DictConfig, interval: IntervalMeter, stop_requested: threading.Event
) -> tuple[bool, float]:
    """Steps 9a–9c: one optimiser step of ``run`` (``run.step`` += 1). Returns whether all ranks agreed to stop (a
    signal reached one of them) and the LR this step used.

    Raises:
        FloatingPointError: the ``max_nonfinite_in_a_row``-th consecutive non-finite step.
    """
    info, device, scaler = run.info, run.info.device, run.scaler
    # 9a. Forward/backward over grad_accum_steps micro-batches; DDP syncs gradients on the last one only.
    bad = torch.zeros((), device=device)  # becomes 1 if any micro-batch loss is non-finite
    for micro in range(cfg.grad_accum_steps):
        batch = to_device(run.data.next(), device)
        last_micro = micro == cfg.grad_accum_steps - 1
        no_sync = run.loss_module.no_sync() if info.is_distributed and not last_micro else contextlib.nullcontext()
        with no_sync:
            with run.autocast:
                terms = run.loss_module(batch)  # dict[str, 0-d Tensor]
            total = weighted_total(terms, run.loss_weights)
            # Dividing by the number of micro-batches makes accumulation equal one big batch's mean loss.
            scaler.scale(total / cfg.grad_accum_steps).backward()
        bad = torch.maximum(bad, (~torch.isfinite(total)).float())
        interval.add_micro(terms, total)

    # 9b. Gradient norm (clipped if configured); then all ranks agree whether to skip and whether to stop.
    scaler.unscale_(run.optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm=max_norm)
    if not scaler.is_enabled():
        # fp16 overflow is the GradScaler's business (it skips and lowers the scale); otherwise it is ours.
        bad = torch.maximum(bad, (~torch.isfinite(grad_norm)).float().to(device))
    flags = torch.stack([bad, torch.tensor(float(stop_requested.is_set()), device=device)])
    skip, stop = (all_reduce_max(flags, info) > 0).tolist()

    # 9c. Update (or skip), EMA, LR.
    if skip:
        run.nonfinite_total += 1
        run.nonfinite_in_a_row += 1
        interval.end_step(applied=False)
        scaler.update()  # clears the unscale_ record (fp16); a no-op otherwise
        if run.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
            raise FloatingPointError(
                f"{run.nonfinite_in_a_row} consecutive non-finite steps (loss or gradient) at step {run.step}, "
                f"max_nonfinite_in_a_row={cfg.max_nonfinite_in_a_row}; last terms: "
                f"{ {k: float(v.detach()) for k, v in terms.items()} }"
            )
    else:
        run.nonfinite_in_a_row = 0
        scaler.step(run.optimizer)
        scaler.update()
        beta = ema_beta(
            batch_samples=run.global_batch,
            samples_seen=run.samples_seen,
            halflife_samples=cfg.ema.halflife_ksamples * 1000,
            rampup_ratio=cfg.ema.rampup_ratio,
        )
        run.ema.update(run.model, beta)
        interval.end_step(applied=True, grad_norm=float(grad_norm), ema_beta=beta)
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.optimizer.param_groups[0]["lr"]  # the LR this step used
    with warnings.catch_warnings():
        # The LR follows the step count, skipped steps included; torch warns if the very first step skipped.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        run.scheduler.step()
    run.step += 1
    run.samples_seen += run.global_batch
    return bool(stop), lr


class _Report:
    """What a run reports (rank 0 writes): the logger (``metrics.jsonl``, wandb), the progress bar, the meter of the
    current log interval, and ``final``, the last logged averages and evaluation scalars that :func:`train` returns."""

    def __init__(self, run_dir: Path, cfg: DictConfig, run: _Run, run_config: Any) -> None:
        info = run.info
        self.logger = RunLogger(run_dir, mode=cfg.logger.mode, project=cfg.logger.project, name=cfg.logger.name,
                                tags=list(cfg.logger.tags), config=run_config, enabled=info.is_main)
        self.progress = progress_bar(total=cfg.max_steps, initial=run.step, desc=f"train {run_dir.name}",
                                     enabled=info.is_main and cfg.progress_bar, unit="step", leave=False)
        self.interval = IntervalMeter()
        self.final: dict[str, float] = {}
        self.loss_smooth = math.nan  # EMA of the logged total loss, for the bar
        _print0(info, f"training {sum(p.numel() for p in run.params):,} parameters on {info.device} (world size "
                      f"{info.world_size}, {run.amp_dtype}), global batch {run.global_batch}, steps {run.step} → "
                      f"{cfg.max_steps}")

    def log_interval(self, run: _Run, lr: float) -> None:
        """Step 9d: the interval's averages into ``final`` and the log (``eval/*`` keys are the evaluation's to log),
        the smoothed loss on the bar."""
        self.final.update(self.interval.flush(global_batch=run.global_batch, lr=lr))
        self.final.update(nonfinite_steps=run.nonfinite_total, epoch=run.data.epoch)
        self.logger.log({k: v for k, v in self.final.items() if not k.startswith("eval/")}, run.step)
        loss = self.final.get("loss/total", math.nan)
        self.loss_smooth = loss if not math.isfinite(self.loss_smooth) else 0.9 * self.loss_smooth + 0.1 * loss
        self.progress.set_postfix(loss=f"{self.loss_smooth:.4g}", refresh=False)

    def evaluate(self, eval_fn: EvalFn, ema_model: nn.Module, step: int) -> None:
        """Step 9d: ``eval_fn`` on the EMA model, logged (:func:`_run_eval`); its scalars into ``final``."""
        self.final.update(_run_eval(eval_fn, ema_model, step, self.logger))

    def close(self) -> None:
        self.progress.close()
        self.logger.close()


def _finish(
    run: _Run, cfg: DictConfig, ckpt_dir: Path, saved: _SavedConfigs, *, written: bool, stopped_by_signal: bool
) -> None:
    """Step 10: the final checkpoint + snapshot (unless ``written`` at this step already), then ``status.json`` says
    whether the run reached ``max_steps``."""
    if not written:
        _write_checkpoint(run, cfg, ckpt_dir, saved)
    if run.info.is_main:
        write_status(ckpt_dir, finished=run.step >= cfg.max_steps, step=run.step, max_steps=cfg.max_steps,
                     stopped_by_signal=stopped_by_signal)


def _write_checkpoint(run: _Run, cfg: DictConfig, ckpt_dir: Path, saved: _SavedConfigs) -> None:
    """The full training state (``last.pt``) and the EMA snapshot (``snapshot.pt``) of ``run`` at its step.

    Every rank's RNG state is gathered (a collective: all ranks call this at the same step) so that a DDP resume
    continues each rank's dropout/noise stream exactly; rank 0 writes.
    """
    info = run.info
    rng_states = [capture_rng_state()]
    if info.is_distributed:
        rng_states = [None] * info.world_size
        dist.all_gather_object(rng_states, capture_rng_state())
    if not info.is_main:
        return
    save_checkpoint(
        ckpt_dir / "last.pt",
        {
            "model": run.model.state_dict(),
            "ema": run.ema.module.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "step": run.step,
            "samples_seen": run.samples_seen,
            "nonfinite": {"total": run.nonfinite_total, "in_a_row": run.nonfinite_in_a_row},
            "rng": rng_states,
            "data": {**run.data.state_dict(), "world_size": info.world_size, "batch_size": cfg.batch_size},
            "finished": run.step >= cfg.max_steps,
            "config": saved.run,
            "trainer_config": saved.trainer,
            "code_version": saved.code_version,
        },
    )
    save_snapshot(
        ckpt_dir / "snapshot.pt",
        weights=run.ema.module.state_dict(),
        model_config=saved.model,
        step=run.step,
        code_version=saved.code_version,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Pieces of the loop that others use too.


def compile_for_training(model: nn.Module, setting: Any = True) -> list[nn.Module]:
    """:func:`torch.compile` (in place, ``Module.compile``) the modules ``model.compile_targets()`` names (the whole
    model if it names none). ``setting``: ``True`` (inductor) or a backend name. Returns the compiled modules."""
    if setting is True:
        kwargs = {}
    elif isinstance(setting, str) and setting:
        kwargs = {"backend": setting}
    else:
        raise ValueError(f"trainer.compile must be false, true or a torch.compile backend name, got {setting!r}")
    targets = model.compile_targets() if callable(getattr(model, "compile_targets", None)) else [model]
    for module in targets:
        module.compile(**kwargs)
    return list(targets)


def use_fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel (one launch for all parameters) on CUDA; the default (foreach) elsewhere."""
    return torch.device(device).type == "cuda"


def weighted_total(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Σ_name weights.get(name, 1.0) · terms[name] over the loss terms (keys not starting with ``metric/``), in fp32.

    The one place where loss terms are summed (STYLE.md rule 5). A weight of exactly 0 drops the term.
    """
    total: Tensor | None = None
    for name, value in terms.items():
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"model.loss_dict()[{name!r}] must be a 0-d tensor, got {shape}")
        if name.startswith("metric/"):
            continue
        w = float(weights.get(name, 1.0))
        if w == 0.0:
            continue
        term = w * value.float()
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"model.loss_dict() returned no weighted loss term (keys: {sorted(terms)})")
    return total


def lr_factor(step: int, *, warmup_steps: int, decay: str, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at optimiser step ``step`` (0-based): linear warm-up over ``warmup_steps`` (the
    first step already uses ``1/warmup_steps``), then ``constant`` or ``cosine`` decay to ``min_lr_ratio`` at
    ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_schedule.decay must be constant|cosine, got {decay!r}")


class _LossDictForward(nn.Module):
    """``forward(batch) = model.loss_dict(batch)``, so that DDP (which hooks ``forward`` only) can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> dict[str, Tensor]:
        return self.model.loss_dict(batch)


def _run_eval(eval_fn: EvalFn, ema_model: nn.Module, step: int, logger: RunLogger) -> dict[str, float]:
    """Call ``eval_fn`` on the EMA model; log scalars as ``eval/<k>`` and numpy images; leave training RNG as it was."""
    rng = capture_rng_state()  # evaluation must not change the training run's random stream
    try:
        with torch.no_grad():
            out = eval_fn(ema_model, step)
    finally:
        restore_rng_state(rng)
    images, scalars = {}, {}
    for key, value in out.items():
        if isinstance(value, np.ndarray) and value.ndim == 3:
            images[f"eval/{key}"] = value  # [H, W, C]
        elif np.ndim(value) == 0:
            scalars[f"eval/{key}"] = float(value)
        else:
            raise ValueError(
                f"eval_fn returned {key!r} with shape {np.shape(value)}: "
                "values must be scalars or numpy [H, W, C] images"
            )
    logger.log(scalars, step)
    logger.log_images(images, step)
    return scalars


def find_resume_checkpoint(resume: str | None, ckpt_dir: Path) -> Path | None:
    """``auto`` → ``ckpt_dir/last.pt`` if it exists; ``never``/null → None; else the given path (must exist)."""
    if resume in (None, "never", ""):
        return None
    if resume == "auto":
        last = ckpt_dir / "last.pt"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"resume={resume!r}: checkpoint file does not exist")
    return path


def _load_state(module: nn.Module, state: Mapping[str, Tensor], path: Path, what: str) -> None:
    """Strict load with an error that names the checkpoint file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: its {what!r} weights do not match the model: {e}") from e


def _load_init_weights(model: nn.Module, path: str, allow_missing: list[str], allow_unexpected: list[str]) -> None:
    """Initialise ``model`` from a checkpoint's EMA or a snapshot's weights; strict except for the listed patterns."""
    weights = load_weights(path)
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not any(fnmatch(k, p) for p in allow_missing)]
    unexpected = [k for k in weights if k not in own and not any(fnmatch(k, p) for p in allow_unexpected)]
    mismatched = [f"{k}: {tuple(weights[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
                  if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"init_from={path!r} does not fit the model: missing {missing[:10]} ({len(missing)}), "
            f"unexpected {unexpected[:10]} ({len(unexpected)}), shape mismatches {mismatched[:10]}; "
            f"allow keys with trainer.init_allow_missing / init_allow_unexpected (fnmatch patterns)"
        )
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)


def _plain(cfg: Any) -> Any:
    """A resolved plain-container copy of a (DictConfig or plain) config, safe for weights_only checkpoints."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)


def _install_stop_handlers(event: threading.Event) -> dict[int, Any]:
    """SIGTERM/SIGINT set ``event`` instead of killing the process (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, frame: event.set())
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _print0(info: DistInfo, message: str) -> None:
    if info.is_main:
        print(f"[shapee.train] {message}", flush=True)
