"""Dataset view rendering: analytic sphere, planar depth, shading, and the Embree / PyTorch3D backends agreeing."""

import math

import numpy as np
import pytest
import torch
import trimesh

from shapee.cameras import BLENDER_FOV, CAMERA_DISTANCE, Cameras, look_at, random_cameras
from shapee.data.mesh import Mesh
from shapee.data.render import (
    Fragments,
    _pixel_rays,
    _pixels_that_may_hit,
    rasterize,
    rasterize_pytorch3d,
    render_views,
    resolve_backend,
    shade,
)
from shapee.render.lighting import shade_basic


def sphere_mesh(radius: float = 0.5, center=(0.0, 0.0, 0.0), subdivisions: int = 4) -> Mesh:
    """An icosphere whose vertex colours vary smoothly with position."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    vertices = np.asarray(sphere.vertices) + np.asarray(center)
    faces = np.asarray(sphere.faces)
    vertex_colors = 0.5 + 0.5 * np.asarray(sphere.vertices) / radius  # [V, 3] in [0, 1]
    return Mesh(vertices, faces, vertex_colors[faces])


def textured_mesh() -> Mesh:
    """An icosphere with a planar UV projection onto a procedural texture (checker × gradient)."""
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.8)
    v, f = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    uv = np.stack([(v[:, 0] + 1) / 2, (v[:, 2] + 1) / 2], axis=-1)  # [V, 2], continuous over the surface
    yy, xx = np.mgrid[:64, :64]
    texture = np.stack([(xx // 8 + yy // 8) % 2 * 0.8 + 0.1, xx / 63, yy / 63], axis=-1).astype(np.float32)
    factor = np.tile(np.array([1.0, 0.9, 0.8], np.float32), (len(f), 3, 1))
    return Mesh(v, f, factor, corner_uvs=uv[f], face_texture=np.zeros(len(f)), textures=[texture],
                color_source="texture")


def camera_looking_at_origin(origin, resolution: int, fov: float = BLENDER_FOV) -> Cameras:
    origin = torch.tensor([origin], dtype=torch.float32)
    x, y, z = look_at(origin)
    return Cameras(origin, x, y, z, resolution, resolution, fov, fov)


def interior(alpha: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood is all foreground (away from the silhouette edge): ``[N, H, W]`` bool."""
    a = np.pad(alpha > 0, ((0, 0), (1, 1), (1, 1)))
    return a[:, 1:-1, 1:-1] & a[:, :-2, 1:-1] & a[:, 2:, 1:-1] & a[:, 1:-1, :-2] & a[:, 1:-1, 2:]


def test_sphere_silhouette_area_and_centre_depth():
    res = 129  # odd: the centre pixel's ray is exactly the optical axis (corner-aligned pixels)
    cams = camera_looking_at_origin((0.0, -CAMERA_DISTANCE, 0.0), res)
    out = render_views(sphere_mesh(0.5), cams, backend="embree")
    # The silhouette of a sphere of radius r at distance d is a disc of radius tan(asin(r/d)) on the image plane,
    # where neighbouring pixels are 2·tan(fov/2)/(W−1) apart.
    radius_px = math.tan(math.asin(0.5 / CAMERA_DISTANCE)) / (2 * math.tan(BLENDER_FOV / 2) / (res - 1))
    area = out["alpha"][0].sum()
    assert abs(area / (math.pi * radius_px**2) - 1) < 0.02, (area, math.pi * radius_px**2)
    centre = res // 2
    # Nearest surface point at distance d − r; the inscribed icosphere sits at most ~2e-3 behind the sphere.
    assert 3.5 - 1e-4 < out["depth"][0, centre, centre] < 3.5 + 3e-3
    # Silhouette centred on the optical axis.
    rows, cols = np.nonzero(out["alpha"][0])
    assert abs(rows.mean() - centre) < 0.05 and abs(cols.mean() - centre) < 0.05


