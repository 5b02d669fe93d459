"""Benchmark of the latent diffusion Transformer at the released size: one denoiser forward (reference §5.1–5.2).

Defaults are the official text300M prior (width 1024, 24 layers, 16 heads, CLIP text conditioning [B, 768]) at batch 2
(one classifier-free-guidance pair); ``cond="image"`` gives image300M (8 heads, a [B, 256, 1024] CLIP patch grid).
Inputs are synthetic tensors of the real shapes: speed does not depend on the values. Timings: ``warmup`` untimed
runs (the first one also compiles under ``compile=True``), then the median of ``repeats``; CUDA timed with events after
a synchronise. The process's CPU seconds are reported too (on a shared machine they move less than wall time).
Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak resident set (``ru_maxrss``),
which includes everything the process touched before (the model's weights among it).
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch

from shapee.benchmarks.common import count_flops, timed
from shapee.models.denoiser import LatentDenoiser
from shapee.runtime import autocast_dtype, resolve_device, timed_call

IMAGE_DEFAULTS = {"heads": 8, "cond_dim": 1024}  # image300M: head dim 128, CLIP ViT-L/14 patch width (§8.3.11)


def _seconds(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    cpu0 = time.process_time()
    wall = timed_call(fn, device)[1]
    return wall, time.process_time() - cpu0


def _forward_flops(kwargs: dict, batch_size: int, cond_shape: torch.Size) -> int:
    """Model FLOPs of one forward (``torch.utils.flop_counter``: matmuls and attention, 2 per multiply-add), counted
    on the meta device: no memory, no arithmetic, about a second for text300M."""
    with torch.device("meta"):
        model = LatentDenoiser(**kwargs).eval()
        x_t = torch.empty(batch_size, model.n_ctx, model.d_latent)
        t = torch.zeros(batch_size, dtype=torch.long)
        c = torch.empty(cond_shape)
    with torch.no_grad():
        return count_flops(lambda: model(x_t, t, c))


def gemm_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, *, repeats: int = 5) -> dict:
    """This machine's measured rate for one ``[m, k] × [k, n]`` matrix product laid out as ``nn.Linear`` computes it
    (``x · Wᵀ``), in ``dtype``: the yardstick a forward made of such GEMMs can at best reach (a CPU has no datasheet
    peak that its BLAS attains; this is the attained one). Median of ``repeats`` after two warm-ups."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    seconds = statistics.median(timed(lambda: torch.mm(a, w.t()), device, repeats=repeats, warmup=2))
    return {"shape": [m, k, n], "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "tflops": 2 * m * k * n / seconds / 1e12}


def bench_denoiser(
    *,
    batch_size: int = 2,
    cond: str = "text",
    precision: str = "auto",
    device: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    compile: bool = False,
    cuda_graph: bool = False,
    **model_overrides,
) -> dict:
    """Parameters, forward seconds (median of ``repeats``), peak memory and FLOPs of one ``LatentDenoiser`` forward, and
    the forward's FLOP rate against this machine's measured rate for its largest GEMM (:func:`gemm_rate`).

    ``precision``: ``"auto"`` (bf16 autocast on a CUDA device that supports it, else fp32), ``"fp32"`` or ``"bf16"``
    (autocast; slower than fp32 on CPUs without AMX). ``compile=True`` wraps the model in :func:`torch.compile`
    (inductor; needs a C++ compiler on CPU); its compile time shows in ``first_call_seconds``, not in the median.
    ``cuda_graph=True`` (CUDA only) captures one forward into a CUDA graph after the warm-up and times its replays, as
    the sampler runs them (:mod:`shapee.diffusion.cuda_graph`). ``model_overrides`` go to
    :class:`~shapee.models.denoiser.LatentDenoiser` (e.g. ``layers=2`` for a quick run).
    Returns a JSON-ready dict.
    """
    if cond not in ("text", "image"):
        raise ValueError(f"cond must be 'text' or 'image', got {cond!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if cuda_graph and warmup < 1:
        raise ValueError("cuda_graph=True needs warmup >= 1 (the capture must follow an eager call)")
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    dev = resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {dev}")
    bf16 = autocast_dtype(precision, dev) == torch.bfloat16
    kwargs = {**(IMAGE_DEFAULTS if cond == "image" else {}), **model_overrides, "cond_mode": cond}
    model = LatentDenoiser(**kwargs).to(dev).eval()
    n_params = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(batch_size, model.n_ctx, model.d_latent, generator=g).to(dev)  # [B, n_ctx, d_latent]
    t = torch.randint(0, 1024, (batch_size,), generator=g).to(dev)  # [B]
    if cond == "text":
        c = torch.nn.functional.normalize(torch.randn(batch_size, model.cond_dim, generator=g), dim=-1).to(dev)  # [B, D]
    else:
        c = torch.randn(batch_size, model.cond_tokens, model.cond_dim, generator=g).to(dev)  # [B, 256, D]
    flops = _forward_flops(kwargs, batch_size, c.shape)
    gemm = gemm_rate(batch_size * model.n_ctx, model.width, 4 * model.width, dev,
                     torch.bfloat16 if bf16 else torch.float32)
    fn = torch.compile(model) if compile else model
    def forward():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            return fn(x_t, t, c)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    first = None
    for _ in range(warmup):
        s, _ = _seconds(forward, dev)
        first = s if first is None else first
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        forward = graph.replay
    times, cpu = zip(*[_seconds(forward, dev) for _ in range(repeats)])
    median = statistics.median(times)
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 1024**3, "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "process peak RSS (CPU, ru_maxrss)"
    return {
        "settings": {"batch_size": batch_size, "cond": cond, "precision": "bf16" if bf16 else "fp32", "compile": compile,
                     "cuda_graph": cuda_graph,
                     "repeats": repeats, "warmup": warmup, "model": {k: v for k, v in kwargs.items()}},
        "params": n_params,
        "seconds_median": median,
        "seconds": list(times),
        "cpu_seconds_median": statistics.median(cpu),  # all threads; ≈ threads × wall on an idle machine
        "first_call_seconds": first if first is not None else times[0],
        "peak_memory_gb": peak,
        "memory_kind": kind,
        "flops": flops,
        "achieved_tflops": flops / median / 1e12,
        "gemm_reference": gemm,
        # the forward's FLOPs at the measured rate of its own largest GEMM: what it takes if all of it ran that fast
        "gemm_floor_seconds": flops / (gemm["tflops"] * 1e12),
        "fraction_of_gemm_rate": flops / median / (gemm["tflops"] * 1e12),
        "machine": {"device": str(dev),
                    "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
    }


def format_denoiser_table(result: dict) -> str:
    """A short human-readable summary of :func:`bench_denoiser`'s result."""
    s, m = result["settings"], result["machine"]
    overrides = {k: v for k, v in s["model"].items() if k != "cond_mode"}
    return "\n".join([
        f"latent denoiser ({s['cond']} conditioning{', ' + str(overrides) if overrides else ''}), batch {s['batch_size']}, "
        f"{s['precision']}{', torch.compile' if s['compile'] else ''}{', CUDA graph' if s.get('cuda_graph') else ''} on {m['device']} ({m['threads']} threads, torch {m['torch']})",
        f"  parameters: {result['params'] / 1e6:.1f} M",
        f"  forward: {result['seconds_median']:.4f} s median of {len(result['seconds'])} "
        f"({', '.join(f'{x:.4f}' for x in result['seconds'])}), {result['cpu_seconds_median']:.2f} CPU-s; "
        f"first call {result['first_call_seconds']:.3f} s",
        f"  peak memory: {result['peak_memory_gb']:.2f} GB [{result['memory_kind']}]",
        *([_roofline_line(result)] if "flops" in result else []),
    ])


def _roofline_line(result: dict) -> str:
    g = result["gemm_reference"]
    m, k, n = g["shape"]
    return (f"  {result['flops'] / 1e9:.0f} GFLOP per forward at {result['achieved_tflops'] * 1e3:.0f} GFLOP/s = "
            f"{100 * result['fraction_of_gemm_rate']:.0f} % of this machine's {g['dtype']} GEMM rate "
            f"({g['tflops'] * 1e3:.0f} GFLOP/s on [{m}×{k}]·[{n}×{k}]ᵀ, at which its FLOPs take {result['gemm_floor_seconds']:.2f} s)")
