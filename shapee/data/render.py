"""Render dataset views of a :class:`~shapee.data.mesh.Mesh`: shaded RGB, flat albedo, alpha, depth, normals.

This replaces the official Blender "basic" renders (reference §6.2): flat albedo (emission of the base colour),
lit by ``0.3 + 0.7 · |n · L|`` in linear space (:func:`shapee.render.lighting.shade_basic`), on black, binary
alpha, planar depth. Two interchangeable backends find the first surface hit of every pixel:

* ``"embree"``: CPU ray casting of the pixel rays of our camera convention (corner-aligned, as
  :meth:`Cameras.pixel_rays`) with Embree (``embreex``, the library behind trimesh's ray queries); first hit,
  triangle id and barycentrics per ray.
* ``"pytorch3d"``: PyTorch3D rasterisation with the cameras of :func:`shapee.cameras.to_pytorch3d` (the only
  conversion), one face per pixel, perspective-correct (true 3-D) barycentrics. Fast on CUDA; on CPU it runs the
  naive rasteriser and is slow.

Both produce :class:`Fragments` (face index and barycentrics of each pixel that sees the mesh) that go through one
shared shading step (albedo, face normal, lighting, planar depth of the barycentric surface point), so the two
backends give the same images up to which of two faces owns a pixel on their shared edge.

Speed matters here: data preparation renders 80 views of 256² per asset, on a CPU by default. Embree casts only the
pixels inside each view's projected bounding rectangle of the mesh, fragments are kept for hit pixels only, and
shading computes only the ``outputs`` asked for (the point-cloud views need albedo and depth, not lighting).
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from embreex import rtcore_scene
from embreex.mesh_construction import TriangleMesh
from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
from pytorch3d.structures import Meshes
from scipy.spatial import ConvexHull, QhullError
from torch import Tensor

from shapee.cameras import Cameras, to_pytorch3d
from shapee.data.mesh import Mesh
from shapee.render.lighting import LIGHT_DIRECTION, shade_basic
from shapee.render.raster import rasterize_with_bin_fallback

BACKENDS = ("auto", "embree", "pytorch3d")
OUTPUTS = ("rgb", "albedo", "alpha", "depth", "normals", "face_index")
# Ray culling projects every vertex into every view; above this many vertices, only the convex hull's (Qhull costs
# about as much as projecting ~10k vertices into 80 views, and a large scanned mesh has few vertices on its hull).
HULL_ABOVE_VERTICES = 20_000


def render_views(
    mesh: Mesh,
    cameras: Cameras,
    backend: str = "auto",
    outputs: tuple[str, ...] | list[str] = OUTPUTS,
) -> dict[str, np.ndarray]:
    """Render ``mesh`` from each of the ``N`` ``cameras`` (``H × W`` = ``cameras.height × cameras.width``).

    ``backend``: ``"embree"`` (CPU ray casting), ``"pytorch3d"`` (rasterisation on ``cameras.device``), or
    ``"auto"``: PyTorch3D when the cameras live on a CUDA device, Embree otherwise. ``outputs``: which of the
    arrays below to compute (default: all).

    Returns numpy float32 arrays (background: black / 0 / +inf / -1):

    * ``rgb`` ``[N, H, W, 3]``: sRGB shaded with the basic lighting; ``albedo`` ``[N, H, W, 3]``: flat sRGB albedo;
    * ``alpha`` ``[N, H, W]`` in {0, 1}; ``depth`` ``[N, H, W]``: planar depth along each camera's ``z``;
    * ``normals`` ``[N, H, W, 3]``: world-space unit face normals turned toward the camera (two-sided);
    * ``face_index`` ``[N, H, W]`` int64: the face seen at each pixel.
    """
    outputs = _check_outputs(outputs)
    return shade(mesh, cameras, rasterize(mesh, cameras, backend), outputs=outputs)


def resolve_backend(backend: str, cameras: Cameras) -> str:
    """The concrete backend for ``backend`` (``"auto"`` → ``"pytorch3d"`` on CUDA, else ``"embree"``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pytorch3d" if cameras.device.type == "cuda" else "embree"
    return backend


def _check_mesh(mesh: Mesh) -> None:
    if mesh.faces.ndim != 2 or mesh.faces.shape[1] != 3 or len(mesh.faces) == 0:
        raise ValueError(f"mesh.faces must have shape [F, 3] with F > 0, got {mesh.faces.shape} ({mesh.source!r})")
    if mesh.vertices.ndim != 2 or mesh.vertices.shape[1] != 3:
        raise ValueError(f"mesh.vertices must have shape [V, 3], got {mesh.vertices.shape} ({mesh.source!r})")
    if mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices):
        raise ValueError(f"mesh.faces index out of range [0, {len(mesh.vertices)}) ({mesh.source!r})")
    if not np.isfinite(mesh.vertices).all():
        raise ValueError(f"mesh.vertices contain NaN or inf ({mesh.source!r})")


