"""Encoder training (``scripts/train_encoder.py``): build the transmitter, the records dataset and the held-out-view
evaluation from the Hydra config, then run the shared training loop for one stage."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from shapee.data.dataset import AssetDataset, collate_assets
from shapee.eval.encoder import CHECKPOINT_SETTINGS, ENCODER_DEFAULTS, SourceMeshes, evaluate_checkpoint, metric_keys
from shapee.io.loading import load_model
from shapee.io.safe import instantiate_model
from shapee.models.transmitter import LossSettings, Transmitter
from shapee.train.loop import train
from shapee.train.rng import seed_everything


def heldout_eval_fn(dataset: AssetDataset, *, toy_seed: int = 0, **settings: Any):
    """``eval_fn(model, step)``: :func:`shapee.eval.encoder.evaluate_checkpoint` on ``dataset`` — the function
    ``evaluate.py task=encoder`` runs, with its defaults (:data:`~shapee.eval.encoder.ENCODER_DEFAULTS`) unless
    ``settings`` says otherwise, so the logged numbers are the ones ``evaluate.py`` gives for the same snapshot on the
    same assets (``max_assets=`` the trainer's ``eval.n_assets``).

    By default: the held-out target views (the last ``model.holdout_views``, never used for training rays) at the
    records' resolution, sRGB in [0, 1] on black, deterministic NeRF sampling, the encoder shuffle seeded with
    ``seed``, PSNR per asset averaged over assets. A setting cheaper than ``evaluate.py``'s is named in the key
    (:func:`shapee.eval.encoder.metric_keys`): ``stf_psnr@32`` for a 32³ mesh grid. Image: per asset target | NeRF |
    STF rows (``images/target_nerf_stf``).
    """
    unknown = sorted(set(settings) - set(CHECKPOINT_SETTINGS))
    if unknown:
        raise ValueError(f"heldout_eval_fn: unknown evaluation settings {unknown}; known: {list(CHECKPOINT_SETTINGS)}")
    run = {**{k: ENCODER_DEFAULTS[k] for k in CHECKPOINT_SETTINGS}, **settings}
    sources = SourceMeshes(toy_seed)

    def eval_fn(model: Transmitter, step: int) -> dict[str, Any]:
        row, grid = evaluate_checkpoint(model, dataset, sources=sources, **run)
        metrics: dict[str, Any] = metric_keys(row, grid_size=row["grid_size"], resolution=run["resolution"])
        if grid is not None:
            metrics["images/target_nerf_stf"] = grid  # [rows·R, V·R, 3] uint8
        return metrics

    return eval_fn


def stage_loss_settings(stage: Mapping[str, Any]) -> LossSettings:
    """The :class:`~shapee.models.transmitter.LossSettings` a stage config gives (``configs/stage/*.yaml``: ``teacher``,
    ``distill_points``, ``stf_views``, ``stf_resolution``, ``stf_sigma``); what it does not give keeps its default."""
    return LossSettings(**{f.name: stage[f.name] for f in fields(LossSettings) if stage.get(f.name) is not None})


def train_encoder(cfg: DictConfig | Mapping[str, Any]) -> dict[str, float]:
    """Run one encoder stage from a composed ``train_encoder.yaml`` config; returns the loop's final metrics."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # The initial weights follow trainer.seed, not whatever the process drew before (a notebook, a test suite):
    # the same config gives the same run. Every rank builds the same model (DDP broadcasts rank 0's anyway).
    # The model is built as at load time (allow-listed _target_, shapee.io.safe), from the config its snapshot keeps.
    seed_everything(int(cfg.trainer.seed))
    model = instantiate_model(model_cfg, source="train_encoder: model", expected="shapee.models.Transmitter",
                              error=ValueError)
    # How the stage's losses sample and render: training settings of the stage config, never saved with the model.
    model.loss_settings = stage_loss_settings(cfg.stage)
    if model.loss_settings.teacher == "pointe":  # distill's frozen Point-E teacher, through the one loader
        teacher_checkpoint = cfg.stage.get("teacher_checkpoint")
        if not teacher_checkpoint:
            raise ValueError("stage.teacher=pointe needs stage.teacher_checkpoint=<Point-E SDF snapshot or sdf.pt>")
        model.use_pointe_teacher(load_model(teacher_checkpoint, expect="pointe_sdf"))
    stage = cfg.stage.name
    encoder = model.encoder
    dataset = AssetDataset(
        cfg.data.root, load_targets=True, load_sdf=stage == "distill", n_points=encoder.n_points, n_views=encoder.n_views
    )
    # The evaluation: evaluate.py's function and defaults on the first eval.n_assets assets (evaluate.py max_assets=).
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    n_eval = min(int(eval_cfg.pop("n_assets")), len(dataset))
    eval_fn = None
    if n_eval:
        eval_set = AssetDataset(cfg.data.root, load_sdf=False, n_points=encoder.n_points, n_views=encoder.n_views,
                                asset_ids=dataset.asset_ids[:n_eval])
        eval_fn = heldout_eval_fn(eval_set, **eval_cfg)
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
