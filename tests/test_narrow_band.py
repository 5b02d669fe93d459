"""Narrow-band SDF grid (shapee.render.grid.query_grid_narrow_band): the same Marching Cubes mesh as the dense grid.

Equality is checked at 128³ (three levels: 33³ dense, then 65³ and 128³ in the band) on analytic fields, where a
dense 128³ query is cheap, and at 64³ (two levels) through a tiny Transmitter and the differentiable renderer.
"""

import math

import pytest
import torch

from shapee.models import Transmitter, meshing
from shapee.render import grid as render_grid
from shapee.render import mesh as render_mesh
from shapee.render import stf

G = 128


def sphere(p, radius=0.5, center=(0.0, 0.0, 0.0)):
    return radius - (p - torch.tensor(center).to(p)).norm(dim=-1)  # [B, P], positive inside


def box(p, half, center):
    q = (p - center).abs() - half  # [B, P, 3]
    outside = q.clamp_min(0).norm(dim=-1)
    inside = q.amax(dim=-1).clamp_max(0)
    return -(outside + inside)  # exact box SDF (Lipschitz 1), positive inside


def torus(p, major=0.55, minor=0.05):
    ring = torch.stack([p[..., :2].norm(dim=-1) - major, p[..., 2]], dim=-1)
    return minor - ring.norm(dim=-1)  # a tube ~3 voxels thick at 128³


