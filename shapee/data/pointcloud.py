"""Coloured point clouds from rendered views (reference §6.3).

Recipe: back-project every pixel of the (default 40) albedo views that has finite depth and alpha = 1, duplicate
with 1e-4 jitter if there are fewer than ``n_points`` of them, keep a random subset of candidates, pick
``n_points`` of them by farthest point sampling (random start), and give each picked point the mean colour of the
candidates whose nearest picked point it is ("neighbour colour averaging"). The cloud is stored in FPS order:
every prefix is itself a well-spread cloud.

:func:`point_cloud_from_views` follows the recipe on images; :func:`point_cloud_from_fragments` gives the same
cloud from the rasteriser's fragments without making the images: only the pixels the random subset keeps (2¹⁶ of
~7·10⁵ at the defaults) are back-projected and given an albedo.

The official recipe keeps 2¹⁹ candidates. Brute-force FPS costs O(candidates · n_points), which is fine on a GPU
but seconds on a CPU, so the candidate count defaults to 2¹⁹ on CUDA and 2¹⁶ on CPU, and the CPU runs an exact FPS
that skips most of that work (:func:`farthest_point_sampling`, ``method="buckets"``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pytorch3d.ops import knn_points, sample_farthest_points
from scipy.spatial import cKDTree
from torch import Tensor

from shapee.cameras import Cameras
from shapee.data.mesh import Mesh
from shapee.data.render import Fragments, shade_hits, single_cpu_thread

CANDIDATES_CUDA = 2**19  # the official recipe
# Exact FPS of 16,384 points out of 2^16 candidates: ~0.4 s of one CPU core ("buckets"); 2^15 would save 0.06 s
# but leave the 16,384 points' covering radius of the surface 38 % larger, 2^17 costs 0.1 s more for 14 % smaller.
CANDIDATES_CPU = 2**16
JITTER = 1e-4  # standard deviation of the jitter of duplicated points (world units)
FPS_METHODS = ("auto", "buckets", "torch", "pytorch3d")


def point_cloud_from_views(
    albedo: np.ndarray | Tensor,
    alpha: np.ndarray | Tensor,
    depth: np.ndarray | Tensor,
    cameras: Cameras,
    n_points: int = 16384,
    n_candidates: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray] | tuple[Tensor, Tensor]:
    """Back-project views into an FPS-ordered coloured point cloud.

    ``albedo`` ``[N, H, W, 3]`` flat sRGB in [0, 1], ``alpha`` ``[N, H, W]``, ``depth`` ``[N, H, W]`` planar depth
    (+inf on the background), ``cameras`` the ``N`` cameras that rendered them. Work happens on
    ``cameras.device``; ``n_candidates`` defaults to 2¹⁹ on CUDA and 2¹⁶ on CPU. ``generator`` (a CPU
    ``torch.Generator``) seeds the candidate subset, the jitter and the FPS start point.

    Returns ``(xyz [n_points, 3], rgb [n_points, 3])`` float32, ``rgb`` in [0, 1], in FPS order: numpy arrays if
    ``albedo`` is a numpy array, else tensors on ``cameras.device``.
    """
    as_numpy = isinstance(albedo, np.ndarray)
    device = cameras.device
    albedo_t = torch.as_tensor(albedo, device=device, dtype=torch.float32)
    alpha_t = torch.as_tensor(alpha, device=device, dtype=torch.float32)
    depth_t = torch.as_tensor(depth, device=device, dtype=torch.float32)
    n, h, w = len(cameras), cameras.height, cameras.width
    for name, value, shape in (
        ("albedo", albedo_t, (n, h, w, 3)),
        ("alpha", alpha_t, (n, h, w)),
        ("depth", depth_t, (n, h, w)),
    ):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} to match the cameras, got {list(value.shape)}")
    n_candidates = _check_counts(n_points, n_candidates, device)

    with single_cpu_thread(device):  # a few ops on ~10⁶ values each: more threads only add overhead
        # 1. Surface pixels: finite depth and full coverage (§6.3 uses alpha ≥ 1 − 1e-5).
        view, row, col = (torch.isfinite(depth_t) & (alpha_t >= 1.0 - 1e-5)).nonzero(as_tuple=True)  # [M] each

        def candidates(index: Tensor) -> tuple[Tensor, Tensor]:  # [C] → xyz, rgb [C, 3] of those pixels
            v, r, c = view[index], row[index], col[index]
            return _back_project(cameras, depth_t[v, r, c], v, r, c), albedo_t[v, r, c]

        xyz, rgb = _sample_cloud(view.shape[0], candidates, n_points, n_candidates, generator, device)
    if as_numpy:
        return xyz.cpu().numpy(), rgb.cpu().numpy()
    return xyz, rgb


def point_cloud_from_fragments(
    mesh: Mesh,
    cameras: Cameras,
    fragments: Fragments,
    n_points: int = 16384,
    n_candidates: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`point_cloud_from_views` of the views that :func:`~shapee.data.render.shade` would make of
    ``fragments`` (``mesh`` seen by ``cameras``), without making them: the same cloud, but only the candidates
    that the random subset keeps (2¹⁶ of ~7·10⁵ surface pixels at the defaults) get an albedo and a depth.

    Returns ``(xyz, rgb)`` ``[n_points, 3]`` float32 numpy arrays.
    """
    n, h, w = fragments.shape
    if len(cameras) != n or (cameras.height, cameras.width) != (h, w):
        raise ValueError(f"cameras ({len(cameras)} of {cameras.height}×{cameras.width}) do not match the fragments "
                         f"({n} views of {h}×{w})")
    device = cameras.device
    n_candidates = _check_counts(n_points, n_candidates, device)

    def candidates(index: Tensor) -> tuple[Tensor, Tensor]:  # [C] → xyz, rgb [C, 3] of those fragments
        i = index.cpu().numpy()
        kept = Fragments(fragments.shape, fragments.pixel[i], fragments.face[i], fragments.bary[i])
        hits = shade_hits(mesh, cameras, kept, outputs=("albedo", "depth"))  # [C, 3], [C]
        view, rest = np.divmod(kept.pixel, h * w)
        v, r, c = (torch.from_numpy(t).to(device) for t in (view, *np.divmod(rest, w)))  # [C] each
        depth = torch.from_numpy(hits["depth"]).to(device)  # [C]
        return _back_project(cameras, depth, v, r, c), torch.from_numpy(hits["albedo"]).to(device)

    with single_cpu_thread(device):
        xyz, rgb = _sample_cloud(len(fragments.pixel), candidates, n_points, n_candidates, generator, device)
    return xyz.cpu().numpy(), rgb.cpu().numpy()


