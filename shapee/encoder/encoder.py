"""The transmitter encoder: point cloud + multiview pixels → latent ``[B, 1024, 1024]`` (reference §1.3).

Our equivalent of the official ``PointCloudPerceiverChannelsEncoder`` in its released configuration
(``cross_attention_dataset: pcl_and_multiview_pcl``, ``use_pointconv``, ``fps_method: first``). Submodule names are
the official ones (``input_proj``, ``point_conv``, ``output_tokens``, ``ln_pre``, ``encoder.{0,1}``, ``processor``,
``ln_post``, ``output_proj``, ``mv_pcl_embed``, ``patch_emb``), so the released ``encoder.*`` weights load without
renaming (the params projection, ``encoder.params_proj.*`` in the official file, lives in :mod:`shapee.implicit`).

Forward, step by step (§1.3)::

    points [B, N, 6] ─ input_proj(posenc) ─ emb [B, N, W] ──────────────────────────────┐ (source 0)
         └ first data_ctx points = centroids ─ point_conv(xyz, emb) ─ data tokens [B, 1024, W]
    output_tokens [1024, W] ─ latent tokens                                               │
    h = ln_pre([data tokens, latent tokens])                          [B, 2048, W]        │
    h = encoder.0(h, emb)                 cross-attention over the points  ◄──────────────┘
    h = encoder.1(h, view tokens)         cross-attention over V·(H/8)·(W/8) pixel-patch tokens
    h = processor(h)                      11 self-attention blocks
    latent = bottleneck(output_proj(ln_post(h[:, -latent_ctx:])))     [B, 1024, d_latent]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from shapee.encoder.bottleneck import ClampDiffusionNoise
from shapee.encoder.multiview import MultiviewPointCloudEmbedding, compose_patch_conv, patch_tokens, pixel_points, split_patch_conv
from shapee.encoder.pointconv import PointSetEmbedding
from shapee.nn.attention import SimplePerceiver, Transformer
from shapee.nn.encoding import POSITION_OCTAVES, PosEmbLinear

BATCH_KEYS = ("points", "views", "view_alpha", "view_depth", "view_cameras", "view_fov")


class ChannelsEncoder(nn.Module):
    """Point cloud + multiview encoder with a perceiver over ``data_ctx + latent_ctx`` tokens.

    ``encoder(batch) -> latent [B, latent_ctx, d_latent]`` where ``batch`` holds (dataset contract):
    ``points`` ``[B, N, 6]`` (xyz world frame, rgb in [0, 1], FPS-ordered), ``views`` ``[B, V, H, W, 3]`` sRGB in
    [0, 1] on black, ``view_alpha`` ``[B, V, H, W]``, ``view_depth`` ``[B, V, H, W]`` planar (+inf background),
    ``view_cameras`` ``[B, V, 4, 3]`` (rows origin, x, y, z), ``view_fov`` ``[B]`` or scalar (radians; float64 keeps
    the official rays' tan(fov/2) exact, float32 is rounded first).

    Defaults are the released sizes (``mv_hidden`` defaults to ``width // 2``, 512). Randomness: the point-conv
    neighbour shuffle (train and eval, §8.3), the choice of ``n_points`` points / ``n_views`` views when more are
    given (the official inner batch), and the bottleneck noise (train only); pass ``generator`` for reproducible
    draws. Fewer views/points than ``n_views``/``n_points`` are accepted (the official code asserts at least
    ``n_views`` views). ``checkpoint=True`` enables activation checkpointing of every
    transformer block, point-conv chunk and view chunk while gradients are enabled.
    """

    def __init__(
        self,
        *,
        width: int = 1024,
        heads: int = 8,
        layers: int = 12,
        xattn_layers: int = 1,
        init_scale: float = 0.25,
        data_ctx: int = 1024,
        latent_ctx: int = 1024,
        d_latent: int = 1024,
        input_channels: int = 6,
        n_points: int = 16384,
        n_views: int = 20,
        pointconv_radius: float = 0.5,
        pointconv_samples: int = 64,
        pointconv_hidden: tuple[int, ...] | list[int] = (1024, 1024),
        pointconv_patch_size: int = 8,
        pointconv_stride: int = 4,
        pointconv_padding: int | None = None,
        pointconv_shuffle: bool = True,
        pointconv_chunk: int = 256,
        image_size: int = 256,
        patch_size: int = 8,
        mv_hidden: int | None = None,
        max_depth: float = 9.0,
        alpha_threshold: float = 0.999,
        view_chunk: int = 4,
        position_octaves: int = POSITION_OCTAVES,
        bottleneck_prob: float = 0.1,
        bottleneck_timesteps: int = 1024,
        bottleneck_power: float = 5.0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= xattn_layers <= layers:
            raise ValueError(f"need 1 <= xattn_layers <= layers, got xattn_layers={xattn_layers}, layers={layers}")
        if pointconv_hidden[-1] != width:
            raise ValueError(f"pointconv_hidden[-1] ({pointconv_hidden[-1]}) must equal width ({width}): it makes the data tokens")
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if input_channels < 3:
            raise ValueError(f"input_channels must be >= 3 (xyz first), got {input_channels}")
        self.width, self.data_ctx, self.latent_ctx, self.d_latent = width, data_ctx, latent_ctx, d_latent
        self.input_channels, self.n_points, self.n_views = input_channels, n_points, n_views
        self.image_size, self.patch_size = image_size, patch_size
        self.max_depth, self.alpha_threshold = max_depth, alpha_threshold
        self.view_chunk, self.checkpoint = view_chunk, checkpoint
        mv_hidden = width // 2 if mv_hidden is None else mv_hidden  # the official "view_pose_width" (512)

        self.input_proj = PosEmbLinear(input_channels, width, n_octaves=position_octaves)
        self.point_conv = PointSetEmbedding(
            d_input=width,
            hidden=tuple(pointconv_hidden),
            radius=pointconv_radius,
            n_samples=pointconv_samples,
            patch_size=pointconv_patch_size,
            stride=pointconv_stride,
            padding=pointconv_padding,
            shuffle=pointconv_shuffle,
            chunk_size=pointconv_chunk,
            checkpoint=checkpoint,
        )
        self.output_tokens = nn.Parameter(torch.randn(latent_ctx, width))
        self.ln_pre = nn.LayerNorm(width)
        # One cross-attention stack per data source: 0 = point cloud, 1 = multiview pixels.
        self.encoder = nn.ModuleList(
            SimplePerceiver(width=width, layers=xattn_layers, heads=heads, init_scale=init_scale, checkpoint=checkpoint)
            for _ in range(2)
        )
        self.processor = Transformer(
            width=width, layers=layers - xattn_layers, heads=heads, init_scale=init_scale, checkpoint=checkpoint
        )
        self.ln_post = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, d_latent)
        self.mv_pcl_embed = MultiviewPointCloudEmbedding(mv_hidden, n_octaves=position_octaves)
        self.patch_emb = nn.Conv2d(mv_hidden, width, kernel_size=patch_size, stride=patch_size)
        self.bottleneck = ClampDiffusionNoise(
            diffusion_prob=bottleneck_prob, timesteps=bottleneck_timesteps, power=bottleneck_power
        )

    # ------------------------------------------------------------------------------------------------ inputs
    def _check_batch(self, batch: dict) -> None:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"encoder batch is missing {missing} (needs {list(BATCH_KEYS)})")
        points, views = batch["points"], batch["views"]
        if points.ndim != 3 or points.shape[-1] != self.input_channels:
            raise ValueError(f"batch['points'] must have shape [B, N, {self.input_channels}], got {tuple(points.shape)}")
        if points.shape[1] < self.data_ctx:
            raise ValueError(f"batch['points'] has {points.shape[1]} points, fewer than data_ctx={self.data_ctx}")
        B = points.shape[0]
        s = self.image_size
        if views.ndim != 5 or views.shape[0] != B or views.shape[2:] != (s, s, 3):
            raise ValueError(f"batch['views'] must have shape [{B}, V, {s}, {s}, 3], got {tuple(views.shape)}")
        V = views.shape[1]
        for key, shape in (("view_alpha", (B, V, s, s)), ("view_depth", (B, V, s, s)), ("view_cameras", (B, V, 4, 3))):
            if tuple(batch[key].shape) != shape:
                raise ValueError(f"batch['{key}'] must have shape {list(shape)}, got {tuple(batch[key].shape)}")
        fov = torch.as_tensor(batch["view_fov"])
        if fov.numel() not in (1, B):
            raise ValueError(f"batch['view_fov'] must be a scalar or have shape [{B}], got {tuple(fov.shape)}")

    @staticmethod
    def _subset(n_have: int, n_want: int, batch: int, device, generator) -> Tensor | None:
        """Random ``[B, n_want]`` indices when more items are given than used (the official inner batch), else None."""
        if n_have <= n_want:
            return None
        return torch.rand(batch, n_have, device=device, generator=generator).argsort(dim=-1)[:, :n_want]

    # ------------------------------------------------------------------------------------------------ pieces
    def _view_tokens(self, rgb: Tensor, alpha: Tensor, depth: Tensor, matrix: Tensor, fov: Tensor) -> Tensor:
        """One chunk of views: ``rgb`` ``[n, H, W, 3]`` in [0, 1], ``alpha``/``depth`` ``[n, H, W]``,
        ``matrix`` ``[n, 4, 3]``, ``fov`` ``[n]`` → tokens ``[n, (H/p)·(W/p), width]``."""
        origin, position = pixel_points(matrix, fov, depth, max_depth=self.max_depth)  # [n, 3], [n, H, W, 3]
        valid = alpha >= self.alpha_threshold  # [n, H, W]
        conv = self._composed_view_conv()
        h = patch_tokens(self.mv_pcl_embed, conv, rgb * 2.0 - 1.0, origin, position, valid, stride=self.patch_size)
        # h: [n, width, H/p, W/p] = patch_emb(mv_pcl_embed(...)) up to float rounding (one composed conv, §1.3 step 6)
        return h.flatten(2).transpose(1, 2)  # [n, P, width]

    def _composed_view_conv(self) -> dict[str, Tensor]:
        """``patch_emb ∘ mv_pcl_embed`` as one conv (:func:`compose_patch_conv`, :func:`split_patch_conv`). Without
        autograd the result is cached until a weight changes (in-place updates bump ``_version``; ``.to()`` gives new
        storage)."""
        convs = (self.mv_pcl_embed, self.patch_emb)
        if torch.is_grad_enabled():
            return split_patch_conv(self.mv_pcl_embed, *compose_patch_conv(*convs))
        params = [t for c in convs for t in (c.weight, c.bias)]
        key = [(t.data_ptr(), t._version, t.dtype, t.device) for t in params]
        cached = getattr(self, "_view_conv_cache", None)  # (params, key, conv); a plain attribute
        if cached is None or cached[1] != key or any(a is not b for a, b in zip(cached[0], params)):
            cached = (params, key, split_patch_conv(self.mv_pcl_embed, *compose_patch_conv(*convs)))
            self._view_conv_cache = cached
        return cached[2]

    def embed_views(self, batch: dict, *, generator: torch.Generator | None = None) -> Tensor:
        """Multiview pixel-patch tokens ``[B, V·P, width]`` (source 1), processed ``view_chunk`` views at a time."""
        views = batch["views"]  # [B, V, H, W, 3]
        B, V = views.shape[:2]
        # fov in float64: the rays take tan(fov/2) in double precision, as the official encoder does (cameras.py)
        fov = torch.as_tensor(batch["view_fov"], device=views.device, dtype=torch.float64).reshape(-1)
        fov = fov.expand(B)[:, None].expand(B, V)  # [B, V]
        tensors = [views, batch["view_alpha"], batch["view_depth"], batch["view_cameras"], fov]
        pick = self._subset(V, self.n_views, B, views.device, generator)
        if pick is not None:
            tensors = [t[torch.arange(B, device=views.device)[:, None], pick] for t in tensors]
            V = self.n_views
        rgb, alpha, depth, matrix, fov = [t.flatten(0, 1) for t in tensors]  # [B·V, ...]
        rgb, depth = rgb.float(), depth.float()  # pixel geometry and encodings in fp32
        tokens = []
        for start in range(0, B * V, self.view_chunk):
            chunk = [t[start : start + self.view_chunk] for t in (rgb, alpha, depth, matrix, fov)]
            if self.checkpoint and torch.is_grad_enabled():
                tokens.append(activation_checkpoint(self._view_tokens, *chunk, use_reentrant=False))
            else:
                tokens.append(self._view_tokens(*chunk))
        tokens = torch.cat(tokens, dim=0)  # [B·V, P, width]
        return tokens.reshape(B, -1, self.width)  # [B, V·P, width]

    def encode_tokens(self, batch: dict, *, generator: torch.Generator | None = None) -> Tensor:
        """Everything before the bottleneck: ``[B, latent_ctx, d_latent]``."""
        self._check_batch(batch)
        points = batch["points"].float()  # [B, N, 6]: geometry and encodings in fp32 whatever the weights' dtype
        B = points.shape[0]
        xyz = points[..., :3]  # [B, N, 3]
        emb = self.input_proj(points)  # [B, N, W]

        # Query tokens: point conv around the first data_ctx points (the cloud is FPS-ordered: "first" = FPS subset).
        data_tokens = self.point_conv(xyz, emb, xyz[:, : self.data_ctx], generator=generator)  # [B, data_ctx, W]
        latent_tokens = self.output_tokens[None].expand(B, -1, -1)  # [B, latent_ctx, W]
        h = self.ln_pre(torch.cat([data_tokens, latent_tokens], dim=1))  # [B, data_ctx + latent_ctx, W]

        pick = self._subset(points.shape[1], self.n_points, B, points.device, generator)
        if pick is not None:
            emb = emb[torch.arange(B, device=points.device)[:, None], pick]  # [B, n_points, W]
        h = self.encoder[0](h, emb)  # [B, ctx, W]
        h = self.encoder[1](h, self.embed_views(batch, generator=generator))  # [B, ctx, W]
        h = self.processor(h)  # [B, ctx, W]
        h = self.ln_post(h[:, -self.latent_ctx :])  # [B, latent_ctx, W]
        return self.output_proj(h)  # [B, latent_ctx, d_latent]

    def forward(self, batch: dict, *, generator: torch.Generator | None = None) -> Tensor:
        """``batch`` → latent ``[B, latent_ctx, d_latent]`` in (−1, 1) (noised in training, §1.5)."""
        return self.bottleneck(self.encode_tokens(batch, generator=generator), generator=generator)
