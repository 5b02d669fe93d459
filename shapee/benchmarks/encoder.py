"""Benchmarks of the transmitter at the released size: encoder forward / forward+backward and NeRF rendering.

Inputs are synthetic tensors of the real shapes (16,384 points, 20 views of 256², random cameras at distance 4):
speed and memory do not depend on the values. Timings: ``warmup`` untimed runs, then the median of ``repeats``;
CUDA timed with events after a synchronise. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the
growth of the process's peak resident set (``ru_maxrss``), which only counts memory beyond the previous peak, so
the measurements run from the smallest to the largest.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch

from shapee.benchmarks.common import autocast_dtype, resolve_device, timed
from shapee.cameras import random_cameras
from shapee.implicit import ChannelsParamsProj, NeRSTFMLP
from shapee.models import Transmitter
from shapee.render.nerf import BOTH_LEVELS, render_views


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def synthetic_batch(batch_size: int, *, n_points: int, n_views: int, image_size: int, device: torch.device) -> dict:
    """A batch with the encoder's input shapes (dataset contract); an opaque sphere-ish depth in every view."""
    g = torch.Generator().manual_seed(0)
    cams = random_cameras(n_views, resolution=image_size, generator=g)
    B, V, H = batch_size, n_views, image_size
    batch = {
        "points": torch.cat([torch.rand(B, n_points, 3, generator=g) * 2 - 1, torch.rand(B, n_points, 3, generator=g)], -1),
        "views": torch.rand(B, V, H, H, 3, generator=g),
        "view_alpha": (torch.rand(B, V, H, H, generator=g) > 0.3).float(),
        "view_depth": torch.rand(B, V, H, H, generator=g) + 3.0,
        "view_cameras": cams.to_matrix()[None].repeat(B, 1, 1, 1),
        "view_fov": torch.full((B,), cams.x_fov),
    }
    return {k: v.to(device) for k, v in batch.items()}


def bench_encoder(
    *,
    batch_size: int = 1,
    n_points: int = 16384,
    n_views: int = 20,
    image_size: int = 256,
    precision: str = "auto",
    checkpoint: bool = False,
    backward: bool = True,
    repeats: int = 3,
    warmup: int = 1,
    device: str | None = None,
    encoder_kwargs: dict | None = None,
) -> dict:
    """Parameters, forward and forward+backward seconds and peak memory of the encoder (released size by default)."""
    dev = resolve_device(device)
    dtype = autocast_dtype(precision, dev) if precision != "fp16" else None
    enc = dict(n_points=n_points, n_views=n_views, image_size=image_size, checkpoint=checkpoint, **(encoder_kwargs or {}))
    model = Transmitter(encoder=enc).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    batch = synthetic_batch(batch_size, n_points=n_points, n_views=n_views, image_size=image_size, device=dev)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)
    result = {
        "machine": {"device": str(dev), "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {"batch_size": batch_size, "n_points": n_points, "n_views": n_views, "image_size": image_size,
                     "precision": "bf16" if dtype is not None else "fp32", "activation_checkpointing": checkpoint,
                     "repeats": repeats, "warmup": warmup},
        "params": {"transmitter": n_params, "encoder": n_encoder},
    }

    def forward():
        with torch.no_grad(), autocast:
            return model.encode(batch)

    model.eval()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = _peak_rss_gb()
    times = timed(forward, dev, repeats=repeats, warmup=warmup)
    result["forward"] = {"seconds_median": statistics.median(times), "seconds": times,
                         "seconds_per_asset": statistics.median(times) / batch_size,
                         **_memory(dev, rss0, batch_size)}
    if backward:
        model.train()

        def forward_backward():
            model.zero_grad(set_to_none=True)
            with autocast:
                latent = model.encode(batch)
            latent.float().square().mean().backward()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        rss0 = _peak_rss_gb()
        times = timed(forward_backward, dev, repeats=repeats, warmup=warmup)
        result["forward_backward"] = {"seconds_median": statistics.median(times), "seconds": times,
                                      "seconds_per_asset": statistics.median(times) / batch_size,
                                      **_memory(dev, rss0, batch_size)}
    return result


def _memory(dev: torch.device, rss_before_gb: float, batch_size: int) -> dict:
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 1024**3
        return {"peak_memory_gb": peak, "peak_memory_gb_per_asset": peak / batch_size, "memory_kind": "cuda max allocated"}
    grown = max(_peak_rss_gb() - rss_before_gb, 0.0)
    return {"peak_memory_gb": _peak_rss_gb(), "peak_growth_gb": grown, "memory_kind": "process peak RSS (CPU)"}


