"""Rank-0 run logging: wandb (offline by default) plus a plain ``metrics.jsonl`` in the run directory.

wandb in ``offline`` mode writes under ``<run_dir>/wandb`` and needs neither a network nor an account (sync later
with ``wandb sync``); ``disabled`` skips wandb entirely (and its import). ``metrics.jsonl`` gets one JSON object per
logged step in every mode, so runs can be inspected and tested without wandb.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor


class RunLogger:
    """Scalar and image logging for one run; every method is a no-op on ranks other than 0.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``wandb/`` go here).
        mode: ``offline`` | ``online`` | ``disabled`` (wandb).
        project, name, tags: wandb run metadata (``name`` defaults to the run directory's name).
        config: plain mapping stored as the wandb run config.
        enabled: ``False`` on non-zero ranks.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        mode: str = "offline",
        project: str = "shapee",
        name: str | None = None,
        tags: list[str] | None = None,
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger mode must be offline|online|disabled, got {mode!r}")
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._wandb_run = None
        self._jsonl = None
        if not enabled:
            return
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if mode != "disabled":
            import wandb  # imported lazily: it is slow to import and not needed with mode=disabled

            self._wandb = wandb
            self._wandb_run = wandb.init(
                dir=str(self.run_dir),
                mode=mode,
                project=project,
                name=name or self.run_dir.name,
                tags=list(tags or []),
                config=dict(config or {}),
                # Resuming the same run directory appends to the same wandb run instead of starting a new one.
                id=_wandb_id(self.run_dir),
                resume="allow",
            )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars (python numbers or 0-d tensors) at ``step``."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Log images, each a numpy array ``[H, W, C]`` (C ∈ {1, 3, 4}), uint8 or float in [0, 1]."""
        if not self.enabled:
            return
        for key, img in images.items():
            if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[-1] in (1, 3, 4)):
                shape = getattr(img, "shape", None)
                raise ValueError(f"image {key!r} must be a numpy array [H, W, C] with C in 1/3/4, got shape {shape}")
        if self._wandb_run is not None:
            self._wandb_run.log({k: self._wandb.Image(_to_uint8(v)) for k, v in images.items()}, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """[H, W, C] uint8 or float in [0, 1] → [H, W, C] uint8."""
    if img.dtype == np.uint8:
        return img
    return (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, stored in it, so that a resumed run logs to the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = os.urandom(8).hex()
    path.write_text(run_id)
    return run_id


class IntervalMeter:
    """Averages of the logged quantities over the steps since the last log (rank-local; rank 0's get logged).

    Loss terms stay on their device until :meth:`flush`, so metering adds no host sync per micro-batch. Terms of a
    step that was skipped (non-finite) are dropped: one NaN would poison the whole interval's average.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.perf_counter()
        self.loss_sums: dict[str, Tensor] = {}  # summed over the micro-batches of applied steps that reported them
        self.loss_counts: dict[str, int] = {}  # how many micro-batches reported each key (some are occasional)
        self.step_sums: dict[str, float] = {}  # summed over applied steps
        self.n_applied = self.n_attempted = 0
        self._this_step: list[dict[str, Tensor]] = []

    def add_micro(self, terms: Mapping[str, Tensor], total: Tensor) -> None:
        """One micro-batch's ``loss_dict`` output (logged as ``loss/<name>``, ``metric/...`` kept) and total."""
        named = {(k if k.startswith("metric/") else f"loss/{k}"): v.detach().float() for k, v in terms.items()}
        named["loss/total"] = total.detach().float()
        self._this_step.append(named)

    def end_step(self, *, applied: bool, **step_values: float) -> None:
        """Close a step; ``applied=False`` (skipped) discards its terms; ``step_values`` (grad_norm, ...) averaged."""
        self.n_attempted += 1
        if applied:
            for named in self._this_step:
                for key, value in named.items():
                    self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
                    self.loss_counts[key] = self.loss_counts.get(key, 0) + 1
            for key, value in step_values.items():
                self.step_sums[key] = self.step_sums.get(key, 0.0) + float(value)
            self.n_applied += 1
        self._this_step = []

    def flush(self, *, global_batch: int, **current: float) -> dict[str, float]:
        """Interval averages plus ``samples_per_s`` (all attempted steps; includes eval/checkpoint time) and the
        ``current`` values (e.g. the LR) as given; then start a new interval."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        out = {k: float(v) for k, v in current.items()}
        out["samples_per_s"] = self.n_attempted * global_batch / elapsed
        # Each key is averaged over the micro-batches that reported it (e.g. a timestep quartile absent from a batch).
        out.update({k: float(v) / self.loss_counts[k] for k, v in self.loss_sums.items()})
        out.update({k: v / self.n_applied for k, v in self.step_sums.items()})
        self._reset()
        return out
