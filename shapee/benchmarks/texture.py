"""Benchmark of the textured export (issue 16): seconds per step of decimating a marching-cubes mesh, its UV atlas
and baking a texture from a transmitter's colour head, plus the file sizes of the results.

Steps, as :func:`shapee.render.texture.bake_mesh` runs them: ``decimate`` (fast-simplification), ``atlas`` (xatlas),
``rasterize`` (texels → face + barycentrics → surface points), ``query`` (the colour head at every covered texel, in
batches), ``dilate`` (gutter fill), ``trimesh``; ``total``; and ``export_glb`` / ``export_obj`` (PNG encoding and
writing).

The mesh is the marching-cubes surface (128³) of :func:`shapee.benchmarks.marching_cubes.benchmark_field` (a sphere,
a torus and bumps: ~10⁵ faces, the size of a decoded object), in the [-1, 1]³ box. The colour head is a
:class:`~shapee.models.Transmitter`'s with random weights: ``model="release"`` the released decoding path (params
projection of a 1024 × 1024 latent, NeRSTF MLP of width 256; the cost per texel does not depend on the weights),
``model="tiny"`` the tiny CPU preset's (the cost of the bake machinery itself).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from shapee.benchmarks.common import machine, resolve_device
from shapee.benchmarks.marching_cubes import benchmark_field
from shapee.benchmarks.stf import _release_size_decoder
from shapee.io.mesh import export_mesh
from shapee.models import Transmitter
from shapee.models.meshing import transmitter_colour_fn
from shapee.render.grid import DEFAULT_GRID_SIZE
from shapee.render.mesh import extract_meshes
from shapee.render.texture import bake_mesh, rasterize_uv

STEPS = ("decimate", "atlas", "rasterize", "query", "dilate", "trimesh", "total")


def _model(kind: str, device):
    if kind == "release":
        return _release_size_decoder(device)
    if kind == "tiny":
        configs = Path(__file__).resolve().parents[2] / "configs"
        with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
            cfg = compose(config_name="train_encoder", overrides=["experiment=tiny_nerf", "data.root=unused"])
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
        return Transmitter(**kwargs).to(device).eval()
    raise ValueError(f"model must be 'release' or 'tiny', got {kind!r}")


def bench_texture(
    *,
    texture_size: int = 1024,
    faces: int | None = 20_000,
    model: str = "release",
    grid_size: int = DEFAULT_GRID_SIZE,
    repeats: int = 1,
    warmup: int = 0,
    device: str | None = None,
    seed: int = 0,
) -> dict:
    """Median seconds per step of one textured export (see module docstring) and the file sizes; JSON-ready.

    Result: ``median`` (seconds per step), ``runs``, ``mesh_faces`` (before decimation), ``faces``/``vertices`` (of
    the textured mesh), ``texels_queried``, ``bytes`` (``glb_textured``, ``obj_textured`` = OBJ + MTL + PNG,
    ``png``, ``glb_vertex_full``: the undecimated vertex-coloured GLB, ``glb_vertex_decimated``), ``settings``,
    ``machine``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = resolve_device(device)
    transmitter = _model(model, dev)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(transmitter.encoder.latent_ctx, transmitter.encoder.d_latent, generator=g).tanh().to(dev)
    colour_fn = transmitter_colour_fn(transmitter, latent, "stf")
    (verts, tris), = extract_meshes(benchmark_field(grid_size)[None].to(dev), (-1.0, 1.0))
    vertices, triangles = verts.cpu().numpy(), tris.cpu().numpy()

    runs, mesh = [], None
    for i in range(warmup + repeats):
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        mesh = bake_mesh(colour_fn, vertices, triangles, texture_size=texture_size, target_faces=faces,
                         device=dev, timings=timings)
        timings["total"] = time.perf_counter() - t0
        if i >= warmup:
            runs.append(timings)
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in STEPS}

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sizes["glb_textured"] = export_mesh(mesh, Path(tmp) / "t.glb").stat().st_size
        median["export_glb"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        export_mesh(mesh, Path(tmp) / "t.obj")
        median["export_obj"] = time.perf_counter() - t0
        sizes["obj_textured"] = sum((Path(tmp) / f"t{e}").stat().st_size for e in (".obj", ".mtl", ".png"))
        sizes["png"] = (Path(tmp) / "t.png").stat().st_size
        full = bake_mesh(colour_fn, vertices, triangles)
        sizes["glb_vertex_full"] = export_mesh(full, Path(tmp) / "f.glb").stat().st_size
        small = bake_mesh(colour_fn, vertices, triangles, target_faces=faces) if faces else full
        sizes["glb_vertex_decimated"] = export_mesh(small, Path(tmp) / "s.glb").stat().st_size
    covered = texture_size * texture_size  # upper bound; the exact count comes from a rasterisation below
    covered = int(len(rasterize_uv(np.asarray(mesh.visual.uv), np.asarray(mesh.faces), texture_size)[0]))
    return {
        "median": median,
        "runs": runs,
        "mesh_faces": int(len(triangles)),
        "faces": int(len(mesh.faces)),
        "vertices": int(len(mesh.vertices)),
        "texels_queried": covered,
        "bytes": sizes,
        "settings": {"texture_size": texture_size, "faces": faces, "model": model, "grid_size": grid_size,
                     "repeats": repeats, "warmup": warmup},
        "machine": machine(dev),
    }


def format_texture(r: dict) -> str:
    """One line of step timings and one of file sizes."""
    s, m = r["settings"], r["median"]
    steps = ", ".join(f"{k} {m[k]:.2f} s" for k in (*STEPS, "export_glb", "export_obj"))
    b = {k: v / 1e6 for k, v in r["bytes"].items()}
    return (f"textured export, {s['model']} colour head on {r['machine']['device']}: {r['mesh_faces']:,} MC faces → "
            f"{r['faces']:,} faces + {s['texture_size']}² texture ({r['texels_queried']:,} texels queried): {steps}\n"
            f"  files: textured GLB {b['glb_textured']:.2f} MB, OBJ+MTL+PNG {b['obj_textured']:.2f} MB (PNG "
            f"{b['png']:.2f} MB); vertex-coloured GLB full {b['glb_vertex_full']:.2f} MB, decimated "
            f"{b['glb_vertex_decimated']:.2f} MB")
