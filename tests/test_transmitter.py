"""The Transmitter composite: stage-nerf losses, target-ray sampling, rendering, official loading into it."""

import pytest
import torch

from shapee.cameras import Cameras, random_cameras
from shapee.io import load_official
from shapee.io.official import to_official_state_dict
from shapee.models import LossSettings, Transmitter

TINY = dict(
    encoder=dict(width=32, heads=2, layers=2, data_ctx=32, d_latent=32, n_points=256, n_views=2,
                 pointconv_hidden=[32, 32], pointconv_samples=16, image_size=32, patch_size=8, mv_hidden=16),
    mlp=dict(d_hidden=16),
    n_coarse=8,
    n_fine=8,
    rays_per_asset=64,
)


def make_batch(B=2, V=2, T=3, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    views, targets = random_cameras(V, resolution=H, generator=g), random_cameras(T, resolution=H, generator=g)
    return dict(
        points=torch.rand(B, 256, 6, generator=g) * 2 - 1,
        views=torch.rand(B, V, H, H, 3, generator=g),
        view_alpha=(torch.rand(B, V, H, H, generator=g) > 0.5).float(),
        view_depth=torch.rand(B, V, H, H, generator=g) + 3,
        view_cameras=views.to_matrix()[None].repeat(B, 1, 1, 1),
        view_fov=torch.full((B,), views.x_fov),
        target_rgb=torch.rand(B, T, H, H, 3, generator=g),
        target_alpha=(torch.rand(B, T, H, H, generator=g) > 0.5).float(),
        target_cameras=targets.to_matrix()[None].repeat(B, 1, 1, 1),
        target_fov=torch.full((B,), targets.x_fov),
    )


def test_nerf_stage_losses_and_gradients():
    model = Transmitter(**TINY)
    losses = model.loss_dict(make_batch())
    names = {"nerf_rgb_fine", "nerf_rgb_coarse", "nerf_transmittance_fine", "nerf_transmittance_coarse"}
    assert names <= set(losses) and "metric/ray_psnr" in losses
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses[k] for k in names).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_distill_stage_adds_sdf_and_colour_terms():
    model = Transmitter(**TINY, stage="distill")
    model.loss_settings = LossSettings(distill_points=50)
    batch = make_batch()
    g = torch.Generator().manual_seed(3)
    batch["sdf_points"] = torch.rand(2, 80, 3, generator=g) * 2 - 1
    batch["sdf"] = 0.5 - batch["sdf_points"].norm(dim=-1)  # a sphere, positive inside
    losses = model.loss_dict(batch)
    assert {"distill_sdf", "distill_rgb", "nerf_rgb_fine"} <= set(losses)
    (losses["distill_sdf"] + losses["distill_rgb"]).backward()
    assert model.encoder.output_proj.weight.grad.abs().sum() > 0  # the distill terms reach the encoder
    assert model.state_dict().keys() == Transmitter(**TINY).state_dict().keys()  # no teacher weights in ours
    with pytest.raises(ValueError, match="unknown SDF teacher 'pointy'"):
        LossSettings(teacher="pointy")


def test_finetune_stage_adds_the_mesh_render_loss_and_exports_meshes(tmp_path):
    model = Transmitter(**TINY, stage="finetune", stf_grid_size=12)
    model.loss_settings = LossSettings(stf_views=2, stf_resolution=16)
    losses = model.loss_dict(make_batch())
    assert "stf_rgba" in losses and torch.isfinite(losses["stf_rgba"])
    losses["stf_rgba"].backward()
    assert model.encoder.output_proj.weight.grad is not None  # the mesh render reaches the encoder
    with torch.no_grad():
        latent = model.encode(make_batch())
    mesh = model.to_mesh(latent[0], grid_size=12)  # one latent [n_ctx, d]: one mesh
    meshes = model.to_mesh(latent, grid_size=12)
    assert isinstance(meshes, list) and len(meshes) == 2
    assert isinstance(model.to_mesh(latent[:1], grid_size=12), list)  # the rank decides, not the batch size
    flat = model.to_mesh(latent.flatten(1), grid_size=12)  # [B, n_ctx·d], as the params projection takes it
    assert [m.vertices.tolist() for m in flat] == [m.vertices.tolist() for m in meshes]
    assert model.to_mesh(latent[0]).vertices.tolist() == model.to_mesh(latent[0], grid_size=12).vertices.tolist()
    assert mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)


