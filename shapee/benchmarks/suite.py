"""``python scripts/bench.py`` with no name: every benchmark, sized for the machine it runs on, one table.

On CPU the suite takes a few minutes: released-size models at batch 1–2 with few repeats, prompt → mesh with 2
sampler steps (the 64-step time estimated from seconds per denoiser call), training throughput of the tiny presets.
On CUDA: more repeats, 64 sampler steps, batch 4 encoder training and the released-size prior training with MFU.
Each benchmark runs on its own: one that fails is recorded (``failed``, with its error) and the rest still run.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

import torch

from shapee.benchmarks.common import machine, resolve_device
from shapee.benchmarks.denoiser import bench_denoiser, format_denoiser_table
from shapee.benchmarks.encoder import bench_encoder, bench_nerf, format_encoder_table
from shapee.benchmarks.marching_cubes import benchmark_marching_cubes
from shapee.benchmarks.pipeline import bench_prompt_to_mesh, format_prompt_to_mesh
from shapee.benchmarks.prepare import bench_prepare_data
from shapee.benchmarks.stf import bench_latent_to_mesh
from shapee.benchmarks.training import bench_training, format_training_table


def _plan(device: torch.device, quick: bool) -> list[tuple[str, Callable[[], dict]]]:
    gpu = device.type == "cuda"
    dev = str(device)
    reps = 1 if quick else (5 if gpu else 3)

    def denoiser() -> dict:
        return bench_denoiser(batch_size=2, repeats=reps, warmup=1, device=dev)

    plan = [
        ("prepare_data", lambda: bench_prepare_data(None, repeats=1 if quick else 3, warmup=1)),
        ("encoder", lambda: bench_encoder(batch_size=4 if gpu else 1, backward=gpu or not quick, repeats=reps if gpu else 1,
                                          warmup=1 if gpu else 0, device=dev)),
        ("nerf", lambda: bench_nerf(repeats=reps, warmup=1, device=dev)),
        ("marching_cubes", lambda: benchmark_marching_cubes(128, repeats=reps, device=dev)),
        ("latent_to_mesh", lambda: bench_latent_to_mesh(128, repeats=reps, warmup=1, device=dev)),
        ("denoiser", denoiser),
        ("prompt_to_mesh", lambda: bench_prompt_to_mesh(steps=64 if gpu else (1 if quick else 2), repeats=reps if gpu else 1,
                                                        warmup=1 if gpu else 0, device=dev)),
    ]
    if gpu:  # the eager 'before' numbers beside the CUDA-graph ones
        plan.insert(plan.index(("denoiser", denoiser)) + 1, ("denoiser_graph", lambda: bench_denoiser(
            batch_size=2, repeats=reps, warmup=1, device=dev, cuda_graph=True)))
        plan.append(("prompt_to_mesh_eager", lambda: bench_prompt_to_mesh(
            steps=64, repeats=reps, warmup=1, device=dev, cuda_graph=False)))
    preset = "official" if gpu else "tiny"
    for model in ("encoder", "prior"):
        plan.append((f"train_{model}", lambda model=model: bench_training(
            model, preset=preset, repeats=reps if gpu else 3, warmup=2 if gpu else 1, device=dev)))
    return plan


def run_suite(*, quick: bool = False, device: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every benchmark; returns ``{"machine", "quick", "results": {name: dict}, "failed": {name: error}}``."""
    dev = resolve_device(device)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name, fn in _plan(dev, quick):
        log(f"[bench] {name} …")
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"[bench] {name} FAILED: {failed[name]}\n{traceback.format_exc()}")
            continue
        log(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s")
    return {"machine": machine(dev), "quick": quick, "results": results, "failed": failed}


def format_nerf(r: dict) -> str:
    n = r["settings"]
    return (f"NeRF {n['n_coarse']}+{n['n_fine']} samples, released-size MLP, {n['precision']}: "
            f"{r['rays_per_second']:,.0f} rays/s, {r['seconds_per_64x64_view']:.2f} s per 64² view")


def format_suite(suite: dict) -> str:
    """One line (or a few) per benchmark: the numbers README quotes."""
    r = suite["results"]
    m = suite["machine"]
    lines = [f"machine: {m['name']} ({m['device']}, {m['threads']} torch threads, torch {m['torch']})"]
    if "prepare_data" in r:
        p = r["prepare_data"]
        lines.append(f"prepare_data: {p['mean']['total']:.2f} s/asset wall, {p['mean_cpu']['total']:.2f} CPU-s "
                     f"(dominant step {p['dominant']})")
    if "encoder" in r:
        lines.append(format_encoder_table(r["encoder"]))
    if "nerf" in r:
        lines.append(format_nerf(r["nerf"]))
    if "marching_cubes" in r:
        c = r["marching_cubes"]
        lines.append(f"marching cubes 128³ ({suite['machine']['device']}): ours {c['ours_s']:.3f} s vs scikit-image "
                     f"{c['skimage_s']:.3f} s (ratio {c['ratio']:.2f}×)")
    if "latent_to_mesh" in r:
        med = r["latent_to_mesh"]["median"]
        lines.append("latent → 128³ coloured mesh: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    for key in ("denoiser", "denoiser_graph"):
        if key in r:
            lines.append(format_denoiser_table(r[key]))
    for key in ("prompt_to_mesh", "prompt_to_mesh_eager"):
        if key in r:
            lines.append(format_prompt_to_mesh(r[key]))
    train = [r[k] for k in ("train_encoder", "train_prior") if k in r]
    if train:
        lines.append(format_training_table(train))
    for name, err in suite["failed"].items():
        lines.append(f"{name}: FAILED ({err})")
    return "\n".join(lines)
