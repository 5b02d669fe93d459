"""Encoder training (``scripts/train_encoder.py``): build the transmitter, the records dataset and the held-out-view
evaluation from the Hydra config, then run the shared training loop for one stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from shapee.data.dataset import AssetDataset, collate_assets
from shapee.eval.metrics import psnr
from shapee.io.loading import load_model
from shapee.models.transmitter import Transmitter, batch_cameras
from shapee.train.loop import train
from shapee.train.rng import seed_everything


def heldout_eval_fn(dataset: AssetDataset, *, n_views: int | None = None, deterministic: bool = True, stf: bool = True):
    """``eval_fn(model, step)``: NeRF (and STF mesh) PSNR on the held-out target views of ``dataset``'s assets.

    The held-out views are the last ``model.holdout_views`` target views of each record, never used for training
    rays. Renders at the records' resolution, sRGB in [0, 1] on black, NeRF with deterministic sampling, STF meshes
    at ``model.stf_grid_size``³; PSNR over all pixels of all held-out views (``nerf_psnr``, ``stf_psnr``) plus the
    fine-pass transmittance L1. Images: NeRF renders | STF renders | targets.
    """

    @torch.no_grad()
    def eval_fn(model: Transmitter, step: int) -> dict[str, Any]:
        k = model.holdout_views if n_views is None else min(n_views, model.holdout_views)
        if k < 1:
            return {}
        device = next(model.parameters()).device
        batch = collate_assets([dataset[i] for i in range(len(dataset))])
        batch = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in batch.items()}
        latent = model.encode(batch)
        cameras = [c[len(c) - k :] for c in batch_cameras(batch, "target")]
        out = model.render_nerf(latent, [c.to(device) for c in cameras], deterministic=deterministic)
        target = batch["target_rgb"][:, -k:]  # [B, k, H, W, 3]
        alpha = batch["target_alpha"][:, -k:]  # [B, k, H, W]
        rgb = out["rgb"].clamp(0, 1)
        metrics = {
            "nerf_psnr": psnr(rgb, target),
            "nerf_transmittance_l1": (out["transmittance"] - (1 - alpha)).abs().mean().item(),
        }
        rows = [rgb[0]]
        if stf:
            stf_rgb = model.render_stf(latent, [c.to(device) for c in cameras])["rgb"].clamp(0, 1)  # [B, k, H, W, 3]
            metrics["stf_psnr"] = psnr(stf_rgb, target)
            rows.append(stf_rgb[0])
        grid = torch.cat(rows + [target[0]], dim=1)  # [k, rows·H, W, 3]: renders over the target
        grid = torch.cat(list(grid), dim=1)  # [rows·H, k·W, 3]
        metrics["images/renders_vs_target"] = (grid.cpu().numpy() * 255).round().astype(np.uint8)
        return metrics

    return eval_fn


def train_encoder(cfg: DictConfig | Mapping[str, Any]) -> dict[str, float]:
    """Run one encoder stage from a composed ``train_encoder.yaml`` config; returns the loop's final metrics."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    target = model_cfg.pop("_target_", "shapee.models.Transmitter")
    if target not in ("shapee.models.Transmitter", "shapee.models.transmitter.Transmitter"):
        raise ValueError(f"train_encoder trains a shapee.models.Transmitter, got model._target_={target!r}")
    # The initial weights follow trainer.seed, not whatever the process drew before (a notebook, a test suite):
    # the same config gives the same run. Every rank builds the same model (DDP broadcasts rank 0's anyway).
    seed_everything(int(cfg.trainer.seed))
    model = Transmitter(**model_cfg)
    if model.teacher == "pointe":  # the frozen teacher of stage=distill teacher=pointe, through the one loader
        model.use_pointe_teacher(load_model(model.teacher_checkpoint, expect="pointe_sdf"))
    stage = cfg.stage.name
    encoder = model.encoder
    dataset = AssetDataset(
        cfg.data.root, load_targets=True, load_sdf=stage == "distill", n_points=encoder.n_points, n_views=encoder.n_views
    )
    n_eval = min(int(cfg.eval.n_assets), len(dataset))
    eval_set = AssetDataset(
        cfg.data.root, load_sdf=False, n_points=encoder.n_points, n_views=encoder.n_views, asset_ids=dataset.asset_ids[:n_eval]
    )
    trainer_cfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    return train(
        trainer_cfg,
        model=model,
        train_set=dataset,
        run_dir=cfg.run_dir,
        collate_fn=collate_assets,
        eval_fn=heldout_eval_fn(
            eval_set, n_views=cfg.eval.n_views, deterministic=cfg.eval.deterministic, stf=cfg.eval.stf
        ) if n_eval else None,
        model_config={"_target_": "shapee.models.Transmitter", **model_cfg},
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
