"""The latent diffusion Transformer of the released priors (reference §5.1–5.2; Point-E's transformer + pos_emb).

``denoiser(x_t [B, 1024, 1024], t [B], cond) -> [B, 1024, 2048]``: token i of the latent is row i of the implicit
MLP's weights (§1.6); the output holds, per token, the x₀ prediction (first ``d_latent`` channels) and then the
learned-range variance values. The network knows nothing of the noise schedule.

Two conditioning modes, as in the releases:

* ``cond_mode="text"`` (text300M): one token from the normalised CLIP text embedding ×sqrt(D), ``Linear(D, W)``;
  sequence [cond, time, latents] (1026 tokens).
* ``cond_mode="image"`` (image300M): the 256×1024 CLIP patch grid through ``LayerNorm`` + ``Linear``; sequence
  [time, grid, latents] (1281 tokens).

Module names equal the official keys without the ``wrapped.`` prefix, so released weights load without renaming.
Classifier-free guidance training: with probability ``cond_drop_prob`` a sample's conditioning is zeroed *before*
the projection (§5.2), in training mode only; the unconditional branch at sampling time is the zero conditioning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from shapee.nn.attention import MLP, Transformer
from shapee.nn.timestep import timestep_embedding


class LatentDenoiser(nn.Module):
    """x₀-predicting Transformer over latent tokens, conditioned on CLIP text or image-grid embeddings.

    Args:
        d_latent: channels per latent token (1024); ``n_ctx``: latent tokens (1024).
        width, layers, heads: backbone size (official: 1024, 24, 16 for text / 8 for image).
        cond_mode: ``"text"`` or ``"image"``; ``cond_dim``: CLIP width (768 text, 1024 image grid);
        cond_tokens: image-grid tokens (256).
        learn_sigma: output 2·d_latent channels (x₀ then variance values) instead of d_latent.
        cond_drop_prob: conditioning dropout in training (0.1). ``checkpoint``: activation checkpointing.
    """

    def __init__(
        self,
        *,
        d_latent: int = 1024,
        n_ctx: int = 1024,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        cond_mode: str = "text",
        cond_dim: int = 768,
        cond_tokens: int = 256,
        learn_sigma: bool = True,
        init_scale: float = 0.25,
        pos_emb_init_scale: float = 0.05,
        cond_drop_prob: float = 0.1,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if cond_mode not in ("text", "image"):
            raise ValueError(f"cond_mode must be 'text' or 'image', got {cond_mode!r}")
        self.d_latent, self.n_ctx, self.width = d_latent, n_ctx, width
        self.cond_mode, self.cond_dim, self.cond_tokens = cond_mode, cond_dim, cond_tokens
        self.cond_drop_prob = cond_drop_prob
        self.out_channels = 2 * d_latent if learn_sigma else d_latent

        self.time_embed = MLP(width=width, init_scale=init_scale)  # std init_scale/sqrt(W), as the backbone
        self.pos_emb = nn.Parameter(pos_emb_init_scale * torch.randn(n_ctx, width))
        if cond_mode == "text":
            self.clip_embed = nn.Linear(cond_dim, width)
        else:
            self.clip_embed = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, width))
        self.ln_pre = nn.LayerNorm(width)
        self.backbone = Transformer(width=width, layers=layers, heads=heads, init_scale=init_scale, checkpoint=checkpoint)
        self.ln_post = nn.LayerNorm(width)
        self.input_proj = nn.Linear(d_latent, width)
        self.output_proj = nn.Linear(width, self.out_channels)
        nn.init.zeros_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    @property
    def n_extra_tokens(self) -> int:
        return 2 if self.cond_mode == "text" else 1 + self.cond_tokens

    def _check(self, x_t: Tensor, t: Tensor, cond: Tensor) -> None:
        if x_t.ndim != 3 or x_t.shape[1:] != (self.n_ctx, self.d_latent):
            raise ValueError(f"x_t must be [B, {self.n_ctx}, {self.d_latent}], got {tuple(x_t.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be [B] = [{x_t.shape[0]}], got {tuple(t.shape)}")
        expected = (x_t.shape[0], self.cond_dim) if self.cond_mode == "text" else (x_t.shape[0], self.cond_tokens, self.cond_dim)
        if tuple(cond.shape) != expected:
            raise ValueError(f"{self.cond_mode} conditioning must have shape {list(expected)}, got {list(cond.shape)}")

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """``x_t`` ``[B, n_ctx, d_latent]``, ``t`` ``[B]`` (integer timesteps, not rescaled), ``cond``: text
        ``[B, cond_dim]`` (L2-normalised) or image grid ``[B, cond_tokens, cond_dim]`` → ``[B, n_ctx, out_channels]``."""
        self._check(x_t, t, cond)
        if self.training and self.cond_drop_prob > 0:
            keep = torch.rand(cond.shape[0], device=cond.device) >= self.cond_drop_prob  # [B]
            cond = cond * keep.to(cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
        t_emb = self.time_embed(timestep_embedding(t, self.width).to(x_t.dtype))  # [B, W]
        if self.cond_mode == "text":
            c = self.clip_embed(cond * math.sqrt(self.cond_dim))  # [B, W]
            extra = torch.stack([c, t_emb], dim=1)  # [B, 2, W]: [cond, time]
        else:
            c = self.clip_embed(cond)  # [B, 256, W]
            extra = torch.cat([t_emb[:, None], c], dim=1)  # [B, 257, W]: [time, grid]
        h = self.input_proj(x_t) + self.pos_emb  # [B, n_ctx, W]
        h = torch.cat([extra.to(h.dtype), h], dim=1)  # [B, extra + n_ctx, W]
        h = self.ln_post(self.backbone(self.ln_pre(h)))
        return self.output_proj(h[:, self.n_extra_tokens :])  # [B, n_ctx, out_channels]

    def split_output(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[B, n_ctx, out_channels]`` → (x₀ ``[B, n_ctx, d_latent]``, variance values or None)."""
        if self.out_channels == self.d_latent:
            return out, None
        return out[..., : self.d_latent], out[..., self.d_latent :]
