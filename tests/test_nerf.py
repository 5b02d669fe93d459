"""NeRF volume renderer: box clipping, sampling, integration against closed forms, chunking, gradients, images."""

import math

import pytest
import torch

from shapee.cameras import orbit_cameras
from shapee.render.nerf import (
    importance_samples,
    integrate_samples,
    ray_box_intersection,
    render_rays,
    render_views,
    stratified_samples,
)

# ------------------------------------------------------------------------------------------------- fields


def constant_field(sigma: float, colour=(0.9, 0.4, 0.1), outside: float = 0.0):
    """σ inside [-1, 1]³ (``outside`` elsewhere), one colour everywhere; the same for both levels."""
    c = torch.tensor(colour)

    def query(points, level):
        inside = (points.abs() <= 1 + 1e-5).all(dim=-1)  # [B, R, S]
        density = torch.where(inside, torch.full_like(points[..., 0], sigma), torch.full_like(points[..., 0], outside))
        return density, c.expand(points.shape).clone()

    return query


def sphere_field(radius: float = 0.5, sigma: float = 1e3, colour=(0.2, 0.7, 0.3)):
    c = torch.tensor(colour)

    def query(points, level):
        inside = points.norm(dim=-1) <= radius  # [B, R, S]
        return inside.to(points.dtype) * sigma, c.expand(points.shape).clone()

    return query


def axis_rays(n: int = 1):
    """``[1, n, 3]`` rays along +x through the centre, starting at x = −3 (chord [2, 4], length L = 2)."""
    origins = torch.tensor([-3.0, 0.0, 0.0]).expand(1, n, 3).clone()
    directions = torch.tensor([1.0, 0.0, 0.0]).expand(1, n, 3).clone()
    return origins, directions


