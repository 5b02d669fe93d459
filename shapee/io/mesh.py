"""Mesh export (.glb, .ply, .obj) with vertex colours, written atomically.

Colour convention (DESIGN.md): vertex colours are **sRGB**, the values the renders show. The official export writes
the linear-space values, which look too dark (openai/shap-e issue #86, reference §4.3); we do not. Per format:

* ``.ply``: 8-bit ``red green blue alpha`` vertex properties holding the sRGB values (binary little endian), as
  PLY readers and viewers expect;
* ``.obj``: ``v x y z r g b`` lines with the sRGB values as floats in [0, 1] (the common vertex-colour extension);
* ``.glb``: glTF 2.0 defines ``COLOR_0`` as a **linear** multiplier of the base colour, and glTF viewers (and
  :func:`shapee.data.mesh.load_mesh`) decode it as such. So the GLB stores ``srgb_to_linear(colour)``, as float32
  (no 8-bit banding in the darks), under a default (white) material; a compliant viewer shows the sRGB colour.

Textured meshes (``visual.kind == "texture"`` with an image, as :func:`shapee.render.texture.bake_mesh` makes them):

* ``.glb``: ``TEXCOORD_0`` (v flipped into glTF's top-left origin) and one PBR material: ``baseColorTexture`` = the
  image as an embedded PNG (sRGB-encoded, as the glTF spec defines that texture; the colour heads answer sRGB, so the
  texels are stored as they are), metallic 0, roughness 1; linear mip-mapped sampling, clamped at the edges;
* ``.obj``: ``v``/``vt`` lines and ``f v/vt`` faces, ``mtllib <stem>.mtl``, and beside it ``<stem>.mtl``
  (``map_Kd <stem>.png``, ``Kd 1 1 1``) and ``<stem>.png``: :func:`export_mesh` writes all three;
* ``.ply`` carries no texture: the texture sampled at the vertices becomes vertex colours.

Coordinates are written as they are (our world frame, +Z up), as the official export and our loader do: glTF's
convention is +Y up, so glTF viewers show the object lying on its back.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import trimesh
from trimesh.exchange.obj import export_obj
from trimesh.exchange.ply import export_ply

from shapee.data.mesh import sample_texture

__all__ = ["MESH_FORMATS", "export_mesh", "mesh_bytes", "mesh_files"]

MESH_FORMATS = (".glb", ".ply", ".obj")

# glTF constants (glTF 2.0 spec §3.6 / §5.1).
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_TRIANGLES = 4
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 decoding (numpy twin of :func:`shapee.render.lighting.srgb_to_linear`)."""
    return np.where(x <= 0.04045, x / 12.92, ((np.maximum(x, 0.04045) + 0.055) / 1.055) ** 2.4)


def _vertex_colors(mesh) -> np.ndarray | None:
    """sRGB RGBA ``[V, 4]`` uint8 of a mesh with per-vertex colours, else None."""
    visual = getattr(mesh, "visual", None)
    if visual is None or getattr(visual, "kind", None) != "vertex":
        return None
    return np.asarray(visual.vertex_colors, dtype=np.uint8)


def _texture(mesh) -> tuple[np.ndarray, bytes] | None:
    """UVs ``[V, 2]`` (v up) and the base-colour image as PNG bytes of a textured mesh, else None."""
    visual = getattr(mesh, "visual", None)
    if visual is None or getattr(visual, "kind", None) != "texture" or visual.uv is None:
        return None
    material = visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None:
        return None
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return np.asarray(visual.uv, dtype=np.float64), buffer.getvalue()


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"mesh must be a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.vertices) and not np.isfinite(mesh.vertices).all():
        raise ValueError("mesh.vertices contain NaN or inf")
    if len(mesh.faces) and (mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices)):
        raise ValueError(f"mesh.faces index outside [0, {len(mesh.vertices)})")


