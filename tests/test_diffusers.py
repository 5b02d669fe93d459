"""diffusers interop: shapee's modules loaded from diffusers' own Shap-E classes (built small, random weights) give
diffusers' outputs, and export → diffusers → import round-trips bit for bit."""

from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import HeunDiscreteScheduler, PriorTransformer  # noqa: E402
from diffusers.pipelines.shap_e.renderer import ShapERenderer  # noqa: E402

from shapee.io.diffusers_format import (  # noqa: E402
    SCHEDULER_CONFIG,
    export_diffusers,
    is_diffusers_folder,
    load_diffusers_prior,
    load_diffusers_transmitter,
)
from shapee.models.latent_diffusion import LatentDiffusion  # noqa: E402
from shapee.models.transmitter import Transmitter  # noqa: E402

HEADS, HEAD_DIM, LAYERS, D, N_CTX = 4, 8, 2, 16, 8  # width 32


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter non-degenerate (zero-initialised ones too), so that a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))


def diffusers_prior(mode: str, seed: int = 0) -> PriorTransformer:
    image = mode == "image"
    prior = PriorTransformer(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=LAYERS, embedding_dim=D,
        num_embeddings=N_CTX, additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
        embedding_proj_norm_type="layer" if image else None, encoder_hid_proj_type=None, added_emb_type=None,
        time_embed_dim=4 * HEADS * HEAD_DIM, embedding_proj_dim=24 if image else 20, clip_embed_dim=2 * D,
    )
    randomize(prior, seed)
    return prior.eval()


@pytest.mark.parametrize("mode", ["text", "image"])
def test_prior_loaded_from_a_diffusers_folder_gives_diffusers_outputs(tmp_path, mode):
    prior = diffusers_prior(mode)
    prior.save_pretrained(tmp_path / "prior")
    assert is_diffusers_folder(tmp_path)
    extra = {"denoiser": {"cond_tokens": 6}} if mode == "image" else {}
    ours = load_diffusers_prior(tmp_path, **extra)
    assert ours.cond_mode == mode and ours.denoiser.backbone.resblocks[0].attn.heads == HEADS
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, N_CTX, D, generator=g)
    t = torch.tensor([0, 500, 1023])
    if mode == "text":
        cond = torch.nn.functional.normalize(torch.randn(3, 20, generator=g), dim=-1)
        theirs_cond = cond * math.sqrt(20)  # diffusers' pipeline scales outside the model, shapee inside
    else:
        cond = torch.randn(3, 6, 24, generator=g)
        theirs_cond = cond
    with torch.no_grad():
        x0, var = ours.denoiser.split_output(ours.denoiser(x, t, cond))
        theirs = prior(x, timestep=t, proj_embedding=theirs_cond).predicted_image_embedding  # [B, n, 2D]
    assert rel(x0, theirs[..., :D]) <= 1e-5
    assert rel(var, theirs[..., D:]) <= 1e-5


def diffusers_renderer(seed: int = 0, d_hidden: int = 8, d_latent: int = 16) -> ShapERenderer:
    renderer = ShapERenderer(
        param_shapes=((d_hidden, 93), (d_hidden, d_hidden), (d_hidden, d_hidden), (d_hidden, d_hidden)),
        d_latent=d_latent, d_hidden=d_hidden, background=(0.0, 0.0, 0.0),
    )
    randomize(renderer, seed)
    with torch.no_grad():
        renderer.mlp.mlp[-1].bias[1:3] += 1.0  # densities (relu) positive somewhere, so the comparison means something
    return renderer.eval()


def test_decoder_loaded_from_a_diffusers_renderer_gives_diffusers_fields(tmp_path):
    renderer = diffusers_renderer()
    renderer.save_pretrained(tmp_path / "shap_e_renderer")
    ours = load_diffusers_transmitter(tmp_path)
    g = torch.Generator().manual_seed(2)
    latent = torch.rand(1, 4 * 8, 16, generator=g) * 2 - 1
    points = torch.rand(1, 500, 3, generator=g) * 2 - 1
    with torch.no_grad():
        params = ours.decode_params(latent)
        field = ours.query(params, points)
        theirs = renderer.params_proj(latent)
        for name, value in theirs.items():  # diffusers writes the projected weights into its MLP
            i = int(name.split(".")[2])
            renderer.mlp.mlp[i].weight.copy_(value[0])
            assert rel(params[f"mlp.{i}.weight"], value) <= 1e-6
        heads = {
            ("stf", "coarse"): ("sdf", None, "stf_rgb"),
            ("nerf", "coarse"): (None, "density_coarse", "nerf_rgb_coarse"),
            ("nerf", "fine"): (None, "density_fine", "nerf_rgb_fine"),
        }
        for (mode, level), (sdf, density, rgb) in heads.items():
            out = renderer.mlp(position=points, direction=None, ts=None, nerf_level=level, rendering_mode=mode)
            if sdf:
                assert rel(field[sdf], out.signed_distance[..., 0]) <= 1e-5
            if density:
                assert (out.density > 0).float().mean() > 0.2
                assert rel(field[density], out.density[..., 0]) <= 1e-5
            assert rel(field[rgb], out.channels) <= 1e-5
    with pytest.raises(RuntimeError, match="no encoder"):
        ours.encode({})


