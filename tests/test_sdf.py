"""SDF targets (shapee.data.sdf): winding-number sign, candidate and certified distances, sampling recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from shapee.data import sdf
from shapee.data.mesh import normalise
from shapee.data.sdf import MeshSDF, point_triangle_distance, sample_sdf_points, signed_distance, solid_angle

ASSETS_GOOD = Path(__file__).resolve().parents[2] / "shared" / "assets" / "good"


@pytest.fixture(scope="module")
def sphere():
    return trimesh.creation.icosphere(subdivisions=4, radius=0.5)  # 5120 faces


@pytest.fixture(scope="module")
def small_sphere():
    return trimesh.creation.icosphere(subdivisions=3, radius=0.5)  # 1280 faces


@pytest.fixture(scope="module")
def bunny(assets_good_module):
    mesh = trimesh.load(assets_good_module / "bunny.ply", process=False)
    return trimesh.Trimesh(normalise(mesh.vertices), mesh.faces, process=False)


@pytest.fixture(scope="module")
def assets_good_module():
    if not ASSETS_GOOD.is_dir():
        pytest.skip(f"shared test meshes not found at {ASSETS_GOOD}")
    return ASSETS_GOOD


def _mixed_points(mesh: trimesh.Trimesh, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform in the box, near the surface (σ 0.02) and a bit farther (σ 0.1): ``[3n, 3]``."""
    surface = mesh.sample(2 * n, seed=int(rng.integers(1 << 30)))
    return np.concatenate(
        [
            rng.uniform(-1, 1, (n, 3)),
            surface[:n] + rng.normal(size=(n, 3)) * 0.02,
            surface[n:] + rng.normal(size=(n, 3)) * 0.1,
        ]
    )


# -------------------------------------------------------------------------------------------------------- kernels
def test_point_triangle_distance_matches_trimesh_closest_point_in_every_region():
    rng = np.random.default_rng(0)
    tri = rng.normal(size=(4000, 3, 3))
    p = rng.normal(size=(4000, 3)) * 2  # lands in face, edge and vertex regions alike
    ref = np.linalg.norm(trimesh.triangles.closest_point(tri, p) - p, axis=-1)
    ours = point_triangle_distance(torch.from_numpy(p), torch.from_numpy(tri)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-9, rtol=1e-9)
    # Degenerate triangles (a segment, a point) fall back to the segment distance.
    seg = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 0, 0]], [[1.0, 1, 1], [1, 1, 1], [1, 1, 1]]], dtype=torch.float64)
    q = torch.tensor([[3.0, 4, 0], [1.0, 1, 2]], dtype=torch.float64)
    np.testing.assert_allclose(point_triangle_distance(q, seg).numpy(), [np.sqrt(1 + 16), 1.0])


