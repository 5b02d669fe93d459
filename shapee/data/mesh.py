"""Meshes as the data pipeline sees them: geometry in the normalised world frame plus a colour model.

Colour model: every face has three corner colours (sRGB). A textured face additionally samples one of ``textures``
at its interpolated UV and multiplies it by the interpolated corner colour (the material's colour factor, white if
none). Untextured faces use the interpolated corner colours (vertex colours, material colour or neutral grey).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

COLOR_SOURCES = ("texture", "vertex", "material", "default")  # Mesh.color_source values, in priority order


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
    taken as sRGB. ``Mesh.color_source`` is the source covering the largest area.

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
        # trimesh silently drops what it cannot represent (short faces, 'l' elements, NaN colours): look first.
        if ext == ".obj":
            _check_obj_text(path_str)
        elif ext == ".ply":
            _check_ply_header(path_str)
        try:
            scene = trimesh.load_scene(path_str, process=False)
        except IndexError as error:
            if ext == ".obj":  # trimesh indexes the vertex arrays with the face tokens as they are
                raise MeshError(path_str, f"face index out of range ({error})") from error
            raise
        return _scene_to_mesh(scene, path_str, is_gltf=ext in (".glb", ".gltf"))
    except MeshError:
        raise
    except Exception as error:  # never let one broken asset stop a batch run
        raise MeshError(path_str, f"could not read {ext} file: {type(error).__name__}: {error}") from error


def _check_obj_text(path: str) -> None:
    """Problems of an OBJ that trimesh would hide: short faces, line-only files, NaN colours, no geometry."""
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


def _parse_float(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        return float("nan")


def _check_ply_header(path: str) -> None:
    """A PLY whose header declares no elements has nothing to load; say so instead of 'empty scene'."""
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


@dataclass
class _Part:
    """One geometry instance converted to the Mesh colour model, in world coordinates of the file."""

    vertices: np.ndarray  # [V, 3] float64
    faces: np.ndarray  # [F, 3] int64
    corner_colors: np.ndarray  # [F, 3, 3] float32 sRGB
    corner_uvs: np.ndarray | None  # [F, 3, 2] float32
    texture: Any  # PIL image or None
    color_source: str


def _scene_to_mesh(scene: trimesh.Scene, path: str, is_gltf: bool) -> Mesh:
    parts: list[_Part] = []
    n_points = n_paths = 0
    for node in scene.graph.nodes_geometry:
        transform, geometry_name = scene.graph[node]
        geometry = scene.geometry[geometry_name]
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) > 0:
            parts.append(_convert_geometry(geometry, np.asarray(transform, dtype=np.float64), path, is_gltf))
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


def _convert_geometry(geometry: trimesh.Trimesh, transform: np.ndarray, path: str, is_gltf: bool) -> _Part:
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

    visual = geometry.visual
    corner_uvs, texture, source = None, None, "default"
    corner_colors = np.full((len(faces), 3, 3), NEUTRAL_GREY, dtype=np.float32)  # [F, 3, 3]
    if isinstance(visual, trimesh.visual.texture.TextureVisuals):
        material = visual.material
        vertex_colors = _attribute_vertex_colors(visual, len(vertices), path)  # [V, 3] or None
        factor, has_factor = _material_factor(material, is_gltf)  # [3] (linear for glTF, sRGB otherwise)
        image = _material_image(material)
        uv = None if visual.uv is None else np.asarray(visual.uv, dtype=np.float64)
        if image is not None and uv is not None and len(uv) == len(vertices):
            texture, source = image, "texture"
            corner_uvs = uv[faces].astype(np.float32)  # [F, 3, 2]
            if is_gltf:  # glTF: base colour = baseColorFactor * COLOR_0 * texture, the first two linear
                corner = np.broadcast_to(factor, (len(faces), 3, 3))
                if vertex_colors is not None:
                    corner = corner * vertex_colors[faces]
                corner_colors = _linear_to_srgb(corner)
            else:
                # OBJ viewers disagree on whether Kd tints map_Kd; exporters (Blender) write Kd 0.8 next to the
                # texture they mean to show, so the texture stands alone.
                corner_colors = np.ones((len(faces), 3, 3), dtype=np.float32)
        elif vertex_colors is not None:
            source = "vertex"
            corner_colors = _linear_to_srgb(factor * vertex_colors[faces]) if is_gltf else vertex_colors[faces]
        elif has_factor:
            source = "material"
            corner_colors = np.broadcast_to(_linear_to_srgb(factor) if is_gltf else factor, (len(faces), 3, 3))
    elif isinstance(visual, trimesh.visual.color.ColorVisuals) and visual.kind in ("vertex", "face"):
        source = "vertex"  # per-element colours stored in the geometry (vertex or face)
        if visual.kind == "vertex":
            colors = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0  # [V, 3]
            corner = colors[faces]  # [F, 3, 3]
        else:
            colors = np.asarray(visual.face_colors, dtype=np.float64)[:, :3] / 255.0  # [F, 3]
            corner = np.repeat(colors[:, None], 3, axis=1)  # [F, 3, 3]
        # glTF COLOR_0 is linear by the spec (trimesh stored it as 8-bit ColorVisuals); 8-bit PLY/OBJ colours are sRGB.
        corner_colors = _linear_to_srgb(corner) if is_gltf else corner
    return _Part(vertices, faces, np.clip(np.asarray(corner_colors, dtype=np.float32), 0.0, 1.0), corner_uvs,
                 texture, source)


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
    )


def _image_to_array(image) -> np.ndarray:
    """PIL image → ``[H, W, 3]`` float32 sRGB in [0, 1] (alpha dropped: albedo only)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(array)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 transfer function (numpy twin of ``shapee.render.lighting.linear_to_srgb``)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055).astype(np.float32)
