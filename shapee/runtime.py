"""Where work runs and in what precision: the one home of these policies (every script, trainer, pipeline and
benchmark asks here rather than deciding for itself).

- :func:`resolve_device`: ``"auto"``/``None`` → this process's CUDA device (``LOCAL_RANK`` under torchrun) when CUDA
  is available, else the CPU; anything else as given.
- :func:`precision_dtype`: ``"auto"`` → bf16 on CUDA devices that support it, else fp32; ``bf16``/``fp16``/``fp32``
  (or a ``torch.dtype``) as named.
- :func:`autocast_dtype`: the autocast dtype for a precision (``None``: run in fp32, no autocast).
- :func:`sync`: wait for queued GPU work (timings belong to the step that launched it).
- :func:`timed_call`: one call's result and wall seconds, queued GPU work waited for before and after.
- :func:`query_chunk`: points per field (MLP) call, ``"auto"`` → 4096 on the CPU, the caller's GPU value elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Points per field call on the CPU. Measured (release-size NeRSTF MLP, 2^17 points, 1 thread): 1.03 CPU-s in chunks of
# 4096 vs 1.61 in chunks of 65536; large chunks spill the caches and page in fresh activation buffers every call.
CPU_QUERY_CHUNK = 4096
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None`` → ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; anything else as given."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def precision_dtype(precision: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The compute dtype a precision name means on ``device`` (``auto``: bf16 on capable CUDA, else fp32)."""
    if isinstance(precision, torch.dtype):
        return precision
    device = torch.device(device)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"precision must be {'|'.join(PRECISIONS)}, got {precision!r}")
    return _DTYPES[precision]


def autocast_dtype(precision: str | torch.dtype, device: torch.device | str) -> torch.dtype | None:
    """The dtype to autocast to, or ``None`` for plain fp32 (``fp32``, or ``auto`` without a bf16-capable GPU)."""
    dtype = precision_dtype(precision, device)
    return None if dtype == torch.float32 else dtype


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """``(fn(), wall seconds)``: GPU work queued on ``device`` is waited for before the clock starts and before it
    stops, so the time is the call's own (every timing in the package is taken this way)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def query_chunk(
    chunk: int | str | None, device: torch.device | str | None, *, gpu: int | None, name: str = "chunk"
) -> int | None:
    """Points per field call: ``"auto"`` → :data:`CPU_QUERY_CHUNK` on the CPU and ``gpu`` on other devices (a GPU only
    needs chunks large enough to fill it: the grid queries pass 2¹⁶, the volume renderer, whose rays are already
    chunked, None = all at once); a positive int or None (no chunking) as given. ``name``: the caller's keyword, for
    the error message."""
    if isinstance(chunk, str):
        if chunk != "auto":
            raise ValueError(f"{name} must be a positive number of points, None or 'auto', got {chunk!r}")
        return CPU_QUERY_CHUNK if torch.device(device or "cpu").type == "cpu" else gpu
    if chunk is not None and (isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1):
        raise ValueError(f"{name} must be a positive number of points, None or 'auto', got {chunk!r}")
    return chunk


__all__ = ["CPU_QUERY_CHUNK", "PRECISIONS", "autocast_dtype", "precision_dtype", "query_chunk", "resolve_device", "sync"]
