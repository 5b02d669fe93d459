"""Generation evaluation (``scripts/evaluate.py task=generation``): CLIP R-Precision and time per sample.

CLIP R-Precision as the text-to-3D literature computes it (Park et al. 2021; Dream Fields, Jain et al. 2022; Point-E
and Shap-E report it on a set of prompts): for each prompt of the evaluation set the prior samples ``n_per_prompt``
latents; each latent is rendered (STF mesh render, or NeRF) from ``views`` cameras on a turntable at a fixed
elevation (default 20 views at 30°, 128², black background); an *evaluation* CLIP embeds every render and every
prompt, and each render retrieves the prompt of highest cosine similarity among all prompts of the set. R-Precision
is the fraction of renders whose own prompt ranks first (ties count as misses). ``r_precision_view_mean`` is the
same with one query per sample (its views' embeddings averaged).

The evaluation CLIP must not be the conditioning CLIP of the prior: a prior conditioned on the same embedding space
can score well by matching that space rather than by drawing the object. The same model (same architecture and
weights) is refused unless ``allow_same_clip=true``, which prints a loud warning and marks the results.

Time per sample: wall-clock seconds of the prior's sampling (CFG, all sampler steps) and of rendering, divided by
the number of samples, synchronised on CUDA; the first batch is preceded by a short untimed warm-up (``warmup``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shapee.cameras import orbit_cameras
from shapee.cli import progress_bar
from shapee.eval.config import EvalClipConfig, GenerationEval, merge_settings
from shapee.eval.metrics import retrieval_ranks
from shapee.eval.report import markdown_table, save_image_grid, write_results
from shapee.io.loading import load_model
from shapee.models.latent_diffusion import LatentDiffusion, build_frozen_clip
from shapee.runtime import resolve_device, timed_call

def read_prompts(prompts: str | os.PathLike | Sequence[str]) -> list[str]:
    """The prompt set: a ``.txt`` file (one prompt per line; blank lines and ``#`` comments skipped), a ``.json`` list,
    or a list of strings. At least 2 distinct non-empty prompts (retrieval needs alternatives; duplicates would make
    the true prompt ambiguous)."""
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts={str(path)!r}: no such file (a .txt with one prompt per line, or a .json list)"
            )
        if path.suffix == ".json":
            items = json.loads(path.read_text())
            if not isinstance(items, list):
                raise ValueError(f"prompts file {str(path)!r}: expected a JSON list of strings")
        else:
            items = [line.strip() for line in path.read_text().splitlines()]
            items = [line for line in items if line and not line.startswith("#")]
    else:
        items = list(prompts)
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{i}] is empty or not a string: {p!r}")
    items = [p.strip() for p in items]
    duplicates = sorted({p for p in items if items.count(p) > 1})
    if duplicates:
        raise ValueError(f"prompts contain duplicates {duplicates[:3]}: each prompt must be unique for retrieval")
    if len(items) < 2:
        raise ValueError(f"R-Precision needs at least 2 prompts to retrieve among, got {len(items)}")
    return items


def _clip_identity(kwargs: Mapping[str, Any]) -> tuple:
    """What makes two FrozenCLIP configs the same model: architecture (QuickGELU suffix ignored: the OpenAI
    weights are the same) and weights (tag or resolved file path), or the explicit architecture dict."""
    name = str(kwargs.get("model_name") or "").removesuffix("-quickgelu")
    pretrained = kwargs.get("pretrained")
    if pretrained is not None and Path(str(pretrained)).is_file():
        pretrained = str(Path(str(pretrained)).resolve())
    cfg = kwargs.get("model_cfg")
    if cfg is not None:
        name = json.dumps(cfg, sort_keys=True, default=str)
    return name, pretrained


def same_clip(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two FrozenCLIP kwargs describe the same model (architecture and weights)."""
    return _clip_identity(a) == _clip_identity(b)


def build_eval_clip(eval_clip: Mapping[str, Any] | None, device: torch.device, seed: int = 0):
    """The evaluation :class:`~shapee.conditioning.FrozenCLIP`: any open_clip name + pretrained tag or local file, or
    an explicit ``model_cfg`` (random weights unless ``pretrained`` is a file); built under a forked, seeded RNG.
    ``eval_clip``: the fields of :class:`~shapee.eval.config.EvalClipConfig` (its defaults for the ones not given)."""
    kwargs = asdict(merge_settings(EvalClipConfig, eval_clip))  # defaults filled in, an unknown key refused
    for key in ("model_cfg", "cache_dir"):
        if kwargs[key] is None:
            kwargs.pop(key)
    return build_frozen_clip(kwargs, seed=seed, device=device), kwargs


@torch.no_grad()
def clip_r_precision(
    clip, images: Tensor, prompts: Sequence[str], true_index: Tensor, views: int = 1
) -> dict[str, Any]:
    """R-Precision of renders ``images`` ``[Q, H, W, 3]`` (sRGB in [0, 1]) against ``prompts`` with ``clip``.

    ``true_index`` ``[Q]``: each render's prompt. With ``views > 1`` consecutive groups of ``views`` renders are one
    sample, and ``r_precision_view_mean`` retrieves once per sample with the mean of its views' embeddings.
    """
    text = clip.embed_text(list(prompts))  # [P, D]
    image = torch.cat([clip.embed_image(chunk) for chunk in images.split(64)])  # [Q, D]
    true_index = torch.as_tensor(true_index, device=image.device).long()
    ranks = retrieval_ranks(image, text, true_index)  # [Q]
    out = {"r_precision": float((ranks == 0).double().mean()), "ranks": ranks.tolist()}
    if views > 1:
        if image.shape[0] % views:
            raise ValueError(f"{image.shape[0]} renders do not split into samples of {views} views")
        mean = image.view(-1, views, image.shape[-1]).mean(1)  # [S, D]
        out["r_precision_view_mean"] = float((retrieval_ranks(mean, text, true_index[::views]) == 0).double().mean())
    return out


def _render(transmitter, latents: Tensor, cameras, head: str, grid_size: int) -> Tensor:
    """Renders ``[S, V, R, R, 3]`` sRGB in [0, 1] on black of latents ``[S, n_ctx, d]``."""
    if head == "stf":
        return transmitter.render_stf(latents, cameras, grid_size=grid_size)["rgb"].clamp(0, 1)
    return transmitter.render_nerf(latents, cameras, deterministic=True)["rgb"].clamp(0, 1)


@torch.no_grad()
def evaluate_generation(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """CLIP R-Precision and time per sample of the text prior ``cfg["prior"]`` on the prompt set ``cfg["prompts"]``,
    its latents decoded by ``cfg["transmitter"]``.

    Keys: the fields of :class:`~shapee.eval.config.GenerationEval`, which holds their defaults and meanings (``out``:
    a folder for ``results.json``, ``results.md``, ``grids/generation.png``; None writes nothing); an unknown key is a
    ``ValueError`` naming it. Returns ``{"task", "settings", "rows", "markdown"}`` with one row (the prior) holding
    ``r_precision``, ``r_precision_view_mean``, ``sample_seconds_per_sample``, ``render_seconds_per_sample`` and the
    per-prompt retrieval ranks.
    """
    # 1. Settings and prompts, checked before any model is built.
    s = _generation_settings(cfg)
    prompts = read_prompts(s.prompts)
    device = resolve_device(s.device)
    # 2. The prior, the transmitter that decodes its latents, the evaluation CLIP.
    prior, transmitter = _generation_models(s, device)
    clip, clip_kwargs, same = _evaluation_clip(s, prior, device)
    # 3. Every prompt's n samples, rendered from the turntable cameras; prior and renderer timed apart.
    cameras = orbit_cameras(int(s.render_views), elevation=math.radians(float(s.elevation_deg)), fov=float(s.fov),
                            resolution=int(s.render_resolution), device=device)
    renders, sample_s, render_s = _sample_and_render(s, prior, transmitter, prompts, cameras, device)
    # 4. Each render retrieves among all prompts with the evaluation CLIP.
    n, V = int(s.n_per_prompt), int(s.render_views)
    true_index = torch.arange(len(prompts)).repeat_interleave(n * V)  # [P·n·V]
    retrieval = clip_r_precision(clip, renders.flatten(0, 1).to(device), prompts, true_index, views=V)
    ranks = torch.tensor(retrieval["ranks"]).view(len(prompts), n * V)  # [P, n·V]
    # 5. The report: one row, the settings, markdown, and the grid of each prompt's first sample.
    n_samples = renders.shape[0]
    row = {
        "label": Path(str(s.prior)).name,
        "ckpt": str(s.prior),
        "r_precision": retrieval["r_precision"],
        "r_precision_view_mean": retrieval.get("r_precision_view_mean", retrieval["r_precision"]),
        "n_prompts": len(prompts),
        "n_samples": n_samples,
        "n_renders": int(ranks.numel()),
        "sample_seconds_per_sample": sample_s / n_samples,
        "render_seconds_per_sample": render_s / n_samples,
        "seconds_per_sample": (sample_s + render_s) / n_samples,
        "same_clip_as_conditioning": same,
        "prompts": [{"prompt": p, "r_precision": float((r == 0).double().mean()), "mean_rank": float(r.double().mean())}
                    for p, r in zip(prompts, ranks)],
    }
    settings = _generation_report_settings(s, prompts, prior, clip_kwargs, device)
    markdown = _generation_markdown(s, row, settings, same)
    out = Path(s.out) if s.out else None
    if out is not None:
        k = min(int(s.grid_views), V)
        first_sample = renders[::n, :k]  # [P, k, R, R, 3]: each prompt's first sample
        grid = first_sample.permute(0, 2, 1, 3, 4).flatten(2, 3).flatten(0, 1)  # [P·R, k·R, 3]
        grid = (grid.numpy() * 255).round().astype(np.uint8)
        row["grid"] = str(save_image_grid(out / "grids" / "generation.png", grid))
    results = {"task": "generation", "settings": settings, "rows": [row], "markdown": markdown}
    if out is not None:
        write_results(out, results, markdown)
    return results


def _generation_settings(cfg: Mapping[str, Any]) -> GenerationEval:
    """:class:`GenerationEval` from ``cfg``, its required keys present and its counts positive."""
    s = merge_settings(GenerationEval, cfg)
    for key in ("prior", "transmitter", "prompts"):
        if not getattr(s, key):
            raise ValueError(f"{key}=<...> is required for task=generation")
    if s.head not in ("stf", "nerf"):
        raise ValueError(f"head must be 'stf' or 'nerf', got {s.head!r}")
    for key in ("n_per_prompt", "batch_prompts", "render_views", "render_resolution", "steps"):
        if int(getattr(s, key)) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(s, key)}")
    return s


def _generation_models(s: GenerationEval, device: torch.device) -> tuple[LatentDiffusion, Any]:
    """The text prior ``s.prior`` and the transmitter ``s.transmitter``, checked to fit each other."""
    prior = load_model(s.prior, device=device)
    if not isinstance(prior, LatentDiffusion) or prior.cond_mode != "text":
        raise ValueError(f"prior={s.prior!r} is not a text-conditional shapee.models.LatentDiffusion snapshot")
    transmitter = load_model(s.transmitter, expect="transmitter", device=device)
    have = (transmitter.encoder.latent_ctx, transmitter.encoder.d_latent)
    if have != tuple(prior.latent_shape):
        raise ValueError(
            f"transmitter={s.transmitter!r} decodes latents {list(have)}, the prior makes {list(prior.latent_shape)}"
        )
    return prior, transmitter


def _evaluation_clip(s: GenerationEval, prior: LatentDiffusion, device: torch.device) -> tuple[Any, dict, bool]:
    """``(clip, its kwargs, whether it is the prior's own conditioning CLIP)``: the prior's own CLIP is refused unless
    ``allow_same_clip`` (then loudly warned about), random weights are warned about."""
    clip, clip_kwargs = build_eval_clip(s.eval_clip, device, seed=int(s.seed) + 1)
    if clip_kwargs.get("pretrained") is None:
        warnings.warn("the evaluation CLIP has random weights (eval_clip.pretrained=null): R-Precision is only a "
                      "pipeline check, not a quality measure", stacklevel=3)
    same = same_clip(clip_kwargs, dict(prior._clip.kwargs))
    if same and not s.allow_same_clip:
        raise ValueError(
            f"the evaluation CLIP {clip_kwargs.get('model_name')!r} ({clip_kwargs.get('pretrained')!r}) is the prior's "
            "conditioning CLIP: R-Precision with it is not comparable; pick another eval_clip (e.g. ViT-B-32 when the "
            "prior uses ViT-L/14) or set allow_same_clip=true to do it anyway"
        )
    if same:
        warnings.warn(
            "!!! R-Precision is computed with the prior's own conditioning CLIP (allow_same_clip=true): the numbers "
            "overstate quality and are not comparable to the literature !!!", stacklevel=3,
        )
    return clip, clip_kwargs, same


def _sample_and_render(s: GenerationEval, prior: LatentDiffusion, transmitter, prompts: list[str], cameras,
                       device: torch.device) -> tuple[Tensor, float, float]:
    """``(renders [P·n, V, R, R, 3] with prompt 0's n samples first, prior seconds, render seconds)``, after an
    untimed warm-up when ``s.warmup``."""
    n = int(s.n_per_prompt)
    generator = torch.Generator(device).manual_seed(int(s.seed))
    if s.warmup:  # kernels, CLIP build and allocator warm-up stay out of the timings
        warm = prior.sample(prompts=prompts[:1], n=1, steps=2, sampler=s.sampler, guidance_scale=s.guidance_scale,
                            generator=torch.Generator(device).manual_seed(0))
        _render(transmitter, warm, cameras[:1], s.head, int(s.grid_size))
    else:
        prior.clip  # noqa: B018  build the conditioning CLIP outside the timed region
    renders, sample_s, render_s = [], 0.0, 0.0
    for first in progress_bar(range(0, len(prompts), int(s.batch_prompts)), desc="evaluate generation",
                              unit="batch", leave=False):
        chunk = prompts[first : first + int(s.batch_prompts)]
        latents, seconds = timed_call(lambda: prior.sample(prompts=chunk, n=n, guidance_scale=s.guidance_scale,
                                                           steps=int(s.steps), sampler=s.sampler,
                                                           generator=generator), device)  # [p·n, n_ctx, d]
        sample_s += seconds
        images, seconds = timed_call(lambda: _render(transmitter, latents, cameras, s.head, int(s.grid_size)), device)
        render_s += seconds
        renders.append(images.cpu())  # [p·n, V, R, R, 3]
    return torch.cat(renders), sample_s, render_s


def _generation_report_settings(s: GenerationEval, prompts: list[str], prior: LatentDiffusion, clip_kwargs: dict,
                                device: torch.device) -> dict[str, Any]:
    """The ``settings`` block of the results: what was evaluated, with which CLIPs, cameras, sampler and seed."""
    clip_name = clip_kwargs.get("model_name") if "model_cfg" not in clip_kwargs else "custom architecture"
    conditioning_clip = dict(prior._clip.kwargs)
    return {
        "prompts": str(s.prompts) if isinstance(s.prompts, (str, os.PathLike)) else "inline list",
        "n_prompts": len(prompts),
        "n_per_prompt": int(s.n_per_prompt),
        "eval_clip": {"model": clip_name, "pretrained": clip_kwargs.get("pretrained"),
                      "model_cfg": clip_kwargs.get("model_cfg")},
        "conditioning_clip": {k: conditioning_clip.get(k) for k in ("model_name", "pretrained", "model_cfg")},
        "head": s.head,
        "cameras": f"{int(s.render_views)} turntable views at elevation {float(s.elevation_deg):g}°, distance 4, "
        f"fov {float(s.fov):g} rad",
        "resolution": int(s.render_resolution),
        "background": "black",
        "sampler": {"name": s.sampler, "steps": int(s.steps),
                    "guidance_scale": prior.guidance_scale if s.guidance_scale is None else s.guidance_scale},
        "seed": int(s.seed),
        "device": str(device),
        "timing": "wall clock, CUDA-synchronised, " + ("after an untimed warm-up" if s.warmup else "no warm-up"),
    }


def _generation_markdown(s: GenerationEval, row: dict, settings: dict, same: bool) -> str:
    """``results.md``: the table of the one row and notes on the prompt set, renders and sampler."""
    clip = settings["eval_clip"]
    table = markdown_table(
        ["prior", "CLIP R-Precision", "R-Precision (view-mean)", "prompts", "samples/prompt", "s/sample (prior)",
         "s/sample (render)", "eval CLIP"],
        [[row["label"], f"{100 * row['r_precision']:.1f} %", f"{100 * row['r_precision_view_mean']:.1f} %",
          settings["n_prompts"], settings["n_per_prompt"], f"{row['sample_seconds_per_sample']:.3f}",
          f"{row['render_seconds_per_sample']:.3f}", f"{clip['model']} ({clip['pretrained']})"]],
    )
    notes = [
        f"Prompt set: {settings['prompts']} ({settings['n_prompts']} prompts); each render retrieves among all of "
        "them; ties count as misses.",
        f"Renders: {s.head.upper()}, {settings['cameras']}, {int(s.render_resolution)}², black background, sRGB.",
        f"Sampler: {s.sampler}, {int(s.steps)} steps, guidance {settings['sampler']['guidance_scale']}; "
        f"device {settings['device']}; {settings['timing']}.",
    ]
    if same:
        notes.insert(0, "**WARNING: evaluated with the prior's own conditioning CLIP (allow_same_clip=true).**")
    return "## Generation evaluation (CLIP R-Precision)\n\n" + table + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"
