"""Benchmark of latent → mesh (what ``sample.py`` does per asset): seconds per step at a 128³ grid.

Steps, as :func:`shapee.models.meshing.extract_meshes` runs them: ``decode`` (params projection), ``grid`` (the SDF on
the G³ grid through the implicit MLP: by default only near the zero level,
:func:`~shapee.render.grid.query_grid_narrow_band`; ``dense=True`` queries all G³ points), ``mc`` (pad + Marching
Cubes 33), ``colors`` (the STF colour at the vertices), ``trimesh`` (building the ``trimesh.Trimesh``), ``total``.
The one-time costs of a process (``import trimesh`` ~0.5 s, generating the MC33 tables ~0.5 s; a run without
``warmup`` used to count them in ``trimesh`` and ``mc``) are paid before timing and reported as ``import_trimesh_s``
and ``mc_tables_s``.

The default model is the release-size decoding path (params projection 1024 × 1024 latent → MLP weights, NeRSTF MLP
of width 256) with random weights, behind a minimal encoder that the benchmark never runs. A randomly initialised
SDF head is ≈ −0.1 everywhere (no surface), which would make marching cubes and the colour query trivially cheap;
so by default a sphere of radius ``sphere_radius`` is added to the network's SDF, giving a mesh of realistic size
(≈ 2.4·10⁴ faces at 128³ for the effective radius 0.4; its narrow band is ≈ 1.7·10⁵ of the 2.1·10⁶ grid points),
while every queried point still goes through the full MLP.
Pass ``sphere_radius=None`` with a trained transmitter to time it as it is.
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time

import torch

from shapee.models import Transmitter
from shapee.render.grid import DEFAULT_GRID_SIZE, query_grid
from shapee.render.mesh import extract_meshes, query_vertex_colors, to_trimesh
from shapee.runtime import resolve_device, sync

STEPS = ("decode", "grid", "mc", "colors", "trimesh", "total")


def _release_size_decoder(device):
    """A Transmitter whose params projection and MLP have the released sizes; the encoder is minimal (unused here)."""
    tiny_encoder = dict(width=64, heads=2, layers=1, data_ctx=64, n_points=1024, n_views=1, pointconv_samples=16,
                        pointconv_hidden=(64, 64), image_size=32, patch_size=8)
    return Transmitter(encoder=tiny_encoder).to(device).eval()


def bench_latent_to_mesh(
    grid_size: int = DEFAULT_GRID_SIZE,
    *,
    transmitter=None,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    sphere_radius: float | None = 0.5,
    chunk: int | None | str = "auto",
    dense: bool = False,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Time latent → coloured mesh ``repeats`` times (after ``warmup`` untimed runs); returns a JSON-ready dict.

    ``transmitter``: anything with ``decode_params``/``query`` and ``encoder.latent_ctx``/``d_latent`` (default:
    release-size decoder with random weights, see module docstring). ``dense``: query the full grid instead of the
    narrow band (same mesh, the pre-narrow-band cost); ``chunk``: points per MLP call (``"auto"``: per device).
    Result: ``median`` seconds per step, ``median_cpu`` process CPU-seconds per step (all threads), ``runs`` (all
    timed runs), ``queries`` (SDF points queried per run), ``vertices``/``faces`` of the first mesh, ``settings``,
    ``machine``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    device = resolve_device(device)
    model = transmitter if transmitter is not None else _release_size_decoder(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    latent = torch.randn(batch_size, model.encoder.latent_ctx, model.encoder.d_latent, generator=g).tanh().to(device)

    # One-time costs of a process, kept out of the per-asset steps (a run without warmup used to count them in
    # ``trimesh`` and ``mc``): importing trimesh, and generating the MC33 tables (on a grid of one empty cube).
    t_setup = time.perf_counter()
    importlib.import_module("trimesh")
    import_trimesh_s = time.perf_counter() - t_setup
    t_setup = time.perf_counter()
    extract_meshes(torch.zeros(1, 2, 2, 2, device=device))
    mc_tables_s = time.perf_counter() - t_setup
    queries = []

    def run() -> tuple[dict, dict, list]:
        times, cpu_times = {}, {}
        queries.clear()
        with torch.no_grad():
            sync(device)
            t0 = t = time.perf_counter()
            c0 = c = time.process_time()

            def lap(name):
                nonlocal t, c
                sync(device)
                now, cpu_now = time.perf_counter(), time.process_time()
                times[name], cpu_times[name] = now - t, cpu_now - c
                t, c = now, cpu_now

            params = model.decode_params(latent)
            lap("decode")

            def sdf_fn(points):
                queries.append(points.shape[0] * points.shape[1])
                sdf = model.query(params, points)["sdf"]
                return sdf if sphere_radius is None else sdf + (sphere_radius - points.norm(dim=-1))

            sdf = query_grid(sdf_fn, batch_size, grid_size, chunk=chunk, device=device, narrow_band=not dense)
            lap("grid")
            meshes = extract_meshes(sdf)
            lap("mc")
            colors = query_vertex_colors(lambda p: model.query(params, p)["stf_rgb"], [v for v, _ in meshes],
                                         chunk=chunk)
            lap("colors")
            out = [to_trimesh(verts, faces, rgb) for (verts, faces), rgb in zip(meshes, colors)]
            lap("trimesh")
            times["total"], cpu_times["total"] = time.perf_counter() - t0, time.process_time() - c0
        return times, cpu_times, out

    for _ in range(warmup):
        run()
    runs, cpu_runs = [], []
    for _ in range(repeats):
        times, cpu_times, meshes = run()
        runs.append({k: round(v, 4) for k, v in times.items()})
        cpu_runs.append({k: round(v, 4) for k, v in cpu_times.items()})
    return {
        "benchmark": "stf_latent_to_mesh",
        "median": {k: round(statistics.median(r[k] for r in runs), 4) for k in STEPS},
        "median_cpu": {k: round(statistics.median(r[k] for r in cpu_runs), 4) for k in STEPS},
        "runs": runs,
        "queries": sum(queries),
        "import_trimesh_s": round(import_trimesh_s, 4),
        "mc_tables_s": round(mc_tables_s, 4),
        "vertices": len(meshes[0].vertices),
        "faces": len(meshes[0].faces),
        "settings": {"grid_size": grid_size, "batch_size": batch_size, "chunk": chunk, "sphere_radius": sphere_radius,
                     "narrow_band": not dense, "repeats": repeats, "warmup": warmup, "device": str(device)},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


if __name__ == "__main__":  # python -m shapee.benchmarks.stf [grid_size] [--dense]
    import json
    import sys

    args = [a for a in sys.argv[1:] if a != "--dense"]
    print(json.dumps(bench_latent_to_mesh(int(args[0]) if args else DEFAULT_GRID_SIZE, dense="--dense" in sys.argv), indent=2))
