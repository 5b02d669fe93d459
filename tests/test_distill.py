"""Stage distill helpers: nearest cloud colour vs brute force, the two L1 terms (zero at the target, gradients only
into the student), the tanh target, and the mesh / Point-E teachers."""

import pytest
import torch

from shapee.models.distill_losses import (
    distill_loss,
    nearest_cloud_colour,
    sdf_target,
    teacher_sdf,
    uniform_box_points,
)
from shapee.models.pointe_sdf import PointESDF

TINY_POINTE = dict(width=16, encoder_layers=1, encoder_heads=2, decoder_layers=1, decoder_heads=2, n_ctx=24)


# ------------------------------------------------------------------------------------------------ RGB_NN
def test_nearest_cloud_colour_equals_brute_force_argmin_with_chunking():
    g = torch.Generator().manual_seed(0)
    cloud = torch.rand(3, 200, 3, generator=g) * 2 - 1
    rgb = torch.rand(3, 200, 3, generator=g)
    points = torch.rand(3, 500, 3, generator=g) * 2 - 1
    # Brute force in float64 over the full [B, P, N] difference tensor.
    d2 = (points.double()[:, :, None, :] - cloud.double()[:, None, :, :]).square().sum(-1)  # [B, P, N]
    idx = d2.argmin(dim=-1)  # [B, P]
    expected = torch.stack([rgb[b, idx[b]] for b in range(3)])
    out = nearest_cloud_colour(cloud, rgb, points, max_block_elements=3 * 200 * 7)  # chunks of 7 queries
    assert out.shape == (3, 500, 3)
    assert torch.equal(out, expected)
    assert torch.equal(nearest_cloud_colour(cloud, rgb, points), expected)  # one block


def test_nearest_cloud_colour_at_cloud_points_is_their_colour_and_keeps_channels():
    cloud = torch.rand(2, 50, 3)
    feats = torch.rand(2, 50, 5)  # any number of channels
    perm = torch.randperm(50)
    out = nearest_cloud_colour(cloud, feats, cloud[:, perm])
    assert torch.equal(out, feats[:, perm])


def test_nearest_cloud_colour_bad_inputs():
    with pytest.raises(ValueError, match="cloud_xyz"):
        nearest_cloud_colour(torch.rand(2, 5, 4), torch.rand(2, 5, 3), torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="cloud_rgb"):
        nearest_cloud_colour(torch.rand(2, 5, 3), torch.rand(2, 6, 3), torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="points"):
        nearest_cloud_colour(torch.rand(2, 5, 3), torch.rand(2, 5, 3), torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match="empty"):
        nearest_cloud_colour(torch.rand(2, 0, 3), torch.rand(2, 0, 3), torch.rand(2, 3, 3))


# ------------------------------------------------------------------------------------------------ the loss
def test_distill_loss_is_zero_at_the_targets_and_l1_elsewhere():
    teacher = torch.tensor([[-1.7, -0.3, 0.0, 0.2, 1.4]])  # world units: beyond ±1 at the box corners
    nn_rgb = torch.rand(1, 5, 3)
    at_target = distill_loss({"sdf": torch.tanh(teacher), "stf_rgb": nn_rgb.clone()}, teacher, nn_rgb)
    assert set(at_target) == {"distill_sdf", "distill_rgb"}
    assert at_target["distill_sdf"].item() == pytest.approx(0.0, abs=1e-7)
    assert at_target["distill_rgb"].item() == 0.0
    off = distill_loss({"sdf": torch.tanh(teacher) + 0.1, "stf_rgb": nn_rgb - 0.2}, teacher, nn_rgb)
    assert off["distill_sdf"].item() == pytest.approx(0.1, rel=1e-5)
    assert off["distill_rgb"].item() == pytest.approx(0.2, rel=1e-5)


def test_tanh_target_is_reachable_by_a_tanh_head_but_the_clipped_one_is_not():
    teacher = torch.tensor([[-1.7, 0.5, 1.4]])
    assert torch.allclose(sdf_target(teacher), torch.tanh(teacher))
    assert torch.equal(sdf_target(teacher, "clip"), torch.tensor([[-1.0, 0.5, 1.0]]))
    # A head whose pre-activation equals the teacher's SDF is exactly right for the tanh target ...
    head = {"sdf": torch.tanh(teacher), "stf_rgb": torch.zeros(1, 3, 3)}
    assert distill_loss(head, teacher, torch.zeros(1, 3, 3))["distill_sdf"].item() < 1e-7
    # ... but off for the clipped one wherever |sdf| > 1 (no finite pre-activation reaches ±1).
    assert distill_loss(head, teacher, torch.zeros(1, 3, 3), sdf_target_mode="clip")["distill_sdf"].item() > 0.01
    with pytest.raises(ValueError, match="sdf target mode"):
        sdf_target(teacher, "sigmoid")


def test_distill_loss_gradients_reach_the_student_only():
    raw = torch.randn(2, 7, requires_grad=True)
    rgb_logit = torch.randn(2, 7, 3, requires_grad=True)
    teacher = torch.randn(2, 7, requires_grad=True)
    nn_rgb = torch.rand(2, 7, 3, requires_grad=True)
    losses = distill_loss({"sdf": torch.tanh(raw), "stf_rgb": torch.sigmoid(rgb_logit)}, teacher, nn_rgb)
    (losses["distill_sdf"] + losses["distill_rgb"]).backward()
    # d/d raw of mean |tanh(raw) − tanh(t)| = sign(·) (1 − tanh² raw) / n
    expected = torch.sign(torch.tanh(raw) - torch.tanh(teacher)).detach() * (1 - torch.tanh(raw).detach() ** 2) / 14
    torch.testing.assert_close(raw.grad, expected)
    assert rgb_logit.grad.abs().sum() > 0
    assert teacher.grad is None and nn_rgb.grad is None


