"""The Gaussian diffusion process of the latent prior: schedules, q_sample, posterior, training losses.

The process knows nothing about the network. Networks are seen through a *denoise function*
``denoise(x_t, t) -> (x0_pred, var_values | None)`` in the variance-preserving (DDPM) parametrisation, with integer
(or float) timesteps ``t`` in ``[0, T)``. The released priors predict x₀ ("x_start") and a learned-range variance
(reference §5.3); fixed variances are supported too.

All coefficient tables are float64 and are cast to the sample's dtype (fp32) when used: diffusion coefficients are
never computed in bf16.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

DenoiseFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor | None]"]


# --------------------------------------------------------------------------------------------------- schedules
def alpha_bar_exp(s: np.ndarray, coefficient: float = -12.0) -> np.ndarray:
    """ᾱ(s) = exp(coefficient · s), the released priors' ``exp`` schedule (reference §5.3)."""
    return np.exp(coefficient * s)


def alpha_bar_cosine(s: np.ndarray, offset: float = 0.008) -> np.ndarray:
    """ᾱ(s) = cos²((s + o)/(1 + o) · π/2) / cos²(o/(1 + o) · π/2) (Nichol & Dhariwal 2021)."""
    f = lambda u: np.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2  # noqa: E731
    return f(s) / f(0.0)


def betas_for_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray], num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 − ᾱ((i+1)/T) / ᾱ(i/T), max_beta), i = 0..T−1."""
    i = np.arange(num_steps, dtype=np.float64)
    return np.minimum(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)


def make_betas(schedule: str = "exp", num_steps: int = 1024, **kwargs) -> np.ndarray:
    if schedule == "exp":
        return betas_for_alpha_bar(lambda s: alpha_bar_exp(s, kwargs.get("coefficient", -12.0)), num_steps)
    if schedule == "cosine":
        return betas_for_alpha_bar(alpha_bar_cosine, num_steps)
    if schedule == "linear":
        scale = 1000.0 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {schedule!r}: expected 'exp', 'cosine' or 'linear'")


# ------------------------------------------------------------------------------------------------ the process
class GaussianDiffusion:
    """DDPM forward process q(x_t | x₀) and the model's reverse process p(x_{t−1} | x_t) around a denoise function.

    Args:
        betas: ``[T]`` noise schedule.
        learned_variance: the network's second output interpolates log β_t and log β̃_t (``learned_range``);
            otherwise the variance is fixed to β̃_t (posterior variance).
        timestep_map: for a respaced process, the original timestep of each of its steps (the network sees these).
    """

    def __init__(self, betas: np.ndarray, *, learned_variance: bool = True, timestep_map: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.num_steps = len(betas)
        self.learned_variance = learned_variance
        self.timestep_map = np.arange(self.num_steps) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - betas
        self.betas = betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t−1} | x_t, x₀) (Ho et al. 2020, eq. 6–7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: clip its log with β̃_1 as in Improved DDPM.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, schedule: str = "exp", num_steps: int = 1024, learned_variance: bool = True, **kwargs) -> "GaussianDiffusion":
        return cls(make_betas(schedule, num_steps, **kwargs), learned_variance=learned_variance)

    # ---------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _at(table: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` broadcast to ``like``'s shape, in ``like``'s dtype (tables stay float64 until here)."""
        values = torch.as_tensor(table, device=t.device)[t.long()].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    @property
    def sigmas(self) -> np.ndarray:
        """Variance-exploding noise levels σ_t = sqrt(1/ᾱ_t − 1) (reference §5.3: σ₀ ≈ 0.1086, σ₁₀₂₃ ≈ 403)."""
        return np.sqrt(1.0 / self.alphas_cumprod - 1.0)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Timesteps the network sees (identity unless respaced)."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t.long()]

    # --------------------------------------------------------------------------------------- forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(ᾱ_t) x₀ + sqrt(1 − ᾱ_t) ε."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(x_{t−1} | x_t, x₀)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # --------------------------------------------------------------------------------------- reverse process
    def p_mean_variance(self, x0_pred: Tensor, var_values: Tensor | None, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p(x_{t−1} | x_t) given the network's x₀ and variance outputs."""
        if self.learned_variance:
            if var_values is None:
                raise ValueError("this process has a learned variance: the denoiser must return variance values")
            # learned_range: v ∈ [−1, 1] interpolates between log β̃_t (v = −1) and log β_t (v = 1).
            frac = (var_values + 1) / 2
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(np.log(self.betas), t, x_t)
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            log_variance = self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        mean, _ = self.q_posterior(x0_pred, x_t, t)
        return mean, log_variance

    # ----------------------------------------------------------------------------------------------- losses
    def training_losses(self, denoise: DenoiseFn, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses ``[B]``: ``mse`` between predicted and true x₀, ``vb`` (variance head only, the mean is
        stop-gradiented; bits per dimension), and ``loss`` = mse + vb (reference §5.3, not rescaled)."""
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        x0_pred, var_values = denoise(x_t, self.model_timesteps(t))
        dims = tuple(range(1, x0.ndim))
        terms = {"mse": ((x0_pred.float() - x0.float()) ** 2).mean(dim=dims)}
        if self.learned_variance:
            terms["vb"] = self._vb_bits_per_dim(x0_pred.detach().float(), var_values.float(), x0.float(), x_t.float(), t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _vb_bits_per_dim(self, x0_pred: Tensor, var_values: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        dims = tuple(range(1, x0.ndim))
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var = self.p_mean_variance(x0_pred, var_values, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # --------------------------------------------------------------------------------------------- respacing
    def respaced(self, num_steps: int) -> "GaussianDiffusion":
        """A process over ``num_steps`` evenly spaced original timesteps (Improved DDPM §4), for fast sampling."""
        if not 1 <= num_steps <= self.num_steps:
            raise ValueError(f"cannot respace {self.num_steps} steps to {num_steps}")
        use = np.unique(np.round(np.linspace(0, self.num_steps - 1, num_steps)).astype(np.int64))
        alpha_bar = self.alphas_cumprod[use]
        betas = 1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1])
        return GaussianDiffusion(betas, learned_variance=self.learned_variance, timestep_map=self.timestep_map[use])


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _standard_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation of Φ used by DDPM's decoder likelihood.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log p(x) of data in [−1, 1] quantised to 256 bins under N(means, e^(2·log_scales)), elementwise (nats)."""
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
