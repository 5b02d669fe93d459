"""Checkpoints: ours (full training state, and small EMA snapshots) and the released Shap-E layouts.

``shapee.io.load(path)`` rebuilds the model a snapshot describes and loads its weights; ``shapee.io.save(path,
model, model_config)`` writes one. ``shapee.io.load_official(name, path)`` loads a released checkpoint. Nothing here
unpickles code: ``torch.load(..., weights_only=True)`` or safetensors everywhere; and no file chooses what is built:
a model config read from a file is checked against :data:`ALLOWED_MODELS` at every depth before anything is called
(:mod:`shapee.io.safe`).
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
from shapee.io.loading import load_model
from shapee.io.safe import (
    ALLOWED_MODELS,
    build_model,
    check_model_config,
    instantiate_model,
)


def save(path: str | os.PathLike, model: nn.Module, model_config: Mapping[str, Any], *, step: int | None = None) -> None:
    """Write a snapshot of ``model`` (its weights + the ``_target_`` config that rebuilds it), atomically."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_snapshot(path, weights=weights, model_config=dict(model_config), step=step)


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored in a snapshot (or a full checkpoint's EMA weights + config) and load it, in eval mode.

    Only the shapee model classes of :data:`ALLOWED_MODELS` are built, and only after the whole config was checked
    (:func:`shapee.io.safe.build_model`): a file naming any other ``_target_``, at any depth, is refused.

    Raises:
        CheckpointError: missing, corrupt or not our file; a refused config (naming its key path); weights that do not
            fit the config.
    """
    return load_model(path, device=device)


__all__ = [
    "ALLOWED_MODELS",
    "CheckpointError",
    "OfficialCheckpointError",
    "build_model",
    "check_model_config",
    "instantiate_model",
    "load",
    "load_model",
    "load_checkpoint",
    "load_official",
    "load_snapshot",
    "load_weights",
    "save",
    "save_checkpoint",
    "save_snapshot",
]

