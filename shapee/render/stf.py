"""Parameter-free STF (mesh) rendering: SDF grid → Marching Cubes 33 → vertex colours → soft PyTorch3D render.

The renderer knows nothing about networks. It asks two *fields*, both per-asset batched,

    sdf_fn(points [B, P, 3]) -> sdf [B, P]        (positive inside, DESIGN.md)
    rgb_fn(points [B, P, 3]) -> rgb [B, P, 3]     (sRGB in [0, 1], the STF colour head)

and turns them into meshes or images, as the official ``render_views_from_stf`` does (reference §4):

1. :func:`query_grid`: the SDF on an ``N³`` grid spanning ``bounds`` inclusively (§4.1), in chunks of points;
   with ``narrow_band=True`` only near the zero level (coarse-to-fine, :func:`query_grid_narrow_band`), which gives
   the same mesh for ~10× fewer queries;
2. :func:`extract_meshes`: pad with a −1 ("outside") border so every mesh is closed, then Marching Cubes 33 on the
   padded grid **with bounds widened by one voxel**, so vertices stay at their true world positions (the official
   code maps the padded 130³ grid onto the unpadded box and shrinks every mesh by 127/129, §4.2 / §8.3.3);
3. :func:`query_vertex_colors`: the STF colour at the mesh vertices, meshes padded to the largest vertex count;
4. :func:`render_meshes`: PyTorch3D rasterisation (cameras of :func:`shapee.cameras.to_pytorch3d`), barycentric
   vertex colours, flat face normals, the dataset's "basic" lighting (:func:`shapee.render.lighting.shade_basic`),
   soft silhouette blending so that alpha is differentiable w.r.t. the vertices (§4.3).

Gradients flow image → fragment colours/barycentrics/distances → vertex positions and colours → (MC's linear zero
crossing) the two SDF samples of each crossing edge, and (colour query) the colour head: both reach the latent.

Glue for a :class:`shapee.models.Transmitter` (which the model's ``render_stf``/``to_mesh`` call) sits at the end:
:func:`transmitter_fields`, :func:`render_latents`, :func:`latent_to_mesh`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shapee.cameras import Cameras, to_pytorch3d
from shapee.render.lighting import LIGHT_DIRECTION, shade_basic
from shapee.render.mc33 import marching_cubes
from shapee.render.raster import rasterize_with_bin_fallback

if TYPE_CHECKING:  # pragma: no cover
    import trimesh

__all__ = [
    "SdfFn",
    "RgbFn",
    "grid_points",
    "default_chunk",
    "query_grid",
    "query_grid_narrow_band",
    "pad_grid",
    "extract_meshes",
    "replace_empty_meshes",
    "query_vertex_colors",
    "render_meshes",
    "render_stf",
    "transmitter_fields",
    "render_latents",
    "latent_to_mesh",
    "to_trimesh",
]

SdfFn = Callable[[Tensor], Tensor]  # points [B, P, 3] -> sdf [B, P]
RgbFn = Callable[[Tensor], Tensor]  # points [B, P, 3] -> sRGB [B, P, 3]

# Reference §4.3: the official soft rasteriser. σ is in squared NDC units (PyTorch3D's ``dists``): a face's
# coverage of a pixel is sigmoid(−d/σ), and faces farther than blur_radius = σ·ln(1/ε − 1) (coverage < ε = 1e-4)
# are not rasterised. A pixel is 2/S NDC wide, so the soft edge reaches √(9.2σ) ≈ 0.0096 NDC ≈ 0.3 px at 64²,
# 0.6 px at 128², 1.2 px at 256²: it stays a sub- to one-pixel band at the resolutions we train at.
SIGMA = 1e-5
GAMMA = 1e-4  # depth softmax temperature of the colour blend (official BlendParams γ)
FACES_PER_PIXEL = 50  # official; PyTorch3D keeps the K nearest faces within the blur radius per pixel
COVERAGE_EPS = 1e-4
# PyTorch3D's clip planes for our cameras (objects in [-1, 1]³, cameras ~4 units away). The softmax colour blend
# normalises depth by zfar − znear; the official renderer uses znear 1, zfar 100.
ZNEAR, ZFAR = 0.1, 100.0
# A fixed small triangle standing in for an empty mesh (reference §4.2): its output is masked to transparent.
_DUMMY_TRIANGLE = ((0.0, 0.0, 0.0), (1e-3, 0.0, 0.0), (0.0, 1e-3, 0.0))


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    if len(bounds) != 2 or not float(bounds[1]) > float(bounds[0]):
        raise ValueError(f"bounds must be (lo, hi) with hi > lo, got {bounds}")
    return float(bounds[0]), float(bounds[1])


def default_chunk(device: torch.device | str | None) -> int:
    """Points per query call on ``device``: 4096 on CPU, 65536 elsewhere.

    Measured (release-size NeRSTF MLP, 2^17 points, 1 thread): 1.03 CPU-s in chunks of 4096 vs 1.61 in chunks of
    65536; large chunks spill the caches and page in fresh activation buffers every call. On a GPU a chunk only needs
    to be large enough to fill the device.
    """
    return 4096 if torch.device(device or "cpu").type == "cpu" else 2**16


def _resolve_chunk(chunk: int | None | str, device: torch.device | str | None) -> int | None:
    """``"auto"`` → :func:`default_chunk` of ``device``; a positive int or None (no chunking) as given."""
    if isinstance(chunk, str):
        if chunk != "auto":
            raise ValueError(f"chunk must be a positive number of points, None or 'auto', got {chunk!r}")
        return default_chunk(device)
    return chunk


def _chunked(fn: Callable[[Tensor], Tensor], points: Tensor, chunk: int | None) -> Tensor:
    """``fn`` over ``points`` ``[B, P, 3]`` in slices of ``chunk`` points along P; outputs concatenated on dim 1."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of points (or None), got {chunk}")
    P = points.shape[1]
    if chunk is None or chunk >= P:
        return fn(points)
    return torch.cat([fn(points[:, i : i + chunk].contiguous()) for i in range(0, P, chunk)], dim=1)


