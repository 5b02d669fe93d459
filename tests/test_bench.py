"""The benchmark harness (scripts/bench.py, shapee.benchmarks): timing, FLOP counting, MFU peaks, the suite's
failure isolation, and the training / prompt → mesh benchmarks on tiny models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shapee.benchmarks import common, suite
from shapee.benchmarks.pipeline import bench_prompt_to_mesh, format_prompt_to_mesh
from shapee.benchmarks.training import bench_training, format_training_table
from shapee.conditioning.clip import TINY_CLIP_CFG

REPO = Path(__file__).resolve().parents[1]
TINY_DENOISER = dict(d_latent=64, n_ctx=128, width=32, layers=2, heads=2, cond_dim=32)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756.0e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312.0e12),
    ("Some Future GPU", None),
])
def test_bf16_peak_longest_name_match(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert common.bf16_peak_flops(torch.device("cuda")) == peak
    assert common.bf16_peak_flops(torch.device("cpu")) is None


def test_flop_count_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    assert common.count_flops(lambda: layer(x)) == 2 * 8 * 64 * 32
    # backward: grad wrt input and wrt weight, one matmul each
    assert common.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 8 * 64 * 32


def test_flop_count_includes_attention_on_the_cpu():
    # torch's counter has no formula for the CPU attention kernel: without ours, attention counted as 0 FLOPs on CPU
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (5, 7, 7))
    products = 2 * 2 * 3 * 5 * 7 * 8  # one [5×8]·[8×7] (or [5×7]·[7×8]) product per batch and head
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    explicit = lambda: torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v  # noqa: E731
    assert common.count_flops(sdpa) == common.count_flops(explicit) == 2 * products
    assert common.count_flops(lambda: sdpa().sum().backward()) == (2 + 5) * products  # backward recomputes S


def test_op_count_tells_kernels_views_and_data_dependent_sizes():
    x = torch.randn(5)
    counts = common.count_ops(lambda: (x.view(5, 1) * 2).nonzero())
    assert counts == {"kernels": 2, "views": 1, "data_dependent": 1}  # mul and nonzero; view; nonzero


def test_timed_runs_warmup_then_repeats_and_rejects_bad_counts():
    calls = []
    times = common.timed(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats"):
        common.timed(lambda: None, torch.device("cpu"), repeats=0, warmup=0)


def test_suite_records_a_failing_benchmark_and_runs_the_rest(monkeypatch):
    def broken():
        raise RuntimeError("out of memory on purpose")

    monkeypatch.setattr(suite, "_plan", lambda device, quick: [("first", lambda: {"x": 1}), ("broken", broken),
                                                               ("last", lambda: {"y": 2})])
    out = suite.run_suite(device="cpu", log=lambda _: None)
    assert out["results"] == {"first": {"x": 1}, "last": {"y": 2}}
    assert list(out["failed"]) == ["broken"] and "out of memory on purpose" in out["failed"]["broken"]
    assert "broken: FAILED" in suite.format_suite(out)


def test_training_benchmark_of_the_tiny_prior():
    r = bench_training("prior", preset="tiny", batch_size=4, repeats=2, warmup=1, device="cpu")
    assert r["settings"]["precision"] == "fp32" and r["mfu"] is None  # no MFU on CPU
    assert r["samples_per_second"] == pytest.approx(4 / r["seconds_median"])
    assert r["flops_per_step"] > 0 and r["params"] > 0 and len(r["seconds"]) == 2
    assert "latents/s" in format_training_table([r])


def test_training_benchmark_of_the_tiny_encoder_distill_stage():
    r = bench_training("encoder", preset="tiny", stage="distill", batch_size=2, repeats=1, warmup=0, device="cpu")
    assert r["sample_kind"] == "assets" and r["settings"]["stage"] == "distill"
    assert r["flops_per_step"] > 0 and r["seconds_median"] > 0


def test_training_benchmark_rejects_unknown_presets():
    with pytest.raises(ValueError, match="preset"):
        bench_training("prior", preset="huge")


def test_prompt_to_mesh_counts_heun_calls_and_estimates_64_steps():
    r = bench_prompt_to_mesh(steps=2, grid_size=24, device="cpu", clip={"model_cfg": TINY_CLIP_CFG},
                             prior_overrides={"denoiser": TINY_DENOISER})
    assert r["denoiser_calls"] == 3  # Heun: 2·steps − 1
    assert r["total_seconds"] == pytest.approx(sum(r["seconds"].values()))
    est = r["estimated_64_steps"]
    assert est["sampling"] == pytest.approx(r["seconds_per_denoiser_call"] * 127)
    assert "estimated" in format_prompt_to_mesh(r)


def test_bench_cli_writes_json(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "train", "--model", "prior", "--batch-size", "2",
         "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "latents/s" in proc.stdout
    data = json.loads(out.read_text())
    assert data["train"][0]["settings"]["batch_size"] == 2