def bench_nerf(
    *,
    n_assets: int = 1,
    resolution: int = 64,
    n_coarse: int = 64,
    n_fine: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    precision: str = "auto",
    device: str | None = None,
    shared_levels: bool = True,
    query_chunk: int | str | None = "auto",
    chunk_size: int = 4096,
    mlp_kwargs: dict | None = None,
) -> dict:
    """Seconds to NeRF-render one whole ``resolution``² view per asset with the released-size NeRSTF MLP.

    Each asset gets its own random latent and camera; :func:`shapee.render.nerf.render_views` renders every pixel
    of its view (n_coarse + n_fine samples per ray). ``shared_levels``: evaluate the coarse samples once for both
    heads (the MLP answers both levels from one forward), as the renderer allows; False re-queries them in the
    fine pass as the official code does (same image). ``query_chunk``/``chunk_size``: as in ``render_views``.
    Returns ``seconds_median`` (wall per render of all assets, the latent → MLP weights projection included),
    ``seconds_per_view`` (per asset's view; also as ``seconds_per_64x64_view`` when ``resolution`` = 64),
    ``rays_per_second`` and on CPU ``cpu_seconds_median`` (process CPU time per render, less sensitive to other
    processes than wall time).
    """
    dev = resolve_device(device)
    dtype = autocast_dtype(precision, dev) if precision != "fp16" else None
    with torch.random.fork_rng(devices=[]):  # seeded inits (the same field every run), caller's RNG untouched
        torch.manual_seed(0)
        mlp = NeRSTFMLP(**(mlp_kwargs or {})).to(dev).eval()
        proj = ChannelsParamsProj(param_shapes=mlp.meta_parameter_shapes()).to(dev).eval()
    rows = sum(r for r, _ in mlp.meta_parameter_shapes().values())
    g = torch.Generator(device="cpu").manual_seed(0)
    latent = (torch.rand(n_assets, rows, proj.d_latent, generator=g) * 2 - 1).to(dev)
    cams = random_cameras(n_assets, resolution=resolution, generator=g).to(dev)
    per_asset = [cams[i : i + 1] for i in range(n_assets)]  # one view of its own per asset
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)
    cpu_times: list[float] = []

    def render():
        c0 = time.process_time()
        with torch.no_grad(), autocast:
            params = proj(latent)

            def query(points, level):
                B, R, S, _ = points.shape
                out = mlp(params, points.reshape(B, R * S, 3))

                def heads(lv):
                    return out[f"density_{lv}"].reshape(B, R, S), out[f"nerf_rgb_{lv}"].reshape(B, R, S, 3)

                return {"coarse": heads("coarse"), "fine": heads("fine")} if level == BOTH_LEVELS else heads(level)

            images = render_views(query, per_asset, n_coarse=n_coarse, n_fine=n_fine, chunk_size=chunk_size,
                                  query_chunk=query_chunk, shared_levels=shared_levels,
                                  generator=torch.Generator(device=dev).manual_seed(1))
        cpu_times.append(time.process_time() - c0)
        return images

    times = timed(render, dev, repeats=repeats, warmup=warmup)
    median = statistics.median(times)
    rays = n_assets * resolution * resolution
    result = {
        "settings": {"n_assets": n_assets, "resolution": resolution, "rays_per_asset": resolution * resolution,
                     "n_coarse": n_coarse, "n_fine": n_fine, "shared_levels": shared_levels,
                     "query_chunk": query_chunk, "chunk_size": chunk_size,
                     "precision": "bf16" if dtype is not None else "fp32", "device": str(dev), "threads": torch.get_num_threads()},
        "seconds_median": median,
        "seconds": times,
        "rays_per_second": rays / median,
        "seconds_per_view": median / n_assets,
    }
    if resolution == 64:
        result["seconds_per_64x64_view"] = median / n_assets
    if dev.type == "cpu":
        result["cpu_seconds_median"] = statistics.median(cpu_times[warmup:])
    return result


def format_encoder_table(enc: dict, nerf: dict | None = None) -> str:
    s = enc["settings"]
    lines = [
        f"transmitter at {s['n_points']} points, {s['n_views']} views of {s['image_size']}², batch {s['batch_size']}, "
        f"{s['precision']}, checkpointing {s['activation_checkpointing']} on {enc['machine']['device']} "
        f"({enc['machine']['threads']} threads)",
        f"  parameters: transmitter {enc['params']['transmitter'] / 1e6:.1f} M, encoder {enc['params']['encoder'] / 1e6:.1f} M",
    ]
    for key, label in (("forward", "encoder forward"), ("forward_backward", "encoder forward+backward")):
        if key in enc:
            r = enc[key]
            mem = (f"peak {r['peak_memory_gb']:.2f} GB" + (f" (+{r['peak_growth_gb']:.2f} GB)" if "peak_growth_gb" in r else "")
                   + f" [{r['memory_kind']}]")
            lines.append(f"  {label}: {r['seconds_median']:.3f} s median ({r['seconds_per_asset']:.3f} s/asset), {mem}")
    if nerf is not None:
        n = nerf["settings"]
        lines.append(f"  NeRF {n['n_coarse']}+{n['n_fine']} samples: {nerf['rays_per_second']:,.0f} rays/s "
                     f"({nerf['seconds_per_64x64_view']:.2f} s per 64² view, {n['precision']})")
    return "\n".join(lines)
