"""What every benchmark shares: device choice, timing (warm-up, repeats, medians; CUDA events), memory, machine
description, model FLOP counting and the device's bf16 peak for model FLOP utilisation (MFU).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from shapee.runtime import autocast_dtype, resolve_device, sync, timed_call  # noqa: F401  (the policies' one home)

# Dense bf16 tensor-core peak of a device, FLOP/s, by a substring of ``torch.cuda.get_device_name`` (vendor data
# sheets, without sparsity). Longest match wins, so "H100 PCIe" is not read as "H100".
BF16_PEAK_FLOPS = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM5
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.0e12,
    "GH200": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "L4": 121.0e12,
    "A10G": 70.0e12,
}




def timed(fn: Callable[[], object], device: torch.device, *, repeats: int, warmup: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (:func:`shapee.runtime.timed_call`)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    return [timed_call(fn, device)[1] for _ in range(repeats)]


def summary(times: list[float]) -> dict:
    """``{"seconds_median", "seconds"}`` of a list of timings."""
    return {"seconds_median": statistics.median(times), "seconds": [round(t, 5) for t in times]}


def peak_rss_gb() -> float:
    """The process's peak resident set so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def reset_peak_memory(device: torch.device) -> float:
    """Start a peak-memory measurement; returns the CPU peak RSS so far (for :func:`peak_memory`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return peak_rss_gb()


def peak_memory(device: torch.device, rss_before_gb: float) -> dict:
    """Peak memory since :func:`reset_peak_memory`: CUDA max allocated, or the process's peak RSS on CPU (which only
    grows, so a CPU number includes everything the process held before)."""
    if device.type == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1024**3, "memory_kind": "cuda max allocated"}
    peak = peak_rss_gb()
    return {"peak_memory_gb": peak, "peak_growth_gb": max(0.0, peak - rss_before_gb),
            "memory_kind": "process peak RSS (CPU)"}


def machine(device: torch.device) -> dict:
    """Where a benchmark ran: device name, torch threads and version, platform."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "name": name, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "platform": platform.platform(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def bf16_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (FLOP/s) from :data:`BF16_PEAK_FLOPS`; ``None`` on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in BF16_PEAK_FLOPS if key in name]
    return BF16_PEAK_FLOPS[max(matches, key=len)] if matches else None


def _cpu_attention_forward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """S = Q·Kᵀ and O = P·V on shapes ``[B, H, S, d]``."""
    (b, h, s_q, d), s_k, d_v = q, k[-2], v[-1]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _cpu_attention_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    """The five products torch's counter gives the GPU kernels' backward: S recomputed, dP = dO·Vᵀ, dV = Pᵀ·dO,
    dQ = dS·K, dK = dSᵀ·Q."""
    (b, h, s_q, d), s_k, d_v = q, k[-2], v[-1]
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


# torch.utils.flop_counter knows the GPU attention kernels (flash, memory-efficient, cuDNN) but not the CPU one that
# F.scaled_dot_product_attention runs on a CPU; without these a CPU forward's attention FLOPs count as zero.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Model FLOPs of one call of ``fn`` (matmuls, convolutions, attention; forward and backward if ``fn`` runs
    it), counted by ``torch.utils.flop_counter`` as they run, 2 FLOPs per multiply-add. Under activation
    checkpointing the recomputed forward is counted too (hardware rather than model FLOPs): measure MFU without it."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    return int(counter.get_total_flops())


# Ops whose output size depends on the data: on a GPU each waits for the queued kernels (a host sync).
_DATA_DEPENDENT_OPS = ("nonzero", "unique", "masked_select", "_local_scalar_dense", "repeat_interleave")


def count_ops(fn: Callable[[], object]) -> dict[str, int]:
    """Tensor ops one call of ``fn`` dispatches (below autograd, after decompositions), by a ``TorchDispatchMode``.

    For small GPU work these, not the arithmetic, set the time: ``kernels`` counts the ops that compute (each one or
    more kernel launches on a GPU), ``views`` the ones that only reshape, ``data_dependent`` those whose output size
    depends on the values (each a host sync on a GPU; reads such as ``.tolist()`` are not dispatched, so not counted).
    """
    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.kernels = self.views = self.data_dependent = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns
            if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
                self.views += 1
            else:
                self.kernels += 1
            self.data_dependent += any(name in func.__name__ for name in _DATA_DEPENDENT_OPS)
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        fn()
    return {"kernels": counter.kernels, "views": counter.views, "data_dependent": counter.data_dependent}
