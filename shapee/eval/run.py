"""``evaluate(cfg)``: the composed ``configs/evaluate.yaml`` → :func:`~shapee.eval.evaluate_encoder` or
:func:`~shapee.eval.evaluate_generation`.

The YAML is flat (one namespace for both tasks); this picks each task's keys and renames the generation renders'
``render_views`` / ``render_resolution`` to the function's ``views`` / ``resolution``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shapee.eval.encoder import ENCODER_DEFAULTS, evaluate_encoder
from shapee.eval.generation import GENERATION_DEFAULTS, evaluate_generation

TASKS = ("encoder", "generation")


def evaluate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``cfg["task"]`` (``encoder`` | ``generation``) with the keys of the flat config that task reads."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    task = cfg.get("task")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    common = {k: cfg[k] for k in ("ckpt", "out", "task") if k in cfg}
    if task == "encoder":
        picked = {k: cfg[k] for k in ENCODER_DEFAULTS if k in cfg}
        return evaluate_encoder({**common, "data": cfg.get("data") or {}, **picked})
    renamed = dict(cfg)
    for old, new in (("render_views", "views"), ("render_resolution", "resolution")):
        if old in renamed:
            renamed[new] = renamed.pop(old)
        else:
            renamed.pop(new, None)  # the encoder's `views`/`resolution` mean something else
    picked = {k: renamed[k] for k in GENERATION_DEFAULTS if k in renamed}
    return evaluate_generation({**common, "prompts": cfg.get("prompts"), **picked})
