"""Samplers for the latent prior: Karras/Heun (what the released notebooks use), DDIM and ancestral.

Every sampler works on a :class:`~shapee.diffusion.gaussian.GaussianDiffusion` and a denoise function
``denoise(x_t, t) -> (x0_pred, var_values | None)`` in the DDPM (variance-preserving) parametrisation; classifier-free
guidance is applied by wrapping that function (``shapee.diffusion.guidance``). The samplers never clip: where x₀ is
clipped to [−1, 1] (latents are tanh-bounded) is the denoise function's business, decided in one place,
:func:`~shapee.diffusion.guidance.guided_denoiser` (each branch before guidance, never the guided result, as the
released sampler does) or :func:`~shapee.diffusion.guidance.clipped` for a plain denoiser.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from shapee.diffusion.gaussian import DenoiseFn, GaussianDiffusion


def _randn(shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    # Draw on the generator's device, then move: the same seed gives the same latent on CPU and CUDA.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------------------ Karras
def karras_sigmas(steps: int = 64, sigma_min: float = 1e-3, sigma_max: float = 160.0, rho: float = 7.0) -> Tensor:
    """The EDM noise levels σ_i = (σ_max^{1/ρ} + i/(n−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then a final 0: ``[steps + 1]``."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sigma_to_t(diffusion: GaussianDiffusion, sigma: Tensor, integer: bool = True) -> Tensor:
    """The VP timestep with ᾱ_t = 1/(σ² + 1), linearly interpolated over the ᾱ table.

    ``integer=True`` truncates as the released code does (reference §5.4: σ below σ₀ ≈ 0.1086 maps to t = 0; with the
    default schedule the t sequence starts 865, 849, 833, …). ``integer=False`` keeps the fractional timestep.
    """
    alpha_bar = (1.0 / (sigma.double() ** 2 + 1.0)).cpu().numpy()
    table = diffusion.alphas_cumprod  # decreasing in t
    t = np.interp(alpha_bar, table[::-1], np.arange(diffusion.num_steps)[::-1].astype(np.float64))
    t = np.floor(t) if integer else t
    return torch.as_tensor(t, device=sigma.device)


def karras_denoiser(diffusion: GaussianDiffusion, denoise: DenoiseFn, *, integer_timesteps: bool = True):
    """Turn a VP denoise function into the VE one EDM samplers use: D(x, σ) = x₀(x / sqrt(σ² + 1), t(σ))."""

    def fn(x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        t = sigma_to_t(diffusion, sigma, integer=integer_timesteps)
        c_in = (1.0 / torch.sqrt(sigma.double() ** 2 + 1.0)).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x0, _ = denoise(x * c_in, diffusion.model_timesteps(t.long()) if integer_timesteps else t)
        return x0

    return fn


@torch.no_grad()
def sample_karras(
    diffusion: GaussianDiffusion,
    denoise: DenoiseFn,
    shape: tuple[int, ...],
    *,
    steps: int = 64,
    sigma_min: float = 1e-3,
    sigma_max: float = 160.0,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Tensor:
    """Heun's 2nd-order sampler of Karras et al. 2022 (Alg. 2), Euler on the last step: 2·steps − 1 denoiser calls."""
    D = karras_denoiser(diffusion, denoise)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = _randn(shape, generator, device, dtype) * sigmas[0].item()
    indices = range(steps)
    if progress:
        indices = tqdm(indices, desc="karras", leave=False)
    for i in indices:
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1.0)
        if gamma > 0:
            eps = _randn(shape, generator, device, dtype) * s_noise
            x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
        d = (x - D(x, torch.tensor(sigma_hat, device=device))) / sigma_hat  # [B, ...]
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt  # Euler on the last step
        else:
            x_next = x + d * dt
            d_next = (x_next - D(x_next, torch.tensor(sigma_next, device=device))) / sigma_next
            x = x + (d + d_next) / 2 * dt
    return x


# -------------------------------------------------------------------------------------------------------- DDIM
@torch.no_grad()
def sample_ddim(
    diffusion: GaussianDiffusion,
    denoise: DenoiseFn,
    shape: tuple[int, ...],
    *,
    steps: int = 64,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DDIM (Song et al. 2021) over ``steps`` evenly spaced timesteps; ``eta=0`` is deterministic given x_T."""
    process = diffusion.respaced(steps)
    x = _randn(shape, generator, device, dtype)
    for i in reversed(range(process.num_steps)):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        x0, _ = denoise(x, process.model_timesteps(t))
        eps = process.predict_eps(x, t, x0)
        a_bar, a_bar_prev = process.alphas_cumprod[i], process.alphas_cumprod_prev[i]
        sigma = eta * math.sqrt((1 - a_bar_prev) / (1 - a_bar) * (1 - a_bar / a_bar_prev))
        x = math.sqrt(a_bar_prev) * x0 + math.sqrt(max(1 - a_bar_prev - sigma**2, 0.0)) * eps
        if sigma > 0 and i > 0:
            x = x + sigma * _randn(shape, generator, device, dtype)
    return x


# --------------------------------------------------------------------------------------------------- ancestral
@torch.no_grad()
def sample_ancestral(
    diffusion: GaussianDiffusion,
    denoise: DenoiseFn,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Ancestral DDPM sampling x_{t−1} ~ p(x_{t−1} | x_t) with the model's (learned or fixed) variance."""
    process = diffusion if steps is None else diffusion.respaced(steps)
    x = _randn(shape, generator, device, dtype)
    for i in reversed(range(process.num_steps)):
        t = torch.full((shape[0],), i, device=device, dtype=torch.long)
        x0, var = denoise(x, process.model_timesteps(t))
        mean, log_var = process.p_mean_variance(x0, var, x, t)
        x = mean
        if i > 0:
            x = x + torch.exp(0.5 * log_var) * _randn(shape, generator, device, dtype)
    return x


SAMPLERS = {"karras": sample_karras, "ddim": sample_ddim, "ancestral": sample_ancestral}
