"""Sinusoidal timestep embedding of the latent diffusion Transformer (reference §5.2, step 3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Embed integer (or real) timesteps ``t`` ``[B]`` as ``[B, dim]`` float32.

    ``dim // 2`` frequencies ``f_i = exp(−ln(max_period) · i / (dim // 2))``; the output is the **cosine half first,
    then the sine half** (``[cos(t f_0) … cos(t f_{h−1}), sin(t f_0) … sin(t f_{h−1})]``), as the released priors
    expect. Timesteps are used as-is (no rescaling to [0, 1]). An odd ``dim`` gets one trailing zero.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # [h]
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # [B, h]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2h]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # [B, dim]
    return emb
