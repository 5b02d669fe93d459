"""shapee.benchmarks.denoiser at a tiny size: the result's contents and the input checks."""

import json

import pytest
import torch

from shapee.benchmarks.denoiser import bench_denoiser, format_denoiser_table
from shapee.models.denoiser import LatentDenoiser

TINY = dict(d_latent=8, n_ctx=6, width=16, layers=2, heads=2, cond_tokens=3)


@pytest.mark.parametrize("cond", ["text", "image"])
def test_bench_denoiser_reports_settings_params_times_memory(cond):
    r = bench_denoiser(batch_size=3, cond=cond, device="cpu", repeats=3, warmup=1, **TINY, cond_dim=12)
    json.dumps(r)  # JSON-ready
    expected = LatentDenoiser(cond_mode=cond, **TINY, cond_dim=12)
    assert r["params"] == sum(p.numel() for p in expected.parameters())
    assert r["settings"]["batch_size"] == 3 and r["settings"]["cond"] == cond and r["settings"]["precision"] == "fp32"
    assert r["settings"]["model"]["heads"] == 2  # overrides win over the image preset's 8 heads
    assert len(r["seconds"]) == 3 and r["seconds_median"] == sorted(r["seconds"])[1] and min(r["seconds"]) > 0
    assert r["cpu_seconds_median"] >= 0 and r["first_call_seconds"] > 0
    assert r["peak_memory_gb"] > 0 and "RSS" in r["memory_kind"]
    assert r["machine"] == {**r["machine"], "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}
    table = format_denoiser_table(r)
    assert "batch 3" in table and f"{r['seconds_median']:.4f} s median" in table and "parameters" in table


def test_bench_denoiser_image_preset_and_bad_arguments():
    r = bench_denoiser(cond="image", device="cpu", repeats=1, warmup=0, d_latent=8, n_ctx=6, width=16, layers=1, cond_tokens=2)
    assert r["settings"]["model"]["heads"] == 8 and r["settings"]["model"]["cond_dim"] == 1024  # image300M preset
    with pytest.raises(ValueError, match="cond must be"):
        bench_denoiser(cond="audio", device="cpu", **TINY)
    with pytest.raises(ValueError, match="precision must be"):
        bench_denoiser(precision="fp8", device="cpu", **TINY)
    with pytest.raises(ValueError, match="repeats >= 1"):
        bench_denoiser(repeats=0, device="cpu", **TINY)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        bench_denoiser(cuda_graph=True, device="cpu", **TINY)


def test_bench_denoiser_counts_the_forwards_flops_and_compares_them_with_a_measured_gemm_rate():
    from shapee.benchmarks.common import count_flops
    from shapee.benchmarks.denoiser import gemm_rate

    r = bench_denoiser(batch_size=2, device="cpu", repeats=1, warmup=0, **TINY, cond_dim=12)
    # counted on the meta device = counted on a real forward (autograd on: the plain, non-in-place path)
    model = LatentDenoiser(cond_mode="text", **TINY, cond_dim=12)
    x_t, t, c = torch.randn(2, 6, 8), torch.tensor([3, 700]), torch.randn(2, 12)
    assert r["flops"] == count_flops(lambda: model(x_t, t, c))
    # backbone GEMMs alone (2 layers, 8 tokens = 6 latents + time + CLIP, 12·W² weights per layer): a lower bound
    assert r["flops"] > 2 * 2 * 8 * 12 * 16 * 16 * 2
    assert r["achieved_tflops"] == pytest.approx(r["flops"] / r["seconds_median"] / 1e12)
    g = r["gemm_reference"]
    assert g["shape"] == [2 * 6, 16, 64] and g["dtype"] == "float32"
    assert r["gemm_floor_seconds"] == pytest.approx(r["flops"] / (g["tflops"] * 1e12))
    assert r["fraction_of_gemm_rate"] == pytest.approx(r["gemm_floor_seconds"] / r["seconds_median"])
    assert "GFLOP per forward" in format_denoiser_table(r)
    big = gemm_rate(256, 128, 512, torch.device("cpu"), torch.float32, repeats=3)
    assert big["tflops"] == pytest.approx(2 * 256 * 128 * 512 / big["seconds"] / 1e12) and big["seconds"] > 0
