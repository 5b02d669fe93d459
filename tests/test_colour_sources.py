"""Colour sources of real meshes and their fallbacks, open meshes, and the run summary (issue 19).

Fixtures are copies of the shared good meshes broken in tmp_path: a texture that is missing or not an image, a
missing ``mtllib``, a ``usemtl`` naming nothing, and open meshes built here.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh

from shapee.data.mesh import WARNING_KINDS, load_mesh
from shapee.data.prepare import OPEN_MESH_ERROR, prepare_dataset
from shapee.data.records import failure_kind, read_jsonl, read_record
from shapee.data.sdf import open_edges
from test_prepare import tiny_cfg


def kinds(warnings: list[dict]) -> list[str]:
    return [w["kind"] for w in warnings]


def write_fuze_ply(path: Path, texture_name: str = "fuze uv.jpg") -> None:
    """An ASCII PLY like trimesh's fuze.ply: UVs (s, t), 8-bit vertex colours (all red) and a TextureFile comment."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v, f = sphere.vertices, sphere.faces
    header = ["ply", "format ascii 1.0", f"comment TextureFile {texture_name}", f"element vertex {len(v)}",
              "property float x", "property float y", "property float z", "property float s", "property float t",
              "property uchar red", "property uchar green", "property uchar blue", f"element face {len(f)}",
              "property list uchar int vertex_indices", "end_header"]
    body = [f"{x} {y} {z} {0.5 + 0.4 * x} {0.5 + 0.4 * y} 200 30 30" for x, y, z in v]
    body += [f"3 {a} {b} {c}" for a, b, c in f]
    path.write_text("\n".join(header + body) + "\n")


