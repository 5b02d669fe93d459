"""Meshes as the data pipeline sees them: geometry in the normalised world frame plus a colour model.

Colour model: every face has three corner colours (sRGB). A textured face additionally samples one of ``textures``
at its interpolated UV and multiplies it by the interpolated corner colour (the material's colour factor, white if
none). Untextured faces use the interpolated corner colours (vertex colours, material colour or neutral grey).

Colour sources: :func:`resolve_colors` alone decides, per geometry of a file, where its colours come from; the first
that is present *and usable* wins: UV texture → vertex (or face) colours → material colour → neutral grey. A source
the file declares but that cannot be used (texture image missing or undecodable, ``mtllib`` missing, ``usemtl``
naming no material) falls through to the next one and becomes an entry of ``Mesh.warnings`` (``{"kind",
"message"}``, kinds in :data:`WARNING_KINDS`); what trimesh logs while loading is captured into the same list
instead of reaching the console. ``Mesh.color_source`` names the source that was used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings as pywarnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import trimesh
from PIL import Image

COLOR_SOURCES = ("texture", "vertex", "material", "default")  # Mesh.color_source values, in priority order
# Mesh.warnings kinds: a declared colour source that could not be used, or something the loader reported.
WARNING_KINDS = ("texture missing", "texture unreadable", "mtllib missing", "material unknown", "loader message")


class MeshError(ValueError):
    """A mesh file that cannot become a training asset. ``str(error)`` names the file and a readable reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Mesh:
    """A triangle mesh with colours, in the normalised world frame (see module docstring)."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int64
    corner_colors: np.ndarray  # [F, 3, 3] float32 sRGB in [0, 1]
    corner_uvs: np.ndarray | None = None  # [F, 3, 2] float32, OpenGL convention (v up)
    face_texture: np.ndarray | None = None  # [F] int64 into `textures`, -1 = untextured
    textures: list[np.ndarray] = field(default_factory=list)  # each [H, W, 3] float32 sRGB in [0, 1]
    color_source: str = "default"  # "texture" | "vertex" | "material" | "default"
    source: str = ""
    warnings: list[dict] = field(default_factory=list)  # [{"kind": one of WARNING_KINDS, "message": str}]

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int64)
        self.corner_colors = np.ascontiguousarray(self.corner_colors, dtype=np.float32)
        if self.face_texture is None:
            self.face_texture = np.full(len(self.faces), -1, dtype=np.int64)
        self.face_texture = np.ascontiguousarray(self.face_texture, dtype=np.int64)
        if self.corner_uvs is not None:
            self.corner_uvs = np.ascontiguousarray(self.corner_uvs, dtype=np.float32)
        self._check()

    def _check(self) -> None:
        """Shapes and index ranges of the fields; a clear ValueError names the field that is wrong."""
        n_faces = len(self.faces)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"Mesh.vertices must be [V, 3], got {self.vertices.shape}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"Mesh.faces must be [F, 3], got {self.faces.shape}")
        if n_faces and (self.faces.min() < 0 or self.faces.max() >= len(self.vertices)):
            raise ValueError(f"Mesh.faces index outside [0, {len(self.vertices)})")
        if self.corner_colors.shape != (n_faces, 3, 3):
            raise ValueError(f"Mesh.corner_colors must be [F, 3, 3] = [{n_faces}, 3, 3], "
                             f"got {self.corner_colors.shape}")
        if self.face_texture.shape != (n_faces,):
            raise ValueError(f"Mesh.face_texture must be [F] = [{n_faces}], got {self.face_texture.shape}")
        if n_faces and (self.face_texture.min() < -1 or self.face_texture.max() >= len(self.textures)):
            raise ValueError(f"Mesh.face_texture must lie in [-1, {len(self.textures)}) (-1 = untextured)")
        if self.corner_uvs is not None and self.corner_uvs.shape != (n_faces, 3, 2):
            raise ValueError(f"Mesh.corner_uvs must be [F, 3, 2] = [{n_faces}, 3, 2], got {self.corner_uvs.shape}")
        if self.corner_uvs is None and (self.face_texture >= 0).any():
            raise ValueError("Mesh.corner_uvs is None but some faces are textured (face_texture >= 0)")
        for i, texture in enumerate(self.textures):
            if texture.ndim != 3 or texture.shape[2] != 3:
                raise ValueError(f"Mesh.textures[{i}] must be [H, W, 3], got {texture.shape}")
        if self.color_source not in COLOR_SOURCES:
            raise ValueError(f"Mesh.color_source must be one of {COLOR_SOURCES}, got {self.color_source!r}")

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    def triangles(self) -> np.ndarray:
        """Corner positions ``[F, 3, 3]``."""
        return self.vertices[self.faces]

    def face_normals(self) -> np.ndarray:
        """Unit face normals ``[F, 3]`` (right-hand rule on the corner order; zero for degenerate faces)."""
        tri = self.triangles().astype(np.float64)
        n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norm = np.linalg.norm(n, axis=-1, keepdims=True)
        return (n / np.where(norm > 0, norm, 1.0)).astype(np.float32)

    def face_areas(self) -> np.ndarray:
        tri = self.triangles().astype(np.float64)
        return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)

    def sample_surface(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Area-uniform surface samples: points ``[n, 3]`` float32 and their face ids ``[n]``."""
        areas = self.face_areas()
        face_ids = rng.choice(len(areas), size=n, p=areas / areas.sum())
        r1, r2 = rng.random(n), rng.random(n)
        s = np.sqrt(r1)
        bary = np.stack([1 - s, s * (1 - r2), s * r2], axis=-1)  # [n, 3]
        points = np.einsum("nk,nkc->nc", bary, self.triangles()[face_ids].astype(np.float64))
        return points.astype(np.float32), face_ids

    def albedo(self, face_index: np.ndarray, barycentric: np.ndarray) -> np.ndarray:
        """Flat sRGB albedo ``[K, 3]`` float32 at points given by ``face_index`` ``[K]`` and ``barycentric`` ``[K, 3]``.

        Called once per pixel of every rendered view (millions of points per asset), hence the shortcuts: faces
        whose three corner colours agree skip the interpolation, and only textured points compute a UV.
        """
        face_index = np.asarray(face_index, dtype=np.int64)
        bary = np.asarray(barycentric, dtype=np.float32)
        if bary.shape != (len(face_index), 3):
            raise ValueError(f"barycentric must have shape [{len(face_index)}, 3] to match face_index, "
                             f"got {bary.shape}")
        corners = self.corner_colors
        if (corners == corners[:, :1]).all():  # flat colour per face (textured OBJ, material colours)
            color = np.take(corners[:, 0], face_index, axis=0)  # [K, 3]
        else:
            color = _interpolate(corners, face_index, bary)  # [K, 3]
        if self.corner_uvs is not None and self.textures:
            tex_id = np.take(self.face_texture, face_index)  # [K]
            for t, texture in enumerate(self.textures):
                sel = tex_id == t  # [K]
                if sel.all():
                    color *= sample_texture(texture, _interpolate(self.corner_uvs, face_index, bary))
                elif sel.any():
                    sel = np.flatnonzero(sel)  # [K_t]
                    color[sel] *= sample_texture(texture, _interpolate(self.corner_uvs, face_index[sel], bary[sel]))
        return np.clip(color, 0.0, 1.0, out=color)


