"""Multiview "point cloud" pixels → per-view tokens (reference §1.3 step 6, ``encode_multiview_pcl``).

Every pixel of every encoder view becomes a 3-D sample: its camera ray (corner-aligned pinhole model of
:mod:`shapee.cameras`), the planar depth turned into a distance along the ray and a hit point. Per pixel features
are the NeRF encodings of [rgb in [−1, 1], ray origin, hit position] (3 × 93 = 279); pixels with alpha below 0.999
are replaced by a learned ``unk_token``. A 3×3 conv (279 → 512, ``mv_pcl_embed``) and an 8×8 stride-8 patch conv
(512 → width, ``patch_emb``) give (H/8)·(W/8) tokens per view (1024 at 256²). No camera or patch-position
embedding: pose reaches the tokens only through the origin/position encodings.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shapee.cameras import Cameras
from shapee.nn.encoding import POSITION_OCTAVES, nerf_encoding, nerf_encoding_width


def pixel_points(matrix: Tensor, fov: Tensor, depth: Tensor, *, max_depth: float) -> tuple[Tensor, Tensor]:
    """Ray origins and hit points of every pixel.

    ``matrix``: ``[N, 4, 3]`` cameras (rows origin, x, y, z), ``fov``: ``[N]`` square field of view in radians,
    ``depth``: ``[N, H, W]`` planar depth (+inf background) → ``origin`` ``[N, 3]`` and ``position`` ``[N, H, W, 3]``.
    Depth is clamped to ``max_depth`` (NaN/inf → ``max_depth``) before the planar → ray-distance conversion.
    """
    N, H, W = depth.shape
    directions = depth.new_empty(N, H, W, 3)
    # Cameras shares one fov per batch: group views by fov (one group in practice).
    for f in torch.unique(fov).tolist():
        sel = fov == f  # [N]
        cams = Cameras.from_matrix(matrix[sel].to(depth.dtype), W, H, f)
        directions[sel] = cams.pixel_directions()  # [n, H, W, 3] unit
    origin = matrix[:, 0].to(depth.dtype)  # [N, 3]
    camera_z = matrix[:, 3].to(depth.dtype)  # [N, 3]
    depth = torch.nan_to_num(depth, nan=max_depth, posinf=max_depth).clamp(max=max_depth)  # [N, H, W]
    cos = (directions * camera_z[:, None, None, :]).sum(-1)  # [N, H, W]
    distance = depth / cos  # [N, H, W] along the unit ray
    position = origin[:, None, None, :] + directions * distance[..., None]  # [N, H, W, 3]
    return origin, position


class MultiviewPointCloudEmbedding(nn.Conv2d):
    """``mv_pcl_embed``: a 3×3 conv over the 279 per-pixel features, with a learned ``unk_token`` for empty pixels.

    Keys ``weight`` ``[out, 279, 3, 3]``, ``bias`` ``[out]``, ``unk_token`` ``[279]`` (init 0.01·N(0, 1)); the conv
    uses PyTorch's default initialisation.
    """

    def __init__(self, out_channels: int = 512, *, n_octaves: int = POSITION_OCTAVES) -> None:
        d_in = 3 * nerf_encoding_width(3, n_octaves)  # 279
        super().__init__(d_in, out_channels, kernel_size=3, padding=1)
        self.n_octaves = n_octaves
        self.unk_token = nn.Parameter(0.01 * torch.randn(d_in))

    def forward(self, rgb: Tensor, origin: Tensor, position: Tensor, valid: Tensor) -> Tensor:  # type: ignore[override]
        """``rgb`` ``[N, H, W, 3]`` in [−1, 1], ``origin`` ``[N, 3]``, ``position`` ``[N, H, W, 3]``, ``valid``
        ``[N, H, W]`` bool → ``[N, out, H, W]``."""
        N, H, W, _ = rgb.shape
        o = nerf_encoding(origin, self.n_octaves)[:, None, None, :].expand(N, H, W, -1)  # [N, H, W, 93]
        h = torch.cat(
            [nerf_encoding(rgb, self.n_octaves), o, nerf_encoding(position, self.n_octaves)], dim=-1
        )  # [N, H, W, 279]
        h = torch.where(valid[..., None], h, self.unk_token.to(h.dtype))  # [N, H, W, 279] (fp32 geometry)
        return super().forward(h.permute(0, 3, 1, 2).to(self.weight.dtype))  # [N, out, H, W]
