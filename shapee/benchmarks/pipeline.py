"""Prompt → mesh latency at the released sizes, split as ``sample.py`` spends it: CLIP, sampling, decoding.

* ``clip``: the frozen open_clip ViT-L/14 text tower embedding one prompt (random weights, ``pretrained=None``:
  the same architecture and cost as the OpenAI weights, which this machine may not have).
* ``sampling``: :meth:`shapee.models.LatentDiffusion.sample_from_cond` of the text300M-size prior (random weights):
  Karras/Heun with classifier-free guidance (the unconditional branch batched with the conditional one, so every
  denoiser call is at batch 2), ``steps`` steps = 2·steps − 1 denoiser calls. With ``steps`` below 64 (a CPU run
  in minutes) the 64-step time is also given, *estimated* from the measured seconds per denoiser call.
* ``decoding``: latent → coloured 128³ mesh of the release-size decoder, as :func:`shapee.benchmarks.stf
  .bench_latent_to_mesh` measures it (a sphere added to the random SDF gives a mesh of realistic size).
"""

from __future__ import annotations

import statistics
import time

import torch

from shapee.benchmarks.common import machine, resolve_device, sync
from shapee.benchmarks.stf import bench_latent_to_mesh
from shapee.models import LatentDiffusion
from shapee.render.grid import DEFAULT_GRID_SIZE

STEPS_OFFICIAL = 64


def bench_prompt_to_mesh(
    *,
    steps: int = 64,
    guidance_scale: float = 15.0,
    grid_size: int = DEFAULT_GRID_SIZE,
    prompt: str = "a red chair",
    clip: dict | None = None,
    precision: str = "auto",
    repeats: int = 1,
    warmup: int = 0,
    device: str | None = None,
    prior_overrides: dict | None = None,
    cuda_graph: bool | None = None,
) -> dict:
    """Median seconds of each part of prompt → mesh, their sum, and the 64-step estimate when ``steps < 64``.

    ``clip``: :class:`~shapee.conditioning.FrozenCLIP` kwargs (default ``ViT-L-14-quickgelu``, the OpenAI architecture, with random weights);
    ``prior_overrides``: other :class:`~shapee.models.LatentDiffusion` kwargs (e.g. a smaller ``denoiser``).
    ``cuda_graph``: the sampler's CUDA graphs (``None``: as ``sample.py``, on when the device is CUDA).
    """
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"steps and repeats must be >= 1 and warmup >= 0, got {steps}, {repeats}, {warmup}")
    dev = resolve_device(device)
    clip = {"model_name": "ViT-L-14-quickgelu", "pretrained": None, **(clip or {})}
    prior = LatentDiffusion(cond_mode="text", clip=clip,
                            precision=precision, **(prior_overrides or {})).to(dev).eval()
    sync(dev)
    t0 = time.perf_counter()
    prior.clip  # built lazily on first use: loading is not per-prompt latency
    sync(dev)
    load_s = time.perf_counter() - t0
    clip_s, sampling_s, calls_per_run = [], [], []
    for i in range(warmup + repeats):
        sync(dev)
        t0 = time.perf_counter()
        cond = prior.embed_prompts([prompt])  # [1, 768]
        sync(dev)
        t1 = time.perf_counter()
        prior.sample_from_cond(cond, n=1, guidance_scale=guidance_scale, steps=steps,
                               generator=torch.Generator(dev).manual_seed(0), cuda_graph=cuda_graph)
        sync(dev)
        t2 = time.perf_counter()
        if i >= warmup:
            clip_s.append(t1 - t0)
            sampling_s.append(t2 - t1)
            calls_per_run.append(prior.sampling_stats["denoiser_calls"])
            replays = prior.sampling_stats["graph_replays"]
    # One untimed decode first: the first call pays one-off costs (kernel setup, MC tables) that a session pays once.
    decode = bench_latent_to_mesh(grid_size, repeats=repeats, warmup=max(warmup, 1), device=str(dev))
    parts = {"clip": statistics.median(clip_s), "sampling": statistics.median(sampling_s),
             "decoding": decode["median"]["total"]}
    result = {
        "benchmark": "prompt_to_mesh",
        "machine": machine(dev),
        "settings": {"steps": steps, "sampler": "karras", "guidance_scale": guidance_scale, "grid_size": grid_size,
                     "clip_model": clip["model_name"] if not clip.get("model_cfg") else "custom", "precision": precision, "repeats": repeats, "warmup": warmup,
                     "denoiser_batch": 2 if guidance_scale != 1.0 else 1,
                     "cuda_graph": replays > 0},
        "seconds": parts,
        "clip_load_seconds": load_s,
        "total_seconds": sum(parts.values()),
        "denoiser_calls": calls_per_run[0],
        "seconds_per_denoiser_call": parts["sampling"] / calls_per_run[0],
        "decoding_steps": decode["median"],
    }
    if steps != STEPS_OFFICIAL:
        calls_64 = 2 * STEPS_OFFICIAL - 1  # Heun, Euler on the last step (shapee.diffusion.samplers.sample_karras)
        sampling_64 = result["seconds_per_denoiser_call"] * calls_64
        result["estimated_64_steps"] = {"sampling": sampling_64, "total": parts["clip"] + sampling_64 + parts["decoding"],
                                        "how": f"seconds per denoiser call × {calls_64} calls"}
    return result


def format_prompt_to_mesh(r: dict) -> str:
    s, p = r["settings"], r["seconds"]
    line = (f"prompt → mesh ({s['steps']} Karras steps, guidance {s['guidance_scale']:g}, {s['grid_size']}³, "
            f"{s['precision']}{', CUDA graph' if s.get('cuda_graph') else ''}): CLIP {p['clip']:.3f} s + sampling "
            f"{p['sampling']:.3f} s ({r['denoiser_calls']} denoiser calls at batch {s['denoiser_batch']}, "
            f"{r['seconds_per_denoiser_call'] * 1000:.1f} ms each) + decoding {p['decoding']:.3f} s = "
            f"{r['total_seconds']:.3f} s")
    if "estimated_64_steps" in r:
        e = r["estimated_64_steps"]
        line += f"\n  at 64 steps (estimated: {e['how']}): sampling {e['sampling']:.1f} s, total {e['total']:.1f} s"
    return line
