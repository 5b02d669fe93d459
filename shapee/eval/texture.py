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

from typing import Any

import numpy as np
import torch

from shapee.cameras import Cameras, orbit_cameras
from shapee.render.texture import ColourFn, bake_mesh, to_data_mesh

__all__ = ["QUALITY_KEYS", "exact_field_views", "texture_quality"]

QUALITY_KEYS = ("full_vertex", "decimated_vertex", "decimated_texture")


def exact_field_views(colour_fn: ColourFn, vertices: np.ndarray, faces: np.ndarray,
                      cameras: Cameras) -> dict[str, np.ndarray]:
    """Renders of the mesh whose albedo at every pixel is ``colour_fn`` at that pixel's own surface point (the colour
    field without any per-vertex or per-texel sampling): ``rgb`` (dataset lighting) and flat ``albedo``, both
    ``[N, H, W, 3]`` sRGB on black."""
    from shapee.data.mesh import Mesh
    from shapee.data.render import rasterize
    from shapee.render.lighting import shade_basic

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
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from shapee.eval.metrics import psnr

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
    the PSNR of the flat albedo renders. The lit renders also carry the facets of the decimated geometry (flat face
    normals change the lighting; it hits both decimated variants alike), the albedo isolates the colour.
    """
    from shapee.data.render import render_views

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
        result["albedo"] = {}
    for key, mesh in meshes.items():
        images = render_views(to_data_mesh(mesh), cameras, backend="embree", outputs=("rgb", "albedo"))
        result["rgb"][key] = _psnr(images["rgb"], np.asarray(targets, dtype=np.float32))
        if exact is not None:
            result["albedo"][key] = _psnr(images["albedo"], exact["albedo"])
    result["faces"] = {"full": int(len(faces)), "decimated": int(len(meshes["decimated_vertex"].faces))}
    return result
