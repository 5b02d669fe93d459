"""shapee.render.grid / mesh / stf (SDF grid → MC33 → vertex colours → soft PyTorch3D render), the transmitter
glue of shapee.models.meshing, and the STF fine-tuning loss.

Small grids (24–32³) and images (48²) keep this CPU-only file fast; the reference renders come from the dataset
renderer (shapee.data.render, Embree ray casting) with the same cameras.
"""


import numpy as np
import pytest
import torch
import trimesh
from scipy.ndimage import binary_erosion

from shapee.cameras import BLENDER_FOV, Cameras, orbit_cameras, random_cameras
from shapee.data.mesh import Mesh
from shapee.data.render import render_views
from shapee.models import Transmitter, meshing
from shapee.models.stf_losses import rgba, stf_finetune_loss
from shapee.render import grid as render_grid
from shapee.render import mesh as render_mesh
from shapee.render import stf

HALF_BOX = torch.tensor([0.45, 0.3, 0.35])


def sphere_sdf(p, radius=0.5):
    return radius - p.norm(dim=-1)  # [B, P], positive inside


def box_sdf(p):
    return -(p.abs() - HALF_BOX.to(p)).amax(dim=-1)  # [B, P]: zero set = the box surface, positive inside


def position_rgb(p):
    return (0.5 + 0.45 * p).clamp(0, 1)  # [B, P, 3] smoothly varying sRGB


def views(n=2, size=64, distance=2.2):
    """``n`` orbit views and one random view, close enough that the objects fill much of the image."""
    cams = orbit_cameras(n, distance=distance, resolution=size, start_angle=0.3, fov=BLENDER_FOV)
    g = torch.Generator().manual_seed(1)
    return Cameras.cat([cams, random_cameras(1, distance=distance, resolution=size, generator=g)])


def reference_mesh(verts, faces, colors) -> Mesh:
    """The MC mesh as the dataset renderer sees it: per-face corner colours from the vertex colours."""
    f = faces.cpu().numpy()
    return Mesh(verts.detach().cpu().numpy(), f, colors.detach().cpu().numpy()[f], color_source="vertex")


def tiny_transmitter() -> Transmitter:
    return Transmitter(
        encoder=dict(width=32, heads=2, layers=1, data_ctx=16, d_latent=16, n_points=256, n_views=2,
                     pointconv_samples=16, pointconv_hidden=(32, 32), image_size=32),
        mlp=dict(d_hidden=8),
    )


def tiny_latent(t: Transmitter, B=1, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, t.encoder.latent_ctx, t.encoder.d_latent, generator=g).tanh()


class SphereOffsetTransmitter:
    """Test double: a real tiny Transmitter whose SDF is shifted by a sphere, so that it has a surface."""

    def __init__(self, transmitter, radius=0.5):
        self.t, self.radius, self.encoder = transmitter, radius, transmitter.encoder

    def decode_params(self, latent):
        return self.t.decode_params(latent)

    def query(self, params, points):
        out = dict(self.t.query(params, points))
        out["sdf"] = out["sdf"] + sphere_sdf(points, self.radius)
        return out


