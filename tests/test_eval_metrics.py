"""Evaluation metrics on cases with a known answer: PSNR (identical, known noise), Chamfer (self, shifted copy),
F-score (known fraction within τ), mesh surface sampling, CLIP R-Precision (own matches = 100 %, known misses)."""

from __future__ import annotations

import math

import pytest
import torch

from shapee.eval.metrics import (
    chamfer_distance,
    f_score,
    nearest_distances,
    point_set_metrics,
    psnr,
    psnr_per_item,
    r_precision,
    retrieval_ranks,
    sample_mesh_points,
)


# ------------------------------------------------------------------------------------------------------- PSNR
def test_psnr_of_identical_images_is_infinite_or_the_cap():
    image = torch.rand(2, 8, 8, 3)
    assert psnr(image, image.clone()) == math.inf
    assert psnr(image, image.clone(), cap=60.0) == 60.0
    per_item = psnr_per_item(image, image.clone(), cap=80.0)
    assert per_item.tolist() == [80.0, 80.0]


def test_psnr_with_known_noise_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 32, 32, 3, generator=g, dtype=torch.float64)
    sigma = 0.05
    noise = torch.where(torch.rand(target.shape, generator=g, dtype=torch.float64) < 0.5, -sigma, sigma)
    noisy = target + noise  # every pixel off by exactly ±σ → MSE = σ² exactly
    expected = 10 * math.log10(1.0 / sigma**2)  # ≈ 26.02 dB
    assert psnr(noisy, target) == pytest.approx(expected, abs=1e-6)
    assert psnr(noisy * 255, target * 255, max_value=255.0) == pytest.approx(expected, abs=1e-6)
    # per item: item 1 has twice the error → 20·log10(2) ≈ 6.02 dB lower; the cap does not touch finite values below it
    noisy[1] = target[1] + 2 * noise[1]
    per_item = psnr_per_item(noisy, target, cap=100.0)
    assert per_item[0].item() == pytest.approx(expected, abs=1e-6)
    assert per_item[1].item() == pytest.approx(expected - 20 * math.log10(2), abs=1e-6)


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(2, 4, 4, 3), torch.zeros(2, 4, 4, 4))


# ----------------------------------------------------------------------------------------------- Chamfer
def _plane_points(n_side: int = 40) -> torch.Tensor:
    """A square grid of points on the plane z = 0, spacing 2/(n_side − 1): ``[n_side², 3]``."""
    u = torch.linspace(-1, 1, n_side, dtype=torch.float64)
    x, y = torch.meshgrid(u, u, indexing="ij")
    return torch.stack([x.flatten(), y.flatten(), torch.zeros(n_side * n_side, dtype=torch.float64)], dim=-1)


def test_chamfer_of_a_set_with_itself_is_zero():
    points = torch.rand(1000, 3) * 2 - 1
    assert chamfer_distance(points, points.clone()) == 0.0
    assert chamfer_distance(points, points.clone(), squared=True) == 0.0
    assert f_score(points, points.clone())["f_score"] == 1.0


def test_chamfer_of_a_shifted_copy_equals_the_shift():
    # Points on a plane, the copy shifted along the normal by δ: every nearest neighbour is the point's own copy
    # (|p − q − δn|² = |p − q|² + δ² ≥ δ²), so Chamfer-L1 = δ exactly, the squared variant 2δ².
    points = _plane_points()
    for delta in (0.001, 0.03, 0.5):
        shifted = points + torch.tensor([0.0, 0.0, delta], dtype=torch.float64)
        assert chamfer_distance(points, shifted, chunk=97) == pytest.approx(delta, rel=1e-9)
        assert chamfer_distance(points, shifted, squared=True) == pytest.approx(2 * delta**2, rel=1e-9)
    # An arbitrary shift direction on well-separated points (spacing ≫ 2|δ|): nearest neighbour = own copy.
    sparse = _plane_points(5) * 4  # spacing 2
    delta = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    assert chamfer_distance(sparse, sparse + delta) == pytest.approx(float(delta.norm()), rel=1e-9)


def test_chunked_nearest_distances_match_brute_force():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(300, 3, generator=g), torch.rand(211, 3, generator=g)
    brute = (a[:, None] - b[None]).norm(dim=-1).min(dim=1).values
    for chunk in (1, 7, 300, 10_000):
        torch.testing.assert_close(nearest_distances(a, b, chunk=chunk), brute, rtol=1e-6, atol=1e-7)