def test_distill_loss_through_a_tiny_transmitter_reaches_the_latent():
    from shapee.models import Transmitter

    model = Transmitter(
        encoder=dict(width=32, heads=2, layers=1, data_ctx=16, d_latent=16, n_points=256, n_views=2,
                     pointconv_samples=16, pointconv_hidden=[32, 32], image_size=32),
        mlp=dict(d_hidden=8),
    )
    latent = torch.randn(2, model.encoder.latent_ctx, model.encoder.d_latent, requires_grad=True)
    points = uniform_box_points(2, 30)
    out = model.query(model.decode_params(latent), points)
    cloud = torch.rand(2, 64, 6)
    nn_rgb = nearest_cloud_colour(cloud[..., :3], cloud[..., 3:], points)
    losses = distill_loss(out, torch.randn(2, 30), nn_rgb)
    (losses["distill_sdf"] + losses["distill_rgb"]).backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_distill_loss_bad_shapes():
    with pytest.raises(ValueError, match="teacher_sdf"):
        distill_loss({"sdf": torch.zeros(2, 5), "stf_rgb": torch.zeros(2, 5, 3)}, torch.zeros(2, 4), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="nn_rgb"):
        distill_loss({"sdf": torch.zeros(2, 5), "stf_rgb": torch.zeros(2, 5, 3)}, torch.zeros(2, 5), torch.zeros(2, 5, 4))


# ------------------------------------------------------------------------------------------------ teachers
def _record_batch(B=2, S=300, N=40):
    g = torch.Generator().manual_seed(3)
    sdf_points = torch.rand(B, S, 3, generator=g) * 2 - 1
    return {
        "points": torch.rand(B, N, 6, generator=g),
        "sdf_points": sdf_points,
        "sdf": 0.5 - sdf_points.norm(dim=-1),
    }


def test_mesh_teacher_returns_a_random_subset_of_the_record_samples():
    batch = _record_batch()
    points, sdf = teacher_sdf(batch, "mesh", n_points=100, generator=torch.Generator().manual_seed(0))
    assert points.shape == (2, 100, 3) and sdf.shape == (2, 100)
    for b in range(2):
        # every returned (point, sdf) pair is one row of the record, no row twice
        match = (points[b, :, None, :] == batch["sdf_points"][b, None, :, :]).all(-1)  # [100, S]
        assert (match.sum(-1) == 1).all()
        rows = match.float().argmax(-1)
        assert rows.unique().numel() == 100
        assert torch.equal(sdf[b], batch["sdf"][b, rows])
    # None (or more than there are): all samples, shuffled
    points_all, sdf_all = teacher_sdf(batch, "mesh", n_points=None)
    assert points_all.shape == (2, 300, 3)
    assert torch.equal(sdf_all.sort(dim=1).values, batch["sdf"].sort(dim=1).values)
    assert not torch.equal(sdf_all, batch["sdf"])


def test_mesh_teacher_uniform_only_uses_the_mask_or_refuses():
    batch = _record_batch()
    with pytest.raises(KeyError, match="sdf_is_uniform"):
        teacher_sdf(batch, "mesh", n_points=10, uniform_only=True)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[:, ::3] = True  # 100 "uniform" rows per asset
    batch["sdf_is_uniform"] = mask
    points, _ = teacher_sdf(batch, "mesh", n_points=80, uniform_only=True)
    for b in range(2):
        rows = (points[b, :, None, :] == batch["sdf_points"][b, None, :, :]).all(-1).float().argmax(-1)
        assert mask[b, rows].all()
    with pytest.raises(ValueError, match="only 100 uniform"):
        teacher_sdf(batch, "mesh", n_points=150, uniform_only=True)


def test_pointe_teacher_queries_the_model_at_uniform_box_points_without_gradient():
    torch.manual_seed(0)
    model = PointESDF(**TINY_POINTE)  # training mode on purpose: the teacher must evaluate in eval mode and restore
    batch = _record_batch(N=40)
    points, sdf = teacher_sdf(batch, "pointe", pointe_model=model, n_points=64)
    assert points.shape == (2, 64, 3) and sdf.shape == (2, 64)
    assert points.min() >= -1 and points.max() <= 1 and points.abs().max() > 0.5
    assert not sdf.requires_grad
    assert model.training
    with torch.no_grad():
        expected = model.eval().world_sdf(points, batch["points"][:, :24, :3])
    torch.testing.assert_close(sdf, expected)


def test_teacher_errors_name_the_problem():
    batch = _record_batch(N=10)
    with pytest.raises(ValueError, match="teacher"):
        teacher_sdf(batch, "nearest")
    with pytest.raises(ValueError, match="pointe_model"):
        teacher_sdf(batch, "pointe", n_points=5)
    with pytest.raises(ValueError, match="n_ctx=24"):
        teacher_sdf(batch, "pointe", pointe_model=PointESDF(**TINY_POINTE), n_points=5)
    with pytest.raises(KeyError, match="load_sdf"):
        teacher_sdf({"points": batch["points"]}, "mesh", n_points=5)
