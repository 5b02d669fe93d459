"""The diffusion process: schedule constants, q_sample, losses, samplers, guidance."""

import math

import numpy as np
import pytest
import torch

from shapee.diffusion import (
    GaussianDiffusion,
    guided_denoiser,
    karras_sigmas,
    sample_ancestral,
    sample_ddim,
    sample_karras,
    sigma_to_t,
)


@pytest.fixture(scope="module")
def process() -> GaussianDiffusion:
    return GaussianDiffusion.from_config("exp", 1024)


def test_exp_schedule_constants_match_the_reference(process):
    # Reference §5.3: constant β = 1 − e^(−12/1024); ᾱ₀ = 0.98835, σ₀ ≈ 0.1086; ᾱ₁₀₂₃ = 6.14e-6, σ ≈ 403.4.
    assert np.allclose(process.betas, 1 - math.exp(-12 / 1024), rtol=1e-12)
    assert process.alphas_cumprod[0] == pytest.approx(0.98835, abs=1e-5)
    assert process.sigmas[0] == pytest.approx(0.1086, abs=1e-4)
    assert process.alphas_cumprod[-1] == pytest.approx(6.14e-6, rel=1e-3)
    assert process.sigmas[-1] == pytest.approx(403.4, abs=0.1)


def test_cosine_schedule_is_monotone_and_ends_near_zero():
    p = GaussianDiffusion.from_config("cosine", 1024)
    assert (np.diff(p.alphas_cumprod) < 0).all()
    assert p.alphas_cumprod[-1] < 1e-4 and p.betas.max() <= 0.999
    with pytest.raises(ValueError, match="unknown noise schedule"):
        GaussianDiffusion.from_config("sigmoid")


def test_q_sample(process):
    x0 = torch.rand(4, 8, 8) * 2 - 1
    t0 = torch.zeros(4, dtype=torch.long)
    noise = torch.randn_like(x0)
    xt = process.q_sample(x0, t0, noise)
    torch.testing.assert_close(xt, math.sqrt(0.98835) * x0 + math.sqrt(1 - 0.98835) * noise, atol=1e-4, rtol=0)
    assert (process.q_sample(x0, t0) - x0).abs().mean() < 0.15  # t = 0: x_t ≈ x₀
    x_last = process.q_sample(x0.repeat(64, 1, 1), torch.full((256,), 1023))
    assert abs(x_last.mean().item()) < 0.02 and abs(x_last.std().item() - 1) < 0.02


def test_perfect_denoiser_has_zero_mse_and_zero_kl(process):
    x0 = torch.rand(6, 16) * 2 - 1
    t = torch.tensor([1, 5, 100, 500, 900, 1023])
    # v = −1 selects the posterior variance β̃_t: with the right x₀ the KL term vanishes exactly.
    losses = process.training_losses(lambda x_t, t_: (x0, -torch.ones_like(x0)), x0, t)
    assert torch.all(losses["mse"] == 0)
    torch.testing.assert_close(losses["vb"], torch.zeros(6), atol=1e-6, rtol=0)
    wrong = process.training_losses(lambda x_t, t_: (x0, torch.ones_like(x0)), x0, t)
    # With the constant-β exp schedule β̃_t → β_t as t grows, so the wrong variance only costs at small t.
    assert (wrong["vb"][:2] > 0).all()


def test_vb_term_trains_only_the_variance(process):
    x0 = torch.rand(3, 10) * 2 - 1
    pred = torch.zeros(3, 10, requires_grad=True)
    var = torch.zeros(3, 10, requires_grad=True)
    losses = process.training_losses(lambda x_t, t: (pred, var), x0, torch.tensor([0, 10, 700]))
    losses["vb"].sum().backward()
    assert pred.grad is None or torch.all(pred.grad == 0)
    assert var.grad.abs().sum() > 0


def test_karras_timesteps_match_the_released_bridge(process):
    sigmas = karras_sigmas(64, 1e-3, 160.0, 7.0)
    assert len(sigmas) == 65 and sigmas[0].item() == pytest.approx(160.0) and sigmas[-1] == 0
    t = sigma_to_t(process, sigmas[:-1]).long().tolist()
    assert t[:3] == [865, 849, 833]  # reference §5.4
    assert sum(v == 0 for v in t) == 15


def test_karras_heun_reaches_an_oracle_x0_and_is_seeded(process):
    target = torch.rand(2, 4, 3) * 2 - 1
    calls = []

    def oracle(x_t, t):
        calls.append(t)
        return target, None

    out = sample_karras(process, oracle, (2, 4, 3), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * 64 - 1  # Heun, Euler on the last step
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)

    def noisy_net(x_t, t):
        return torch.tanh(x_t * 0.5 + 0.01 * t.float().reshape(-1, 1, 1)), None

    a = sample_karras(process, noisy_net, (2, 4, 3), steps=8, s_churn=1.0, generator=torch.Generator().manual_seed(7))
    b = sample_karras(process, noisy_net, (2, 4, 3), steps=8, s_churn=1.0, generator=torch.Generator().manual_seed(7))
    c = sample_karras(process, noisy_net, (2, 4, 3), steps=8, s_churn=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ancestral])
def test_ddim_and_ancestral_reach_an_oracle_x0(process, sampler):
    target = torch.rand(3, 5) * 2 - 1
    out = sampler(process, lambda x, t: (target, -torch.ones_like(x)), (3, 5), steps=16,
                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_respacing_keeps_alpha_bar(process):
    r = process.respaced(16)
    np.testing.assert_allclose(r.alphas_cumprod, process.alphas_cumprod[r.timestep_map], rtol=1e-12)
    assert r.timestep_map[0] == 0 and r.timestep_map[-1] == 1023


def test_guided_batch_equals_separate_passes():
    weight = torch.randn(4, 4)

    def model(x_t, t, cond):  # a conditional "network" whose output depends on x, t and cond
        return torch.tanh(x_t @ weight + cond[:, None, :] + 0.001 * t.float()[:, None, None]), x_t * 0

    x = torch.randn(3, 5, 4)
    t = torch.tensor([3, 500, 1000])
    cond = torch.randn(3, 4)
    s = 3.0
    x0, _ = guided_denoiser(model, cond, s)(x, t)
    x0_c, _ = model(x, t, cond)
    x0_u, _ = model(x, t, torch.zeros_like(cond))
    expected = x0_u.clamp(-1, 1) + s * (x0_c.clamp(-1, 1) - x0_u.clamp(-1, 1))
    torch.testing.assert_close(x0, expected, atol=1e-6, rtol=0)
    x1, _ = guided_denoiser(model, cond, 1.0)(x, t)
    torch.testing.assert_close(x1, x0_c.clamp(-1, 1))
