"""Parameter-free renderers: lighting shared with data preparation, NeRF volume rendering, Marching Cubes 33 and the
STF mesh renderer. ``shapee.render.marching_cubes(field, bounds=(-1, 1)) -> (verts, faces)`` is the public entry
point of the mesh extractor (differentiable in ``verts`` w.r.t. ``field``)."""

from __future__ import annotations

from torch import Tensor


def marching_cubes(field: Tensor, bounds: tuple[float, float] = (-1.0, 1.0)):
    """Marching Cubes 33 on ``field`` ``[X, Y, Z]`` (or a batch ``[B, X, Y, Z]``); see :mod:`shapee.render.mc33`."""
    from shapee.render.mc33 import marching_cubes as _marching_cubes  # tables load on first use, not at import

    return _marching_cubes(field, bounds)


__all__ = ["marching_cubes"]