def _check_counts(n_points: int, n_candidates: int | None, device: torch.device) -> int:
    """``n_candidates`` (its device-dependent default if None), after checking both counts."""
    if n_points < 1:
        raise ValueError(f"n_points must be positive, got {n_points}")
    if n_candidates is None:
        n_candidates = CANDIDATES_CUDA if device.type == "cuda" else CANDIDATES_CPU
    if n_candidates < n_points:
        raise ValueError(f"n_candidates ({n_candidates}) must be at least n_points ({n_points})")
    return n_candidates


def _back_project(cameras: Cameras, depth: Tensor, view: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """World points ``[C, 3]`` of pixels (``[C]`` each) at planar ``depth`` ``[C]``: p = o + r · d / (r · z)."""
    cameras = cameras.to(dtype=torch.float32)
    origins, directions = cameras.pixel_rays(view, row, col)  # [C, 3] each, unit directions
    distance = depth / (directions * cameras.z[view]).sum(-1)  # [C] along the ray
    return origins + directions * distance[:, None]


def _sample_cloud(
    count: int,
    candidates,
    n_points: int,
    n_candidates: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Steps 2–4 of the recipe on ``count`` surface pixels; ``candidates(index [C])`` gives ``(xyz, rgb)``
    ``[C, 3]`` of the chosen ones, so that only the pixels the random subset keeps are ever back-projected.

    Returns the FPS-ordered ``(xyz, rgb)`` ``[n_points, 3]`` on ``device``.
    """
    if count == 0:
        raise ValueError("the views show no surface (no pixel with finite depth and alpha = 1)")
    if count < n_points:
        # 2. Too few points: repeat them, jittering every copy but the first.
        xyz, rgb = candidates(torch.arange(count, device=device))  # [M, 3] each
        copies = math.ceil(n_points / count)
        jitter = JITTER * _randn((copies - 1) * count, 3, generator=generator, device=device)
        xyz = torch.cat([xyz, xyz.repeat(copies - 1, 1) + jitter])  # [M·copies, 3]
        rgb = rgb.repeat(copies, 1)
        if xyz.shape[0] > n_candidates:  # 3. (as below)
            keep = _randperm(xyz.shape[0], generator=generator, device=device)[:n_candidates]  # [C]
            xyz, rgb = xyz[keep], rgb[keep]
    elif count > n_candidates:
        # 3. A random subset of candidates keeps FPS affordable.
        xyz, rgb = candidates(_randperm(count, generator=generator, device=device)[:n_candidates])  # [C, 3] each
    else:
        xyz, rgb = candidates(torch.arange(count, device=device))

    # 4. FPS, then each candidate's colour goes to its nearest selected point.
    start = int(_randint(xyz.shape[0], generator=generator))
    selected = farthest_point_sampling(xyz, n_points, start=start)  # [n_points]
    return xyz[selected], average_into_nearest(xyz, rgb, selected)


# ------------------------------------------------------------------------------------- farthest point sampling
def farthest_point_sampling(
    points: Tensor | np.ndarray,
    k: int,
    *,
    start: int = 0,
    method: str = "auto",
) -> Tensor:
    """Indices ``[k]`` (int64, on ``points``' device) of ``k`` farthest-point samples of ``points`` ``[P, D]``.

    Index 0 is ``start``; each next one is the point farthest (Euclidean) from all previous ones. ``method``:

    * ``"buckets"``: exact FPS on the CPU that only updates the points a new pick can bring closer (numpy,
      :func:`_fps_buckets`); 4× faster than ``"torch"`` at 16,384 of 2¹⁶ points, and exact to float32 rounding;
    * ``"torch"``: ``k`` iterations of a few fused tensor ops over all points (no host sync: queues well on CUDA);
    * ``"pytorch3d"``: ``pytorch3d.ops.sample_farthest_points``, a dedicated kernel: the fast one on CUDA;
    * ``"auto"``: ``"pytorch3d"`` on CUDA, ``"buckets"`` otherwise.

    Exact ties (duplicate points) may be broken differently by different methods.
    """
    points = torch.as_tensor(points)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must have shape [P, D] with P > 0, got {list(points.shape)}")
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"k must be in [1, {points.shape[0]}] (the number of points), got {k}")
    if not 0 <= start < points.shape[0]:
        raise ValueError(f"start must be in [0, {points.shape[0]}), got {start}")
    if method not in FPS_METHODS:
        raise ValueError(f"method must be one of {FPS_METHODS}, got {method!r}")
    if method == "auto":
        method = "pytorch3d" if points.device.type == "cuda" else "buckets"
    if method == "pytorch3d":
        return _fps_pytorch3d(points, k, start)
    if method == "buckets":
        picks = _fps_buckets(points.detach().cpu().float().numpy(), k, start)
        return torch.from_numpy(picks).to(points.device)
    return _fps_torch(points, k, start)


def _fps_buckets(points: np.ndarray, k: int, start: int, bucket_size: int = 64) -> np.ndarray:
    """Exact FPS that touches only the points each pick can bring closer: indices ``[k]`` into ``points`` ``[P, D]``.

    Brute force updates the distance of all P points after each pick. But a pick q can only lower the distance
    of a point p where ``|p − q|`` is below p's current distance, so we group the points into ~P/64 compact
    buckets (the leaves of a balanced k-d split) with a bounding sphere (centre c, radius r) and skip every bucket
    with ``|q − c| ≥ r + √(its largest current distance)``. Once the picks are dense, a pick touches a handful of
    buckets: what remains is ~15 small numpy calls per pick. Distances are the float32 ``Σ (p − q)²``.
    """
    p_count, dim = points.shape
    order, n_buckets, size = _kd_buckets(points, bucket_size)  # [B·S], B, S
    slots = order % p_count  # [B·S] the point in each slot
    bucket_points = np.ascontiguousarray(points[slots].reshape(n_buckets, size, dim).transpose(0, 2, 1))  # [B, D, S]
    as64 = bucket_points.astype(np.float64)  # [B, D, S]
    centre = (as64.min(2) + as64.max(2)) / 2  # [B, D]
    radius = np.sqrt(((as64 - centre[:, :, None]) ** 2).sum(1).max(1))  # [B]
    # A relative and an absolute margin keep the skip test below conservative under float32 rounding.
    radius = radius * (1.0 + 1e-5) + 1e-6
    # |q − c|² − |c|² = −2 c·q + |q|²: one matrix-vector product per pick, compared with (reach² − |c|²).
    centre_m2, centre_sq = -2.0 * centre, (centre**2).sum(1)  # [B, D], [B]

    min_dist = np.full((n_buckets, size), np.inf, dtype=np.float32)  # [B, S] squared distance to the picks
    flat_dist = min_dist.reshape(-1)  # [B·S], a view
    flat_dist[order >= p_count] = -np.inf  # the repeated points that fill the last slots are never picked
    bucket_max = min_dist.max(1)  # [B] largest distance in each bucket
    # [B] (r + √bucket_max)² − |c|²: a pick q with |q − c| ≥ r + √bucket_max brings no point of the bucket closer.
    threshold = np.full(n_buckets, np.inf)

    # The loop body runs k times: plain ufunc calls (no numpy Python wrappers), every one on a few values.
    add, maximum, sqrt = np.add.reduce, np.maximum.reduce, np.sqrt
    last = int((order == start).nonzero()[0][0])
    picks = np.empty(k, dtype=np.int64)  # slots
    picks[0] = last
    for i in range(1, k):
        b, s = divmod(last, size)
        q, q64 = bucket_points[b, :, s], as64[b, :, s]  # [D] the newest pick
        flat_dist[last] = -np.inf  # picked: never again, even among exact duplicates
        near = (centre_m2 @ q64 < threshold - q64 @ q64).nonzero()[0]  # [m] buckets it may update
        dist = bucket_points[near]  # [m, D, S]
        dist -= q[:, None]
        dist *= dist
        dist = add(dist, 1)  # [m, S] squared distances to q
        np.minimum(dist, min_dist[near], out=dist)
        min_dist[near] = dist
        top = maximum(dist, 1)  # [m]
        bucket_max[near] = top
        reach = radius[near] + sqrt(np.maximum(top, 0.0)) * (1.0 + 1e-5)  # [m]
        threshold[near] = reach * reach - centre_sq[near]
        b = int(bucket_max.argmax())
        last = b * size + int(min_dist[b].argmax())
        picks[i] = last
    return slots[picks]


def _kd_buckets(points: np.ndarray, bucket_size: int) -> tuple[np.ndarray, int, int]:
    """Balanced k-d split of ``points`` ``[P, D]`` into ``B = 2^L`` buckets of ``S`` slots, S in
    [bucket_size, 2·bucket_size) (or S = P when P is small): ``(order [B·S], B, S)``. Bucket ``b`` is slots
    ``b·S … b·S + S − 1``; slot ``j`` holds point ``order[j] mod P``, and ``order[j] ≥ P`` marks the ``B·S − P``
    slots that repeat a point to fill the buckets (they land next to their twin, so they widen no bucket).

    Every level halves each group at the median of its widest axis (one vectorised argpartition per level).
    """
    p_count = points.shape[0]
    levels = max(0, int(math.log2(max(p_count // bucket_size, 1))))
    n_buckets = 1 << levels
    size = -(-p_count // n_buckets)
    order = np.arange(n_buckets * size)  # [B·S]
    for level in range(levels):
        groups = order.reshape(1 << level, -1)  # [G, N_g] the current groups, N_g even
        coords = points[groups % p_count]  # [G, N_g, D]
        axis = (coords.max(1) - coords.min(1)).argmax(1)  # [G] the widest axis of each group
        values = np.take_along_axis(coords, axis[:, None, None], axis=2)[..., 0]  # [G, N_g]
        halves = np.argpartition(values, groups.shape[1] // 2, axis=1)  # lower half first
        order = np.take_along_axis(groups, halves, axis=1).reshape(-1)
    return order, n_buckets, size


def _fps_pytorch3d(points: Tensor, k: int, start: int) -> Tensor:
    # The kernel always starts at index 0 (or a random one): roll the points so that `start` comes first.
    order = torch.roll(torch.arange(points.shape[0], device=points.device), -start)  # [P]
    _, idx = sample_farthest_points(points[order][None].float(), K=k, random_start_point=False)  # [1, k]
    return order[idx[0]]


def _fps_torch(points: Tensor, k: int, start: int) -> Tensor:
    """FPS as ``k`` iterations of a handful of tensor ops (no host sync, so it also queues well on CUDA).

    Squared distances to the newest pick come from one matrix product with augmented coordinates,
    ``|p − q|² = [p, |p|², 1] · [−2q, 1, |q|²]``, and the arg-max over the running minimum is taken in two
    levels (max per block, then inside the best block), which is several times faster than a flat ``argmax``
    on CPU.
    """
    p_count = points.shape[0]
    device = points.device
    p = points.float()
    p = p - p.mean(0)  # centring shrinks |p|², hence the cancellation error of the expanded distance
    sq = (p * p).sum(-1, keepdim=True)  # [P, 1]
    ones = torch.ones_like(sq)
    block = max(16, int(math.isqrt(p_count)))
    rows = -(-p_count // block)
    pad = rows * block - p_count
    # Rows of `keys` multiply the query rows of `queries`; padding columns are zero and never win (min = −inf).
    keys = torch.nn.functional.pad(torch.cat([p, sq, ones], -1), (0, 0, 0, pad)).T.contiguous()  # [D+2, P']
    queries = torch.cat([-2.0 * p, ones, sq], -1)  # [P, D+2]
    min_dist = torch.full((rows * block,), float("inf"), device=device)  # [P'] squared distance to the picks
    min_dist[p_count:] = -float("inf")
    min_grid = min_dist.view(rows, block)  # [rows, block], a view
    dist = torch.empty(1, rows * block, device=device)  # [1, P']

    last = torch.tensor(start, device=device)
    picks = [last]
    with single_cpu_thread(device):
        for _ in range(k - 1):
            query = queries[last][None].contiguous()  # [1, D+2]
            torch.mm(query, keys, out=dist)  # [1, P'] squared distances to the newest pick
            torch.minimum(min_dist, dist[0], out=min_dist)
            min_dist[last] = -float("inf")  # a pick is never picked again, even among exact duplicates
            best_row = torch.argmax(min_grid.amax(1))  # []
            last = best_row * block + torch.argmax(min_grid[best_row])  # []
            picks.append(last)
    return torch.stack(picks)


# ---------------------------------------------------------------------------------------- colour averaging
def nearest_index(queries: Tensor, points: Tensor) -> Tensor:
    """For each of ``queries`` ``[Q, 3]``, the index of its nearest neighbour among ``points`` ``[P, 3]``: ``[Q]``."""
    if queries.device.type == "cpu":
        # A k-d tree is far faster than brute force on CPU; PyTorch3D's KNN kernel is the fast one on CUDA.
        _, idx = cKDTree(points.double().numpy()).query(queries.double().numpy(), k=1)
        return torch.from_numpy(np.asarray(idx, dtype=np.int64))
    return knn_points(queries[None].float(), points[None].float(), K=1).idx[0, :, 0]


def average_into_nearest(points: Tensor, colors: Tensor, selected: Tensor) -> Tensor:
    """Neighbour colour averaging (§6.3): the mean colour ``[S, C]`` of the ``points`` ``[P, 3]`` (colours
    ``[P, C]``) whose nearest selected point is each of ``selected`` ``[S]`` (indices into ``points``).

    A selected point always owns itself unless an exact duplicate took it over; such a point keeps its own colour.
    """
    owner = nearest_index(points, points[selected]).to(points.device)  # [P] index into selected
    sums = torch.zeros(selected.shape[0], colors.shape[1], device=colors.device, dtype=torch.float64)
    sums.index_add_(0, owner, colors.double())  # [S, C]
    counts = torch.bincount(owner, minlength=selected.shape[0]).to(sums.dtype)[:, None]  # [S, 1]
    mean = torch.where(counts > 0, sums / counts.clamp_min(1.0), colors[selected].double())  # [S, C]
    return mean.to(colors.dtype)


# ------------------------------------------------------------------------------------------ seeded randomness
# Draw on the generator's device (CPU by default), then move: works with a CPU generator for CUDA work too.
def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _randn(*shape: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randn(*shape, generator=generator, device=_gen_device(generator)).to(device)


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.randperm(n, generator=generator, device=_gen_device(generator)).to(device)


def _randint(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(n, (), generator=generator, device=_gen_device(generator))