def _interpolate(corner_values: np.ndarray, face_index: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """Barycentric blend of per-corner values: ``corner_values`` ``[F, 3, C]``, ``face_index`` ``[K]``, ``bary``
    ``[K, 3]`` → ``[K, C]`` float32."""
    corners = np.take(corner_values, face_index, axis=0)  # [K, 3, C]
    return np.einsum("kc,kcd->kd", bary, corners, dtype=np.float32)


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with wrap-around: ``texture`` ``[H, W, 3]``, ``uv`` ``[K, 2]`` (v up) → ``[K, 3]`` float32."""
    h, w = texture.shape[:2]
    # A one-texel wrap-around border makes the four neighbours of any lookup plain flat offsets (no modulo), and
    # np.take of whole rows of a flat [(H+2)·(W+2), 3] array is several times faster than texture[y, x].
    texels = np.pad(np.asarray(texture, dtype=np.float32), ((1, 1), (1, 1), (0, 0)), mode="wrap")
    texels = texels.reshape(-1, 3)  # [(H+2)·(W+2), 3]
    uv = np.asarray(uv, dtype=np.float32)
    u, v = uv[:, 0], uv[:, 1]  # [K] each
    # Texel centres sit at (i + 0.5) / size and v = 0 is the bottom row of the image; the +1 is the border.
    x = (u - np.floor(u)) * np.float32(w) + np.float32(0.5)  # [K] in [0.5, W + 0.5]
    y = (np.floor(v) - v + np.float32(1.0)) * np.float32(h) + np.float32(0.5)  # [K] in [0.5, H + 0.5]
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]  # [K, 1] position between the neighbouring texel centres
    i00 = y0.astype(np.intp) * (w + 2) + x0.astype(np.intp)  # [K] flat index of the upper-left neighbour
    c00, c01 = np.take(texels, i00, axis=0), np.take(texels, i00 + 1, axis=0)  # [K, 3] each
    i00 += w + 2  # the row below
    c10, c11 = np.take(texels, i00, axis=0), np.take(texels, i00 + 1, axis=0)
    # In place: c00 += (c01 − c00)·fx, c10 += (c11 − c10)·fx, c00 += (c10 − c00)·fy.
    c01 -= c00
    c01 *= fx
    c00 += c01
    c11 -= c10
    c11 *= fx
    c10 += c11
    c10 -= c00
    c10 *= fy
    c00 += c10
    return c00


def normalise(vertices: np.ndarray) -> np.ndarray:
    """Centre the bounding box at the origin and scale its largest side to 2 (so the mesh spans [-1, 1])."""
    vertices = np.asarray(vertices, dtype=np.float64)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise ValueError("cannot normalise a mesh with zero or non-finite extent")
    return ((vertices - (lo + hi) / 2) * (2.0 / extent)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------

SUPPORTED_EXTENSIONS = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
NEUTRAL_GREY = 0.5  # sRGB albedo of faces whose file carries no colour
# A face is degenerate when its area is below this fraction of (largest bbox side)^2. Float32 coordinates resolve
# ~1e-7 of the extent, so 1e-12 only catches faces that are zero-area up to rounding (repeated or collinear corners).
DEGENERATE_AREA_FRACTION = 1e-12
# trimesh fills a material that names no colour (an MTL without Kd) with this grey; we treat it as "no colour".
_TRIMESH_DEFAULT_RGBA = (102, 102, 102, 255)
_OBJ_SHORT_FACE = re.compile(r"^[ \t]*f(?:[ \t]+\S+){0,2}[ \t\r]*$", re.MULTILINE)
_OBJ_FACE = re.compile(r"^[ \t]*f[ \t]", re.MULTILINE)
_OBJ_LINE = re.compile(r"^[ \t]*l[ \t]", re.MULTILINE)
_OBJ_VERTEX = re.compile(r"^[ \t]*v[ \t]", re.MULTILINE)
_OBJ_NONFINITE_VERTEX = re.compile(r"^[ \t]*v[ \t][^\n]*(?:nan|inf)[^\n]*$", re.MULTILINE | re.IGNORECASE)
_OBJ_MTLLIB = re.compile(r"^[ \t]*mtllib(?:[ \t]+([^\r\n]*))?[ \t\r]*$", re.MULTILINE)
_OBJ_USEMTL = re.compile(r"^[ \t]*usemtl(?:[ \t]+([^\r\n]*))?[ \t\r]*$", re.MULTILINE)
_PLY_COLOR_PROPERTIES = ("red", "green", "blue", "alpha", "r", "g", "b", "diffuse_red", "diffuse_green", "diffuse_blue")


def load_mesh(path: str | os.PathLike) -> Mesh:
    """Load a mesh file as one coloured :class:`Mesh` in the normalised world frame.

    Formats: OBJ (+MTL: ``map_Kd`` UV textures, ``Kd`` colours), glTF/GLB (embedded or external ``baseColorTexture``,
    ``baseColorFactor``, ``COLOR_0``, node transforms), PLY (vertex or face colours), STL, OFF. A scene is flattened
    into one mesh: every geometry instance is moved by its node's world transform and the results are concatenated;
    the distinct textures become ``textures`` with ``face_texture`` pointing into them.

    The official pipeline (reference §6.2) imports these formats into Blender and renders each material's base
    colour as flat albedo; here that base colour is made explicit per geometry, first that applies: UV texture (times
    glTF ``baseColorFactor`` × ``COLOR_0``), vertex/face colours, material colour, neutral grey 0.5. glTF factors and
    ``COLOR_0`` are linear by the glTF spec and are converted to sRGB; 8-bit colours, MTL ``Kd`` and textures are
    taken as sRGB. ``Mesh.color_source`` is the source covering the largest area (see :func:`resolve_colors`).

    A colour source the file declares but that cannot be used (a missing or undecodable texture image, a missing
    ``mtllib``, a ``usemtl`` naming no material) is not an error: the geometry falls back to the next source and
    ``Mesh.warnings`` says what happened. Whatever trimesh logs while parsing is captured into ``Mesh.warnings``
    too (kind ``"loader message"``) instead of being printed.

    Faces of zero area are dropped and vertices no face uses are removed (they would widen the bounding box);
    nothing else is repaired (no merging, no re-orientation). The result is normalised with :func:`normalise`:
    bounding box centred, largest side 2 (§6.2 scales it to 1 and later multiplies coordinates by 2).

    Raises:
        MeshError: for anything that cannot become a training asset (missing file, unsupported extension, empty
            file, point cloud, wireframe, face index out of range, non-finite positions or colours, zero extent,
            only degenerate faces, or any parser failure, whose message is kept in the reason).
    """
    path_str = os.fspath(path)
    file = Path(path_str)
    if not file.exists():
        raise MeshError(path_str, "file not found")
    if not file.is_file():
        raise MeshError(path_str, "not a regular file")
    ext = file.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise MeshError(path_str, f"unsupported file extension {ext or '(none)'!r}; supported: "
                        + ", ".join(SUPPORTED_EXTENSIONS))
    try:
        # trimesh silently drops what it cannot represent (short faces, 'l' elements, NaN colours, sidecar files it
        # cannot find): look first.
        sidecars = _Sidecars()
        if ext == ".obj":
            sidecars = _check_obj_sidecars(path_str, _check_obj_text(path_str))
        elif ext == ".ply":
            sidecars = _check_ply_sidecars(path_str, _check_ply_header(path_str))
        elif ext in (".gltf", ".glb"):
            sidecars = _check_gltf_sidecars(path_str)
        with _captured_loader_messages() as messages:
            try:
                scene = trimesh.load_scene(path_str, process=False)
            except IndexError as error:
                if ext == ".obj":  # trimesh indexes the vertex arrays with the face tokens as they are
                    raise MeshError(path_str, f"face index out of range ({error})") from error
                raise
        mesh = _scene_to_mesh(scene, path_str, is_gltf=ext in (".glb", ".gltf"), sidecars=sidecars)
        mesh.warnings = _unique(sidecars.warnings + mesh.warnings + _loader_warnings(messages, sidecars.warnings))
        if sidecars.declares_texture and not mesh.textures and not mesh.warnings:
            mesh.warnings.append(_warning("texture unreadable", "the file declares a base-colour texture but none "
                                          "could be loaded"))
        return mesh
    except MeshError:
        raise
    except Exception as error:  # never let one broken asset stop a batch run
        raise MeshError(path_str, f"could not read {ext} file: {type(error).__name__}: {error}") from error


def _check_obj_text(path: str) -> str:
    """Problems of an OBJ that trimesh would hide: short faces, line-only files, NaN colours, no geometry.

    Returns the text (the sidecar check reads its ``mtllib`` / ``usemtl`` lines).
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    short = _OBJ_SHORT_FACE.search(text)
    if short is not None:
        line = text.count("\n", 0, short.start()) + 1
        raise MeshError(path, f"face with fewer than 3 vertex indices (line {line}: {short.group(0).strip()!r})")
    n_faces = len(_OBJ_FACE.findall(text))
    if n_faces == 0:
        n_lines, n_vertices = len(_OBJ_LINE.findall(text)), len(_OBJ_VERTEX.findall(text))
        if n_lines:
            raise MeshError(path, f"no faces: only line segments ({n_lines} 'l' elements)")
        if n_vertices:
            raise MeshError(path, f"no faces: point cloud ({n_vertices} vertices)")
        raise MeshError(path, "empty mesh: no vertices or faces")
    for match in _OBJ_NONFINITE_VERTEX.finditer(text):  # only the rare lines that spell nan/inf
        values = np.array([_parse_float(t) for t in match.group(0).split()[1:]])
        if len(values) >= 6 and not np.isfinite(values[3:6]).all():
            line = text.count("\n", 0, match.start()) + 1
            raise MeshError(path, f"NaN in vertex colours (line {line}: {match.group(0).strip()!r})")
    return text


def _parse_float(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        return float("nan")


def _check_ply_header(path: str) -> bytes:
    """A PLY whose header declares no elements has nothing to load; say so instead of 'empty scene'.

    Returns the header bytes (the sidecar check reads its ``comment TextureFile`` line).
    """
    with open(path, "rb") as f:
        head = f.read(65536)
    if not head.startswith(b"ply"):
        raise MeshError(path, "unreadable PLY header: file does not start with 'ply'")
    end = head.find(b"end_header")
    if end < 0:
        raise MeshError(path, "unreadable PLY header: no 'end_header' in the first 64 KiB")
    elements = re.findall(rb"^element\s+(\S+)\s+(\d+)", head[:end], re.MULTILINE)
    counts = {name.decode(errors="replace"): int(n) for name, n in elements}
    if not elements or counts.get("vertex", 0) == 0:
        raise MeshError(path, "empty mesh: the PLY header declares no vertices")
    if counts.get("face", 0) == 0:
        raise MeshError(path, f"no faces: point cloud ({counts['vertex']} vertices)")
    return head[:end]


# ------------------------------------------------------------------------------ sidecar files and loader messages
@dataclass
class _Sidecars:
    """What the checks of a file's sidecars (MTL, texture images) found before trimesh parses the file."""

    warnings: list[dict] = field(default_factory=list)
    # The PLY names a texture that cannot be used: trimesh then invents a 2×2 grey placeholder image, which must not
    # count as a texture (the vertex colours it dropped are the better source).
    ply_texture_unusable: bool = False
    # The file declares a base-colour texture (glTF): if none is loaded and no check explained why, say so.
    declares_texture: bool = False


def _warning(kind: str, message: str) -> dict:
    assert kind in WARNING_KINDS, kind
    return {"kind": kind, "message": message}


def _unique(entries: list[dict]) -> list[dict]:
    """Drop repeated warnings (a material shared by many geometries reports once), keeping the first order."""
    seen, out = set(), []
    for e in entries:
        key = (e["kind"], e["message"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _find_sidecar(mesh_path: str, name: str) -> Path | None:
    """The file ``name`` refers to, looked up the way trimesh's resolver does (as written, without a leading '/',
    by its base name; all inside the mesh's folder); None if there is none."""
    parent = Path(mesh_path).resolve().parent
    for candidate in (name.strip(), name.strip().lstrip("/"), os.path.split(name)[-1]):
        if not candidate:
            continue
        path = (parent / candidate).resolve()
        if path.is_relative_to(parent) and path.is_file():
            return path
    return None


def _check_image(mesh_path: str, name: str, owner: str) -> dict | None:
    """A warning if the texture image ``name`` (referenced by ``owner``) is missing or not an image, else None.

    Only the header is read here (cheap); an image whose pixel data turns out to be broken is caught when it is
    decoded (:func:`resolve_colors`).
    """
    found = _find_sidecar(mesh_path, name)
    if found is None:
        return _warning("texture missing", f"texture image {name!r} ({owner}) not found")
    try:
        with Image.open(found) as image:
            image.verify()
    except Exception as error:
        return _warning("texture unreadable", f"texture image {name!r} ({owner}) is not a readable image: "
                        f"{type(error).__name__}: {error}")
    return None


def _check_obj_sidecars(path: str, text: str) -> _Sidecars:
    """``mtllib`` files that exist, ``usemtl`` names they define, ``map_Kd`` images that exist and open."""
    out = _Sidecars()
    libraries = [(m.group(1) or "").strip() for m in _OBJ_MTLLIB.finditer(text)]
    used = {(m.group(1) or "").strip() for m in _OBJ_USEMTL.finditer(text)}
    defined: set[str] = set()
    loaded = False
    for name in libraries[:1]:  # trimesh reads the first mtllib line only
        found = _find_sidecar(path, name) if name else None
        if found is None:
            out.warnings.append(_warning("mtllib missing", f"material library {name!r} (mtllib) not found"))
            continue
        loaded, material = True, None
        for raw in found.read_text(encoding="utf-8", errors="replace").splitlines():
            split = raw.strip().split()
            if not split:
                continue
            key = split[0].lower()
            if key == "newmtl":
                material = " ".join(split[1:])
                defined.add(material)
            elif key == "map_kd" and material is not None:
                image_name = raw[raw.lower().index("map_kd") + 6 :].strip()
                problem = _check_image(path, image_name, f"map_Kd of material {material!r}")
                if problem is not None:
                    out.warnings.append(problem)
    if used and not libraries:
        out.warnings.append(_warning("mtllib missing", f"usemtl {sorted(used)} but the file names no material "
                                     "library (no mtllib line)"))
    elif loaded:
        for name in sorted(used - defined):
            what = "usemtl without a material name" if not name else f"usemtl {name!r} names no material in the library"
            out.warnings.append(_warning("material unknown", what))
    return out


def _check_ply_sidecars(path: str, header: bytes) -> _Sidecars:
    """The image of a ``comment TextureFile <name>`` header line exists and opens."""
    out = _Sidecars()
    for raw in header.decode("utf-8", errors="replace").splitlines():
        lower = raw.lower()
        if raw.strip().lower().startswith("comment") and "texturefile" in lower:
            name = raw[lower.index("texturefile") + 11 :].strip()
            problem = _check_image(path, name, "PLY TextureFile")
            if problem is not None:
                out.warnings.append(problem)
                out.ply_texture_unusable = True
    return out


def _check_gltf_sidecars(path: str) -> _Sidecars:
    """External image URIs of a glTF that are missing or not images; whether any material declares a base-colour
    texture. A JSON this cannot read is left to trimesh (whose error then names the problem)."""
    out = _Sidecars()
    try:
        data = Path(path).read_bytes()
        if data[:4] == b"glTF":  # GLB: 12-byte header, then the JSON chunk (length, type "JSON", bytes)
            length = int.from_bytes(data[12:16], "little")
            document = json.loads(data[20 : 20 + length]) if data[16:20] == b"JSON" else {}
        else:
            document = json.loads(data)
    except (OSError, ValueError):
        return out
    if not isinstance(document, dict):
        return out
    out.declares_texture = any(
        isinstance(m, dict) and "baseColorTexture" in (m.get("pbrMetallicRoughness") or {})
        for m in document.get("materials") or [])
    for image in document.get("images") or []:
        uri = image.get("uri") if isinstance(image, dict) else None
        if isinstance(uri, str) and not uri.startswith("data:"):
            problem = _check_image(path, unquote(uri), "glTF image uri")
            if problem is not None:
                out.warnings.append(problem)
    return out


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured_loader_messages():
    """Within the block, trimesh's log records (warning and above) and Python warnings are collected in the yielded
    list as ``(text, exception or None)`` instead of reaching the console."""
    logger = logging.getLogger("trimesh")
    handler = _ListHandler()
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers, logger.propagate = [handler], False
    if logger.level == logging.NOTSET or logger.level > logging.WARNING:
        logger.setLevel(logging.WARNING)
    messages: list[tuple[str, BaseException | None]] = []
    try:
        with pywarnings.catch_warnings(record=True) as caught:
            pywarnings.simplefilter("always")
            yield messages
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
        for record in handler.records:
            error = record.exc_info[1] if record.exc_info else None
            messages.append((record.getMessage(), error))
        messages.extend((f"{w.category.__name__}: {w.message}", None) for w in caught)


def _loader_warnings(messages: list[tuple[str, BaseException | None]], known: list[dict]) -> list[dict]:
    """Captured loader messages as warnings; image complaints already explained by a sidecar check are dropped."""
    explained = any(w["kind"].startswith("texture") for w in known)
    out = []
    for text, error in messages:
        about_image = "image" in text.lower()
        if about_image and explained:
            continue
        detail = f"trimesh: {text}" + (f" ({type(error).__name__}: {error})" if error is not None else "")
        out.append(_warning("texture unreadable" if about_image else "loader message", detail))
    return out


@dataclass
class _Part:
    """One geometry instance converted to the Mesh colour model, in world coordinates of the file."""

    vertices: np.ndarray  # [V, 3] float64
    faces: np.ndarray  # [F, 3] int64
    corner_colors: np.ndarray  # [F, 3, 3] float32 sRGB
    corner_uvs: np.ndarray | None  # [F, 3, 2] float32
    texture: Any  # PIL image (decoded) or None
    color_source: str
    warnings: list[dict] = field(default_factory=list)


def _scene_to_mesh(scene: trimesh.Scene, path: str, is_gltf: bool, sidecars: _Sidecars | None = None) -> Mesh:
    parts: list[_Part] = []
    n_points = n_paths = 0
    for node in scene.graph.nodes_geometry:
        transform, geometry_name = scene.graph[node]
        geometry = scene.geometry[geometry_name]
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) > 0:
            parts.append(_convert_geometry(geometry, np.asarray(transform, dtype=np.float64), path, is_gltf,
                                           sidecars or _Sidecars()))
        elif isinstance(geometry, trimesh.path.path.Path):
            n_paths += 1
        elif hasattr(geometry, "vertices"):
            n_points += len(geometry.vertices)
    if not parts:
        if n_paths:
            raise MeshError(path, f"no faces: only line segments ({n_paths} path geometries)")
        if n_points:
            raise MeshError(path, f"no faces: point cloud ({n_points} points)")
        raise MeshError(path, "empty mesh: the file holds no geometry")
    return _assemble(parts, path)


def _convert_geometry(geometry: trimesh.Trimesh, transform: np.ndarray, path: str, is_gltf: bool,
                      sidecars: _Sidecars) -> _Part:
    """Move one geometry by its node transform [4, 4] and express its colours as corner colours / UVs."""
    name = geometry.metadata.get("name", "")
    vertices = np.asarray(geometry.vertices, dtype=np.float64)  # [V, 3]
    faces = np.asarray(geometry.faces, dtype=np.int64)  # [F, 3]
    if faces.min() < 0 or faces.max() >= len(vertices):
        bad = faces.max() if faces.max() >= len(vertices) else faces.min()
        raise MeshError(path, f"face index out of range (index {bad} with {len(vertices)} vertices"
                        + (f" in {name!r})" if name else ")"))
    vertices = vertices @ transform[:3, :3].T + transform[:3, 3]  # [V, 3]
    if np.linalg.det(transform[:3, :3]) < 0:
        # A mirroring node turns counter-clockwise corners clockwise; swap two corners to keep normals outward.
        faces = faces[:, [0, 2, 1]]
    _check_ply_colors(geometry, path)

    colors = resolve_colors(geometry, faces, path=path, is_gltf=is_gltf,
                            texture_unusable=sidecars.ply_texture_unusable)
    return _Part(vertices, faces, colors.corner_colors, colors.corner_uvs, colors.texture, colors.source,
                 colors.warnings)


@dataclass
class ResolvedColors:
    """The colours of one geometry (:func:`resolve_colors`)."""

    corner_colors: np.ndarray  # [F, 3, 3] float32 sRGB in [0, 1]
    corner_uvs: np.ndarray | None  # [F, 3, 2] float32 when textured
    texture: Any  # decoded PIL image when textured, else None
    source: str  # one of COLOR_SOURCES
    warnings: list[dict]  # sources present but unusable, {"kind", "message"}


def resolve_colors(geometry: trimesh.Trimesh, faces: np.ndarray, *, path: str = "", is_gltf: bool = False,
                   texture_unusable: bool = False) -> ResolvedColors:
    """Where the colours of one trimesh geometry come from: the one place that owns the order of colour sources.

    The first source that is present and usable wins:

    1. ``"texture"``: a decodable image with one UV per vertex (glTF: times ``baseColorFactor`` × ``COLOR_0``; OBJ:
       the image alone, since exporters write ``Kd 0.8`` next to the texture they mean to show);
    2. ``"vertex"``: per-vertex (or per-face) colours, including those trimesh drops from a PLY when it builds a
       textured visual (glTF: times ``baseColorFactor``);
    3. ``"material"``: the material's colour (MTL ``Kd``, glTF ``baseColorFactor``), unless it is trimesh's filler;
    4. ``"default"``: neutral grey :data:`NEUTRAL_GREY`.

    Vertex colours come before the material colour: they are the more specific of the two (scans and MeshLab
    exports carry them beside a generic grey ``Kd``), and glTF defines the base colour as their product anyway.

    ``faces`` ``[F, 3]`` index ``geometry.vertices``; ``texture_unusable`` says the file's texture was found missing
    or unreadable before parsing (trimesh then supplies a placeholder image, ignored here). A texture image whose
    pixel data cannot be decoded is dropped with a ``"texture unreadable"`` warning and the next source is used.
    """
    n_vertices, n_faces = len(geometry.vertices), len(faces)
    visual = geometry.visual
    warnings: list[dict] = []
    image, uv = None, None
    factor, has_factor = np.ones(3), False  # [3]
    vertex_colors, face_colors, colors_linear = None, None, False  # [V, 3] / [F, 3] float64 in [0, 1]
    if isinstance(visual, trimesh.visual.texture.TextureVisuals):
        material = visual.material
        factor, has_factor = _material_factor(material, is_gltf)  # [3] (linear for glTF, sRGB otherwise)
        vertex_colors = _attribute_vertex_colors(visual, n_vertices, path)  # glTF COLOR_0 (linear) or None
        colors_linear = is_gltf
        if vertex_colors is None:
            vertex_colors = _ply_vertex_colors(geometry, n_vertices)  # 8-bit PLY colours trimesh set aside (sRGB)
            colors_linear = False
        if not texture_unusable:
            image = _decoded_image(_material_image(material), warnings)
        uv = None if visual.uv is None else np.asarray(visual.uv, dtype=np.float64)
        if image is not None and (uv is None or len(uv) != n_vertices):
            warnings.append(_warning("texture unreadable", "texture image without one UV coordinate per vertex"))
            image = None
    elif isinstance(visual, trimesh.visual.color.ColorVisuals) and visual.kind in ("vertex", "face"):
        # glTF COLOR_0 is linear by the spec (trimesh stored it as 8-bit ColorVisuals); 8-bit PLY/OBJ colours are sRGB.
        colors_linear = is_gltf
        if visual.kind == "vertex":
            vertex_colors = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0  # [V, 3]
        else:
            face_colors = np.asarray(visual.face_colors, dtype=np.float64)[:, :3] / 255.0  # [F, 3]

    def to_srgb(corner: np.ndarray, linear: bool) -> np.ndarray:
        return _linear_to_srgb(corner) if linear else corner

    corner_uvs, texture = None, None
    if image is not None:
        source, texture = "texture", image
        corner_uvs = uv[faces].astype(np.float32)  # [F, 3, 2]
        if is_gltf:  # glTF: base colour = baseColorFactor * COLOR_0 * texture, the first two linear
            corner = np.broadcast_to(factor, (n_faces, 3, 3))
            if vertex_colors is not None:
                corner = corner * vertex_colors[faces]
            corner_colors = _linear_to_srgb(corner)
        else:
            corner_colors = np.ones((n_faces, 3, 3), dtype=np.float32)
    elif vertex_colors is not None or face_colors is not None:
        source = "vertex"
        corner = vertex_colors[faces] if vertex_colors is not None else np.repeat(face_colors[:, None], 3, axis=1)
        if is_gltf and isinstance(visual, trimesh.visual.texture.TextureVisuals):
            corner = factor * corner  # the material's factor tints COLOR_0
        corner_colors = to_srgb(corner, colors_linear)
    elif has_factor:
        source = "material"
        corner_colors = np.broadcast_to(_linear_to_srgb(factor) if is_gltf else factor, (n_faces, 3, 3))
    else:
        source = "default"
        corner_colors = np.full((n_faces, 3, 3), NEUTRAL_GREY, dtype=np.float32)
    corner_colors = np.clip(np.asarray(corner_colors, dtype=np.float32), 0.0, 1.0)  # [F, 3, 3]
    return ResolvedColors(corner_colors, corner_uvs, texture, source, warnings)


def _decoded_image(image, warnings: list[dict]):
    """``image`` with its pixels decoded (PIL decodes lazily), or None plus a warning when they cannot be."""
    if image is None:
        return None
    try:
        image.load()
        return image
    except Exception as error:
        name = getattr(image, "info", {}).get("file_path") or getattr(image, "filename", "") or "embedded"
        warnings.append(_warning("texture unreadable", f"texture image {name!r} cannot be decoded: "
                                 f"{type(error).__name__}: {error}"))
        return None


def _ply_vertex_colors(geometry: trimesh.Trimesh, n_vertices: int) -> np.ndarray | None:
    """RGB ``[V, 3]`` in [0, 1] of a PLY's vertex colour properties as parsed (trimesh drops them when the PLY also
    has UVs and so becomes a textured visual), or None."""
    raw = geometry.metadata.get("_ply_raw")
    data = raw.get("vertex", {}).get("data") if isinstance(raw, dict) else None
    if data is None:
        return None
    names = list(data) if isinstance(data, dict) else list(getattr(getattr(data, "dtype", None), "names", None) or [])
    for rgb in (("red", "green", "blue"), ("r", "g", "b"), ("diffuse_red", "diffuse_green", "diffuse_blue")):
        if all(c in names for c in rgb):
            channels = [np.asarray(data[c]).reshape(-1) for c in rgb]
            if any(len(c) != n_vertices for c in channels):
                return None
            colors = np.stack(channels, axis=-1)  # [V, 3]
            if colors.dtype.kind in "ui":
                return colors.astype(np.float64) / float(np.iinfo(colors.dtype).max)
            return colors.astype(np.float64)
    return None


def _check_ply_colors(geometry: trimesh.Trimesh, path: str) -> None:
    """Float PLY colours with NaN become 0 inside trimesh; look at the raw PLY data it keeps in the metadata."""
    raw = geometry.metadata.get("_ply_raw")
    if not raw:
        return
    for element in ("vertex", "face"):
        data = raw.get(element, {}).get("data", {})
        for prop in _PLY_COLOR_PROPERTIES:
            values = data.get(prop) if isinstance(data, dict) else None
            if values is not None and np.asarray(values).dtype.kind == "f" and not np.isfinite(values).all():
                raise MeshError(path, f"NaN in {element} colours (PLY property {prop!r})")


def _attribute_vertex_colors(visual, n_vertices: int, path: str) -> np.ndarray | None:
    """Vertex colours that trimesh keeps beside a material (glTF ``COLOR_0``, linear): RGB ``[V, 3]`` float64."""
    colors = visual.vertex_attributes.get("color") if hasattr(visual, "vertex_attributes") else None
    if colors is None:
        return None
    colors = np.asarray(colors)
    if colors.ndim != 2 or colors.shape[1] < 3 or len(colors) != n_vertices:
        return None
    if colors.dtype.kind == "f":
        if not np.isfinite(colors[:, :3]).all():
            raise MeshError(path, "NaN in vertex colours (glTF COLOR_0)")
        return colors[:, :3].astype(np.float64)
    return colors[:, :3].astype(np.float64) / float(np.iinfo(colors.dtype).max)  # normalised integers


def _material_factor(material, is_gltf: bool) -> tuple[np.ndarray, bool]:
    """The material's colour ``[3]`` in [0, 1] (linear for glTF PBR, sRGB for MTL) and whether the file set one."""
    if isinstance(material, trimesh.visual.material.PBRMaterial):
        factor = material.baseColorFactor
        if factor is None:  # the glTF default base colour is white
            return np.ones(3), is_gltf
        return np.asarray(factor, dtype=np.float64)[:3] / 255.0, True
    diffuse = getattr(material, "diffuse", None)
    if diffuse is None or tuple(int(c) for c in np.asarray(diffuse).reshape(-1)[:4]) == _TRIMESH_DEFAULT_RGBA:
        return np.ones(3), False
    return np.asarray(diffuse, dtype=np.float64)[:3] / 255.0, True


def _material_image(material):
    if isinstance(material, trimesh.visual.material.PBRMaterial):
        return material.baseColorTexture
    return getattr(material, "image", None)


def _assemble(parts: list[_Part], path: str) -> Mesh:
    """Concatenate parts, validate, drop degenerate faces and unused vertices, normalise."""
    offsets = np.cumsum([0] + [len(p.vertices) for p in parts])
    vertices = np.concatenate([p.vertices for p in parts])  # [V, 3] float64
    faces = np.concatenate([p.faces + o for p, o in zip(parts, offsets)])  # [F, 3]
    corner_colors = np.concatenate([p.corner_colors for p in parts])  # [F, 3, 3]

    # Distinct images (trimesh shares one object between geometries that share a material) → one texture each.
    texture_ids: dict[int, int] = {}
    images: list[Any] = []
    face_texture_parts = []
    for p in parts:
        t = -1
        if p.texture is not None:
            t = texture_ids.setdefault(id(p.texture), len(images))
            if t == len(images):
                images.append(p.texture)
        face_texture_parts.append(np.full(len(p.faces), t, dtype=np.int64))
    face_texture = np.concatenate(face_texture_parts)  # [F]
    corner_uvs = None
    if images:
        corner_uvs = np.concatenate([p.corner_uvs if p.corner_uvs is not None
                                     else np.zeros((len(p.faces), 3, 2), np.float32) for p in parts])  # [F, 3, 2]

    used = np.unique(faces)
    bad = ~np.isfinite(vertices[used]).all(axis=-1)
    if bad.any():
        raise MeshError(path, f"non-finite vertex positions ({int(bad.sum())} of {len(used)} used vertices)")
    lo, hi = vertices[used].min(axis=0), vertices[used].max(axis=0)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise MeshError(path, "zero extent: all vertices coincide")

    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)  # [F]
    keep = area > DEGENERATE_AREA_FRACTION * extent**2
    if not keep.any():
        raise MeshError(path, f"all {len(faces)} faces are degenerate (zero area)")
    faces, corner_colors, face_texture, area = faces[keep], corner_colors[keep], face_texture[keep], area[keep]
    if corner_uvs is not None:
        corner_uvs = corner_uvs[keep]
    sources = np.repeat([p.color_source for p in parts], [len(p.faces) for p in parts])[keep]  # [F]

    used, faces = np.unique(faces, return_inverse=True)  # drop vertices no face uses (they would skew the bbox)
    faces = faces.reshape(-1, 3)
    vertices = normalise(vertices[used])

    # Dominant colour source = the one covering the largest area (ties → the higher-priority source).
    totals = [float(area[sources == s].sum()) for s in COLOR_SOURCES]
    color_source = COLOR_SOURCES[int(np.argmax(totals))]
    return Mesh(
        vertices=vertices,
        faces=faces,
        corner_colors=corner_colors,
        corner_uvs=corner_uvs,
        face_texture=face_texture,
        textures=[_image_to_array(im) for im in images],
        color_source=color_source,
        source=path,
        warnings=_unique([w for p in parts for w in p.warnings]),
    )


def _image_to_array(image) -> np.ndarray:
    """PIL image → ``[H, W, 3]`` float32 sRGB in [0, 1] (alpha dropped: albedo only)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(array)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 transfer function (numpy twin of ``shapee.render.lighting.linear_to_srgb``)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055).astype(np.float32)


def to_data_mesh(mesh):
    """A vertex-coloured or textured ``trimesh.Trimesh`` (as :func:`bake_mesh` makes) → the data renderer's
    :class:`shapee.data.mesh.Mesh` (same frame, no normalisation), for turntables and evaluation renders."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    visual = mesh.visual
    if getattr(visual, "kind", None) == "texture":
        image = getattr(visual.material, "baseColorTexture", None) or getattr(visual.material, "image", None)
        texture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3] sRGB
        return Mesh(vertices=mesh.vertices, faces=faces, corner_colors=np.ones((len(faces), 3, 3), np.float32),
                    corner_uvs=np.asarray(visual.uv, dtype=np.float32)[faces], face_texture=np.zeros(len(faces)),
                    textures=[texture], color_source="texture")
    colours = np.asarray(visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0  # [V, 3] sRGB
    return Mesh(vertices=mesh.vertices, faces=faces, corner_colors=colours[faces], color_source="vertex")
