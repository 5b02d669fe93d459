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
