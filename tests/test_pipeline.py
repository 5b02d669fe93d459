"""shapee.pipeline (TextTo3D / ImageTo3D) on tiny in-process models, and shapee.io.download without the network.

The "box" decoder is a tiny random transmitter whose SDF and density output biases are set high, so its field is
"inside" everywhere: the padded marching cubes then give the closed surface of the grid, halfway between the last
grid node (±1) and the −1 border node (±(1 + h)), i.e. a cube of half-side 1 + h/2 — an exact expected mesh.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import shapee.io
from _tiny_data import one_torch_thread, tiny_transmitter_config
from shapee.conditioning import TINY_CLIP_CFG
from shapee.io import CheckpointError, OfficialCheckpointError
from shapee.io import download
from shapee.io.download import OFFICIAL_FILES, OfficialDownloadError, OfficialFile, fetch_official
from shapee.models import LatentDiffusion, Transmitter
from shapee.io.loading import load_prior
from shapee.pipeline import ImageTo3D, TextTo3D
from shapee.sample import slugify
from shapee.io.loading import EncoderLoadError

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

REFERENCE_CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_configs"
PRIOR_TARGET = "shapee.models.LatentDiffusion"


def prior_config(cond_mode: str = "text", d_latent: int = 64) -> dict:
    """A tiny prior (latents [128, d_latent]) with the tiny random-weight CLIP."""
    denoiser = dict(d_latent=d_latent, n_ctx=128, width=32, layers=2, heads=2)
    denoiser.update(cond_dim=32) if cond_mode == "text" else denoiser.update(cond_dim=48, cond_tokens=16)
    return dict(_target_=PRIOR_TARGET, cond_mode=cond_mode, denoiser=denoiser,
                clip=dict(model_cfg=TINY_CLIP_CFG, pretrained=None), guidance_scale=3.0, precision="fp32")


def save_prior(path: Path, cond_mode: str = "text", d_latent: int = 64, seed: int = 0) -> Path:
    cfg = prior_config(cond_mode, d_latent)
    torch.manual_seed(seed)
    model = LatentDiffusion(**{k: v for k, v in cfg.items() if k != "_target_"})
    with torch.no_grad():  # the output projection starts at zero: give the samples some content
        model.denoiser.output_proj.weight.normal_(0, 0.5)
    shapee.io.save(path, model, cfg)
    return path


def save_box_decoder(path: Path) -> Path:
    cfg = tiny_transmitter_config()
    torch.manual_seed(0)
    model = Transmitter(**{k: v for k, v in cfg.items() if k != "_target_"})
    with torch.no_grad():
        model.nerstf.mlp[-1].bias[0] = 5.0  # SDF = tanh(5 + small) > 0: inside everywhere
        model.nerstf.mlp[-1].bias[1:3] = 60.0  # coarse/fine density ≈ 60 > NERF_DENSITY_LEVEL: inside everywhere
    shapee.io.save(path, model, cfg)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    return {
        "prior": save_prior(base / "prior.pt"),
        "image_prior": save_prior(base / "image_prior.pt", cond_mode="image"),
        "narrow_prior": save_prior(base / "narrow_prior.pt", d_latent=32),
        "decoder": save_box_decoder(base / "decoder.pt"),
    }


@pytest.fixture(scope="module")
def pipe(ckpts):
    return TextTo3D.from_checkpoints(prior=ckpts["prior"], transmitter=ckpts["decoder"], device="cpu")


def _assert_box(mesh, grid_size: int) -> None:
    half = 1.0 + (2.0 / (grid_size - 1)) / 2
    np.testing.assert_allclose(mesh.bounds, [[-half] * 3, [half] * 3], atol=1e-4)
    assert mesh.is_watertight


def test_text_to_3d_meshes_are_the_decoded_surface_with_field_colours(pipe):
    result = pipe.generate(["a red cube", "a blue ball"], n=2, seed=0, steps=2, grid_size=12)
    assert result.latents.shape == (4, 128, 64) and result.latents.isfinite().all()
    assert not result.latents.requires_grad  # inference builds no autograd graph
    assert result.sources == ["a red cube", "a red cube", "a blue ball", "a blue ball"]  # prompt-major
    assert len(result.meshes) == 4 and set(result.timings) == {"clip", "sampling", "mesh"}
    for latent, mesh in zip(result.latents, result.meshes):
        _assert_box(mesh, 12)
        params = pipe.transmitter.decode_params(latent[None])
        verts = torch.as_tensor(mesh.vertices, dtype=torch.float32)[None]  # [1, V, 3]
        want = (pipe.transmitter.query(params, verts)["stf_rgb"][0] * 255).round()  # [V, 3]
        got = torch.as_tensor(mesh.visual.vertex_colors[:, :3], dtype=torch.float32)
        assert (got - want).abs().max() <= 1.0  # sRGB STF colours, 8-bit
    # Different latents decode to different colours (the decoder really reads each latent).
    c0, c2 = result.meshes[0].visual.vertex_colors, result.meshes[2].visual.vertex_colors
    assert not np.array_equal(c0, c2)


def test_call_returns_meshes_and_seed_fixes_the_samples(pipe):
    meshes = pipe("a red cube", n=1, seed=3, steps=2, grid_size=8)
    assert len(meshes) == 1 and len(meshes[0].faces) > 0
    a = pipe.generate("a red cube", seed=3, steps=2, grid_size=8).latents
    b = pipe.generate("a red cube", seed=3, steps=2, grid_size=8).latents
    c = pipe.generate("a red cube", seed=4, steps=2, grid_size=8).latents
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
    guided = pipe.generate("a red cube", seed=3, steps=2, grid_size=8, guidance_scale=8.0).latents
    assert (guided - a).abs().max() > 1e-4  # guidance_scale reaches the sampler


def test_nerf_decoder_and_turntables(pipe):
    nerf = pipe.generate("a red cube", steps=2, head="nerf", grid_size=10, render_views=3, render_resolution=16)
    bounds, h = nerf.meshes[0].bounds, 2.0 / 9
    # density ≈ 60 inside, 0 beyond the grid: the level-10 crossing sits at 1 + h·(60 − 10)/60 ≈ 1 + 0.83 h
    assert nerf.meshes[0].is_watertight and ((np.abs(bounds) > 1 + 0.7 * h) & (np.abs(bounds) < 1 + 0.95 * h)).all()
    assert nerf.frames.shape == (1, 3, 16, 16, 3) and nerf.frames.dtype == torch.uint8
    assert nerf.frames.float().mean() > 5  # a dense box: opaque, not the black background
    stf_run = pipe.generate("a red cube", steps=2, head="stf", grid_size=10, render_views=3, render_resolution=16)
    frames = stf_run.frames[0].float()  # [V, H, W, 3]
    assert frames.mean() > 5 and (frames[0] - frames[1]).abs().max() > 0  # lit box, different views
    assert (frames[:, 0, 0] == 0).all()  # the box (half-side ~1.1) seen from distance 4 leaves the corners black
    assert "render" in stf_run.timings
    with pytest.raises(ValueError, match="head must be one of"):
        pipe.generate("a red cube", head="mesh")


def test_pipeline_meshes_are_the_transmitters_mesh_path(pipe):
    latents = pipe.generate("a red cube", n=2, seed=1, steps=2, grid_size=10).latents  # [2, 128, 64]
    for head in ("stf", "nerf"):
        ours = [m.to_trimesh() for m in pipe.extract_meshes(latents, head=head, grid_size=10)]
        theirs = pipe.transmitter.to_mesh(latents, grid_size=10, head=head, narrow_band=head == "stf")
        assert len(ours) == len(theirs) == 2 and len(ours[0].faces) > 0
        for a, b in zip(ours, theirs):
            assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)
            assert np.array_equal(a.visual.vertex_colors, b.visual.vertex_colors)


def test_old_decoder_keyword_is_refused_in_one_line(pipe, ckpts):
    calls = [
        lambda: TextTo3D.from_checkpoints(prior=ckpts["prior"], decoder=ckpts["decoder"], device="cpu"),
        lambda: pipe.generate("a red cube", decoder="nerf"),
        lambda: pipe("a red cube", decoder="stf"),
        lambda: pipe.extract_meshes(torch.zeros(1, 128, 64), decoder="stf"),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"decoder= was renamed: use transmitter= for the checkpoint / head= for"
                                            r" stf\|nerf") as error:
            call()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("prompt", ["", "   ", [], ["a red cube", ""], None])
def test_empty_prompt_is_refused(pipe, prompt):
    with pytest.raises(ValueError, match="prompt"):
        pipe(prompt, steps=1)


@pytest.mark.parametrize("kwargs, match", [({"n": 0}, "n must"), ({"steps": 0}, "steps must"),
                                           ({"grid_size": 1}, "grid_size must")])
def test_bad_options_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate("a red cube", **kwargs)


def test_image_to_3d(ckpts, tmp_path):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.fromarray(np.full((40, 40, 3), (200, 20, 20), np.uint8)).save(image)
    pipe = ImageTo3D.from_checkpoints(prior=ckpts["image_prior"], transmitter=ckpts["decoder"], device="cpu")
    result = pipe.generate([str(image), np.zeros((32, 32, 3), np.uint8)], steps=2, grid_size=8)
    assert result.sources == ["red", "image1"] and result.latents.shape == (2, 128, 64)
    assert not torch.equal(result.latents[0], result.latents[1])  # different images, different conditioning
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        pipe(str(missing))


def test_mismatched_or_wrong_checkpoints_get_clear_errors(ckpts, tmp_path):
    with pytest.raises(ValueError, match=r"prior makes latents \[128, 32\].*decodes latents \[128, 64\]"):
        TextTo3D.from_checkpoints(prior=ckpts["narrow_prior"], transmitter=ckpts["decoder"], device="cpu")
    with pytest.raises(ValueError, match="needs a text-conditional prior.*ImageTo3D"):
        TextTo3D.from_checkpoints(prior=ckpts["image_prior"], transmitter=ckpts["decoder"], device="cpu")
    with pytest.raises(FileNotFoundError, match="missing_prior.pt"):
        TextTo3D.from_checkpoints(prior=tmp_path / "missing_prior.pt", transmitter=ckpts["decoder"])
    with pytest.raises(FileNotFoundError, match="missing_decoder.pt"):
        TextTo3D.from_checkpoints(prior=ckpts["prior"], transmitter=tmp_path / "missing_decoder.pt")
    with pytest.raises(CheckpointError, match="not a shapee.models.LatentDiffusion"):
        TextTo3D.from_checkpoints(prior=ckpts["decoder"], transmitter=ckpts["decoder"])  # swapped
    with pytest.raises(EncoderLoadError, match="not a shapee.models.Transmitter"):
        TextTo3D.from_checkpoints(prior=ckpts["prior"], transmitter=ckpts["prior"])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_prior(garbage)
    with pytest.raises(ValueError, match="prior not given"):
        TextTo3D.from_checkpoints(transmitter=ckpts["decoder"])


def test_prior_from_a_full_training_checkpoint_uses_its_ema(ckpts, tmp_path):
    from shapee.io import load_snapshot, save_checkpoint

    snap = load_snapshot(ckpts["prior"])
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in snap["weights"].items()}
    path = save_checkpoint(tmp_path / "last.pt", {"model": snap["weights"], "ema": ema, "step": 7,
                                                   "config": {"model": snap["model_config"]}})
    prior = load_prior(path)
    torch.testing.assert_close(prior.denoiser.pos_emb, ema["denoiser.pos_emb"])


def test_released_layout_prior_of_another_size_loads_with_its_own_sizes(ckpts, tmp_path):
    # load_official reads the sizes from the weights (issue: official-layout checkpoints of any size in one call);
    # a file that is not the layout at all is still refused.
    from shapee.io.official_priors import save_official_prior

    tiny = shapee.io.load(ckpts["prior"])
    path = save_official_prior(tiny, tmp_path / "text_cond.pt")  # tiny weights under the official keys
    pipe = TextTo3D.from_checkpoints(prior=path, transmitter=ckpts["decoder"], device="cpu")
    loaded = pipe.prior.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tiny.state_dict().items())
    broken = {k: v for k, v in torch.load(path, weights_only=True).items() if "backbone.resblocks.0.ln_1" not in k}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(OfficialCheckpointError, match="missing"):
        TextTo3D.from_checkpoints(prior=tmp_path / "broken.pt", transmitter=ckpts["decoder"], device="cpu")


def test_official_weights_offline_name_file_path_and_url(tmp_path):
    with pytest.raises(OfficialDownloadError) as info:
        TextTo3D.from_checkpoints(official=True, cache_dir=tmp_path / "cache", offline=True)
    message = str(info.value)
    assert "text_cond.pt" in message and str(tmp_path / "cache" / "text_cond.pt") in message
    assert "https://openaipublic.azureedge.net/main/shap-e/text_cond.pt" in message


def test_slugify():
    assert slugify("A red cube!") == "a_red_cube" and slugify("  ") == "sample" and slugify("x" * 99) == "x" * 48


# -------------------------------------------------------------------------------------------- download.py
def test_checksum_table_matches_the_reference_configs():
    for name in ("transmitter_config", "text300M_config", "image300M_config", "diffusion_config"):
        entry = OFFICIAL_FILES[name]
        data = (REFERENCE_CONFIGS / entry.filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256, name
    assert {OFFICIAL_FILES[n].filename for n in ("transmitter", "text300M", "image300M")} == {
        "transmitter.pt", "text_cond.pt", "image_cond.pt"}


def test_offline_detection_and_cache_dir(monkeypatch, tmp_path):
    for var in ("SHAPEE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert not download.is_offline()
    monkeypatch.setenv("SHAPEE_OFFLINE", "1")
    assert download.is_offline()
    monkeypatch.delenv("SHAPEE_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    assert download.is_offline()
    monkeypatch.setenv("SHAPEE_CACHE", str(tmp_path / "c"))
    assert download.official_path("text300M") == tmp_path / "c" / "text_cond.pt"
    with pytest.raises(OfficialDownloadError, match=str(tmp_path / "c" / "text_cond.pt")):
        fetch_official("text300M")  # offline by HF_HUB_OFFLINE
    with pytest.raises(ValueError, match="unknown official file"):
        fetch_official("text1B")


def _fake_entry(monkeypatch, source: Path, sha256: str) -> None:
    """A registry entry served from a local file:// URL: the real download code path, without the network."""
    monkeypatch.setitem(OFFICIAL_FILES, "fake", OfficialFile("fake.pt", source.as_uri(), sha256))
    for var in ("SHAPEE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_download_checks_the_checksum(monkeypatch, tmp_path):
    source = tmp_path / "served.bin"
    source.write_bytes(b"released weights" * 1000)
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    _fake_entry(monkeypatch, source, "0" * 64)
    with pytest.raises(OfficialDownloadError, match="expected 0000"):
        fetch_official("fake", directory=cache)
    assert not list(cache.iterdir())  # nothing (not even a partial file) left under any name
    _fake_entry(monkeypatch, source, good)
    path = fetch_official("fake", directory=cache)
    assert path == cache / "fake.pt" and path.read_bytes() == source.read_bytes()
    assert fetch_official("fake", directory=cache, offline=True) == path  # cached: no network needed
    path.write_bytes(b"corrupt")
    with pytest.raises(OfficialDownloadError, match="corrupt or not the released"):
        fetch_official("fake", directory=cache)


def test_failed_download_names_file_path_and_url(monkeypatch, tmp_path):
    _fake_entry(monkeypatch, tmp_path / "does_not_exist.bin", "0" * 64)
    with pytest.raises(OfficialDownloadError) as info:
        fetch_official("fake", directory=tmp_path / "cache", timeout_s=1.0)
    message = str(info.value)
    assert "fake.pt" in message and str(tmp_path / "cache" / "fake.pt") in message and "does_not_exist.bin" in message
