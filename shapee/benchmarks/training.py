"""Training throughput of both models, and model FLOP utilisation (MFU) on GPU.

One training step here is what :func:`shapee.train.train` does per micro-batch without data loading: the model's
``loss_dict`` under the loop's autocast (bf16 on capable CUDA, fp32 on CPU), :func:`~shapee.train.loop.weighted_total`,
backward, gradient clipping at 1.0 and an AdamW step. Models are built from the same Hydra presets the scripts use
(``train_encoder.yaml`` / ``train_diffusion.yaml``): ``preset="tiny"`` is ``experiment=tiny_nerf`` /
``experiment=tiny_prior``, ``preset="official"`` the released sizes. Batches are synthetic tensors of the dataset's
shapes (speed does not depend on the values).

MFU = FLOPs of one step (``torch.utils.flop_counter``: matmuls, convolutions, attention, forward + backward) ÷ step
time ÷ the device's dense bf16 peak (:data:`shapee.benchmarks.common.BF16_PEAK_FLOPS`). It is reported on GPU only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from shapee.benchmarks.common import (
    autocast_dtype,
    bf16_peak_flops,
    count_flops,
    machine,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    summary,
    timed,
)
from shapee.benchmarks.encoder import synthetic_batch
from shapee.cameras import random_cameras
from shapee.models import LatentDiffusion, Transmitter
from shapee.train.loop import compile_for_training, use_fused_adamw, weighted_total

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = {
    ("encoder", "tiny"): ("train_encoder", ["experiment=tiny_nerf"]),
    ("encoder", "official"): ("train_encoder", []),
    ("prior", "tiny"): ("train_diffusion", ["experiment=tiny_prior"]),
    ("prior", "official"): ("train_diffusion", []),
}
DEFAULT_BATCH = {("encoder", "tiny"): 8, ("encoder", "official"): 4, ("prior", "tiny"): 32, ("prior", "official"): 16}


def compose_model_config(model: str, preset: str, overrides: list[str] | None = None) -> dict:
    """The resolved ``model`` node of a script's config, e.g. ``("encoder", "tiny")`` → ``transmitter_tiny``."""
    if (model, preset) not in PRESETS:
        raise ValueError(f"model must be encoder|prior and preset tiny|official, got {model!r}, {preset!r}")
    name, base = PRESETS[(model, preset)]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[*base, *(overrides or [])])
    node = OmegaConf.to_container(cfg.model, resolve=True)
    node.pop("_target_", None)
    return node


def _encoder_batch(model, batch_size: int, n_targets: int, device: torch.device) -> dict:
    """Encoder inputs (:func:`shapee.benchmarks.encoder.synthetic_batch`) plus ``n_targets`` RGBA target views."""
    enc = model.encoder
    batch = synthetic_batch(batch_size, n_points=enc.n_points, n_views=enc.n_views, image_size=enc.image_size,
                            device=device)
    g = torch.Generator().manual_seed(1)
    H = enc.image_size
    cams = random_cameras(n_targets, resolution=H, generator=g)
    batch.update({
        "target_rgb": torch.rand(batch_size, n_targets, H, H, 3, generator=g).to(device),
        "target_alpha": (torch.rand(batch_size, n_targets, H, H, generator=g) > 0.5).float().to(device),
        "target_cameras": cams.to_matrix()[None].repeat(batch_size, 1, 1, 1).to(device),
        "target_fov": torch.full((batch_size,), cams.x_fov, device=device),
    })
    return batch


def _prior_batch(model, batch_size: int, device: torch.device) -> dict:
    """Latents in [-1, 1] and precomputed conditioning of the prior's shapes (text embedding or image grid)."""
    g = torch.Generator().manual_seed(1)
    latent = torch.rand(batch_size, *model.latent_shape, generator=g) * 2 - 1
    cond = torch.randn(batch_size, *model.cond_shape, generator=g)
    if model.cond_mode == "text":
        cond = torch.nn.functional.normalize(cond, dim=-1)
    return {"latent": latent.to(device), "cond": cond.to(device)}


