"""Positional encodings (reference §2.1, ``posenc_version: nerf``).

The NeRF encoding of a ``C``-channel input with ``n`` octaves is ``C · (1 + 2n)`` wide and laid out exactly as the
official checkpoints expect: the raw values, then the sines ordered frequency-major / coordinate-minor
(``sin(2⁰x₀), sin(2⁰x₁), sin(2⁰x₂), sin(2¹x₀), …``), then the matching cosines in the same order. Widths used by the
released models: positions 3 channels × 15 octaves → 93, directions 3 × 8 → 51, the encoder's 6-channel points
(xyz + rgb) × 15 → 186.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

POSITION_OCTAVES = 15  # positions, colours and the encoder's input points
DIRECTION_OCTAVES = 8  # view directions of the implicit MLP


def nerf_encoding_width(channels: int, n_octaves: int = POSITION_OCTAVES) -> int:
    """Width of :func:`nerf_encoding` for ``channels`` input channels: ``channels · (1 + 2 · n_octaves)``."""
    return channels * (1 + 2 * n_octaves)


def nerf_encoding(x: Tensor, n_octaves: int = POSITION_OCTAVES, *, out: Tensor | None = None) -> Tensor:
    """NeRF positional encoding along the last axis: ``[..., C] → [..., C · (1 + 2 · n_octaves)]``.

    Output = ``[x, sin(2^k x_c) for k, c, cos(2^k x_c) for k, c]`` with ``k`` the slow (frequency) index and ``c`` the
    fast (coordinate) index. The cosine is computed as ``sin(· + π/2)``, as the official code does, so that encoded
    values match the released models bit for bit rather than to within rounding.

    ``out``: an optional ``[..., C·(1 + 2n)]`` tensor (e.g. a slice of a wider feature map) written in place and
    returned, which saves the concatenations for large inputs; no autograd through it (same values, bit for bit).
    """
    if n_octaves < 1:
        raise ValueError(f"n_octaves must be >= 1, got {n_octaves}")
    scales = 2.0 ** torch.arange(n_octaves, device=x.device, dtype=x.dtype)  # [n]
    scaled = (x[..., None, :] * scales[:, None]).flatten(-2)  # [..., n, C] → [..., n·C] frequency-major
    if out is not None:
        C, nC = x.shape[-1], scaled.shape[-1]
        if out.shape != (*x.shape[:-1], C + 2 * nC):
            raise ValueError(f"nerf_encoding: out must have shape {(*x.shape[:-1], C + 2 * nC)}, got {tuple(out.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("nerf_encoding: out= does not support autograd; call it without out")
        out[..., :C] = x
        torch.sin(scaled, out=out[..., C : C + nC])  # [..., n·C] sines
        torch.sin(scaled.add_(math.pi / 2), out=out[..., C + nC :])  # [..., n·C] cosines as sin(· + π/2)
        return out
    emb = torch.sin(torch.cat([scaled, scaled + math.pi / 2], dim=-1))  # [..., 2·n·C] sines then cosines
    return torch.cat([x, emb], dim=-1)  # [..., C·(1 + 2n)]


class PosEmbLinear(nn.Linear):
    """NeRF encoding followed by a linear layer (the encoder's ``input_proj``: 6 → 186 → width).

    The weight is ``[out_features, in_features · (1 + 2 · n_octaves)]`` (``[1024, 186]`` in the release); PyTorch's
    default ``nn.Linear`` initialisation.
    """

    def __init__(self, in_features: int, out_features: int, *, n_octaves: int = POSITION_OCTAVES) -> None:
        super().__init__(nerf_encoding_width(in_features, n_octaves), out_features)
        self.raw_features = in_features
        self.n_octaves = n_octaves

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[..., in_features]`` → ``[..., out_features]``."""
        if x.shape[-1] != self.raw_features:
            raise ValueError(f"PosEmbLinear expects {self.raw_features} input channels, got shape {tuple(x.shape)}")
        # Encode in at least fp32 (sin(2^14 x) is meaningless in half precision), then match the weight's dtype.
        enc = nerf_encoding(x if x.dtype == torch.float64 else x.float(), self.n_octaves)
        return super().forward(enc.to(self.weight.dtype))
