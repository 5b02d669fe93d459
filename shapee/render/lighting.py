"""The fixed "basic" lighting of the training renders (reference §4.3, §6.2).

Blender's ``basic`` light mode replaces every material by an emission of its base colour (flat albedo) and then
multiplies, in linear space, by ``0.3 + 0.7 · |n · L|``: an ambient term plus a two-sided diffuse term from one
fixed direction ``L``. The official STF renderer reproduces the same model in PyTorch3D. We use it for the dataset
views (``shapee.data.render``) and for the differentiable STF render, so both see identical shading.

Everything here is plain torch: differentiable, and it runs on whatever device its inputs live on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# UNIFORM_LIGHT_DIRECTION of the official Blender constants (reference §4.3); unit length to 6 digits.
LIGHT_DIRECTION: tuple[float, float, float] = (0.09387503, -0.63953443, -0.7630093)
AMBIENT = 0.3
DIFFUSE = 0.7

# Breakpoints of the piecewise sRGB transfer function (IEC 61966-2-1).
_SRGB_KNEE = 0.04045  # in sRGB-encoded values
_LINEAR_KNEE = 0.0031308  # in linear values


def srgb_to_linear(x: Tensor) -> Tensor:
    """Exact sRGB decoding (piecewise: linear toe, 2.4 power), elementwise; ``x`` in [0, 1], any shape."""
    # Clamp the power branch's base so that torch.where's unused branch cannot produce NaN gradients.
    power = ((x.clamp_min(_SRGB_KNEE) + 0.055) / 1.055) ** 2.4
    return torch.where(x <= _SRGB_KNEE, x / 12.92, power)


def linear_to_srgb(x: Tensor) -> Tensor:
    """Exact sRGB encoding (inverse of :func:`srgb_to_linear`), elementwise; ``x`` in [0, 1], any shape."""
    # x^(1/2.4) has an infinite slope at 0: the clamp keeps the unused branch's gradient finite.
    power = 1.055 * x.clamp_min(_LINEAR_KNEE) ** (1.0 / 2.4) - 0.055
    return torch.where(x <= _LINEAR_KNEE, x * 12.92, power)


def light_direction(
    light_dir: Sequence[float] | Tensor = LIGHT_DIRECTION,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``light_dir`` as a unit ``[3]`` tensor on ``device``."""
    if not isinstance(light_dir, Tensor):
        # Validate plain sequences on the host; a tensor is trusted as is (checking it would sync the device).
        values = [float(c) for c in light_dir]
        norm = math.sqrt(sum(c * c for c in values)) if len(values) == 3 else 0.0
        if len(values) != 3 or not math.isfinite(norm) or norm <= 0:
            raise ValueError(f"light_dir must be a finite non-zero 3-vector, got {list(values)}")
    direction = torch.as_tensor(light_dir, device=device, dtype=dtype)
    if direction.shape != (3,):
        raise ValueError(f"light_dir must have shape [3], got {tuple(direction.shape)}")
    return direction / direction.norm()


def shade_basic(
    albedo_srgb: Tensor,
    normals: Tensor,
    light_dir: Sequence[float] | Tensor = LIGHT_DIRECTION,
) -> Tensor:
    """Shade flat sRGB albedo with the official "basic" lighting; returns sRGB of the same shape.

    ``albedo_srgb``: ``[..., 3]`` in [0, 1]; ``normals``: ``[..., 3]`` unit normals (broadcastable to the albedo;
    their sign does not matter: the lighting is two-sided). Computes
    ``linear_to_srgb(srgb_to_linear(albedo) · (0.3 + 0.7 · |n · L|))``.
    """
    if albedo_srgb.shape[-1] != 3:
        raise ValueError(f"albedo_srgb must have shape [..., 3], got {tuple(albedo_srgb.shape)}")
    if normals.shape[-1] != 3:
        raise ValueError(f"normals must have shape [..., 3], got {tuple(normals.shape)}")
    light = light_direction(light_dir, device=normals.device, dtype=normals.dtype)  # [3]
    cosine = (normals * light).sum(-1, keepdim=True).abs()  # [..., 1]
    brightness = AMBIENT + DIFFUSE * cosine  # [..., 1]
    # |n·L| ≤ 1 and albedo ≤ 1 keep the product in [0, 1]; clamp for normals that are not exactly unit.
    return linear_to_srgb((srgb_to_linear(albedo_srgb) * brightness).clamp(0.0, 1.0))
