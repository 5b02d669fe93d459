"""The Shap-E transmitter: encoder + params projection + NeRSTF MLP, with its renderers and per-stage losses.

This is where the pieces meet (DESIGN.md): the encoder turns a batch of assets into latents ``[B, 1024, 1024]``,
the params projection turns latents into per-asset MLP weights, the MLP answers point queries, and the
parameter-free renderers in :mod:`shapee.render` turn queries into pixels. Losses are named dicts; the training
loop weights and sums them.

Stage ``nerf`` (paper §3.1 / reference §8.2): L1 on the rendered RGB of the coarse and fine passes plus L1 on the
transmittance of both passes against 1 − alpha, over ``rays_per_asset`` random pixels of each asset's target views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from shapee.cameras import Cameras
from shapee.io.official import TransmitterModules, build_transmitter_modules
from shapee.render import nerf as nerf_renderer

STAGES = ("nerf", "distill", "finetune")


class Transmitter(TransmitterModules):
    """Encoder + implicit NeRSTF decoder (reference §1–3), sizes by plain kwargs, defaults = the released model.

    Args:
        encoder, mlp, params_proj: keyword overrides for :class:`~shapee.encoder.ChannelsEncoder`,
            :class:`~shapee.implicit.NeRSTFMLP` and :class:`~shapee.implicit.ChannelsParamsProj`.
        n_coarse, n_fine: NeRF samples per ray (64 + 128 as released).
        rays_per_asset: random target pixels per asset per training step (4096).
        holdout_views: the last ``holdout_views`` target views of every asset are never used for training rays
            (they are the held-out views of the evaluation PSNR).
        render_chunk: rays per asset per renderer call when rendering whole images.
        stage: the training stage ``loss_dict(batch)`` computes by default (``nerf``, ``distill``, ``finetune``).
    """

    def __init__(
        self,
        *,
        encoder: Mapping | None = None,
        mlp: Mapping | None = None,
        params_proj: Mapping | None = None,
        n_coarse: int = 64,
        n_fine: int = 128,
        rays_per_asset: int = 4096,
        holdout_views: int = 0,
        render_chunk: int = 4096,
        stage: str = "nerf",
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown encoder stage {stage!r}; expected one of {STAGES}")
        modules = build_transmitter_modules(encoder_kwargs=encoder, mlp_kwargs=mlp, params_proj_kwargs=params_proj)
        super().__init__(modules.encoder, modules.params_proj, modules.nerstf)
        self.n_coarse, self.n_fine = n_coarse, n_fine
        self.rays_per_asset, self.holdout_views, self.render_chunk = rays_per_asset, holdout_views, render_chunk
        self.stage = stage  # what loss_dict(batch) trains when the loop calls it without a stage

    # ------------------------------------------------------------------------------------------ public API
    def encode(self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None) -> Tensor:
        """Batch of records (see :class:`shapee.data.AssetDataset`) → latent ``[B, 1024, 1024]`` in (−1, 1)."""
        return self.encoder(batch, generator=generator)

    def decode_params(self, latent: Tensor) -> dict[str, Tensor]:
        """Latent ``[B, 1024, 1024]`` → per-asset MLP weights ``{"mlp.{i}.weight": [B, out, in]}``."""
        return self.params_proj(latent)

    def query(self, params: Mapping[str, Tensor], points: Tensor, directions: Tensor | None = None) -> dict[str, Tensor]:
        """Field values at ``points`` ``[B, P, 3]``: ``sdf``, ``density_coarse``, ``density_fine`` ``[B, P]``,
        ``stf_rgb``, ``nerf_rgb_coarse``, ``nerf_rgb_fine`` ``[B, P, 3]`` (colours in [0, 1])."""
        return self.nerstf(params, points, directions)

    def field(self, params: Mapping[str, Tensor]) -> nerf_renderer.QueryFn:
        """The NeRF view of the MLP for the volume renderer: ``(points [B, R, S, 3], level) -> (σ, rgb)``."""

        def query_fn(points: Tensor, level: str) -> tuple[Tensor, Tensor]:
            B, R, S, _ = points.shape
            out = self.nerstf(params, points.reshape(B, R * S, 3))
            density = out[f"density_{level}"].reshape(B, R, S)
            rgb = out[f"nerf_rgb_{level}"].reshape(B, R, S, 3)
            return density, rgb

        return query_fn

    def render_nerf(
        self,
        latent: Tensor,
        cameras: Cameras | Sequence[Cameras],
        *,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """NeRF images of ``B`` latents: ``rgb`` ``[B, N, H, W, 3]``, ``transmittance``/``depth`` ``[B, N, H, W]``
        (and the coarse pass). ``cameras``: one set shared by all latents, or one per latent."""
        params = self.decode_params(latent)
        return nerf_renderer.render_views(
            self.field(params),
            cameras,
            n_assets=latent.shape[0] if isinstance(cameras, Cameras) else None,
            n_coarse=self.n_coarse,
            n_fine=self.n_fine,
            deterministic=deterministic,
            generator=generator,
            chunk_size=self.render_chunk,
        )

    # -------------------------------------------------------------------------------------------- losses
    def loss_dict(self, batch: Mapping[str, Tensor], stage: str | None = None) -> dict[str, Tensor]:
        """Named losses of one training stage (default ``self.stage``), weighted and summed by the training loop."""
        stage = self.stage if stage is None else stage
        if stage not in STAGES:
            raise ValueError(f"unknown encoder stage {stage!r}; expected one of {STAGES}")
        if stage != "nerf":
            raise NotImplementedError(
                f"stage {stage!r} needs the STF decoder (differentiable marching cubes + mesh rendering), which is "
                "not implemented yet; only stage 'nerf' can be trained for now"
            )
        latent = self.encode(batch)
        params = self.decode_params(latent)
        origins, directions, target_rgb, target_alpha = self.sample_target_rays(batch)
        out = nerf_renderer.render_rays(
            self.field(params), origins, directions, n_coarse=self.n_coarse, n_fine=self.n_fine, chunk_size=None
        )
        target_transmittance = 1.0 - target_alpha  # [B, R]
        losses = {
            "nerf_rgb_fine": (out["rgb"] - target_rgb).abs().mean(),
            "nerf_rgb_coarse": (out["rgb_coarse"] - target_rgb).abs().mean(),
            "nerf_transmittance_fine": (out["transmittance"] - target_transmittance).abs().mean(),
            "nerf_transmittance_coarse": (out["transmittance_coarse"] - target_transmittance).abs().mean(),
        }
        with torch.no_grad():
            mse = (out["rgb"].clamp(0, 1) - target_rgb).square().mean()
            losses["metric/ray_psnr"] = -10.0 * torch.log10(mse.clamp_min(1e-10))
        return losses

    def sample_target_rays(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None):
        """``rays_per_asset`` uniformly random pixels of each asset's (non-held-out) target views.

        Returns origins, directions ``[B, R, 3]``, target sRGB ``[B, R, 3]`` and alpha ``[B, R]``.
        """
        rgb, alpha, matrices = batch["target_rgb"], batch["target_alpha"], batch["target_cameras"]
        B, T, H, W = alpha.shape
        usable = T - self.holdout_views
        if usable < 1:
            raise ValueError(f"holdout_views={self.holdout_views} leaves no target view to train on (T={T})")
        cams = _batch_cameras(matrices, batch["target_fov"], W, H)  # B·T views
        R = self.rays_per_asset
        pixel = torch.randint(usable * H * W, (B, R), device=alpha.device, generator=generator)  # [B, R]
        view, row, col = pixel // (H * W), (pixel // W) % H, pixel % W
        global_view = torch.arange(B, device=alpha.device)[:, None] * T + view  # [B, R]
        origins, directions = cams.pixel_rays(global_view.flatten(), row.flatten(), col.flatten())  # [B·R, 3]
        b = torch.arange(B, device=alpha.device)[:, None]
        return (
            origins.view(B, R, 3),
            directions.view(B, R, 3),
            rgb[b, view, row, col],  # [B, R, 3]
            alpha[b, view, row, col],  # [B, R]
        )


def _batch_cameras(matrices: Tensor, fov: Tensor, width: int, height: int) -> Cameras:
    """``[B, T, 4, 3]`` camera matrices of a batch (one field of view) → one :class:`Cameras` of B·T views."""
    fov = torch.as_tensor(fov).flatten()
    if fov.numel() > 1 and not torch.allclose(fov, fov[:1].expand_as(fov)):
        raise ValueError(f"all assets of a batch must share the field of view, got {fov.tolist()}")
    return Cameras.from_matrix(matrices.reshape(-1, 4, 3).float(), width, height, float(fov[0]))


def batch_cameras(batch: Mapping[str, Tensor], prefix: str = "target") -> list[Cameras]:
    """Per-asset :class:`Cameras` of a collated batch (``prefix`` ``"target"`` or ``"view"``)."""
    matrices = batch[f"{prefix}_cameras"]
    images = batch["target_alpha" if prefix == "target" else "view_alpha"]
    H, W = images.shape[-2:]
    fov = torch.as_tensor(batch[f"{prefix}_fov"]).flatten()
    return [
        Cameras.from_matrix(matrices[b].float(), W, H, float(fov[min(b, fov.numel() - 1)])) for b in range(matrices.shape[0])
    ]
