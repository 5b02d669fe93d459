"""The latent bottleneck ``clamp_diffusion_noise`` (reference §1.5).

Always ``tanh`` (latents lie in (−1, 1), which the diffusion prior relies on). In training mode only, each sample
draws ``t ~ U{0..T−1}``, keeps it with probability ``diffusion_prob`` (else ``t = 0``), and is replaced by the forward
diffusion sample ``q(x_t | x) = sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) ε`` of the ``inv_parabola`` schedule ``ᾱ(s) = 1 − s^power``
(power 5, T = 1024): the decoder learns to cope with slightly noisy latents, as the prior's samples will be.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def inv_parabola_alpha_bar(timesteps: int = 1024, power: float = 5.0, max_beta: float = 0.999) -> Tensor:
    """``ᾱ_t`` ``[T]`` float64 of the discretised schedule ``ᾱ(s) = 1 − s^power``.

    β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta) and ᾱ_t = Π_{i≤t} (1 − β_i), the usual discretisation of a
    continuous ᾱ(s); the clip makes the last step ᾱ_{T−1} = 0.001 · ᾱ_{T−2} (≈ 4.9e-6) instead of 0.
    ᾱ at t = 511 / 767 / 1023 ≈ 0.969 / 0.763 / 4.9e-6.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    s = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps  # [T + 1] (CPU even under a meta-device context)
    abar = 1.0 - s**power  # [T + 1] continuous ᾱ at the step boundaries
    betas = (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)  # [T]
    return torch.cumprod(1.0 - betas, dim=0)  # [T]


class ClampDiffusionNoise(nn.Module):
    """``tanh``, plus forward-diffusion noise on a random 10 % of the samples in training (parameter-free)."""

    def __init__(self, *, diffusion_prob: float = 0.1, timesteps: int = 1024, power: float = 5.0) -> None:
        super().__init__()
        if not 0.0 <= diffusion_prob <= 1.0:
            raise ValueError(f"diffusion_prob must be in [0, 1], got {diffusion_prob}")
        self.diffusion_prob = diffusion_prob
        self.timesteps = timesteps
        alpha_bar = inv_parabola_alpha_bar(timesteps, power)  # [T] float64
        # Plain CPU float64 tensors, not buffers: no checkpoint key, and nothing left behind when the module is built
        # on the meta device and loaded with assign=True. 8 KB each, moved to the input's device when used.
        self.alpha_bar = alpha_bar
        self.sqrt_alpha_bar = alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt()

    def sample_timesteps(self, batch: int, *, device=None, generator: torch.Generator | None = None) -> Tensor:
        """``[batch]`` int64: ``t ~ U{0..T−1}`` with probability ``diffusion_prob``, else 0."""
        t = torch.randint(0, self.timesteps, (batch,), device=device, generator=generator)  # [B]
        keep = torch.rand(batch, device=device, generator=generator) < self.diffusion_prob  # [B]
        return torch.where(keep, t, torch.zeros_like(t))

    def q_sample(self, x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``sqrt(ᾱ_t) x + sqrt(1 − ᾱ_t) ε`` for ``x``, ``noise`` ``[B, ...]`` and ``t`` ``[B]``."""
        shape = (-1,) + (1,) * (x.ndim - 1)
        # Cast to float32 before moving (float64 is not supported on every device); index on the device (no sync).
        a = self.sqrt_alpha_bar.to(device=x.device, dtype=torch.float32)[t].view(shape).to(x.dtype)  # [B, 1, ...]
        s = self.sqrt_one_minus_alpha_bar.to(device=x.device, dtype=torch.float32)[t].view(shape).to(x.dtype)
        return a * x + s * noise

    def forward(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``x``: ``[B, ...]`` → same shape; tanh only in eval mode."""
        x = torch.tanh(x)
        if not self.training:
            return x
        t = self.sample_timesteps(x.shape[0], device=x.device, generator=generator)  # [B]
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return self.q_sample(x, t, noise)
