"""Writing evaluation results: ``results.json``, ``results.md``, PNG image grids; and the device choice."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table: one line per row, cells as ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(value):
    """NaN/inf → None (JSON has neither), numpy/torch scalars → Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(out: str | Path, results: dict, markdown: str) -> Path:
    """Write ``out/results.json`` (NaN as null) and ``out/results.md``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    return out


def save_image_grid(path: str | Path, grid: np.ndarray) -> Path:
    """Save a uint8 ``[H, W, 3]`` image as PNG (Pillow), creating the folder."""
    grid = np.asarray(grid)
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[-1] != 3:
        raise ValueError(f"image grid must be uint8 [H, W, 3], got {grid.dtype} {grid.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
