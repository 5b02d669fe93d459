"""Does a prior draw what it was asked for? Shape-and-colour matching of sampled meshes in the toy world.

The toy world (:mod:`shapee.data.toy`) names every asset's shape and colour in its captions, so a text prior trained
on it can be checked without any learned judge: a sample of the prompt "a red cube" *matches* when its mesh is

* **closer in shape** to the cubes than to every other shape: the symmetric Chamfer-L1 distance
  (:func:`shapee.eval.metrics.chamfer_distance`) between ``n_points`` area-uniform points on the sample and on each
  reference mesh, where a shape's distance is the *minimum* over that shape's references (the training assets of the
  toy world come in several proportions and rotations: the sample should look like one of them, not like their
  average). Both sides are in the normalised frame of :func:`shapee.data.mesh.normalise` (bounding box centred, its
  largest side 2): toy assets are stored that way, and the sample is normalised the same way by default, so the
  distance compares shapes, not the few percent by which a decoder's 0-level surface grows or shrinks; and
* **closer in colour** to red than to every other colour: the Euclidean distance, in **sRGB** in [0, 1] (the space of
  the palette, the records and the decoded vertex colours), between the sample's mean vertex colour and each
  reference colour.

Both must hold, strictly (a tie is a miss). A sample without surface (no faces: e.g. an SDF head negative everywhere)
is a miss, recorded as ``empty`` with no distances. :func:`toy_match_rate` returns the match rate per prompt and
overall, with every distance, so a failure can be read off (wrong shape, wrong colour, or empty).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shapee.eval.metrics import chamfer_distance, sample_mesh_points

COLOR_SPACE = "sRGB"  # the space of reference colours, vertex colours and the colour distance
DEFAULT_POINTS = 2048  # points per mesh for the Chamfer distance


def _normalised_points(vertices, faces, n_points: int, generator: torch.Generator, normalize: bool) -> Tensor:
    """``n_points`` area-uniform points ``[n, 3]`` on a mesh, in the normalised frame when ``normalize``."""
    from shapee.data.mesh import normalise  # here: it loads trimesh (~0.6 s), which shapee.train/eval skip

    verts = np.asarray(vertices, dtype=np.float64)  # [V, 3]
    if normalize:
        verts = normalise(verts)
    return sample_mesh_points(
        torch.as_tensor(np.asarray(verts), dtype=torch.float64),
        torch.as_tensor(np.asarray(faces), dtype=torch.long),
        n_points,
        generator=generator,
    )  # [n, 3]


@dataclass
class ToyReferences:
    """What samples are compared with: point sets per shape, sRGB colours per colour name, and prompt → target.

    Attributes:
        shapes: shape name → reference point sets, each ``[n_points, 3]`` in the normalised frame.
        colors: colour name → sRGB ``(r, g, b)`` in [0, 1].
        targets: prompt → ``(shape name, colour name)`` (every caption of every reference asset).
        n_points: points per point set (samples use the same number).
    """

    shapes: dict[str, list[Tensor]]
    colors: dict[str, tuple[float, float, float]]
    targets: dict[str, tuple[str, str]] = field(default_factory=dict)
    n_points: int = DEFAULT_POINTS

    def __post_init__(self) -> None:
        if len(self.shapes) < 2 or any(len(v) == 0 for v in self.shapes.values()):
            raise ValueError(
                f"references need at least 2 shapes with at least one mesh each, got "
                f"{ {k: len(v) for k, v in self.shapes.items()} }"
            )
        if len(self.colors) < 2:
            raise ValueError(f"references need at least 2 colours, got {list(self.colors)}")
        for name, rgb in self.colors.items():
            if len(rgb) != 3 or not all(0.0 <= float(c) <= 1.0 for c in rgb):
                raise ValueError(f"reference colour {name!r} must be three sRGB values in [0, 1], got {rgb!r}")
        for prompt, (shape, color) in self.targets.items():
            if shape not in self.shapes or color not in self.colors:
                raise ValueError(
                    f"target of prompt {prompt!r} is ({shape!r}, {color!r}), not among the reference shapes "
                    f"{list(self.shapes)} and colours {list(self.colors)}"
                )

    @classmethod
    def from_assets(cls, assets: Sequence[Any], *, n_points: int = DEFAULT_POINTS, seed: int = 0) -> "ToyReferences":
        """References from toy assets (:func:`shapee.data.toy.toy_assets`, typically the training world): each
        asset's mesh is a reference of its shape, its (uniform) colour that of its colour name, and each of its
        captions targets its (shape, colour).

        Raises:
            ValueError: fewer than 2 shapes or colours, or one colour name with two different colours.
        """
        if n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {n_points}")
        generator = torch.Generator().manual_seed(int(seed))
        shapes: dict[str, list[Tensor]] = {}
        colors: dict[str, tuple[float, float, float]] = {}
        targets: dict[str, tuple[str, str]] = {}
        for asset in assets:
            mesh = asset.mesh
            shapes.setdefault(asset.shape, []).append(
                # Toy meshes are normalised already; normalising again is the identity up to rounding.
                _normalised_points(mesh.vertices, mesh.faces, n_points, generator, normalize=True)
            )
            rgb = tuple(float(c) for c in np.asarray(mesh.corner_colors, dtype=np.float64).reshape(-1, 3).mean(0))
            if asset.color_name in colors and not np.allclose(colors[asset.color_name], rgb, atol=1e-3):
                raise ValueError(
                    f"colour {asset.color_name!r} is {colors[asset.color_name]} in one asset and {rgb} in "
                    f"{asset.asset_id!r}"
                )
            colors.setdefault(asset.color_name, rgb)
            for caption in asset.captions:
                targets[caption] = (asset.shape, asset.color_name)
        return cls(shapes=shapes, colors=colors, targets=targets, n_points=n_points)


def mean_vertex_color(mesh) -> np.ndarray:
    """The mean sRGB vertex colour ``[3]`` in [0, 1] of a ``trimesh.Trimesh`` with vertex colours (uint8 RGB(A))."""
    visual = getattr(mesh, "visual", None)
    if visual is None or getattr(visual, "kind", None) != "vertex":
        raise ValueError("the mesh has no vertex colours (mesh.visual.kind must be 'vertex')")
    colors = np.asarray(visual.vertex_colors)[:, :3].astype(np.float64)  # [V, 3] uint8 → float
    return colors.mean(0) / 255.0  # [3]


def match_sample(
    mesh, target: tuple[str, str], references: ToyReferences, *, generator: torch.Generator, normalize: bool = True
) -> dict[str, Any]:
    """One sample against the references: distances to every shape and colour, and whether it matches ``target``.

    Returns ``{"shape", "color"`` (the target), ``"empty"``, ``"chamfer"`` (shape → distance, the minimum over that
    shape's references), ``"color_distance"`` (colour → sRGB distance), ``"mean_color"``, ``"nearest_shape"``,
    ``"nearest_color"``, ``"shape_ok"``, ``"color_ok"``, ``"match"}``. An empty mesh gives ``empty=True``, no
    distances (empty dicts, ``None`` nearest) and ``match=False``.
    """
    shape, color = target
    out: dict[str, Any] = {"shape": shape, "color": color, "empty": False, "chamfer": {}, "color_distance": {},
                           "mean_color": None, "nearest_shape": None, "nearest_color": None,
                           "shape_ok": False, "color_ok": False, "match": False}
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))))
    if len(faces) == 0:
        out["empty"] = True
        return out
    points = _normalised_points(mesh.vertices, faces, references.n_points, generator, normalize)  # [n, 3]
    chamfer = {
        name: min(chamfer_distance(points, ref.to(points)) for ref in refs) for name, refs in references.shapes.items()
    }
    rgb = mean_vertex_color(mesh)  # [3] sRGB
    color_distance = {
        name: float(np.linalg.norm(rgb - np.asarray(ref, dtype=np.float64))) for name, ref in references.colors.items()
    }
    # Strictly closer than every other: a tie is a miss.
    shape_ok = all(chamfer[shape] < d for name, d in chamfer.items() if name != shape)
    color_ok = all(color_distance[color] < d for name, d in color_distance.items() if name != color)
    out.update(
        chamfer=chamfer, color_distance=color_distance, mean_color=rgb.tolist(),
        nearest_shape=min(chamfer, key=chamfer.get), nearest_color=min(color_distance, key=color_distance.get),
        shape_ok=shape_ok, color_ok=color_ok, match=shape_ok and color_ok,
    )
    return out


def toy_match_rate(
    meshes: Sequence[Any],
    prompts: Sequence[str],
    references: ToyReferences,
    *,
    targets: Mapping[str, tuple[str, str]] | None = None,
    normalize: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The share of samples that match their prompt's shape and colour (see the module docstring).

    Args:
        meshes: ``S`` sampled ``trimesh.Trimesh`` with vertex colours (``TextTo3D.generate(...).meshes``); empty
            meshes are misses.
        prompts: ``S`` prompts, the one each mesh was sampled for (``Generation.sources``).
        references: :class:`ToyReferences` (e.g. :meth:`ToyReferences.from_assets` of the training world).
        targets: prompt → ``(shape, colour)``; default ``references.targets`` (the toy captions).
        normalize: normalise each sample like the references (bounding box to [-1, 1]) before the Chamfer distance.
        seed: seed of the surface-point sampling (deterministic results).

    Returns:
        ``{"rate"`` (overall, over all samples), ``"per_prompt"`` (prompt → rate, first-seen order),
        ``"n_samples"``, ``"n_empty"``, ``"color_space": "sRGB"``, ``"samples"`` (per sample, :func:`match_sample`'s
        dict plus ``"prompt"``)``}``.

    Raises:
        ValueError: no samples, ``meshes`` and ``prompts`` of different lengths, or a prompt without a target.
    """
    meshes, prompts = list(meshes), list(prompts)
    if not meshes:
        raise ValueError("meshes is empty: give at least one sampled mesh")
    if len(meshes) != len(prompts):
        raise ValueError(f"meshes ({len(meshes)}) and prompts ({len(prompts)}) must have the same length")
    targets = dict(references.targets if targets is None else targets)
    missing = sorted({p for p in prompts if p not in targets})
    if missing:
        raise ValueError(
            f"prompts {missing[:3]} have no target (shape, colour); known prompts: {sorted(targets)[:6]}..."
        )
    generator = torch.Generator().manual_seed(int(seed))
    samples = []
    for mesh, prompt in zip(meshes, prompts):  # a loop over samples (a handful), not points
        result = match_sample(mesh, targets[prompt], references, generator=generator, normalize=normalize)
        samples.append({"prompt": prompt, **result})
    per_prompt: dict[str, float] = {}
    for prompt in dict.fromkeys(prompts):
        hits = [s["match"] for s in samples if s["prompt"] == prompt]
        per_prompt[prompt] = sum(hits) / len(hits)
    rate = sum(s["match"] for s in samples) / len(samples)
    return {"rate": rate, "per_prompt": per_prompt, "n_samples": len(samples),
            "n_empty": sum(s["empty"] for s in samples), "color_space": COLOR_SPACE, "samples": samples}


def format_toy_match(result: Mapping[str, Any]) -> str:
    """A few lines: the overall rate, then per prompt its rate and what its misses were (empty / shape / colour)."""
    lines = [f"match rate {100 * result['rate']:.1f} % of {result['n_samples']} samples "
             f"({result['n_empty']} empty; colour distance in {result['color_space']})"]
    for prompt, rate in result["per_prompt"].items():
        mine = [s for s in result["samples"] if s["prompt"] == prompt]
        empty = sum(s["empty"] for s in mine)
        shape = sum(not s["empty"] and not s["shape_ok"] for s in mine)
        color = sum(not s["empty"] and not s["color_ok"] for s in mine)
        chamfers = [s["chamfer"][s["shape"]] for s in mine if not s["empty"]]
        mean_cd = f"{np.mean(chamfers):.3f}" if chamfers else "nan"
        lines.append(f"  {prompt!r}: {100 * rate:.0f} % of {len(mine)} (misses: {empty} empty, {shape} shape, "
                     f"{color} colour; mean Chamfer to own shape {mean_cd})")
    return "\n".join(lines)


__all__ = ["COLOR_SPACE", "DEFAULT_POINTS", "ToyReferences", "format_toy_match", "match_sample", "mean_vertex_color",
           "toy_match_rate"]