def random_rays(b: int, r: int, seed: int = 0):
    """Rays from a sphere of radius 3 aimed near the origin: most hit the box, some miss."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(b, r, 3, generator=g)
    o = 3.0 * o / o.norm(dim=-1, keepdim=True)
    target = 1.6 * (torch.rand(b, r, 3, generator=g) - 0.5) * 2
    d = target - o
    return o, d / d.norm(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------- ray/box intersection


def test_ray_box_intersection_analytic_cases():
    s3 = math.sqrt(3.0)
    o = torch.tensor(
        [
            [-3.0, 0.0, 0.0],  # axis ray through the centre: [2, 4]
            [-3.0, -3.0, -3.0],  # diagonal through corners: [2√3, 4√3]
            [0.0, 0.0, 0.0],  # starts inside: [0, 1]
            [-3.0, 0.5, -0.25],  # parallel to the y and z slabs, inside them: [2, 4]
            [-3.0, 1.5, 0.0],  # parallel to y slab, outside it: miss
            [-3.0, 0.0, 0.0],  # pointing away: miss
            [0.0, 2.0, 0.0],  # touches only the edge x = y = 1: zero-length chord, miss
            [0.5, 0.0, 0.0],  # inside, not unit direction (2, 0, 0): t in units of |d|: [0, 0.25]
        ]
    )
    d = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [1 / s3, 1 / s3, 1 / s3],
            [0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0],
            [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
            [2.0, 0.0, 0.0],
        ]
    )
    t0, t1, hit = ray_box_intersection(o, d)
    assert hit.tolist() == [True, True, True, True, False, False, False, True]
    torch.testing.assert_close(t0, torch.tensor([2.0, 2 * s3, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(t1, torch.tensor([4.0, 4 * s3, 1.0, 4.0, 1.0, 1.0, 1.0, 0.25]), atol=1e-5, rtol=0)


def test_ray_box_min_dist_custom_box_and_batch_shape():
    o = torch.tensor([[0.0, 0.0, 0.0], [-5.0, 0.0, 0.0]]).expand(4, 2, 3)
    d = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).expand(4, 2, 3)
    t0, t1, hit = ray_box_intersection(o, d, bbox_min=(-1.0, -0.5, -1.0), bbox_max=(1.0, 2.0, 1.0), min_dist=0.25)
    assert t0.shape == t1.shape == hit.shape == (4, 2)
    torch.testing.assert_close(t0[0], torch.tensor([0.25, 4.0]))
    torch.testing.assert_close(t1[0], torch.tensor([2.0, 6.0]))
    assert hit.all()
    # min_dist past the exit point: the segment is empty, so the ray misses.
    _, _, hit = ray_box_intersection(o[:, :1], d[:, :1], min_dist=1.5)
    assert not hit.any()


def test_ray_box_rejects_bad_input():
    with pytest.raises(ValueError, match="origins"):
        ray_box_intersection(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="must match"):
        ray_box_intersection(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="bbox_max"):
        ray_box_intersection(torch.zeros(4, 3), torch.ones(4, 3), bbox_min=1.0, bbox_max=-1.0)


# -------------------------------------------------------------------------------------------------- sampling


def test_stratified_samples_stay_in_their_cells():
    t0 = torch.tensor([2.0, 0.0])
    t1 = torch.tensor([4.0, 1.0])
    n = 8
    det = stratified_samples(t0, t1, n, deterministic=True)  # [2, 8]
    even = t0[:, None] + (t1 - t0)[:, None] * torch.linspace(0, 1, n)
    mids = 0.5 * (even[:, 1:] + even[:, :-1])
    lower = torch.cat([t0[:, None], mids], dim=-1)
    upper = torch.cat([mids, t1[:, None]], dim=-1)
    torch.testing.assert_close(det, 0.5 * (lower + upper))
    g = torch.Generator().manual_seed(3)
    samples = stratified_samples(t0.expand(5000, 2), t1.expand(5000, 2), n, generator=g)  # [5000, 2, 8]
    assert (samples >= lower).all() and (samples <= upper).all()
    assert (samples.diff(dim=-1) >= 0).all()
    # Uniform jitter: the mean is the cell midpoint, and the spread covers the whole cell.
    torch.testing.assert_close(samples.mean(0), det, atol=0.01, rtol=0)
    span = samples.amax(0) - samples.amin(0)
    assert (span > 0.95 * (upper - lower)).all()
    again = stratified_samples(t0.expand(5000, 2), t1.expand(5000, 2), n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(samples, again)


def test_importance_samples_follow_the_weights():
    t0, t1 = torch.tensor([0.0]), torch.tensor([1.0])
    t = ((torch.arange(10.0) + 0.5) / 10)[None]  # [1, 10]: midpoint cells are [k/10, (k+1)/10]
    weights = torch.zeros(1, 10)
    weights[0, 3] = 0.6
    weights[0, 7] = 0.3
    n = 20000
    samples = importance_samples(t, weights, t0, t1, n, generator=torch.Generator().manual_seed(0))  # [1, n]
    assert samples.shape == (1, n)
    assert (samples.diff(dim=-1) >= 0).all() and samples.min() >= 0 and samples.max() <= 1
    counts = torch.bincount((samples[0] * 10).long().clamp_max(9), minlength=10).double() / n
    pmf = (weights[0].double() + 1e-5) / (weights[0].double() + 1e-5).sum()
    # Binomial standard error at p = 2/3 and n = 20000 is 0.0033: 0.015 is > 4 σ.
    torch.testing.assert_close(counts, pmf, atol=0.015, rtol=0)
    # Uniform inside the chosen cell: mean ≈ cell centre, spread ≈ width/√12.
    in_3 = samples[0][(samples[0] >= 0.3) & (samples[0] < 0.4)]
    assert abs(in_3.mean().item() - 0.35) < 0.003
    assert abs(in_3.std().item() - 0.1 / math.sqrt(12)) < 0.003
    # Deterministic quantiles put a share of samples ∝ the weights in each cell, too.
    det = importance_samples(t, weights, t0, t1, 90, deterministic=True)
    det_counts = torch.bincount((det[0] * 10).long().clamp_max(9), minlength=10)
    assert det_counts[3].item() == 60 and det_counts[7].item() == 30


def test_importance_samples_do_not_carry_gradients():
    t0, t1 = torch.tensor([0.0]), torch.tensor([1.0])
    t = stratified_samples(t0, t1, 4, deterministic=True)
    w = torch.rand(1, 4, requires_grad=True)
    assert not importance_samples(t, w, t0, t1, 8, deterministic=True).requires_grad


# ----------------------------------------------------------------------------------------------- integration


def test_integration_matches_closed_form_and_gradcheck():
    # Two dense samples: weights follow α_i T_i exactly.
    t = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    sigma = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    rgb = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    out = integrate_samples(t, sigma, rgb, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                            background=torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    # δ = (0.5, 0.5): w0 = 1 − e^{−1}, w1 = e^{−1}(1 − e^{−2}), T = e^{−3}.
    w = torch.tensor([1 - math.exp(-1), math.exp(-1) * (1 - math.exp(-2))], dtype=torch.float64)
    torch.testing.assert_close(out["weights"][0], w)
    torch.testing.assert_close(out["transmittance"][0], torch.tensor(math.exp(-3), dtype=torch.float64))
    torch.testing.assert_close(out["rgb"][0], torch.tensor([w[0], w[1], math.exp(-3)], dtype=torch.float64))
    torch.testing.assert_close(out["distance"][0], 0.25 * w[0] + 0.75 * w[1])

    sigma = sigma.clone().requires_grad_()
    rgb = rgb.clone().requires_grad_()
    ends = (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))

    def f(s, c):
        o = integrate_samples(t, s, c, *ends)
        return o["rgb"], o["transmittance"], o["distance"]

    assert torch.autograd.gradcheck(f, (sigma, rgb))


def test_integration_casts_low_precision_to_fp32():
    t = torch.linspace(0.1, 0.9, 5)[None]
    out = integrate_samples(t, torch.ones(1, 5, dtype=torch.bfloat16), torch.ones(1, 5, 3, dtype=torch.bfloat16),
                            torch.zeros(1), torch.ones(1))
    assert out["rgb"].dtype == torch.float32 and out["transmittance"].dtype == torch.float32
    torch.testing.assert_close(out["transmittance"], torch.tensor([math.exp(-1)]), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------- render_rays


@pytest.mark.parametrize("sigma", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("deterministic", [True, False])
def test_constant_density_gives_beer_lambert(sigma, deterministic):
    colour = torch.tensor([0.9, 0.4, 0.1])
    o, d = axis_rays(3)
    out = render_rays(constant_field(sigma, tuple(colour.tolist())), o, d, n_coarse=16, n_fine=32,
                      deterministic=deterministic, generator=torch.Generator().manual_seed(1))
    L, t0 = 2.0, 2.0
    expected_t = math.exp(-sigma * L)
    # The cells tile [t0, t1] exactly and σ is constant on it, so this is exact up to rounding.
    for key in ("transmittance", "transmittance_coarse"):
        torch.testing.assert_close(out[key], torch.full((1, 3), expected_t), atol=1e-5, rtol=0)
    for key in ("rgb", "rgb_coarse"):
        torch.testing.assert_close(out[key], (1 - expected_t) * colour.expand(1, 3, 3), atol=1e-5, rtol=0)
    # Distance: ∫ σ e^{−σs} (t0 + s) ds over [0, L]; sampling makes this approximate (a quadrature).
    expected_d = t0 * (1 - expected_t) + (1 - expected_t) / sigma - L * expected_t
    for key in ("distance", "distance_coarse"):
        torch.testing.assert_close(out[key], torch.full((1, 3), expected_d), atol=0.03 * expected_d, rtol=0)
    assert out["weights"].shape == out["t"].shape == (1, 3, 48)
    assert out["weights_coarse"].shape == (1, 3, 16)
    assert out["hit"].all()


def test_empty_space_and_missing_rays_show_the_background():
    background = (0.2, 0.5, 0.9)
    o, d = random_rays(2, 50)
    empty = render_rays(constant_field(0.0), o, d, n_coarse=8, n_fine=8, background=background)
    for suffix in ("", "_coarse"):
        torch.testing.assert_close(empty["rgb" + suffix], torch.tensor(background).expand(2, 50, 3))
        torch.testing.assert_close(empty["transmittance" + suffix], torch.ones(2, 50))
        torch.testing.assert_close(empty["distance" + suffix], torch.zeros(2, 50))
    # Rays that miss the box see nothing, even where the field has density outside it.
    o = torch.tensor([[[-3.0, 1.5, 0.0], [-3.0, 0.0, 0.0]]])
    d = torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]])
    miss = render_rays(constant_field(2.0, outside=5.0), o, d, n_coarse=8, n_fine=8, background=background)
    assert not miss["hit"].any()
    for suffix in ("", "_coarse"):
        torch.testing.assert_close(miss["rgb" + suffix], torch.tensor(background).expand(1, 2, 3))
        torch.testing.assert_close(miss["transmittance" + suffix], torch.ones(1, 2))
    torch.testing.assert_close(miss["t0"], torch.zeros(1, 2))
    torch.testing.assert_close(miss["t1"], torch.ones(1, 2))


def test_dense_sphere_depth_matches_the_surface():
    # Rays from (0, y, −3) along +z hit a sphere of radius 0.5 at distance 3 − sqrt(0.25 − y²).
    y = torch.tensor([0.0, 0.2, 0.3, 0.45])
    o = torch.stack([torch.zeros(4), y, torch.full((4,), -3.0)], dim=-1)[None]  # [1, 4, 3]
    d = torch.tensor([0.0, 0.0, 1.0]).expand(1, 4, 3)
    out = render_rays(sphere_field(), o, d, generator=torch.Generator().manual_seed(0))
    surface = 3.0 - torch.sqrt(0.25 - y**2)
    # Coarse cells are 2/64 ≈ 0.031 long; the fine pass packs its samples around the surface.
    torch.testing.assert_close(out["distance_coarse"][0], surface, atol=0.035, rtol=0)
    torch.testing.assert_close(out["distance"][0], surface, atol=0.01, rtol=0)
    assert (out["transmittance"] < 1e-4).all()
    assert "depth" not in out  # no camera z given


def test_planar_depth_of_a_slab_is_constant_across_rays():
    # Dense slab z ≥ 0.2 inside the box; camera at (0, 0, −3) looking along +z: planar depth 3.2 for every ray.
    def slab(points, level):
        density = (points[..., 2] >= 0.2).to(points.dtype) * 1e3
        return density, torch.ones_like(points)

    angle = torch.linspace(-0.25, 0.25, 7)
    d = torch.stack([torch.sin(angle), 0.3 * torch.sin(angle), torch.cos(angle)], dim=-1)
    d = (d / d.norm(dim=-1, keepdim=True))[None]  # [1, 7, 3]
    o = torch.tensor([0.0, 0.0, -3.0]).expand(1, 7, 3)
    out = render_rays(slab, o, d, view_z=torch.tensor([0.0, 0.0, 1.0]), deterministic=True)
    torch.testing.assert_close(out["depth"], torch.full((1, 7), 3.2), atol=0.01, rtol=0)
    torch.testing.assert_close(out["distance"], 3.2 / d[..., 2], atol=0.012, rtol=0)
    torch.testing.assert_close(out["depth_coarse"], out["distance_coarse"] * d[..., 2])


@pytest.mark.parametrize("deterministic", [True, False])
def test_chunked_equals_unchunked(deterministic):
    o, d = random_rays(2, 37)
    field = sphere_field(radius=0.7, sigma=5.0)
    kw = dict(n_coarse=8, n_fine=16, deterministic=deterministic, background=(0.1, 0.2, 0.3))
    whole = render_rays(field, o, d, chunk_size=None, generator=torch.Generator().manual_seed(7), **kw)
    chunked = render_rays(field, o, d, chunk_size=5, generator=torch.Generator().manual_seed(7), **kw)
    assert whole.keys() == chunked.keys()
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k
    assert whole["hit"].any() and not whole["hit"].all()  # both kinds of rays were exercised


def test_seeded_and_deterministic_modes_reproduce():
    o, d = random_rays(1, 16)
    field = sphere_field(radius=0.7, sigma=5.0)
    kw = dict(n_coarse=8, n_fine=16)
    a = render_rays(field, o, d, generator=torch.Generator().manual_seed(1), **kw)
    b = render_rays(field, o, d, generator=torch.Generator().manual_seed(1), **kw)
    c = render_rays(field, o, d, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["t"], b["t"])
    assert not torch.equal(a["t"], c["t"])  # the jitter is real
    e = render_rays(field, o, d, deterministic=True, **kw)
    f = render_rays(field, o, d, deterministic=True, **kw)
    assert torch.equal(e["rgb"], f["rgb"]) and torch.equal(e["t"], f["t"])


def test_gradients_reach_the_field_outputs():
    sigma = torch.tensor(1.5, requires_grad=True)
    colour = torch.tensor([0.9, 0.4, 0.1], requires_grad=True)
    used = []

    def query(points, level):
        used.append(level)
        inside = (points.abs() <= 1 + 1e-5).all(dim=-1).to(points.dtype)
        return inside * sigma, colour.expand(points.shape)

    o, d = axis_rays(1)
    out = render_rays(query, o, d, n_coarse=8, n_fine=8, generator=torch.Generator().manual_seed(0))
    assert used == ["coarse", "fine"]
    out["rgb"].sum().backward()
    L = 2.0
    # d/dc [(1 − e^{−σL}) c] = 1 − e^{−σL}; d/dσ Σ_c (1 − e^{−σL}) c = L e^{−σL} Σ c.
    torch.testing.assert_close(colour.grad, torch.full((3,), 1 - math.exp(-1.5 * L)), atol=1e-5, rtol=0)
    torch.testing.assert_close(sigma.grad, torch.tensor(L * math.exp(-1.5 * L) * 1.4), atol=1e-5, rtol=0)
    sigma.grad = None
    out = render_rays(query, o, d, n_coarse=8, n_fine=8, generator=torch.Generator().manual_seed(0))
    out["transmittance_coarse"].sum().backward()  # d/dσ e^{−σL} = −L e^{−σL}
    torch.testing.assert_close(sigma.grad, torch.tensor(-L * math.exp(-1.5 * L)), atol=1e-5, rtol=0)


def test_fine_pass_requeries_all_merged_samples_per_asset():
    seen = {}

    def query(points, level):
        seen[level] = points.shape
        # Asset b is coloured b/2: each asset gets its own field.
        b = torch.arange(points.shape[0], dtype=points.dtype)[:, None, None, None]
        return torch.ones_like(points[..., 0]), (b / 2).expand(points.shape)

    o, d = random_rays(3, 10)
    out = render_rays(query, o, d, n_coarse=6, n_fine=9, deterministic=True)
    assert seen == {"coarse": (3, 10, 6, 3), "fine": (3, 10, 15, 3)}
    assert (out["t"].diff(dim=-1) >= 0).all()
    # Every coarse t is among the fine ts (separate_shared_samples merges, it does not replace).
    assert torch.isin(out["t_coarse"], out["t"]).all()
    expected = (1 - out["transmittance"])[..., None] * (torch.arange(3.0) / 2)[:, None, None]
    torch.testing.assert_close(out["rgb"], expected.expand(3, 10, 3))


def test_low_precision_field_is_integrated_in_fp32():
    def query(points, level):
        return torch.ones_like(points[..., 0], dtype=torch.bfloat16), torch.ones_like(points, dtype=torch.bfloat16)

    o, d = axis_rays(2)
    out = render_rays(query, o, d, n_coarse=8, n_fine=8, deterministic=True)
    assert out["rgb"].dtype == torch.float32
    torch.testing.assert_close(out["transmittance"], torch.full((1, 2), math.exp(-2.0)), atol=1e-6, rtol=0)


def test_render_rays_rejects_bad_input():
    o, d = axis_rays(2)
    field = constant_field(1.0)
    with pytest.raises(ValueError, match="origins"):
        render_rays(field, o[0], d[0])
    with pytest.raises(ValueError, match="directions"):
        render_rays(field, o, d[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        render_rays(field, o, d, chunk_size=0)
    with pytest.raises(ValueError, match="n_coarse"):
        render_rays(field, o, d, n_coarse=0)
    with pytest.raises(ValueError, match="background"):
        render_rays(field, o, d, background=(0.0, 1.0))
    with pytest.raises(ValueError, match="view_z"):
        render_rays(field, o, d, view_z=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="query_fn"):
        render_rays(lambda p, level: (p[..., 0, 0], p), o, d)


# ------------------------------------------------------------------------------------------------ render_views


def test_render_views_images_back_project_onto_the_sphere():
    radius = 0.5
    cams = [orbit_cameras(2, resolution=15), orbit_cameras(3, resolution=15, start_angle=1.0)[1:]]
    field = sphere_field(radius=radius)
    out = render_views(field, cams, n_coarse=64, n_fine=32, chunk_size=50, deterministic=True,
                       background=(1.0, 1.0, 1.0))
    # The fine samples fill the coarse cell of the first sample inside; the surface can sit up to half a coarse
    # spacing before it (no blur pool, as the official renderer): chords ≤ 2√3 over 63 gaps → ≤ 0.028 error.
    tol = 0.03
    assert out["rgb"].shape == (2, 2, 15, 15, 3) and out["depth"].shape == (2, 2, 15, 15)
    opaque = out["transmittance"] < 1e-3  # [2, 2, 15, 15]
    # The centre pixel looks at the origin: planar depth = 4 − r; the corners see the background.
    torch.testing.assert_close(out["depth"][..., 7, 7], torch.full((2, 2), 4.0 - radius), atol=tol, rtol=0)
    assert opaque[..., 7, 7].all() and not opaque[..., 0, 0].any()
    torch.testing.assert_close(out["rgb"][..., 0, 0, :], torch.ones(2, 2, 3))
    # Planar depth along each asset's own camera z back-projects onto the sphere.
    for b in range(2):
        points = cams[b].depth_to_points(out["depth"][b])  # [N, H, W, 3]
        r = points.norm(dim=-1)[opaque[b]]
        assert r.numel() > 40
        torch.testing.assert_close(r, torch.full_like(r, radius), atol=tol, rtol=0)
    # Deterministic images do not depend on the chunk size.
    other = render_views(field, cams, n_coarse=64, n_fine=32, chunk_size=1000, deterministic=True,
                         background=(1.0, 1.0, 1.0))
    for k in out:
        torch.testing.assert_close(out[k], other[k], atol=1e-6, rtol=0)


def test_render_views_shared_cameras_and_bad_input():
    cams = orbit_cameras(2, resolution=4)
    out = render_views(constant_field(1.0), cams, n_assets=3, n_coarse=4, n_fine=4, deterministic=True)
    assert out["rgb"].shape == (3, 2, 4, 4, 3)
    assert torch.equal(out["rgb"][0], out["rgb"][2])
    with pytest.raises(ValueError, match="n_assets"):
        render_views(constant_field(1.0), [cams, cams], n_assets=3)
    with pytest.raises(ValueError, match="same number of views"):
        render_views(constant_field(1.0), [cams, cams[:1]])
    with pytest.raises(ValueError, match="chunk_size"):
        render_views(constant_field(1.0), cams, chunk_size=0)


# ------------------------------------------------------------------------------------- speed paths, same result


def two_head_field(calls=None, nan_outside: bool = False):
    """A pointwise field with different coarse and fine heads that also answers ``level="both"`` (one evaluation,
    both heads, as the NeRSTF MLP). Records ``(level, points.shape)`` of every call in ``calls``."""

    def heads(points):
        x, y, z = points.unbind(-1)
        density_c = 3.0 * torch.relu(0.8 - points.norm(dim=-1))  # [B, R, S]
        density_f = 5.0 * torch.relu(0.6 - (points - 0.1).norm(dim=-1))
        rgb_c = torch.stack([x.sigmoid(), y.sigmoid(), z.sigmoid()], dim=-1)  # [B, R, S, 3]
        rgb_f = torch.stack([(x * y).sigmoid(), z.cos() * 0.5 + 0.5, x.sin() * 0.5 + 0.5], dim=-1)
        if nan_outside:  # garbage where no ray that hits the box ever samples
            outside = (points.abs() > 1 + 1e-4).any(dim=-1)  # [B, R, S]
            density_c = torch.where(outside, torch.nan, density_c)
            rgb_c = torch.where(outside[..., None], torch.nan, rgb_c)
            rgb_f = torch.where(outside[..., None], torch.nan, rgb_f)
        return {"coarse": (density_c, rgb_c), "fine": (density_f, rgb_f)}

    def query(points, level):
        if calls is not None:
            calls.append((level, tuple(points.shape)))
        out = heads(points)
        return out if level == "both" else out[level]

    return query


@pytest.mark.parametrize("deterministic", [True, False])
def test_query_chunk_and_shared_levels_do_not_change_the_result(deterministic):
    o, d = random_rays(2, 37)
    kw = dict(n_coarse=8, n_fine=16, deterministic=deterministic, background=(0.1, 0.2, 0.3))
    field = two_head_field()
    ref = render_rays(field, o, d, query_chunk=None, generator=torch.Generator().manual_seed(3), **kw)
    assert ref["hit"].any() and not ref["hit"].all()
    assert (ref["transmittance"] < 0.9).any() and (ref["transmittance_coarse"] < 0.9).any()  # both heads show
    for options in (dict(query_chunk=50), dict(query_chunk=1), dict(shared_levels=True),
                    dict(shared_levels=True, query_chunk=70, chunk_size=9)):
        out = render_rays(field, o, d, generator=torch.Generator().manual_seed(3), **options, **kw)
        assert out.keys() == ref.keys()
        for k in ref:
            assert torch.equal(out[k], ref[k]), (options, k)


def test_query_chunk_bounds_the_points_per_call_and_calls_hold_whole_rays():
    calls = []
    o, d = random_rays(2, 37)
    render_rays(two_head_field(calls), o, d, n_coarse=8, n_fine=16, deterministic=True, query_chunk=100)
    assert calls and all(level in ("coarse", "fine") for level, _ in calls)
    for level, (B, r, S, _) in calls:
        assert S == (8 if level == "coarse" else 24)  # whole rays: every call has all samples of its rays
        assert B * r * S <= 100
    # Coarse: 24 hit rays at most per asset (hits 24 and 20), 100 // (2·8) = 6 rays per call → 4 calls.
    assert sum(level == "coarse" for level, _ in calls) == 4
    assert sum(r for level, (_, r, _, _) in calls if level == "coarse") == 24
    # A single ray over the budget is still one call.
    calls.clear()
    render_rays(two_head_field(calls), o, d, n_coarse=8, n_fine=16, deterministic=True, query_chunk=1)
    assert {r for _, (_, r, _, _) in calls} == {1}


def test_shared_levels_evaluate_each_sample_once_and_skip_missing_rays():
    calls = []
    o, d = random_rays(2, 37)  # asset hits: 24 and 20 of 37
    render_rays(two_head_field(calls), o, d, n_coarse=8, n_fine=16, deterministic=True, shared_levels=True,
                query_chunk=None)
    assert calls == [("both", (2, 24, 8, 3)), ("fine", (2, 24, 16, 3))]
    calls.clear()
    render_rays(two_head_field(calls), o, d, n_coarse=8, n_fine=16, deterministic=True, query_chunk=None)
    assert calls == [("coarse", (2, 24, 8, 3)), ("fine", (2, 24, 24, 3))]  # the official amount of work
    # Rays of an asset that hit nothing are never evaluated, however bad the field is out there.
    calls.clear()
    away = o / o.norm(dim=-1, keepdim=True)  # every ray pointed away from the box (origins are outside it)
    nan_field = two_head_field(calls, nan_outside=True)
    miss = render_rays(nan_field, o, away, n_coarse=8, n_fine=16, background=(0.1, 0.2, 0.3), shared_levels=True,
                       generator=torch.Generator().manual_seed(0))
    assert calls == [] and not miss["hit"].any()
    torch.testing.assert_close(miss["rgb"], torch.tensor([0.1, 0.2, 0.3]).expand(2, 37, 3), atol=0, rtol=0)
    assert torch.equal(miss["transmittance"], torch.ones(2, 37))
    # Mixed: missing rays evaluated as padding (asset 1 hits 20 of the 24 rays sent) are masked out entirely.
    for shared in (False, True):
        mixed = render_rays(nan_field, o, d, n_coarse=8, n_fine=16, shared_levels=shared,
                            generator=torch.Generator().manual_seed(0))
        assert all(torch.isfinite(v).all() for k, v in mixed.items() if k != "hit"), shared


def test_shared_levels_give_the_same_gradients():
    o, d = random_rays(1, 23)
    scale = torch.tensor(1.3, requires_grad=True)
    tint = torch.tensor([0.9, 0.5, 0.2], requires_grad=True)
    base = two_head_field()

    def learnable(points, level):
        out = base(points, level)
        scaled = {lv: (s * scale, c * tint) for lv, (s, c) in (out.items() if level == "both" else [(level, out)])}
        return scaled if level == "both" else scaled[level]

    grads = []
    for options in (dict(query_chunk=None), dict(shared_levels=True, query_chunk=40)):
        scale.grad = tint.grad = None
        out = render_rays(learnable, o, d, n_coarse=8, n_fine=16, generator=torch.Generator().manual_seed(5), **options)
        (out["rgb"].sum() + out["rgb_coarse"].sum() + out["transmittance"].sum()).backward()
        grads.append((scale.grad.clone(), tint.grad.clone()))
    assert grads[0][0] != 0 and (grads[0][1] != 0).all()
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-6)


def test_nerstf_mlp_renders_the_same_with_the_fast_paths():
    from shapee.implicit import NeRSTFMLP

    torch.manual_seed(0)
    mlp = NeRSTFMLP(d_hidden=16)
    with torch.no_grad():  # visible, varied densities and colours in both heads
        mlp.mlp[-1].weight.mul_(30.0)
        mlp.mlp[-1].bias[1:3] = 1.0

    def field(points, level):
        B, R, S, _ = points.shape
        out = mlp(None, points.reshape(B, R * S, 3))

        def heads(lv):
            return out[f"density_{lv}"].reshape(B, R, S), out[f"nerf_rgb_{lv}"].reshape(B, R, S, 3)

        return {"coarse": heads("coarse"), "fine": heads("fine")} if level == "both" else heads(level)

    o, d = random_rays(2, 64, seed=1)
    kw = dict(n_coarse=16, n_fine=32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = render_rays(field, o, d, query_chunk=None, **kw)  # the official work: whole chunks, re-queried
        kw["generator"].manual_seed(2)
        fast = render_rays(field, o, d, query_chunk=300, shared_levels=True, **kw)
    for k in ("transmittance", "transmittance_coarse"):  # the MLP's densities matter and vary
        assert (ref[k] < 0.5).any() and (ref[k][ref["hit"]] > 0.6).any(), k
    for k in ref:  # rows of a linear layer do not depend on the batch: equal up to the BLAS's rounding at most
        torch.testing.assert_close(fast[k], ref[k], atol=1e-6, rtol=1e-6, msg=k)


def test_speed_options_reach_render_views_and_bad_values_are_refused():
    from shapee.render.nerf import default_query_chunk

    assert default_query_chunk("cpu") == 4096 and default_query_chunk(torch.device("cuda")) is None
    cams = orbit_cameras(2, resolution=9)
    kw = dict(n_coarse=8, n_fine=8, deterministic=True, background=(1.0, 1.0, 1.0))
    ref = render_views(two_head_field(), cams, query_chunk=None, **kw)
    fast = render_views(two_head_field(), cams, query_chunk=64, shared_levels=True, chunk_size=30, **kw)
    assert (ref["transmittance"] < 0.9).any()
    for k in ref:
        assert torch.equal(fast[k], ref[k]), k
    o, d = axis_rays(2)
    for bad in (0, -3, 2.5, "big", True):
        with pytest.raises(ValueError, match="query_chunk"):
            render_rays(constant_field(1.0), o, d, query_chunk=bad)
    with pytest.raises(ValueError, match="'coarse' and 'fine'"):
        render_rays(constant_field(1.0), o, d, shared_levels=True)  # answers (σ, rgb) to level "both"


def test_bench_nerf_renders_a_whole_view():
    from shapee.benchmarks.encoder import bench_nerf

    r = bench_nerf(repeats=1, warmup=0, mlp_kwargs=dict(d_hidden=8), n_coarse=4, n_fine=4, device="cpu")
    assert r["settings"]["rays_per_asset"] == 64 * 64 and r["settings"]["shared_levels"]
    assert r["seconds_per_64x64_view"] == r["seconds_median"] > 0
    assert r["rays_per_second"] == pytest.approx(4096 / r["seconds_median"])
    assert r["cpu_seconds_median"] > 0
