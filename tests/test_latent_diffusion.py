"""LatentDiffusion: training losses and conditioning, frozen CLIP outside the state dict, sampling + CFG wiring,
input errors, snapshots, and the prior configs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import shapee.io
from _tiny_data import one_torch_thread
from shapee.conditioning import TINY_CLIP_CFG
from shapee.diffusion import sample_karras
from shapee.models import LatentDiffusion

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_CLIP = dict(model_cfg=TINY_CLIP_CFG, pretrained=None)  # text width 32; image grid 16 tokens × 48
N_CTX, D_LATENT = 12, 8


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def tiny(cond_mode: str = "text", **kw) -> LatentDiffusion:
    denoiser = dict(d_latent=D_LATENT, n_ctx=N_CTX, width=16, layers=2, heads=2)
    denoiser.update(dict(cond_dim=32) if cond_mode == "text" else dict(cond_dim=48, cond_tokens=16))
    denoiser.update(kw.pop("denoiser", {}))
    return LatentDiffusion(cond_mode=cond_mode, denoiser=denoiser, clip=kw.pop("clip", TINY_CLIP), **kw)


def randomise(model: LatentDiffusion, seed: int = 0) -> LatentDiffusion:
    # output_proj is zero-initialised: give every weight a value so outputs depend on inputs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def latents(b: int) -> torch.Tensor:
    return torch.tanh(torch.randn(b, N_CTX, D_LATENT))


# ------------------------------------------------------------------------------------------------- training
def test_loss_dict_finite_grads_reach_denoiser_and_clip_is_frozen_and_not_in_state_dict():
    model = tiny("text")
    out = model.loss_dict({"latent": latents(3), "captions": [["a red cube", "a cube"], ["a blue ball"], ["a cone"]]})
    assert {"mse", "vb"} <= set(out) and all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    (out["mse"] + out["vb"]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["denoiser.output_proj.weight"].abs().sum() > 0
    # The frozen CLIP was built and used, but is neither a parameter nor in the state dict.
    clip = model.clip
    assert all(not p.requires_grad and p.grad is None for p in clip.parameters())
    assert all(k.startswith("denoiser.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.denoiser.parameters())


def test_captions_one_per_asset_and_missing_captions_train_unconditionally():
    model = tiny("text")
    batch = {"latent": latents(3), "captions": [[], ["a red cube"], ["", "  "]]}
    cond = model.conditioning(batch)
    assert cond.shape == (3, 32)
    assert torch.equal(cond[0], torch.zeros(32)) and torch.equal(cond[2], torch.zeros(32))
    torch.testing.assert_close(cond[1], model.clip.embed_text(["a red cube"])[0])
    assert model.empty_caption_count == 2
    out = model.loss_dict(batch)
    assert model.empty_caption_count == 4
    assert out["metric/uncond_frac"].item() == pytest.approx(2 / 3)
    # Each asset's caption is drawn from its own list.
    many = {"latent": latents(1), "captions": [["a red cube", "a green cone"]]}
    seen = {tuple(model.conditioning(many)[0].tolist()) for _ in range(20)}
    assert len(seen) == 2


def test_precomputed_cond_is_used_and_shapes_are_checked():
    model = tiny("text")
    cond = torch.randn(2, 32)
    assert torch.equal(model.conditioning({"latent": latents(2), "cond": cond}), cond)
    with pytest.raises(ValueError, match=r"conditioning must be \[2, 32\]"):
        model.conditioning({"latent": latents(2), "cond": torch.randn(2, 31)})
    with pytest.raises(ValueError, match=r"batch\['latent'\] must be \[B, 12, 8\]"):
        model.loss_dict({"latent": torch.zeros(2, 12, 9), "cond": cond})
    with pytest.raises(KeyError, match="captions"):
        model.loss_dict({"latent": latents(2)})


def test_quartile_metrics_match_per_sample_losses_and_skip_empty_quartiles():
    model = tiny("text")
    seen = {}
    real = model.process.training_losses

    def spy(denoise, x0, t, noise=None):
        seen["t"], seen["terms"] = t, real(denoise, x0, t, noise)
        return seen["terms"]

    model.process.training_losses = spy
    out = model.loss_dict({"latent": latents(64), "cond": torch.randn(64, 32)})
    quartile = seen["t"] * 4 // 1024
    for q in range(4):
        mask = quartile == q
        assert mask.any(), "64 uniform draws leave no quartile empty (p ≈ 4·0.75⁶⁴)"
        torch.testing.assert_close(out[f"metric/mse_q{q + 1}"], seen["terms"]["mse"][mask].mean())
    torch.testing.assert_close(out["mse"], seen["terms"]["mse"].mean())
    torch.testing.assert_close(out["vb"], seen["terms"]["vb"].mean())
    one = model.loss_dict({"latent": latents(1), "cond": torch.randn(1, 32)})
    q_keys = [k for k in one if k.startswith("metric/mse_q")]
    assert q_keys == [f"metric/mse_q{int(seen['t'][0]) * 4 // 1024 + 1}"]
    assert all(torch.isfinite(v) for v in one.values())


def test_image_conditioning_from_stored_grid_or_image():
    model = tiny("image")
    grid = torch.randn(2, 16, 48)
    assert torch.equal(model.conditioning({"latent": latents(2), "clip_grid": grid}), grid)
    images = torch.rand(2, 40, 40, 3)
    cond = model.conditioning({"latent": latents(2), "cond_image": images})
    torch.testing.assert_close(cond, model.clip.embed_image_grid(images))
    out = model.loss_dict({"latent": latents(2), "cond_image": images})
    assert torch.isfinite(out["mse"]) and "metric/uncond_frac" not in out
    with pytest.raises(KeyError, match="clip_grid"):
        model.loss_dict({"latent": latents(2), "captions": [["a"], ["b"]]})


def test_clip_width_that_does_not_fit_the_denoiser_is_a_clear_error():
    model = tiny("text", denoiser=dict(cond_dim=24))
    with pytest.raises(ValueError, match=r"CLIP .* \[32\] but the denoiser expects \[24\]"):
        model.sample(prompts=["a cube"], steps=2)


def test_config_mismatch_errors():
    with pytest.raises(ValueError, match="cond_mode"):
        LatentDiffusion(cond_mode="audio")
    with pytest.raises(ValueError, match="learn_sigma"):
        tiny("text", diffusion=dict(learned_variance=False))


# ------------------------------------------------------------------------------------------------- sampling
def test_sample_is_deterministic_under_a_seeded_generator():
    model = randomise(tiny("text"))
    a = model.sample(prompts=["a red cube", "a ball"], n=2, steps=3, generator=torch.Generator().manual_seed(1))
    b = model.sample(prompts=["a red cube", "a ball"], n=2, steps=3, generator=torch.Generator().manual_seed(1))
    c = model.sample(prompts=["a red cube", "a ball"], n=2, steps=3, generator=torch.Generator().manual_seed(2))
    assert a.shape == (4, N_CTX, D_LATENT)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() > 0 and model.training  # sample() restores the training flag


def test_sample_guides_with_batched_branches_equal_to_separate_passes():
    model = randomise(tiny("text")).eval()
    prompts, scale = ["a red cube", "a green cone"], 4.0
    got = model.sample(prompts=prompts, steps=3, guidance_scale=scale, generator=torch.Generator().manual_seed(0))
    cond = model.embed_prompts(prompts)

    def separate(x_t, t):  # conditional and unconditional passes run one after the other
        x0_c, var = model.denoiser.split_output(model.denoiser(x_t, t, cond))
        x0_u, _ = model.denoiser.split_output(model.denoiser(x_t, t, torch.zeros_like(cond)))
        x0_c, x0_u = x0_c.clamp(-1, 1), x0_u.clamp(-1, 1)
        return x0_u + scale * (x0_c - x0_u), var

    want = sample_karras(model.process, separate, got.shape, steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # batched vs separate matmuls: float noise only
    unguided = model.sample(prompts=prompts, steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(got, unguided)
    assert model.guidance_scale == 15.0 and tiny("image").guidance_scale == 3.0


def test_sample_with_ddim_and_ancestral_and_from_precomputed_cond():
    model = randomise(tiny("image"))
    grids = torch.randn(2, 16, 48)
    for sampler in ("ddim", "ancestral"):
        x = model.sample_from_cond(grids, n=1, steps=3, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, N_CTX, D_LATENT) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="s_churn"):
        model.sample_from_cond(grids, steps=2, sampler="ddim", s_churn=1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.sample_from_cond(grids, steps=2, sampler="euler")
    with pytest.raises(ValueError, match=r"cond must be \[P, 16, 48\]"):
        model.sample_from_cond(torch.randn(2, 48), steps=2)


def test_sample_accepts_image_paths_pil_arrays_and_tensors(tmp_path):
    from PIL import Image

    model = randomise(tiny("image"))
    array = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    path = tmp_path / "view.png"
    Image.fromarray(array).save(path)
    kinds = [str(path), Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1).float() / 255]
    grids = model.embed_images(kinds)
    assert grids.shape == (4, 16, 48)
    # The same pixels give the same grid whichever form they come in.
    for i in (1, 2, 3):
        torch.testing.assert_close(grids[i], grids[0], atol=1e-4, rtol=1e-4)
    x = model.sample(images=kinds[:2], n=2, steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, N_CTX, D_LATENT)


def test_bad_sample_inputs_raise_errors_that_name_them(tmp_path):
    text, image = tiny("text"), tiny("image")
    with pytest.raises(ValueError, match="exactly one of prompts"):
        text.sample(steps=2)
    with pytest.raises(ValueError, match="exactly one of prompts"):
        text.sample(prompts=["a"], images=[np.zeros((8, 8, 3))], steps=2)
    with pytest.raises(ValueError, match=r"prompts\[1\] = '  ' is empty"):
        text.sample(prompts=["a cube", "  "], steps=2)
    with pytest.raises(ValueError, match="prompts is empty"):
        text.sample(prompts=[], steps=2)
    with pytest.raises(ValueError, match="image-conditional prior: pass images="):
        image.sample(prompts=["a cube"], steps=2)
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=r"images\[0\].*nope\.png"):
        image.sample(images=[str(missing)], steps=2)
    with pytest.raises(ValueError, match="positive integer"):
        text.sample(prompts=["a cube"], n=0, steps=2)


# ------------------------------------------------------------------------------------------- snapshots, copies
def test_snapshot_round_trip_rebuilds_the_prior_without_clip_weights(tmp_path):
    model = randomise(tiny("text"))
    config = {"_target_": "shapee.models.LatentDiffusion", "cond_mode": "text",
              "denoiser": dict(d_latent=D_LATENT, n_ctx=N_CTX, width=16, layers=2, heads=2, cond_dim=32),
              "clip": TINY_CLIP}
    shapee.io.save(tmp_path / "prior.pt", model, config)
    loaded = shapee.io.load(tmp_path / "prior.pt")
    assert isinstance(loaded, LatentDiffusion) and not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # The random-weight tiny CLIP is seeded: a rebuilt prior conditions exactly as the saved one did.
    torch.testing.assert_close(loaded.embed_prompts(["a cube"]), model.embed_prompts(["a cube"]))


def test_deep_copies_share_the_one_frozen_clip():
    model = tiny("text")
    clip = model.clip
    ema = copy.deepcopy(model)
    assert ema.clip is clip
    assert [k for k in ema.state_dict()] == [k for k in model.state_dict()]


# ------------------------------------------------------------------------------------------------- configs
def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train_diffusion", overrides=["data.root=/tmp/latents", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "overrides, mode, size",
    [
        ([], "text", 1024),
        (["cond=image"], "image", 1024),
        (["experiment=tiny_prior"], "text", 32),
        (["experiment=tiny_prior", "cond=image"], "image", 32),
        (["experiment=tiny_prior_image"], "image", 32),
    ],
)
def test_cond_picks_the_model_preset(overrides, mode, size):
    cfg = _compose(overrides)
    assert cfg["cond"]["mode"] == cfg["model"]["cond_mode"] == mode
    assert cfg["model"]["denoiser"]["width"] == size
    assert cfg["run_dir"].endswith(mode)
    if size == 32:
        assert cfg["model"]["clip"]["model_cfg"] == TINY_CLIP_CFG and cfg["model"]["clip"]["pretrained"] is None
        assert cfg["trainer"]["max_steps"] <= 10
        model = LatentDiffusion(**{k: v for k, v in cfg["model"].items() if k != "_target_"})
        assert model.latent_shape == (128, 64)  # the tiny transmitter's latent
        model.clip  # builds and checks the CLIP widths against the denoiser
    else:
        assert cfg["model"]["denoiser"]["heads"] == {"text": 16, "image": 8}[mode]
        assert cfg["model"]["guidance_scale"] == {"text": 15.0, "image": 3.0}[mode]
