"""Parameter-free meshes of SDF grids: Marching Cubes 33 on the padded grid, colours at the vertices, export form.

The grid of :mod:`shapee.render.grid` (positive inside) → :func:`extract_meshes` (pad with an "outside" border, MC33
with the bounds widened by one voxel: vertices at their true world positions, no 127/129 shrink, §4.2) →
:func:`query_vertex_colors` (a colour field ``rgb_fn(points [B, P, 3]) -> sRGB [B, P, 3]`` at the vertices, meshes
padded to the largest vertex count) → :class:`TensorMesh` (vertices, faces, sRGB vertex colours as tensors), whose
:meth:`TensorMesh.to_trimesh` is the one conversion to an exportable ``trimesh.Trimesh``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

from shapee.render.grid import RgbFn, chunked, pad_grid, resolve_chunk
from shapee.render.mc33 import marching_cubes

if TYPE_CHECKING:  # pragma: no cover
    import trimesh

__all__ = [
    "TensorMesh",
    "extract_meshes",
    "replace_empty_meshes",
    "query_vertex_colors",
    "to_trimesh",
]

# A fixed small triangle standing in for an empty mesh (reference §4.2): its output is masked to transparent.
_DUMMY_TRIANGLE = ((0.0, 0.0, 0.0), (1e-3, 0.0, 0.0), (0.0, 1e-3, 0.0))


def extract_meshes(
    sdf: Tensor, bounds: tuple[float, float] = (-1.0, 1.0), *, pad: bool = True, pad_value: float = -1.0
) -> list[tuple[Tensor, Tensor]]:
    """Marching Cubes 33 on each grid of ``sdf`` ``[B, N, N, N]`` over ``bounds`` → ``[(verts [V,3], faces [F,3])]``.

    With ``pad`` (default) the grid gets a ``pad_value`` (outside) border first (:func:`~shapee.render.grid.pad_grid`)
    so every mesh is closed. ``verts`` are differentiable w.r.t. ``sdf``; an asset without a zero crossing gets
    ``V = F = 0`` (see :func:`replace_empty_meshes`).
    """
    if sdf.dim() != 4:
        raise ValueError(f"sdf must have shape [B, N, N, N], got {tuple(sdf.shape)}")
    if pad:
        sdf, bounds = pad_grid(sdf, bounds, value=pad_value)
    return marching_cubes(sdf.float(), bounds=bounds)


def replace_empty_meshes(
    meshes: Sequence[tuple[Tensor, Tensor]], anchors: Tensor
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Swap each empty mesh for a small dummy triangle tied to its field; return the meshes and ``mesh_mask`` ``[B]``.

    ``anchors``: ``[B, ...]`` one tensor per asset in the autograd graph of its field (e.g. the SDF grid). The dummy's
    vertices are ``anchors[b].mean() · 0 + fixed points``, so the rendering loss still reaches every parameter of the
    field (DDP needs a gradient for each parameter, reference §4.2); ``mesh_mask`` is False there and
    :func:`render_meshes` masks the dummy out to transparent.
    """
    if anchors.shape[0] != len(meshes):
        raise ValueError(f"anchors must have one entry per mesh ({len(meshes)}), got shape {tuple(anchors.shape)}")
    out, mask = [], []
    for b, (verts, faces) in enumerate(meshes):  # a loop over assets, not points
        empty = faces.shape[0] == 0
        if empty:
            fixed = torch.tensor(_DUMMY_TRIANGLE, dtype=torch.float32, device=anchors.device)  # [3, 3]
            verts = anchors[b].float().mean() * 0.0 + fixed
            faces = torch.tensor([[0, 1, 2]], dtype=torch.int64, device=anchors.device)
        out.append((verts, faces))
        mask.append(not empty)
    return out, torch.tensor(mask, dtype=torch.bool, device=anchors.device)


def query_vertex_colors(
    rgb_fn: RgbFn, verts_list: Sequence[Tensor], *, chunk: int | None | str = "auto"
) -> list[Tensor]:
    """STF colours ``[V_b, 3]`` at the vertices of each mesh (``rgb_fn`` on the vertex sets padded to the largest).

    The vertex sets are zero-padded into one ``[B, V_max, 3]`` batch (the official renderer does the same) so the
    per-asset MLP weights are used in one batched call; the padding rows are dropped afterwards.
    """
    counts = [int(v.shape[0]) for v in verts_list]
    if max(counts, default=0) == 0:
        return [v.new_zeros(0, 3) for v in verts_list]
    padded = torch.nn.utils.rnn.pad_sequence(list(verts_list), batch_first=True)  # [B, V_max, 3]

    def checked(p: Tensor) -> Tensor:
        rgb = rgb_fn(p)
        if rgb.shape != p.shape:
            raise ValueError(f"rgb_fn must map points {tuple(p.shape)} to colours of the same shape, "
                             f"got {tuple(rgb.shape)}")
        return rgb.float()

    rgb = chunked(checked, padded, resolve_chunk(chunk, padded.device))  # [B, V_max, 3]
    return [rgb[b, :n] for b, n in enumerate(counts)]


class TensorMesh(NamedTuple):
    """A vertex-coloured triangle mesh as tensors: what the mesh path extracts (``verts, faces, colors = mesh``
    unpacks it). An asset without a surface has ``V = F = 0``."""

    verts: Tensor  # [V, 3] world positions
    faces: Tensor  # [F, 3] int64
    colors: Tensor  # [V, 3] sRGB in [0, 1]

    def to_trimesh(self) -> "trimesh.Trimesh":
        """The exportable form (:func:`to_trimesh`)."""
        return to_trimesh(self.verts, self.faces, self.colors)


def to_trimesh(verts: Tensor | np.ndarray, faces: Tensor | np.ndarray, colors: Tensor | np.ndarray) -> "trimesh.Trimesh":
    """``verts`` ``[V, 3]``, ``faces`` ``[F, 3]``, sRGB ``colors`` ``[V, 3]`` in [0, 1] (tensors or arrays) → a
    ``trimesh.Trimesh`` with 8-bit sRGB RGBA vertex colours, vertex order and count kept (no merging).

    The one conversion from a vertex-coloured mesh to its export form. A mesh without faces gives a plain empty
    ``trimesh.Trimesh`` (an empty mesh with an empty colour array trips trimesh's PLY writer).
    """
    import trimesh  # here, not at the top: ~0.6 s to import, and only the export form needs it

    verts, faces, colors = (x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
                            for x in (verts, faces, colors))
    if verts.shape != colors.shape or verts.ndim != 2 or verts.shape[-1] != 3:
        raise ValueError(f"verts and colors must both be [V, 3], got {tuple(verts.shape)} and {tuple(colors.shape)}")
    if faces.shape[0] == 0:
        return trimesh.Trimesh()
    # Plain numpy on the (small) vertex arrays: no torch op dispatch, and trimesh gets arrays it keeps as they are.
    rgba = np.empty((colors.shape[0], 4), dtype=np.uint8)  # [V, 4]
    rgba[:, :3] = np.rint(colors.astype(np.float32, copy=False).clip(0.0, 1.0) * 255.0)
    rgba[:, 3] = 255
    return trimesh.Trimesh(
        vertices=verts.astype(np.float64),
        faces=faces.astype(np.int64, copy=False),
        vertex_colors=rgba,
        process=False,  # keep MC's vertex order and count (they are already shared, no merging to do)
        validate=False,
    )
