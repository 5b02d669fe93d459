"""Classifier-free guidance, and the one place that decides where x₀ is clipped (reference §5.4).

The unconditional branch is the same network with its conditioning zeroed (which is what the priors are trained on
with probability 0.1), batched together with the conditional branch in one forward pass. With ``clip`` each branch's
x₀ prediction is clipped to [−1, 1] *before* guidance and the guided x₀ is never clipped again, as in the released
sampler (its denoiser clips per branch, the guidance combination comes after); without guidance the single x₀ is
clipped. The samplers in :mod:`shapee.diffusion.samplers` never clip, so nothing re-clips behind this module's back
(``tests/test_official_parity.py`` checks the whole guided run against the official code).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from shapee.diffusion.gaussian import DenoiseFn

# model(x_t [B, ...], t [B], cond [B, ...]) -> (x0 [B, ...], var_values [B, ...] | None)
ConditionalDenoiser = Callable[[Tensor, Tensor, Tensor], "tuple[Tensor, Tensor | None]"]


def clipped(denoise: DenoiseFn) -> DenoiseFn:
    """``denoise`` with its x₀ prediction clipped to [−1, 1] (for an unguided denoise function given to a sampler)."""

    def fn(x_t: Tensor, t: Tensor):
        x0, var = denoise(x_t, t)
        return x0.clamp(-1, 1), var

    return fn


def guided_denoiser(model: ConditionalDenoiser, cond: Tensor, guidance_scale: float | None, *, clip: bool = True):
    """A denoise function ``(x_t, t) -> (x0, var)`` for the sampler, guided with scale ``s``:
    x₀ = x₀_u + s · (x₀_c − x₀_u), with x₀_c and x₀_u each clipped to [−1, 1] first when ``clip`` (the guided x₀ may
    leave [−1, 1]; it is not clipped again). ``guidance_scale == 1`` (or ``None``) runs only the conditional branch,
    whose x₀ is clipped when ``clip``."""

    if guidance_scale is None or guidance_scale == 1.0:
        def conditional(x_t: Tensor, t: Tensor):
            x0, var = model(x_t, t, cond)
            return (x0.clamp(-1, 1) if clip else x0), var

        return conditional

    def guided(x_t: Tensor, t: Tensor):
        b = x_t.shape[0]
        x0, var = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
        if clip:
            x0 = x0.clamp(-1, 1)  # each branch, before guidance
        x0_cond, x0_uncond = x0[:b], x0[b:]
        return x0_uncond + guidance_scale * (x0_cond - x0_uncond), (None if var is None else var[:b])

    return guided