def _glb_bytes(mesh) -> bytes:
    """A one-mesh GLB: POSITION float32, COLOR_0 float32 RGBA (linear, see module docstring) or TEXCOORD_0 float32 +
    a PBR material with the embedded PNG, uint32 indices."""
    vertices = np.ascontiguousarray(mesh.vertices, dtype="<f4")  # [V, 3]
    indices = np.ascontiguousarray(mesh.faces, dtype="<u4").reshape(-1)  # [3F]
    textured = _texture(mesh)
    colors = None if textured is not None else _vertex_colors(mesh)
    blobs = [(vertices.tobytes(), _ARRAY_BUFFER)]  # (bytes, bufferView target or None)
    attributes = {"POSITION": 0}
    accessors = [{
        "bufferView": 0, "componentType": _FLOAT, "count": len(vertices), "type": "VEC3",
        # min/max are required for POSITION; an empty mesh has none, use 0.
        "min": (vertices.min(0) if len(vertices) else np.zeros(3)).tolist(),
        "max": (vertices.max(0) if len(vertices) else np.zeros(3)).tolist(),
    }]
    if colors is not None:
        rgba = colors.astype(np.float64) / 255.0  # [V, 4] sRGB
        rgba[:, :3] = _srgb_to_linear(rgba[:, :3])  # alpha is not colour-managed
        blobs.append((np.ascontiguousarray(rgba, dtype="<f4").tobytes(), _ARRAY_BUFFER))
        attributes["COLOR_0"] = len(accessors)
        accessors.append({"bufferView": len(blobs) - 1, "componentType": _FLOAT, "count": len(rgba), "type": "VEC4"})
    extra: dict = {}
    if textured is not None:
        uv, png = textured
        texcoord = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1).astype("<f4")  # [V, 2]: glTF's origin is top-left
        blobs.append((np.ascontiguousarray(texcoord).tobytes(), _ARRAY_BUFFER))
        attributes["TEXCOORD_0"] = len(accessors)
        accessors.append({"bufferView": len(blobs) - 1, "componentType": _FLOAT, "count": len(texcoord),
                          "type": "VEC2", "min": texcoord.min(0).tolist(), "max": texcoord.max(0).tolist()})
        blobs.append((png, None))  # an image's bufferView has no target
        extra = {
            "materials": [{"name": "shapee_baked", "pbrMetallicRoughness": {
                "baseColorTexture": {"index": 0, "texCoord": 0}, "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
            "textures": [{"sampler": 0, "source": 0}],
            "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR, "wrapS": _CLAMP_TO_EDGE,
                          "wrapT": _CLAMP_TO_EDGE}],
            "images": [{"bufferView": len(blobs) - 1, "mimeType": "image/png"}],
        }
    blobs.append((indices.tobytes(), _ELEMENT_ARRAY_BUFFER))
    primitive = {"attributes": attributes, "mode": _TRIANGLES}
    if textured is not None:
        primitive["material"] = 0
    if len(indices):
        primitive["indices"] = len(accessors)
        accessors.append({"bufferView": len(blobs) - 1, "componentType": _UINT32, "count": len(indices),
                          "type": "SCALAR"})
    views, offset, padded = [], 0, []
    for blob, target in blobs:  # each view starts 4-byte aligned (accessor components are 4 bytes; a PNG is not)
        view = {"buffer": 0, "byteOffset": offset, "byteLength": len(blob)}
        if target is not None:
            view["target"] = target
        views.append(view)
        blob += b"\x00" * (-len(blob) % 4)
        padded.append(blob)
        offset += len(blob)
    gltf = {
        "asset": {"version": "2.0", "generator": "shapee"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [primitive]}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": offset}],
        **extra,
    }
    json_chunk = json.dumps(gltf, separators=(",", ":")).encode()
    json_chunk += b" " * (-len(json_chunk) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    bin_chunk = b"".join(padded)
    total = 12 + 8 + len(json_chunk) + 8 + len(bin_chunk)
    return b"".join([
        struct.pack("<4sII", b"glTF", 2, total),
        struct.pack("<I4s", len(json_chunk), b"JSON"), json_chunk,
        struct.pack("<I4s", len(bin_chunk), b"BIN\x00"), bin_chunk,
    ])


def _textured_obj(mesh, stem: str, uv: np.ndarray) -> tuple[bytes, bytes]:
    """OBJ text (``v``, ``vt``, ``f v/vt``; one UV per vertex) and its MTL naming ``<stem>.png``."""
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64) + 1  # OBJ indices start at 1
    lines = [f"mtllib {stem}.mtl", "usemtl shapee_baked"]
    lines += [f"v {x:.8g} {y:.8g} {z:.8g}" for x, y, z in v]
    lines += [f"vt {a:.8g} {b:.8g}" for a, b in uv]
    lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f]
    # Kd 1 scales map_Kd by one; Ks 0 and illum 1: a diffuse material, as the glTF one (metallic 0, roughness 1).
    mtl = f"newmtl shapee_baked\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {stem}.png\n"
    return ("\n".join(lines) + "\n").encode(), mtl.encode()


