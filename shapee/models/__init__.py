"""The composites, where encoder, implicit function, renderers, denoiser and diffusion process meet."""

from shapee.models.denoiser import LatentDenoiser
from shapee.models.transmitter import Transmitter

__all__ = ["LatentDenoiser", "Transmitter"]
