"""CUDA graphs for the sampler's fixed-shape denoiser calls.

A sampler calls the same denoise function ``(x_t, t) -> (x0, var | None)`` a hundred times with tensors of one shape
(64 Karras steps = 127 calls at batch 2 with guidance). At the released size one eager call launches hundreds of
small kernels (24 blocks), and on a fast GPU the launches, not the arithmetic, set the pace. :class:`CUDAGraphDenoiser`
runs the function a few times to warm up, captures one call into a :class:`torch.cuda.CUDAGraph`, and from then on
copies the inputs into the captured buffers and replays the graph: the same kernels on the same data, launched in one
go.

What a captured function must not do (the denoise functions of :class:`~shapee.models.LatentDiffusion` do none of it):
synchronise with the host (``.item()``, ``nonzero``, printing a tensor), draw random numbers, or depend on Python
state that changes between calls. Tensors the function closes over (the conditioning) are read where they are when
the graph was captured, so they must stay alive and unchanged while it is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

DenoiseFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor | None]"]


class CUDAGraphDenoiser:
    """Wrap ``fn(x_t, t) -> (x0, var | None)`` so that CUDA calls replay a captured graph (one per input shape).

    CPU tensors pass straight to ``fn``. Outputs are fresh tensors (copies of the graph's static outputs), so callers
    may keep them across calls. If capturing fails (an operation that cannot be captured), the wrapper warns once and
    calls ``fn`` eagerly from then on: slower, never wrong.

    Attributes:
        calls: calls so far (graphed or not); ``replays``: calls answered by a graph replay.
    """

    def __init__(self, fn: DenoiseFn, *, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (cuBLAS and the allocator set up outside the capture), got {warmup}")
        self.fn = fn
        self.warmup = warmup
        self.calls = 0
        self.replays = 0
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple]] = {}
        self._failed = False

    def __call__(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        self.calls += 1
        if not x_t.is_cuda or self._failed:
            return self.fn(x_t, t)
        key = (x_t.shape, x_t.dtype, x_t.device, t.shape, t.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(x_t, t)
            except Exception as exc:  # an uncapturable op: fall back to eager calls, loudly
                self._failed = True
                warnings.warn(f"CUDA graph capture of the denoiser failed ({type(exc).__name__}: {exc}); sampling "
                              "continues without graphs", RuntimeWarning, stacklevel=2)
                return self.fn(x_t, t)
            self._graphs[key] = entry
        graph, static_x, static_t, static_out = entry
        static_x.copy_(x_t)
        static_t.copy_(t.to(static_t.device))
        graph.replay()
        self.replays += 1
        return tuple(None if o is None else o.clone() for o in static_out)  # type: ignore[return-value]

    def _capture(self, x_t: Tensor, t: Tensor):
        static_x = x_t.clone()
        static_t = t.to(x_t.device).clone()
        side = torch.cuda.Stream(device=x_t.device)
        side.wait_stream(torch.cuda.current_stream(x_t.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
            for _ in range(self.warmup):
                self.fn(static_x, static_t)
        torch.cuda.current_stream(x_t.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(static_x, static_t)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError(f"a denoise function must return (x0, var | None), got {type(out).__name__}")
        return graph, static_x, static_t, out


def maybe_cuda_graphed(fn: DenoiseFn, device: torch.device, enabled: bool | None) -> DenoiseFn:
    """``fn`` wrapped in :class:`CUDAGraphDenoiser` when ``enabled`` (``None``: when ``device`` is CUDA), else ``fn``."""
    if enabled is None:
        enabled = torch.device(device).type == "cuda"
    if enabled and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, the model is on {device}")
    return CUDAGraphDenoiser(fn) if enabled else fn
