"""Point clouds from views (reference §6.3): back-projection, farthest point sampling, neighbour colour averaging."""

import numpy as np
import pytest
import torch
import trimesh

from shapee.cameras import random_cameras
from shapee.data.mesh import Mesh
from shapee.data.pointcloud import (
    _fps_buckets,
    average_into_nearest,
    farthest_point_sampling,
    point_cloud_from_fragments,
    point_cloud_from_views,
)
from shapee.data.render import rasterize, render_views


def reference_fps(points: np.ndarray, k: int, start: int) -> list[int]:
    """Textbook FPS in float64, one point at a time."""
    picks = [start]
    min_dist = np.linalg.norm(points - points[start], axis=-1)
    for _ in range(k - 1):
        picks.append(int(np.argmax(min_dist)))
        min_dist = np.minimum(min_dist, np.linalg.norm(points - points[picks[-1]], axis=-1))
    return picks


def two_colour_sphere(subdivisions: int = 3) -> Mesh:
    """Icosphere of radius 0.6: red faces above z = 0, blue below."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.6)
    faces = np.asarray(sphere.faces)
    upper = np.asarray(sphere.triangles_center)[:, 2] > 0
    colors = np.where(upper[:, None, None], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]) * np.ones((len(faces), 3, 3))
    return Mesh(np.asarray(sphere.vertices), faces, colors)


@pytest.mark.parametrize("method", ["buckets", "torch", "pytorch3d"])
def test_fps_matches_reference_and_prefixes_spread(method):
    points = np.random.default_rng(0).random((600, 3)) * 2 - 1
    idx = farthest_point_sampling(torch.from_numpy(points).float(), 64, start=17, method=method)
    assert idx.dtype == torch.int64 and idx[0] == 17
    assert idx.tolist() == reference_fps(points, 64, 17)
    # Each pick's distance to all earlier picks (the spread of the prefix) never increases.
    chosen = points[idx.numpy()]
    gaps = [np.linalg.norm(chosen[:i] - chosen[i], axis=-1).min() for i in range(1, 64)]
    assert all(b <= a + 1e-6 for a, b in zip(gaps, gaps[1:]))
    # And it is far better spread than the same number of random points.
    pairwise = np.linalg.norm(chosen[:, None] - chosen[None], axis=-1) + np.eye(64) * 9
    random = points[:64]
    random_pairwise = np.linalg.norm(random[:, None] - random[None], axis=-1) + np.eye(64) * 9
    assert pairwise.min() > 2 * random_pairwise.min()


def test_fps_on_a_grid_picks_corners_then_centre():
    grid = torch.stack(torch.meshgrid(torch.arange(11.0), torch.arange(11.0), indexing="ij"), -1).reshape(-1, 2)
    idx = farthest_point_sampling(grid, 5, start=0)
    picked = {tuple(p) for p in grid[idx[:4]].tolist()}
    assert picked == {(0.0, 0.0), (10.0, 10.0), (0.0, 10.0), (10.0, 0.0)}
    assert grid[idx[4]].tolist() == [5.0, 5.0]


def test_fps_never_repeats_on_duplicates_and_checks_input():
    points = torch.zeros(50, 3)
    points[25:] = 1.0  # two distinct locations, 25 copies each
    idx = farthest_point_sampling(points, 50)
    assert sorted(idx.tolist()) == list(range(50))
    with pytest.raises(ValueError, match="k must be"):
        farthest_point_sampling(points, 51)
    with pytest.raises(ValueError, match="points must have shape"):
        farthest_point_sampling(torch.zeros(5), 2)



@pytest.mark.parametrize("bucket_size", [4, 16, 64])
def test_bucketed_fps_is_exact_on_a_surface_cloud(bucket_size):
    # Points on a sphere and a plane (a surface-like cloud, as the renders give), 3001 of them so that the k-d
    # buckets need filler slots: every pick equals the textbook float64 FPS, whatever the bucket size.
    rng = np.random.default_rng(4)
    sphere = rng.normal(size=(2000, 3))
    sphere /= np.linalg.norm(sphere, axis=-1, keepdims=True)
    plane = np.c_[rng.uniform(-2, 2, (1001, 2)), np.full(1001, -1.2)]
    points = np.concatenate([sphere, plane]).astype(np.float32)
    picks = _fps_buckets(points, 700, start=123, bucket_size=bucket_size)
    assert picks.tolist() == reference_fps(points.astype(np.float64), 700, 123)
    # 2-D points and k = P (every point, each once) go through the same code.
    grid = rng.random((300, 2)).astype(np.float32)
    every = _fps_buckets(grid, 300, start=0, bucket_size=bucket_size)
    assert sorted(every.tolist()) == list(range(300))
    assert every[:50].tolist() == reference_fps(grid.astype(np.float64), 50, 0)


def test_fps_auto_on_cpu_is_the_exact_bucketed_method():
    points = torch.rand(5000, 3)
    auto = farthest_point_sampling(points, 400, start=9)
    assert auto.device == points.device and auto.dtype == torch.int64
    assert auto.tolist() == reference_fps(points.double().numpy(), 400, 9)
    with pytest.raises(ValueError, match="method"):
        farthest_point_sampling(points, 4, method="random")


def test_colour_averaging_constructed_case():
    # Points on a line; selected points 0 (x=0) and 5 (x=10). x=1,2,4 are nearer to 0; x=7,9 nearer to 10.
    xs = torch.tensor([0.0, 1.0, 2.0, 4.0, 7.0, 10.0, 9.0])
    points = torch.stack([xs, torch.zeros(7), torch.zeros(7)], -1)
    colors = torch.tensor([[0.0], [0.2], [0.4], [0.6], [0.3], [0.9], [0.6]])
    mean = average_into_nearest(points, colors, torch.tensor([0, 5]))
    torch.testing.assert_close(mean, torch.tensor([[(0.0 + 0.2 + 0.4 + 0.6) / 4], [(0.3 + 0.9 + 0.6) / 3]]))


def test_points_lie_on_the_surface_with_their_colour():
    mesh = two_colour_sphere()
    cams = random_cameras(6, resolution=48, generator=torch.Generator().manual_seed(0))
    views = render_views(mesh, cams)
    xyz, rgb = point_cloud_from_views(views["albedo"], views["alpha"], views["depth"], cams, n_points=512,
                                      n_candidates=4096, generator=torch.Generator().manual_seed(0))
    assert xyz.shape == (512, 3) and rgb.shape == (512, 3) and xyz.dtype == np.float32 == rgb.dtype
    surface = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    _, distance, _ = trimesh.proximity.closest_point(surface, xyz)
    assert distance.max() < 1e-3
    # Colours: red above the equator, blue below (averaging blends only within a point's neighbourhood).
    upper, lower = xyz[:, 2] > 0.1, xyz[:, 2] < -0.1
    assert upper.sum() > 100 and lower.sum() > 100
    np.testing.assert_allclose(rgb[upper], [[1.0, 0.0, 0.0]] * upper.sum(), atol=1e-6)
    np.testing.assert_allclose(rgb[lower], [[0.0, 0.0, 1.0]] * lower.sum(), atol=1e-6)
    # FPS order: the first points already cover the sphere in every direction.
    assert (np.linalg.norm(xyz[:16].mean(0)) < 0.25)


def test_too_few_pixels_are_duplicated_with_jitter_and_seeded():
    mesh = two_colour_sphere(subdivisions=2)
    cams = random_cameras(2, resolution=16, generator=torch.Generator().manual_seed(1))
    views = render_views(mesh, cams)
    n_pixels = int(views["alpha"].sum())
    assert n_pixels < 300
    args = (views["albedo"], views["alpha"], views["depth"], cams)
    xyz, rgb = point_cloud_from_views(*args, n_points=1000, n_candidates=4000,
                                      generator=torch.Generator().manual_seed(5))
    assert xyz.shape == (1000, 3) and len(np.unique(xyz, axis=0)) == 1000
    surface = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    _, distance, _ = trimesh.proximity.closest_point(surface, xyz)
    assert distance.max() < 1e-3  # jitter is 1e-4
    again, _ = point_cloud_from_views(*args, n_points=1000, n_candidates=4000,
                                      generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(xyz, again)



@pytest.mark.parametrize(("resolution", "n_points", "n_candidates"), [(48, 512, 2048), (16, 1000, 4000)],
                         ids=["subset", "duplicated"])
def test_cloud_from_fragments_is_the_cloud_from_rendered_views(resolution, n_points, n_candidates):
    # Shading only the kept candidates (data preparation) gives exactly the cloud of the full renders, both when a
    # random subset is kept and when too few pixels are duplicated with jitter.
    mesh = two_colour_sphere()
    cams = random_cameras(4, resolution=resolution, generator=torch.Generator().manual_seed(3))
    views = render_views(mesh, cams)
    expected = point_cloud_from_views(views["albedo"], views["alpha"], views["depth"], cams, n_points=n_points,
                                      n_candidates=n_candidates, generator=torch.Generator().manual_seed(7))
    got = point_cloud_from_fragments(mesh, cams, rasterize(mesh, cams), n_points=n_points, n_candidates=n_candidates,
                                     generator=torch.Generator().manual_seed(7))
    for a, b in zip(got, expected):
        assert a.dtype == np.float32 and a.shape == (n_points, 3)
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="do not match"):
        point_cloud_from_fragments(mesh, cams[:2], rasterize(mesh, cams), n_points=16)


def test_torch_inputs_give_torch_outputs_and_bad_shapes_raise():
    mesh = two_colour_sphere(subdivisions=2)
    cams = random_cameras(2, resolution=16, generator=torch.Generator().manual_seed(1))
    views = {k: torch.from_numpy(v) for k, v in render_views(mesh, cams).items()}
    xyz, rgb = point_cloud_from_views(views["albedo"], views["alpha"], views["depth"], cams, n_points=64,
                                      n_candidates=256)
    assert isinstance(xyz, torch.Tensor) and xyz.shape == (64, 3) and rgb.shape == (64, 3)
    with pytest.raises(ValueError, match="depth must have shape"):
        point_cloud_from_views(views["albedo"], views["alpha"], views["depth"][:1], cams, n_points=64)
    with pytest.raises(ValueError, match="no surface"):
        point_cloud_from_views(views["albedo"], torch.zeros_like(views["alpha"]), views["depth"], cams,
                               n_points=64)


@pytest.mark.parametrize("name", ["capsule.obj", "BoxTextured.glb"])
def test_point_colours_match_the_texture(assets_good, name):
    from scipy.spatial import cKDTree

    from shapee.data.mesh import load_mesh

    mesh = load_mesh(assets_good / name)
    cams = random_cameras(12, resolution=96, generator=torch.Generator().manual_seed(0))
    views = render_views(mesh, cams)
    xyz, rgb = point_cloud_from_views(views["albedo"], views["alpha"], views["depth"], cams, n_points=2048,
                                      n_candidates=8192, generator=torch.Generator().manual_seed(0))
    surface = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    closest, distance, face = trimesh.proximity.closest_point(surface, xyz)
    assert np.median(distance) < 1e-4
    assert rgb.std(0).max() > 0.1  # a textured asset, not a flat colour

    # The capsule's texture is thin grid lines that alias at 96², so compare regional means: split the surface
    # into the cells of the first 64 (FPS-spread) cloud points and compare each cell's mean cloud colour with
    # the mean texture colour of dense surface samples in the same cell. (A quarter turn of the texture gives
    # median errors of 0.09 / 0.16 here; a v-flip 0.33 on the box.)
    samples, sample_face = mesh.sample_surface(100_000, np.random.default_rng(0))
    truth = mesh.albedo(sample_face, trimesh.triangles.points_to_barycentric(mesh.triangles()[sample_face], samples))
    cells = cKDTree(xyz[:64])

    def cell_means(points, colors):
        cell = cells.query(points)[1]
        counts = np.bincount(cell, minlength=64)[:, None]
        sums = np.stack([np.bincount(cell, colors[:, c], minlength=64) for c in range(3)], -1)
        return sums / np.maximum(counts, 1)

    error = np.abs(cell_means(xyz, rgb) - cell_means(samples, truth)).max(-1)  # [64]
    assert np.median(error) < 0.04, np.median(error)
    if name == "BoxTextured.glb":  # large flat texture regions: most points match their exact texel colour
        bary = trimesh.triangles.points_to_barycentric(mesh.triangles()[face], closest)
        assert np.median(np.abs(rgb - mesh.albedo(face, bary)).max(-1)) < 0.01


@pytest.mark.gpu
def test_cuda_point_cloud_matches_cpu_fps():
    points = torch.rand(20000, 3)
    cpu = farthest_point_sampling(points, 512, start=3, method="torch")
    cuda = farthest_point_sampling(points.cuda(), 512, start=3)
    torch_on_cuda = farthest_point_sampling(points.cuda(), 512, start=3, method="torch")
    assert (cuda.cpu() == cpu).float().mean() > 0.99
    assert (torch_on_cuda.cpu() == cpu).float().mean() > 0.99
