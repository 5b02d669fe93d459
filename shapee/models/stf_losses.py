"""The STF fine-tuning loss (paper §3.1 / reference §8.2): L2 between the differentiable mesh render and the target
RGBA views.

Paper: L_STF = 1/(N·s²) Σ_i ‖Render(Mesh_i) − Image_i‖², over N target views of s × s pixels. We read ‖·‖² as
the squared error summed over the 4 RGBA channels of a pixel, and 1/(N·s²) as the mean over views and pixels; we
also average over the assets of the batch. So

    stf_rgba = mean over (B, N, H, W) of Σ_c (rendered_c − target_c)²,   c ∈ {R, G, B, A}

which is 4 × the plain elementwise MSE. Colours are sRGB composited on black on both sides (the renders of
:func:`shapee.render.stf.render_meshes` and the dataset's target views), alpha in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stf_finetune_loss", "rgba"]


def rgba(rgb: Tensor, alpha: Tensor) -> Tensor:
    """``rgb`` ``[..., 3]`` and ``alpha`` ``[...]`` → ``[..., 4]``."""
    if rgb.shape[-1] != 3 or rgb.shape[:-1] != alpha.shape:
        raise ValueError(f"rgb must be [..., 3] and alpha [...] with the same leading shape, got "
                         f"{tuple(rgb.shape)} and {tuple(alpha.shape)}")
    return torch.cat([rgb, alpha[..., None].to(rgb.dtype)], dim=-1)


def stf_finetune_loss(rendered_rgba: Tensor, target_rgb: Tensor, target_alpha: Tensor) -> dict[str, Tensor]:
    """L2 RGBA loss of STF renders against target views (see module docstring for the normalisation).

    Args:
        rendered_rgba: ``[B, N, H, W, 4]`` the STF render (sRGB on black + alpha), e.g.
            ``rgba(out["rgb"], out["alpha"])``.
        target_rgb: ``[B, N, H, W, 3]`` target views, sRGB on black in [0, 1].
        target_alpha: ``[B, N, H, W]`` target coverage in [0, 1].

    Returns ``{"stf_rgba": scalar}`` (computed in fp32).
    """
    if rendered_rgba.dim() != 5 or rendered_rgba.shape[-1] != 4:
        raise ValueError(f"rendered_rgba must have shape [B, N, H, W, 4], got {tuple(rendered_rgba.shape)}")
    if target_rgb.shape != rendered_rgba.shape[:-1] + (3,):
        raise ValueError(f"target_rgb must have shape {tuple(rendered_rgba.shape[:-1]) + (3,)}, "
                         f"got {tuple(target_rgb.shape)}")
    if target_alpha.shape != rendered_rgba.shape[:-1]:
        raise ValueError(f"target_alpha must have shape {tuple(rendered_rgba.shape[:-1])}, "
                         f"got {tuple(target_alpha.shape)}")
    target = rgba(target_rgb.float(), target_alpha.float())  # [B, N, H, W, 4]
    squared = (rendered_rgba.float() - target).square().sum(-1)  # [B, N, H, W] ‖·‖² over RGBA
    return {"stf_rgba": squared.mean()}