def test_unknown_and_unbuilt_stages_are_refused():
    with pytest.raises(ValueError, match="unknown encoder stage"):
        Transmitter(**TINY, stage="stf")
    model = Transmitter(**TINY)
    with pytest.raises(ValueError, match="unknown encoder stage 'nerfs'"):
        model.loss_dict(make_batch(), stage="nerfs")


def test_target_rays_are_the_pixels_they_claim_and_skip_held_out_views():
    model = Transmitter(**{**TINY, "rays_per_asset": 500}, holdout_views=1)
    batch = make_batch(B=2, T=3, H=8)
    # Colour every pixel by its own (view, row, col) so the sampled target tells which pixel was taken.
    B, T, H, W = batch["target_alpha"].shape
    v, r, c = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    code = torch.stack([v.float(), r.float(), c.float()], -1)  # [T, H, W, 3]
    batch["target_rgb"] = code[None].repeat(B, 1, 1, 1, 1)
    origins, dirs, rgb, alpha = model.sample_target_rays(batch, generator=torch.Generator().manual_seed(0))
    view, row, col = rgb[..., 0].long(), rgb[..., 1].long(), rgb[..., 2].long()
    assert view.max() < T - 1  # the held-out last view is never a training target
    cams = Cameras.from_matrix(batch["target_cameras"][0], W, H, float(batch["target_fov"][0]))
    o_ref, d_ref = cams.pixel_rays(view[0], row[0], col[0])
    torch.testing.assert_close(origins[0], o_ref)
    torch.testing.assert_close(dirs[0], d_ref)
    assert torch.equal(alpha[1], batch["target_alpha"][1][view[1], row[1], col[1]])


def test_render_nerf_shapes_and_determinism():
    model = Transmitter(**TINY).eval()
    with torch.no_grad():
        latent = model.encode(make_batch(), generator=torch.Generator().manual_seed(0))
        cams = random_cameras(2, resolution=6)
        a = model.render_nerf(latent, cams, deterministic=True)
        b = model.render_nerf(latent, cams, deterministic=True)
    assert a["rgb"].shape == (2, 2, 6, 6, 3) and a["transmittance"].shape == (2, 2, 6, 6)
    assert torch.equal(a["rgb"], b["rgb"])
    assert (a["transmittance"] >= 0).all() and (a["transmittance"] <= 1).all()


def test_shared_levels_render_and_loss_equal_querying_each_level_separately():
    # render_nerf / nerf_losses read both levels' heads off one evaluation of the coarse samples; the official
    # renderer queries them twice. Same network, same points: the same images and losses.
    from shapee.render import nerf as nerf_renderer

    model = Transmitter(**TINY).eval()
    with torch.no_grad():
        latent = model.encode(make_batch(), generator=torch.Generator().manual_seed(0))
        cams = random_cameras(2, resolution=6)
        shared = model.render_nerf(latent, cams, generator=torch.Generator().manual_seed(3))
        separate = nerf_renderer.render_views(
            model.field(model.decode_params(latent)), cams, n_assets=2, n_coarse=model.n_coarse, n_fine=model.n_fine,
            shared_levels=False, generator=torch.Generator().manual_seed(3), chunk_size=model.render_chunk,
        )
    for key in ("rgb", "transmittance", "rgb_coarse", "transmittance_coarse"):
        torch.testing.assert_close(shared[key], separate[key], rtol=0, atol=1e-6)


