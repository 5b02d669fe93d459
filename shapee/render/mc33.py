"""Differentiable Marching Cubes 33 in pure PyTorch (Chernyaev 1995; Lewiner et al. 2003).

The surface is topologically consistent with the trilinear interpolant of the grid (face and interior ambiguities
resolved; tables derived in :mod:`shapee.render.mc33_tables`), watertight for fields that are negative on the grid
boundary, and oriented outward. The whole grid (or a batch of grids) is processed at once: per-cube codes and
ambiguity tests are vectorised, only cubes with a sign change are gathered, and every grid edge with a sign change
gets one vertex shared by all its cubes.

Differentiability (reference §4.2): the topology is discrete; a vertex on a grid edge is the linear zero crossing
``p = p₁ + s₁/(s₁ − s₂)·(p₂ − p₁)`` and an interior vertex is the mean of the crossings of its loop, so gradients
flow from vertex positions into the field values.

Unlike the official code (§4.2, quirk §8.3.3), vertices map onto ``bounds`` with the same spacing the field was
sampled with (``coordinate = lo + idx/(N−1)·(hi − lo)``): no 127/129 shrink.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from shapee.render.mc33_tables import (
    BIT_N02,
    BIT_N13,
    BIT_P02,
    BIT_P13,
    EDGES,
    FACE_CORNERS,
    MAX_CENTERS,
    ZEDGE_BOTTOM,
    ZEDGE_TOP,
    generate_tables,
)

# Corner k = x + 2y + 4z: its offset in the grid.
_CORNER_OFFSETS = [(k & 1, (k >> 1) & 1, (k >> 2) & 1) for k in range(8)]


@lru_cache(maxsize=8)
def _device_tables(device: torch.device) -> dict[str, Tensor]:
    """The generated tables as tensors on ``device`` (moved once per device)."""
    t = generate_tables()
    edge_axis = [next(a for a in range(3) if (b ^ a0) == (1 << a)) for a0, b in EDGES]
    edge_base = [_CORNER_OFFSETS[a0] for a0, _ in EDGES]
    return {
        "case_of_key": torch.as_tensor(t.case_of_key, dtype=torch.int64, device=device),  # [2**18]
        "triangles": torch.as_tensor(t.triangles, device=device),  # [n_cases, T, 3]
        "n_triangles": torch.as_tensor(t.n_triangles, device=device),  # [n_cases]
        "needs_interior": torch.as_tensor(t.needs_interior, device=device),  # [256]
        "centers": torch.as_tensor(t.centers, device=device),  # [n_cases, MAX_CENTERS, 12]
        "n_centers": torch.as_tensor(t.n_centers, device=device),  # [n_cases]
        "face_corners": torch.as_tensor(FACE_CORNERS, device=device),  # [6, 4]
        "zedge_bottom": torch.as_tensor(ZEDGE_BOTTOM, device=device),  # [4]
        "zedge_top": torch.as_tensor(ZEDGE_TOP, device=device),  # [4]
        "edge_axis": torch.tensor(edge_axis, dtype=torch.int64, device=device),  # [12]
        "edge_base": torch.tensor(edge_base, dtype=torch.int64, device=device),  # [12, 3]
        "edge_cross": torch.tensor(
            [[((c >> a0) & 1) != ((c >> b) & 1) for a0, b in EDGES] for c in range(256)], device=device
        ),  # [256, 12]
        "bit_weights": torch.tensor([1 << k for k in range(8)], dtype=torch.int64, device=device),  # [8]
        "face_shift": torch.arange(6, device=device),  # [6]
        "center_slots": torch.arange(MAX_CENTERS, device=device),  # [MAX_CENTERS]
        "triangle_slots": torch.arange(t.triangles.shape[1], device=device),  # [T]
    }


@lru_cache(maxsize=32)
def _grid_constants(
    device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype, bounds: tuple[float, float]
) -> dict[str, Tensor]:
    """Index constants of a grid shape on ``device``, made once (a host-to-device copy is a sync on CUDA)."""
    nx, ny, nz = shape
    lo, hi = bounds
    tab = _device_tables(device)
    strides = torch.tensor([ny * nz, nz, 1], device=device)  # linear index within one grid
    return {
        "strides": strides,
        "corner_lin": torch.tensor([dx * ny * nz + dy * nz + dz for dx, dy, dz in _CORNER_OFFSETS], device=device),
        "edge_base_lin": (tab["edge_base"] * strides).sum(-1),  # [12] base sample of each cube edge, from corner 0
        "axis_step": torch.eye(3, dtype=dtype, device=device),  # [3, 3] unit step along each axis
        "spacing": torch.tensor([(hi - lo) / (n - 1) for n in shape], dtype=dtype, device=device),  # [3]
    }


def _diag_extrema(v0: Tensor, v1: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Max and min over ``t ∈ [lo, hi]`` of the slice decider ``q(t) = v₀(t)v₂(t) − v₁(t)v₃(t)``.

    ``v0``/``v1``: ``[A, 4]`` values of the four z-edges (cyclic order) at the bottom/top of the cube; ``lo``/``hi``:
    ``[A]``. ``q`` is quadratic in ``t``: its extrema on the interval are at the ends or at the vertex.
    """
    d = v1 - v0  # [A, 4] slope of each z-edge
    qa = d[:, 0] * d[:, 2] - d[:, 1] * d[:, 3]
    qb = v0[:, 0] * d[:, 2] + v0[:, 2] * d[:, 0] - v0[:, 1] * d[:, 3] - v0[:, 3] * d[:, 1]
    qc = v0[:, 0] * v0[:, 2] - v0[:, 1] * v0[:, 3]
    safe_a = torch.where(qa == 0, torch.ones_like(qa), qa)
    t_vertex = torch.where(qa == 0, lo, -qb / (2 * safe_a))
    t_vertex = torch.minimum(torch.maximum(t_vertex, lo), hi)
    ts = torch.stack([lo, hi, t_vertex], dim=-1)  # [A, 3]
    q = qa[:, None] * ts * ts + qb[:, None] * ts + qc[:, None]  # [A, 3]
    return q.amax(dim=-1), q.amin(dim=-1)


