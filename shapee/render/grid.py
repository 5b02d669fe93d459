"""Parameter-free SDF grids: the field on an ``N³`` grid, dense or in a narrow band around its zero level, and the
"outside" border that closes every Marching Cubes mesh (reference §4.1–4.2).

The grid knows nothing about networks. It asks a per-asset batched *field*

    sdf_fn(points [B, P, 3]) -> sdf [B, P]        (positive inside, DESIGN.md)

for its values at the points ``lo + idx/(N−1)·(hi − lo)`` of ``bounds`` (inclusive), in chunks of points:

* :func:`query_grid`: the dense grid; with ``narrow_band=True`` only near the zero level (coarse-to-fine,
  :func:`query_grid_narrow_band`), which gives the same mesh for ~10× fewer queries;
* :func:`pad_grid`: a border of "outside" values with the bounds widened by one voxel, so that every mesh is closed
  and vertices stay at their true world positions (the official code maps the padded 130³ grid onto the unpadded
  box and shrinks every mesh by 127/129, §4.2 / §8.3.3).

:mod:`shapee.render.mesh` turns the grid into coloured meshes, :mod:`shapee.render.stf` renders them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from shapee.runtime import query_chunk

__all__ = [
    "DEFAULT_GRID_SIZE",
    "SdfFn",
    "RgbFn",
    "grid_points",
    "default_chunk",
    "query_grid",
    "query_grid_narrow_band",
    "pad_grid",
]

# Points per axis of the mesh grids when a caller names none: 128³, as released (reference §4.1). A model with its
# own grid (``Transmitter.stf_grid_size``) passes that instead.
DEFAULT_GRID_SIZE = 128

SdfFn = Callable[[Tensor], Tensor]  # points [B, P, 3] -> sdf [B, P]
RgbFn = Callable[[Tensor], Tensor]  # points [B, P, 3] -> sRGB [B, P, 3]

def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    if len(bounds) != 2 or not float(bounds[1]) > float(bounds[0]):
        raise ValueError(f"bounds must be (lo, hi) with hi > lo, got {bounds}")
    return float(bounds[0]), float(bounds[1])


GPU_GRID_CHUNK = 2**16  # points per grid query call on a GPU ("auto"); the CPU's is runtime.CPU_QUERY_CHUNK


def default_chunk(device: torch.device | str | None) -> int:
    """Points per grid query call that ``chunk="auto"`` means on ``device`` (:func:`shapee.runtime.query_chunk`):
    4096 on CPU, 65536 elsewhere."""
    return query_chunk("auto", device, gpu=GPU_GRID_CHUNK)


def resolve_chunk(chunk: int | None | str, device: torch.device | str | None) -> int | None:
    """``"auto"`` → :func:`default_chunk` of ``device``; a positive int or None (no chunking) as given."""
    return query_chunk(chunk, device, gpu=GPU_GRID_CHUNK)


def chunked(fn: Callable[[Tensor], Tensor], points: Tensor, chunk: int | None) -> Tensor:
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
    grid_size: int = DEFAULT_GRID_SIZE,
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
    whole grid). ``"surface"`` (what :func:`~.stf.render_stf` uses) queries the grid without autograd, then again,
    with autograd, only the samples at the ends of grid edges with a sign change (and on the boundary where > 0, for
    the padding of :func:`~.mesh.extract_meshes`), which are all that Marching Cubes vertices depend on: the same
    values, meshes and gradients w.r.t. the field's parameters for a small part of the activation memory (a 128³ grid
    of the released MLP at batch 4 otherwise needs more than 80 GB). The grid's other samples are constants.
    """
    if grad_samples not in ("surface", "all"):
        raise ValueError(f"grad_samples must be 'surface' or 'all', got {grad_samples!r}")
    if grad_samples == "surface" and torch.is_grad_enabled():
        with torch.no_grad():
            sdf = query_grid(query_fn, batch_size, grid_size, bounds, chunk=chunk, device=device,
                             narrow_band=narrow_band, band_width=band_width, band_dilation=band_dilation)
        return _requery_surface_samples(_checked_sdf(query_fn), sdf, bounds, resolve_chunk(chunk, device))
    if narrow_band:
        return query_grid_narrow_band(query_fn, batch_size, grid_size, bounds, chunk=chunk, device=device,
                                      band_width=band_width, band_dilation=band_dilation)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunk = resolve_chunk(chunk, device)
    points = grid_points(grid_size, bounds, device=device).reshape(1, -1, 3)  # [1, N³, 3]
    points = points.expand(batch_size, -1, -1)  # [B, N³, 3] (a view: one copy of the grid)
    sdf = chunked(_checked_sdf(query_fn), points, chunk)  # [B, N³]
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
    return chunked(query_fn, points, chunk)[b, slot]  # [K]


def query_grid_narrow_band(
    query_fn: SdfFn,
    batch_size: int,
    grid_size: int = DEFAULT_GRID_SIZE,
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
    sample of every cube with a sign change (the cubes of the −1 padding of :func:`~.mesh.extract_meshes` next to
    samples > 0 on the grid boundary included), and the right side of 0 everywhere, hence the same Marching Cubes mesh
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
    chunk = resolve_chunk(chunk, device)
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
    sdf = chunked(checked, grid.reshape(1, -1, 3).expand(batch_size, -1, -1), chunk)  # [B, n³]
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


def pad_grid(
    sdf: Tensor, bounds: tuple[float, float] = (-1.0, 1.0), *, value: float = -1.0
) -> tuple[Tensor, tuple[float, float]]:
    """Pad ``sdf`` ``[B, N, N, N]`` with an outside border → ``[B, N+2, N+2, N+2]`` and its bounds.

    ``value``: the border's value, any value ≤ 0 ("outside"): −1 for the tanh-bounded SDF; a shifted density field
    (density − level) passes its value in empty space, −level.

    The padded grid keeps the voxel size h = (hi − lo)/(N − 1): its bounds are ``(lo − h, hi + h)``, so a sample
    keeps its world position. (The official code pads to 130³ but keeps the bounds (−1, 1): the 127/129 shrink, §4.2.)
    """
    if sdf.dim() != 4 or len(set(sdf.shape[1:])) != 1:
        raise ValueError(f"sdf must be a batch of cubic grids [B, N, N, N], got shape {tuple(sdf.shape)}")
    lo, hi = _check_bounds(bounds)
    h = (hi - lo) / (sdf.shape[-1] - 1)
    return F.pad(sdf, (1, 1, 1, 1, 1, 1), value=value), (lo - h, hi + h)
