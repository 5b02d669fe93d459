"""shapee.io.mesh.export_mesh: .glb/.ply/.obj round trips with sRGB vertex colours, atomic writes, clear errors."""

import json
import struct

import numpy as np
import pytest
import torch
import trimesh

from shapee.data.mesh import load_mesh
from shapee.io.mesh import MESH_FORMATS, export_mesh
from shapee.render import grid as render_grid
from shapee.render import mesh as render_mesh
from shapee.render.lighting import linear_to_srgb, srgb_to_linear


@pytest.fixture(scope="module")
def mc_mesh() -> trimesh.Trimesh:
    """A Marching Cubes sphere with sRGB vertex colours spanning darks to brights (as latent_to_mesh makes them)."""
    sdf = render_grid.query_grid(lambda p: 0.6 - p.norm(dim=-1), 1, 20)
    (verts, faces), = render_mesh.extract_meshes(sdf)
    rgb = ((verts + 1) / 2).clamp(0, 1) ** 2  # [V, 3], many dark values
    rgba = torch.cat([rgb, torch.ones_like(rgb[:, :1])], -1)
    colors = (rgba * 255).round().to(torch.uint8).numpy()
    return trimesh.Trimesh(verts.double().numpy(), faces.numpy(), vertex_colors=colors, process=False)


def read_glb(path):
    """(json, binary chunk) of a GLB file."""
    data = path.read_bytes()
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    assert (magic, version, total) == (b"glTF", 2, len(data))
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON"
    gltf = json.loads(data[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
    assert bin_type == b"BIN\x00"
    return gltf, data[28 + json_len : 28 + json_len + bin_len]


@pytest.mark.parametrize("ext", MESH_FORMATS)
def test_round_trip_keeps_vertices_faces_and_srgb_colours(tmp_path, mc_mesh, ext):
    path = export_mesh(mc_mesh, tmp_path / "sub" / f"mesh{ext}")
    assert path.is_file() and path.stat().st_mode & 0o044  # readable by others, not mkstemp's 0600
    back = trimesh.load(path, force="mesh", process=False)
    assert len(back.vertices) == len(mc_mesh.vertices) and len(back.faces) == len(mc_mesh.faces)
    assert np.array_equal(back.faces, mc_mesh.faces)
    assert np.abs(back.vertices - mc_mesh.vertices).max() < 1e-6
    srgb = mc_mesh.visual.vertex_colors[:, :3].astype(np.float64)  # [V, 3] what the renders show, 0..255
    got = back.visual.vertex_colors[:, :3].astype(np.float64)
    if ext != ".glb":
        assert np.abs(got - srgb).max() <= 1.0  # PLY/OBJ hold the sRGB values themselves
        return
    # glTF: COLOR_0 is linear by the spec; the file holds the exact float32 linear values ...
    gltf, blob = read_glb(path)
    accessor = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["COLOR_0"]]
    assert (accessor["componentType"], accessor["type"]) == (5126, "VEC4")
    view = gltf["bufferViews"][accessor["bufferView"]]
    stored = np.frombuffer(blob[view["byteOffset"] : view["byteOffset"] + view["byteLength"]], "<f4").reshape(-1, 4)
    expected = srgb_to_linear(torch.from_numpy(srgb / 255)).numpy()
    assert np.abs(stored[:, :3] - expected).max() < 1e-6 and (stored[:, 3] == 1).all()
    # ... which trimesh reads back as 8-bit linear, and a glTF-aware reader (ours) decodes to the sRGB values.
    assert np.abs(got / 255 - expected).max() <= 0.5 / 255 + 1e-6
    decoded = linear_to_srgb(torch.from_numpy(got / 255)).numpy() * 255
    bright = srgb >= 128  # 8-bit *linear* storage in the reader loses precision in the darks only
    assert np.abs(decoded - srgb)[bright].max() <= 1.0 and np.abs(decoded - srgb).max() <= 7.0
    ours = load_mesh(path)
    assert ours.color_source == "vertex" and ours.num_faces == len(mc_mesh.faces)
    corner = ours.corner_colors * 255  # [F, 3, 3] sRGB
    assert np.abs(corner - srgb[mc_mesh.faces])[bright[mc_mesh.faces]].max() <= 1.0


def test_export_replaces_atomically_and_keeps_old_file_on_failure(tmp_path, mc_mesh):
    path = tmp_path / "out.ply"
    export_mesh(mc_mesh, path)
    first = path.read_bytes()
    small = trimesh.Trimesh(mc_mesh.vertices[:3], [[0, 1, 2]], vertex_colors=mc_mesh.visual.vertex_colors[:3],
                            process=False)
    export_mesh(small, path)
    assert path.read_bytes() != first and len(trimesh.load(path, process=False).vertices) == 3
    second = path.read_bytes()
    broken = trimesh.Trimesh(np.full((3, 3), np.nan), [[0, 1, 2]], process=False)
    with pytest.raises(ValueError, match="NaN"):
        export_mesh(broken, path)
    assert path.read_bytes() == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ply"]  # no temporary files left behind


def test_export_errors_name_the_problem(tmp_path, mc_mesh):
    with pytest.raises(ValueError, match=r"unknown mesh file extension '\.stl'.*\.glb, \.ply, \.obj"):
        export_mesh(mc_mesh, tmp_path / "mesh.stl")
    with pytest.raises(ValueError, match="unknown mesh file extension ''"):
        export_mesh(mc_mesh, tmp_path / "mesh")
    with pytest.raises(TypeError, match="trimesh.Trimesh"):
        export_mesh(trimesh.Scene(), tmp_path / "mesh.glb")
    assert list(tmp_path.iterdir()) == []


def test_uppercase_suffix_and_mesh_without_colours(tmp_path, mc_mesh):
    plain = trimesh.Trimesh(mc_mesh.vertices, mc_mesh.faces, process=False)
    path = export_mesh(plain, tmp_path / "plain.GLB")
    gltf, _ = read_glb(path)
    assert set(gltf["meshes"][0]["primitives"][0]["attributes"]) == {"POSITION"}
    assert len(trimesh.load(path, force="mesh", process=False).vertices) == len(plain.vertices)


@pytest.mark.parametrize("suffix", [".ply", ".obj", ".glb"])
def test_empty_mesh_exports_without_crashing(tmp_path, suffix):
    empty = render_mesh.to_trimesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    path = export_mesh(empty, tmp_path / f"empty{suffix}")
    assert path.exists() and path.stat().st_size > 0
