"""CUDA graphs for the sampler: off on CPU (and an error if asked for there), the same latents as eager sampling on
CUDA, every call after the capture a replay, a graph per input shape, and a fallback when capture fails."""

from __future__ import annotations

import pytest
import torch

from shapee.conditioning import TINY_CLIP_CFG
from shapee.diffusion.cuda_graph import CUDAGraphDenoiser, maybe_cuda_graphed
from shapee.models import LatentDiffusion

TINY_CLIP = dict(model_cfg=TINY_CLIP_CFG, pretrained=None)


def tiny_prior(**kw) -> LatentDiffusion:
    prior = LatentDiffusion(cond_mode="text", denoiser=dict(d_latent=8, n_ctx=12, width=32, layers=2, heads=2,
                                                            cond_dim=32), clip=TINY_CLIP, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # output_proj starts at zero: give every weight a value so outputs depend on inputs
        for p in prior.denoiser.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return prior.eval()


def test_cpu_sampling_runs_eagerly_and_counts_calls():
    prior = tiny_prior()
    cond = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    out = prior.sample_from_cond(cond, steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 12, 8) and torch.isfinite(out).all()
    assert prior.sampling_stats == {"denoiser_calls": 5, "graph_replays": 0}  # Heun: 2·3 − 1 calls, none graphed
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        prior.sample_from_cond(cond, steps=2, cuda_graph=True)


def test_wrapper_passes_cpu_tensors_through_and_checks_arguments():
    seen = []

    def fn(x, t):
        seen.append(x.shape)
        return x * 2, None

    wrapped = CUDAGraphDenoiser(fn)
    x0, var = wrapped(torch.ones(2, 3), torch.zeros(2))
    assert torch.equal(x0, torch.full((2, 3), 2.0)) and var is None
    assert wrapped.calls == 1 and wrapped.replays == 0 and seen == [torch.Size([2, 3])]
    assert maybe_cuda_graphed(fn, torch.device("cpu"), None) is fn  # auto: off on CPU
    assert maybe_cuda_graphed(fn, torch.device("cpu"), False) is fn
    with pytest.raises(ValueError, match="warmup"):
        CUDAGraphDenoiser(fn, warmup=0)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_sampling_matches_eager_on_cuda(precision):
    prior = tiny_prior(precision=precision).cuda()
    cond = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1).cuda()
    runs = {}
    for graph in (False, True):
        runs[graph] = prior.sample_from_cond(cond, n=2, steps=6, guidance_scale=4.0, cuda_graph=graph,
                                             generator=torch.Generator("cuda").manual_seed(3))
        stats = prior.sampling_stats
        assert stats["denoiser_calls"] == 11
        assert stats["graph_replays"] == (11 if graph else 0)  # the first call captures, then replays too
    ref, got = runs[False], runs[True]
    assert got.shape == (4, 12, 8) and torch.isfinite(got).all()
    # Same kernels on the same inputs: equal up to reassociation inside cuBLAS (bf16 rounding amplifies it).
    tol = 1e-4 if precision == "fp32" else 3e-2
    assert (got - ref).abs().max().item() <= tol


@pytest.mark.gpu
def test_one_graph_per_shape_outputs_are_fresh_and_failed_capture_falls_back():
    lin = torch.nn.Linear(4, 4).cuda()

    def fn(x, t):
        return lin(x) + t[:, None], None

    wrapped = CUDAGraphDenoiser(fn)
    with torch.no_grad():
        a = wrapped(torch.ones(2, 4, device="cuda"), torch.zeros(2, device="cuda"))[0]
        b = wrapped(torch.zeros(2, 4, device="cuda"), torch.ones(2, device="cuda"))[0]
        c = wrapped(torch.ones(3, 4, device="cuda"), torch.zeros(3, device="cuda"))[0]  # a new shape: a new graph
        assert torch.allclose(a, lin(torch.ones(2, 4, device="cuda")))  # not overwritten by the second replay
        assert torch.allclose(b, lin(torch.zeros(2, 4, device="cuda")) + 1)
        assert c.shape == (3, 4) and len(wrapped._graphs) == 2 and wrapped.replays == 3

    def syncs(x, t):
        return x[x > 0], None  # boolean indexing synchronises: cannot be captured

    fallback = CUDAGraphDenoiser(syncs)
    x = torch.tensor([[1.0, -1.0]], device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDA graph capture"):
        out = fallback(x, torch.zeros(1, device="cuda"))[0]
    assert torch.equal(out, torch.tensor([1.0], device="cuda")) and fallback.replays == 0
