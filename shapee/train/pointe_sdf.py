"""Training of the distillation teacher (``scripts/train_pointe_sdf.py``): Point-E's SDF regressor (reference §9) on
our records, through the shared training loop.

Input: the first ``n_ctx`` (4096) farthest-point-ordered cloud points of each record, xyz only; targets: the
record's exact SDF samples (positive inside, world units), ``model.n_query`` random ones per asset per step, L1 or
L2 (``model.loss``). A few assets, chosen by :meth:`AssetDataset.split` (a hash of ids, so every rank and every run
agree), are held out; the evaluation reports on *all* their SDF samples the sign accuracy and the L1 error (world
units), overall and in the near-surface band |sdf| < ``eval.band`` where the 0 level is decided.

The paper trains this model on Point-E's own data; the released weights can start a run (``init_official=sdf.pt``,
strict load) and a trained model is what ``teacher=pointe`` of the encoder's distill stage loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from shapee.data.dataset import AssetDataset, collate_assets
from shapee.io.official_pointe import load_official_pointe_sdf
from shapee.io.safe import instantiate_model
from shapee.models.pointe_sdf import PointESDF
from shapee.train.loop import train
from shapee.train.rng import seed_everything


@torch.no_grad()
def sdf_metrics(model: PointESDF, dataset: AssetDataset, *, batch_size: int = 4, band: float = 0.05) -> dict[str, float]:
    """Held-out SDF quality of ``model`` over every SDF sample of every asset of ``dataset``.

    Returns ``sign_acc`` (fraction of samples whose predicted sign is right), ``sdf_l1`` (mean |error|, world
    units) and the same two restricted to the band ``|sdf| < band`` (``band_sign_acc``, ``band_sdf_l1``; NaN when
    no sample falls in the band).
    """
    if len(dataset) == 0:
        raise ValueError("sdf_metrics: the evaluation dataset is empty")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = abs_err = band_correct = band_abs_err = 0.0
    count = band_count = 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate_assets([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            cloud = model.cloud_from_batch(batch).to(device)  # [b, n_ctx, 3]
            points, target = batch["sdf_points"].to(device), batch["sdf"].to(device)  # [b, S, 3], [b, S]
            pred = model.world_sdf(points, cloud).float()  # [b, S]
            right = (pred > 0) == (target > 0)  # [b, S]
            err = (pred - target).abs()  # [b, S]
            near = target.abs() < band  # [b, S]
            correct += right.sum().item()
            abs_err += err.sum().item()
            count += target.numel()
            band_correct += right[near].sum().item()
            band_abs_err += err[near].sum().item()
            band_count += int(near.sum())
    finally:
        model.train(was_training)
    nan = float("nan")
    return {
        "sign_acc": correct / count,
        "sdf_l1": abs_err / count,
        "band_sign_acc": band_correct / band_count if band_count else nan,
        "band_sdf_l1": band_abs_err / band_count if band_count else nan,
    }


def train_pointe_sdf(cfg: DictConfig | Mapping[str, Any]) -> dict[str, float]:
    """Train :class:`PointESDF` from a composed ``train_pointe_sdf.yaml`` config; returns the loop's final metrics."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    seed_everything(int(cfg.trainer.seed))  # the initial weights follow trainer.seed (see train_encoder)
    # Built as at load time (allow-listed _target_, shapee.io.safe), from the config its snapshot keeps.
    model = instantiate_model(
        model_cfg, source="train_pointe_sdf: model", expected="shapee.models.pointe_sdf.PointESDF", error=ValueError
    )
    if cfg.get("init_official"):
        # The released sdf.pt (official layout, strict); ignored on resume, where the loop loads our checkpoint.
        sizes = {k: v for k, v in model_cfg.items() if k != "_target_"}
        model.load_state_dict(load_official_pointe_sdf(cfg.init_official, **sizes).state_dict(), strict=True)

    dataset = AssetDataset(cfg.data.root, load_targets=False, load_sdf=True, n_points=model.n_ctx)
    holdout = int(cfg.eval.holdout)
    eval_fn = None
    if holdout > 0 and len(dataset) > holdout:
        dataset, held_out = dataset.split(holdout, seed=int(cfg.eval.seed))

        def held_out_metrics(ema_model: PointESDF, step: int) -> dict[str, float]:
            return sdf_metrics(ema_model, held_out, batch_size=int(cfg.eval.batch_size), band=float(cfg.eval.band))

        eval_fn = held_out_metrics

    trainer_cfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    return train(
        trainer_cfg,
        model=model,
        train_set=dataset,
        run_dir=cfg.run_dir,
        collate_fn=collate_assets,
        eval_fn=eval_fn,
        model_config=model_cfg,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
