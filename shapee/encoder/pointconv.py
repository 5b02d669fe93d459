"""Point-conv query tokens: ball query + set-abstraction convolution (reference §1.3 step 2, §8.3 quirk 1).

For every centroid (the first ``data_ctx`` points of the FPS-ordered cloud), the ``n_samples`` lowest-index points
within ``radius`` are grouped (padded with the first hit), each neighbour contributing [relative xyz (3), embedded
feature (D)]. The group is laid out as a 2-D map ``[B, 3 + D, n_samples, M]`` and goes through Conv2d layers with
kernel ``(patch, 1)``, stride ``(stride, 1)`` and circular padding along the neighbour axis (64 → 17 → 5 at release
sizes), swish after each, then the mean over neighbours gives one token per centroid.

Before each conv the neighbour axis is randomly permuted, independently for every (batch, channel) pair and shared
by all centroids, **also in eval mode**, as the released encoder does: the encoding is stochastic. Pass a
``generator`` for reproducible draws, or build the module with ``shuffle=False`` for a deterministic variant (this no
longer matches the released encoder's statistics).

Memory: the grouped map is ``B · (3 + D) · n_samples · M`` floats (269 MB per asset at release sizes), so centroids
are processed in chunks of ``chunk_size`` (optionally under activation checkpointing); the ball query's distance
matrix is computed per chunk too. The grouped map is gathered from channel-major copies of the points (each gather
reads one channel row at a time) and each conv's shuffle and circular padding are one gather (:meth:`_sources`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


def ball_query(xyz: Tensor, centroids: Tensor, *, radius: float, n_samples: int, chunk_size: int | None = None) -> Tensor:
    """Indices of the ``n_samples`` lowest-index points within ``radius`` of each centroid.

    ``xyz``: ``[B, N, 3]``, ``centroids``: ``[B, M, 3]`` → ``[B, M, n_samples]`` int64, ascending per centroid.
    A point counts when its squared distance is ``<= radius²``. Groups with fewer hits are padded with their first
    (lowest-index) hit; a centroid with no point at all within the radius (impossible when centroids are cloud
    points, as in the encoder) falls back to its nearest point. ``chunk_size`` centroids are processed at a time
    (default: about 16 M distance entries per chunk).
    """
    if xyz.ndim != 3 or xyz.shape[-1] != 3 or centroids.ndim != 3 or centroids.shape[-1] != 3:
        raise ValueError(f"ball_query needs xyz [B, N, 3] and centroids [B, M, 3], got {tuple(xyz.shape)}, {tuple(centroids.shape)}")
    if xyz.shape[0] != centroids.shape[0]:
        raise ValueError(f"ball_query: batch sizes differ ({xyz.shape[0]} vs {centroids.shape[0]})")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    B, N, _ = xyz.shape
    M = centroids.shape[1]
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // max(1, B * N))
    k = min(n_samples, N)
    arange_n = torch.arange(N, device=xyz.device)  # [N]
    out = []
    for start in range(0, M, chunk_size):
        c = centroids[:, start : start + chunk_size]  # [B, Mc, 3]
        d2 = (c[:, :, None, :] - xyz[:, None, :, :]).square().sum(-1)  # [B, Mc, N]
        inside = d2 <= radius * radius  # [B, Mc, N]
        key = torch.where(inside, arange_n, N)  # [B, Mc, N]: index if inside, N (= "none") otherwise
        idx = key.topk(k, dim=-1, largest=False, sorted=True).values  # [B, Mc, k] lowest indices, ascending
        first = idx[..., :1]  # [B, Mc, 1]
        nearest = d2.argmin(dim=-1, keepdim=True)  # [B, Mc, 1]
        first = torch.where(first == N, nearest, first)  # no hit at all → nearest point
        idx = torch.where(idx == N, first, idx)  # pad with the first hit
        if k < n_samples:
            idx = torch.cat([idx, first.expand(-1, -1, n_samples - k)], dim=-1)  # [B, Mc, S]
        out.append(idx)
    return torch.cat(out, dim=1)  # [B, M, S]


class PointSetEmbedding(nn.Module):
    """Set-abstraction tokens ``[B, M, hidden[-1]]`` from a cloud and its per-point features (keys ``mlp_convs.{i}``).

    ``d_input`` is the per-point feature width (the encoder's width); the first conv sees ``3 + d_input`` channels.
    Convs use PyTorch's default initialisation.
    """

    def __init__(
        self,
        *,
        d_input: int,
        hidden: tuple[int, ...] | list[int] = (1024, 1024),
        radius: float = 0.5,
        n_samples: int = 64,
        patch_size: int = 8,
        stride: int = 4,
        padding: int | None = None,
        shuffle: bool = True,
        chunk_size: int = 256,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("pointconv hidden sizes must name at least one layer")
        padding = patch_size // 2 if padding is None else padding
        # A 1-wide kernel cannot see the neighbour order, so the official code shuffles only when patch_size > 1.
        self.radius, self.n_samples, self.shuffle = radius, n_samples, shuffle and patch_size > 1
        self.chunk_size, self.checkpoint = chunk_size, checkpoint
        # Neighbour-axis lengths through the convs (64 → 17 → 5 at release sizes); circular padding needs pad <= length.
        self.lengths = [n_samples]
        for _ in hidden:
            length = self.lengths[-1]
            if padding > length or length + 2 * padding < patch_size:
                raise ValueError(
                    f"pointconv: neighbour axis of length {length} is too short for patch {patch_size} / padding {padding}"
                    f" (n_samples={n_samples}, stride={stride})"
                )
            self.lengths.append((length + 2 * padding - patch_size) // stride + 1)
        channels = [3 + d_input, *hidden]
        self.mlp_convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=(patch_size, 1), stride=(stride, 1), padding=(padding, 0), padding_mode="circular")
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.channels = channels

    def _permutations(self, batch: int, device: torch.device, generator: torch.Generator | None) -> list[Tensor | None]:
        """One neighbour-axis permutation per (batch, channel) pair and conv: ``[B, C_l, S_l]`` int64 each."""
        if not self.shuffle:
            return [None] * len(self.mlp_convs)
        return [
            torch.rand(batch, c, s, device=device, generator=generator).argsort(dim=-1)
            for c, s in zip(self.channels[:-1], self.lengths[:-1])
        ]

    def _sources(self, perms: list[Tensor | None], batch: int, device: torch.device) -> list[Tensor]:
        """Per conv, where each row of its shuffled, circularly padded input comes from: ``[B, C_l, S_l + 2·pad]``.

        Row ``s'`` of the padded map is row ``(s' − pad) mod S`` of the shuffled map, i.e. row ``perm[(s' − pad) mod S]``
        of the unshuffled one: one gather does both the shuffle and the circular padding of ``nn.Conv2d``."""
        sources = []
        for conv, perm, c, length in zip(self.mlp_convs, perms, self.channels[:-1], self.lengths[:-1]):
            pad = conv.padding[0]
            wrap = (torch.arange(length + 2 * pad, device=device) - pad) % length  # [S + 2·pad]
            if perm is None:
                sources.append(wrap.expand(batch, c, -1))
            else:
                sources.append(perm.gather(2, wrap.expand(batch, c, -1)))
        return sources

    def _embed_chunk(self, xyz_t: Tensor, features_t: Tensor, centroids: Tensor, idx: Tensor, *sources: Tensor) -> Tensor:
        """Tokens of one chunk of centroids: ``xyz_t`` ``[B, 3, N]``, ``features_t`` ``[B, D, N]`` (channel-major, so
        every gather reads one channel row at a time), ``centroids`` ``[B, Mc, 3]``, ``idx`` ``[B, Mc, S]``,
        ``sources`` from :meth:`_sources` → ``[B, Mc, C_out]``."""
        B, Mc, S = idx.shape
        flat = idx.transpose(1, 2).reshape(B, 1, S * Mc)  # [B, 1, S·Mc], neighbour-major
        rel = xyz_t.gather(2, flat.expand(-1, 3, -1)).view(B, 3, S, Mc) - centroids.transpose(1, 2)[:, :, None, :]
        feats = features_t.gather(2, flat.expand(-1, features_t.shape[1], -1)).view(B, -1, S, Mc)  # [B, D, S, Mc]
        h = torch.cat([rel.to(features_t.dtype), feats], dim=1)  # [B, C, S, Mc]: the grouped map
        for conv, src in zip(self.mlp_convs, sources):
            h = h.gather(2, src[..., None].expand(-1, -1, -1, Mc))  # [B, C, S + 2·pad, Mc] shuffled, circularly padded
            h = F.silu(F.conv2d(h, conv.weight, conv.bias, stride=conv.stride))  # [B, C', S', Mc] (padding done above)
        return h.mean(dim=2).transpose(1, 2)  # [B, Mc, C_out]

    def forward(self, xyz: Tensor, features: Tensor, centroids: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``xyz``: ``[B, N, 3]``, ``features``: ``[B, N, D]``, ``centroids``: ``[B, M, 3]`` → ``[B, M, hidden[-1]]``."""
        if features.shape[:2] != xyz.shape[:2] or features.shape[-1] != self.channels[0] - 3:
            raise ValueError(
                f"point features must have shape [B, N, {self.channels[0] - 3}] matching xyz {tuple(xyz.shape)}, "
                f"got {tuple(features.shape)}"
            )
        sources = self._sources(self._permutations(xyz.shape[0], xyz.device, generator), xyz.shape[0], xyz.device)
        xyz_t, features_t = xyz.transpose(1, 2).contiguous(), features.transpose(1, 2).contiguous()  # [B, 3 | D, N]
        tokens = []
        for start in range(0, centroids.shape[1], self.chunk_size):
            c = centroids[:, start : start + self.chunk_size]  # [B, Mc, 3]
            with torch.no_grad():
                idx = ball_query(xyz, c, radius=self.radius, n_samples=self.n_samples)  # [B, Mc, S]
            if self.checkpoint and torch.is_grad_enabled():
                tokens.append(activation_checkpoint(self._embed_chunk, xyz_t, features_t, c, idx, *sources, use_reentrant=False))
            else:
                tokens.append(self._embed_chunk(xyz_t, features_t, c, idx, *sources))
        return torch.cat(tokens, dim=1)  # [B, M, C_out]
