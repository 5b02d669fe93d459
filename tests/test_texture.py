"""shapee.render.texture (decimation, UV atlas, bake from a colour field), textured export (GLB, OBJ+MTL+PNG), the
transmitter / pipeline / sample.py paths, and shapee.eval.texture (vertex colours vs baked texture, PSNR)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from _tiny_data import one_torch_thread
from shapee.data.mesh import load_mesh, sample_texture
from shapee.io.mesh import export_mesh
from shapee.render import texture as T

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def colour_field(points: torch.Tensor) -> torch.Tensor:
    """A smooth sRGB pattern of position, [N, 3] -> [N, 3] in (0, 1)."""
    x, y, z = points.unbind(-1)
    return 0.5 + 0.45 * torch.stack([torch.sin(3 * x), torch.cos(2 * y + z), torch.sin(4 * z * x)], -1)


@pytest.fixture(scope="module")
def sphere():
    return trimesh.creation.icosphere(subdivisions=3)  # 1280 faces, radius 1


@pytest.fixture(scope="module")
def atlas(sphere):
    return T.uv_atlas(sphere.vertices, sphere.faces, size=256)


def texel_points(atlas: T.UVAtlas, size: int, rows: np.ndarray, cols: np.ndarray):
    """Independent of the rasteriser: for each texel centre, the one UV triangle containing it (brute force over all
    faces) and the 3-D point there. Returns (points [K, 3], found [K] bool)."""
    uv = np.stack([(cols + 0.5) / size, 1.0 - (rows + 0.5) / size], -1)  # [K, 2], v up
    tri = atlas.uvs[atlas.faces].astype(np.float64)  # [F, 3, 2]
    a, e0, e1 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]  # [F, 2]
    det = e0[:, 0] * e1[:, 1] - e0[:, 1] * e1[:, 0]  # [F]
    d = uv[:, None] - a[None]  # [K, F, 2]
    w1 = (d[..., 0] * e1[:, 1] - d[..., 1] * e1[:, 0]) / det
    w2 = (e0[:, 0] * d[..., 1] - e0[:, 1] * d[..., 0]) / det
    w = np.stack([1 - w1 - w2, w1, w2], -1)  # [K, F, 3]
    inside = (w > 1e-6).all(-1)  # strictly inside (away from edges, where two faces tie)
    found = inside.any(1)
    face = inside.argmax(1)
    k = np.arange(len(uv))
    corners = atlas.vertices[atlas.faces[face]]  # [K, 3, 3]
    return np.einsum("kc,kcd->kd", w[k, face], corners), found


def _cross2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


# ---------------------------------------------------------------------------------------------- atlas + bake
def test_atlas_maps_every_face_inside_the_unit_square(sphere, atlas):
    assert atlas.uvs.min() >= 0 and atlas.uvs.max() <= 1
    # Same faces in the same order, only seam vertices split: mapping back gives the input mesh.
    np.testing.assert_array_equal(atlas.vertex_map[atlas.faces], sphere.faces)
    np.testing.assert_allclose(atlas.vertices, sphere.vertices[atlas.vertex_map], atol=1e-6)
    tri = atlas.uvs[atlas.faces]
    area = 0.5 * np.abs(_cross2(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]))  # [F]
    assert (area > 0).all()  # every face has its own patch of texture


def test_charts_do_not_overlap(atlas):
    size = 1024
    texel, face, _, inside = T.rasterize_uv(atlas.uvs, atlas.faces, size, border=0)
    assert inside.all() and len(np.unique(texel)) == len(texel)
    tri = atlas.uvs[atlas.faces] * size
    area = 0.5 * np.abs(_cross2(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])).sum()  # texels, overlaps counted twice
    # Each texel centre is owned once; if triangles overlapped, the covered count would fall short of the summed
    # area by the overlap. Only edge effects remain (about a perimeter's worth of texels, < 1 %).
    assert abs(len(texel) - area) / area < 0.01
    # And every face owns some texels at this resolution (all faces are mapped).
    assert len(np.unique(face)) == len(atlas.faces)


def test_baked_texels_equal_the_colour_field_at_their_surface_points(atlas):
    size = 256
    texture, covered = T.bake(colour_field, atlas.vertices, atlas.faces, atlas.uvs, size)
    assert texture.shape == (size, size, 3) and texture.dtype == np.float32
    rng = np.random.default_rng(0)
    rows, cols = np.nonzero(covered)
    pick = rng.choice(len(rows), 400, replace=False)
    points, found = texel_points(atlas, size, rows[pick], cols[pick])
    assert found.sum() > 300  # most covered texels have their centre inside a triangle (the rest: border texels)
    expected = colour_field(torch.from_numpy(points[found]).float()).numpy()
    np.testing.assert_allclose(texture[rows[pick][found], cols[pick][found]], expected, atol=1e-5)
    assert np.isfinite(texture).all() and texture.min() >= 0 and texture.max() <= 1


def test_border_and_dilation_make_bilinear_lookups_seam_free(sphere, atlas):
    size = 256
    mesh = trimesh.Trimesh(atlas.vertices, atlas.faces, process=False)
    points, face = trimesh.sample.sample_surface(mesh, 4000, seed=0)
    bary = trimesh.triangles.points_to_barycentric(mesh.triangles[face], points)
    uv = np.einsum("kc,kcd->kd", bary, atlas.uvs[atlas.faces[face]])
    truth = colour_field(torch.from_numpy(points).float()).numpy()

    def lookup_error(**kwargs) -> float:
        texture, _ = T.bake(colour_field, atlas.vertices, atlas.faces, atlas.uvs, size, **kwargs)
        return float(np.abs(sample_texture(texture, uv) - truth).max())

    # With the conservative border and the dilated gutter, a bilinear lookup anywhere on the surface reads the field
    # (to within its change over a texel); without them, lookups near chart edges blend in the black gutter.
    assert lookup_error() < 0.05
    assert lookup_error(border=0.0, dilation=0) > 0.2


def test_dilate_fills_a_ring_per_pass_with_neighbour_means():
    texture = torch.zeros(7, 7, 1)
    mask = torch.zeros(7, 7, dtype=torch.bool)
    texture[3, 3], mask[3, 3] = 1.0, True
    texture[3, 4], mask[3, 4] = 3.0, True
    out, grown = T.dilate(texture, mask, iterations=1)
    assert int(grown.sum()) == 12  # the 3×4 block around the two texels
    assert out[2, 2, 0] == 1.0 and out[2, 5, 0] == 3.0 and out[2, 3, 0] == 2.0  # means of filled neighbours only
    assert out[0, 0, 0] == 0.0 and not grown[0, 0]


def test_decimate_reaches_the_target_and_keeps_the_surface(sphere):
    fine = trimesh.creation.icosphere(subdivisions=5)  # 20480 faces
    v, f = T.decimate(fine.vertices, fine.faces, 2000)
    assert abs(len(f) - 2000) <= 20 and f.max() < len(v) and len(np.unique(f)) == len(v)
    radius = np.linalg.norm(v, axis=1)
    assert np.abs(radius - 1).max() < 0.02
    same_v, same_f = T.decimate(sphere.vertices, sphere.faces, 5000)  # already below the target: unchanged
    np.testing.assert_array_equal(same_f, sphere.faces)


# ------------------------------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def textured(sphere):
    return T.bake_mesh(colour_field, sphere.vertices, sphere.faces, texture_size=128)


def _image(visual):
    return getattr(visual.material, "baseColorTexture", None) or visual.material.image


@pytest.mark.parametrize("ext", [".glb", ".obj"])
def test_textured_export_round_trips_with_its_texture(tmp_path, textured, ext):
    path = export_mesh(textured, tmp_path / f"asset{ext}")
    if ext == ".obj":
        assert (tmp_path / "asset.mtl").is_file() and (tmp_path / "asset.png").is_file()
        assert "map_Kd asset.png" in (tmp_path / "asset.mtl").read_text()
    loaded = trimesh.load(path, force="mesh", process=False)
    assert loaded.visual.kind == "texture"
    image = np.asarray(_image(loaded.visual).convert("RGB"))
    original = np.asarray(_image(textured.visual))
    np.testing.assert_array_equal(image, original)  # lossless PNG, sRGB texels stored as they are (no linearising)
    np.testing.assert_allclose(loaded.vertices, textured.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, textured.faces)
    # The colour a viewer looks up at each vertex's UV is the same before and after.
    before = sample_texture(original / 255.0, textured.visual.uv)
    after = sample_texture(image / 255.0, loaded.visual.uv)
    np.testing.assert_allclose(after, before, atol=1e-5)
    # ...and it is the colour field there (8-bit, bilinear over one texel).
    truth = colour_field(torch.from_numpy(np.asarray(textured.vertices)).float()).numpy()
    assert np.abs(after - truth).max() < 0.05
    data = load_mesh(path)  # our own loader (training data) reads it as a textured asset too
    assert data.color_source == "texture" and len(data.textures) == 1


def test_glb_structure_per_gltf_spec(tmp_path, textured):
    pygltflib = pytest.importorskip("pygltflib")
    gltf = pygltflib.GLTF2().load(str(export_mesh(textured, tmp_path / "asset.glb")))
    assert len(gltf.materials) == 1 and len(gltf.textures) == 1 and len(gltf.images) == 1
    pbr = gltf.materials[0].pbrMetallicRoughness
    assert pbr.baseColorTexture.index == 0 and pbr.metallicFactor == 0.0 and pbr.roughnessFactor == 1.0
    assert gltf.images[0].mimeType == "image/png" and gltf.images[0].bufferView is not None
    assert gltf.bufferViews[gltf.images[0].bufferView].target is None
    primitive = gltf.meshes[0].primitives[0]
    assert primitive.material == 0 and primitive.attributes.COLOR_0 is None
    uv = gltf.accessors[primitive.attributes.TEXCOORD_0]
    assert uv.type == "VEC2" and uv.count == len(textured.vertices)
    assert 0 <= min(uv.min) and max(uv.max) <= 1
    for view in gltf.bufferViews:
        assert view.byteOffset % 4 == 0
    # glTF's v axis points down: TEXCOORD_0 = (u, 1 − v) of trimesh's UVs.
    blob = gltf.binary_blob()
    view = gltf.bufferViews[uv.bufferView]
    texcoord = np.frombuffer(blob[view.byteOffset:view.byteOffset + view.byteLength], "<f4").reshape(-1, 2)
    np.testing.assert_allclose(texcoord[:, 1], 1 - textured.visual.uv[:, 1], atol=1e-6)


def test_ply_of_a_textured_mesh_carries_the_texture_as_vertex_colours(tmp_path, textured):
    loaded = trimesh.load(export_mesh(textured, tmp_path / "asset.ply"), process=False)
    assert loaded.visual.kind == "vertex"
    truth = colour_field(torch.from_numpy(np.asarray(loaded.vertices)).float()).numpy()
    assert np.abs(loaded.visual.vertex_colors[:, :3] / 255.0 - truth).max() < 0.05


def test_vertex_colour_path_of_bake_mesh(sphere):
    mesh = T.bake_mesh(colour_field, sphere.vertices, sphere.faces, target_faces=300)
    assert mesh.visual.kind == "vertex" and abs(len(mesh.faces) - 300) <= 10
    truth = colour_field(torch.from_numpy(np.asarray(mesh.vertices)).float()).numpy()
    np.testing.assert_allclose(mesh.visual.vertex_colors[:, :3] / 255.0, truth, atol=0.5 / 255 + 1e-6)


# ------------------------------------------------------------------------------------------ transmitter path
@pytest.fixture(scope="module")
def box_decoder(tmp_path_factory):
    from test_pipeline import save_box_decoder

    return save_box_decoder(tmp_path_factory.mktemp("texture") / "decoder.pt")


def test_transmitter_bakes_its_colour_heads_and_exports(tmp_path, box_decoder):
    import shapee.io

    model = shapee.io.load(box_decoder).eval()
    with torch.no_grad():  # distinct colour heads: STF reddish (channels 3–5), fine NeRF bluish (channels 9–11)
        model.nerstf.mlp[-1].bias[3:6] = torch.tensor([1.0, -1.0, -1.0])
        model.nerstf.mlp[-1].bias[9:12] = torch.tensor([-1.0, -1.0, 1.0])
    latent = torch.randn(model.encoder.latent_ctx, model.encoder.d_latent, generator=torch.Generator().manual_seed(0))
    mesh = model.to_mesh(latent, grid_size=10, texture=64, faces=40)
    assert mesh.visual.kind == "texture" and len(mesh.faces) <= 40  # the box's 6 planar sides decimate losslessly
    np.testing.assert_allclose(np.abs(mesh.vertices).max(0), 1 + (2 / 9) / 2, atol=1e-4)  # still the same cube
    texture = np.asarray(_image(mesh.visual), dtype=np.float32) / 255.0
    atlas = T.UVAtlas(vertices=np.asarray(mesh.vertices, np.float32), faces=np.asarray(mesh.faces),
                      uvs=np.asarray(mesh.visual.uv, np.float32), vertex_map=np.arange(len(mesh.vertices)))
    rows, cols = np.meshgrid(np.arange(4, 64, 6), np.arange(4, 64, 6), indexing="ij")
    points, found = texel_points(atlas, 64, rows.ravel(), cols.ravel())
    assert found.sum() > 20
    with torch.no_grad():
        params = model.decode_params(latent[None])
        expected = model.query(params, torch.from_numpy(points[found]).float()[None])["stf_rgb"][0].numpy()
    np.testing.assert_allclose(texture[rows.ravel()[found], cols.ravel()[found]], expected, atol=0.5 / 255 + 1e-5)
    # The NeRF colour head is another field: selectable, and baked as such.
    nerf = model.to_mesh(latent, grid_size=10, texture=64, faces=40, texture_head="nerf")
    with torch.no_grad():
        nerf_expected = model.query(params, torch.from_numpy(points[found]).float()[None])["nerf_rgb_fine"][0].numpy()
    assert (expected[:, 0] - nerf_expected[:, 0]).min() > 0.2 and (nerf_expected[:, 2] - expected[:, 2]).min() > 0.2
    atlas_nerf = T.UVAtlas(vertices=np.asarray(nerf.vertices, np.float32), faces=np.asarray(nerf.faces),
                           uvs=np.asarray(nerf.visual.uv, np.float32), vertex_map=np.arange(len(nerf.vertices)))
    points_n, found_n = texel_points(atlas_nerf, 64, rows.ravel(), cols.ravel())
    with torch.no_grad():
        want = model.query(params, torch.from_numpy(points_n[found_n]).float()[None])["nerf_rgb_fine"][0].numpy()
    got = np.asarray(_image(nerf.visual), dtype=np.float32)[rows.ravel()[found_n], cols.ravel()[found_n]] / 255.0
    np.testing.assert_allclose(got, want, atol=0.5 / 255 + 1e-5)
    with pytest.raises(ValueError, match="texture head"):
        model.to_mesh(latent, grid_size=10, texture=8, texture_head="albedo")
    loaded = trimesh.load(export_mesh(mesh, tmp_path / "box.glb"), force="mesh", process=False)
    assert loaded.visual.kind == "texture" and _image(loaded.visual).size == (64, 64)


def test_sample_script_options_write_textured_assets(tmp_path, box_decoder):
    from test_pipeline import save_prior
    from test_sample import sample_cfg

    from shapee.sample import sample_assets

    prior = save_prior(tmp_path / "prior.pt")
    cfg = sample_cfg("prompt=a red cube", f"prior={prior}", f"transmitter={box_decoder}", f"out={tmp_path / 'out'}",
                     "steps=2", "grid_size=10", "render_views=2", "render_resolution=16", "device=cpu",
                     "formats=[glb,obj]", "export.texture=32", "export.faces=40", "export.texture_head=stf")
    summary = sample_assets(cfg)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted(f"a_red_cube_0{e}" for e in (".glb", ".obj", ".mtl", ".png", ".gif", "_latent.safetensors"))
    assert summary["files"][0]["faces"] <= 40 and "texture" in summary["timings"]
    glb = trimesh.load(tmp_path / "out" / "a_red_cube_0.glb", force="mesh", process=False)
    assert glb.visual.kind == "texture" and _image(glb.visual).size == (32, 32)
    with pytest.raises(ValueError, match="export.texture_head"):
        sample_assets({**cfg, "export": {"texture": 32, "texture_head": "albedo"}})
    with pytest.raises(ValueError, match="export.texture"):
        sample_assets({**cfg, "export": {"texture": -3}})


# ------------------------------------------------------------------------------------------------- quality
def test_baked_texture_beats_decimated_vertex_colours():
    from shapee.eval.texture import texture_quality

    # A box with planar sides: decimation keeps the geometry exactly, so the PSNRs differ by colour alone.
    box = trimesh.creation.box(extents=(1.4, 1.4, 1.4))
    v, f = box.vertices, box.faces
    for _ in range(4):
        v, f = trimesh.remesh.subdivide(v, f)  # 3072 faces

    def stripes(p: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0.45 * torch.stack([torch.sin(9 * p[:, 0]), torch.cos(7 * p[:, 1] + 2 * p[:, 2]),
                                         torch.sin(11 * p[:, 2] * p[:, 0])], -1)

    result = texture_quality(stripes, v, f, target_faces=100, texture_size=256, views=3, resolution=64)
    rgb = result["rgb"]
    assert result["faces"]["decimated"] <= 100
    assert rgb["decimated_texture"] > rgb["decimated_vertex"] + 10  # the texture keeps what 100 faces' vertices lose
    assert rgb["decimated_texture"] > rgb["full_vertex"] - 3  # and is about as good as the full mesh
    assert result["albedo"]["decimated_texture"] > result["albedo"]["decimated_vertex"] + 10


def test_pipeline_turntables_show_the_textured_mesh(tmp_path, box_decoder):
    from test_pipeline import save_prior

    from shapee.pipeline import TextTo3D

    pipe = TextTo3D.from_checkpoints(prior=save_prior(tmp_path / "prior.pt"), transmitter=box_decoder, device="cpu")
    with torch.no_grad():  # a reddish STF colour (the tiny random field is ~0.5 grey everywhere otherwise)
        pipe.transmitter.nerstf.mlp[-1].bias[3:6] = torch.tensor([2.0, -2.0, 0.0])
    kwargs = dict(steps=2, grid_size=10, render_views=3, render_resolution=24, seed=1)
    plain = pipe.generate("a red cube", **kwargs)
    textured = pipe.generate("a red cube", texture=64, faces=40, **kwargs)
    assert textured.meshes[0].visual.kind == "texture" and len(textured.meshes[0].faces) <= 40
    assert plain.meshes[0].visual.kind == "vertex" and len(plain.meshes[0].faces) > 40
    assert "texture" in textured.timings
    a, b = plain.frames.float() / 255, textured.frames.float() / 255  # [1, 3, 24, 24, 3] each
    seen = a.sum(-1) > 0
    assert seen.float().mean() > 0.2  # the box is in view
    red, green = b[seen].mean(0)[:2]
    assert red > 2 * green  # the turntable shows the texture's colour (not a default grey or white material)
    # Same surface, same colour field: the textured turntable shows what the dense vertex colours show.
    assert (a - b).abs().mean() < 0.01


def test_on_a_curved_surface_the_texture_wins_where_both_see_the_surface():
    from shapee.eval.texture import stripes, texture_quality

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.9)  # 5120 faces
    result = texture_quality(stripes, sphere.vertices, sphere.faces, target_faces=300, texture_size=256, views=3,
                             resolution=64)
    colour = result["albedo_on_surface"]  # the polygonal silhouette is shared by (b) and (c): compare colour only
    assert colour["decimated_texture"] > colour["decimated_vertex"] + 6
    assert result["rgb"]["decimated_texture"] > result["rgb"]["decimated_vertex"]
