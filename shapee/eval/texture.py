"""How much colour a decimated mesh keeps as vertex colours versus a texture baked from the colour field (issue 16).

Three renders of one colour field on one surface, each scored by PSNR against the same target views:

* ``full_vertex``: the full-resolution mesh with the field at its vertices (what the official export writes);
* ``decimated_vertex``: the mesh decimated to ``target_faces``, the field re-queried at its vertices;
* ``decimated_texture``: the same decimated mesh with a ``texture_size²`` texture baked from the field
  (:func:`shapee.render.texture.bake_mesh`).

Targets: given images (e.g. the records' target renders of the real asset), or by default the *exact* field: the
full mesh rendered with the colour function evaluated at every pixel's own surface point. All renders use the data
renderer (:func:`shapee.data.render.render_views`: Embree on CPU, flat albedo with the dataset lighting, sRGB on
black) and the pan cameras of :func:`shapee.cameras.orbit_cameras`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trimesh

from shapee.cameras import Cameras, orbit_cameras
from shapee.data.dataset import AssetDataset, collate_assets
from shapee.data.mesh import Mesh, load_mesh, to_data_mesh
from shapee.data.render import rasterize, render_views
from shapee.eval.metrics import psnr
from shapee.io.loading import load_model
from shapee.models.meshing import transmitter_colour_fn
from shapee.models.transmitter import batch_cameras
from shapee.render.lighting import shade_basic
from shapee.render.texture import ColourFn, bake_mesh

__all__ = ["QUALITY_KEYS", "analytic_surface", "asset_colour_fn", "exact_field_views", "format_quality", "stripes",
           "texture_quality", "texture_quality_assets", "texture_quality_dataset"]

QUALITY_KEYS = ("full_vertex", "decimated_vertex", "decimated_texture")


def exact_field_views(colour_fn: ColourFn, vertices: np.ndarray, faces: np.ndarray,
                      cameras: Cameras) -> dict[str, np.ndarray]:
    """Renders of the mesh whose albedo at every pixel is ``colour_fn`` at that pixel's own surface point (the colour
    field without any per-vertex or per-texel sampling): ``rgb`` (dataset lighting) and flat ``albedo``, both
    ``[N, H, W, 3]`` sRGB on black, and ``alpha`` ``[N, H, W]`` (1 where the surface is seen)."""
    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    mesh = Mesh(vertices=vertices, faces=faces, corner_colors=np.zeros((len(faces), 3, 3), np.float32))
    fragments = rasterize(mesh, cameras, "embree")  # face and barycentrics of every hit pixel
    points = np.einsum("kc,kcd->kd", fragments.bary, vertices[faces[fragments.face]])  # [K, 3] hit points
    with torch.no_grad():
        albedo = torch.as_tensor(colour_fn(torch.from_numpy(points.astype(np.float32)))).float().clamp(0, 1)
    normal = torch.from_numpy(np.take(mesh.face_normals(), fragments.face, axis=0))  # [K, 3]
    rgb = shade_basic(albedo, normal).numpy()  # [K, 3] sRGB, lit as the data renderer lights (linear space)
    n, h, w = fragments.shape
    out = {}
    for name, values in (("rgb", rgb), ("albedo", albedo.numpy())):
        image = np.zeros((n * h * w, 3), np.float32)
        image[fragments.pixel] = values
        out[name] = image.reshape(n, h, w, 3)
    alpha = np.zeros(n * h * w, np.float32)
    alpha[fragments.pixel] = 1.0
    out["alpha"] = alpha.reshape(n, h, w)
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(torch.from_numpy(a), torch.from_numpy(b))


def texture_quality(
    colour_fn: ColourFn,
    vertices,
    faces,
    *,
    target_faces: int,
    texture_size: int = 1024,
    cameras: Cameras | None = None,
    targets: np.ndarray | None = None,
    views: int = 8,
    resolution: int = 128,
) -> dict[str, Any]:
    """PSNR (dB) of the three renders of :data:`QUALITY_KEYS` against ``targets`` (``[N, H, W, 3]`` sRGB in [0, 1]
    seen by ``cameras``; default: :func:`exact_field_views` from ``views`` pan cameras at ``resolution``).

    Returns ``{"rgb": {key: psnr}, "faces": {"full", "decimated"}}`` and, with the default targets, ``"albedo"``:
    the PSNR of the flat albedo renders, and ``"albedo_on_surface"``: the same over the pixels where both the
    target and the render see the surface. The lit renders also carry the geometry of the decimated mesh (its
    polygonal silhouette, whose few pixels of object-vs-black dominate the error of a curved shape, and flat facets
    that light differently); both decimated variants share that error, and the masked albedo isolates the colour.
    """
    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    if cameras is None:
        cameras = orbit_cameras(views, resolution=resolution)
    exact = None
    if targets is None:
        exact = exact_field_views(colour_fn, vertices, faces, cameras)
        targets = exact["rgb"]
    meshes = {
        "full_vertex": bake_mesh(colour_fn, vertices, faces),
        "decimated_vertex": bake_mesh(colour_fn, vertices, faces, target_faces=target_faces),
        "decimated_texture": bake_mesh(colour_fn, vertices, faces, target_faces=target_faces,
                                       texture_size=texture_size),
    }
    result: dict[str, Any] = {"rgb": {}}
    if exact is not None:
        result["albedo"], result["albedo_on_surface"] = {}, {}
    for key, mesh in meshes.items():
        images = render_views(to_data_mesh(mesh), cameras, backend="embree", outputs=("rgb", "albedo", "alpha"))
        result["rgb"][key] = _psnr(images["rgb"], np.asarray(targets, dtype=np.float32))
        if exact is not None:
            result["albedo"][key] = _psnr(images["albedo"], exact["albedo"])
            both = (images["alpha"] > 0) & (exact["alpha"] > 0)  # [N, H, W]
            result["albedo_on_surface"][key] = _psnr(images["albedo"][both], exact["albedo"][both])
    result["faces"] = {"full": int(len(faces)), "decimated": int(len(meshes["decimated_vertex"].faces))}
    return result


# ---------------------------------------------------------------------------------------------- tables for README
def asset_colour_fn(mesh) -> ColourFn:
    """The colour of a real asset (a :class:`shapee.data.mesh.Mesh`: texture, vertex or material colours) as a
    colour field: the albedo at the nearest point of its surface (for texels and vertices of a decimated copy)."""
    surface = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)

    def colour_fn(points: torch.Tensor) -> torch.Tensor:
        p = points.detach().cpu().double().numpy()
        closest, _, face = trimesh.proximity.closest_point(surface, p)
        bary = trimesh.triangles.points_to_barycentric(surface.triangles[face], closest)
        return torch.from_numpy(mesh.albedo(face, np.clip(bary, 0, 1).astype(np.float32)))

    return colour_fn


def stripes(points: torch.Tensor) -> torch.Tensor:
    """An analytic sRGB colour field with detail at ~0.1 world units: ``[N, 3]`` → ``[N, 3]`` in (0, 1)."""
    x, y, z = points.unbind(-1)
    return 0.5 + 0.45 * torch.stack([torch.sin(9 * x), torch.cos(7 * y + 2 * z), torch.sin(11 * z * x)], -1)


def analytic_surface(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Test surfaces for :func:`stripes`: ``sphere`` (icosphere, 20,480 faces, radius 0.9) or ``box`` (side 1.4,
    12,288 faces on planar sides, so decimation keeps its geometry exactly and only colour is compared)."""
    if name == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=5, radius=0.9)
        return np.asarray(mesh.vertices), np.asarray(mesh.faces)
    if name == "box":
        mesh = trimesh.creation.box(extents=(1.4, 1.4, 1.4))
        v, f = mesh.vertices, mesh.faces
        for _ in range(5):
            v, f = trimesh.remesh.subdivide(v, f)
        return np.asarray(v), np.asarray(f)
    raise ValueError(f"analytic surface must be 'sphere' or 'box', got {name!r}")