def _checked_sdf(query_fn: SdfFn) -> Callable[[Tensor], Tensor]:
    """``query_fn`` with its output shape checked (``[B, P]`` for points ``[B, P, 3]``) and cast to float32."""

    def checked(p: Tensor) -> Tensor:
        sdf = query_fn(p)
        if sdf.shape != p.shape[:2]:
            raise ValueError(
                f"query_fn must map points {tuple(p.shape)} to sdf {tuple(p.shape[:2])}, got {tuple(sdf.shape)}"
            )
        return sdf.float()

    return checked


# ----------------------------------------------------------------------------------------------- 1. the grid
def _grid_axis(count: int, grid_size: int, lo: float, hi: float, device) -> Tensor:
    """``[count]`` float64 sample coordinates ``lo + i/(N−1)·(hi − lo)`` of an ``N = grid_size`` grid (``count`` may
    run past N). The one formula of every grid query, so that a sample has bit-identical coordinates in all of them."""
    return lo + torch.arange(count, device=device, dtype=torch.float64) / (grid_size - 1) * (hi - lo)


def grid_points(
    grid_size: int,
    bounds: tuple[float, float] = (-1.0, 1.0),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[N, N, N, 3]`` points indexed ``[x, y, z]``: coordinate ``lo + idx/(N−1)·(hi − lo)`` (reference §4.1)."""
    if grid_size < 2:
        raise ValueError(f"grid_size must be at least 2, got {grid_size}")
    lo, hi = _check_bounds(bounds)
    axis = _grid_axis(grid_size, grid_size, lo, hi, device)  # [N]
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).to(dtype)  # [N, N, N, 3]


def query_grid(
    query_fn: SdfFn,
    batch_size: int,
    grid_size: int = 128,
    bounds: tuple[float, float] = (-1.0, 1.0),
    *,
    chunk: int | None | str = "auto",
    device: torch.device | str | None = None,
    narrow_band: bool = False,
    band_width: float = 1.0,
    band_dilation: int = 1,
    grad_samples: str = "all",
) -> Tensor:
    """The SDF of ``batch_size`` assets on an ``N³`` grid: ``[B, N, N, N]`` float32, indexed ``[x, y, z]``.

    ``query_fn(points [B, P, 3]) -> sdf [B, P]`` is called with the same grid points for every asset, ``chunk``
    points at a time (x-major order; ``"auto"``: :func:`default_chunk` of ``device``, ``None``: all at once; the
    chunk only bounds memory and tunes speed). The output is cast to float32: marching cubes runs in fp32 (STYLE
    rule 8).

    ``narrow_band=True``: exact values only near the zero level, the rest filled with values of the right sign
    (:func:`query_grid_narrow_band`, with ``band_width`` and ``band_dilation``): the same Marching Cubes mesh for a
    fraction of the queries, but not the field far from the surface.

    ``grad_samples`` (when autograd is on): ``"all"`` (default) every sample carries its gradient (for losses on the
    whole grid). ``"surface"`` (what :func:`render_stf` uses) queries the grid without autograd, then again,
    with autograd, only the samples at the ends of grid edges with a sign change (and on the boundary where > 0, for
    :func:`extract_meshes`' padding), which are all that Marching Cubes vertices depend on: the same values, meshes
    and gradients w.r.t. the field's parameters for a small part of the activation memory (a 128³ grid of the released
    MLP at batch 4 otherwise needs more than 80 GB). The grid's other samples are constants.
    """
    if grad_samples not in ("surface", "all"):
        raise ValueError(f"grad_samples must be 'surface' or 'all', got {grad_samples!r}")
    if grad_samples == "surface" and torch.is_grad_enabled():
        with torch.no_grad():
            sdf = query_grid(query_fn, batch_size, grid_size, bounds, chunk=chunk, device=device,
                             narrow_band=narrow_band, band_width=band_width, band_dilation=band_dilation)
        return _requery_surface_samples(_checked_sdf(query_fn), sdf, bounds, _resolve_chunk(chunk, device))
    if narrow_band:
        return query_grid_narrow_band(query_fn, batch_size, grid_size, bounds, chunk=chunk, device=device,
                                      band_width=band_width, band_dilation=band_dilation)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk = _resolve_chunk(chunk, device)
    points = grid_points(grid_size, bounds, device=device).reshape(1, -1, 3)  # [1, N³, 3]
    points = points.expand(batch_size, -1, -1)  # [B, N³, 3] (a view: one copy of the grid)
    sdf = _chunked(_checked_sdf(query_fn), points, chunk)  # [B, N³]
    return sdf.reshape(batch_size, grid_size, grid_size, grid_size)


def _requery_surface_samples(checked: Callable[[Tensor], Tensor], sdf: Tensor, bounds: tuple[float, float],
                             chunk: int | None) -> Tensor:
    """``sdf`` ``[B, N, N, N]`` (no autograd) with the samples Marching Cubes reads re-queried with autograd."""
    batch_size, n = sdf.shape[0], sdf.shape[-1]
    lo, hi = _check_bounds(bounds)
    inside = sdf > 0  # [B, N, N, N]
    need = torch.zeros_like(inside)
    for dim in (1, 2, 3):  # both ends of every edge with a sign change
        flip = inside.narrow(dim, 0, n - 1) != inside.narrow(dim, 1, n - 1)
        need.narrow(dim, 0, n - 1).logical_or_(flip)
        need.narrow(dim, 1, n - 1).logical_or_(flip)
    shell = torch.ones(n, n, n, dtype=torch.bool, device=sdf.device)
    shell[1:-1, 1:-1, 1:-1] = False  # extract_meshes pads with −1: a boundary sample > 0 is an edge end too
    need |= inside & shell
    need[:, 0, 0, 0] = True  # one sample per asset always: the field stays in the graph (DDP) even without a surface
    index = need.nonzero()  # [K, 4] asset-major
    axis = _grid_axis(n, n, lo, hi, sdf.device).to(torch.float32)  # [N]
    values = _query_points(checked, index, axis, batch_size, chunk)  # [K] with autograd
    return sdf.index_put((index[:, 0], index[:, 1], index[:, 2], index[:, 3]), values)


# The coarsest level of the narrow band is queried densely: the first grid of the halving sequence N → ⌈(N−1)/2⌉ + 1
# with fewer than this many points per axis stops it (128 → 65 → 33). A 33³ start costs 36k queries (a few % of
# 128³) and keeps the coarsest cells 4 voxels wide, so the band is found with ordinary fields' detail.
_BAND_COARSEST = 32


def _band_sizes(grid_size: int) -> list[int]:
    """Points per axis of each level, finest first: ``[N, ⌈(N−1)/2⌉ + 1, …]`` down to the dense coarsest level."""
    sizes = [grid_size]
    while sizes[-1] // 2 + 1 >= _BAND_COARSEST:  # ⌈(n−1)/2⌉ + 1 = n//2 + 1
        sizes.append(sizes[-1] // 2 + 1)
    return sizes


def _query_points(query_fn: Callable[[Tensor], Tensor], index: Tensor, axis: Tensor, batch_size: int,
                  chunk: int | None) -> Tensor:
    """SDF at the grid points ``index`` ``[K, 4]`` (asset, i, j, k; asset-major) with coordinates ``axis[i|j|k]``.

    Each asset's points go into one row of a ``[B, P_max, 3]`` batch (rows padded with the origin), so the per-asset
    weights are used in one call per chunk; returns the ``[K]`` values.
    """
    b = index[:, 0]  # [K]
    counts = torch.bincount(b, minlength=batch_size)  # [B]
    slot = torch.arange(b.numel(), device=b.device) - (torch.cumsum(counts, 0) - counts)[b]  # [K] place in its row
    points = axis.new_zeros(batch_size, int(counts.max()), 3)  # [B, P_max, 3]
    points[b, slot] = axis[index[:, 1:]]  # [K, 3]
    return _chunked(query_fn, points, chunk)[b, slot]  # [K]


def query_grid_narrow_band(
    query_fn: SdfFn,
    batch_size: int,
    grid_size: int = 128,
    bounds: tuple[float, float] = (-1.0, 1.0),
    *,
    chunk: int | None | str = "auto",
    device: torch.device | str | None = None,
    band_width: float = 1.0,
    band_dilation: int = 1,
) -> Tensor:
    """The SDF on the ``N³`` grid of :func:`query_grid` (``[B, N, N, N]`` float32), queried only near the zero level.

    Coarse to fine: the field is queried densely on a coarse grid (every 4th sample at N = 128, ~33³), and each level
    halves the spacing. A cell of the coarser level (edge ``c``) is in the band when its 8 corners do not all have
    the same side (``> 0`` is inside) or the smallest ``|sdf|`` among them is below ``band_width · c``; the band is
    dilated by ``band_dilation`` cells, and the finer level queries every sample of a band cell. Elsewhere the finer
    samples get the trilinear interpolation of the coarse corners (all on one side of 0 there, so the filled value
    has their side, with ``|value| ≥ band_width · c``; it is not the field's value).

    Guarantee: the result has the dense grid's exact values (up to float rounding of the batched query) at every
    sample of every cube with a sign change (the cubes of :func:`extract_meshes`' −1 padding next to samples > 0 on
    the grid boundary included), and the right side of 0 everywhere, hence the same Marching Cubes mesh
    (vertices to float tolerance, same faces), whenever the field has no zero inside a cell left out of the band.
    That holds for any field whose Lipschitz constant is at most ``band_width · 2/√3`` (≈ 1.15 by default; a true
    SDF has 1, and ``tanh`` of it less), since the field cannot reach 0 within the half-diagonal ``c·√3/2`` of a
    corner with ``|sdf| ≥ band_width · c``; the dilation is a margin beyond that. What the band can miss: a zero
    level inside a coarse cell whose corners are all far from it, i.e. a feature smaller than a coarse cell on a
    steep field (a thin spike, a bubble of ``|sdf|`` far above its distance to the surface); raise ``band_width``
    or use the dense grid for such fields.

    The query also visits points up to a few voxels beyond ``hi`` (the coarse levels' last samples, at the same
    spacing). Values are differentiable w.r.t. the queries (the fill through the interpolation); an asset without
    a surface costs only the coarse levels.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if grid_size < 2:
        raise ValueError(f"grid_size must be at least 2, got {grid_size}")
    if not band_width > 0:
        raise ValueError(f"band_width must be > 0 (in coarse cell edges), got {band_width}")
    if band_dilation < 0:
        raise ValueError(f"band_dilation must be >= 0 cells, got {band_dilation}")
    lo, hi = _check_bounds(bounds)
    chunk = _resolve_chunk(chunk, device)
    checked = _checked_sdf(query_fn)
    h = (hi - lo) / (grid_size - 1)  # finest spacing
    sizes = _band_sizes(grid_size)
    top = len(sizes) - 1
    # One axis for all levels: level l uses every 2^l-th entry. Same formula (float64, then cast) as grid_points, so
    # a sample has bit-identical coordinates to the dense grid's.
    extent = (sizes[top] - 1) * 2**top + 1  # ≥ N
    axis = _grid_axis(extent, grid_size, lo, hi, device)
    axis = axis.to(torch.float32)  # [extent]

    # Coarsest level: dense.
    n = sizes[top]
    level_axis = axis[:: 2**top]  # [n]
    grid = torch.stack(torch.meshgrid(level_axis, level_axis, level_axis, indexing="ij"), dim=-1)  # [n, n, n, 3]
    sdf = _chunked(checked, grid.reshape(1, -1, 3).expand(batch_size, -1, -1), chunk)  # [B, n³]
    sdf = sdf.reshape(batch_size, n, n, n)
    exact = torch.ones(batch_size, n, n, n, dtype=torch.bool, device=sdf.device)  # [B, n, n, n]

    for level in range(top - 1, -1, -1):
        nc, n = sizes[level + 1], sizes[level]
        m = 2 * (nc - 1) + 1  # the finer level's samples under the coarse grid (≥ n)
        with torch.no_grad():
            band = _band_cells(sdf.detach(), band_width * 2 ** (level + 1) * h, band_dilation)  # [B, nc−1, nc−1, nc−1]
            # Samples of band cells: each cell's 2·2·2 own samples, then every sample whose lower neighbour (along
            # any of x, y, z) starts a band cell, which adds the cells' far faces.
            in_band = band.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)  # [B, m−1, …]
            in_band = _pairs(F.pad(in_band, (1, 1, 1, 1, 1, 1)), torch.logical_or)[:, :n, :n, :n]  # [B, n, n, n]
            fine_exact = torch.zeros(batch_size, m, m, m, dtype=torch.bool, device=sdf.device)
            fine_exact[:, ::2, ::2, ::2] = exact
            fine_exact = fine_exact[:, :n, :n, :n]  # [B, n, n, n] samples already known from the coarse level
            todo = (in_band & ~fine_exact).nonzero()  # [K, 4] asset-major
        # Fill: trilinear between the coarse corners (align_corners: coarse sample i sits on fine sample 2i).
        fine = F.interpolate(sdf[:, None], size=(m, m, m), mode="trilinear", align_corners=True)[:, 0]
        fine = fine[:, :n, :n, :n].clone()  # [B, n, n, n]
        k = (n + 1) // 2  # coarse samples inside the finer grid, per axis
        fine[:, ::2, ::2, ::2] = sdf[:, :k, :k, :k]  # the coarse samples as they are (the fill's weights are 0/1 there)
        if todo.shape[0] > 0:
            values = _query_points(checked, todo, axis[:: 2**level], batch_size, chunk)  # [K]
            fine = fine.index_put((todo[:, 0], todo[:, 1], todo[:, 2], todo[:, 3]), values)
        sdf = fine
        exact = fine_exact | in_band
    if top > 0:
        # extract_meshes pads the grid with −1: a cube of the padding is active wherever a boundary sample is > 0,
        # and uses the boundary samples around it. Query those exactly too (none for an object inside the box).
        with torch.no_grad():
            n = sizes[0]
            shell = torch.ones(n, n, n, dtype=torch.bool, device=sdf.device)
            shell[1:-1, 1:-1, 1:-1] = False  # [n, n, n] the 6 faces of the grid
            positive = (sdf.detach() > 0) & shell  # [B, n, n, n]
            todo = (_dilate(positive, 1) & shell & ~exact).nonzero()  # [K, 4]
        if todo.shape[0] > 0:
            values = _query_points(checked, todo, axis, batch_size, chunk)  # [K]
            sdf = sdf.index_put((todo[:, 0], todo[:, 1], todo[:, 2], todo[:, 3]), values)
    return sdf


def _pairs(x: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``op`` over the 2·2·2 corners of every cell of ``x`` ``[B, n, n, n]`` → ``[B, n−1, n−1, n−1]``.

    Separable (one pass per axis over adjacent pairs): much cheaper on CPU than ``max_pool3d``, and exact for
    associative ``op`` (or, and, minimum).
    """
    for dim in (1, 2, 3):
        n = x.shape[dim]
        x = op(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1))
    return x


def _dilate(mask: Tensor, cells: int) -> Tensor:
    """``mask`` ``[B, n, n, n]`` bool grown by ``cells`` along each axis (a (2·cells + 1)³ box), separably."""
    for dim in (1, 2, 3):
        n = mask.shape[dim]
        pad = [0, 0] * (3 - dim) + [cells, cells]  # F.pad counts from the last dim
        padded = F.pad(mask, pad)  # [.., n + 2·cells, ..]
        grown = padded.narrow(dim, 0, n)
        for k in range(1, 2 * cells + 1):
            grown = grown | padded.narrow(dim, k, n)
        mask = grown
    return mask


def _band_cells(sdf: Tensor, threshold: float, dilation: int) -> Tensor:
    """Cells of the grid ``sdf`` ``[B, n, n, n]`` that may hold the zero level: ``[B, n−1, n−1, n−1]`` bool.

    A cell is in when its corners straddle 0 (inside ⇔ > 0, as Marching Cubes) or the smallest corner ``|sdf|`` is
    below ``threshold``; then dilated by ``dilation`` cells.
    """
    inside = sdf > 0  # [B, n, n, n]
    straddle = _pairs(inside, torch.logical_or) & ~_pairs(inside, torch.logical_and)  # [B, n−1, n−1, n−1]
    near = _pairs(sdf.abs(), torch.minimum) < threshold  # the smallest |sdf| of the 8 corners
    band = straddle | near
    return _dilate(band, dilation) if dilation > 0 else band


def pad_grid(sdf: Tensor, bounds: tuple[float, float] = (-1.0, 1.0)) -> tuple[Tensor, tuple[float, float]]:
    """Pad ``sdf`` ``[B, N, N, N]`` with a −1 (outside) border → ``[B, N+2, N+2, N+2]`` and its bounds.

    The padded grid keeps the voxel size h = (hi − lo)/(N − 1): its bounds are ``(lo − h, hi + h)``, so a sample
    keeps its world position. (The official code pads to 130³ but keeps the bounds (−1, 1): the 127/129 shrink, §4.2.)
    """
    if sdf.dim() != 4 or len(set(sdf.shape[1:])) != 1:
        raise ValueError(f"sdf must be a batch of cubic grids [B, N, N, N], got shape {tuple(sdf.shape)}")
    lo, hi = _check_bounds(bounds)
    h = (hi - lo) / (sdf.shape[-1] - 1)
    return F.pad(sdf, (1, 1, 1, 1, 1, 1), value=-1.0), (lo - h, hi + h)


def extract_meshes(
    sdf: Tensor, bounds: tuple[float, float] = (-1.0, 1.0), *, pad: bool = True
) -> list[tuple[Tensor, Tensor]]:
    """Marching Cubes 33 on each grid of ``sdf`` ``[B, N, N, N]`` over ``bounds`` → ``[(verts [V,3], faces [F,3])]``.

    With ``pad`` (default) the grid gets a −1 border first (:func:`pad_grid`) so every mesh is closed. ``verts`` are
    differentiable w.r.t. ``sdf``; an asset without a zero crossing gets ``V = F = 0`` (see
    :func:`replace_empty_meshes`).
    """
    if sdf.dim() != 4:
        raise ValueError(f"sdf must have shape [B, N, N, N], got {tuple(sdf.shape)}")
    if pad:
        sdf, bounds = pad_grid(sdf, bounds)
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

    rgb = _chunked(checked, padded, _resolve_chunk(chunk, padded.device))  # [B, V_max, 3]
    return [rgb[b, :n] for b, n in enumerate(counts)]


# ------------------------------------------------------------------------------------------- 4. rasterising
def _rasterize(meshes, p3d_cameras, *, image_size: int, blur_radius: float, faces_per_pixel: int,
               bin_size: int | None, max_faces_per_bin: int | None):
    """PyTorch3D fragments; the naive rasteriser on CPU, and on CUDA whenever the coarse bins overflow."""
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings

    if bin_size is None and meshes.device.type != "cuda":
        bin_size = 0  # the coarse-to-fine binned rasteriser is a CUDA speed-up; naive is the one for CPU

    def rasterize(bin_size):
        settings = RasterizationSettings(
            image_size=image_size,
            blur_radius=blur_radius,
            faces_per_pixel=faces_per_pixel,
            bin_size=bin_size,
            max_faces_per_bin=max_faces_per_bin,
            # Official choice (§4.3): MC triangles are a voxel wide, so affine vs perspective barycentrics differ
            # by far less than a colour quantum, and the affine ones have the simpler, NaN-free backward.
            perspective_correct=False,
            clip_barycentric_coords=True,  # soft fragments just outside a face get its edge colour
            cull_backfaces=False,
        )
        return MeshRasterizer(cameras=p3d_cameras, raster_settings=settings)(meshes)

    return rasterize_with_bin_fallback(rasterize, bin_size)


def render_meshes(
    verts_list: Sequence[Tensor],
    faces_list: Sequence[Tensor],
    colors_list: Sequence[Tensor],
    cameras: Cameras | Sequence[Cameras],
    *,
    mesh_mask: Tensor | None = None,
    soft: bool = True,
    sigma: float = SIGMA,
    gamma: float = GAMMA,
    faces_per_pixel: int = FACES_PER_PIXEL,
    light_dir: Sequence[float] | Tensor = LIGHT_DIRECTION,
    bin_size: int | None = None,
    max_faces_per_bin: int | None = None,
) -> dict[str, Tensor]:
    """Render ``B`` vertex-coloured meshes from ``N`` square views each, with the dataset lighting, on black.

    Args:
        verts_list, faces_list, colors_list: per mesh ``[V_b, 3]`` world positions, ``[F_b, 3]`` int64 faces
            (F_b ≥ 1, see :func:`replace_empty_meshes`), ``[V_b, 3]`` sRGB vertex colours in [0, 1].
        cameras: one :class:`Cameras` of ``N`` views per mesh (same size and fov for all), or one shared by all
            meshes. Views must be square with ``x_fov == y_fov`` (PyTorch3D, §4.3).
        mesh_mask: ``[B]`` bool; False renders that asset fully transparent (multiplied by 0, graph kept).
        soft: soft silhouette (differentiable alpha, official σ/γ/K) or hard (one face per pixel, binary alpha;
            gradients only through barycentrics: for previews and exports).
        sigma, gamma, faces_per_pixel: soft rasteriser settings (see ``SIGMA``); blur radius = σ·ln(1/ε − 1).

    Pixel colour: vertex colours interpolated with (affine) barycentrics, shaded per fragment with the flat face
    normal by :func:`shade_basic` (sRGB → linear · (0.3 + 0.7|n·L|) → sRGB); in soft mode the fragment colours are
    blended by PyTorch3D's depth softmax and alpha = 1 − Π(1 − sigmoid(−d/σ)). The colour is premultiplied by
    alpha (composited on black), like the dataset images and the official render (§4.3).

    Returns ``rgb`` ``[B, N, H, W, 3]`` (sRGB on black) and ``alpha`` ``[B, N, H, W]``, float32 on the cameras' device.
    """
    B = len(verts_list)
    if B == 0 or len(faces_list) != B or len(colors_list) != B:
        raise ValueError(
            f"verts_list, faces_list and colors_list must be non-empty and of equal length, got "
            f"{len(verts_list)}, {len(faces_list)}, {len(colors_list)}"
        )
    for b, (v, f, c) in enumerate(zip(verts_list, faces_list, colors_list)):
        if v.dim() != 2 or v.shape[-1] != 3:
            raise ValueError(f"verts_list[{b}] must have shape [V, 3], got {tuple(v.shape)}")
        if f.dim() != 2 or f.shape[-1] != 3 or f.shape[0] == 0:
            raise ValueError(
                f"faces_list[{b}] must have shape [F, 3] with F >= 1, got {tuple(f.shape)} "
                "(replace empty meshes with replace_empty_meshes first)"
            )
        if c.shape != v.shape:
            raise ValueError(f"colors_list[{b}] must match its vertices {tuple(v.shape)}, got {tuple(c.shape)}")
    cams = list(cameras) if not isinstance(cameras, Cameras) else [cameras] * B
    if len(cams) != B:
        raise ValueError(f"cameras must be one Cameras per mesh ({B}) or a single shared one, got {len(cams)}")
    N = len(cams[0])
    if any(len(c) != N for c in cams):
        raise ValueError(f"every mesh needs the same number of views, got {[len(c) for c in cams]}")
    all_cams = Cameras.cat(cams)  # [B·N] views, mesh-major (checks equal sizes / fovs)
    device = all_cams.device
    if mesh_mask is not None and mesh_mask.shape != (B,):
        raise ValueError(f"mesh_mask must have shape [{B}], got {tuple(mesh_mask.shape)}")

    # Rasterisation and shading in fp32 whatever the caller's autocast (PyTorch3D's kernels take float32 only, and
    # under bf16 autocast its camera transforms would hand them bf16): STYLE rule 8.
    with torch.autocast(device.type, enabled=False):
        return _render_fp32(verts_list, faces_list, colors_list, all_cams, N, mesh_mask, soft=soft, sigma=sigma,
                            gamma=gamma, faces_per_pixel=faces_per_pixel, light_dir=light_dir, bin_size=bin_size,
                            max_faces_per_bin=max_faces_per_bin)


def _render_fp32(verts_list, faces_list, colors_list, all_cams: Cameras, N: int, mesh_mask, *, soft, sigma, gamma,
                 faces_per_pixel, light_dir, bin_size, max_faces_per_bin) -> dict:
    """The body of :func:`render_meshes` after its checks (autocast off)."""
    from pytorch3d.renderer import BlendParams
    from pytorch3d.renderer.blending import softmax_rgb_blend
    from pytorch3d.structures import Meshes

    B = len(verts_list)
    device = all_cams.device
    H, W = all_cams.height, all_cams.width
    # Each mesh repeated once per view (mesh-major, like the cameras). Packed tensors stay differentiable.
    verts = [v.float() for v in verts_list for _ in range(N)]
    meshes = Meshes(verts=verts, faces=[f for f in faces_list for _ in range(N)])
    colors_packed = torch.cat([c.float() for c in colors_list for _ in range(N)])  # [ΣV, 3]
    faces_packed = meshes.faces_packed()  # [ΣF, 3]
    tri = meshes.verts_packed()[faces_packed]  # [ΣF, 3 corners, 3]
    face_normals = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)  # [ΣF, 3]
    # Zero-area faces (MC can emit them when a field value is ~0 at a sample): keep the division finite.
    face_normals = face_normals / face_normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    blur_radius = sigma * math.log(1.0 / COVERAGE_EPS - 1.0) if soft else 1e-10  # 1e-10: no holes on shared edges
    fragments = _rasterize(
        meshes,
        to_pytorch3d(all_cams, znear=ZNEAR, zfar=ZFAR),
        image_size=H,
        blur_radius=blur_radius,
        faces_per_pixel=faces_per_pixel if soft else 1,
        bin_size=bin_size,
        max_faces_per_bin=max_faces_per_bin,
    )
    pix_to_face = fragments.pix_to_face  # [BN, H, W, K] packed face ids, −1: none
    hit = pix_to_face >= 0  # [BN, H, W, K]

    # Shade only the fragments that exist (usually a small fraction of BN·H·W·K).
    face = pix_to_face[hit]  # [M]
    bary = fragments.bary_coords[hit]  # [M, 3]
    albedo = torch.einsum("mc,mcd->md", bary, colors_packed[faces_packed[face]])  # [M, 3] sRGB
    # Flat face normals, as the dataset renders. Those flip each normal toward the camera; the lighting is two-sided
    # (|n·L|), so the flip cannot change a colour and is skipped here.
    shaded = shade_basic(albedo.clamp(0.0, 1.0), face_normals[face], light_dir)  # [M, 3] sRGB
    fragment_rgb = torch.zeros(*hit.shape, 3, dtype=shaded.dtype, device=device)  # [BN, H, W, K, 3]
    fragment_rgb = fragment_rgb.index_put((hit,), shaded)

    if soft:
        params = BlendParams(sigma=sigma, gamma=gamma, background_color=(0.0, 0.0, 0.0))
        rgba = softmax_rgb_blend(fragment_rgb, fragments, params, znear=ZNEAR, zfar=ZFAR)  # [BN, H, W, 4]
        alpha = rgba[..., 3]  # [BN, H, W]
        # The softmax blend gives a faint edge fragment its full colour: premultiply (composite on black).
        rgb = rgba[..., :3] * alpha[..., None]  # [BN, H, W, 3]
    else:
        alpha = hit[..., 0].to(shaded.dtype)  # [BN, H, W]
        rgb = fragment_rgb[..., 0, :]  # [BN, H, W, 3], black where nothing was hit

    rgb = rgb.reshape(B, N, H, W, 3)
    alpha = alpha.reshape(B, N, H, W)
    if mesh_mask is not None:
        keep = mesh_mask.to(device=device, dtype=rgb.dtype)  # [B]
        rgb = rgb * keep[:, None, None, None, None]
        alpha = alpha * keep[:, None, None, None]
    return {"rgb": rgb, "alpha": alpha}


# --------------------------------------------------------------------------------------------- the pipeline
def render_stf(
    sdf_fn: SdfFn,
    rgb_fn: RgbFn,
    cameras: Cameras | Sequence[Cameras],
    *,
    batch_size: int | None = None,
    grid_size: int = 128,
    bounds: tuple[float, float] = (-1.0, 1.0),
    chunk: int | None | str = "auto",
    narrow_band: bool = False,
    grad_samples: str = "surface",
    **render_kwargs,
) -> dict:
    """Fields → images: grid query → MC33 (padded, no shrink) → STF colour at the vertices → soft render.

    ``cameras``: one :class:`Cameras` per asset, or one shared set (then ``batch_size`` = number of assets is
    required). ``render_kwargs`` go to :func:`render_meshes` (``soft``, ``sigma``, ``faces_per_pixel``, ...).
    ``narrow_band``: query the SDF only near its zero level (:func:`query_grid_narrow_band`): the same mesh, images
    and gradients for fields it covers, but ``sdf`` is then exact only near the surface. Off by default: a field in
    training (random at first) is not guaranteed to be one the band covers. ``grad_samples``: see
    :func:`query_grid` (default ``"surface"``: autograd only through the samples the mesh depends on).

    Returns ``rgb`` ``[B, N, H, W, 3]``, ``alpha`` ``[B, N, H, W]``, ``mesh_mask`` ``[B]`` (False: the field had no
    surface and the asset rendered transparent), ``sdf`` ``[B, G, G, G]`` (the unpadded grid; for regularisers on
    all of it pass ``grad_samples="all"``), and per asset ``verts``/``faces``/``colors`` (empty for a masked asset).
    """
    if isinstance(cameras, Cameras):
        if batch_size is None:
            raise ValueError("batch_size is required when one Cameras is shared by all assets")
        B = batch_size
    else:
        B = len(cameras)
        if batch_size is not None and batch_size != B:
            raise ValueError(f"batch_size={batch_size} but {B} Cameras were given (one per asset)")
    device = cameras.device if isinstance(cameras, Cameras) else cameras[0].device

    sdf = query_grid(sdf_fn, B, grid_size, bounds, chunk=chunk, device=device, narrow_band=narrow_band,
                     grad_samples=grad_samples)  # [B, G, G, G]
    raw = extract_meshes(sdf, bounds)
    meshes, mesh_mask = replace_empty_meshes(raw, sdf)
    verts_list = [v for v, _ in meshes]
    faces_list = [f for _, f in meshes]
    # Dummy triangles are coloured by the field too, so the colour head also stays in the graph.
    colors_list = query_vertex_colors(rgb_fn, verts_list, chunk=chunk)
    out = render_meshes(verts_list, faces_list, colors_list, cameras, mesh_mask=mesh_mask, **render_kwargs)
    out.update(
        mesh_mask=mesh_mask,
        sdf=sdf,
        verts=[v for v, _ in raw],
        faces=[f for _, f in raw],
        colors=[c if keep else c[:0] for c, keep in zip(colors_list, mesh_mask.tolist())],
    )
    return out


# ---------------------------------------------------------------------------------------- transmitter glue
def transmitter_fields(transmitter, latent: Tensor) -> tuple[SdfFn, RgbFn]:
    """``(sdf_fn, rgb_fn)`` of a :class:`shapee.models.Transmitter` for latents ``[B, ...]`` (decoded once)."""
    params = transmitter.decode_params(latent)

    def sdf_fn(points: Tensor) -> Tensor:
        return transmitter.query(params, points)["sdf"]  # [B, P]

    def rgb_fn(points: Tensor) -> Tensor:
        return transmitter.query(params, points)["stf_rgb"]  # [B, P, 3]

    return sdf_fn, rgb_fn


def render_latents(
    transmitter,
    latent: Tensor,
    cameras: Cameras | Sequence[Cameras],
    *,
    grid_size: int = 128,
    **kwargs,
) -> dict:
    """STF images of latents ``[B, ...]`` through ``transmitter`` (what ``Transmitter.render_stf`` calls).

    ``cameras``: one set shared by all latents or one per latent; ``kwargs`` go to :func:`render_stf`.
    """
    sdf_fn, rgb_fn = transmitter_fields(transmitter, latent)
    batch_size = latent.shape[0] if isinstance(cameras, Cameras) else None
    return render_stf(sdf_fn, rgb_fn, cameras, batch_size=batch_size, grid_size=grid_size, **kwargs)


@torch.no_grad()
def latent_to_mesh(
    transmitter,
    latent: Tensor,
    grid_size: int = 128,
    *,
    bounds: tuple[float, float] = (-1.0, 1.0),
    chunk: int | None | str = "auto",
    narrow_band: bool = True,
) -> "list[trimesh.Trimesh]":
    """Meshes of latents ``[B, ...]`` (or one latent without the batch axis), with sRGB vertex colours.

    ``narrow_band`` (default): the SDF is queried only near its zero level (:func:`query_grid_narrow_band`, the same
    mesh as the dense grid for fields whose slope is at most ~1.15, ~10× faster); ``False`` queries the dense grid.

    The colours are the STF head's sRGB values as 8-bit RGBA (not the linear values the official export writes,
    issue #86, §4.3). Vertices are at true world positions (no 127/129 shrink). A latent without a surface gives an
    empty mesh.
    """
    expected = getattr(getattr(transmitter, "encoder", None), "latent_ctx", None)
    if latent.dim() == 2:
        latent = latent[None]
    if latent.dim() != 3 or (expected is not None and latent.shape[1] != expected):
        rows = expected or "R"
        raise ValueError(f"latent must have shape [B, {rows}, D] or [{rows}, D], got {tuple(latent.shape)}")
    sdf_fn, rgb_fn = transmitter_fields(transmitter, latent)
    sdf = query_grid(sdf_fn, latent.shape[0], grid_size, bounds, chunk=chunk, device=latent.device,
                     narrow_band=narrow_band)  # [B, G, G, G]
    meshes = extract_meshes(sdf, bounds)
    colors = query_vertex_colors(rgb_fn, [v for v, _ in meshes], chunk=chunk)
    return [to_trimesh(verts, faces, rgb) for (verts, faces), rgb in zip(meshes, colors)]


def to_trimesh(verts: Tensor, faces: Tensor, colors: Tensor) -> "trimesh.Trimesh":
    """``verts`` ``[V, 3]``, ``faces`` ``[F, 3]``, sRGB ``colors`` ``[V, 3]`` in [0, 1] → a ``trimesh.Trimesh`` with
    8-bit sRGB RGBA vertex colours, vertex order and count kept (no merging)."""
    import trimesh

    if verts.shape != colors.shape or verts.dim() != 2 or verts.shape[-1] != 3:
        raise ValueError(f"verts and colors must both be [V, 3], got {tuple(verts.shape)} and {tuple(colors.shape)}")
    # Plain numpy on the (small) vertex arrays: no torch op dispatch, and trimesh gets arrays it keeps as they are.
    rgba = np.empty((colors.shape[0], 4), dtype=np.uint8)  # [V, 4]
    rgba[:, :3] = np.rint(colors.detach().float().cpu().numpy().clip(0.0, 1.0) * 255.0)
    rgba[:, 3] = 255
    return trimesh.Trimesh(
        vertices=verts.detach().cpu().numpy().astype(np.float64),
        faces=faces.cpu().numpy().astype(np.int64, copy=False),
        vertex_colors=rgba,
        process=False,  # keep MC's vertex order and count (they are already shared, no merging to do)
        validate=False,
    )