def mesh_files(mesh, path: str | os.PathLike) -> dict[Path, bytes]:
    """Every file that writing ``mesh`` to ``path`` makes, with its contents: ``{path: bytes}``, and for a textured
    mesh as ``.obj`` also ``<stem>.mtl`` and ``<stem>.png`` beside it (the image first, the OBJ last)."""
    path = Path(path)
    file_format = path.suffix.lower()
    if file_format not in MESH_FORMATS:
        raise ValueError(f"unknown mesh format {file_format!r}; supported: {', '.join(MESH_FORMATS)}")
    _check_mesh(mesh)
    if len(mesh.vertices) == 0:  # an empty mesh (no zero crossing): trimesh's writers choke on its colour array
        mesh = trimesh.Trimesh()
    if file_format == ".glb":
        return {path: _glb_bytes(mesh)}
    textured = _texture(mesh)
    if file_format == ".ply":
        if textured is not None:  # PLY has no textures: the texture at the vertices (bilinear) as vertex colours
            visual = mesh.visual
            image = getattr(visual.material, "baseColorTexture", None) or visual.material.image
            rgb = sample_texture(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, textured[0])  # [V, 3]
            rgba = np.concatenate([np.rint(np.clip(rgb, 0, 1) * 255), np.full((len(rgb), 1), 255)], axis=1)
            mesh = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=rgba.astype(np.uint8),
                                   process=False)
        return {path: export_ply(mesh, encoding="binary", vertex_normal=False, include_attributes=False)}
    if textured is not None:
        uv, png = textured
        obj, mtl = _textured_obj(mesh, path.stem, uv)
        return {path.with_suffix(".png"): png, path.with_suffix(".mtl"): mtl, path: obj}
    # trimesh writes per-vertex colours as "v x y z r g b" (floats, 8 decimals: exact for 8-bit values).
    text = export_obj(mesh, include_normals=False, include_color=True, include_texture=False, header=None)
    return {path: text.encode()}


def mesh_bytes(mesh, file_format: str) -> bytes:
    """The file contents of ``mesh`` (a ``trimesh.Trimesh``) in ``file_format`` (``".glb"``, ``".ply"``, ``".obj"``);
    for a textured ``.obj`` the OBJ text only (it names ``mesh.mtl``; :func:`mesh_files` gives all three)."""
    name = Path("mesh" + file_format.lower())
    return mesh_files(mesh, name)[name]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_mesh(mesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` (a ``trimesh.Trimesh`` with sRGB vertex colours, or textured) to ``path``; the format follows
    the suffix. A textured ``.obj`` also writes ``<stem>.mtl`` and ``<stem>.png`` beside it.

    Atomic: each file is written beside ``path`` under a temporary name and renamed over it, so a reader never sees a
    partial file (the texture and material before the OBJ that names them). Parent folders are created. Returns
    ``path``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise ValueError(f"{path}: unknown mesh file extension {path.suffix!r}; supported: {', '.join(MESH_FORMATS)}")
    files = mesh_files(mesh, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        _write_atomic(file, data)
    return path
