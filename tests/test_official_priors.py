"""The released priors' layout (text300M / image300M): exact keys at full size (meta device), strict loading of
synthetic tiny state dicts, numerics equal to the denoiser loaded directly, export round trip, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shapee.io
from _tiny_data import one_torch_thread
from shapee.conditioning import TINY_CLIP_CFG
from shapee.io import OfficialCheckpointError, load_official
from shapee.io.official import read_state_dict_tsv
from shapee.io.official_priors import official_prior_keys, save_official_prior
from shapee.models import LatentDenoiser, LatentDiffusion

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TSV = {"text300M": "text_cond_state_dict.tsv", "image300M": "image_cond_state_dict.tsv"}
TINY = {
    "text300M": dict(d_latent=8, n_ctx=12, width=16, layers=2, cond_dim=32),
    "image300M": dict(d_latent=8, n_ctx=12, width=16, layers=2, cond_dim=48, cond_tokens=16),
}
TINY_CLIP = dict(model_cfg=TINY_CLIP_CFG, pretrained=None)


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _tsv(name: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE / TSV[name]
    if not path.exists():
        pytest.skip(f"{path} not found")
    return read_state_dict_tsv(path)


def synthetic(name: str, seed: int = 0, **denoiser) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout at tiny sizes (what a released file looks like, shrunk)."""
    g = torch.Generator().manual_seed(seed)
    keys = official_prior_keys(name, denoiser={**TINY[name], **denoiser})
    return {k: torch.randn(shape, generator=g) * 0.3 for k, shape in keys.items()}


@pytest.mark.parametrize("name", ["text300M", "image300M"])
def test_full_size_layout_equals_the_reference_listing(name):
    assert official_prior_keys(name) == _tsv(name)


@pytest.mark.parametrize("preset, name", [("prior_text", "text300M"), ("prior_image", "image300M")])
def test_model_presets_are_the_released_sizes(preset, name):
    import yaml

    cfg = yaml.safe_load((CONFIGS / "model" / f"{preset}.yaml").read_text())
    cfg.pop("_target_")
    with torch.device("meta"):
        model = LatentDiffusion(**cfg)
    keys = {"wrapped." + k.removeprefix("denoiser."): tuple(v.shape) for k, v in model.state_dict().items()}
    assert keys == _tsv(name)
    heads = model.denoiser.backbone.resblocks[0].attn.heads
    assert heads == {"text300M": 16, "image300M": 8}[name]  # not visible in the weights (§8.3.11)


@pytest.mark.parametrize("name", ["text300M", "image300M"])
def test_full_size_load_on_meta_picks_the_released_head_count(name):
    state = {k: torch.empty(shape, device="meta") for k, shape in _tsv(name).items()}
    model = load_official(name, state, dtype=None, clip=TINY_CLIP)
    assert model.denoiser.backbone.resblocks[0].attn.heads == {"text300M": 16, "image300M": 8}[name]
    assert model.cond_mode == {"text300M": "text", "image300M": "image"}[name]
    assert model.guidance_scale == {"text300M": 15.0, "image300M": 3.0}[name]


@pytest.mark.parametrize("name", ["text300M", "image300M"])
def test_loaded_prior_computes_what_the_denoiser_loaded_directly_computes(name):
    state = synthetic(name)
    model = load_official(name, state, denoiser=dict(TINY[name], heads=2), clip=TINY_CLIP)
    mode = model.cond_mode
    direct = LatentDenoiser(cond_mode=mode, heads=2, **TINY[name]).eval()
    direct.load_state_dict({k.removeprefix("wrapped."): v for k, v in state.items()}, strict=True)
    x = torch.randn(3, 12, 8)
    t = torch.tensor([0, 400, 1023])
    cond = torch.randn(3, 32) if mode == "text" else torch.randn(3, 16, 48)
    out = model.denoiser(x, t, cond)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, direct(x, t, cond), atol=0, rtol=0)
    # And through the process's view of the network.
    x0, var = model.denoise_fn(cond)(x, t)
    assert torch.equal(x0, out[..., :8]) and torch.equal(var, out[..., 8:])


def test_loading_adopts_the_tensors_without_a_copy():
    state = synthetic("text300M")
    model = load_official("text300M", state, dtype=None, denoiser=dict(TINY["text300M"], heads=2), clip=TINY_CLIP)
    assert model.denoiser.pos_emb.data_ptr() == state["wrapped.pos_emb"].data_ptr()
    half = {k: v.half() for k, v in state.items()}
    cast = load_official("text300M", half, denoiser=dict(TINY["text300M"], heads=2), clip=TINY_CLIP)
    assert cast.denoiser.pos_emb.dtype == torch.float32  # default dtype=float32 casts


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_round_trips_bit_for_bit(tmp_path, suffix):
    state = synthetic("image300M", seed=3)
    model = load_official("image300M", state, denoiser=dict(TINY["image300M"], heads=2), clip=TINY_CLIP)
    path = save_official_prior(model, tmp_path / f"image_cond{suffix}")
    if suffix == ".pt":
        written = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        written = load_file(str(path))
    assert written.keys() == state.keys()
    assert all(torch.equal(written[k], v) for k, v in state.items())
    again = shapee.io.load_official("image300M", path, denoiser=dict(TINY["image300M"], heads=2), clip=TINY_CLIP)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_layout_errors_list_every_offending_key(tmp_path):
    tiny = dict(denoiser=dict(TINY["text300M"], heads=2), clip=TINY_CLIP)
    state = synthetic("text300M")
    broken = dict(state)
    del broken["wrapped.ln_post.bias"]
    broken["wrapped.extra.weight"] = torch.zeros(1)
    broken["wrapped.pos_emb"] = torch.zeros(12, 17)
    with pytest.raises(OfficialCheckpointError) as info:
        load_official("text300M", broken, **tiny)
    message = str(info.value)
    assert "text300M" in message
    assert "wrapped.ln_post.bias" in message and "wrapped.extra.weight" in message
    assert "wrapped.pos_emb: checkpoint (12, 17) vs model (12, 16)" in message
    # A text checkpoint is not an image prior (clip_embed differs).
    with pytest.raises(OfficialCheckpointError, match="wrapped.clip_embed"):
        load_official("image300M", state, denoiser=dict(TINY["image300M"], heads=2, cond_dim=32), clip=TINY_CLIP)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official("text300M", tmp_path / "nope.pt", **tiny)
    # A file with a pickled object (not a tensor) is refused by the weights-only reader, naming the file.
    evil = tmp_path / "evil.pt"
    torch.save({**state, "wrapped.extra": _Opaque()}, evil)
    with pytest.raises(OfficialCheckpointError, match=r"official text300M checkpoint .*evil\.pt.*weights-only"):
        load_official("text300M", evil, **tiny)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match=r"garbage\.pt.*cannot be read"):
        load_official("image300M", garbage, **tiny)
    with pytest.raises(ValueError, match="unknown official model 'text1B'"):
        load_official("text1B", state)
    with pytest.raises(ValueError, match="text300M is a text-conditional prior"):
        load_official("text300M", state, cond_mode="image", **tiny)


class _Opaque:
    """Not a tensor: weights-only loading refuses it."""