# ------------------------------------------------------------------------------------------------- the grid
def test_grid_points_layout_and_chunking():
    n = 5
    pts = render_grid.grid_points(n, (-1.0, 3.0))
    assert pts.shape == (n, n, n, 3)
    assert torch.allclose(pts[0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(pts[-1, -1, -1], torch.tensor([3.0, 3.0, 3.0]))
    assert torch.allclose(pts[2, 1, 4], torch.tensor([1.0, 0.0, 3.0]))  # indexed [x, y, z], lo + idx/(N−1)(hi − lo)
    calls = []

    def fn(p):
        calls.append(p.shape[1])
        return p[..., 0] + 10 * p[..., 1] + 100 * p[..., 2] + torch.arange(p.shape[0])[:, None]  # [B, P]

    whole = render_grid.query_grid(fn, 2, n, (-1.0, 3.0), chunk=None)
    chunked = render_grid.query_grid(fn, 2, n, (-1.0, 3.0), chunk=7)
    assert calls[0] == n**3 and max(calls[1:]) == 7 and sum(calls[1:]) == n**3
    assert torch.equal(whole, chunked)
    expected = pts[..., 0] + 10 * pts[..., 1] + 100 * pts[..., 2]
    assert torch.allclose(whole[0], expected) and torch.allclose(whole[1], expected + 1)


def test_query_grid_and_pad_reject_bad_input():
    with pytest.raises(ValueError, match="query_fn must map points"):
        render_grid.query_grid(lambda p: p[..., :2], 1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        render_grid.query_grid(sphere_sdf, 0, 4)
    with pytest.raises(ValueError, match="bounds"):
        render_grid.query_grid(sphere_sdf, 1, 4, (1.0, -1.0))
    with pytest.raises(ValueError, match=r"\[B, N, N, N\]"):
        render_grid.pad_grid(torch.zeros(4, 4, 4))


def test_sphere_mesh_has_true_scale_and_is_closed():
    G = 24
    h = 2.0 / (G - 1)
    sdf = render_grid.query_grid(sphere_sdf, 1, G)
    padded, bounds = render_grid.pad_grid(sdf)
    assert padded.shape == (1, G + 2, G + 2, G + 2) and bool((padded[:, 0] == -1).all())
    assert bounds == pytest.approx((-1 - h, 1 + h))  # same voxel size: samples keep their world positions
    (verts, faces), = render_mesh.extract_meshes(sdf)
    radius = verts.norm(dim=-1)
    assert (radius - 0.5).abs().max() < h / 2  # no 127/129-style shrink (that would be 0.5·2/25 ≈ 0.04 too small)
    assert trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False).is_watertight
    # A field positive on the box boundary is closed by the −1 border, at most one voxel outside the box.
    (verts, faces), = render_mesh.extract_meshes(render_grid.query_grid(lambda p: sphere_sdf(p, 1.3), 1, G))
    assert trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False).is_watertight
    assert 1.0 < verts.abs().max() <= 1 + h


# ------------------------------------------------------------------------------ against the dataset renderer
@pytest.mark.parametrize("sdf_fn", [sphere_sdf, box_sdf], ids=["sphere", "box"])
def test_render_matches_dataset_renderer(sdf_fn):
    cams = views()
    soft = stf.render_stf(sdf_fn, position_rgb, [cams], grid_size=32)
    verts, faces, colors = soft["verts"][0], soft["faces"][0], soft["colors"][0]
    assert soft["rgb"].shape == (1, 3, 64, 64, 3) and soft["alpha"].shape == (1, 3, 64, 64)
    ref = render_views(reference_mesh(verts, faces, colors), cams, backend="embree")

    mine = soft["alpha"][0].detach().numpy() > 0.5
    theirs = ref["alpha"] > 0.5
    iou = (mine & theirs).sum() / (mine | theirs).sum()
    # The soft silhouette reaches ~0.2 px beyond the edge (σ = 1e-5 at 64²), where the nearby front and back faces'
    # coverages add up: a thin ring of extra pixels, hence IoU slightly below 1.
    assert iou >= 0.98, iou
    inner = np.stack([binary_erosion(a, iterations=2) for a in theirs])  # away from the silhouette
    assert inner.sum() > 500
    # Soft: fragments within the blur radius of a neighbouring face blend in its (slightly differently lit) colour.
    err_soft = np.abs(soft["rgb"][0].detach().numpy() - ref["rgb"])[inner]
    assert err_soft.mean() < 0.015, err_soft.mean()
    # Hard: one face per pixel, so colours, normals, lighting and cameras must agree to float precision.
    hard = stf.render_meshes([verts], [faces], [colors], [cams], soft=False)
    hard_diff = (hard["alpha"][0].numpy() > 0.5) != theirs
    assert hard_diff.sum() <= 3, hard_diff.sum()  # pixel centres on a silhouette edge may go either way
    err_hard = np.abs(hard["rgb"][0].detach().numpy() - ref["rgb"])[inner].max(-1)  # [K] per pixel
    # ... except where a pixel centre sits on an edge between two faces (each renderer may pick either face).
    assert np.median(err_hard) < 1e-3 and (err_hard > 2e-3).mean() < 0.01, ((err_hard > 2e-3).mean(), err_hard.max())


# --------------------------------------------------------------------------------------------- gradients
def test_gradients_reach_field_values_and_colours():
    cams = views(n=1, size=32)
    sdf = render_grid.query_grid(sphere_sdf, 1, 24).requires_grad_(True)
    (verts, faces), = render_mesh.extract_meshes(sdf)
    colors = torch.full_like(verts, 0.6).requires_grad_(True)
    out = stf.render_meshes([verts], [faces], [colors], [cams])
    target = torch.zeros_like(out["rgb"])
    target[..., 0] = 1.0
    loss = (out["rgb"] - target).square().mean() + (out["alpha"] - 0.5).square().mean()
    loss.backward()
    assert colors.grad.abs().sum() > 0 and bool(torch.isfinite(colors.grad).all())
    assert sdf.grad.abs().sum() > 0 and bool(torch.isfinite(sdf.grad).all())
    # Only the samples of edges the surface crosses move vertices: the centre and the corners get nothing.
    assert sdf.grad[0, 12, 12, 12] == 0 and sdf.grad[0, 0, 0, 0] == 0


def test_soft_alpha_gradient_has_the_right_sign():
    """Growing the sphere covers more pixels: d(Σ alpha)/d radius > 0, of the size of a finite difference.

    The soft band is only ~0.3 px wide at 64² (σ = 1e-5), so only the silhouette pixels whose centres fall inside it
    carry gradient: an estimate that is right on average but noisy (measured analytic/FD ratios: 0.4–3.8 at 32²,
    0.9–2.2 at 64², 0.8–1.06 at 128², grids 24–48³), hence the loose factor.
    """
    cams = views(n=1, size=64)
    radius = torch.tensor([0.5], requires_grad=True)

    def coverage(r):
        out = stf.render_stf(lambda p: sphere_sdf(p, r[:, None]), position_rgb, [cams], grid_size=24)
        return out["alpha"].sum()

    coverage(radius).backward()
    with torch.no_grad():
        fd = (coverage(radius + 0.01) - coverage(radius - 0.01)) / 0.02
    assert radius.grad.item() > 0 and fd > 0
    assert fd / 2 < radius.grad.item() < 2 * fd, (radius.grad.item(), fd.item())


def test_gradient_reaches_the_latent_of_a_tiny_transmitter():
    t = tiny_transmitter()
    latent = tiny_latent(t).requires_grad_(True)
    sdf_fn, rgb_fn = meshing.transmitter_fields(t, latent)
    out = stf.render_stf(lambda p: sdf_fn(p) + sphere_sdf(p), rgb_fn, [views(n=1, size=32)], grid_size=16)
    assert bool(out["mesh_mask"].all())
    target_rgb, target_alpha = torch.rand_like(out["rgb"]), torch.ones_like(out["alpha"])
    loss = stf_finetune_loss(rgba(out["rgb"], out["alpha"]), target_rgb, target_alpha)["stf_rgba"]
    loss.backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    assert t.nerstf.mlp[-1].weight.grad.abs().sum() > 0


def test_surface_grad_samples_give_the_dense_gradients_from_a_fraction_of_the_queries():
    # render_stf's default: the grid without autograd, then autograd only through the samples the mesh reads.
    t = tiny_transmitter()
    cams = views(n=2, size=32)
    grads, images, tracked = {}, {}, {}
    for mode in ("all", "surface"):
        latent = tiny_latent(t, B=2, seed=3).requires_grad_(True)
        sdf_fn, rgb_fn = meshing.transmitter_fields(t, latent)
        points_with_grad = []

        def field(p):
            if torch.is_grad_enabled():
                points_with_grad.append(p.shape[0] * p.shape[1])
            return sdf_fn(p) + sphere_sdf(p)

        out = stf.render_stf(field, rgb_fn, [cams, cams], grid_size=24, grad_samples=mode)
        assert bool(out["mesh_mask"].all())
        (out["rgb"].square().sum() + out["alpha"].sum()).backward()
        grads[mode], images[mode], tracked[mode] = latent.grad, out["rgb"].detach(), sum(points_with_grad)
    torch.testing.assert_close(images["surface"], images["all"], rtol=0, atol=1e-5)
    assert grads["all"].abs().sum() > 0
    torch.testing.assert_close(grads["surface"], grads["all"], rtol=1e-3, atol=1e-6)
    assert tracked["all"] == 2 * 24**3 and 0 < tracked["surface"] < 0.3 * tracked["all"]
    with pytest.raises(ValueError, match="grad_samples"):
        render_grid.query_grid(sphere_sdf, 1, 8, grad_samples="some")


def test_render_under_bf16_autocast_runs_in_fp32():
    # The training loop's autocast (bf16 on GPU) reaches render_stf; PyTorch3D's kernels take float32 only.
    cams = views(n=2, size=24)
    plain = stf.render_stf(sphere_sdf, position_rgb, [cams], grid_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = stf.render_stf(sphere_sdf, position_rgb, [cams], grid_size=16)
    assert auto["rgb"].dtype == torch.float32 and auto["alpha"].dtype == torch.float32
    torch.testing.assert_close(auto["rgb"], plain["rgb"], rtol=0, atol=1e-6)
    torch.testing.assert_close(auto["alpha"], plain["alpha"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ empty meshes
def test_empty_mesh_in_batch_renders_transparent_and_keeps_the_graph():
    cams = views(n=2, size=32)
    radius = torch.tensor([0.5, -0.2], requires_grad=True)  # the second field is negative everywhere
    tint = torch.tensor([[0.2, 0.5, 0.8], [0.9, 0.1, 0.3]], requires_grad=True)

    out = stf.render_stf(
        lambda p: sphere_sdf(p, radius[:, None]), lambda p: tint[:, None, :].expand(p.shape), cams,
        batch_size=2, grid_size=20,
    )
    assert out["mesh_mask"].tolist() == [True, False]
    assert out["faces"][1].shape == (0, 3) and out["colors"][1].shape == (0, 3)
    assert out["alpha"][1].abs().max() == 0 and out["rgb"][1].abs().max() == 0
    assert out["alpha"][0].max() > 0.99
    # batched = per asset
    alone = stf.render_stf(
        lambda p: sphere_sdf(p, 0.5), lambda p: tint[:1, None, :].expand(p.shape), [cams], grid_size=20
    )
    assert torch.allclose(out["alpha"][0], alone["alpha"][0], atol=1e-6)
    assert torch.allclose(out["rgb"][0], alone["rgb"][0], atol=1e-6)
    (out["rgb"].sum() + out["alpha"].sum()).backward()
    assert radius.grad is not None and tint.grad is not None  # the dummy triangle kept the empty field in the graph
    assert radius.grad[0] > 0 and radius.grad[1] == 0 and bool((tint.grad[1] == 0).all())


def test_all_outside_transmitter_gives_every_parameter_a_gradient():
    """DDP needs a gradient for every parameter even when no asset of the batch has a surface (reference §4.2)."""
    t = tiny_transmitter()
    latent = tiny_latent(t, B=2).requires_grad_(True)
    out = meshing.render_latents(t, latent, views(n=1, size=32), grid_size=12)  # init SDF ≈ −0.1 everywhere
    assert out["mesh_mask"].tolist() == [False, False]
    assert out["alpha"].abs().max() == 0
    out["rgb"].sum().backward()
    used = [n for n, p in t.named_parameters() if not n.startswith("encoder.")]
    missing = [n for n in used if dict(t.named_parameters())[n].grad is None]
    assert used and missing == []
    assert latent.grad is not None


# ------------------------------------------------------------------------------------------------ meshes
def test_latent_to_mesh_has_srgb_vertex_colours_at_true_scale():
    t = SphereOffsetTransmitter(tiny_transmitter())
    latent = tiny_latent(t.t, B=2)
    meshes = meshing.latent_to_mesh(t, latent, grid_size=20)
    assert len(meshes) == 2 and all(isinstance(m, trimesh.Trimesh) for m in meshes)
    mesh = meshes[1]
    colors = mesh.visual.vertex_colors
    assert colors.dtype == np.uint8 and colors.shape == (len(mesh.vertices), 4) and (colors[:, 3] == 255).all()
    with torch.no_grad():
        params = t.decode_params(latent[1:])
        verts = torch.from_numpy(mesh.vertices).float()[None]
        field = t.query(params, verts)
    expected = (field["stf_rgb"][0].numpy() * 255).round()  # the sRGB head values, not linearised (issue #86)
    assert np.abs(colors[:, :3].astype(float) - expected).max() <= 1
    assert np.abs(field["sdf"][0].numpy()).max() < 0.05  # vertices sit on the zero level
    assert mesh.is_watertight
    # one latent without the batch axis
    assert len(meshing.latent_to_mesh(t, latent[0], grid_size=12)) == 1
    with pytest.raises(ValueError, match="latent must have shape"):
        meshing.latent_to_mesh(t, latent[:, :5], grid_size=12)


def test_render_meshes_rejects_bad_input():
    cams = views(n=1, size=16)
    v = torch.rand(3, 3)
    f = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="faces_list\\[0\\].*replace_empty_meshes"):
        stf.render_meshes([v], [f[:0]], [v], [cams])
    with pytest.raises(ValueError, match="colors_list\\[0\\]"):
        stf.render_meshes([v], [f], [v[:2]], [cams])
    with pytest.raises(ValueError, match="one Cameras per mesh"):
        stf.render_meshes([v, v], [f, f], [v, v], [cams, cams, cams])
    with pytest.raises(ValueError, match="square"):
        stf.render_meshes([v], [f], [v], [cams.resized(16, 12)])
    with pytest.raises(ValueError, match="batch_size is required"):
        stf.render_stf(sphere_sdf, position_rgb, cams, grid_size=8)


# --------------------------------------------------------------------------------------------------- loss
def test_stf_loss_normalisation_on_a_hand_made_case():
    rendered = torch.zeros(1, 2, 2, 2, 4)  # B=1, N=2 views of 2×2 pixels: 8 pixels, all black and transparent
    target_rgb = torch.zeros(1, 2, 2, 2, 3)
    target_alpha = torch.zeros(1, 2, 2, 2)
    target_rgb[0, 1, 0, 1] = torch.tensor([1.0, 0.0, 0.5])  # one opaque pixel: ‖(1, 0, .5, 1)‖² = 2.25
    target_alpha[0, 1, 0, 1] = 1.0
    loss = stf_finetune_loss(rendered, target_rgb, target_alpha)["stf_rgba"]
    assert loss.item() == pytest.approx(2.25 / 8)  # Σ over channels, mean over views × pixels
    mse = torch.nn.functional.mse_loss(rendered, rgba(target_rgb, target_alpha))
    assert loss.item() == pytest.approx(4 * mse.item())
    with pytest.raises(ValueError, match="rendered_rgba"):
        stf_finetune_loss(rendered[..., :3], target_rgb, target_alpha)
    with pytest.raises(ValueError, match="target_alpha"):
        stf_finetune_loss(rendered, target_rgb, target_alpha[..., :1])


# ---------------------------------------------------------------------------------------------- benchmark
def test_benchmark_reports_steps_that_add_up():
    from shapee.benchmarks.stf import STEPS, bench_latent_to_mesh

    t = tiny_transmitter()
    result = bench_latent_to_mesh(12, transmitter=t, repeats=2, warmup=0, device="cpu")
    assert set(result["median"]) == set(STEPS) and len(result["runs"]) == 2
    for run in result["runs"]:
        parts = sum(run[k] for k in STEPS if k != "total")
        assert 0 < parts <= run["total"] + 1e-3
    assert result["faces"] > 0  # the sphere offset gives the random-weight field a surface
    assert bench_latent_to_mesh(12, transmitter=t, repeats=1, warmup=0, sphere_radius=None, device="cpu")["faces"] == 0