def cube_keys(values: Tensor) -> Tensor:
    """Table keys of cubes from their corner values.

    Args:
        values: ``[A, 8]`` corner values (corner ``k = x + 2y + 4z``), inside ⇔ value > 0.

    Returns:
        ``[A]`` int64 keys ``config | face_bits << 8 | interior_bits << 14`` (see :mod:`shapee.render.mc33_tables`).
    """
    tab = _device_tables(values.device)
    inside = values > 0  # [A, 8]
    config = (inside.long() * tab["bit_weights"]).sum(-1)  # [A]

    # Face tests (asymptotic decider): the positive diagonal is joined iff its product beats the negative one's.
    # Both cubes sharing a face compute the same two products of the same four numbers, so they agree exactly.
    fv = values[:, tab["face_corners"]]  # [A, 6, 4]
    fin = inside[:, tab["face_corners"]]  # [A, 6, 4]
    ambiguous = (fin[..., 0] == fin[..., 2]) & (fin[..., 1] == fin[..., 3]) & (fin[..., 0] != fin[..., 1])
    prod02 = fv[..., 0] * fv[..., 2]
    prod13 = fv[..., 1] * fv[..., 3]
    pos_joined = torch.where(fin[..., 0], prod02 > prod13, prod13 > prod02) & ambiguous  # [A, 6]
    face_bits = (pos_joined.long() << tab["face_shift"]).sum(-1)  # [A]

    key = config | (face_bits << 8)
    # Interior test, only for the configs whose triangulation can depend on it. Gathering them costs one sync but
    # skips the test's ~90 kernel launches in the usual case where no cube needs it (measured on an H100).
    needs = tab["needs_interior"][config].nonzero()[:, 0]  # [A']
    if needs.numel() > 0:
        key[needs] |= _interior_bits(values[needs]) << 14
    return key