def test_render_views_output_contract():
    mesh = sphere_mesh(0.5)
    cams = random_cameras(3, resolution=32, generator=torch.Generator().manual_seed(1))
    out = render_views(mesh, cams)
    shapes = {"rgb": (3, 32, 32, 3), "albedo": (3, 32, 32, 3), "alpha": (3, 32, 32), "depth": (3, 32, 32),
              "normals": (3, 32, 32, 3), "face_index": (3, 32, 32)}
    for name, shape in shapes.items():
        assert out[name].shape == shape, name
    assert out["face_index"].dtype == np.int64 and out["rgb"].dtype == np.float32
    fg = out["alpha"] > 0
    assert set(np.unique(out["alpha"])) == {0.0, 1.0}
    assert (fg == (out["face_index"] >= 0)).all() and (fg == np.isfinite(out["depth"])).all()
    bg = ~fg
    assert (out["rgb"][bg] == 0).all() and (out["albedo"][bg] == 0).all() and (out["normals"][bg] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(out["normals"][fg], axis=-1), 1.0, atol=1e-5)
    # Normals face the camera: against the pixel rays.
    _, directions = cams.rays()
    assert ((out["normals"] * directions.numpy()).sum(-1)[fg] < 0).all()
    # Albedo of the smooth vertex colours ≈ 0.5 + 0.5·p/r at the surface point p seen by the pixel.
    points = cams.depth_to_points(torch.from_numpy(np.where(fg, out["depth"], 0))).numpy()[fg]
    np.testing.assert_allclose(out["albedo"][fg], 0.5 + points, atol=0.01)


def test_shading_uses_the_face_normal_and_basic_lighting():
    box = trimesh.creation.box(extents=(1.2, 1.0, 0.8))
    faces = np.asarray(box.faces)
    colors = np.tile(np.array([0.2, 0.6, 0.9], np.float32), (len(faces), 3, 1))
    mesh = Mesh(np.asarray(box.vertices), faces, colors)
    cams = random_cameras(4, resolution=48, generator=torch.Generator().manual_seed(3))
    out = render_views(mesh, cams, backend="embree")
    fg = out["alpha"] > 0
    normals = torch.from_numpy(mesh.face_normals()[out["face_index"][fg]])
    expected = shade_basic(torch.tensor([0.2, 0.6, 0.9]).expand_as(normals), normals).numpy()
    np.testing.assert_allclose(out["rgb"][fg], expected, atol=1e-6)
    assert len(np.unique(out["rgb"][fg].round(4), axis=0)) >= 3  # several faces, several brightnesses


