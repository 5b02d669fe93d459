"""The Shap-E transmitter: encoder + params projection + NeRSTF MLP, with its renderers and per-stage losses.

This is where the pieces meet (DESIGN.md): the encoder turns a batch of assets into latents ``[B, 1024, 1024]``,
the params projection turns latents into per-asset MLP weights, the MLP answers point queries, and the
parameter-free renderers in :mod:`shapee.render` turn queries into pixels. Losses are named dicts; the training
loop weights and sums them.

Stage ``nerf`` (paper §3.1 / reference §8.2): L1 on the rendered RGB of the coarse and fine passes plus L1 on the
transmittance of both passes against 1 − alpha, over ``rays_per_asset`` random pixels of each asset's target views.

Stage ``finetune``: the NeRF losses plus L_STF = (1/(N·s²)) Σ ‖Render(Mesh_i) − Image_i‖² over RGBA target views, the
mesh coming from differentiable Marching Cubes 33 on the SDF head and rendered by PyTorch3D with the dataset's lighting.

Stage ``distill``: the NeRF losses plus E_x[|SDF_θ(x) − SDF_teacher(x)| + |RGB_θ(x) − RGB_NN(x)|] with the teacher
``mesh`` (the record's exact SDF samples) or ``pointe`` (a trained Point-E SDF regressor, see
:mod:`shapee.models.distill_losses` for the decisions behind the targets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from shapee.cameras import Cameras
from shapee.encoder.encoder import ChannelsEncoder
from shapee.implicit.mlp import NeRSTFMLP
from shapee.implicit.params_proj import ChannelsParamsProj
from shapee.models import meshing
from shapee.models.distill_losses import distill_loss, nearest_cloud_colour, teacher_sdf
from shapee.models.stf_losses import rgba, stf_finetune_loss
from shapee.render import nerf as nerf_renderer
from shapee.render.grid import DEFAULT_GRID_SIZE
from shapee.render.mesh import TensorMesh

STAGES = ("nerf", "distill", "finetune")
TEACHERS = ("mesh", "pointe")


@dataclass(frozen=True)
class LossSettings:
    """How the stage losses sample and render: training settings, not architecture.

    They come from the stage config (``configs/stage/*.yaml``; the encoder trainer hands them over as
    ``model.loss_settings``), so a snapshot's model config holds only what rebuilds the network. The defaults are the
    released recipe.

    Args:
        teacher: SDF teacher of stage ``distill``: ``mesh`` (the records' exact SDF samples) or ``pointe`` (a frozen
            Point-E SDF regressor, given with :meth:`Transmitter.use_pointe_teacher`).
        distill_points: teacher SDF samples per asset per ``distill`` step.
        stf_views: target views rendered per asset per ``finetune`` step (random subset; None: all training views).
        stf_resolution: render ``finetune`` views at this size (targets area-resized to it, which shifts edge pixels
            by up to half a render pixel against the corner-aligned rays); None: the records' size.
        stf_sigma: soft-rasteriser σ of the ``finetune`` mesh renders (squared NDC units; the edge band is about
            √(9.2σ) NDC wide); None: the official renderer's 1e-5 (``shapee.render.stf.SIGMA``), a 0.15 px band at
            32². A wider band gives the silhouettes a gradient at small training renders (the tiny CPU recipe uses
            1e-3: README "Results"). Evaluation and export renders always use the official σ.
    """

    teacher: str = "mesh"
    distill_points: int = 4096
    stf_views: int | None = None
    stf_resolution: int | None = None
    stf_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"unknown SDF teacher {self.teacher!r}: expected one of {TEACHERS}")
        if self.stf_sigma is not None and not self.stf_sigma > 0:
            raise ValueError(f"stf_sigma must be > 0 (or None for the official 1e-5), got {self.stf_sigma!r}")


class TransmitterModules(nn.Module):
    """The learned pieces of the released transmitter: ``encoder``, ``params_proj``, ``nerstf`` (+ black background).

    ``latent = encoder(batch)``; ``params = params_proj(latent)``; ``nerstf(params, points)``. The renderers that turn
    queries into pixels are parameter-free and live in :mod:`shapee.render`.
    """

    def __init__(self, encoder: ChannelsEncoder, params_proj: ChannelsParamsProj, nerstf: NeRSTFMLP) -> None:
        super().__init__()
        if params_proj.latent_ctx != encoder.latent_ctx or params_proj.d_latent != encoder.d_latent:
            raise ValueError(
                f"params_proj consumes [{params_proj.latent_ctx}, {params_proj.d_latent}] latents but the encoder makes "
                f"[{encoder.latent_ctx}, {encoder.d_latent}]"
            )
        if dict(params_proj.param_shapes) != nerstf.meta_parameter_shapes():
            raise ValueError(
                f"params_proj produces {params_proj.param_shapes} but the MLP needs {nerstf.meta_parameter_shapes()}"
            )
        self.encoder = encoder
        self.params_proj = params_proj
        self.nerstf = nerstf
        # The official VoidNeRFModel's background colour: kept only so that checkpoints round-trip exactly.
        self.register_buffer("void_background", torch.zeros(3))


def build_transmitter_modules(
    *,
    encoder_kwargs: Mapping | None = None,
    mlp_kwargs: Mapping | None = None,
    params_proj_kwargs: Mapping | None = None,
) -> TransmitterModules:
    """Transmitter modules at the released sizes, with optional keyword overrides per piece.

    ``latent_ctx`` of the encoder defaults to the MLP's total number of meta rows, and ``d_latent`` of the params
    projection to the encoder's. Build under ``with torch.device("meta"):`` to get shapes without memory.
    """
    mlp = NeRSTFMLP(**dict(mlp_kwargs or {}))
    shapes = mlp.meta_parameter_shapes()
    enc_kwargs = dict(encoder_kwargs or {})
    enc_kwargs.setdefault("latent_ctx", sum(rows for rows, _ in shapes.values()))
    encoder = ChannelsEncoder(**enc_kwargs)
    proj_kwargs = dict(params_proj_kwargs or {})
    proj_kwargs.setdefault("d_latent", encoder.d_latent)
    params_proj = ChannelsParamsProj(param_shapes=shapes, **proj_kwargs)
    return TransmitterModules(encoder, params_proj, mlp)



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
        stf_grid_size: SDF grid of the mesh extraction in stage ``finetune`` and the default grid of
            :meth:`to_mesh` / :meth:`extract_meshes` / :meth:`render_stf` (128³ as released).

    How the stage losses sample and render (views, teacher, σ) is not architecture and not a constructor argument:
    :attr:`loss_settings` (a :class:`LossSettings`, the released recipe by default) that the trainer sets from the stage
    config.
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
        stf_grid_size: int = DEFAULT_GRID_SIZE,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown encoder stage {stage!r}; expected one of {STAGES}")
        modules = build_transmitter_modules(encoder_kwargs=encoder, mlp_kwargs=mlp, params_proj_kwargs=params_proj)
        super().__init__(modules.encoder, modules.params_proj, modules.nerstf)
        self.n_coarse, self.n_fine = n_coarse, n_fine
        self.rays_per_asset, self.holdout_views, self.render_chunk = rays_per_asset, holdout_views, render_chunk
        self.stage = stage  # what loss_dict(batch) trains when the loop calls it without a stage
        self.stf_grid_size = stf_grid_size
        self.loss_settings = LossSettings()  # the trainer's, from the stage config; never in the model config
        self._teacher_model: list = []  # a plain list keeps the frozen teacher out of state_dict / DDP / the optimiser

    # ------------------------------------------------------------------------------------------ public API
    def compile_targets(self) -> list[torch.nn.Module]:
        """What ``trainer.compile`` compiles: the encoder (fixed shapes; the renderers' shapes vary per batch)."""
        return [self.encoder]

    def encode(self, batch: Mapping[str, Tensor], *, generator: torch.Generator | None = None) -> Tensor:
        """Batch of records (see :class:`shapee.data.AssetDataset`) → latent ``[B, 1024, 1024]`` in (−1, 1)."""
        if getattr(self, "decoder_only", False):
            raise RuntimeError(
                "this transmitter was loaded from a decoder-only file (a diffusers shap_e_renderer): it has no encoder; "
                "load the released transmitter.pt or a shapee snapshot to encode"
            )
        return self.encoder(batch, generator=generator)

    def decode_params(self, latent: Tensor) -> dict[str, Tensor]:
        """Latent ``[B, 1024, 1024]`` → per-asset MLP weights ``{"mlp.{i}.weight": [B, out, in]}``."""
        return self.params_proj(latent)

    def query(self, params: Mapping[str, Tensor], points: Tensor, directions: Tensor | None = None) -> dict[str, Tensor]:
        """Field values at ``points`` ``[B, P, 3]``: ``sdf``, ``density_coarse``, ``density_fine`` ``[B, P]``,
        ``stf_rgb``, ``nerf_rgb_coarse``, ``nerf_rgb_fine`` ``[B, P, 3]`` (colours in [0, 1])."""
        return self.nerstf(params, points, directions)

    def field(self, params: Mapping[str, Tensor]) -> nerf_renderer.QueryFn:
        """The NeRF view of the MLP for the volume renderer: ``(points [B, R, S, 3], level) -> (σ, rgb)``; for
        ``level == "both"`` the coarse and fine heads of one evaluation (the renderer's ``shared_levels``: the MLP
        gives all 12 channels per point anyway, so the coarse samples need not be queried twice, §3)."""

        def query_fn(points: Tensor, level: str):
            B, R, S, _ = points.shape
            out = self.nerstf(params, points.reshape(B, R * S, 3))

            def heads(lv: str) -> tuple[Tensor, Tensor]:
                return out[f"density_{lv}"].reshape(B, R, S), out[f"nerf_rgb_{lv}"].reshape(B, R, S, 3)

            return {lv: heads(lv) for lv in ("coarse", "fine")} if level == nerf_renderer.BOTH_LEVELS else heads(level)

        return query_fn

    @torch.no_grad()
    def render_nerf(
        self,
        latent: Tensor,
        cameras: Cameras | Sequence[Cameras],
        *,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """NeRF images of ``B`` latents: ``rgb`` ``[B, N, H, W, 3]``, ``transmittance``/``depth`` ``[B, N, H, W]``
        (and the coarse pass). ``cameras``: one set shared by all latents, or one per latent.

        Inference only (no autograd graph: nothing here trains; the NeRF losses render random rays through
        :meth:`nerf_losses`). :meth:`render_stf` stays differentiable because stage ``finetune`` trains through it."""
        params = self.decode_params(latent)
        return nerf_renderer.render_views(
            self.field(params),
            cameras,
            n_assets=latent.shape[0] if isinstance(cameras, Cameras) else None,
            n_coarse=self.n_coarse,
            n_fine=self.n_fine,
            shared_levels=True,
            deterministic=deterministic,
            generator=generator,
            chunk_size=self.render_chunk,
        )

    def render_stf(
        self, latent: Tensor, cameras: Cameras | Sequence[Cameras], *, grid_size: int | None = None, **render_kwargs
    ) -> dict[str, Tensor]:
        """Mesh renders of ``B`` latents (SDF grid → Marching Cubes 33 → STF colours → PyTorch3D, dataset lighting):
        ``rgb`` ``[B, N, H, W, 3]`` sRGB on black, ``alpha`` ``[B, N, H, W]``, ``mesh_mask`` ``[B]`` (False: empty),
        and the meshes. Differentiable from the image to the latent. ``grid_size`` (None: ``stf_grid_size``);
        ``render_kwargs`` go to :func:`shapee.render.stf.render_stf` and the rasteriser
        (:func:`shapee.render.stf.render_meshes`: ``sigma``, ``faces_per_pixel``, ...)."""
        return meshing.render_latents(self, latent, cameras, grid_size=grid_size or self.stf_grid_size,
                                      **render_kwargs)

    @torch.no_grad()
    def extract_meshes(self, latent: Tensor, *, head: str = "stf", grid_size: int | None = None,
                       narrow_band: bool | None = None,
                       density_level: float = meshing.NERF_DENSITY_LEVEL) -> list[TensorMesh]:
        """The mesh path as tensors: latents ``[B, n_ctx, d]`` (or flat ``[B, n_ctx·d]``; one latent ``[n_ctx, d]``
        gives a list of one) → a :class:`~shapee.render.mesh.TensorMesh` ``(verts, faces, sRGB colors)`` per latent.
        ``head``: ``stf`` (SDF 0 level + STF colours) or ``nerf`` (fine density at ``density_level`` + NeRF
        colours); ``grid_size`` (None: ``stf_grid_size``); ``narrow_band`` (None: on for ``stf``), see
        :func:`shapee.models.meshing.extract_meshes`."""
        return meshing.extract_meshes(self, latent, head=head, grid_size=grid_size or self.stf_grid_size,
                                      narrow_band=narrow_band, density_level=density_level)

    def to_mesh(self, latent: Tensor, grid_size: int | None = None, *, head: str = "stf",
                narrow_band: bool | None = None, texture: int = 0, faces: int | None = None,
                texture_head: str | None = None):
        """Latent(s) → ``trimesh.Trimesh`` with sRGB vertex colours (or a baked texture). Export with
        :func:`shapee.io.mesh.export_mesh` (.glb/.ply/.obj).

        The input's rank decides, never its batch size: one latent ``[n_ctx, d]`` gives one mesh; a batch
        ``[B, n_ctx, d]`` (or flat ``[B, n_ctx·d]``) gives a list of ``B`` meshes, also for ``B = 1``.

        ``grid_size``: Marching Cubes grid (None: the model's ``stf_grid_size``). ``head``, ``narrow_band``: see
        :meth:`extract_meshes`. ``faces``: decimate to about that many faces; ``texture > 0``: UV atlas + a
        ``texture²`` texture baked from the ``texture_head`` colour head (``stf`` / ``nerf``; None: ``head``), see
        :func:`shapee.models.meshing.bake_texture`."""
        latents, batched = meshing.as_latent_batch(self, latent)
        meshes = [m.to_trimesh() for m in self.extract_meshes(latents, head=head, grid_size=grid_size,
                                                               narrow_band=narrow_band)]
        if texture or faces is not None:
            meshes = [meshing.bake_texture(self, latents[i], mesh, size=texture, faces=faces,
                                           head=texture_head or head)
                      for i, mesh in enumerate(meshes)]
        return meshes if batched else meshes[0]

    # -------------------------------------------------------------------------------------------- losses
    def loss_dict(self, batch: Mapping[str, Tensor], stage: str | None = None) -> dict[str, Tensor]:
        """Named losses of one training stage (default ``self.stage``), weighted and summed by the training loop."""
        stage = self.stage if stage is None else stage
        if stage not in STAGES:
            raise ValueError(f"unknown encoder stage {stage!r}; expected one of {STAGES}")
        latent = self.encode(batch)
        params = self.decode_params(latent)
        losses = self.nerf_losses(batch, params)
        if stage == "distill":
            losses.update(self.distill_losses(batch, params))
        elif stage == "finetune":
            losses.update(self.stf_losses(batch, latent))
        return losses

    def stf_losses(self, batch: Mapping[str, Tensor], latent: Tensor) -> dict[str, Tensor]:
        """``stf_rgba``: L2 between mesh renders and RGBA target views (training views only, optional subset/resize)."""
        settings = self.loss_settings
        rgb, alpha = batch["target_rgb"], batch["target_alpha"]  # [B, T, H, W, 3], [B, T, H, W]
        B, T, H, W = alpha.shape
        usable = T - self.holdout_views
        views = torch.arange(usable, device=alpha.device)
        if settings.stf_views is not None and settings.stf_views < usable:
            views = torch.randperm(usable, device=alpha.device)[: settings.stf_views].sort().values
        cameras = [c[views.cpu()] for c in batch_cameras(batch, "target")]  # per asset, the chosen views
        rgb, alpha = rgb[:, views], alpha[:, views]  # [B, n, H, W, ...]
        if settings.stf_resolution is not None and settings.stf_resolution != H:
            size = settings.stf_resolution
            cameras = [c.resized(size) for c in cameras]
            rgb = _area_resize(rgb.flatten(0, 1).permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).unflatten(0, (B, -1))
            alpha = _area_resize(alpha.flatten(0, 1)[:, None], size)[:, 0].unflatten(0, (B, -1))
        sigma = {} if settings.stf_sigma is None else {"sigma": settings.stf_sigma}
        out = self.render_stf(latent, [c.to(latent.device) for c in cameras], **sigma)
        return stf_finetune_loss(rgba(out["rgb"], out["alpha"]), rgb, alpha)

    def nerf_losses(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """L1 RGB and L1 transmittance (vs 1 − alpha) of both passes on random target rays, + a PSNR metric."""
        origins, directions, target_rgb, target_alpha = self.sample_target_rays(batch)
        out = nerf_renderer.render_rays(
            self.field(params), origins, directions, n_coarse=self.n_coarse, n_fine=self.n_fine, chunk_size=None,
            shared_levels=True,
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

    def distill_losses(self, batch: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``distill_sdf`` (vs the teacher's SDF, tanh'd) and ``distill_rgb`` (vs the nearest cloud colour)."""
        settings = self.loss_settings
        points, sdf = teacher_sdf(batch, settings.teacher, self.pointe_teacher(), n_points=settings.distill_points)
        nn_rgb = nearest_cloud_colour(batch["points"][..., :3], batch["points"][..., 3:6], points)  # [B, P, 3]
        return distill_loss(self.query(params, points), sdf, nn_rgb)

    def use_pointe_teacher(self, teacher: nn.Module) -> None:
        """Give the frozen Point-E SDF teacher of ``teacher=pointe`` (the encoder trainer loads the stage's
        ``teacher_checkpoint`` with ``shapee.io.load_model(..., expect="pointe_sdf")`` and passes it here)."""
        self._teacher_model[:] = [teacher.eval().requires_grad_(False).to(self.void_background.device)]

    def pointe_teacher(self):
        """The frozen Point-E SDF teacher (``teacher=pointe``); ``None`` for ``teacher=mesh``."""
        if self.loss_settings.teacher != "pointe":
            return None
        if not self._teacher_model:
            raise RuntimeError(
                "teacher=pointe: no Point-E teacher was given; load the stage's teacher_checkpoint with "
                "shapee.io.load_model(path, expect='pointe_sdf') and pass it to use_pointe_teacher()"
            )
        teacher = self._teacher_model[0]
        if next(teacher.parameters()).device != self.void_background.device:
            teacher.to(self.void_background.device)
        return teacher

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


def _area_resize(images: Tensor, size: int) -> Tensor:
    """``[N, C, H, W]`` → ``[N, C, size, size]`` by area averaging (targets for lower-resolution renders)."""
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="area")


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
