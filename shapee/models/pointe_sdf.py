"""Point-E's SDF regression model (reference §9): the teacher that Shap-E distils into its SDF head (§8.1–8.2).

``CrossAttentionPointCloudSDFModel`` of ``openai/point-e`` (config ``sdf``), rebuilt from our attention blocks with
the official module names, so the released ``sdf.pt`` loads without renaming (:mod:`shapee.io.official_pointe`)::

    encoder_input_proj   Linear(3 → W) on raw xyz of the cloud (no positional encoding, no ln_pre)
    encoder.resblocks.i  8 pre-LN self-attention blocks (4 heads)              → per-point latents [B, N, W]
    decoder_input_proj   Linear(3 → W) on raw xyz of each query point
    decoder.resblocks.i  4 pre-LN cross-attention blocks (4 heads): queries attend to the latents, never to each
                         other, so every query's SDF depends only on the cloud and its own position
    ln_post, output_proj LayerNorm → Linear(W → 1): the SDF, unbounded (no activation)

W = 256, n_ctx = 4096 points: 9,481,985 parameters at full size.

**Frames and units.** Point-E's clouds and meshes live in about [-0.5, 0.5]³ (its marching cubes cover a cube of
side 1.02); ours live in [-1, 1]³ (DESIGN.md). So :meth:`PointESDF.world_sdf` halves our coordinates (cloud and
queries) on the way in and doubles the SDF on the way out: a distance in Point-E units is half the same distance in
world units. :meth:`forward` / :meth:`encode` / :meth:`predict` are the raw model in Point-E's frame.

**Sign.** Point-E meshes the 0 level with skimage's marching cubes at its default ``gradient_direction="descent"``
(which assumes values *greater* inside) and then swaps two vertices of every face to turn skimage's left-handed
triangles into outward right-handed ones; that only yields outward normals if the field is positive inside. So
Point-E's SDF is **positive inside**, like ours and like the Shap-E SDF head (§2.3): no sign flip is needed
(checked: a positive-inside sphere field meshed that way has positive signed volume).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from shapee.nn.attention import SimplePerceiver, Transformer

# Our world frame ([-1, 1]³) times this is Point-E's frame (~[-0.5, 0.5]³); SDF values scale by its inverse.
POINTE_FRAME_SCALE = 0.5

LOSSES = ("l1", "l2")


def _check_xyz(name: str, x: Tensor, batch: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [B, N, 3] tensor of xyz coordinates, got {shape}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has batch size {x.shape[0]}, expected {batch} (the point clouds' batch size)")


class PointESDF(nn.Module):
    """Point-E's SDF regressor: point cloud ``[B, N, 3]`` + query points ``[B, P, 3]`` → SDF ``[B, P]``.

    Defaults are the released ``sdf`` config (width 256, 8 encoder layers, 4 decoder layers, 4 heads, 4096 cloud
    points). Coordinates of :meth:`forward` are in Point-E's frame; :meth:`world_sdf` takes and returns ours.

    Args:
        width: channels of every token.
        encoder_layers, encoder_heads: the self-attention transformer over the cloud.
        decoder_layers, decoder_heads: the cross-attention blocks of the queries.
        n_ctx: cloud points the model is trained with (the first ``n_ctx`` FPS points of a record); attention itself
            accepts any number, but :meth:`loss_dict` and the distillation teacher feed exactly ``n_ctx``.
        init_scale: std of every transformer linear is ``init_scale / sqrt(width)`` (Point-E's 0.25); the three
            projections keep PyTorch's default init, as in Point-E.
        n_query: SDF samples per asset per training step in :meth:`loss_dict` (a random subset of the record's).
        loss: ``"l1"`` or ``"l2"`` regression of the SDF in world units in :meth:`loss_dict`.
        checkpoint: recompute blocks in the backward pass (activation checkpointing) to save memory.
    """

    def __init__(
        self,
        *,
        width: int = 256,
        encoder_layers: int = 8,
        encoder_heads: int = 4,
        decoder_layers: int = 4,
        decoder_heads: int = 4,
        n_ctx: int = 4096,
        init_scale: float = 0.25,
        n_query: int = 4096,
        loss: str = "l1",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if n_ctx < 1 or n_query < 1:
            raise ValueError(f"n_ctx and n_query must be >= 1, got n_ctx={n_ctx}, n_query={n_query}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.width, self.n_ctx, self.n_query, self.loss = width, n_ctx, n_query, loss
        self.encoder_input_proj = nn.Linear(3, width)
        self.encoder = Transformer(
            width=width, layers=encoder_layers, heads=encoder_heads, init_scale=init_scale, checkpoint=checkpoint
        )
        self.decoder_input_proj = nn.Linear(3, width)
        self.decoder = SimplePerceiver(
            width=width, layers=decoder_layers, heads=decoder_heads, init_scale=init_scale, checkpoint=checkpoint
        )
        self.ln_post = nn.LayerNorm(width)
        self.output_proj = nn.Linear(width, 1)

    # ------------------------------------------------------------------------------------ Point-E frame
    def encode(self, cloud: Tensor) -> Tensor:
        """Cloud xyz ``[B, N, 3]`` (Point-E frame) → per-point latents ``[B, N, W]`` (reusable across queries)."""
        _check_xyz("cloud", cloud)
        h = self.encoder_input_proj(cloud)  # [B, N, W]
        return self.encoder(h)  # [B, N, W]

    def predict(self, points: Tensor, latents: Tensor) -> Tensor:
        """Query xyz ``[B, P, 3]`` (Point-E frame) + latents ``[B, N, W]`` → SDF ``[B, P]`` (Point-E units)."""
        _check_xyz("points", points, batch=latents.shape[0])
        x = self.decoder_input_proj(points)  # [B, P, W]
        x = self.decoder(x, latents)  # [B, P, W]
        return self.output_proj(self.ln_post(x))[..., 0]  # [B, P]

    def forward(self, points: Tensor, cloud: Tensor) -> Tensor:
        """SDF ``[B, P]`` at ``points`` ``[B, P, 3]`` given ``cloud`` ``[B, N, 3]``, all in Point-E's frame/units.

        (The official model takes channels-first ``[B, 3, N]`` tensors; the weights are the same.)
        """
        return self.predict(points, self.encode(cloud))

    # ------------------------------------------------------------------------------------ our world frame
    def world_sdf(self, points: Tensor, cloud: Tensor, *, chunk_size: int | None = 16384) -> Tensor:
        """SDF in our world frame and units (positive inside) at ``points`` ``[B, P, 3]`` given ``cloud`` ``[B, N, 3]``.

        Coordinates are scaled by :data:`POINTE_FRAME_SCALE` (0.5) going in and the SDF by 1/0.5 = 2 coming out.
        The cloud is encoded once; queries run ``chunk_size`` at a time (``None``: all at once) to bound memory.
        """
        _check_xyz("cloud", cloud)
        _check_xyz("points", points, batch=cloud.shape[0])
        latents = self.encode(cloud * POINTE_FRAME_SCALE)  # [B, N, W]
        queries = points * POINTE_FRAME_SCALE  # [B, P, 3]
        step = queries.shape[1] if chunk_size is None else max(1, chunk_size)
        parts = [self.predict(q, latents) for q in queries.split(step, dim=1)] if queries.shape[1] else []
        sdf = torch.cat(parts, dim=1) if parts else queries.new_zeros(queries.shape[:2])  # [B, P]
        return sdf / POINTE_FRAME_SCALE

    def cloud_from_batch(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The first ``n_ctx`` (farthest-point-ordered) xyz of ``batch["points"]`` ``[B, N, 6]`` → ``[B, n_ctx, 3]``."""
        points = batch.get("points") if isinstance(batch, Mapping) else None
        if not isinstance(points, Tensor) or points.ndim != 3 or points.shape[-1] < 3:
            raise ValueError("batch['points'] must be a [B, N, 3+] point-cloud tensor (xyz first)")
        if points.shape[1] < self.n_ctx:
            raise ValueError(
                f"batch['points'] has {points.shape[1]} points but the Point-E SDF model takes n_ctx={self.n_ctx}; "
                "prepare records with at least that many points (or use a model with a smaller n_ctx)"
            )
        return points[:, : self.n_ctx, :3]  # [B, n_ctx, 3]

    # ------------------------------------------------------------------------------------ training
    def loss_dict(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Regression on the records' exact SDF samples (world units): ``{"sdf": L1 or L2, "metric/sign_acc"}``.

        Each step takes ``n_query`` random samples per asset from ``batch["sdf_points"]`` ``[B, S, 3]`` /
        ``batch["sdf"]`` ``[B, S]`` (uniform-in-box and near-surface samples alike: the model must place the 0
        level, which the near-surface ones pin) and the first ``n_ctx`` cloud points as input.
        """
        for key in ("sdf_points", "sdf"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r}: build the AssetDataset with load_sdf=True")
        cloud = self.cloud_from_batch(batch)  # [B, n_ctx, 3]
        sdf_points, sdf = batch["sdf_points"], batch["sdf"]  # [B, S, 3], [B, S]
        if sdf.shape != sdf_points.shape[:2]:
            raise ValueError(f"batch['sdf'] {tuple(sdf.shape)} does not match batch['sdf_points'] {tuple(sdf_points.shape)}")
        n = min(self.n_query, sdf.shape[1])
        idx = torch.rand(sdf.shape, device=sdf.device).argsort(dim=1)[:, :n]  # [B, n] random subset per asset
        points = sdf_points.gather(1, idx[..., None].expand(-1, -1, 3))  # [B, n, 3]
        target = sdf.gather(1, idx)  # [B, n]
        pred = self.world_sdf(points, cloud, chunk_size=None)  # [B, n]
        err = pred.float() - target.float()
        loss = err.abs().mean() if self.loss == "l1" else err.square().mean()
        with torch.no_grad():
            sign_acc = ((pred > 0) == (target > 0)).float().mean()
        return {"sdf": loss, "metric/sign_acc": sign_acc}
