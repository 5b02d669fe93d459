"""Latents → meshes and mesh renders: a transmitter's heads wired into the parameter-free mesh renderers.

The renderers of :mod:`shapee.render` ask fields (``points [B, P, 3] -> values``) and know nothing of networks; this
module is the glue (DESIGN.md: only ``shapee/models/`` wires pieces together). A *transmitter* here is anything with
``decode_params(latent) -> params`` and ``query(params, points [B, P, 3]) -> dict`` (:class:`Transmitter`, or a test
double around one).

The one mesh path (:func:`extract_meshes`): latent → per-asset MLP weights → the ``head``'s surface field on an ``N³``
grid (:func:`shapee.render.grid.query_grid`) → Marching Cubes 33 on the grid padded with "outside"
(:func:`shapee.render.mesh.extract_meshes`) → the head's colour at the vertices → :class:`TensorMesh` per asset,
whose ``.to_trimesh()`` is the export form. Heads:

* ``stf`` (as the official ``decode_latent_mesh``): the SDF head's 0 level (positive inside), STF colours. The SDF is
  queried in a narrow band around its zero level by default (the same mesh as the dense grid, ~10× fewer queries).
* ``nerf``: the fine NeRF density at ``density_level`` (the field is ``density − level``, padded with ``−level``:
  empty space has density 0), NeRF fine colours queried without a view direction. Dense grid: a density has no
  slope bound that would make the band safe. Useful for an encoder trained only with the NeRF stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from shapee.cameras import Cameras
from shapee.render.grid import DEFAULT_GRID_SIZE, RgbFn, SdfFn, query_grid
from shapee.render import mesh as render_mesh
from shapee.render.mesh import TensorMesh, query_vertex_colors
from shapee.render.stf import render_stf
from shapee.render.texture import ColourFn, bake_mesh

if TYPE_CHECKING:  # pragma: no cover
    import trimesh

__all__ = [
    "HEADS",
    "NERF_DENSITY_LEVEL",
    "as_latent_batch",
    "transmitter_fields",
    "render_latents",
    "extract_meshes",
    "latent_to_mesh",
    "transmitter_colour_fn",
    "bake_texture",
]

# head -> (surface field, colour field): the Transmitter.query keys a mesh of that head is made of.
HEAD_KEYS = {"stf": ("sdf", "stf_rgb"), "nerf": ("density_fine", "nerf_rgb_fine")}
HEADS = tuple(HEAD_KEYS)
# Iso-level of the NeRF density mesh, in 1/world-units (objects span [-1, 1]). At σ = 10 a slab 0.07 thick (3.5 % of
# the object's size) is 50 % opaque: the level sits where the volume render turns from see-through to solid.
NERF_DENSITY_LEVEL = 10.0


def _check_head(head: str) -> str:
    if head not in HEAD_KEYS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    return head


def transmitter_fields(
    transmitter, latent: Tensor, head: str = "stf", *, density_level: float = NERF_DENSITY_LEVEL
) -> tuple[SdfFn, RgbFn]:
    """``(inside_fn, rgb_fn)`` of the ``head`` of ``transmitter`` for latents ``[B, ...]`` (decoded once).

    ``inside_fn(points [B, P, 3]) -> [B, P]`` is positive inside with the surface at 0: the SDF for ``stf``, the fine
    density minus ``density_level`` for ``nerf``. ``rgb_fn(points [B, P, 3]) -> [B, P, 3]`` is the head's sRGB colour.
    """
    surface_key, rgb_key = HEAD_KEYS[_check_head(head)]
    params = transmitter.decode_params(latent)

    if head == "stf":
        def inside_fn(points: Tensor) -> Tensor:
            return transmitter.query(params, points)[surface_key]  # [B, P]
    else:
        def inside_fn(points: Tensor) -> Tensor:
            return transmitter.query(params, points)[surface_key] - density_level  # [B, P]

    def rgb_fn(points: Tensor) -> Tensor:
        return transmitter.query(params, points)[rgb_key]  # [B, P, 3]

    return inside_fn, rgb_fn


def render_latents(
    transmitter,
    latent: Tensor,
    cameras: Cameras | Sequence[Cameras],
    *,
    grid_size: int = DEFAULT_GRID_SIZE,
    **kwargs,
) -> dict:
    """STF images of latents ``[B, ...]`` through ``transmitter`` (what ``Transmitter.render_stf`` calls).

    ``cameras``: one set shared by all latents or one per latent; ``kwargs`` go to
    :func:`shapee.render.stf.render_stf`.
    """
    sdf_fn, rgb_fn = transmitter_fields(transmitter, latent)
    batch_size = latent.shape[0] if isinstance(cameras, Cameras) else None
    return render_stf(sdf_fn, rgb_fn, cameras, batch_size=batch_size, grid_size=grid_size, **kwargs)


def as_latent_batch(transmitter, latent: Tensor) -> tuple[Tensor, bool]:
    """``latent`` as a batch ``[B, R, D]`` and whether it came batched.

    The rank decides, never the batch size: ``[R, D]`` is one latent; ``[B, R, D]`` and the flat ``[B, R·D]`` the
    params projection also accepts are batches (of any B, 1 included). ``R, D`` are the transmitter's latent shape.
    """
    encoder = getattr(transmitter, "encoder", None)
    rows, width = getattr(encoder, "latent_ctx", None), getattr(encoder, "d_latent", None)
    if latent.dim() == 2 and rows is not None and width is not None and latent.shape[1] == rows * width \
            and tuple(latent.shape) != (rows, width):
        return latent.view(latent.shape[0], rows, width), True  # flat batch [B, R·D]
    batched = latent.dim() == 3
    latent = latent if batched else latent[None]
    if latent.dim() != 3 or (rows is not None and latent.shape[1] != rows):
        r, d = rows or "R", width or "D"
        raise ValueError(f"latent must have shape [B, {r}, {d}], [B, {r}·{d}] or [{r}, {d}], got {tuple(latent.shape)}")
    return latent, batched


@torch.no_grad()
def extract_meshes(
    transmitter,
    latent: Tensor,
    *,
    head: str = "stf",
    grid_size: int = DEFAULT_GRID_SIZE,
    narrow_band: bool | None = None,
    density_level: float = NERF_DENSITY_LEVEL,
    bounds: tuple[float, float] = (-1.0, 1.0),
    chunk: int | None | str = "auto",
) -> list[TensorMesh]:
    """Meshes of latents ``[B, ...]`` (or one latent, see :func:`as_latent_batch`): a :class:`TensorMesh` per asset.

    ``head``: ``stf`` or ``nerf`` (module docstring). ``narrow_band``: query the surface field only near its zero
    level (:func:`shapee.render.grid.query_grid_narrow_band`: the same mesh as the dense grid for fields whose slope
    is at most ~1.15); ``None``: on for ``stf``, off for ``nerf``.

    Vertices are at true world positions (no 127/129 shrink); colours are the head's sRGB values clamped to [0, 1]
    (not the linear values the official export writes, issue #86, §4.3). A latent without a surface gives an empty
    mesh (``V = F = 0``).
    """
    latent, _ = as_latent_batch(transmitter, latent)
    inside_fn, rgb_fn = transmitter_fields(transmitter, latent, head, density_level=density_level)
    field = query_grid(inside_fn, latent.shape[0], grid_size, bounds, chunk=chunk, device=latent.device,
                       narrow_band=head == "stf" if narrow_band is None else narrow_band)  # [B, G, G, G]
    # The "outside" border that closes every mesh: −1 for the tanh-bounded SDF, 0 − level for the density.
    pad_value = -1.0 if head == "stf" else -density_level
    meshes = render_mesh.extract_meshes(field, bounds, pad_value=pad_value)
    colors = query_vertex_colors(rgb_fn, [v for v, _ in meshes], chunk=chunk)
    return [TensorMesh(v, f, c.clamp(0, 1)) for (v, f), c in zip(meshes, colors)]


def latent_to_mesh(transmitter, latent: Tensor, grid_size: int = DEFAULT_GRID_SIZE, **kwargs) -> "list[trimesh.Trimesh]":
    """:func:`extract_meshes` in export form: a ``trimesh.Trimesh`` per asset with 8-bit sRGB vertex colours
    (always a list, one latent included; ``Transmitter.to_mesh`` applies the rank rule)."""
    return [mesh.to_trimesh() for mesh in extract_meshes(transmitter, latent, grid_size=grid_size, **kwargs)]


# ------------------------------------------------------------------------------------------- textured export
def transmitter_colour_fn(transmitter, latent: Tensor, head: str = "stf") -> ColourFn:
    """The colour head ``head`` (``stf``: ``stf_rgb``; ``nerf``: ``nerf_rgb_fine``, queried without a view
    direction, as the mesh export does) of one latent ``[n_ctx, d]`` (or ``[1, n_ctx, d]``) as a ``ColourFn``."""
    if head not in HEAD_KEYS:
        raise ValueError(f"texture head must be one of {HEADS}, got {head!r}")
    key = HEAD_KEYS[head][1]
    latent = latent if latent.ndim == 3 else latent[None]
    if latent.shape[0] != 1:
        raise ValueError(f"transmitter_colour_fn takes one latent, got a batch of {latent.shape[0]}")
    with torch.no_grad():
        params = transmitter.decode_params(latent)
    device = latent.device

    def colour_fn(points: Tensor) -> Tensor:  # [N, 3] -> [N, 3] sRGB
        return transmitter.query(params, points.to(device)[None])[key][0].clamp(0, 1)

    return colour_fn


def bake_texture(transmitter, latent: Tensor, mesh, *, size: int = 1024, faces: int | None = None,
                 head: str = "stf", **kwargs):
    """``mesh`` (a ``trimesh.Trimesh`` extracted from ``latent``, e.g. by :meth:`Transmitter.to_mesh`) → the same
    surface, decimated to ``faces`` if given, with a UV atlas and a ``size²`` texture baked from the ``head`` colour
    head of ``latent`` (``size = 0``: vertex colours). ``kwargs`` go to :func:`shapee.render.texture.bake_mesh`."""
    colour_fn = transmitter_colour_fn(transmitter, latent, head)
    return bake_mesh(colour_fn, np.asarray(mesh.vertices), np.asarray(mesh.faces), texture_size=size,
                     target_faces=faces, device=latent.device, **kwargs)