def texture_quality_assets(paths, *, target_faces: int, texture_size: int, views: int = 8,
                           resolution: int = 128) -> list[dict[str, Any]]:
    """:func:`texture_quality` of real mesh files (loaded with :func:`shapee.data.mesh.load_mesh`, so normalised to
    [-1, 1]³): the colour field is the asset's own colour (:func:`asset_colour_fn`), the targets the renders of the
    original asset (its colours sampled per pixel, as the dataset renders it)."""
    rows = []
    cameras = orbit_cameras(views, resolution=resolution)
    for path in paths:
        mesh = load_mesh(path)
        images = render_views(mesh, cameras, backend="embree", outputs=("rgb", "albedo"))
        result = texture_quality(asset_colour_fn(mesh), mesh.vertices, mesh.faces, target_faces=target_faces,
                                 texture_size=texture_size, cameras=cameras, targets=images["rgb"])
        rows.append({"asset": Path(path).name, **result})
    return rows


def texture_quality_dataset(model, dataset, *, target_faces: int, texture_size: int, grid_size: int = 64,
                            head: str = "stf", seed: int = 0) -> list[dict[str, Any]]:
    """:func:`texture_quality` of every asset of an ``AssetDataset`` encoded by a trained ``model``
    (:class:`~shapee.models.Transmitter`): its mesh at ``grid_size``³, its ``head`` colour head as the field, and the
    records' target views (real renders of the source asset, all target views) as the targets."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    rows = []
    for index in range(len(dataset)):  # a loop over assets
        batch = collate_assets([dataset[index]])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with torch.no_grad():
            latent = model.encode(batch, generator=generator)[0]  # [n_ctx, d]
        mesh = model.to_mesh(latent, grid_size=grid_size)
        if len(mesh.faces) == 0:
            rows.append({"asset": dataset.records[index].asset_id, "empty_mesh": True})
            continue
        cameras = batch_cameras(batch, "target")[0].to("cpu")
        targets = batch["target_rgb"][0].float().cpu().numpy()  # [T, H, W, 3]
        result = texture_quality(transmitter_colour_fn(model, latent, head), mesh.vertices, mesh.faces,
                                 target_faces=target_faces, texture_size=texture_size, cameras=cameras,
                                 targets=targets)
        rows.append({"asset": dataset.records[index].asset_id, **result})
    return rows


def format_quality(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows: PSNR (dB) of the lit renders, and in brackets of the albedo on the pixels both
    renders see (analytic fields only)."""
    lines = ["| asset | faces full → decimated | (a) full, vertex colours | (b) decimated, vertex colours | "
             "(c) decimated, baked texture |", "| --- | --- | --- | --- | --- |"]
    done = [r for r in rows if "rgb" in r]
    for r in done:
        cells = [f"{r['rgb'][k]:.2f}" + (f" ({r['albedo_on_surface'][k]:.2f})" if "albedo_on_surface" in r else "")
                 for k in QUALITY_KEYS]
        lines.append(f"| {r['asset']} | {r['faces']['full']} → {r['faces']['decimated']} | " + " | ".join(cells) + " |")
    if done:
        means = [np.mean([r["rgb"][k] for r in done]) for k in QUALITY_KEYS]
        lines.append("| **mean** (lit) | | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m shapee.eval.texture --asset mesh.obj ... | --transmitter snapshot.pt --data records/`` → table."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--asset", action="append", default=[], help="a mesh file (repeatable)")
    parser.add_argument("--analytic", action="append", default=[], choices=["sphere", "box"],
                        help="an analytic surface with the stripes colour field (repeatable)")
    parser.add_argument("--transmitter", default=None, help="a transmitter snapshot (with --data)")
    parser.add_argument("--data", default=None, help="records folder (scripts/prepare_data.py out=)")
    parser.add_argument("--faces", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--grid", type=int, default=64, help="marching-cubes grid of the encoded assets")
    parser.add_argument("--head", default="stf", choices=["stf", "nerf"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name in args.analytic:
        v, f = analytic_surface(name)
        result = texture_quality(stripes, v, f, target_faces=args.faces, texture_size=args.size)
        rows.append({"asset": f"{name} (stripes field)", **result})
    if args.asset:
        rows += texture_quality_assets(args.asset, target_faces=args.faces, texture_size=args.size)
    if args.transmitter:
        model = load_model(args.transmitter, expect="transmitter")
        rows += texture_quality_dataset(model, AssetDataset(args.data), target_faces=args.faces,
                                        texture_size=args.size, grid_size=args.grid, head=args.head)
    print(format_quality(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
