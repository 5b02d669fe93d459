"""The latent diffusion process (schedules, q_sample, losses), samplers and classifier-free guidance."""

from shapee.diffusion.gaussian import GaussianDiffusion, make_betas
from shapee.diffusion.guidance import clipped, guided_denoiser
from shapee.diffusion.samplers import (
    SAMPLERS,
    karras_sigmas,
    sample_ancestral,
    sample_ddim,
    sample_karras,
    sigma_to_t,
)

__all__ = [
    "GaussianDiffusion",
    "make_betas",
    "clipped",
    "guided_denoiser",
    "SAMPLERS",
    "karras_sigmas",
    "sample_ancestral",
    "sample_ddim",
    "sample_karras",
    "sigma_to_t",
]
