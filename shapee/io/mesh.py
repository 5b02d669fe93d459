"""Mesh export (.glb, .ply, .obj) with vertex colours, written atomically.

Colour convention (DESIGN.md): vertex colours are **sRGB**, the values the renders show. The official export writes
the linear-space values, which look too dark (openai/shap-e issue #86, reference §4.3); we do not. Per format:

* ``.ply``: 8-bit ``red green blue alpha`` vertex properties holding the sRGB values (binary little endian), as
  PLY readers and viewers expect;
* ``.obj``: ``v x y z r g b`` lines with the sRGB values as floats in [0, 1] (the common vertex-colour extension);
* ``.glb``: glTF 2.0 defines ``COLOR_0`` as a **linear** multiplier of the base colour, and glTF viewers (and
  :func:`shapee.data.mesh.load_mesh`) decode it as such. So the GLB stores ``srgb_to_linear(colour)``, as float32
  (no 8-bit banding in the darks), under a default (white) material; a compliant viewer shows the sRGB colour.

Coordinates are written as they are (our world frame, +Z up), as the official export and our loader do: glTF's
convention is +Y up, so glTF viewers show the object lying on its back.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["MESH_FORMATS", "export_mesh", "mesh_bytes"]

MESH_FORMATS = (".glb", ".ply", ".obj")

# glTF constants (glTF 2.0 spec §3.6 / §5.1).
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_TRIANGLES = 4


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 decoding (numpy twin of :func:`shapee.render.lighting.srgb_to_linear`)."""
    return np.where(x <= 0.04045, x / 12.92, ((np.maximum(x, 0.04045) + 0.055) / 1.055) ** 2.4)


def _vertex_colors(mesh) -> np.ndarray | None:
    """sRGB RGBA ``[V, 4]`` uint8 of a mesh with per-vertex colours, else None."""
    visual = getattr(mesh, "visual", None)
    if visual is None or getattr(visual, "kind", None) != "vertex":
        return None
    return np.asarray(visual.vertex_colors, dtype=np.uint8)


def _check_mesh(mesh) -> None:
    import trimesh

    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"mesh must be a trimesh.Trimesh, got {type(mesh).__name__}")
    if len(mesh.vertices) and not np.isfinite(mesh.vertices).all():
        raise ValueError("mesh.vertices contain NaN or inf")
    if len(mesh.faces) and (mesh.faces.min() < 0 or mesh.faces.max() >= len(mesh.vertices)):
        raise ValueError(f"mesh.faces index outside [0, {len(mesh.vertices)})")


def _glb_bytes(mesh) -> bytes:
    """A one-mesh GLB: POSITION float32, COLOR_0 float32 RGBA (linear, see module docstring), uint32 indices."""
    vertices = np.ascontiguousarray(mesh.vertices, dtype="<f4")  # [V, 3]
    indices = np.ascontiguousarray(mesh.faces, dtype="<u4").reshape(-1)  # [3F]
    colors = _vertex_colors(mesh)
    blobs = [vertices.tobytes()]
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
        blobs.append(np.ascontiguousarray(rgba, dtype="<f4").tobytes())
        attributes["COLOR_0"] = len(accessors)
        accessors.append({"bufferView": 1, "componentType": _FLOAT, "count": len(rgba), "type": "VEC4"})
    blobs.append(indices.tobytes())
    primitive = {"attributes": attributes, "mode": _TRIANGLES}
    if len(indices):
        primitive["indices"] = len(accessors)
        accessors.append({"bufferView": len(blobs) - 1, "componentType": _UINT32, "count": len(indices),
                          "type": "SCALAR"})
    views, offset = [], 0
    for i, blob in enumerate(blobs):  # every blob is a multiple of 4 bytes (4-byte components)
        target = _ELEMENT_ARRAY_BUFFER if i == len(blobs) - 1 else _ARRAY_BUFFER
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(blob), "target": target})
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
    }
    json_chunk = json.dumps(gltf, separators=(",", ":")).encode()
    json_chunk += b" " * (-len(json_chunk) % 4)  # chunks are 4-byte aligned; JSON pads with spaces
    bin_chunk = b"".join(blobs)
    total = 12 + 8 + len(json_chunk) + 8 + len(bin_chunk)
    return b"".join([
        struct.pack("<4sII", b"glTF", 2, total),
        struct.pack("<I4s", len(json_chunk), b"JSON"), json_chunk,
        struct.pack("<I4s", len(bin_chunk), b"BIN\x00"), bin_chunk,
    ])


def mesh_bytes(mesh, file_format: str) -> bytes:
    """The file contents of ``mesh`` (a ``trimesh.Trimesh``) in ``file_format`` (``".glb"``, ``".ply"``, ``".obj"``)."""
    from trimesh.exchange.obj import export_obj
    from trimesh.exchange.ply import export_ply

    _check_mesh(mesh)
    if len(mesh.vertices) == 0:  # an empty mesh (no zero crossing): trimesh's writers choke on its colour array
        import trimesh

        mesh = trimesh.Trimesh()
    file_format = file_format.lower()
    if file_format == ".glb":
        return _glb_bytes(mesh)
    if file_format == ".ply":
        return export_ply(mesh, encoding="binary", vertex_normal=False, include_attributes=False)
    if file_format == ".obj":
        # trimesh writes per-vertex colours as "v x y z r g b" (floats, 8 decimals: exact for 8-bit values).
        text = export_obj(mesh, include_normals=False, include_color=True, include_texture=False, header=None)
        return text.encode()
    raise ValueError(f"unknown mesh format {file_format!r}; supported: {', '.join(MESH_FORMATS)}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_mesh(mesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` (a ``trimesh.Trimesh`` with sRGB vertex colours) to ``path``; the format follows the suffix.

    Atomic: the file is written beside ``path`` under a temporary name and renamed over it, so a reader never sees a
    partial mesh. Parent folders are created. Returns ``path``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise ValueError(f"{path}: unknown mesh file extension {path.suffix!r}; supported: {', '.join(MESH_FORMATS)}")
    data = mesh_bytes(mesh, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    return path
