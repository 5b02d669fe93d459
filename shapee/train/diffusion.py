"""Prior training (``scripts/train_diffusion.py``): build the latent prior and the latents dataset from the Hydra
config, optionally start from our weights (``init_from``) or the released ones (``init_official``), and run the
shared training loop (EMA, precision, DDP, resume, logging come from :func:`shapee.train.train`).

Evaluation (every ``trainer.eval_every`` steps, rank 0, EMA weights): latents sampled for fixed conditioning (the
first caption / conditioning view of the dataset's first assets, the same at every evaluation and with a fixed seed),
their statistics next to the data's, a deterministic x₀ MSE of the eval assets at four fixed timesteps, and, given a
``transmitter=``, NeRF turntables of the sampled latents as images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from shapee.cameras import orbit_cameras
from shapee.cli import refuse_renamed_kwargs
from shapee.data.cap3d import Cap3DLatentDataset
from shapee.data.latents import LatentDataset, collate_latents
from shapee.io.safe import instantiate_model
from shapee.models.latent_diffusion import LatentDiffusion
from shapee.train.loop import find_resume_checkpoint, train
from shapee.train.rng import seed_everything
from shapee.io.loading import load_model
from shapee.io.official_priors import load_official_prior_weights

OFFICIAL_NAME = {"text": "text300M", "image": "image300M"}


def init_from_official(model: LatentDiffusion, path: str) -> None:
    """Load a released ``text_cond.pt`` / ``image_cond.pt`` (official ``wrapped.*`` keys) into ``model`` strictly.

    Raises:
        FileNotFoundError: no such file. :class:`~shapee.io.OfficialCheckpointError`: keys/shapes differ from
            ``model`` (every offending key listed), e.g. a text checkpoint into an image prior.
    """
    load_official_prior_weights(model, path, name=f"{OFFICIAL_NAME[model.cond_mode]} (init_official={path})")


@refuse_renamed_kwargs(decoder="use transmitter= (the weights that decode latents)")
def prior_eval_fn(
    dataset: LatentDataset,
    *,
    n_assets: int = 2,
    n_per_cond: int = 1,
    steps: int = 64,
    sampler: str = "karras",
    guidance_scale: float | None = None,
    seed: int = 0,
    transmitter=None,
    render_views: int = 4,
    render_resolution: int = 32,
):
    """``eval_fn(model, step)`` for the training loop (see the module docstring).

    Returns scalars ``sample_std``, ``sample_abs_mean``, ``data_std``, ``data_abs_mean``, ``x0_mse_t{t}`` and, with a
    ``transmitter`` (a :class:`~shapee.models.Transmitter` whose latent shape equals the prior's), the image
    ``images/turntable`` ``[n·R, V·R, 3]`` uint8 (one row of ``render_views`` views per sample).
    """
    items = [dataset[i] for i in range(min(n_assets, len(dataset)))]
    batch = collate_latents(items)
    data = batch["latent"]  # [A, n_ctx, d]

    @torch.no_grad()
    def eval_fn(model: LatentDiffusion, step: int) -> dict[str, Any]:
        device = model.device
        on_device = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        out: dict[str, Any] = {
            "data_std": float(data.std()),
            "data_abs_mean": float(data.abs().mean()),
        }
        # Deterministic validation loss: fixed timesteps, fixed noise, fixed caption (the first).
        g = torch.Generator(device).manual_seed(seed)
        x0 = on_device["latent"]
        fixed = dict(on_device)
        if model.cond_mode == "text":
            fixed["captions"] = [caps[:1] for caps in batch["captions"]]
        cond = model.conditioning(fixed)
        T = model.process.num_steps
        for t_value in (T // 8, 3 * T // 8, 5 * T // 8, 7 * T // 8):
            t = torch.full((x0.shape[0],), t_value, device=device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=g, device=device)
            x_t = model.process.q_sample(x0, t, noise)
            x0_pred, _ = model.denoise_fn(cond)(x_t, t)
            out[f"x0_mse_t{t_value}"] = float((x0_pred.float() - x0).square().mean())
        # Samples for the fixed conditioning (the unconditional zeros for assets without a caption are skipped).
        keep = [i for i in range(cond.shape[0]) if bool(cond[i].abs().sum() > 0)]
        if not keep:
            return out
        latents = model.sample_from_cond(
            cond[keep], n=n_per_cond, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
            generator=torch.Generator(device).manual_seed(seed),
        )  # [K·n, n_ctx, d]
        out.update(sample_std=float(latents.std()), sample_abs_mean=float(latents.abs().mean()))
        if transmitter is not None:
            transmitter.to(device).eval()
            cameras = orbit_cameras(render_views, resolution=render_resolution, device=device)
            rgb = transmitter.render_nerf(latents, cameras, deterministic=True)["rgb"].clamp(0, 1)  # [S, V, R, R, 3]
            rows = torch.cat(list(rgb.permute(0, 2, 1, 3, 4).flatten(2, 3)), dim=0)  # [S·R, V·R, 3]
            out["images/turntable"] = (rows.cpu().numpy() * 255).round().astype(np.uint8)
        return out

    return eval_fn


def build_latent_dataset(data: DictConfig | Mapping[str, Any], *, cond: str, latent_shape: tuple[int, int]):
    """The prior's training set from the ``data`` config group: ``kind: latents`` (default; our records under
    ``root``) or ``kind: cap3d`` (Cap3D's ``<uid>.pt`` latents under ``latents`` + its ``captions`` CSV; text only).

    Raises ``ValueError`` when the latents are not ``latent_shape`` (``[n_ctx, d_latent]``) or the kind is unknown.
    """
    kind = str(data.get("kind") or "latents")
    if kind == "cap3d":
        if cond != "text":
            raise ValueError("data=cap3d: Cap3D's latents come with captions only; train with cond=text")
        n_ctx, d_latent = latent_shape
        rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank reads; rank 0 says what it found
        return Cap3DLatentDataset(data.latents, data.captions, n_ctx=n_ctx, d_latent=d_latent,
                                  check=str(data.get("check") or "full"), log=rank0)
    if kind != "latents":
        raise ValueError(f"data.kind={kind!r}: train_diffusion reads 'latents' (data=latents) or 'cap3d' (data=cap3d)")
    dataset = LatentDataset(data.root, cond=cond)
    first = dataset[0]["latent"]
    if tuple(first.shape) != tuple(latent_shape):
        raise ValueError(
            f"data.root={data.root!r} holds latents of shape {list(first.shape)} but the prior models "
            f"{list(latent_shape)}: extract with the matching encoder or pick the matching model= preset"
        )
    return dataset


def train_diffusion(cfg: DictConfig | Mapping[str, Any]) -> dict[str, float]:
    """Train the prior from a composed ``train_diffusion.yaml`` config; returns the loop's final metrics."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.init_from and cfg.init_official:
        raise ValueError("give at most one of init_from= (our checkpoint/snapshot) and init_official= (released weights)")
    # The initial weights follow trainer.seed, not whatever the process drew before (a notebook, a test suite):
    # the same config gives the same run. Every rank builds the same model (DDP broadcasts rank 0's anyway).
    # The model is built as at load time (allow-listed _target_, shapee.io.safe), from the config its snapshot keeps.
    seed_everything(int(cfg.trainer.seed))
    model = instantiate_model(model_cfg, source="train_diffusion: model", expected="shapee.models.LatentDiffusion",
                              error=ValueError)
    run_dir = Path(cfg.run_dir)
    if cfg.init_official and find_resume_checkpoint(cfg.resume, run_dir / "checkpoints") is None:
        init_from_official(model, cfg.init_official)

    dataset = build_latent_dataset(cfg.data, cond=model.cond_mode, latent_shape=model.latent_shape)

    transmitter = None
    if cfg.get("transmitter"):
        transmitter = load_model(cfg.transmitter, expect="transmitter")
        have = (transmitter.encoder.latent_ctx, transmitter.encoder.d_latent)
        if have != model.latent_shape:
            raise ValueError(
                f"transmitter={cfg.transmitter!r} decodes latents {list(have)}, the prior makes {list(model.latent_shape)}"
            )
    ev = cfg.eval
    eval_fn = prior_eval_fn(
        dataset, n_assets=int(ev.n_assets), n_per_cond=int(ev.n_per_cond), steps=int(ev.steps), sampler=ev.sampler,
        guidance_scale=ev.guidance_scale, seed=int(ev.seed), transmitter=transmitter, render_views=int(ev.render_views),
        render_resolution=int(ev.render_resolution),
    ) if int(ev.n_assets) > 0 else None

    trainer_cfg = OmegaConf.create(OmegaConf.to_container(cfg.trainer, resolve=True))
    return train(
        trainer_cfg,
        model=model,
        train_set=dataset,
        run_dir=run_dir,
        collate_fn=collate_latents,
        eval_fn=eval_fn,
        model_config=model_cfg,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
