"""Render dataset views of a :class:`~shapee.data.mesh.Mesh`: shaded RGB, flat albedo, alpha, depth, normals.

This replaces the official Blender "basic" renders (reference §6.2): flat albedo (emission of the base colour),
lit by ``0.3 + 0.7 · |n · L|`` in linear space (:func:`shapee.render.lighting.shade_basic`), on black, binary
alpha, planar depth. Two interchangeable backends find the first surface hit of every pixel:

* ``"embree"``: CPU ray casting of the pixel rays of :meth:`Cameras.rays` (corner-aligned, exactly our camera
  convention) with Embree (``embreex``, the library behind trimesh's ray queries); first hit, triangle id and
  barycentrics per ray.
* ``"pytorch3d"``: PyTorch3D rasterisation with the cameras of :func:`shapee.cameras.to_pytorch3d` (the only
  conversion), one face per pixel, perspective-correct (true 3-D) barycentrics. Fast on CUDA; on CPU it runs the
  naive rasteriser and is slow.

Both produce fragments (face index and barycentrics per pixel) that go through one shared shading step (albedo,
two-sided face normal, lighting, planar depth of the barycentric surface point), so the two backends give the same
images up to which of two faces owns a pixel on their shared edge.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from shapee.cameras import Cameras, to_pytorch3d
from shapee.data.mesh import Mesh
from shapee.render.lighting import LIGHT_DIRECTION, shade_basic

BACKENDS = ("auto", "embree", "pytorch3d")


def render_views(mesh: Mesh, cameras: Cameras, backend: str = "auto") -> dict[str, np.ndarray]:
    """Render ``mesh`` from each of the ``N`` ``cameras`` (``H × W`` = ``cameras.height × cameras.width``).

    ``backend``: ``"embree"`` (CPU ray casting), ``"pytorch3d"`` (rasterisation on ``cameras.device``), or
    ``"auto"``: PyTorch3D when the cameras live on a CUDA device, Embree otherwise.

    Returns numpy float32 arrays (background: black / 0 / +inf / -1):

    * ``rgb`` ``[N, H, W, 3]``: sRGB shaded with the basic lighting; ``albedo`` ``[N, H, W, 3]``: flat sRGB albedo;
    * ``alpha`` ``[N, H, W]`` in {0, 1}; ``depth`` ``[N, H, W]``: planar depth along each camera's ``z``;
    * ``normals`` ``[N, H, W, 3]``: world-space unit face normals turned toward the camera (two-sided);
    * ``face_index`` ``[N, H, W]`` int64: the face seen at each pixel.
    """
    _check_mesh(mesh)
    backend = resolve_backend(backend, cameras)
    if backend == "embree":
        face_index, bary = rasterize_embree(mesh, cameras)
    else:
        face_index, bary = rasterize_pytorch3d(mesh, cameras)
        face_index, bary = face_index.cpu().numpy(), bary.cpu().numpy()
    return shade_fragments(mesh, cameras, face_index, bary)


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


# ------------------------------------------------------------------------------------------------- fragments
def rasterize_embree(mesh: Mesh, cameras: Cameras) -> tuple[np.ndarray, np.ndarray]:
    """First hit of every pixel ray by Embree ray casting on the CPU (all rays of all views in one call).

    Returns ``face_index`` ``[N, H, W]`` int64 (-1: miss) and barycentrics ``[N, H, W, 3]`` float32 (0 on misses).
    """
    # embreex directly rather than trimesh's RayMeshIntersector wrapper: the wrapper re-normalises, rescales and
    # converts every ray between float64 and float32 (≈ 3× the cost of the ray casting itself here), and drops the
    # barycentrics Embree computes anyway. Our meshes live in [-1, 1]³, so its rescaling buys no precision.
    from embreex import rtcore_scene
    from embreex.mesh_construction import TriangleMesh

    cameras = cameras.to("cpu", torch.float32)
    n, h, w = len(cameras), cameras.height, cameras.width
    origins, directions = cameras.rays()  # [N, H, W, 3] each, unit directions
    scene = rtcore_scene.EmbreeScene()
    TriangleMesh(scene=scene, vertices=mesh.vertices, indices=mesh.faces.astype(np.int32))
    origins = np.ascontiguousarray(origins.reshape(-1, 3).numpy())  # [R, 3]
    directions = np.ascontiguousarray(directions.reshape(-1, 3).numpy())  # [R, 3]
    # Embree releases the GIL: cast contiguous slices of the rays on torch's thread count.
    n_chunks = max(1, min(torch.get_num_threads(), len(origins) // 4096))
    with ThreadPoolExecutor(n_chunks) as pool:
        parts = list(pool.map(lambda o, d: scene.run(o, d, output=1),
                              np.array_split(origins, n_chunks), np.array_split(directions, n_chunks)))
    face = np.concatenate([p["primID"] for p in parts]).astype(np.int64)  # [R], -1 on miss
    hit = np.flatnonzero(face >= 0)  # [K]
    u = np.concatenate([p["u"] for p in parts])[hit]  # [K]
    v = np.concatenate([p["v"] for p in parts])[hit]  # [K]
    # Embree's (u, v): hit point = (1 − u − v)·v0 + u·v1 + v·v2. Clip the float32 round-off of grazing hits.
    bary_hit = np.stack([1.0 - u - v, u, v], axis=-1).clip(0.0, 1.0)  # [K, 3]
    bary_hit /= np.maximum(bary_hit.sum(-1, keepdims=True), 1e-12)
    bary = np.zeros((n * h * w, 3), dtype=np.float32)
    bary[hit] = bary_hit
    return face.reshape(n, h, w), bary.reshape(n, h, w, 3)


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
    from pytorch3d.renderer import MeshRasterizer, RasterizationSettings
    from pytorch3d.structures import Meshes

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

    # Bin overflow: a RuntimeError on CPU, only a warning (and missing faces) on CUDA.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fragments = rasterize(bin_size)
            overflow = any("Bin size was too small" in str(w.message) for w in caught)
        except RuntimeError as error:
            if "faces per bin" not in str(error):
                raise
            overflow = True
    for w in caught:  # pass on any other warning
        if "Bin size was too small" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if overflow:
        fragments = rasterize(0)

    packed = fragments.pix_to_face[..., 0]  # [N, H, W], indices into the N-times-extended packed faces
    view = torch.arange(n, device=device)[:, None, None]  # [N, 1, 1]
    face_index = torch.where(packed >= 0, packed - view * num_faces, -1)  # [N, H, W]
    bary = fragments.bary_coords[..., 0, :]  # [N, H, W, 3]
    bary = torch.where(packed[..., None] >= 0, bary, 0.0)
    return face_index.long(), bary.float()


# --------------------------------------------------------------------------------------------------- shading
def shade_fragments(
    mesh: Mesh,
    cameras: Cameras,
    face_index: np.ndarray,
    bary: np.ndarray,
    light_dir: tuple[float, float, float] = LIGHT_DIRECTION,
) -> dict[str, np.ndarray]:
    """The shading shared by both backends: fragments → the arrays of :func:`render_views`.

    ``face_index`` ``[N, H, W]`` int64 (-1: background), ``bary`` ``[N, H, W, 3]``. Only hit pixels are touched:
    albedo from :meth:`Mesh.albedo`, the face normal flipped toward the camera, :func:`shade_basic`; depth is
    the planar depth of the barycentric surface point, so both backends measure it the same way.
    """
    n, h, w = face_index.shape
    if bary.shape != (n, h, w, 3):
        raise ValueError(f"bary must have shape {(n, h, w, 3)} to match face_index, got {bary.shape}")
    cameras = cameras.to("cpu")
    pixel = np.flatnonzero(face_index >= 0)  # [K] flat indices of the hit pixels
    view = pixel // (h * w)  # [K]
    face = face_index.reshape(-1)[pixel]  # [K]
    weights = bary.reshape(-1, 3)[pixel]  # [K, 3]

    albedo = mesh.albedo(face, weights)  # [K, 3] sRGB
    points = np.einsum("kc,kcd->kd", weights, mesh.triangles()[face])  # [K, 3] surface point of each pixel
    view_t = torch.from_numpy(view)
    to_point = torch.from_numpy(points) - cameras.origin[view_t]  # [K, 3] along the pixel ray
    normal = torch.from_numpy(mesh.face_normals()[face])  # [K, 3]
    # Two-sided: the normal that faces the camera, i.e. against the pixel ray.
    away = (normal * to_point).sum(-1, keepdim=True) > 0  # [K, 1]
    normal = torch.where(away, -normal, normal)
    rgb = shade_basic(torch.from_numpy(albedo), normal, light_dir)  # [K, 3]
    depth = (to_point * cameras.z[view_t]).sum(-1)  # [K] planar depth

    out = {
        "rgb": np.zeros((n, h, w, 3), dtype=np.float32),
        "albedo": np.zeros((n, h, w, 3), dtype=np.float32),
        "alpha": np.zeros((n, h, w), dtype=np.float32),
        "depth": np.full((n, h, w), np.inf, dtype=np.float32),
        "normals": np.zeros((n, h, w, 3), dtype=np.float32),
        "face_index": np.asarray(face_index, dtype=np.int64),
    }
    out["rgb"].reshape(-1, 3)[pixel] = rgb.numpy()
    out["albedo"].reshape(-1, 3)[pixel] = albedo
    out["alpha"].reshape(-1)[pixel] = 1.0
    out["depth"].reshape(-1)[pixel] = depth.numpy()
    out["normals"].reshape(-1, 3)[pixel] = normal.numpy()
    return out