def test_solid_angle_sums_to_4pi_inside_a_closed_mesh_and_0_outside(small_sphere):
    tri = torch.from_numpy(np.array(small_sphere.triangles))  # [F, 3, 3] outward-oriented
    p = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0], [0.9, 0.3, -0.2]], dtype=torch.float64)
    total = solid_angle(p[:, None, :], tri[None]).sum(-1)
    np.testing.assert_allclose(total.numpy(), [4 * np.pi, 4 * np.pi, 0.0], atol=1e-9)
    # One face seen from below its outward normal is positive, from above negative.
    one = torch.tensor([[0.0, 0, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.float64)  # normal +z
    assert solid_angle(torch.zeros(3, dtype=torch.float64), one) > 0
    assert solid_angle(torch.tensor([0.0, 0, 2], dtype=torch.float64), one) < 0


# ------------------------------------------------------------------------------------------------ winding number
@pytest.mark.parametrize("name", ["small_sphere", "bunny"])
def test_fast_winding_number_agrees_with_brute_force(name, request):
    mesh = request.getfixturevalue(name)
    rng = np.random.default_rng(1)
    points = _mixed_points(mesh, 300 if name == "bunny" else 600, rng)  # brute force is P·F work
    exact = sdf.winding_number(mesh.vertices, mesh.faces, points, method="exact")
    fast = MeshSDF(mesh.vertices, mesh.faces).winding_number(points)
    err = np.abs(fast - exact)
    assert err.max() < 1e-2, err.max()
    assert err.mean() < 3e-3, err.mean()  # measured: 6e-4 sphere, 1.2e-3 bunny
    # Far-field accuracy grows with the opening angle: beta = 4 is an order of magnitude tighter.
    tight = MeshSDF(mesh.vertices, mesh.faces, beta=4.0).winding_number(points)
    assert np.abs(tight - exact).max() < 2e-3
    assert np.abs(tight - exact).mean() < err.mean() / 5


def test_winding_number_open_sphere_keeps_clear_signs(sphere):
    centroids = sphere.triangles_center
    keep = centroids[:, 2] < 0.35  # cut a cap of radius ~0.36 off the top: a big hole
    assert (~keep).sum() > 100
    faces = sphere.faces[keep]
    rng = np.random.default_rng(2)
    inside = rng.normal(size=(3000, 3))
    inside *= (rng.uniform(0, 0.3, 3000) / np.linalg.norm(inside, axis=1))[:, None]  # |p| < 0.3
    outside = rng.uniform(-1, 1, (6000, 3))
    outside = outside[np.linalg.norm(outside, axis=1) > 0.7]
    query = MeshSDF(sphere.vertices, faces)
    w_in, w_out = query.winding_number(inside), query.winding_number(outside)
    assert (w_in > 0.5).all() and (w_out < 0.5).all()
    # Brute force agrees on the open mesh too (the far-field moments make no closedness assumption).
    np.testing.assert_allclose(w_in[:300], sdf.winding_number(sphere.vertices, faces, inside[:300], method="exact"),
                               atol=1e-2)
    d = query.signed_distance(np.concatenate([inside, outside]))
    assert (d[: len(inside)] > 0).all() and (d[len(inside):] < 0).all()


# ------------------------------------------------------------------------------------------------------ distance
@pytest.mark.parametrize("name", ["small_sphere", "bunny"])
def test_distance_against_brute_force(name, request):
    mesh = request.getfixturevalue(name)
    rng = np.random.default_rng(3)
    points = _mixed_points(mesh, 300 if name == "bunny" else 600, rng)  # brute force is P·F work
    exact = sdf.unsigned_distance(mesh.vertices, mesh.faces, points, method="exact")
    query = MeshSDF(mesh.vertices, mesh.faces)
    fast = query.unsigned_distance(points)
    certified = query.unsigned_distance(points, certify=True)
    assert np.abs(certified - exact).max() < 1e-5  # float32 rounding only
    # The default is exact near the surface (certified below certify_radius = 0.1), where the targets matter most ...
    near = fast < 0.1
    assert near.mean() > 0.5
    assert np.abs(fast - exact)[near].max() < 1e-5
    # ... and an upper bound farther out: exact for most points, a few percent too large at worst.
    assert (fast >= exact - 1e-5).all()
    assert np.mean(np.abs(fast - exact) < 1e-5) > 0.95
    assert (fast - exact <= 0.1 * exact + 1e-5).all()


def test_sphere_sdf_is_analytic(sphere):
    rng = np.random.default_rng(4)
    points = _mixed_points(sphere, 3000, rng)
    query = MeshSDF(sphere.vertices, sphere.faces)
    d, certified = query.signed_distance(points), query.signed_distance(points, certify=True)
    r = np.linalg.norm(points, axis=1)
    # The icosphere's flat faces sit up to ~r·(1 − cos(edge/2r)) ≈ 1.2e-3 inside the true sphere.
    np.testing.assert_allclose(certified, 0.5 - r, atol=2e-3)
    near = np.abs(r - 0.5) < 0.09
    np.testing.assert_allclose(d[near], (0.5 - r)[near], atol=2e-3)
    np.testing.assert_allclose(d, 0.5 - r, atol=1e-2)  # far points: the candidate upper bound
    clear = np.abs(r - 0.5) > 2e-3
    assert ((d > 0) == (r < 0.5))[clear].all()


def test_cube_sdf_is_analytic():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))  # 12 faces, [-0.5, 0.5]³
    rng = np.random.default_rng(5)
    points = rng.uniform(-1, 1, (5000, 3))
    q = np.abs(points) - 0.5
    analytic = -(np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0))  # positive inside
    d = signed_distance(box.vertices, box.faces, points)
    np.testing.assert_allclose(d, analytic, atol=1e-5)


def test_bunny_signs(bunny):
    rng = np.random.default_rng(6)
    direction = rng.normal(size=(2000, 3))
    far = direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(1.8, 3.0, (2000, 1))
    surface, face = trimesh.sample.sample_surface(bunny, 4000, seed=7)
    inward = surface - 0.02 * bunny.face_normals[face]
    query = MeshSDF(bunny.vertices, bunny.faces)
    assert (query.signed_distance(far) < 0).all()
    assert np.mean(query.signed_distance(inward) > 0) >= 0.98


