"""Multiview "point cloud" pixels → per-view tokens (reference §1.3 step 6, ``encode_multiview_pcl``).

Every pixel of every encoder view becomes a 3-D sample: its camera ray (corner-aligned pinhole model of
:mod:`shapee.cameras`), the planar depth turned into a distance along the ray and a hit point. Per pixel features
are the NeRF encodings of [rgb in [−1, 1], ray origin, hit position] (3 × 93 = 279); pixels with alpha below 0.999
are replaced by a learned ``unk_token``. A 3×3 conv (279 → 512, ``mv_pcl_embed``) and an 8×8 stride-8 patch conv
(512 → width, ``patch_emb``) give (H/8)·(W/8) tokens per view (1024 at 256²). No camera or patch-position
embedding: pose reaches the tokens only through the origin/position encodings.

Fast path (exact up to float rounding, tests/test_encoder.py): nothing lies between the two convs, so the encoder runs
them as one 10×10 stride-8 conv (:func:`compose_patch_conv`: 4× fewer multiply-adds, no ``[N, 512, H, W]``
intermediate) and folds the per-view constant ray-origin channels into a 2-channel mask conv (:func:`patch_tokens`),
so only the 186 rgb/position channels go through the big conv. The module's own ``forward`` keeps the two-step form.
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

    def features(self, rgb: Tensor, origin: Tensor, position: Tensor, valid: Tensor) -> Tensor:
        """The conv's input: ``rgb`` ``[N, H, W, 3]`` in [−1, 1], ``origin`` ``[N, 3]``, ``position`` ``[N, H, W, 3]``,
        ``valid`` ``[N, H, W]`` bool → ``[N, 279, H, W]`` (channels-last memory) in the weight's dtype."""
        N, H, W, _ = rgb.shape
        o = nerf_encoding(origin, self.n_octaves)[:, None, None, :].expand(N, H, W, -1)  # [N, H, W, 93]
        h = torch.cat(
            [nerf_encoding(rgb, self.n_octaves), o, nerf_encoding(position, self.n_octaves)], dim=-1
        )  # [N, H, W, 279]
        h = torch.where(valid[..., None], h, self.unk_token.to(h.dtype))  # [N, H, W, 279] (fp32 geometry)
        return h.permute(0, 3, 1, 2).to(self.weight.dtype)  # [N, 279, H, W]

    def forward(self, rgb: Tensor, origin: Tensor, position: Tensor, valid: Tensor) -> Tensor:  # type: ignore[override]
        """``rgb`` ``[N, H, W, 3]`` in [−1, 1], ``origin`` ``[N, 3]``, ``position`` ``[N, H, W, 3]``, ``valid``
        ``[N, H, W]`` bool → ``[N, out, H, W]``."""
        return super().forward(self.features(rgb, origin, position, valid))  # [N, out, H, W]


