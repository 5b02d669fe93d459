"""scripts/sample.py end to end on tiny in-process models: its library function, once as a subprocess, its config,
and clear errors for bad input (empty prompt, missing image, missing or mismatched checkpoints)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import trimesh
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from _tiny_data import REPO, one_torch_thread, run_script
from shapee.io import CheckpointError
from shapee.io.download import OfficialDownloadError
from shapee.pipeline import TextTo3D
from shapee.sample import format_report, sample_assets
from shapee.settings import register_sample_config
from test_pipeline import save_box_decoder, save_prior

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("sample")
    return {
        "prior": save_prior(base / "prior.pt"),
        "image_prior": save_prior(base / "image_prior.pt", cond_mode="image"),
        "narrow_prior": save_prior(base / "narrow_prior.pt", d_latent=32),
        "decoder": save_box_decoder(base / "decoder.pt"),
    }


def sample_cfg(*overrides: str) -> dict:
    register_sample_config()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def _tiny(ckpts, out, *extra: str) -> dict:
    return sample_cfg(f"prior={ckpts['prior']}", f"transmitter={ckpts['decoder']}", f"out={out}", "steps=2",
                      "grid_size=10", "render_views=3", "render_resolution=16", "device=cpu", *extra)


def test_config_defaults():
    cfg = sample_cfg("prompt=a chair")
    assert cfg["prompt"] == "a chair" and cfg["head"] == "stf" and cfg["checkpoint"] == "ours"
    assert cfg["steps"] == 64 and cfg["n"] == 1 and cfg["formats"] == ["glb", "ply"] and cfg["render_views"] == 20


def test_library_function_writes_meshes_gifs_and_latents(ckpts, tmp_path):
    cfg = _tiny(ckpts, tmp_path / "out", 'prompt=["a red cube","A red cube!","a blue ball"]', "n=2", "seed=5")
    summary = sample_assets(cfg)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    # Two prompts with the same slug keep counting instead of overwriting each other.
    stems = [f"a_red_cube_{i}" for i in range(4)] + ["a_blue_ball_0", "a_blue_ball_1"]
    assert names == sorted(f"{s}{ext}" for s in stems for ext in (".glb", ".ply", ".gif", "_latent.safetensors"))
    assert [e["source"] for e in summary["files"]] == ["a red cube"] * 2 + ["A red cube!"] * 2 + ["a blue ball"] * 2
    assert {"load", "clip", "sampling", "mesh", "render", "export"} <= set(summary["timings"])

    # The latents on disk are the pipeline's latents for the same seed.
    pipe = TextTo3D.from_checkpoints(prior=ckpts["prior"], transmitter=ckpts["decoder"], device="cpu")
    again = pipe.generate(["a red cube", "A red cube!", "a blue ball"], n=2, seed=5, steps=2, grid_size=10)
    for s, entry in enumerate(summary["files"]):
        with safe_open(entry["latent"], "pt") as f:
            latent = f.get_tensor("latent")
            assert f.metadata()["source"] == entry["source"] and f.metadata()["seed"] == "5"
        torch.testing.assert_close(latent, again.latents[s])
        glb = trimesh.load(entry["mesh_files"][0], force="mesh")
        ply = trimesh.load(entry["mesh_files"][1], force="mesh")
        assert len(glb.faces) == len(ply.faces) == len(again.meshes[s].faces) > 0
        np.testing.assert_array_equal(ply.visual.vertex_colors, again.meshes[s].visual.vertex_colors)
        gif = Image.open(entry["gif"])
        assert gif.n_frames == 3 and gif.size == (16, 16)
    report = format_report(summary)
    assert str(tmp_path / "out" / "a_blue_ball_1.glb") in report and "sampling" in report and "export" in report


def test_nerf_decoder_and_obj_format(ckpts, tmp_path):
    summary = sample_assets(_tiny(ckpts, tmp_path, "prompt=a red cube", "head=nerf", "formats=[obj]",
                                  "render_views=0"))
    entry = summary["files"][0]
    assert entry["mesh_files"] == [str(tmp_path / "a_red_cube_0.obj")] and "gif" not in entry
    assert entry["faces"] > 0 and "render" not in summary["timings"]


def test_image_prior(ckpts, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(image)
    cfg = _tiny(ckpts, tmp_path / "out", f"image={image}", "render_views=0")
    cfg["prior"] = str(ckpts["image_prior"])
    summary = sample_assets(cfg)
    assert summary["files"][0]["mesh_files"][0] == str(tmp_path / "out" / "photo_0.glb")


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["prompt=''"], ValueError, "prompt 0 .* is empty"),
        (["prompt=[a chair, '  ']"], ValueError, "prompt 1 .* is empty"),
        ([], ValueError, "exactly one of prompt"),
        (["prompt=a chair", "image=x.png"], ValueError, "exactly one of prompt"),
        (["image=/nonexistent/photo.png"], FileNotFoundError, "/nonexistent/photo.png"),
        (["prompt=a chair", "prior=/nonexistent/prior.pt"], FileNotFoundError, "/nonexistent/prior.pt"),
        (["prompt=a chair", "transmitter=/nonexistent/enc.pt"], FileNotFoundError, "/nonexistent/enc.pt"),
        (["prompt=a chair", "checkpoint=theirs"], ValueError, "checkpoint must be"),
        (["prompt=a chair", "head=voxels"], ValueError, "head must be one of"),
        (["prompt=a chair", "formats=[fbx]"], ValueError, "not mesh formats"),
    ],
)
def test_bad_input_gets_a_clear_error(ckpts, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        sample_assets(_tiny(ckpts, tmp_path, *overrides))


def test_mismatched_checkpoints_are_named(ckpts, tmp_path):
    narrow = _tiny(ckpts, tmp_path, "prompt=a chair")
    narrow["prior"] = str(ckpts["narrow_prior"])
    with pytest.raises(ValueError, match=r"\[128, 32\].*\[128, 64\]"):
        sample_assets(narrow)
    swapped = _tiny(ckpts, tmp_path, "prompt=a chair")
    swapped["prior"] = str(ckpts["decoder"])
    with pytest.raises(CheckpointError, match="decoder.pt.*not a shapee.models.LatentDiffusion"):
        sample_assets(swapped)
    image_prior = _tiny(ckpts, tmp_path, "prompt=a chair")
    image_prior["prior"] = str(ckpts["image_prior"])
    with pytest.raises(ValueError, match="text-conditional prior"):
        sample_assets(image_prior)


def test_official_checkpoint_offline_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAPEE_OFFLINE", "1")
    cfg = sample_cfg("prompt=a chair", "checkpoint=official", f"cache_dir={tmp_path}", f"out={tmp_path / 'o'}")
    with pytest.raises(OfficialDownloadError, match=re.escape(str(tmp_path / "text_cond.pt"))):
        sample_assets(cfg)


def test_script_runs_as_a_subprocess(ckpts, tmp_path):
    proc = run_script("sample.py", "prompt=a red cube", f"prior={ckpts['prior']}", f"transmitter={ckpts['decoder']}",
                      f"out={tmp_path}", "steps=2", "grid_size=10", "render_views=2", "render_resolution=16",
                      "device=cpu", env={"SHAPEE_PROGRESS": "0"})
    assert "karras" not in proc.stderr  # no sampler bar when asked for none (and none in logs: stderr is no terminal)
    for name in ("a_red_cube_0.glb", "a_red_cube_0.ply", "a_red_cube_0.gif", "a_red_cube_0_latent.safetensors"):
        assert (tmp_path / name).is_file()
        assert f"wrote {tmp_path / name}" in proc.stdout
    for label in ("CLIP", "sampling", "decoding (mesh)", "export", "total"):
        assert label in proc.stdout
    bad = run_script("sample.py", "prompt=' '", f"prior={ckpts['prior']}", f"transmitter={ckpts['decoder']}",
                     f"out={tmp_path / 'bad'}", check=False)
    assert bad.returncode == 2 and "sample: error: prompt 0" in bad.stderr and "is empty" in bad.stderr


def test_script_shows_the_sampler_bar_when_progress_is_forced(ckpts, tmp_path):
    proc = run_script("sample.py", "prompt=a red cube", f"prior={ckpts['prior']}", f"transmitter={ckpts['decoder']}",
                      f"out={tmp_path}", "steps=2", "grid_size=10", "render_views=0", "formats=[ply]", "device=cpu",
                      env={"SHAPEE_PROGRESS": "1"})
    assert "karras:" in proc.stderr and "0/2" in proc.stderr  # the bar over the 2 sampler steps
