"""``evaluate(cfg)``: a composed ``configs/evaluate.yaml`` (``task=encoder`` | ``task=generation``, see
:mod:`shapee.eval.config`) → :func:`~shapee.eval.evaluate_encoder` or :func:`~shapee.eval.evaluate_generation`, which
take the task's settings as they are: no key is picked out or renamed on the way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shapee.eval.encoder import evaluate_encoder
from shapee.eval.generation import evaluate_generation

RUN = {"encoder": evaluate_encoder, "generation": evaluate_generation}  # the keys of shapee.eval.config.TASKS


def evaluate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``cfg["task"]`` (``encoder`` | ``generation``) with ``cfg``, the settings of that task."""
    task = cfg.get("task")
    if task not in RUN:
        raise ValueError(f"task must be one of {tuple(RUN)}, got {task!r}")
    return RUN[task](cfg)