def compose_patch_conv(embed: nn.Conv2d, patch: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """The single conv equal to ``patch(embed(x))`` (two linear convs, nothing in between; reference §1.3 step 6).

    ``embed``: ``k×k`` stride-1 "same" conv ``C → M`` (3×3, pad 1), ``patch``: ``p×p`` stride-``p`` conv ``M → O``
    (8×8) → ``weight`` ``[O, C, p + k − 1, p + k − 1]`` (``[1024, 279, 10, 10]``) and ``bias`` ``[O]``, to be used with
    stride ``p`` and ``embed``'s padding. Why it is exact: token = Σ_{patch pixel q} P_q · (b_K + Σ_t K_t x(q + t))
    with zero padding outside the image in both forms, so the weight is the full (transposed-conv) correlation of P
    with K, and every patch pixel contributes ``P_q b_K`` to the bias. Why it pays: per token 279·10²·1024 MACs
    instead of 64·279·9·512 + 512·64·1024 (4× fewer), and no ``[N, 512, H, W]`` intermediate.
    Computed in (at least) fp32 whatever the weights' dtype (the caller casts).
    """
    k, p = embed.kernel_size[0], patch.kernel_size[0]
    if (
        embed.kernel_size != (k, k) or embed.stride != (1, 1) or embed.padding != ((k - 1) // 2,) * 2 or k % 2 == 0
        or patch.kernel_size != (p, p) or patch.stride != (p, p) or patch.padding != (0, 0)
        or embed.groups != 1 or patch.groups != 1 or embed.dilation != (1, 1) or patch.dilation != (1, 1)
    ):
        raise ValueError("compose_patch_conv needs an odd k×k 'same' stride-1 conv followed by a p×p stride-p conv")
    acc = torch.promote_types(embed.weight.dtype, torch.float32)  # at least fp32
    with torch.autocast(embed.weight.device.type, enabled=False):  # compose in fp32 even under autocast
        K, P = embed.weight.to(acc), patch.weight.to(acc)  # [M, C, k, k], [O, M, p, p]
        # P as a batch of O images with M channels, K as a transposed-conv kernel M → C: the full correlation.
        weight = torch.nn.functional.conv_transpose2d(P, K)  # [O, C, p + k − 1, p + k − 1]
        bias = patch.bias.to(acc) + torch.einsum("omyx,m->o", P, embed.bias.to(acc))  # [O]
    return weight, bias


def split_patch_conv(embed: MultiviewPointCloudEmbedding, weight: Tensor, bias: Tensor) -> dict[str, Tensor]:
    """The composed conv of :func:`compose_patch_conv` in the form :func:`patch_tokens` uses: ``rgb_position``
    ``[O, 186, K, K]`` (channels-last memory, as the pixel features) and ``bias`` ``[O]`` in the weights' dtype,
    ``origin`` ``[93, O, K, K]`` in (at least) fp32."""
    E = weight.shape[1] // 3  # 93: channels per encoded input (rgb | origin | position)
    dtype = embed.weight.dtype
    rgb_position = torch.cat([weight[:, :E], weight[:, 2 * E :]], dim=1).to(dtype)  # [O, 186, K, K]
    return {
        "rgb_position": rgb_position.contiguous(memory_format=torch.channels_last),
        "bias": bias.to(dtype),  # [O]
        "origin": weight[:, E : 2 * E].transpose(0, 1).contiguous(),  # [93, O, K, K]
    }


def patch_tokens(
    embed: MultiviewPointCloudEmbedding,
    conv: dict[str, Tensor],
    rgb: Tensor,
    origin: Tensor,
    position: Tensor,
    valid: Tensor,
    *,
    stride: int,
) -> Tensor:
    """``patch_emb(mv_pcl_embed(...))`` through the composed conv → ``[N, O, H/p, W/p]``.

    ``conv``: :func:`split_patch_conv` of :func:`compose_patch_conv`; inputs as
    :meth:`MultiviewPointCloudEmbedding.forward`. The ray-origin encoding is one vector per view, so its 93 channels
    are not convolved pixel by pixel: over a window they contribute ``Σ_valid W_o·e_o + Σ_unknown W_o·unk_o``, i.e. a
    2-channel conv of the (valid, unknown) masks with per-view weights; only rgb and position (186 channels) go
    through the big conv. Zero padding outside the image holds for the masks as for the features.
    """
    N, H, W, _ = rgb.shape
    w_o, w_rp = conv["origin"], conv["rgb_position"]  # [93, O, K, K] fp32, [O, 186, K, K]
    E, O, K, pad = w_o.shape[0], w_o.shape[1], w_o.shape[-1], embed.padding[0]
    acc = w_o.dtype  # the origin term in (at least) fp32
    unk = embed.unk_token.to(acc)  # [279]
    unk_rp = torch.cat([unk[:E], unk[2 * E :]])  # [186]
    if torch.is_grad_enabled() and (rgb.requires_grad or position.requires_grad):
        rp = torch.cat([nerf_encoding(rgb, embed.n_octaves), nerf_encoding(position, embed.n_octaves)], dim=-1)
        rp = torch.where(valid[..., None], rp, unk_rp.to(rp.dtype))  # [N, H, W, 186]
    else:  # the same values written straight into one map (no concatenation passes over ~50 MB per view)
        rp = rgb.new_empty(N, H, W, 2 * E)  # [N, H, W, 186]
        nerf_encoding(rgb, embed.n_octaves, out=rp[..., :E])
        nerf_encoding(position, embed.n_octaves, out=rp[..., E:])
        rp[~valid] = unk_rp.to(rp.dtype)  # unknown pixels (autograd reaches unk_token through the in-place write)
    out = torch.nn.functional.conv2d(rp.permute(0, 3, 1, 2).to(w_rp.dtype), w_rp, conv["bias"], stride=stride, padding=pad)

    # Origin channels: per-view weights for the "valid" mask, one shared weight for the "unknown" mask.
    e_o = nerf_encoding(origin, embed.n_octaves).to(acc)  # [N, 93], encoded in the geometry's dtype as in features()
    w_o = w_o.view(E, O * K * K)  # [93, O·K²]
    w_valid = (e_o @ w_o).view(N, O, K * K)  # [N, O, K²]
    w_unknown = (unk[E : 2 * E] @ w_o).view(1, O, K * K)  # [1, O, K²]
    w_masks = torch.cat([w_valid, w_unknown.expand(N, -1, -1)], dim=2)  # [N, O, 2·K²]
    masks = torch.stack([valid, ~valid], dim=1).to(acc)  # [N, 2, H, W]
    cols = torch.nn.functional.unfold(masks, K, padding=pad, stride=stride)  # [N, 2·K², L], channel-major like w_masks
    origin_term = torch.bmm(w_masks, cols)  # [N, O, L]
    return out + origin_term.view(out.shape).to(out.dtype)  # [N, O, H/p, W/p]