def _interior_bits(values: Tensor) -> Tensor:
    """Interior bits of cubes with corner values ``[A, 8]`` → ``[A]`` int64 (see :mod:`shapee.render.mc33_tables`).

    Sweep z = t; on the t-intervals where one diagonal pair of z-edges is positive and the other negative, the slice
    decider q(t) says which pair is joined across the slice.
    """
    tab = _device_tables(values.device)
    v0 = values[:, tab["zedge_bottom"]]  # [A, 4]
    v1 = values[:, tab["zedge_top"]]  # [A, 4]
    pos0, pos1 = v0 > 0, v1 > 0
    denom = torch.where(pos0 != pos1, v0 - v1, torch.ones_like(v0))
    t_cross = (v0 / denom).clamp(0, 1)  # [A, 4] where each z-edge crosses the level
    zero, one = torch.zeros_like(v0), torch.ones_like(v0)
    # Positive interval [plo, phi] of each z-edge; the negative interval is the rest of [0, 1].
    plo = torch.where(pos0, zero, torch.where(pos1, t_cross, one))
    phi = torch.where(pos1, one, torch.where(pos0, t_cross, zero))
    nlo = torch.where(~pos0, zero, torch.where(~pos1, t_cross, one))
    nhi = torch.where(~pos1, one, torch.where(~pos0, t_cross, zero))
    lo02 = torch.stack([plo[:, 0], plo[:, 2], nlo[:, 1], nlo[:, 3]], -1).amax(-1)  # [A] 0, 2 positive; 1, 3 negative
    hi02 = torch.stack([phi[:, 0], phi[:, 2], nhi[:, 1], nhi[:, 3]], -1).amin(-1)
    lo13 = torch.stack([nlo[:, 0], nlo[:, 2], plo[:, 1], plo[:, 3]], -1).amax(-1)  # [A] 1, 3 positive; 0, 2 negative
    hi13 = torch.stack([nhi[:, 0], nhi[:, 2], phi[:, 1], phi[:, 3]], -1).amin(-1)
    qmax02, qmin02 = _diag_extrema(v0, v1, lo02, hi02)
    qmax13, qmin13 = _diag_extrema(v0, v1, lo13, hi13)
    open02, open13 = lo02 < hi02, lo13 < hi13
    return (
        ((open02 & (qmax02 > 0)).long() << BIT_P02)
        | ((open13 & (qmin13 < 0)).long() << BIT_P13)
        | ((open13 & (qmax13 > 0)).long() << BIT_N02)
        | ((open02 & (qmin02 < 0)).long() << BIT_N13)
    )


def _check_inputs(field: Tensor, bounds: tuple[float, float]) -> None:
    """Shape, dtype and bounds checks (no device sync: finiteness is checked by :func:`marching_cubes` later)."""
    if not isinstance(field, Tensor):
        raise TypeError(f"field must be a torch.Tensor, got {type(field).__name__}")
    if field.dim() not in (3, 4):
        raise ValueError(f"field must be [X, Y, Z] or a batch [B, X, Y, Z], got shape {tuple(field.shape)}")
    if min(field.shape[-3:]) < 2:
        raise ValueError(f"field needs at least 2 samples per axis, got shape {tuple(field.shape)}")
    if not field.is_floating_point():
        raise TypeError(f"field must be a floating-point tensor, got {field.dtype}")
    if len(bounds) != 2 or not float(bounds[1]) > float(bounds[0]):
        raise ValueError(f"bounds must be (lo, hi) with hi > lo, got {bounds}")


