"""A deterministic procedural toy world: coloured primitives with captions.

The machines this project runs on reach no 3-D dataset, so the quick start, the tiny presets and the tests train on
these: spheres, cubes, cylinders, cones, tori and capsules in a palette of distinct colours, with varied proportions
and rotations, captioned "a red cube", "a red box", "a cube that is red". Everything follows from the seed, and asset
``i`` depends only on ``(seed, i)``, so ``toy_assets(10)`` starts with ``toy_assets(5)``.

Meshes are watertight, outward-oriented, uniformly coloured (``color_source="material"``) and normalised like every
loaded asset (:func:`shapee.data.mesh.normalise`). Since normalisation removes absolute size, "size" shows only as
proportions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import trimesh

from shapee.data.mesh import Mesh, normalise

TOY_SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "capsule")

# sRGB colours, chosen to be far apart from each other (minimum pairwise distance ~0.3) and to read as their name.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (1.00, 0.50, 0.00),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "pink": (1.00, 0.55, 0.75),
    "brown": (0.45, 0.25, 0.10),
    "cyan": (0.10, 0.80, 0.85),
    "gray": (0.50, 0.50, 0.50),
}

# Other words a caption may use for a shape (the shape's own name is always one of them).
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "sphere": ("sphere", "ball"),
    "cube": ("cube", "box"),
    "cylinder": ("cylinder", "column"),
    "cone": ("cone", "cone-shaped object"),
    "torus": ("torus", "donut"),
    "capsule": ("capsule", "pill"),
}

# Range of the `aspect` proportion drawn per shape by toy_assets (see make_toy_mesh for its meaning per shape).
ASPECT_RANGE: dict[str, tuple[float, float]] = {
    "sphere": (1.0, 1.0),
    "cube": (0.75, 1.33),
    "cylinder": (0.5, 2.5),
    "cone": (0.7, 2.0),
    "torus": (0.2, 0.5),
    "capsule": (0.25, 1.5),
}

_SECTIONS = 48  # around-axis resolution; faces: cube 12, cone 96, cylinder 192, sphere 1280, torus/capsule 2304


@dataclass
class ToyAsset:
    """One toy asset: a normalised coloured mesh plus the captions that describe it."""

    asset_id: str  # e.g. "toy_0003_red_cube"
    shape: str  # one of TOY_SHAPES
    color_name: str  # a key of PALETTE (or of the `colors` passed to toy_assets)
    mesh: Mesh
    captions: list[str] = field(default_factory=list)


def make_toy_mesh(
    shape: str,
    rgb: Sequence[float],
    *,
    aspect: float = 1.0,
    rotation: np.ndarray | None = None,
    source: str = "",
) -> Mesh:
    """A watertight, outward-oriented primitive of one sRGB colour, rotated, then normalised to [-1, 1]^3.

    Args:
        shape: one of ``TOY_SHAPES``.
        rgb: sRGB colour, three floats in [0, 1].
        aspect: the shape's one proportion (> 0), along its local +Z axis: cube → height / side, cylinder, cone and
            capsule → height / diameter (capsule: of its straight part), torus → tube radius / ring radius (< 1);
            ignored for the sphere.
        rotation: ``[3, 3]`` proper rotation applied about the centre, or None for the upright shape (+Z up).
        source: stored in ``Mesh.source`` (e.g. ``"toy:<asset_id>"``).

    Returns:
        A :class:`Mesh` with ``color_source="material"``, ``[F, 3, 3]`` corner colours all equal to ``rgb``.
    """
    if shape not in TOY_SHAPES:
        raise ValueError(f"shape must be one of {TOY_SHAPES}, got {shape!r}")
    color = np.asarray(rgb, dtype=np.float32)
    if color.shape != (3,) or not np.isfinite(color).all() or color.min() < 0 or color.max() > 1:
        raise ValueError(f"rgb must be three sRGB values in [0, 1], got {rgb!r}")
    if not (math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"aspect must be a finite number > 0, got {aspect!r}")
    if shape == "torus" and aspect >= 1:
        raise ValueError(f"aspect of a torus (tube radius / ring radius) must be < 1, got {aspect}")
    if rotation is not None:
        rotation = np.asarray(rotation, dtype=np.float64)
        if (
            rotation.shape != (3, 3)
            or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
            or np.linalg.det(rotation) < 0
        ):
            raise ValueError("rotation must be a [3, 3] proper rotation matrix (orthonormal, det +1)")

    if shape == "sphere":
        tm = trimesh.creation.icosphere(subdivisions=3, radius=1.0)  # 1280 faces
    elif shape == "cube":
        tm = trimesh.creation.box(extents=(1.0, 1.0, aspect))
    elif shape == "cylinder":
        tm = trimesh.creation.cylinder(radius=0.5, height=aspect, sections=_SECTIONS)
    elif shape == "cone":
        tm = trimesh.creation.cone(radius=0.5, height=aspect, sections=_SECTIONS)
    elif shape == "torus":
        tm = trimesh.creation.torus(major_radius=1.0, minor_radius=aspect, major_sections=_SECTIONS, minor_sections=24)
    else:  # capsule: `height` is the straight part between the two hemispheres
        tm = trimesh.creation.capsule(height=aspect, radius=0.5, count=[_SECTIONS, 24])

    vertices = np.asarray(tm.vertices, dtype=np.float64)  # [V, 3]
    faces = np.asarray(tm.faces, dtype=np.int64)  # [F, 3]
    if rotation is not None:
        vertices = vertices @ rotation.T
    # Pole fans of some primitives repeat a vertex; drop those zero-area faces (load_mesh would too).
    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)  # [F]
    faces = faces[area > 1e-12]
    used, faces = np.unique(faces, return_inverse=True)
    faces = faces.reshape(-1, 3)
    return Mesh(
        vertices=normalise(vertices[used]),
        faces=faces,
        corner_colors=np.broadcast_to(color, (len(faces), 3, 3)).copy(),
        color_source="material",
        source=source,
    )


def toy_captions(shape: str, color_name: str) -> list[str]:
    """Captions for one toy asset, e.g. ``["a red cube", "a red box", "a cube that is red"]``.

    The first is always "a/an <colour> <shape>"; every caption names the colour and the shape (or a synonym).
    """
    if shape not in SHAPE_SYNONYMS:
        raise ValueError(f"shape must be one of {TOY_SHAPES}, got {shape!r}")
    article = "an" if color_name[:1].lower() in "aeiou" else "a"
    name, synonym = SHAPE_SYNONYMS[shape][0], SHAPE_SYNONYMS[shape][1]
    return [
        f"{article} {color_name} {name}",
        f"{article} {color_name} {synonym}",
        f"a {name} that is {color_name}",
    ]


def toy_assets(
    n: int,
    seed: int = 0,
    shapes: Sequence[str] = TOY_SHAPES,
    colors: dict[str, Sequence[float]] | Sequence[str] | None = None,
    *,
    random_rotation: bool = True,
) -> list[ToyAsset]:
    """The first ``n`` assets of the toy world of ``seed``.

    Asset ``i`` takes the shape × colour combination ``i mod (S·C)`` in an order where consecutive assets differ in
    both shape and colour, so the first ``S·C`` assets hold every combination exactly once and a handful already
    spans many shapes and colours. Its proportion (``ASPECT_RANGE``) and rotation (uniform over SO(3), or none with
    ``random_rotation=False``) come from a generator seeded with ``(seed, i)``.

    Args:
        n: number of assets (>= 0).
        seed: world seed.
        shapes: subset of ``TOY_SHAPES``.
        colors: None (the whole ``PALETTE``), a list of ``PALETTE`` names, or a ``{name: (r, g, b)}`` mapping.
        random_rotation: rotate each asset randomly (default) or keep it upright.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shapes = tuple(shapes)
    if not shapes or any(s not in TOY_SHAPES for s in shapes):
        raise ValueError(f"shapes must be a non-empty subset of {TOY_SHAPES}, got {shapes}")
    if colors is None:
        palette = dict(PALETTE)
    elif isinstance(colors, dict):
        palette = {str(k): tuple(float(c) for c in v) for k, v in colors.items()}
    else:
        unknown = [c for c in colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"colors {unknown} are not in PALETTE; pass a {{name: (r, g, b)}} mapping for new ones")
        palette = {c: PALETTE[c] for c in colors}
    if not palette:
        raise ValueError("colors must name at least one colour")
    color_names = list(palette)

    assets = []
    for i in range(n):
        shape, color_name = _combination(i, shapes, color_names)
        rng = np.random.default_rng([seed, i])
        lo, hi = ASPECT_RANGE[shape]
        aspect = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # log-uniform: as many flat as tall
        rotation = _random_rotation(rng) if random_rotation else None
        asset_id = f"toy_{i:04d}_{color_name}_{shape}"
        mesh = make_toy_mesh(shape, palette[color_name], aspect=aspect, rotation=rotation, source=f"toy:{asset_id}")
        assets.append(ToyAsset(asset_id, shape, color_name, mesh, toy_captions(shape, color_name)))
    return assets


def _combination(i: int, shapes: Sequence[str], colors: Sequence[str]) -> tuple[str, str]:
    """Shape and colour of asset ``i``: a bijection of ``i mod S·C`` onto shapes × colours.

    Within block ``j = k // lcm(S, C)`` the pair is ``(k mod S, (k + j) mod C)``; pairs of block ``j`` satisfy
    ``shape - colour ≡ -j (mod gcd(S, C))``, so the ``gcd`` blocks of ``lcm`` pairs never repeat a pair.
    """
    n_shapes, n_colors = len(shapes), len(colors)
    k = i % (n_shapes * n_colors)
    block = k // math.lcm(n_shapes, n_colors)
    return shapes[k % n_shapes], colors[(k + block) % n_colors]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed rotation ``[3, 3]`` from a normalised Gaussian quaternion."""
    w, x, y, z = rng.standard_normal(4)
    norm = math.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