# ------------------------------------------------------------------------------------------------------ sampling
def test_sample_sdf_points_recipe(small_sphere):
    points, values = sample_sdf_points(small_sphere.vertices, small_sphere.faces, n_uniform=2000, n_near=2000,
                                       near_sigma=(0.01, 0.05), rng=np.random.default_rng(8))
    assert points.shape == (4000, 3) and values.shape == (4000,)
    assert points.dtype == np.float32 and values.dtype == np.float32
    r = np.linalg.norm(points, axis=1)
    # Positive inside, and the value is the distance to the polyhedron (≤ ~5e-3 from the analytic sphere; far
    # points carry the candidate upper bound).
    near = np.abs(values) < 0.09
    np.testing.assert_allclose(values[near], (0.5 - r)[near], atol=6e-3)
    np.testing.assert_allclose(values, 0.5 - r, atol=1.5e-2)
    # Half the points hug the surface: expected ~48 % within 0.05 of it, against ~13 % for uniform sampling alone.
    assert np.mean(np.abs(values) < 0.05) > 0.35
    # Shuffled: the near points are not all at the end.
    assert np.mean(np.abs(values[:1000]) < 0.05) > 0.3
    # Same seed, same targets; another seed, other points.
    again = sample_sdf_points(small_sphere.vertices, small_sphere.faces, 2000, 2000, (0.01, 0.05),
                              np.random.default_rng(8))
    np.testing.assert_array_equal(points, again[0])
    np.testing.assert_array_equal(values, again[1])
    other = sample_sdf_points(small_sphere.vertices, small_sphere.faces, 2000, 2000, 0.02, np.random.default_rng(9))
    assert not np.array_equal(points, other[0])


def test_torch_in_torch_out_and_chunking(small_sphere):
    rng = np.random.default_rng(10)
    points = _mixed_points(small_sphere, 500, rng).astype(np.float32)
    whole = MeshSDF(small_sphere.vertices, small_sphere.faces)
    chunked = MeshSDF(small_sphere.vertices, small_sphere.faces, chunk_size=97)
    d_np = whole.signed_distance(points)
    d_t = chunked.signed_distance(torch.from_numpy(points))
    assert isinstance(d_np, np.ndarray) and isinstance(d_t, torch.Tensor) and d_t.dtype == torch.float32
    np.testing.assert_allclose(d_t.numpy(), d_np, atol=1e-6)
    np.testing.assert_allclose(chunked.winding_number(points), whole.winding_number(points), atol=1e-5)
    # Mesh given as tensors works the same.
    as_tensors = MeshSDF(torch.from_numpy(small_sphere.vertices), torch.from_numpy(small_sphere.faces))
    np.testing.assert_allclose(as_tensors.signed_distance(points), d_np, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "vertices, faces, match",
    [
        (np.zeros((3, 3)), np.array([[0, 1, 3]]), "out of range"),
        (np.full((3, 3), np.nan), np.array([[0, 1, 2]]), "vertices contains NaN"),
        (np.zeros((3, 3)), np.zeros((0, 3), np.int64), "faces is empty"),
        (np.zeros((3, 2)), np.array([[0, 1, 2]]), r"vertices must have shape \[N, 3\]"),
        (np.zeros((3, 3)), np.array([[0.0, 1.0, 2.0]]), "faces must be an integer array"),
    ],
)
def test_bad_mesh_raises_clear_error(vertices, faces, match):
    with pytest.raises(ValueError, match=match):
        MeshSDF(vertices, faces)


def test_bad_points_and_options_raise_clear_errors(small_sphere):
    query = MeshSDF(small_sphere.vertices, small_sphere.faces)
    with pytest.raises(ValueError, match=r"points must have shape \[N, 3\]"):
        query.signed_distance(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="points contains NaN"):
        query.winding_number(np.array([[0.0, np.inf, 0.0]]))
    with pytest.raises(ValueError, match="method must be"):
        signed_distance(small_sphere.vertices, small_sphere.faces, np.zeros((1, 3)), method="approx")
    with pytest.raises(ValueError, match="near_sigma"):
        sample_sdf_points(small_sphere.vertices, small_sphere.faces, 10, 10, near_sigma=-1.0, rng=0)
    with pytest.raises(ValueError, match="beta"):
        MeshSDF(small_sphere.vertices, small_sphere.faces, beta=1.0)


@pytest.mark.gpu
def test_cuda_matches_cpu(small_sphere):
    rng = np.random.default_rng(11)
    points = torch.from_numpy(_mixed_points(small_sphere, 500, rng).astype(np.float32))
    cpu = MeshSDF(small_sphere.vertices, small_sphere.faces).signed_distance(points)
    vertices = torch.from_numpy(np.array(small_sphere.vertices)).cuda()
    gpu = MeshSDF(vertices, torch.from_numpy(np.array(small_sphere.faces)).cuda()).signed_distance(points.cuda())
    assert gpu.is_cuda
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)