def marching_cubes(
    field: Tensor, bounds: tuple[float, float] = (-1.0, 1.0)
) -> tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]]:
    """Extract the 0 level set of a scalar field with Marching Cubes 33.

    Args:
        field: ``[X, Y, Z]`` or a batch ``[B, X, Y, Z]`` of values indexed ``[x, y, z]``; inside ⇔ value > 0
            (0 counts as outside), as the SDF head (§4.1). Half precision is computed in float32.
        bounds: ``(lo, hi)``: the grid spans ``[lo, hi]³`` inclusively, sample ``i`` of an axis of ``N`` samples
            sits at ``lo + i/(N−1)·(hi − lo)``.

    Returns:
        For one grid ``(verts [V, 3], faces [F, 3] int64)``; for a batch a list of those. Faces are counter-clockwise
        seen from outside (normals toward decreasing field). ``verts`` is differentiable w.r.t. ``field``. The mesh is
        closed when the field is ≤ 0 on the grid boundary.
    """
    _check_inputs(field, bounds)
    single = field.dim() == 3
    grids = field[None] if single else field  # [B, X, Y, Z]
    if grids.dtype in (torch.float16, torch.bfloat16):
        grids = grids.float()  # marching cubes in fp32 (STYLE rule 8)
    device = grids.device
    tab = _device_tables(device)
    b_count, nx, ny, nz = grids.shape
    shape = (nx, ny, nz)
    n_grid = nx * ny * nz
    lo, hi = float(bounds[0]), float(bounds[1])
    consts = _grid_constants(device, shape, grids.dtype, (lo, hi))
    strides = consts["strides"]
    # On CUDA every data-dependent size is a host sync that stalls the launch queue: the checks below are flags read
    # in one go at the end, with the per-grid counts.
    nonfinite = ~torch.isfinite(grids).all()  # [] bool
    inside = (grids > 0).to(torch.uint8)  # [B, X, Y, Z]

    # 1. Cube configs (corner k = x + 2y + 4z sets bit k), vectorised over all cubes by combining the two corners
    #    along x, then the pairs along y, then the quads along z; keep the cubes with a sign change.
    code = inside[:, :-1] | (inside[:, 1:] << 1)  # [B, X-1, Y, Z]
    code = code[:, :, :-1] | (code[:, :, 1:] << 2)  # [B, X-1, Y-1, Z]
    code = code[..., :-1] | (code[..., 1:] << 4)  # [B, X-1, Y-1, Z-1]
    active = ((code != 0) & (code != 255)).nonzero()  # [A, 4] (b, i, j, k), b-major
    cube_b, cube_ijk = active[:, 0], active[:, 1:]  # [A], [A, 3]
    n_cubes = active.shape[0]

    # 2. Table lookup for the active cubes.
    flat = grids.reshape(-1)
    cube_lin = cube_b * n_grid + (cube_ijk * strides).sum(-1)  # [A] linear index of corner 0
    values = flat[cube_lin[:, None] + consts["corner_lin"]].detach()  # [A, 8]
    key = cube_keys(values)  # [A]
    case = tab["case_of_key"][key]  # [A]
    uncovered = (case < 0).any()  # [] bool: a key the tables do not cover (never, if the generator is right)

    # 3. One vertex per grid edge with a sign change, shared by the (up to 4) active cubes around it. A grid edge is
    #    named by (b, axis, linear index of its base sample); sorting the names groups the vertices by grid.
    edge_cross = tab["edge_cross"][key & 255].reshape(-1)  # [A·12] does the cube's edge e change sign
    edge_name = (cube_lin[:, None] + consts["edge_base_lin"]) * 3 + tab["edge_axis"]  # [A, 12]
    crossing = edge_cross.nonzero()[:, 0]  # [n_crossings] flat (cube, edge) slots
    names, inverse = torch.unique(edge_name.reshape(-1)[crossing], return_inverse=True)  # [E], [n_crossings]
    cube_edge_vid = torch.full((n_cubes * 12,), -1, dtype=torch.int64, device=device)
    cube_edge_vid[crossing] = inverse
    cube_edge_vid = cube_edge_vid.view(n_cubes, 12)  # global edge-vertex ids (−1: no crossing, never referenced)
    edge_axis = names % 3  # [E]
    lin1 = names // 3  # [E] linear index of the base sample (batch included)
    s1 = flat[lin1]  # [E] differentiable gathers
    s2 = flat[lin1 + strides[edge_axis]]
    t = s1 / (s1 - s2)  # [E] one of s1, s2 is > 0 and the other ≤ 0, so s1 ≠ s2
    edge_b = lin1 // n_grid  # [E]
    rem = lin1 % n_grid
    p1 = torch.stack([rem // (ny * nz), (rem // nz) % ny, rem % nz], dim=-1)  # [E, 3] base sample of the edge
    step = consts["axis_step"][edge_axis]  # [E, 3] (one_hot would sync to check its input on CUDA)
    idx_pos = p1.to(grids.dtype) + t[:, None] * step  # [E, 3] in index units
    edge_verts = lo + idx_pos * consts["spacing"]  # [E, 3]

    # 4. Interior vertices: the mean of the crossings listed by the case (long loops, some tubes).
    n_cent = tab["n_centers"][case]  # [A]
    cent_cube, cent_slot = (n_cent[:, None] > tab["center_slots"]).nonzero(as_tuple=True)
    cent_mask = tab["centers"][case[cent_cube], cent_slot]  # [C, 12] (cube-major order, so grouped by grid)
    cent_pts = edge_verts[cube_edge_vid[cent_cube].clamp(min=0)]  # [C, 12, 3]
    w = cent_mask.to(grids.dtype)[..., None]  # [C, 12, 1]
    center_verts = (cent_pts * w).sum(1) / w.sum(1)  # [C, 3]

    # 5. Per-grid vertex numbering: [edge vertices of grid b, interior vertices of grid b]. Counts by index_add
    #    (bincount would sync for its size).
    counts = torch.zeros(3, b_count, dtype=torch.int64, device=device)  # edge verts, centre verts, faces per grid
    cb = cube_b[cent_cube]  # [C]
    counts[0].index_add_(0, edge_b, torch.ones_like(edge_b))
    counts[1].index_add_(0, cb, torch.ones_like(cb))
    n_edge_b, n_cent_b = counts[0], counts[1]
    edge_start = torch.cumsum(n_edge_b, 0) - n_edge_b  # [B]
    cent_start = torch.cumsum(n_cent_b, 0) - n_cent_b  # [B]
    local_vid = torch.full((n_cubes, 12 + MAX_CENTERS), -1, dtype=torch.int64, device=device)
    local_vid[:, :12] = cube_edge_vid - edge_start[cube_b, None]
    cent_global = torch.arange(cent_cube.numel(), device=device)
    local_vid[cent_cube, 12 + cent_slot] = n_edge_b[cb] + cent_global - cent_start[cb]

    # 6. Faces: look the triangles up (only the used slots) and re-index them into each grid's vertex list.
    used = tab["triangle_slots"] < tab["n_triangles"][case][:, None]  # [A, T]
    face_cube, face_slot = used.nonzero(as_tuple=True)  # [F] cube-major, slots in order
    tri = tab["triangles"][case[face_cube], face_slot]  # [F, 3] local ids
    faces = local_vid[face_cube[:, None], tri]  # [F, 3]
    fb = cube_b[face_cube]  # [F]
    counts[2].index_add_(0, fb, torch.ones_like(fb))

    # One sync for the flags and all the sizes.
    info = torch.cat([counts.reshape(-1), torch.stack([nonfinite, uncovered]).long()]).tolist()
    if info[-2]:
        raise ValueError("field contains NaN or infinite values")
    if info[-1]:
        raise AssertionError("marching_cubes: a cube formed a key that the MC33 tables do not cover")
    n_edge_l, n_cent_l, n_face_l = (info[i * b_count:(i + 1) * b_count] for i in range(3))
    edge_split = edge_verts.split(n_edge_l)
    cent_split = center_verts.split(n_cent_l)
    face_split = faces.split(n_face_l)
    meshes = [(torch.cat([e, c], dim=0), f) for e, c, f in zip(edge_split, cent_split, face_split)]
    return meshes[0] if single else meshes