def _check_outputs(outputs: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    if not outputs or any(o not in OUTPUTS for o in outputs):
        raise ValueError(f"outputs must be a non-empty subset of {OUTPUTS}, got {outputs!r}")
    return outputs


@contextlib.contextmanager
def single_cpu_thread(device: torch.device | str = "cpu"):
    """Run CPU torch ops on one thread inside the block (a no-op for other devices).

    Elementwise ops on a few million values are memory-bound: on a busy machine OpenMP's extra threads mostly
    wait, and cost 3-4× the CPU time of one thread (measured on :func:`shade_basic` of 700k pixels). Data
    preparation gets its parallelism from worker processes instead.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------- fragments
@dataclass
class Fragments:
    """The pixels of ``N`` views of ``H × W`` that see the mesh: which face, and where on it.

    ``pixel`` ``[K]`` int64: increasing flat indices into ``[N, H, W]``; ``face`` ``[K]`` int64; ``bary``
    ``[K, 3]`` float32 barycentrics of the surface point on that face. Misses are simply absent.
    """

    shape: tuple[int, int, int]  # (N, H, W)
    pixel: np.ndarray  # [K]
    face: np.ndarray  # [K]
    bary: np.ndarray  # [K, 3]

    @classmethod
    def from_dense(cls, face_index: np.ndarray, bary: np.ndarray) -> "Fragments":
        """From ``face_index`` ``[N, H, W]`` (-1: miss) and ``bary`` ``[N, H, W, 3]``."""
        face_index, bary = np.asarray(face_index), np.asarray(bary)
        if face_index.ndim != 3 or bary.shape != (*face_index.shape, 3):
            raise ValueError(f"face_index must be [N, H, W] and bary [N, H, W, 3], got {face_index.shape} and "
                             f"{bary.shape}")
        flat = face_index.reshape(-1)
        pixel = np.flatnonzero(flat >= 0)  # [K]
        return cls(tuple(face_index.shape), pixel, np.take(flat, pixel).astype(np.int64),
                   np.take(bary.reshape(-1, 3), pixel, axis=0).astype(np.float32))

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """``face_index`` ``[N, H, W]`` int64 (-1: miss) and ``bary`` ``[N, H, W, 3]`` float32 (0 on misses)."""
        n, h, w = self.shape
        face_index = np.full(n * h * w, -1, dtype=np.int64)
        face_index[self.pixel] = self.face
        bary = np.zeros((n * h * w, 3), dtype=np.float32)
        bary[self.pixel] = self.bary
        return face_index.reshape(n, h, w), bary.reshape(n, h, w, 3)

    def views(self, start: int, stop: int) -> "Fragments":
        """The fragments of views ``start`` to ``stop - 1`` (to shade them with ``cameras[start:stop]``)."""
        n, h, w = self.shape
        start, stop = max(0, start), min(n, stop)
        if start >= stop:
            raise ValueError(f"views({start}, {stop}): empty range of the {n} views")
        lo, hi = np.searchsorted(self.pixel, [start * h * w, stop * h * w])  # pixels are sorted
        return Fragments((stop - start, h, w), self.pixel[lo:hi] - start * h * w, self.face[lo:hi],
                         self.bary[lo:hi])


def rasterize(mesh: Mesh, cameras: Cameras, backend: str = "auto") -> Fragments:
    """The :class:`Fragments` of ``mesh`` seen by ``cameras`` with ``backend`` (see :func:`render_views`)."""
    _check_mesh(mesh)
    backend = resolve_backend(backend, cameras)
    if backend == "embree":
        return rasterize_embree(mesh, cameras)
    face_index, bary = rasterize_pytorch3d(mesh, cameras)
    return Fragments.from_dense(face_index.cpu().numpy(), bary.cpu().numpy())


def rasterize_embree(mesh: Mesh, cameras: Cameras) -> Fragments:
    """First hit of every pixel ray by Embree ray casting on the CPU (all rays of all views in one scene).

    Only the pixels inside each view's projected bounding rectangle of the mesh are cast: the others cannot hit
    it (a third to a half of a dataset view's pixels are left to cast).
    """
    # embreex directly rather than trimesh's RayMeshIntersector wrapper: the wrapper re-normalises, rescales and
    # converts every ray between float64 and float32 (≈ 3× the cost of the ray casting itself here), and drops the
    # barycentrics Embree computes anyway. Our meshes live in [-1, 1]³, so its rescaling buys no precision.
    cameras = cameras.to("cpu", torch.float32)
    n, h, w = len(cameras), cameras.height, cameras.width
    view, row, col = _pixels_that_may_hit(mesh, cameras)  # [R] each
    origins, directions = _pixel_rays(cameras, view, row, col)  # [R, 3] each

    scene = rtcore_scene.EmbreeScene()
    TriangleMesh(scene=scene, vertices=mesh.vertices, indices=mesh.faces.astype(np.int32))
    # Embree releases the GIL: cast contiguous slices of the rays on torch's thread count.
    n_chunks = max(1, min(torch.get_num_threads(), len(origins) // 4096))
    with ThreadPoolExecutor(n_chunks) as pool:
        parts = list(pool.map(lambda o, d: scene.run(o, d, output=1),
                              np.array_split(origins, n_chunks), np.array_split(directions, n_chunks)))
    prim = np.concatenate([p["primID"] for p in parts])  # [R] int32, -1 on miss
    hit = np.flatnonzero(prim >= 0)  # [K] into the cast rays
    u = np.concatenate([p["u"] for p in parts])[hit]  # [K]
    v = np.concatenate([p["v"] for p in parts])[hit]  # [K]
    # Embree's (u, v): hit point = (1 − u − v)·v0 + u·v1 + v·v2. Clip the float32 round-off of grazing hits.
    bary = np.stack([1.0 - u - v, u, v], axis=-1).clip(0.0, 1.0)  # [K, 3]
    bary /= np.maximum(bary.sum(-1, keepdims=True), 1e-12)
    pixel = (view[hit] * h + row[hit]) * w + col[hit]  # [K], increasing: rays are generated in pixel order
    return Fragments((n, h, w), pixel, prim[hit].astype(np.int64), bary)


def _pixels_that_may_hit(mesh: Mesh, cameras: Cameras) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(view, row, col)`` ``[R]`` int64 each, in pixel order: the pixels inside each view's projected bounding
    rectangle of the mesh, widened by one pixel.

    When the whole mesh lies in front of a camera, its image is the convex hull of its projected vertices, so a
    pixel ray outside their bounding rectangle cannot hit it; the one-pixel margin absorbs the float32 round-off
    of the ray directions. A view with any vertex at or behind its image plane keeps every pixel.
    """
    n, h, w = len(cameras), cameras.height, cameras.width
    points = mesh.vertices.astype(np.float64)  # [P, 3]
    if len(points) > HULL_ABOVE_VERTICES:  # the image of the mesh is that of its convex hull's vertices
        points = _hull_vertices(points)
    origin = cameras.origin.double().numpy()  # [N, 3]

    def along(axis: Tensor) -> np.ndarray:  # [N, P]: (p − o) · axis of each camera
        axis = axis.double().numpy()  # [N, 3]
        # einsum, not `@`: a [N, 3] × [3, P] product is too thin for BLAS, whose threads cost 6× the CPU time here.
        return np.einsum("nd,pd->np", axis, points) - (origin * axis).sum(1, keepdims=True)

    along_z = along(cameras.z)  # [N, P] planar depth
    in_front = (along_z > 1e-6).all(axis=1)  # [N]
    along_z = np.where(along_z > 1e-6, along_z, 1.0)
    # The inverse of the pixel ray directions: column c looks along x-slope (2c/(W−1) − 1)·tan(fov/2), rows alike.
    col = (along(cameras.x) / along_z / math.tan(cameras.x_fov / 2) + 1.0) * (w - 1) / 2  # [N, P]
    row = (along(cameras.y) / along_z / math.tan(cameras.y_fov / 2) + 1.0) * (h - 1) / 2  # [N, P]
    col_lo = np.where(in_front, np.clip(np.floor(col.min(1)) - 1, 0, w), 0).astype(np.int64)  # [N]
    col_hi = np.where(in_front, np.clip(np.ceil(col.max(1)) + 2, 0, w), w).astype(np.int64)  # [N], exclusive
    row_lo = np.where(in_front, np.clip(np.floor(row.min(1)) - 1, 0, h), 0).astype(np.int64)
    row_hi = np.where(in_front, np.clip(np.ceil(row.max(1)) + 2, 0, h), h).astype(np.int64)
    # The rectangles' pixels, view after view, each row-major (a ragged arange without a per-view loop).
    width = np.maximum(col_hi - col_lo, 0)  # [N]
    count = width * np.maximum(row_hi - row_lo, 0)  # [N]
    view = np.repeat(np.arange(n), count)  # [R]
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)  # [R] index inside its rectangle
    row_in, col_in = np.divmod(local, np.maximum(width, 1)[view])
    return view, row_lo[view] + row_in, col_lo[view] + col_in


def _hull_vertices(vertices: np.ndarray) -> np.ndarray:
    """The vertices of the convex hull of ``vertices`` ``[V, 3]`` (``[P, 3]``, P ≪ V for a typical mesh), or the
    8 bounding-box corners when the points are flat (Qhull needs a full-dimensional hull). Either way, every
    vertex lies inside the convex hull of the returned points."""
    try:
        return vertices[ConvexHull(vertices).vertices]
    except (QhullError, ValueError):
        lo, hi = vertices.min(0), vertices.max(0)  # [3] each
        return np.stack(np.meshgrid(*zip(lo, hi), indexing="ij"), axis=-1).reshape(8, 3)


def _pixel_rays(cameras: Cameras, view: np.ndarray, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float32 ray origins and directions ``[R, 3]`` of pixels (``[R]`` each) for Embree: the directions of
    :meth:`Cameras.pixel_rays` (corner-aligned), not normalised, since Embree's hits and barycentrics do not need
    unit directions (only its ray parameter t would change, and we do not use it)."""
    origin, x, y, z = (getattr(cameras, k).numpy() for k in ("origin", "x", "y", "z"))  # [N, 3] each
    slope_x = ((2.0 * np.arange(cameras.width) / (cameras.width - 1) - 1.0) * math.tan(cameras.x_fov / 2))
    slope_y = ((2.0 * np.arange(cameras.height) / (cameras.height - 1) - 1.0) * math.tan(cameras.y_fov / 2))
    directions = np.take(z, view, axis=0)  # [R, 3]
    directions += np.take(x, view, axis=0) * np.take(slope_x.astype(np.float32), col)[:, None]
    directions += np.take(y, view, axis=0) * np.take(slope_y.astype(np.float32), row)[:, None]
    return np.take(origin, view, axis=0), directions


def rasterize_pytorch3d(
    mesh: Mesh,
    cameras: Cameras,
    *,
    bin_size: int | None = None,
    max_faces_per_bin: int | None = None,
) -> tuple[Tensor, Tensor]:
    """PyTorch3D rasterisation on ``cameras.device``: one face per pixel, perspective-correct barycentrics.

    ``bin_size``/``max_faces_per_bin``: PyTorch3D's coarse-to-fine binning; ``None`` = naive (0) on CPU and
    PyTorch3D's heuristics on CUDA. If the bins overflow (a dense mesh in a small part of the image) it falls back
    to the naive rasteriser rather than return incomplete images.

    Returns ``face_index`` ``[N, H, W]`` int64 (-1: miss) and barycentrics ``[N, H, W, 3]`` float32, on the device.
    """
    device = cameras.device
    n = len(cameras)
    num_faces = len(mesh.faces)
    verts = torch.from_numpy(mesh.vertices).to(device)  # [V, 3]
    faces = torch.from_numpy(mesh.faces).to(device)  # [F, 3]
    meshes = Meshes(verts=[verts], faces=[faces]).extend(n)
    if bin_size is None and device.type != "cuda":
        bin_size = 0  # the coarse-to-fine binned rasteriser is a CUDA speed-up; naive is the one for CPU

    def rasterize(bin_size: int | None):
        settings = RasterizationSettings(
            image_size=cameras.height,
            # Not 0: with 0, PyTorch3D drops pixels whose centre lies exactly on an edge shared by two faces (a
            # line of holes along the diagonal of a quad seen head-on). 1e-10 (squared NDC) is far below a pixel.
            blur_radius=1e-10,
            faces_per_pixel=1,
            clip_barycentric_coords=True,
            perspective_correct=True,  # barycentrics of the 3-D triangle, as the ray caster's
            cull_backfaces=False,
            bin_size=bin_size,
            max_faces_per_bin=max_faces_per_bin,
        )
        return MeshRasterizer(cameras=to_pytorch3d(cameras), raster_settings=settings)(meshes)

    fragments = rasterize_with_bin_fallback(rasterize, bin_size)

    packed = fragments.pix_to_face[..., 0]  # [N, H, W], indices into the N-times-extended packed faces
    view = torch.arange(n, device=device)[:, None, None]  # [N, 1, 1]
    face_index = torch.where(packed >= 0, packed - view * num_faces, -1)  # [N, H, W]
    bary = fragments.bary_coords[..., 0, :]  # [N, H, W, 3]
    bary = torch.where(packed[..., None] >= 0, bary, 0.0)
    return face_index.long(), bary.float()



# --------------------------------------------------------------------------------------------------- shading
def shade(
    mesh: Mesh,
    cameras: Cameras,
    fragments: Fragments,
    outputs: tuple[str, ...] | list[str] = OUTPUTS,
    light_dir: tuple[float, float, float] = LIGHT_DIRECTION,
) -> dict[str, np.ndarray]:
    """The shading shared by both backends: :class:`Fragments` → the ``outputs`` of :func:`render_views` (images
    ``[N, H, W, ...]``; see :func:`shade_hits` for what is computed at the hit pixels)."""
    outputs = _check_outputs(outputs)
    n, h, w = fragments.shape
    hits = shade_hits(mesh, cameras, fragments, outputs=outputs, light_dir=light_dir)
    out: dict[str, np.ndarray] = {}
    for name in outputs:
        if name == "face_index":
            image = np.full(n * h * w, -1, dtype=np.int64)  # [N·H·W]
        elif name == "alpha":
            image = np.zeros(n * h * w, dtype=np.float32)
        else:
            channels = (3,) if name in ("rgb", "albedo", "normals") else ()
            image = np.full((n * h * w, *channels), np.inf if name == "depth" else 0.0, dtype=np.float32)
        image[fragments.pixel] = hits[name]
        out[name] = image.reshape(n, h, w, *image.shape[1:])
    return out


def shade_hits(
    mesh: Mesh,
    cameras: Cameras,
    fragments: Fragments,
    outputs: tuple[str, ...] | list[str] = OUTPUTS,
    light_dir: tuple[float, float, float] = LIGHT_DIRECTION,
) -> dict[str, np.ndarray]:
    """The ``outputs`` of :func:`render_views` at the ``K`` fragments only: ``[K, 3]`` or ``[K]`` each.

    Only what ``outputs`` needs is computed: albedo from :meth:`Mesh.albedo`; :func:`shade_basic` with the face
    normal (two-sided lighting, so its sign does not matter); the ``normals`` output flipped toward the camera;
    depth is the planar depth of the barycentric surface point, so both backends measure it the same way.
    ``fragments.pixel`` need not be sorted here (a random subset of them is fine).
    """
    outputs = _check_outputs(outputs)
    n, h, w = fragments.shape
    if len(cameras) != n or (cameras.height, cameras.width) != (h, w):
        raise ValueError(f"cameras ({len(cameras)} of {cameras.height}×{cameras.width}) do not match the fragments "
                         f"({n} views of {h}×{w})")
    pixel, face, bary = fragments.pixel, fragments.face, fragments.bary  # [K], [K], [K, 3]
    hits: dict[str, np.ndarray] = {}  # output name → its values at the hit pixels

    if "rgb" in outputs or "albedo" in outputs:
        hits["albedo"] = mesh.albedo(face, bary)  # [K, 3] sRGB
    if "depth" in outputs or "normals" in outputs:
        cameras = cameras.to("cpu", torch.float32)
        view = pixel // (h * w)  # [K]
        corners = np.take(mesh.vertices[mesh.faces].reshape(-1, 9), face, axis=0).reshape(-1, 3, 3)  # [K, 3, 3]
        to_point = np.einsum("kc,kcd->kd", bary, corners)  # [K, 3] surface point of each pixel...
        to_point -= np.take(cameras.origin.numpy(), view, axis=0)  # ...as seen from its camera: along the ray
        hits["depth"] = np.einsum("kd,kd->k", to_point, np.take(cameras.z.numpy(), view, axis=0))  # [K] planar
    if "rgb" in outputs or "normals" in outputs:
        normal = np.take(mesh.face_normals(), face, axis=0)  # [K, 3]
        if "rgb" in outputs:
            with single_cpu_thread():
                rgb = shade_basic(torch.from_numpy(hits["albedo"]), torch.from_numpy(normal), light_dir)  # [K, 3]
            hits["rgb"] = rgb.numpy()
        if "normals" in outputs:
            # Two-sided: the normal that faces the camera, i.e. against the pixel ray.
            away = np.einsum("kd,kd->k", normal, to_point) > 0  # [K]
            normal[away] *= -1.0
            hits["normals"] = normal
    if "alpha" in outputs:
        hits["alpha"] = np.ones(len(face), dtype=np.float32)
    if "face_index" in outputs:
        hits["face_index"] = face
    return {name: hits[name] for name in outputs}


def shade_fragments(
    mesh: Mesh,
    cameras: Cameras,
    face_index: np.ndarray,
    bary: np.ndarray,
    light_dir: tuple[float, float, float] = LIGHT_DIRECTION,
    outputs: tuple[str, ...] | list[str] = OUTPUTS,
) -> dict[str, np.ndarray]:
    """:func:`shade` of dense fragments: ``face_index`` ``[N, H, W]`` int64 (-1: background), ``bary``
    ``[N, H, W, 3]`` (as :func:`rasterize_pytorch3d` returns them, as numpy arrays)."""
    n, h, w = face_index.shape
    if bary.shape != (n, h, w, 3):
        raise ValueError(f"bary must have shape {(n, h, w, 3)} to match face_index, got {bary.shape}")
    return shade(mesh, cameras, Fragments.from_dense(face_index, bary), outputs=outputs, light_dir=light_dir)
