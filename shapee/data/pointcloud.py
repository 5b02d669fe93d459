"""Coloured point clouds from rendered views (reference §6.3).

Recipe: back-project every pixel of the (default 40) albedo views that has finite depth and alpha = 1, duplicate
with 1e-4 jitter if there are fewer than ``n_points`` of them, keep a random subset of candidates, pick
``n_points`` of them by farthest point sampling (random start), and give each picked point the mean colour of the
candidates whose nearest picked point it is ("neighbour colour averaging"). The cloud is stored in FPS order:
every prefix is itself a well-spread cloud.

The official recipe keeps 2¹⁹ candidates. FPS costs O(candidates · n_points), which is fine on a GPU but seconds
on a CPU, so the candidate count defaults to 2¹⁹ on CUDA and 2¹⁶ on CPU.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import Tensor

from shapee.cameras import Cameras

CANDIDATES_CUDA = 2**19  # the official recipe
CANDIDATES_CPU = 2**16  # FPS of 16,384 points out of 2^16 candidates: ~1.5 s of one CPU core
JITTER = 1e-4  # standard deviation of the jitter of duplicated points (world units)


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
    if n_points < 1:
        raise ValueError(f"n_points must be positive, got {n_points}")
    if n_candidates is None:
        n_candidates = CANDIDATES_CUDA if device.type == "cuda" else CANDIDATES_CPU
    if n_candidates < n_points:
        raise ValueError(f"n_candidates ({n_candidates}) must be at least n_points ({n_points})")

    # 1. Surface pixels: finite depth and full coverage (§6.3 uses alpha ≥ 1 − 1e-5).
    valid = torch.isfinite(depth_t) & (alpha_t >= 1.0 - 1e-5)  # [N, H, W]
    xyz = cameras.to(dtype=torch.float32).depth_to_points(torch.where(valid, depth_t, 0.0))[valid]  # [M, 3]
    rgb = albedo_t[valid]  # [M, 3]
    if xyz.shape[0] == 0:
        raise ValueError("the views show no surface (no pixel with finite depth and alpha = 1)")

    # 2. Too few points: repeat them, jittering every copy but the first.
    if xyz.shape[0] < n_points:
        copies = math.ceil(n_points / xyz.shape[0])
        jitter = JITTER * _randn((copies - 1) * xyz.shape[0], 3, generator=generator, device=device)
        xyz = torch.cat([xyz, xyz.repeat(copies - 1, 1) + jitter])  # [M·copies, 3]
        rgb = rgb.repeat(copies, 1)

    # 3. A random subset of candidates keeps FPS affordable.
    if xyz.shape[0] > n_candidates:
        keep = _randperm(xyz.shape[0], generator=generator, device=device)[:n_candidates]  # [C]
        xyz, rgb = xyz[keep], rgb[keep]

    # 4. FPS, then each candidate's colour goes to its nearest selected point.
    start = int(_randint(xyz.shape[0], generator=generator))
    selected = farthest_point_sampling(xyz, n_points, start=start)  # [n_points]
    rgb_out = average_into_nearest(xyz, rgb, selected)  # [n_points, 3]
    xyz_out = xyz[selected]  # [n_points, 3]
    if as_numpy:
        return xyz_out.cpu().numpy(), rgb_out.cpu().numpy()
    return xyz_out, rgb_out


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
    ``"torch"`` (a loop of a few fused tensor ops per pick; the faster one on CPU), ``"pytorch3d"``
    (``pytorch3d.ops.sample_farthest_points``: a dedicated kernel, the faster one on CUDA), ``"auto"``.
    """
    points = torch.as_tensor(points)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must have shape [P, D] with P > 0, got {list(points.shape)}")
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"k must be in [1, {points.shape[0]}] (the number of points), got {k}")
    if not 0 <= start < points.shape[0]:
        raise ValueError(f"start must be in [0, {points.shape[0]}), got {start}")
    if method not in ("auto", "torch", "pytorch3d"):
        raise ValueError(f"method must be 'auto', 'torch' or 'pytorch3d', got {method!r}")
    if method == "auto":
        method = "pytorch3d" if points.device.type == "cuda" else "torch"
    if method == "pytorch3d":
        return _fps_pytorch3d(points, k, start)
    return _fps_torch(points, k, start)


def _fps_pytorch3d(points: Tensor, k: int, start: int) -> Tensor:
    from pytorch3d.ops import sample_farthest_points

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
    with _single_cpu_thread(device):
        for _ in range(k - 1):
            query = queries[last][None].contiguous()  # [1, D+2]
            torch.mm(query, keys, out=dist)  # [1, P'] squared distances to the newest pick
            torch.minimum(min_dist, dist[0], out=min_dist)
            min_dist[last] = -float("inf")  # a pick is never picked again, even among exact duplicates
            best_row = torch.argmax(min_grid.amax(1))  # []
            last = best_row * block + torch.argmax(min_grid[best_row])  # []
            picks.append(last)
    return torch.stack(picks)


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device):
    """Run tiny CPU ops on one thread: with OpenMP on a busy machine, 65k-element ops get 10× slower, not faster."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- colour averaging
def nearest_index(queries: Tensor, points: Tensor) -> Tensor:
    """For each of ``queries`` ``[Q, 3]``, the index of its nearest neighbour among ``points`` ``[P, 3]``: ``[Q]``."""
    if queries.device.type == "cpu":
        # A k-d tree is far faster than brute force on CPU; PyTorch3D's KNN kernel is the fast one on CUDA.
        from scipy.spatial import cKDTree

        _, idx = cKDTree(points.double().numpy()).query(queries.double().numpy(), k=1)
        return torch.from_numpy(np.asarray(idx, dtype=np.int64))
    from pytorch3d.ops import knn_points

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