def test_f_score_counts_points_within_the_threshold():
    reference = _plane_points(5) * 4  # 25 points, spacing 2
    prediction = reference.clone()
    prediction[:5, 2] += 0.5  # 5 of 25 predicted points 0.5 away from the reference; the rest exact
    result = f_score(prediction, reference, threshold=0.02)
    assert result["precision"] == pytest.approx(20 / 25)
    assert result["recall"] == pytest.approx(20 / 25)  # the 5 moved reference partners lost their match too
    assert result["f_score"] == pytest.approx(0.8)
    # a looser threshold admits them all; a point exactly at τ counts
    assert f_score(prediction, reference, threshold=0.5)["f_score"] == 1.0
    far = f_score(reference + 10.0, reference, threshold=0.02)
    assert far == {"precision": 0.0, "recall": 0.0, "f_score": 0.0}
    # the one-pass combination agrees with the separate functions
    both = point_set_metrics(prediction, reference, threshold=0.02)
    assert both == {"chamfer": chamfer_distance(prediction, reference), **result}


def test_point_set_errors_name_the_input():
    good = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="b is empty"):
        chamfer_distance(good, torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"a must have shape \[N, 3\]"):
        chamfer_distance(torch.zeros(4, 2), good)
    with pytest.raises(ValueError, match="NaN"):
        chamfer_distance(torch.full((4, 3), float("nan")), good)
    with pytest.raises(ValueError, match="threshold"):
        f_score(good, good, threshold=0.0)


def test_mesh_sampling_is_on_the_surface_area_uniform_and_seeded():
    # Two unit-square faces on z=0 (area 1) and one triangle of area 0.5 on z=1: a third of the points go up.
    verts = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    points = sample_mesh_points(verts, faces, 30_000, generator=torch.Generator().manual_seed(0))
    assert points.shape == (30_000, 3)
    on_top = points[:, 2] == 1
    assert bool(((points[:, 2] == 0) | on_top).all())
    assert on_top.double().mean().item() == pytest.approx(1 / 3, abs=0.01)
    top = points[on_top]
    assert bool((top[:, 0] + top[:, 1] <= 1 + 1e-6).all())  # inside the triangle
    again = sample_mesh_points(verts, faces, 30_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(points, again)
    with pytest.raises(ValueError, match="without faces"):
        sample_mesh_points(verts, faces[:0], 10)


def test_chamfer_between_sampled_meshes_matches_the_shift():
    # A flat square mesh and its copy lifted by δ: dense samples on both give Chamfer ≈ δ (in-plane offsets add
    # only second-order terms), F-score 1 at τ > δ and 0 at τ < δ.
    verts = torch.tensor([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], dtype=torch.float32)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    # With n points on area 4 the in-plane nearest offset r has E[r²] = 4/(πn), so E[d] ≈ δ(1 + E[r²]/2δ²) ≈ 1.01 δ.
    delta = 0.1
    a = sample_mesh_points(verts, faces, 5000, generator=torch.Generator().manual_seed(0))
    b = sample_mesh_points(verts + torch.tensor([0, 0, delta]), faces, 5000, generator=torch.Generator().manual_seed(1))
    assert chamfer_distance(a, b) == pytest.approx(delta, rel=0.03)
    assert f_score(a, b, threshold=2 * delta)["f_score"] == 1.0
    assert f_score(a, b, threshold=0.5 * delta)["f_score"] == 0.0


# ------------------------------------------------------------------------------------------------ R-Precision
def test_r_precision_of_own_matches_is_100_percent():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(10, 32, generator=g)
    images = text.repeat(3, 1) * 5.0  # each "render" is exactly its text's embedding (scale does not matter)
    true_index = torch.arange(10).repeat(3)
    assert r_precision(images, text, true_index) == 1.0
    assert retrieval_ranks(images, text, true_index).tolist() == [0] * 30
    # shifting every image's label by one: the true text now ranks below the matching one → 0 %
    assert r_precision(images, text, (true_index + 1) % 10) == 0.0


def test_r_precision_known_fraction_and_ties_count_as_misses():
    text = torch.eye(4)  # 4 orthogonal prompts
    images = torch.stack([text[0], text[1], text[3], text[0] + text[2]])  # right, right, wrong (ties 3 others), tie (0 vs 2)
    true = torch.tensor([0, 1, 2, 2])
    ranks = retrieval_ranks(images, text, true)
    assert ranks.tolist() == [0, 0, 3, 1]
    assert r_precision(images, text, true) == 0.5
    # a degenerate embedding (all images = all texts equal) cannot score: everything ties
    assert r_precision(torch.ones(3, 4), torch.ones(3, 4), torch.arange(3)) == 0.0


def test_r_precision_input_errors():
    with pytest.raises(ValueError, match="share D"):
        r_precision(torch.zeros(2, 3), torch.zeros(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match="true_index must lie"):
        r_precision(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="at least 2 texts"):
        r_precision(torch.ones(2, 3), torch.ones(1, 3), torch.tensor([0, 0]))
