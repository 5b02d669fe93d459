"""Textured assets: decimation, UV atlas and a texture baked from the colour field itself (issue 16).

The official export writes vertex colours only, so a mesh needs ~100k vertices to hold its colour and turns blurry
when decimated. Here the colour is not resampled from the dense mesh (a post-hoc bake): the colour *field* is
queried again at the surface point of every texel, so a 20k-face mesh carries the detail of a 1024² texture.

Steps (parameter-free, like the other renderers: they ask a field, they own no network)

    colour_fn(points [N, 3]) -> sRGB [N, 3]      (the STF colour head, the NeRF colour head, or any function)

1. :func:`decimate`: optional quadric decimation to a target face count with ``fast-simplification`` (Fast Quadric
   Mesh Simplification; a small wheel, ~0.1 s for 80k → 20k faces), chosen over trimesh's (which needs Open3D) and
   PyMeshLab (a 100 MB wheel) for its size and speed.
2. :func:`uv_atlas`: charts, parametrisation and packing by ``xatlas`` (the library game engines bake lightmaps
   with). Seam vertices are split, so the atlas mesh has more vertices than its input; ``vertex_map`` says where
   each came from. Charts are packed with a gutter of ``padding`` texels.
3. :func:`rasterize_uv`: every texel whose centre lies in a UV triangle (or within ``border`` texels of one, at the
   nearest point of that triangle: conservative rasterisation, so bilinear lookups at chart edges read true surface
   colours) gets its face and barycentrics, hence its 3-D surface point; vectorised over (face, texel) pairs.
4. :func:`bake`: the colour function at those points in batches, then :func:`dilate` (repeated neighbour-average
   fill) spreads the charts a few texels into the gutters so that mip-mapping and bilinear lookups show no seams;
   texels still empty take the mean colour (coarse mip levels then average toward the object's colour, not black).

Colour space: the colour heads answer sRGB in [0, 1] (they are trained against the sRGB target renders, DESIGN.md),
and glTF's ``baseColorTexture`` and OBJ's ``map_Kd`` are sRGB-encoded images, so texels are stored as they come
(8-bit PNG); only the GLB *vertex* colours are written linear (:mod:`shapee.io.mesh`).

UV convention: trimesh's / OpenGL's, ``v`` up: ``(u, v) = (0, 0)`` is the bottom-left corner of the image and the
centre of texel ``(row, col)`` of an ``S × S`` texture is ``((col + 0.5) / S, 1 − (row + 0.5) / S)``. The GLB writer
flips ``v`` into glTF's top-left convention.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import fast_simplification
import numpy as np
import torch
import xatlas
from PIL import Image
from torch import Tensor

from shapee.render.mesh import to_trimesh

__all__ = [
    "ColourFn",
    "UVAtlas",
    "decimate",
    "uv_atlas",
    "rasterize_uv",
    "dilate",
    "bake",
    "bake_mesh",
    "textured_trimesh",
]

ColourFn = Callable[[Tensor], Tensor]  # points [N, 3] float32 -> sRGB [N, 3] in [0, 1]

PADDING = 4  # gutter between charts, in texels of the final texture
BORDER = 1.0  # conservative rasterisation reach, in texels
DILATION = 4  # neighbour-average fill passes beyond the border


@dataclass
class UVAtlas:
    """A mesh with a UV atlas: seam vertices split, one UV per vertex (``v`` up, in [0, 1])."""

    vertices: np.ndarray  # [V', 3] float32
    faces: np.ndarray  # [F, 3] int64 (the input's faces, in order)
    uvs: np.ndarray  # [V', 2] float32
    vertex_map: np.ndarray  # [V'] int64: input vertex of each atlas vertex


# --------------------------------------------------------------------------------------------------- geometry
def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to about ``target_faces`` faces (``fast-simplification``); a mesh already at or below the
    target is returned as it is. Returns vertices ``[V', 3]`` float32 and faces ``[F', 3]`` int64."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if isinstance(target_faces, bool) or int(target_faces) < 4:
        raise ValueError(f"target_faces must be an integer >= 4, got {target_faces!r}")
    if len(faces) <= target_faces:
        return vertices.astype(np.float32), faces
    v, f = fast_simplification.simplify(vertices, faces.astype(np.int32), target_count=int(target_faces))
    used = np.unique(f)  # drop the vertices no face uses any more
    remap = np.full(len(v), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return np.asarray(v[used], dtype=np.float32), remap[np.asarray(f, dtype=np.int64)]


def uv_atlas(vertices: np.ndarray, faces: np.ndarray, *, size: int = 1024, padding: int = PADDING) -> UVAtlas:
    """``xatlas`` charts packed for an ``size × size`` texture with ``padding`` texels between charts.

    xatlas picks the texel density for the requested resolution but may pack slightly larger (its atlas is then
    ~10 % wider than ``size``); the UVs are normalised to [0, 1] either way, so the gutter is asked for in atlas
    texels scaled up by that factor's usual range (1.25) to stay ≥ ``padding`` texels of the final texture.
    """
    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        raise ValueError("cannot build a UV atlas of a mesh without faces")
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, np.ascontiguousarray(faces, dtype=np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(size)
    pack.padding = int(np.ceil(padding * 1.25))
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    if atlas.atlas_count != 1:  # resolution + estimated density packs into one atlas; anything else is a surprise
        raise RuntimeError(f"xatlas packed {atlas.atlas_count} atlases; expected one")
    vertex_map, indices, uvs = atlas[0]
    # xatlas keeps the face order. Its v counts atlas rows downward; flipped here to v up so that the atlas image
    # and the texture agree (the bake only needs the UVs and the texture to share a convention, which they do).
    uvs = np.clip(np.asarray(uvs, dtype=np.float64), 0.0, 1.0)
    uvs[:, 1] = 1.0 - uvs[:, 1]
    # xatlas packs charts up to the atlas border; a margin of half the gutter keeps bilinear lookups and mip levels
    # off the image edge too, so the result does not depend on a viewer's wrap mode (we declare clamp-to-edge).
    margin = 0.5 * padding / size
    uvs = margin + uvs * (1.0 - 2.0 * margin)
    return UVAtlas(vertices=vertices[vertex_map], faces=np.asarray(indices, dtype=np.int64),
                   uvs=uvs.astype(np.float32), vertex_map=np.asarray(vertex_map, dtype=np.int64))


# ------------------------------------------------------------------------------------------------ rasterising
def _texel_coords(uvs: np.ndarray, size: int) -> np.ndarray:
    """UVs (v up) → continuous texel coordinates ``(x, y)``: texel ``(row, col)`` has its centre at
    ``(col + 0.5, row + 0.5)``."""
    return np.stack([uvs[..., 0] * size, (1.0 - uvs[..., 1]) * size], axis=-1)


def _closest_on_segments(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the parameter ``t`` in [0, 1] of the point of segment ``a→b`` nearest to ``p`` and its squared
    distance. ``p, a, b`` ``[K, 2]`` → ``[K]``, ``[K]``."""
    ab = b - a
    t = np.einsum("kd,kd->k", p - a, ab) / np.maximum(np.einsum("kd,kd->k", ab, ab), 1e-30)
    t = np.clip(t, 0.0, 1.0)
    d = p - (a + t[:, None] * ab)
    return t, np.einsum("kd,kd->k", d, d)