def random_field(seed: int):
    """A union of spheres and boxes plus smooth noise (slope ≤ 0.12): structure well above the coarse cell."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, 3, generator=g) * 1.0 - 0.5
    radii = torch.rand(3, generator=g) * 0.25 + 0.15
    box_center = torch.rand(3, generator=g) * 0.8 - 0.4
    half = torch.rand(3, generator=g) * 0.3 + 0.1
    freq = torch.randn(4, 3, generator=g) * 2.0  # rad per unit, |ω| ≈ 3.5
    phase = torch.rand(4, generator=g) * 2 * math.pi
    amp = 0.1 / (4 * freq.norm(dim=-1).clamp_min(1.0))  # Σ amp·|ω| ≤ 0.1

    def fn(p):  # [B, P, 3] -> [B, P]
        parts = [sphere(p, float(r), tuple(c.tolist())) for r, c in zip(radii, centers)]
        parts.append(box(p, half.to(p), box_center.to(p)))
        sdf = torch.stack(parts, dim=-1).amax(dim=-1)  # union (positive inside)
        noise = (amp.to(p) * torch.sin(p @ freq.T.to(p) + phase.to(p))).sum(-1)
        return sdf + noise

    return fn


def per_asset(*fields):
    """One query function for a batch whose asset b is ``fields[b]`` (different bands per asset)."""

    def fn(p):
        assert p.shape[0] == len(fields)
        return torch.stack([f(p[b : b + 1])[0] for b, f in enumerate(fields)])

    return fn


def counted(fn):
    calls = []

    def wrapped(p):
        calls.append(p.shape[0] * p.shape[1])
        return fn(p)

    return wrapped, calls


def assert_same_meshes(dense, narrow, bounds=(-1.0, 1.0)):
    """Same faces, vertices to float tolerance, for every asset of two grids ``[B, N, N, N]``."""
    assert dense.shape == narrow.shape
    assert torch.equal(dense > 0, narrow > 0)  # the right side of 0 everywhere
    pairs = zip(render_mesh.extract_meshes(dense, bounds), render_mesh.extract_meshes(narrow, bounds))
    for (v1, f1), (v2, f2) in pairs:
        assert f1.shape[0] > 0
        assert torch.equal(f1, f2)
        torch.testing.assert_close(v2, v1, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- equal to the dense grid
def test_sphere_same_mesh_with_a_ninth_of_the_queries():
    fn, calls = counted(sphere)
    narrow = render_grid.query_grid(fn, 1, G, narrow_band=True)
    assert render_grid._band_sizes(G) == [128, 65, 33]
    assert sum(calls) < 0.12 * G**3  # 237k of 2.1M points (r = 0.5; the query cost grows with the area)
    dense = render_grid.query_grid(sphere, 1, G)
    assert_same_meshes(dense, narrow)
    # Samples at the surface are exact; far away the fill has the right side but is not the field.
    near = dense.abs() < 0.02
    assert torch.equal(narrow[near], dense[near])
    assert not torch.equal(narrow, dense)


def test_random_smooth_fields_as_a_batch():
    fields = [random_field(seed) for seed in range(3)]
    fn = per_asset(*fields)
    narrow = render_grid.query_grid(fn, 3, G, narrow_band=True, chunk=50_000)
    dense = render_grid.query_grid(fn, 3, G, chunk=None)
    assert_same_meshes(dense, narrow)
    # Each asset alone gives the same grid as in the batch (its band does not depend on the others').
    for b, f in enumerate(fields):
        alone = render_grid.query_grid(f, 1, G, narrow_band=True)
        assert torch.equal(alone[0] > 0, narrow[b] > 0)
        near = dense[b].abs() < 0.02
        torch.testing.assert_close(alone[0][near], dense[b][near], rtol=0, atol=1e-6)


def test_thin_torus_and_non_default_bounds_and_size():
    assert_same_meshes(render_grid.query_grid(torus, 1, G), render_grid.query_grid(torus, 1, G, narrow_band=True))
    # An odd size and shifted bounds: the coarse levels reach a few voxels past hi (queried, then cropped).
    shifted = lambda p: torus(p - 1.0)  # noqa: E731
    bounds = (0.0, 2.0)
    dense = render_grid.query_grid(shifted, 1, 101, bounds)
    narrow = render_grid.query_grid(shifted, 1, 101, bounds, narrow_band=True)
    assert render_grid._band_sizes(101) == [101, 51]
    assert_same_meshes(dense, narrow, bounds)


def test_field_positive_on_the_boundary_and_grid_too_small_to_narrow():
    big = lambda p: sphere(p, 1.3)  # noqa: E731  (closed by the −1 padding)
    assert_same_meshes(render_grid.query_grid(big, 1, G), render_grid.query_grid(big, 1, G, narrow_band=True))
    fn, calls = counted(sphere)
    small = render_grid.query_grid(fn, 2, 24, narrow_band=True)  # below two levels: the dense grid itself
    assert sum(calls) == 2 * 24**3 and torch.equal(small, render_grid.query_grid(sphere, 2, 24))


def test_empty_field_costs_only_the_coarse_grid():
    fn, calls = counted(lambda p: torch.full(p.shape[:2], -0.5))
    narrow = render_grid.query_grid(fn, 2, G, narrow_band=True)
    assert sum(calls) == 2 * 33**3
    assert bool((narrow < 0).all())
    assert all(f.shape[0] == 0 for _, f in render_mesh.extract_meshes(narrow))
    # One asset empty, one not: the batch still works and the empty one stays empty.
    mixed = render_grid.query_grid(per_asset(lambda p: torch.full(p.shape[:2], -0.5), sphere), 2, G, narrow_band=True)
    (v0, f0), (v1, f1) = render_mesh.extract_meshes(mixed)
    assert f0.shape[0] == 0 and f1.shape[0] > 0


def test_what_the_band_cannot_see():
    """A steep bump narrower than a coarse cell, between coarse samples, with |sdf| = 0.5 at all of them: the band
    (Lipschitz ≤ 1.15 by default) skips it; a wider band_width (or the dense grid) finds it."""
    h = 2.0 / (G - 1)
    center = (-1.0 + 61 * h, -1.0 + 42 * h, 0.0)  # 2+ voxels from every sample of the coarsest (every 4th) grid

    def bump(p):  # slope ≈ 30 near the bump: far from a distance field
        d2 = (p - torch.tensor(center)).square().sum(-1)
        return -0.5 + torch.exp(-d2 / (1.5 * h) ** 2)

    (_, f_dense), = render_mesh.extract_meshes(render_grid.query_grid(bump, 1, G))
    (_, f_narrow), = render_mesh.extract_meshes(render_grid.query_grid(bump, 1, G, narrow_band=True))
    assert f_dense.shape[0] > 0 and f_narrow.shape[0] == 0
    wide = render_grid.query_grid(bump, 1, G, narrow_band=True, band_width=8.0)
    assert_same_meshes(render_grid.query_grid(bump, 1, G), wide)


def test_bad_band_arguments():
    with pytest.raises(ValueError, match="band_width"):
        render_grid.query_grid(sphere, 1, 64, narrow_band=True, band_width=0.0)
    with pytest.raises(ValueError, match="band_dilation"):
        render_grid.query_grid(sphere, 1, 64, narrow_band=True, band_dilation=-1)
    with pytest.raises(ValueError, match="query_fn must map points"):
        render_grid.query_grid(lambda p: p[..., :2], 1, 64, narrow_band=True)
    with pytest.raises(ValueError, match="batch_size"):
        render_grid.query_grid(sphere, 0, 64, narrow_band=True)


def test_default_chunk_per_device():
    assert render_grid.default_chunk("cpu") == 4096 and render_grid.default_chunk(None) == 4096
    assert render_grid.default_chunk("cuda") == 2**16
    fn, calls = counted(sphere)
    render_grid.query_grid(fn, 1, 20)
    assert max(calls) == 4096 and sum(calls) == 20**3
    with pytest.raises(ValueError, match="chunk"):
        render_grid.query_grid(sphere, 1, 20, chunk="big")


# -------------------------------------------------------------------------------------- through a Transmitter
def tiny_transmitter() -> Transmitter:
    torch.manual_seed(0)
    return Transmitter(
        encoder=dict(width=32, heads=2, layers=1, data_ctx=16, d_latent=16, n_points=256, n_views=2,
                     pointconv_samples=16, pointconv_hidden=(32, 32), image_size=32),
        mlp=dict(d_hidden=16),
    ).eval()


class WithSphere:
    """A real tiny Transmitter whose SDF head (random: ≈ −0.1 plus small wiggles) is shifted by a sphere."""

    def __init__(self, t, radius=0.55):
        self.t, self.encoder, self.radius = t, t.encoder, radius

    def decode_params(self, latent):
        return self.t.decode_params(latent)

    def query(self, params, points):
        out = dict(self.t.query(params, points))
        out["sdf"] = out["sdf"] + sphere(points, self.radius)
        return out


def test_transmitter_meshes_equal_dense():
    t = WithSphere(tiny_transmitter())
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, t.encoder.latent_ctx, t.encoder.d_latent, generator=g).tanh()
    narrow = meshing.latent_to_mesh(t, latent, grid_size=64)
    dense = meshing.latent_to_mesh(t, latent, grid_size=64, narrow_band=False)
    for a, b in zip(narrow, dense):
        assert len(b.faces) > 1000
        assert (a.faces == b.faces).all()
        assert abs(a.vertices - b.vertices).max() < 1e-6
        assert abs(a.visual.vertex_colors.astype(int) - b.visual.vertex_colors.astype(int)).max() <= 1


def test_transmitter_to_mesh_default_is_narrow_band():
    t = tiny_transmitter()
    latent = torch.zeros(1, t.encoder.latent_ctx, t.encoder.d_latent)
    calls = []
    original = t.query

    def spy(params, points, directions=None):
        calls.append(points.shape[1])
        return original(params, points, directions)

    t.query = spy
    t.to_mesh(latent, grid_size=64)  # random SDF ≈ −0.1: no surface, only the 33³ coarse grid and the colours
    assert sum(calls) == 33**3
    calls.clear()
    t.to_mesh(latent, grid_size=64, narrow_band=False)
    assert sum(calls) == 64**3


def test_render_stf_narrow_band_same_images_and_gradients():
    from shapee.cameras import BLENDER_FOV, orbit_cameras

    cams = orbit_cameras(2, distance=2.2, resolution=32, start_angle=0.3, fov=BLENDER_FOV)

    def run(narrow_band):
        radius = torch.tensor(0.5, requires_grad=True)
        shift = torch.zeros(3, requires_grad=True)
        out = stf.render_stf(lambda p: sphere(p - shift, 1.0) * radius - 0.25 + 0.05 * p[..., 0],
                             lambda p: (0.5 + 0.45 * p).clamp(0, 1), [cams], grid_size=64, narrow_band=narrow_band)
        (out["rgb"].square().sum() + out["alpha"].sum()).backward()
        return out, radius.grad, shift.grad

    narrow, g_r_narrow, g_s_narrow = run(True)
    dense, g_r_dense, g_s_dense = run(False)
    assert torch.equal(narrow["faces"][0], dense["faces"][0])
    torch.testing.assert_close(narrow["rgb"], dense["rgb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(narrow["alpha"], dense["alpha"], rtol=0, atol=1e-5)
    assert g_r_dense.abs() > 0 and g_s_dense.abs().sum() > 0
    torch.testing.assert_close(g_r_narrow, g_r_dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_s_narrow, g_s_dense, rtol=1e-4, atol=1e-5)


def test_benchmark_narrow_band_and_dense_give_the_same_mesh():
    from shapee.benchmarks.stf import STEPS, bench_latent_to_mesh

    t = tiny_transmitter()
    narrow = bench_latent_to_mesh(64, transmitter=t, repeats=1, warmup=0, device="cpu")
    dense = bench_latent_to_mesh(64, transmitter=t, repeats=1, warmup=0, device="cpu", dense=True)
    assert narrow["settings"]["narrow_band"] and not dense["settings"]["narrow_band"]
    assert dense["queries"] == 64**3 and narrow["queries"] < 0.5 * 64**3
    assert narrow["faces"] == dense["faces"] > 1000 and narrow["vertices"] == dense["vertices"]
    assert set(narrow["median"]) == set(narrow["median_cpu"]) == set(STEPS)