def test_official_layout_loads_into_a_transmitter():
    source = Transmitter(**TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sd = {k: v.clone() for k, v in to_official_state_dict(source).items()}
    loaded = load_official("transmitter", sd, encoder_kwargs=TINY["encoder"], mlp_kwargs=TINY["mlp"])
    assert isinstance(loaded, Transmitter)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    points = torch.rand(1, 10, 3) * 2 - 1
    latent = torch.rand(1, source.encoder.latent_ctx, source.encoder.d_latent) * 2 - 1  # [1, 64, 32]
    torch.testing.assert_close(
        loaded.query(loaded.decode_params(latent), points)["sdf"], source.query(source.decode_params(latent), points)["sdf"]
    )


def test_finetune_render_sigma_is_configurable_and_defaults_to_the_official_one():
    torch.manual_seed(0)
    model = Transmitter(**TINY, stage="finetune", stf_grid_size=12)
    batch = make_batch()
    query = model.query  # the random SDF head has no zero level: add a sphere of radius 0.6 so there is a mesh

    def with_sphere(params, points):
        out = dict(query(params, points))
        out["sdf"] = out["sdf"] + 0.6 - points.norm(dim=-1)
        return out

    model.query = with_sphere
    with torch.no_grad():
        latent = model.encode(batch)
        assert all(len(m.faces) for m in model.to_mesh(latent, grid_size=12))  # something to render
        loss = {}
        for sigma in (None, 1e-5, 1e-3):
            model.loss_settings = LossSettings(stf_resolution=16, stf_sigma=sigma)  # all training views
            loss[sigma] = model.stf_losses(batch, latent)["stf_rgba"]
    assert torch.equal(loss[None], loss[1e-5])  # None = the official renderer's σ
    assert not torch.allclose(loss[None], loss[1e-3])  # the wider soft edge changes the training render
    with pytest.raises(ValueError, match="stf_sigma must be > 0"):
        LossSettings(stf_sigma=0.0)


def test_inference_entry_points_build_no_autograd_graph():
    # A notebook calling them with grad enabled gets plain tensors; the training losses still get gradients.
    model = Transmitter(**TINY).eval()
    latent = model.encode(make_batch(), generator=torch.Generator().manual_seed(0)).detach().requires_grad_(True)
    out = model.render_nerf(latent, random_cameras(2, resolution=4), deterministic=True)
    assert torch.is_grad_enabled() and not any(v.requires_grad for v in out.values() if torch.is_tensor(v))
    params = model.decode_params(latent)
    losses = model.nerf_losses(make_batch(), params)
    assert losses["nerf_rgb_fine"].requires_grad  # training keeps its graph (render_rays, not render_nerf)


def test_pointe_teacher_is_given_through_the_one_loader_not_loaded_by_the_model(tmp_path):
    # The model never reads files (models/ imports nothing from io/): the trainer loads teacher_checkpoint with
    # shapee.io.load_model(..., expect="pointe_sdf") and hands the module over.
    import shapee.io
    from shapee.models.pointe_sdf import PointESDF

    tiny_pointe = dict(width=16, encoder_layers=1, encoder_heads=2, decoder_layers=1, decoder_heads=2, n_ctx=24)
    teacher = PointESDF(**tiny_pointe)
    path = tmp_path / "pointe.pt"
    shapee.io.save(path, teacher, {"_target_": "shapee.models.pointe_sdf.PointESDF", **tiny_pointe})
    model = Transmitter(**TINY, stage="distill")
    model.loss_settings = LossSettings(teacher="pointe")
    with pytest.raises(RuntimeError, match="use_pointe_teacher"):
        model.pointe_teacher()
    loaded = shapee.io.load_model(path, expect="pointe_sdf")
    model.use_pointe_teacher(loaded)
    got = model.pointe_teacher()
    assert got is loaded and not got.training and not any(p.requires_grad for p in got.parameters())
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), teacher.state_dict().values()))
    with pytest.raises(Exception, match="PointESDF"):
        shapee.io.load_model(path, expect="prior")  # the kind is checked and named
