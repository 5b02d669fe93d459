"""Classifier-free guidance as a thin wrapper around a conditional denoiser (reference §5.4).

The unconditional branch is the same network with its conditioning zeroed (which is what the priors are trained on
with probability 0.1), batched together with the conditional branch in one forward pass. Guidance is applied to the
x₀ prediction after each branch is clipped to [−1, 1], with no re-clip afterwards, as in the released sampler.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# model(x_t [B, ...], t [B], cond [B, ...]) -> (x0 [B, ...], var_values [B, ...] | None)
ConditionalDenoiser = Callable[[Tensor, Tensor, Tensor], "tuple[Tensor, Tensor | None]"]


def guided_denoiser(model: ConditionalDenoiser, cond: Tensor, guidance_scale: float, *, clip: bool = True):
    """A denoise function ``(x_t, t) -> (x0, var)`` for the sampler, guided with scale ``s``:
    x₀ = x₀_u + s · (x₀_c − x₀_u). ``guidance_scale == 1`` (or ``None``) runs only the conditional branch."""

    if guidance_scale is None or guidance_scale == 1.0:
        def conditional(x_t: Tensor, t: Tensor):
            x0, var = model(x_t, t, cond)
            return (x0.clamp(-1, 1) if clip else x0), var

        return conditional

    def guided(x_t: Tensor, t: Tensor):
        b = x_t.shape[0]
        x0, var = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
        if clip:
            x0 = x0.clamp(-1, 1)
        x0_cond, x0_uncond = x0[:b], x0[b:]
        return x0_uncond + guidance_scale * (x0_cond - x0_uncond), (None if var is None else var[:b])

    return guided