@pytest.mark.parametrize("backend", ["embree", "pytorch3d"])
def test_depth_is_planar(backend):
    # A square in the plane x = 0 seen head-on from x = 4: planar depth is 4 at every pixel (ray length is not).
    vertices = np.array([[0, -2, -2], [0, 2, -2], [0, 2, 2], [0, -2, 2]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    mesh = Mesh(vertices, faces, np.full((2, 3, 3), 0.5, np.float32))
    out = render_views(mesh, camera_looking_at_origin((4.0, 0.0, 0.0), 24), backend=backend)
    assert out["alpha"].all()
    np.testing.assert_allclose(out["depth"], 4.0, atol=1e-5)


@pytest.mark.parametrize("make_mesh", [sphere_mesh, textured_mesh], ids=["vertex-colours", "textured"])
def test_backends_agree(make_mesh):
    mesh = make_mesh()
    cams = random_cameras(3, resolution=64, generator=torch.Generator().manual_seed(2))
    a = render_views(mesh, cams, backend="embree")
    b = render_views(mesh, cams, backend="pytorch3d")
    fa, fb = a["alpha"] > 0, b["alpha"] > 0
    assert (fa & fb).sum() / (fa | fb).sum() >= 0.99
    both = fa & fb
    assert np.abs(a["depth"][both] - b["depth"][both]).max() < 1e-3
    inner = interior(a["alpha"]) & interior(b["alpha"])
    assert np.abs(a["albedo"][inner] - b["albedo"][inner]).max() <= 2 / 255
    # Shading is flat per face: where the backends give an edge pixel to different faces, rgb may differ by the
    # angle between the two faces' normals. Everywhere else it must agree.
    same_face = inner & (a["face_index"] == b["face_index"])
    assert same_face.sum() >= 0.99 * inner.sum()
    assert np.abs(a["rgb"][same_face] - b["rgb"][same_face]).max() <= 2 / 255


@pytest.mark.parametrize("name", ["BoxTextured.glb", "rabbit.obj"])
def test_backends_agree_on_real_assets(assets_good, name):
    from shapee.data.mesh import load_mesh

    mesh = load_mesh(assets_good / name)
    cams = random_cameras(2, resolution=48, generator=torch.Generator().manual_seed(6))
    a = render_views(mesh, cams, backend="embree")
    b = render_views(mesh, cams, backend="pytorch3d")
    assert (a["alpha"] == b["alpha"]).mean() > 0.995
    inner = interior(a["alpha"]) & interior(b["alpha"])
    assert inner.sum() > 500
    assert np.abs(a["albedo"][inner] - b["albedo"][inner]).max() <= 2 / 255
    both = (a["alpha"] > 0) & (b["alpha"] > 0)
    assert np.abs(a["depth"][both] - b["depth"][both]).max() < 1e-3


def test_pytorch3d_silhouette_matches_our_rays():
    # A small off-centre sphere: where our corner-aligned pixel rays hit it analytically vs PyTorch3D's pixels.
    center, radius, res = np.array([0.45, -0.3, 0.25]), 0.2, 96
    cams = camera_looking_at_origin((1.0, -3.5, 1.5), res)
    origins, directions = (t[0].double().numpy() for t in cams.rays())  # [H, W, 3]
    to_center = center - origins
    along = (to_center * directions).sum(-1)
    miss_distance = np.linalg.norm(to_center - along[..., None] * directions, axis=-1)
    analytic = (miss_distance < radius) & (along > 0)  # [H, W]
    out = render_views(sphere_mesh(radius, center, subdivisions=4), cams, backend="pytorch3d")
    rendered = out["alpha"][0] > 0
    assert analytic.sum() > 100
    rows_a, cols_a = np.nonzero(analytic)
    rows_r, cols_r = np.nonzero(rendered)
    # A half-pixel convention error would move the centroid by 0.5 px; allow a fraction of that.
    assert abs(rows_a.mean() - rows_r.mean()) < 0.1 and abs(cols_a.mean() - cols_r.mean()) < 0.1
    assert (analytic & rendered).sum() / (analytic | rendered).sum() > 0.98


def test_backend_choice_and_bad_input():
    cams = random_cameras(1, resolution=16)
    assert resolve_backend("auto", cams) == "embree"
    assert resolve_backend("pytorch3d", cams) == "pytorch3d"
    with pytest.raises(ValueError, match="backend"):
        render_views(sphere_mesh(), cams, backend="blender")
    empty = Mesh(np.zeros((3, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 3, 3), np.float32))
    with pytest.raises(ValueError, match="faces"):
        render_views(empty, cams)
    bad = sphere_mesh(subdivisions=1)
    bad.faces = bad.faces.copy()
    bad.faces[0, 0] = 10**6  # meshes validate on construction; render_views re-checks what it indexes with
    with pytest.raises(ValueError, match="out of range"):
        render_views(bad, cams)


def test_pytorch3d_bin_overflow_falls_back_to_naive():
    mesh = sphere_mesh(subdivisions=3)
    cams = random_cameras(2, resolution=32, generator=torch.Generator().manual_seed(5))
    naive_face, naive_bary = rasterize_pytorch3d(mesh, cams)
    face, bary = rasterize_pytorch3d(mesh, cams, bin_size=8, max_faces_per_bin=4)  # overflows
    assert (face == naive_face).all()
    torch.testing.assert_close(bary, naive_bary)



# ----------------------------------------------------------------------------------------------- speed paths
def test_requested_outputs_equal_the_full_render_and_bad_names_raise():
    mesh = textured_mesh()
    cams = random_cameras(3, resolution=40, generator=torch.Generator().manual_seed(8))
    full = render_views(mesh, cams)
    for outputs in [("albedo", "alpha", "depth"), ("rgb", "alpha", "depth"), ("normals",), ("face_index", "rgb")]:
        part = render_views(mesh, cams, outputs=outputs)
        assert sorted(part) == sorted(outputs)
        for name in outputs:
            np.testing.assert_array_equal(part[name], full[name], err_msg=name)
    with pytest.raises(ValueError, match="outputs"):
        render_views(mesh, cams, outputs=("rgb", "shadows"))
    with pytest.raises(ValueError, match="outputs"):
        render_views(mesh, cams, outputs=())


def test_fragments_split_by_view_and_round_trip_dense():
    mesh = sphere_mesh(0.6)
    cams = random_cameras(4, resolution=32, generator=torch.Generator().manual_seed(9))
    fragments = rasterize(mesh, cams, backend="embree")
    assert fragments.shape == (4, 32, 32) and (np.diff(fragments.pixel) > 0).all()
    # Shading views 1..2 of the joint fragments is rendering those two cameras on their own.
    alone = render_views(mesh, cams[1:3], backend="embree")
    part = shade(mesh, cams[1:3], fragments.views(1, 3))
    for name in alone:
        np.testing.assert_array_equal(part[name], alone[name], err_msg=name)
    face_index, bary = fragments.dense()
    back = Fragments.from_dense(face_index, bary)
    for name in ("pixel", "face", "bary"):
        np.testing.assert_array_equal(getattr(back, name), getattr(fragments, name))
    with pytest.raises(ValueError, match="empty range"):
        fragments.views(3, 3)
    with pytest.raises(ValueError, match="do not match"):
        shade(mesh, cams[:2], fragments.views(0, 3))


def _cast_every_pixel(mesh: Mesh, cams: Cameras) -> np.ndarray:
    """Face index ``[N, H, W]`` of every pixel ray (no culling), straight from Embree: the reference."""
    from embreex import rtcore_scene
    from embreex.mesh_construction import TriangleMesh

    scene = rtcore_scene.EmbreeScene()
    TriangleMesh(scene=scene, vertices=mesh.vertices, indices=mesh.faces.astype(np.int32))
    origins, directions = (np.ascontiguousarray(t.reshape(-1, 3).numpy()) for t in cams.rays())
    return scene.run(origins, directions).astype(np.int64).reshape(len(cams), cams.height, cams.width)


@pytest.mark.parametrize("scene", ["distant", "close", "flat"])
def test_culled_ray_casting_finds_every_hit(scene):
    # Only pixels inside each view's projected bounding rectangle are cast: no hit may be lost, for cameras far
    # away, cameras inside the mesh's bounding box (some vertices behind them: the whole image is cast), and a flat
    # mesh (no 3-D convex hull: its bounding-box corners bound it).
    if scene == "flat":
        vertices = np.array([[-0.8, -0.5, 0.1], [0.7, -0.6, 0.1], [0.6, 0.8, 0.1], [-0.5, 0.4, 0.1]], np.float32)
        mesh = Mesh(vertices, np.array([[0, 1, 2], [0, 2, 3]]), np.full((2, 3, 3), 0.5, np.float32))
    else:
        mesh = sphere_mesh(0.7, center=(0.1, -0.2, 0.05), subdivisions=3)
    if scene == "close":
        origin = torch.tensor([[0.0, -0.9, 0.3], [0.5, 0.5, -0.6]])
        cams = Cameras(origin, *look_at(origin), 48, 48, BLENDER_FOV, BLENDER_FOV)
    else:
        cams = random_cameras(6, resolution=48, generator=torch.Generator().manual_seed(11))
    reference = _cast_every_pixel(mesh, cams)
    face_index, _ = rasterize(mesh, cams, backend="embree").dense()
    assert (reference >= 0).sum() > 100
    np.testing.assert_array_equal(face_index >= 0, reference >= 0)
    assert (face_index == reference).mean() > 0.999  # up to which face owns a ray through a shared edge
    view, _, _ = _pixels_that_may_hit(mesh, cams)
    cast = np.bincount(view, minlength=len(cams)) / (48 * 48)  # [N] fraction of each view's pixels cast
    if scene == "close":
        assert cast.min() == 1.0  # a vertex behind the camera: no culling
    else:
        assert cast.max() < 0.6  # the culling does its job on a mesh seen whole


def test_embree_rays_follow_the_camera_convention():
    cams = random_cameras(3, resolution=17, generator=torch.Generator().manual_seed(12))
    view, row, col = (a.reshape(-1) for a in np.meshgrid(np.arange(3), np.arange(17), np.arange(17), indexing="ij"))
    origins, directions = _pixel_rays(cams, view, row, col)  # [R, 3] each, d · z = 1 (not unit length)
    ref_origins, ref_directions = cams.pixel_rays(*(torch.from_numpy(a) for a in (view, row, col)))
    np.testing.assert_allclose(origins, ref_origins.numpy(), atol=1e-6)
    unit = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit, ref_directions.numpy(), atol=1e-6)


def test_albedo_matches_a_textbook_lookup_with_two_textures_and_wrapping():
    # Reference: float64 bilinear lookup written out texel by texel, on a mesh that mixes two textures, untextured
    # faces and per-corner colours, with UVs outside [0, 1] (wrap-around) and on the texture borders.
    rng = np.random.default_rng(3)
    n_faces = 60
    textures = [rng.random((5, 7, 3)).astype(np.float32), rng.random((4, 3, 3)).astype(np.float32)]
    face_texture = np.repeat([0, 1, -1], n_faces // 3)
    corner_colors = rng.random((n_faces, 3, 3)).astype(np.float32)
    corner_colors[::2] = corner_colors[::2, :1]  # every other face flat
    corner_uvs = rng.uniform(-1.5, 2.5, (n_faces, 3, 2)).astype(np.float32)
    corner_uvs[:4] = [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]  # the borders exactly
    mesh = Mesh(rng.random((n_faces * 3, 3)), np.arange(n_faces * 3).reshape(-1, 3), corner_colors,
                corner_uvs=corner_uvs, face_texture=face_texture, textures=textures)
    face = rng.integers(0, n_faces, 500)
    bary = rng.dirichlet(np.ones(3), 500).astype(np.float32)

    def lookup(texture, uv):
        h, w = texture.shape[:2]
        x, y = (uv[0] % 1.0) * w - 0.5, (1.0 - uv[1] % 1.0) * h - 0.5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        t = texture.astype(np.float64)
        at = lambda r, c: t[r % h, c % w]  # noqa: E731
        return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))

    expected = []
    for f, b in zip(face, bary.astype(np.float64)):
        color = b @ corner_colors[f].astype(np.float64)
        if face_texture[f] >= 0:
            color = color * lookup(textures[face_texture[f]], b @ corner_uvs[f].astype(np.float64))
        expected.append(np.clip(color, 0, 1))
    albedo = mesh.albedo(face, bary)
    assert albedo.dtype == np.float32 and albedo.shape == (500, 3)
    np.testing.assert_allclose(albedo, np.array(expected), atol=2e-5)
    with pytest.raises(ValueError, match="barycentric"):
        mesh.albedo(face, bary[:10])


@pytest.mark.gpu
def test_auto_uses_pytorch3d_on_cuda_and_matches_embree():
    mesh = textured_mesh()
    cams = random_cameras(2, resolution=64, generator=torch.Generator().manual_seed(4))
    assert resolve_backend("auto", cams.to("cuda")) == "pytorch3d"
    a = render_views(mesh, cams, backend="embree")
    b = render_views(mesh, cams.to("cuda"))
    inner = interior(a["alpha"]) & interior(b["alpha"])
    assert np.abs(a["albedo"][inner] - b["albedo"][inner]).max() <= 2 / 255
    # Flat shading: a pixel on an edge between faces may go to either face (as on CPU, test_backends_agree).
    same_face = inner & (a["face_index"] == b["face_index"])
    assert same_face.sum() >= 0.99 * inner.sum()
    assert np.abs(a["rgb"][same_face] - b["rgb"][same_face]).max() <= 2 / 255