def bench_training(
    model: str = "encoder",
    *,
    preset: str = "tiny",
    batch_size: int | None = None,
    stage: str = "nerf",
    n_targets: int = 6,
    precision: str = "auto",
    checkpoint: bool = False,
    repeats: int = 5,
    warmup: int = 2,
    device: str | None = None,
    overrides: list[str] | None = None,
    compile: bool = False,
    fused_optimizer: bool | None = None,
) -> dict:
    """Seconds per training step, samples per second, peak memory, FLOPs per step and (GPU) MFU.

    ``model``: ``encoder`` (a :class:`~shapee.models.Transmitter` at ``stage``; samples = assets) or ``prior``
    (a text :class:`~shapee.models.LatentDiffusion`; samples = latents). ``checkpoint``: activation checkpointing of
    the encoder / denoiser blocks. ``overrides``: extra Hydra overrides of the script's config. ``compile``:
    :func:`torch.compile` the encoder / denoiser (``Module.compile``: the weights keep their names).
    ``fused_optimizer``: AdamW's fused CUDA kernel (``None``: as the training loop, fused on CUDA).
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto|bf16|fp32, got {precision!r}")
    if (model, preset) not in PRESETS:
        raise ValueError(f"model must be encoder|prior and preset tiny|official, got {model!r}, {preset!r}")
    dev = resolve_device(device)
    batch_size = batch_size or DEFAULT_BATCH[(model, preset)]
    node = compose_model_config(model, preset, overrides)
    if model == "encoder":
        node["stage"] = stage
        node["encoder"] = {**node.get("encoder", {}), "checkpoint": checkpoint}
        net = Transmitter(**node).to(dev)
        batch = _encoder_batch(net, batch_size, n_targets, dev)
        if stage == "distill":
            g = torch.Generator().manual_seed(2)
            pts = torch.rand(batch_size, 4096, 3, generator=g) * 2 - 1
            batch.update({"sdf_points": pts.to(dev), "sdf": (0.5 - pts.norm(dim=-1)).to(dev)})
    else:
        node["denoiser"] = {**node.get("denoiser", {}), "checkpoint": checkpoint}
        net = LatentDiffusion(**node).to(dev)
        batch = _prior_batch(net, batch_size, dev)
    net.train()
    if compile:
        compile_for_training(net)  # what trainer.compile=true compiles
    bf16 = autocast_dtype(precision, dev) == torch.bfloat16
    params = [p for p in net.parameters() if p.requires_grad]
    fused = use_fused_adamw(dev) if fused_optimizer is None else bool(fused_optimizer)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = weighted_total(net.loss_dict(batch), {})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    rss0 = reset_peak_memory(dev)
    times = timed(step, dev, repeats=repeats, warmup=warmup)
    memory = peak_memory(dev, rss0)
    flops = count_flops(step)
    result = summary(times)
    seconds = result["seconds_median"]
    peak = bf16_peak_flops(dev) if bf16 else None
    return {
        "benchmark": f"train_{model}",
        "machine": machine(dev),
        "settings": {"model": model, "preset": preset, "stage": stage if model == "encoder" else None,
                     "batch_size": batch_size, "precision": "bf16" if bf16 else "fp32",
                     "activation_checkpointing": checkpoint, "compile": compile, "fused_optimizer": fused,
                     "repeats": repeats, "warmup": warmup},
        "params": sum(p.numel() for p in params),
        **result,
        "samples_per_second": batch_size / seconds,
        "sample_kind": "assets" if model == "encoder" else "latents",
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": None if peak is None else flops / seconds / peak,
        **memory,
    }


def format_training_table(results: list[dict]) -> str:
    lines = []
    for r in results:
        s = r["settings"]
        what = f"{s['model']} ({s['preset']}" + (f", stage {s['stage']}" if s["stage"] else "") + ")"
        what += ", torch.compile" if s.get("compile") else ""
        what += ", checkpointing" if s.get("activation_checkpointing") else ""
        mfu = f", MFU {r['mfu'] * 100:.1f}%" if r["mfu"] is not None else ""
        # CPU: the process peak only grows, so the growth during this benchmark is the informative number.
        mem = r["peak_growth_gb"] if "peak_growth_gb" in r else r["peak_memory_gb"]
        grew = " growth" if "peak_growth_gb" in r else ""
        lines.append(
            f"train {what}, batch {s['batch_size']}, {s['precision']}: {r['seconds_median']:.3f} s/step, "
            f"{r['samples_per_second']:.2f} {r['sample_kind']}/s, {r['achieved_tflops']:.3f} TFLOP/s{mfu}, "
            f"peak{grew} {mem:.2f} GB [{r['memory_kind']}]"
        )
    return "\n".join(lines)