def test_export_to_diffusers_round_trips_bitwise(tmp_path):
    torch.manual_seed(0)
    prior = LatentDiffusion(cond_mode="text", denoiser=dict(d_latent=D, n_ctx=N_CTX, width=32, layers=2, heads=HEADS,
                                                              cond_dim=20))
    transmitter = Transmitter(
        encoder=dict(width=32, heads=2, layers=2, data_ctx=16, d_latent=16, n_points=64, n_views=1,
                     pointconv_hidden=(32, 32), pointconv_samples=16, image_size=16),
        mlp=dict(d_hidden=8),
    )
    randomize(prior, 3)
    randomize(transmitter, 4)
    out = export_diffusers(tmp_path / "export", prior=prior, transmitter=transmitter)
    # diffusers' own loaders take every component
    theirs_prior = PriorTransformer.from_pretrained(out / "prior")
    ShapERenderer.from_pretrained(out / "shap_e_renderer")
    scheduler = HeunDiscreteScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.beta_schedule == SCHEDULER_CONFIG["beta_schedule"] == "exp"
    assert scheduler.config.prediction_type == "sample" and scheduler.config.use_karras_sigmas
    assert json.loads((out / "model_index.json").read_text())["prior"] == ["diffusers", "PriorTransformer"]
    assert torch.equal(theirs_prior.clip_std, torch.ones_like(theirs_prior.clip_std))
    # and back: bit for bit
    again = load_diffusers_prior(out)
    for k, v in prior.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    decoder = load_diffusers_transmitter(out)
    own = transmitter.state_dict()
    decoder_keys = [k for k in own if k.startswith(("params_proj.", "nerstf.", "void_background"))]
    assert decoder_keys and all(torch.equal(decoder.state_dict()[k], own[k]) for k in decoder_keys)


def test_sample_with_a_diffusers_folder_gives_the_snapshots_latents_and_a_mesh(tmp_path):
    # A tiny prior + decoder exported to a diffusers folder; sample.py's function with checkpoint=<folder> makes the
    # same latents as with the snapshots themselves (same seed), and a mesh.
    from safetensors.torch import load_file

    import shapee.io
    from shapee.sample import sample_assets
    from test_pipeline import save_box_decoder, save_prior
    from test_sample import sample_cfg

    prior_path, decoder_path = save_prior(tmp_path / "prior.pt"), save_box_decoder(tmp_path / "decoder.pt")
    prior = shapee.io.load(prior_path)
    folder = export_diffusers(tmp_path / "diffusers", prior=prior, transmitter=shapee.io.load(decoder_path))
    common = ["prompt=a red cube", "guidance_scale=3.0", "steps=2", "grid_size=10", "render_views=0", "device=cpu", "formats=[ply]"]
    ours = sample_assets(sample_cfg(*common, f"prior={prior_path}", f"transmitter={decoder_path}",
                                    f"out={tmp_path / 'ours'}"))
    cfg = sample_cfg(*common, f"checkpoint={folder}", f"out={tmp_path / 'theirs'}")
    cfg["clip"] = dict(prior._clip.kwargs)  # a diffusers folder carries no open_clip choice: the tiny test CLIP
    theirs = sample_assets(cfg)
    a = load_file(ours["files"][0]["latent"])
    b = load_file(theirs["files"][0]["latent"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert theirs["files"][0]["faces"] == ours["files"][0]["faces"] > 0


def test_export_script_writes_a_folder_diffusers_loads(tmp_path):
    from _tiny_data import run_script
    from test_pipeline import save_box_decoder, save_prior

    prior_path, decoder_path = save_prior(tmp_path / "prior.pt"), save_box_decoder(tmp_path / "decoder.pt")
    proc = run_script("export.py", "format=diffusers", f"prior={prior_path}", f"transmitter={decoder_path}",
                      f"out={tmp_path / 'out'}")
    assert "wrote" in proc.stdout
    assert PriorTransformer.from_pretrained(tmp_path / "out" / "prior").config.num_embeddings == 128
    assert ShapERenderer.from_pretrained(tmp_path / "out" / "shap_e_renderer").config.d_hidden > 0
    bad = run_script("export.py", "format=onnx", f"out={tmp_path / 'x'}", check=False)
    assert bad.returncode == 2 and "format='onnx' is not supported" in bad.stderr and "Traceback" not in bad.stderr