def write_obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    lines = [f"v {x} {y} {z}" for x, y, z in vertices] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def lamp_shade(inward: bool, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A truncated cone open at both ends (no inside), faces pointing outwards or inwards."""
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    lo = np.stack([np.cos(a), np.sin(a), np.zeros(n)], axis=-1)
    hi = np.stack([0.6 * np.cos(a), 0.6 * np.sin(a), np.full(n, 0.8)], axis=-1)
    i, j = np.arange(n), (np.arange(n) + 1) % n
    faces = np.concatenate([np.stack([i, j, n + j], -1), np.stack([i, n + j, n + i], -1)])  # outward normals
    return np.concatenate([lo, hi]), faces[:, ::-1] if inward else faces


@pytest.fixture
def broken_assets(tmp_path, assets_good) -> Path:
    """One folder per case (each OBJ needs its own sidecars); returns the root."""
    root = tmp_path / "in"

    def case(name: str, *files: str) -> Path:
        folder = root / name
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(assets_good / f, folder / f)
        return folder

    write_fuze_ply(case("fuze") / "fuze.ply")
    case("nomtllib", "rabbit.obj")  # rabbit.mtl left behind
    usemtl = case("usemtl", "rabbit.mtl")
    (usemtl / "rabbit.obj").write_text((assets_good / "rabbit.obj").read_text().replace("usemtl default",
                                                                                      "usemtl nosuch"))
    garbage = case("garbagejpg", "capsule.obj", "capsule.mtl")
    (garbage / "capsule0.jpg").write_bytes(b"\x00not a jpeg\xff" * 50)
    truncated = case("truncatedjpg", "capsule.obj", "capsule.mtl")
    (truncated / "capsule0.jpg").write_bytes((assets_good / "capsule0.jpg").read_bytes()[:20000])
    case("capsule", "capsule.obj", "capsule.mtl", "capsule0.jpg")
    case("rabbit", "rabbit.obj", "rabbit.mtl")
    case("bunny", "bunny.ply")
    return root


# --------------------------------------------------------------------------------------------- load_mesh
def test_ply_with_missing_texture_uses_its_vertex_colours_and_says_so(broken_assets, capfd):
    mesh = load_mesh(broken_assets / "fuze" / "fuze.ply")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "unable to load image" not in out + err
    assert mesh.color_source == "vertex"
    assert kinds(mesh.warnings) == ["texture missing"] and "fuze uv.jpg" in mesh.warnings[0]["message"]
    np.testing.assert_allclose(mesh.corner_colors[0, 0], [200 / 255, 30 / 255, 30 / 255], atol=1e-6)
    assert not mesh.textures  # trimesh's grey placeholder image is not taken for a texture


def test_ply_with_its_texture_present_is_textured(broken_assets):
    from PIL import Image

    Image.new("RGB", (4, 4), (0, 0, 255)).save(broken_assets / "fuze" / "fuze uv.jpg")
    mesh = load_mesh(broken_assets / "fuze" / "fuze.ply")
    assert mesh.color_source == "texture" and mesh.warnings == [] and len(mesh.textures) == 1


@pytest.mark.parametrize("case, file, source, kind, words", [
    ("nomtllib", "rabbit.obj", "default", "mtllib missing", "rabbit.mtl"),
    ("usemtl", "rabbit.obj", "default", "material unknown", "nosuch"),
    ("garbagejpg", "capsule.obj", "material", "texture unreadable", "capsule0.jpg"),
    ("truncatedjpg", "capsule.obj", "material", "texture unreadable", "capsule0.jpg"),
])
def test_unusable_declared_source_falls_back_with_one_warning(broken_assets, capfd, case, file, source, kind, words):
    mesh = load_mesh(broken_assets / case / file)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert mesh.color_source == source and not mesh.textures
    assert kinds(mesh.warnings) == [kind] and words in mesh.warnings[0]["message"]


def test_usemtl_without_a_name_and_usemtl_without_mtllib_are_reported(tmp_path, assets_good):
    text = (assets_good / "rabbit.obj").read_text()
    shutil.copy(assets_good / "rabbit.mtl", tmp_path / "rabbit.mtl")
    (tmp_path / "empty.obj").write_text(text.replace("usemtl default", "usemtl"))
    (tmp_path / "nolib.obj").write_text("\n".join(l for l in text.splitlines() if not l.startswith("mtllib")))
    empty, nolib = load_mesh(tmp_path / "empty.obj"), load_mesh(tmp_path / "nolib.obj")
    assert empty.color_source == "default" and kinds(empty.warnings) == ["material unknown"]
    assert "without a material name" in empty.warnings[0]["message"]
    assert nolib.color_source == "default" and kinds(nolib.warnings) == ["mtllib missing"]
    (tmp_path / "bare").mkdir()  # a library that exists but defines no material
    (tmp_path / "bare" / "rabbit.mtl").write_text("# nothing here\n")
    (tmp_path / "bare" / "rabbit.obj").write_text(text)
    bare = load_mesh(tmp_path / "bare" / "rabbit.obj")
    assert bare.color_source == "default" and kinds(bare.warnings) == ["material unknown"]


@pytest.mark.parametrize("case, file, source", [
    ("capsule", "capsule.obj", "texture"),
    ("rabbit", "rabbit.obj", "material"),
    ("bunny", "bunny.ply", "default"),
])
def test_intact_meshes_keep_their_source_without_warnings(broken_assets, case, file, source):
    mesh = load_mesh(broken_assets / case / file)
    assert mesh.color_source == source and mesh.warnings == []
    assert len(mesh.textures) == (source == "texture")


def test_warning_kinds_are_the_documented_ones(broken_assets):
    for path in sorted(broken_assets.rglob("*.obj")) + sorted(broken_assets.rglob("*.ply")):
        assert set(kinds(load_mesh(path).warnings)) <= set(WARNING_KINDS), path


# --------------------------------------------------------------------------------------------- open meshes
def test_open_edges_counts_holes_but_not_uv_seams(assets_good):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    assert open_edges(sphere.vertices, sphere.faces) == 0
    assert open_edges(sphere.vertices, sphere.faces[1:]) == 3  # one hole: its three edges
    box = load_mesh(assets_good / "BoxTextured.glb")  # 24 vertices split along UV seams, closed
    assert len(box.vertices) == 24 and open_edges(box.vertices, box.faces) == 0
    v, f = lamp_shade(inward=False)
    assert open_edges(v, f) == 64  # two open rims of 32 edges


def test_failure_kind_is_the_head_of_the_message():
    assert failure_kind(OPEN_MESH_ERROR + " (none of 256 SDF samples)", "sdf") == "open mesh"
    assert failure_kind("no faces: point cloud (3 vertices)", "load") == "no faces"
    assert failure_kind("NaN in vertex colours (line 3: 'v 1 2 3')", "load") == "NaN in vertex colours"
    assert failure_kind("x" * 80, "render") == "render"


# --------------------------------------------------------------------------------------------- prepare_dataset
def test_prepare_records_colour_sources_warnings_open_meshes_and_a_summary(broken_assets, tmp_path, capfd):
    triangle = broken_assets / "triangle"
    triangle.mkdir()
    write_obj(triangle / "triangle.obj", np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.2]]), np.array([[0, 1, 2]]))
    shade = broken_assets / "shade"
    shade.mkdir()
    write_obj(shade / "shade_inward.obj", *lamp_shade(inward=True))
    sphere = trimesh.creation.icosphere(subdivisions=2)
    write_obj(broken_assets / "holed_sphere.obj", sphere.vertices, sphere.faces[1:])  # nearly closed: kept

    out = tmp_path / "out"
    summary = prepare_dataset(tiny_cfg(f"input={broken_assets}", f"out={out}"))
    stdout, stderr = capfd.readouterr()
    assert "Traceback" not in stdout + stderr and "unable to load image" not in stdout + stderr

    manifest = {e["asset_id"]: e for e in read_jsonl(out / "manifest.jsonl")}
    failures = {e["asset"]: e for e in read_jsonl(out / "failures.jsonl")}
    expected = {  # asset id: (colour source, warning kinds)
        "fuze__fuze.ply": ("vertex", ["texture missing"]),
        "nomtllib__rabbit.obj": ("default", ["mtllib missing"]),
        "usemtl__rabbit.obj": ("default", ["material unknown"]),
        "garbagejpg__capsule.obj": ("material", ["texture unreadable"]),
        "truncatedjpg__capsule.obj": ("material", ["texture unreadable"]),
        "capsule__capsule.obj": ("texture", []),
        "rabbit__rabbit.obj": ("material", []),
        "bunny__bunny.ply": ("default", ["open mesh"]),  # the scan has holes in its base
        "holed_sphere.obj": ("default", ["open mesh"]),
    }
    assert sorted(manifest) == sorted(expected)
    for asset_id, (source, warning_kinds) in expected.items():
        entry = manifest[asset_id]
        assert (entry["color_source"], kinds(entry["warnings"])) == (source, warning_kinds), entry
        meta, arrays = read_record(out / entry["record"], keys=["sdf"])
        assert meta["color_source"] == source and kinds(meta["warnings"]) == warning_kinds
        assert (arrays["sdf"] > 0).any()  # every record has an inside
    _, fuze = read_record(out / manifest["fuze__fuze.ply"]["record"], keys=["points_rgb", "views"])
    red, green, blue = fuze["points_rgb"].astype(float).mean(axis=0)
    assert red > 3 * green and red > 3 * blue  # the vertex colours (200, 30, 30) reach the record, not grey

    # Open meshes without any inside are failures of the sdf stage, with the documented message.
    assert sorted(failures) == ["shade__shade_inward.obj", "triangle__triangle.obj"]
    for e in failures.values():
        assert e["stage"] == "sdf" and e["kind"] == "open mesh" and e["error"].startswith(OPEN_MESH_ERROR)

    # The summary: returned, written beside the manifest, and printed.
    assert (summary["prepared"], summary["failed"]) == (9, 2)
    assert summary["color_sources"] == {"default": 4, "material": 3, "texture": 1, "vertex": 1}
    assert summary["warnings"] == {"open mesh": 2, "texture unreadable": 2, "material unknown": 1,
                                   "mtllib missing": 1, "texture missing": 1}
    assert summary["failures_by_kind"] == {"open mesh": 2}
    stored = json.loads((out / "summary.json").read_text())
    assert stored["warnings"] == summary["warnings"] and stored["folder"]["failures_by_kind"] == {"open mesh": 2}
    assert stored["folder"]["records"] == 9 and stored["folder"]["assets_with_warnings"] == 7
    assert "9 records written, 2 failed" in stderr
    assert "warnings by kind: open mesh 2, texture unreadable 2" in stderr
    assert "failures by kind: open mesh 2" in stderr

    # A resumed run does nothing new; its own counts are empty, the folder's stay.
    again = prepare_dataset(tiny_cfg(f"input={broken_assets}", f"out={out}"))
    assert (again["prepared"], again["warnings"], again["folder"]["warnings"]) == (0, {}, summary["warnings"])


def test_outward_lamp_shade_gets_the_winding_number_inside_and_a_warning(tmp_path):
    """Faces pointing outwards: the winding number exceeds 1/2 in the part of the shade's volume it mostly
    encloses, so the asset is kept (the documented generalised-winding-number behaviour), with an "open mesh" note."""
    write_obj(tmp_path / "shade.obj", *lamp_shade(inward=False))
    out = tmp_path / "out"
    summary = prepare_dataset(tiny_cfg(f"input={tmp_path / 'shade.obj'}", f"out={out}"))
    assert summary["prepared"] == 1 and summary["warnings"] == {"open mesh": 1}
    (entry,) = read_jsonl(out / "manifest.jsonl")
    assert "64 boundary or non-manifold edges" in entry["warnings"][0]["message"]


def test_gltf_with_a_missing_external_or_a_corrupt_embedded_texture_falls_back(tmp_path, assets_good, capfd):
    files = trimesh.load_scene(assets_good / "BoxTextured.glb").export(file_type="gltf")  # {name: bytes}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    document = json.loads(files["model.gltf"])
    document["images"] = [{"uri": "missing%20box.png"}]
    (tmp_path / "external.gltf").write_text(json.dumps(document))
    glb = bytearray((assets_good / "BoxTextured.glb").read_bytes())
    start = glb.find(b"\x89PNG")
    glb[start : start + 16] = bytes(16)  # the embedded PNG's signature and header destroyed
    (tmp_path / "corrupt.glb").write_bytes(bytes(glb))

    assert load_mesh(tmp_path / "model.gltf").color_source == "texture"  # the export itself is fine
    external, corrupt = load_mesh(tmp_path / "external.gltf"), load_mesh(tmp_path / "corrupt.glb")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert external.color_source == "material" and kinds(external.warnings) == ["texture missing"]
    assert "missing box.png" in external.warnings[0]["message"]
    assert corrupt.color_source == "material" and kinds(corrupt.warnings) == ["texture unreadable"]
