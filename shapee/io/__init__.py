"""Checkpoints: ours (full training state, and small EMA snapshots) and the released Shap-E layouts.

``shapee.io.load(path)`` rebuilds the model a snapshot describes and loads its weights; ``shapee.io.save(path,
model, model_config)`` writes one. ``shapee.io.load_official(name, path)`` loads a released checkpoint. Nothing here
unpickles code: ``torch.load(..., weights_only=True)`` or safetensors everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shapee.io.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_snapshot,
    load_weights,
    save_checkpoint,
    save_snapshot,
)
from shapee.io.official import OfficialCheckpointError, load_official


def save(path: str | os.PathLike, model: nn.Module, model_config: Mapping[str, Any], *, step: int | None = None) -> None:
    """Write a snapshot of ``model`` (its weights + the ``_target_`` config that rebuilds it), atomically."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_snapshot(path, weights=weights, model_config=dict(model_config), step=step)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a snapshot (or a full checkpoint's EMA weights + config) and load it, in eval mode."""
    from hydra.utils import instantiate

    snapshot = load_snapshot(path)
    config = snapshot.get("model_config")
    if not config or "_target_" not in config:
        raise CheckpointError(f"{path}: the snapshot has no model config with a _target_, so the model cannot be rebuilt")
    model = instantiate(config, _convert_="all")
    model.load_state_dict(snapshot["weights"], strict=True)
    return model.to(device).eval()


__all__ = [
    "CheckpointError",
    "OfficialCheckpointError",
    "load",
    "load_checkpoint",
    "load_official",
    "load_snapshot",
    "load_weights",
    "save",
    "save_checkpoint",
    "save_snapshot",
]

from shapee.io import official_priors  # noqa: E402,F401  registers text300M / image300M in OFFICIAL_LOADERS
