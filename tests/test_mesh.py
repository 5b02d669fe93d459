"""Mesh loading: the shared good/bad assets, colour sources, texture lookup, scene transforms, round trips, errors."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image

from shapee.data.mesh import Mesh, MeshError, load_mesh, normalise, sample_texture


def _srgb(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def _assert_normalised(mesh: Mesh) -> None:
    lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-5)
    assert (hi - lo).max() == pytest.approx(2.0, abs=1e-5)
    assert np.abs(mesh.vertices).max() <= 1.0 + 1e-5


def _surface_samples(mesh: Mesh, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    face_ids = rng.integers(0, len(mesh.faces), n)
    bary = rng.dirichlet([1.0, 1.0, 1.0], n).astype(np.float32)
    return face_ids, bary


# --- the shared good assets ------------------------------------------------------------------------------------------

GOOD = {  # file: (colour source, number of textures)
    "BoxTextured.glb": ("texture", 1),
    "monkey.glb": ("default", 0),  # a glTF primitive without a material
    "capsule.obj": ("texture", 1),
    "rabbit.obj": ("material", 0),
    "bunny.ply": ("default", 0),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_asset_loads_normalised_with_its_colour_source(assets_good, name):
    mesh = load_mesh(assets_good / name)
    source, n_textures = GOOD[name]
    assert mesh.color_source == source
    assert len(mesh.textures) == n_textures
    _assert_normalised(mesh)
    assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int64
    assert mesh.corner_colors.shape == (len(mesh.faces), 3, 3)
    assert mesh.corner_colors.min() >= 0 and mesh.corner_colors.max() <= 1
    assert (mesh.face_areas() > 0).all()  # degenerate faces dropped
    assert len(np.unique(mesh.faces)) == len(mesh.vertices)  # no unused vertices
    assert mesh.source.endswith(name)


def test_capsule_albedo_matches_texture_at_uv(assets_good):
    mesh = load_mesh(assets_good / "capsule.obj")
    assert len(mesh.faces) == 10000  # 10,200 in the file, 200 zero-area pole faces dropped
    image = Image.open(assets_good / "capsule0.jpg")
    np.testing.assert_allclose(mesh.textures[0], np.asarray(image.convert("RGB"), np.float32) / 255, atol=1e-6)
    face_ids, bary = _surface_samples(mesh, 4000)
    albedo = mesh.albedo(face_ids, bary)  # [K, 3]
    uv = np.einsum("kc,kcd->kd", bary, mesh.corner_uvs[face_ids])  # [K, 2]
    # trimesh's own nearest-texel lookup is an independent implementation of the OBJ uv convention
    reference = trimesh.visual.uv_to_color(uv, image)[:, :3] / 255.0
    assert np.abs(albedo - reference).mean() < 0.03
    assert albedo.std(axis=0).min() > 0.1  # really textured, not a flat colour


def test_sample_texture_hits_texel_centres_exactly():
    texture = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    uv = np.stack([(cols.ravel() + 0.5) / 7, 1 - (rows.ravel() + 0.5) / 5], axis=-1)  # v up: row 0 is v = 1
    np.testing.assert_allclose(sample_texture(texture, uv), texture.reshape(-1, 3), atol=1e-6)
    # repeat wrap: shifting by whole periods changes nothing
    np.testing.assert_allclose(sample_texture(texture, uv + [3.0, -2.0]), texture.reshape(-1, 3), atol=1e-5)


def test_box_textured_shows_texture_colours(assets_good):
    mesh = load_mesh(assets_good / "BoxTextured.glb")
    np.testing.assert_allclose(mesh.corner_colors, 1.0)  # no baseColorFactor: the glTF default (white)
    texels = np.unique(np.round(mesh.textures[0].reshape(-1, 3), 3), axis=0)  # [T, 3]
    albedo = mesh.albedo(*_surface_samples(mesh, 500))  # [K, 3]
    # each albedo is a bilinear blend of texels: it lies close to some texel colour, and varies across the box
    nearest = np.min(np.linalg.norm(albedo[:, None] - texels[None], axis=-1), axis=1)
    assert np.median(nearest) < 0.02
    assert albedo.std(axis=0).max() > 0.1
    assert not np.allclose(albedo, 0.5, atol=0.05)


def test_rabbit_material_colour_and_bunny_grey(assets_good):
    rabbit = load_mesh(assets_good / "rabbit.obj")  # rabbit.mtl: Kd 1 0 1
    np.testing.assert_allclose(rabbit.corner_colors, np.broadcast_to([1.0, 0.0, 1.0], rabbit.corner_colors.shape))
    bunny = load_mesh(assets_good / "bunny.ply")
    np.testing.assert_allclose(bunny.corner_colors, 0.5)
    np.testing.assert_allclose(bunny.albedo(*_surface_samples(bunny, 10)), 0.5)


# --- scenes, transforms, colour conversions --------------------------------------------------------------------------


def test_gltf_node_transforms_materials_and_vertex_colours(tmp_path):
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    box.visual = trimesh.visual.TextureVisuals(
        material=trimesh.visual.material.PBRMaterial(baseColorFactor=[0.2, 0.5, 1.0, 1.0])
    )
    ball = trimesh.creation.icosphere(subdivisions=1)
    ball.visual.vertex_colors = np.tile([128, 0, 255, 255], (len(ball.vertices), 1))
    box_transform = trimesh.transformations.rotation_matrix(np.pi / 2, [0, 0, 1])
    box_transform[:3, 3] = [5.0, 0.0, 0.0]
    scene = trimesh.Scene()
    scene.add_geometry(box, node_name="box", transform=box_transform)
    scene.add_geometry(ball, node_name="ball")
    scene.export(tmp_path / "scene.glb")

    mesh = load_mesh(tmp_path / "scene.glb")
    # expected world geometry: the box rotated 90° about z (its 1×2 footprint becomes 2×1), moved to x = 5
    world = np.concatenate([trimesh.transform_points(box.vertices, box_transform), ball.vertices])
    np.testing.assert_allclose(world.max(axis=0) - world.min(axis=0), [7.0, 2.0, 3.0], atol=1e-6)  # x: -1 .. 6
    np.testing.assert_allclose(np.sort(mesh.vertices, axis=0), np.sort(normalise(world), axis=0), atol=1e-5)
    assert len(mesh.faces) == len(box.faces) + len(ball.faces)

    # colours: the linear glTF factor and COLOR_0 are converted to sRGB. The box (x in [4, 6]) lies at x > 0 after
    # normalisation (centre x = 2.5), the ball (x in [-1, 1]) at x < 0.
    on_box = mesh.triangles().mean(axis=1)[:, 0] > 0  # [F]
    assert on_box.sum() == len(box.faces)
    box_color = _srgb(np.array([51, 128, 255]) / 255)  # trimesh keeps the factor as 8 bits
    ball_color = _srgb(np.array([128, 0, 255]) / 255)
    np.testing.assert_allclose(mesh.corner_colors[on_box], np.broadcast_to(box_color, (12, 3, 3)), atol=1e-5)
    np.testing.assert_allclose(mesh.corner_colors[~on_box], np.broadcast_to(ball_color, (80, 3, 3)), atol=1e-5)
    # dominant source by area: box 22 vs ball ~12
    assert mesh.color_source == "material"


@pytest.mark.parametrize("suffix", [".glb", ".gltf"])
def test_two_textures_become_texture_list(tmp_path, suffix):
    scene = trimesh.Scene()
    for i, (color, x) in enumerate([((255, 0, 0), 0.0), ((0, 255, 0), 3.0)]):
        box = trimesh.creation.box()
        image = Image.fromarray(np.full((4, 4, 3), color, np.uint8))
        uv = np.random.default_rng(i).random((len(box.vertices), 2))
        box.visual = trimesh.visual.TextureVisuals(
            uv=uv, material=trimesh.visual.material.PBRMaterial(baseColorTexture=image)
        )
        scene.add_geometry(box, node_name=f"box{i}", transform=trimesh.transformations.translation_matrix([x, 0, 0]))
    if suffix == ".glb":
        scene.export(tmp_path / "two.glb")
        path = tmp_path / "two.glb"
    else:  # .gltf with its buffers in separate files next to it
        for name, data in scene.export(file_type="gltf").items():
            (tmp_path / name).write_bytes(data)
        path = tmp_path / "model.gltf"
    mesh = load_mesh(path)
    assert mesh.color_source == "texture" and len(mesh.textures) == 2
    assert sorted(np.bincount(mesh.face_texture)) == [12, 12]
    albedo = mesh.albedo(np.arange(len(mesh.faces)), np.full((len(mesh.faces), 3), 1 / 3))  # [F, 3]
    right = mesh.triangles().mean(axis=1)[:, 0] > 0  # the box moved to x = 3 is green
    np.testing.assert_allclose(albedo[right], np.broadcast_to([0.0, 1.0, 0.0], (12, 3)), atol=1e-6)
    np.testing.assert_allclose(albedo[~right], np.broadcast_to([1.0, 0.0, 0.0], (12, 3)), atol=1e-6)


def test_gltf_texture_tinted_by_linear_base_color_factor(tmp_path):
    box = trimesh.creation.box()
    image = Image.fromarray(np.full((2, 2, 3), 255, np.uint8))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, baseColorFactor=[0.5, 1.0, 0.25, 1.0])
    box.visual = trimesh.visual.TextureVisuals(uv=np.zeros((len(box.vertices), 2)), material=material)
    box.export(tmp_path / "tinted.glb")
    mesh = load_mesh(tmp_path / "tinted.glb")
    assert mesh.color_source == "texture"
    expected = _srgb(np.array([128, 255, 64]) / 255)  # linear factor (8-bit in trimesh) → sRGB; texture white
    np.testing.assert_allclose(mesh.albedo(np.array([0, 5]), np.full((2, 3), 1 / 3)), [expected, expected], atol=1e-5)


def test_mirroring_node_keeps_faces_outward(tmp_path):
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.creation.icosphere(subdivisions=2), node_name="mirrored", transform=mirror)
    scene.export(tmp_path / "mirror.glb")
    mesh = load_mesh(tmp_path / "mirror.glb")
    signed_volume = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).volume
    assert signed_volume > 0


def test_obj_texture_orientation_v_up(tmp_path):
    # a 4×4 image whose top half is red and bottom half blue; OBJ v = 1 is the top of the image
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2] = [255, 0, 0]
    image[2:] = [0, 0, 255]
    Image.fromarray(image).save(tmp_path / "tex.png")
    (tmp_path / "quad.mtl").write_text("newmtl m\nKd 0.8 0.8 0.8\nmap_Kd tex.png\n")
    (tmp_path / "quad.obj").write_text(
        "mtllib quad.mtl\nusemtl m\n"
        "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\n"
        "vt 0.2 0.2\nvt 0.8 0.2\nvt 0.8 0.8\nvt 0.2 0.8\n"
        "f 1/1 2/2 3/3\nf 1/1 3/3 4/4\n"
    )
    mesh = load_mesh(tmp_path / "quad.obj")
    assert mesh.color_source == "texture"
    top = mesh.albedo(np.array([1]), np.array([[0.0, 0.0, 1.0]]))  # corner 4: vt (0.2, 0.8) → top → red
    bottom = mesh.albedo(np.array([0]), np.array([[1.0, 0.0, 0.0]]))  # corner 1: vt (0.2, 0.2) → bottom → blue
    np.testing.assert_allclose(top, [[1.0, 0.0, 0.0]], atol=1e-6)  # Kd does not tint an OBJ texture
    np.testing.assert_allclose(bottom, [[0.0, 0.0, 1.0]], atol=1e-6)


def test_ply_vertex_colour_round_trip(tmp_path):
    source = trimesh.creation.icosphere(subdivisions=2)
    colors = np.random.default_rng(0).integers(0, 256, (len(source.vertices), 4)).astype(np.uint8)
    colors[:, 3] = 255
    source.visual.vertex_colors = colors
    for encoding in ("binary", "ascii"):
        path = tmp_path / f"ball_{encoding}.ply"
        path.write_bytes(trimesh.exchange.ply.export_ply(source, encoding=encoding))
        mesh = load_mesh(path)
        assert mesh.color_source == "vertex"
        np.testing.assert_allclose(mesh.vertices, normalise(source.vertices), atol=1e-6)
        np.testing.assert_array_equal(mesh.faces, source.faces)
        np.testing.assert_allclose(mesh.corner_colors, colors[source.faces][..., :3] / 255.0, atol=1e-6)


@pytest.mark.parametrize("ext", [".stl", ".off"])
def test_geometry_only_formats(tmp_path, ext):
    source = trimesh.creation.box(extents=(1.0, 2.0, 4.0))
    source.export(tmp_path / f"box{ext}")
    mesh = load_mesh(tmp_path / f"box{ext}")
    assert len(mesh.faces) == 12 and mesh.color_source == "default"
    np.testing.assert_allclose(mesh.vertices.max(axis=0), [0.25, 0.5, 1.0], atol=1e-6)
    assert trimesh.Trimesh(mesh.vertices, mesh.faces).volume == pytest.approx(2 * 0.25 * 2 * 0.5 * 2, rel=1e-5)


def test_degenerate_faces_dropped_rest_kept(tmp_path):
    (tmp_path / "m.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 2 0 0\nf 1 2 3\nf 1 2 4\nf 1 1 3\n")
    mesh = load_mesh(tmp_path / "m.obj")
    assert len(mesh.faces) == 1  # collinear (1 2 4) and repeated-corner (1 1 3) faces are zero-area
    assert len(mesh.vertices) == 3  # vertex 4 was only used by a dropped face


# --- errors ----------------------------------------------------------------------------------------------------------

BAD = {
    "empty.obj": "empty mesh",
    "nancolor.obj": "NaN in vertex colours",
    "notenoughindices.obj": "face with fewer than 3 vertex indices",
    "obj_wireframe.obj": "no faces: only line segments",
    "points_ascii.ply": "no faces: point cloud",
    "ply_empty_header.ply": "empty mesh",
}


def test_every_shared_bad_asset_is_covered(assets_bad):
    assert sorted(p.name for p in assets_bad.iterdir()) == sorted(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_asset_raises_mesh_error_with_reason(assets_bad, name):
    with pytest.raises(MeshError) as info:
        load_mesh(assets_bad / name)
    assert BAD[name] in info.value.reason
    assert info.value.path.endswith(name)
    assert name in str(info.value) and BAD[name] in str(info.value)


@pytest.mark.parametrize(
    "filename, content, reason",
    [
        ("nanpos.obj", "v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n", "non-finite vertex positions"),
        ("zero.obj", "v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n", "zero extent"),
        ("flat.obj", "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n", "degenerate"),
        ("oor.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n", "face index out of range"),
        (
            "short_crlf.obj",
            "v 0 0 0\r\nv 1 0 0\r\nv 0 1 0\r\nf 1 2 3\r\nf 1 2\r\n",
            "fewer than 3 vertex indices (line 5",
        ),
        ("neg.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 -9\n", "face index out of range"),
        (
            "oor.ply",
            "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
            "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n",
            "face index out of range",
        ),
        (
            "nancolor.ply",
            "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
            "property float red\nproperty float green\nproperty float blue\nelement face 1\n"
            "property list uchar int vertex_indices\nend_header\n0 0 0 nan 0 0\n1 0 0 1 0 0\n0 1 0 1 0 0\n3 0 1 2\n",
            "NaN in vertex colours",
        ),
        ("garbage.glb", "this is not a glb file at all", "could not read .glb file"),
        ("garbage.ply", "not a ply", "unreadable PLY header"),
        ("model.fbx", "whatever", "unsupported file extension '.fbx'"),
    ],
)
def test_broken_inputs_raise_mesh_error(tmp_path, filename, content, reason):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(MeshError) as info:
        load_mesh(path)
    assert reason in info.value.reason


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(MeshError, match="file not found"):
        load_mesh(tmp_path / "nope.obj")
    (tmp_path / "dir.obj").mkdir()
    with pytest.raises(MeshError, match="not a regular file"):
        load_mesh(tmp_path / "dir.obj")


def test_mesh_constructor_names_the_bad_field():
    vertices = np.eye(3, dtype=np.float32)
    faces = np.array([[0, 1, 2]])
    with pytest.raises(ValueError, match="corner_colors"):
        Mesh(vertices, faces, corner_colors=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="faces"):
        Mesh(vertices, np.array([[0, 1, 3]]), corner_colors=np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="corner_uvs"):
        Mesh(vertices, faces, corner_colors=np.zeros((1, 3, 3)), face_texture=np.array([0]),
             textures=[np.zeros((2, 2, 3), np.float32)])
