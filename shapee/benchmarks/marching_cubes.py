"""Benchmark: our Marching Cubes 33 against scikit-image's ``marching_cubes(method="lewiner")`` on one field.

Run ``python -m shapee.benchmarks.marching_cubes`` (CPU) or call :func:`benchmark_marching_cubes`. Timings on a busy
machine are noisy: the function reports the best of ``repeats`` runs for both.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor

from shapee.benchmarks.common import count_ops
from shapee.render.mc33 import marching_cubes
from shapee.render.grid import DEFAULT_GRID_SIZE
from shapee.runtime import sync


def benchmark_field(grid_size: int = DEFAULT_GRID_SIZE, seed: int = 0) -> Tensor:
    """A smooth test field ``[N, N, N]`` (float32) on [-1, 1]³: a sphere, a torus and random bumps, negative outside.

    The surface crosses about as many cubes as a typical decoded object (a few percent of the grid).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1.0, 1.0, grid_size)
    px, py, pz = torch.meshgrid(x, x, x, indexing="ij")  # [N, N, N] each
    sphere = 0.45 - torch.sqrt((px + 0.3) ** 2 + py**2 + pz**2)
    ring = torch.sqrt((px - 0.35) ** 2 + py**2) - 0.35
    torus = 0.12 - torch.sqrt(ring**2 + pz**2)
    field = torch.maximum(sphere, torus)  # union: positive inside
    centers = torch.rand(12, 3, generator=g) * 1.4 - 0.7  # [12, 3]
    for c in centers:  # 12 bumps, a handful of broadcasts
        d2 = (px - c[0]) ** 2 + (py - c[1]) ** 2 + (pz - c[2]) ** 2
        field = field + 0.05 * torch.exp(-d2 / 0.02)
    return field.float()


def _best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def benchmark_marching_cubes(
    grid_size: int = DEFAULT_GRID_SIZE, repeats: int = 3, device: str = "cpu", num_threads: int | None = None, batch: int = 1
) -> dict[str, float]:
    """Time ours vs scikit-image on :func:`benchmark_field` (best of ``repeats``; tables generated beforehand).

    ``num_threads``: torch CPU threads for our timing (restored afterwards); None keeps torch's setting. On a shared,
    oversubscribed machine one thread is often faster: each of our ~100 tensor ops otherwise waits for both threads.

    ``batch`` > 1 also times one call on ``batch`` copies of the field (a batched extraction):
    ``ours_batch_s`` and ``ours_per_field_s`` (= ``ours_batch_s / batch``).

    Returns:
        ``ours_s``, ``skimage_s``, ``ratio`` (ours / skimage), ``ours_faces``, ``skimage_faces``, ``grid_size``,
        ``threads``, the tensor ops of one call of ours (``ours_kernel_ops``, ``ours_view_ops``,
        ``ours_data_dependent_ops``: see :func:`shapee.benchmarks.common.count_ops`; on a GPU they, not the arithmetic,
        set the time of one field) and the batch keys above. ``skimage_s`` is NaN when scikit-image is not installed.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _benchmark(grid_size, repeats, device, batch)
    finally:
        torch.set_num_threads(previous_threads)


def _synced(grids: Tensor):
    """A call of :func:`marching_cubes` on ``grids`` that returns only once a GPU has finished (for timing)."""
    def run():
        out = marching_cubes(grids)
        sync(grids.device)
        return out
    return run


def _benchmark(grid_size: int, repeats: int, device: str, batch: int = 1) -> dict[str, float]:
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    field = benchmark_field(grid_size).to(device)
    marching_cubes(field[:4, :4, :4])  # generate and move the tables outside the timed region

    ours = _synced(field)
    ours_s = _best_time(ours, repeats)
    _, faces = ours()
    ops = count_ops(ours)
    result = {
        "grid_size": float(grid_size),
        "threads": float(torch.get_num_threads()),
        "ours_s": ours_s,
        "ours_faces": float(faces.shape[0]),
        "ours_kernel_ops": float(ops["kernels"]),
        "ours_view_ops": float(ops["views"]),
        "ours_data_dependent_ops": float(ops["data_dependent"]),
    }
    if batch > 1:
        ours_batched = _synced(field[None].repeat(batch, 1, 1, 1))  # [batch, N, N, N]
        ours_batched()  # warm-up at this size
        batch_s = _best_time(ours_batched, repeats)
        result.update(batch=float(batch), ours_batch_s=batch_s, ours_per_field_s=batch_s / batch)
    try:  # scikit-image is a dev extra: without it the comparison is left out
        from skimage.measure import marching_cubes as sk_marching_cubes
    except ImportError:
        result.update(skimage_s=math.nan, skimage_faces=math.nan, ratio=math.nan)
        return result
    volume = np.ascontiguousarray(field.cpu().numpy())
    skimage_s = _best_time(lambda: sk_marching_cubes(volume, 0.0, method="lewiner"), repeats)
    _, sk_faces, _, _ = sk_marching_cubes(volume, 0.0, method="lewiner")
    result.update(skimage_s=skimage_s, skimage_faces=float(sk_faces.shape[0]), ratio=ours_s / skimage_s)
    return result


if __name__ == "__main__":
    print(benchmark_marching_cubes())
    print(benchmark_marching_cubes(num_threads=1))
