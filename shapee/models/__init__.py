"""The composites, where encoder, implicit function, renderers, denoiser and diffusion process meet."""

from shapee.models.denoiser import LatentDenoiser
from shapee.models.transmitter import LossSettings, Transmitter
from shapee.models.latent_diffusion import LatentDiffusion

__all__ = ["LatentDenoiser", "LatentDiffusion", "LossSettings", "Transmitter"]