def rasterize_uv(
    uvs: np.ndarray, faces: np.ndarray, size: int, *, border: float = BORDER, max_pairs: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Texels of the UV triangles (vectorised over (face, candidate texel) pairs, in chunks of faces).

    Args:
        uvs: ``[V, 2]`` (v up); faces: ``[F, 3]``; size: the texture is ``size × size``.
        border: texels whose centre lies outside every triangle but within ``border`` texels of one are kept too,
            at the nearest point of that triangle (0: centres inside only).

    Returns ``texel [K]`` (flat index ``row · size + col``, each texel once), ``face [K]``, ``bary [K, 3]`` (of the
    point used: the centre, or its nearest point on the face) and ``inside [K]`` (the centre lies in the face).
    Each texel goes to the face nearest to its centre (0 for all faces containing it: the first of those).
    """
    xy = _texel_coords(np.asarray(uvs, dtype=np.float64), size)[np.asarray(faces, dtype=np.int64)]  # [F, 3, 2]
    lo = np.clip(np.floor(xy.min(1) - 0.5 - border), 0, size - 1).astype(np.int64)  # [F, 2] first candidate col/row
    hi = np.clip(np.ceil(xy.max(1) - 0.5 + border), 0, size - 1).astype(np.int64)  # [F, 2] last candidate col/row
    extent = hi - lo + 1  # [F, 2]
    counts = extent[:, 0] * extent[:, 1]  # [F] candidate texels per face
    # Per face: corner a, edges e0 = b − a, e1 = c − a, 1/det, and the altitude onto each edge (corner i's weight
    # w_i times the altitude over the opposite edge is the signed distance to that edge's line, negative outside).
    a, e0, e1 = xy[:, 0], xy[:, 1] - xy[:, 0], xy[:, 2] - xy[:, 0]  # [F, 2] each
    det = e0[:, 0] * e1[:, 1] - e0[:, 1] * e1[:, 0]  # [F] twice the signed area
    valid = np.abs(det) > 1e-12  # degenerate UV triangles cover nothing
    inv_det = np.where(valid, 1.0 / np.where(valid, det, 1.0), 0.0)
    edge_len = np.stack([np.linalg.norm(xy[:, 2] - xy[:, 1], axis=1), np.linalg.norm(e1, axis=1),
                         np.linalg.norm(e0, axis=1)], axis=1)  # [F, 3]: edge opposite corner 0, 1, 2
    altitude = np.abs(det)[:, None] / np.maximum(edge_len, 1e-30)  # [F, 3]
    out_texel, out_face, out_bary, out_dist = [], [], [], []
    starts = np.concatenate([[0], np.cumsum(counts)])
    f0 = 0
    while f0 < len(counts):  # chunks of faces with at most max_pairs candidate pairs (at least one face)
        f1 = max(int(np.searchsorted(starts, starts[f0] + max_pairs, side="right")) - 1, f0 + 1)
        face = np.repeat(np.arange(f0, f1), counts[f0:f1])  # [K]
        local = np.arange(len(face)) - np.repeat(starts[f0:f1] - starts[f0], counts[f0:f1])  # [K] index in bbox
        width = extent[face, 0]
        col = lo[face, 0] + local % width
        row = lo[face, 1] + local // width
        px, py = col + 0.5 - a[face, 0], row + 0.5 - a[face, 1]  # [K] texel centre relative to corner a
        w1 = (px * e1[face, 1] - py * e1[face, 0]) * inv_det[face]
        w2 = (e0[face, 0] * py - e0[face, 1] * px) * inv_det[face]
        w0 = 1.0 - w1 - w2
        alt = altitude[face]  # [K, 3]
        # Distance to the farthest edge line: ≤ 0 inside, and a lower bound of the distance to the triangle outside.
        line = np.maximum(np.maximum(-w0 * alt[:, 0], -w1 * alt[:, 1]), -w2 * alt[:, 2])
        keep = valid[face] & (line <= max(border, 1e-9))
        face, row, col, line = face[keep], row[keep], col[keep], line[keep]
        bary = np.stack([w0[keep], w1[keep], w2[keep]], axis=-1)  # [K', 3]
        dist = np.zeros(len(face))
        out = line > 1e-9  # outside, within reach of the border test: the nearest point on the three edges
        if out.any():
            p = np.stack([col[out] + 0.5, row[out] + 0.5], axis=-1)  # [K_out, 2]
            tri = xy[face[out]]  # [K_out, 3, 2]
            t_ab, d_ab = _closest_on_segments(p, tri[:, 0], tri[:, 1])
            t_bc, d_bc = _closest_on_segments(p, tri[:, 1], tri[:, 2])
            t_ca, d_ca = _closest_on_segments(p, tri[:, 2], tri[:, 0])
            d = np.stack([d_ab, d_bc, d_ca], axis=-1)  # [K_out, 3]
            edge = d.argmin(-1)
            t = np.choose(edge, [t_ab, t_bc, t_ca])
            near = np.zeros((len(t), 3))
            k = np.arange(len(t))
            near[k, edge] = 1.0 - t  # edge j runs from corner j to corner (j + 1) % 3
            near[k, (edge + 1) % 3] = t
            bary[out] = near
            dist[out] = np.sqrt(d[k, edge])
        keep = dist <= border
        out_texel.append((row * size + col)[keep])
        out_face.append(face[keep])
        out_bary.append(bary[keep])
        out_dist.append(dist[keep])
        f0 = f1
    texel, face = np.concatenate(out_texel), np.concatenate(out_face)
    bary, dist = np.concatenate(out_bary), np.concatenate(out_dist)
    order = np.lexsort((face, dist, texel))  # per texel: nearest face first, then the lowest face index
    texel, face, bary, dist = texel[order], face[order], bary[order], dist[order]
    first = np.ones(len(texel), dtype=bool)
    first[1:] = texel[1:] != texel[:-1]
    return texel[first], face[first], bary[first].astype(np.float32), dist[first] == 0


def dilate(texture: Tensor, mask: Tensor, iterations: int = DILATION) -> tuple[Tensor, Tensor]:
    """Grow the filled region of ``texture`` ``[H, W, C]`` (``mask`` ``[H, W]`` bool) by ``iterations`` texels: each
    pass gives every empty texel with a filled 8-neighbour the mean of its filled neighbours. Returns both grown."""
    x = texture.permute(2, 0, 1)[None] * mask[None, None]  # [1, C, H, W]
    m = mask[None, None].to(texture.dtype)  # [1, 1, H, W]
    for _ in range(iterations):
        # 3×3 box sums of the colours and of the filled mask (average pooling counts the zero padding, × 9 = sums)
        total = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True) * 9.0
        count = torch.nn.functional.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True) * 9.0
        grow = (m == 0) & (count > 0.5)
        x = torch.where(grow, total / count.clamp_min(1), x)
        m = torch.where(grow, torch.ones_like(m), m)
    return x[0].permute(1, 2, 0), m[0, 0] > 0


# ---------------------------------------------------------------------------------------------------- baking
class _Clock:
    """Adds the seconds since the previous call to ``timings[name]`` (no-op without a dict)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
            self.last = now


def _as_colours(value, n: int) -> Tensor:
    rgb = torch.as_tensor(value).detach().float().cpu()
    if rgb.shape != (n, 3):
        raise ValueError(f"colour_fn must return [N, 3] = [{n}, 3] colours, got {tuple(rgb.shape)}")
    return rgb


@torch.no_grad()
def bake(
    colour_fn: ColourFn,
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    size: int = 1024,
    *,
    batch_points: int = 1 << 16,
    border: float = BORDER,
    dilation: int = DILATION,
    device: torch.device | str = "cpu",
    timings: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bake ``colour_fn`` into a ``size × size`` texture over the atlas (``uvs`` ``[V, 2]``, one per vertex).

    The colour function gets the surface points ``[n, 3]`` (float32 on ``device``), ``batch_points`` at a time.
    Returns the texture ``[size, size, 3]`` float32 sRGB in [0, 1] (row 0 = top = v 1) and ``covered``
    ``[size, size]`` bool (texels inside or within ``border`` texels of a UV triangle, i.e. queried).
    ``timings``: if given, seconds of ``rasterize``, ``query`` and ``dilate`` are added to it (benchmarks).
    """
    clock = _Clock(timings)
    if isinstance(size, bool) or int(size) < 2:
        raise ValueError(f"texture size must be an integer >= 2, got {size!r}")
    size = int(size)
    vertices = np.asarray(vertices, dtype=np.float32)
    faces = np.asarray(faces, dtype=np.int64)
    texel, face, bary, _ = rasterize_uv(uvs, faces, size, border=border)
    corners = vertices[faces[face]]  # [K, 3, 3]
    points = torch.from_numpy(np.einsum("kc,kcd->kd", bary, corners).astype(np.float32))  # [K, 3]
    clock("rasterize")
    colours = torch.empty(len(points), 3)
    for i in range(0, len(points), batch_points):  # batches of points: bounded memory for any texture size
        chunk = points[i:i + batch_points].to(device)
        colours[i:i + batch_points] = _as_colours(colour_fn(chunk), len(chunk))
    clock("query")
    flat = torch.zeros(size * size, 3)
    flat[torch.from_numpy(texel)] = colours.clamp(0, 1)
    covered = torch.zeros(size * size, dtype=torch.bool)
    covered[torch.from_numpy(texel)] = True
    texture, filled = dilate(flat.view(size, size, 3), covered.view(size, size), dilation)
    if filled.any():  # the rest of the gutter: the mean colour, so coarse mip levels do not pull toward black
        texture[~filled] = colours.clamp(0, 1).mean(0) if len(colours) else 0.0
    clock("dilate")
    return texture.numpy(), covered.view(size, size).numpy()


def textured_trimesh(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, texture: np.ndarray):
    """A ``trimesh.Trimesh`` with the atlas UVs and a PBR material (``baseColorTexture`` = ``texture``, 8-bit sRGB;
    metallic 0, roughness 1: the colour heads describe a diffuse albedo). :mod:`shapee.io.mesh` exports it."""
    import trimesh  # here, not at the top: ~0.6 s to import, and shapee.models imports this module

    image = texture if texture.dtype == np.uint8 else (np.clip(texture, 0, 1) * 255).round().astype(np.uint8)
    material = trimesh.visual.material.PBRMaterial(
        name="shapee_baked", baseColorTexture=Image.fromarray(image, mode="RGB"), metallicFactor=0.0,
        roughnessFactor=1.0)
    visual = trimesh.visual.TextureVisuals(uv=np.asarray(uvs, dtype=np.float64), material=material)
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


def bake_mesh(
    colour_fn: ColourFn,
    vertices,
    faces,
    *,
    texture_size: int = 0,
    target_faces: int | None = None,
    padding: int = PADDING,
    dilation: int = DILATION,
    batch_points: int = 1 << 16,
    device: torch.device | str = "cpu",
    timings: dict[str, float] | None = None,
):
    """The one export path from geometry + colour field to a ``trimesh.Trimesh``.

    ``target_faces``: decimate first (:func:`decimate`); ``texture_size > 0``: UV atlas + baked ``texture_size²``
    texture (:func:`uv_atlas`, :func:`bake`); ``texture_size = 0``: sRGB vertex colours, the colour field queried
    at the (decimated) vertices. ``vertices`` ``[V, 3]``, ``faces`` ``[F, 3]`` (numpy or torch). A mesh without
    faces gives an empty ``trimesh.Trimesh``. ``timings``: if given, seconds per step are added to it.
    """
    import trimesh  # here, not at the top: ~0.6 s to import, and shapee.models imports this module

    clock = _Clock(timings)
    vertices = (vertices.detach().cpu().numpy() if isinstance(vertices, Tensor) else np.asarray(vertices)).astype(
        np.float32)
    faces = (faces.detach().cpu().numpy() if isinstance(faces, Tensor) else np.asarray(faces)).astype(np.int64)
    if len(faces) == 0:
        return trimesh.Trimesh()
    if target_faces is not None:
        vertices, faces = decimate(vertices, faces, target_faces)
        clock("decimate")
    if not texture_size:
        with torch.no_grad():
            points = torch.from_numpy(vertices)
            colours = torch.cat([_as_colours(colour_fn(points[i:i + batch_points].to(device)),
                                             len(points[i:i + batch_points]))
                                 for i in range(0, len(points), batch_points)])
        clock("query")
        return to_trimesh(vertices, faces, colours.numpy())
    atlas = uv_atlas(vertices, faces, size=texture_size, padding=padding)
    clock("atlas")
    texture, _ = bake(colour_fn, atlas.vertices, atlas.faces, atlas.uvs, texture_size, batch_points=batch_points,
                      dilation=dilation, device=device, timings=timings)
    clock.last = time.perf_counter()
    mesh = textured_trimesh(atlas.vertices, atlas.faces, atlas.uvs, texture)
    clock("trimesh")
    return mesh
