"""Parameter-free STF (mesh) rendering: SDF grid → Marching Cubes 33 → vertex colours → soft PyTorch3D render.

The renderer knows nothing about networks. It asks two *fields*, both per-asset batched,

    sdf_fn(points [B, P, 3]) -> sdf [B, P]        (positive inside, DESIGN.md)
    rgb_fn(points [B, P, 3]) -> rgb [B, P, 3]     (sRGB in [0, 1], the STF colour head)

and turns them into images, as the official ``render_views_from_stf`` does (reference §4):

1. :func:`shapee.render.grid.query_grid`: the SDF on an ``N³`` grid spanning ``bounds`` inclusively (§4.1);
2. :func:`shapee.render.mesh.extract_meshes`: pad with a −1 ("outside") border, Marching Cubes 33 on the padded grid
   with bounds widened by one voxel (vertices at their true world positions, §4.2 / §8.3.3);
3. :func:`shapee.render.mesh.query_vertex_colors`: the STF colour at the mesh vertices;
4. :func:`render_meshes`: PyTorch3D rasterisation (cameras of :func:`shapee.cameras.to_pytorch3d`), barycentric
   vertex colours, flat face normals, the dataset's "basic" lighting (:func:`shapee.render.lighting.shade_basic`),
   soft silhouette blending so that alpha is differentiable w.r.t. the vertices (§4.3).

Gradients flow image → fragment colours/barycentrics/distances → vertex positions and colours → (MC's linear zero
crossing) the two SDF samples of each crossing edge, and (colour query) the colour head: both reach the latent.
:mod:`shapee.models.meshing` wires a transmitter's heads into these fields.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pytorch3d.renderer import BlendParams, MeshRasterizer, RasterizationSettings
from pytorch3d.renderer.blending import softmax_rgb_blend
from pytorch3d.structures import Meshes
from torch import Tensor

from shapee.cameras import Cameras, to_pytorch3d
from shapee.render.grid import DEFAULT_GRID_SIZE, RgbFn, SdfFn, query_grid
from shapee.render.lighting import LIGHT_DIRECTION, shade_basic
from shapee.render.mesh import extract_meshes, query_vertex_colors, replace_empty_meshes
from shapee.render.raster import rasterize_with_bin_fallback

__all__ = ["SIGMA", "render_meshes", "render_stf"]

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


# ------------------------------------------------------------------------------------------- 4. rasterising
def _rasterize(meshes, p3d_cameras, *, image_size: int, blur_radius: float, faces_per_pixel: int,
               bin_size: int | None, max_faces_per_bin: int | None):
    """PyTorch3D fragments; the naive rasteriser on CPU, and on CUDA whenever the coarse bins overflow."""
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
    grid_size: int = DEFAULT_GRID_SIZE,
    bounds: tuple[float, float] = (-1.0, 1.0),
    chunk: int | None | str = "auto",
    narrow_band: bool = False,
    grad_samples: str = "surface",
    **render_kwargs,
) -> dict:
    """Fields → images: grid query → MC33 (padded, no shrink) → STF colour at the vertices → soft render.

    ``cameras``: one :class:`Cameras` per asset, or one shared set (then ``batch_size`` = number of assets is
    required). ``render_kwargs`` go to :func:`render_meshes` (``soft``, ``sigma``, ``faces_per_pixel``, ...).
    ``narrow_band``: query the SDF only near its zero level (:func:`~shapee.render.grid.query_grid_narrow_band`):
    the same mesh, images and gradients for fields it covers, but ``sdf`` is then exact only near the surface. Off by
    default: a field in training (random at first) is not guaranteed to be one the band covers. ``grad_samples``:
    see :func:`~shapee.render.grid.query_grid` (default ``"surface"``: autograd only through the samples the mesh
    depends on).

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
