"""The camera convention: corner-aligned rays, planar depth, camera sets and the PyTorch3D bridge."""

import math

import pytest
import torch

from shapee.cameras import (
    BLENDER_FOV,
    Cameras,
    from_pytorch3d,
    look_at,
    orbit_cameras,
    random_cameras,
    to_pytorch3d,
)


def test_corner_pixels_sit_on_the_field_of_view():
    cams = random_cameras(2, resolution=16, generator=torch.Generator().manual_seed(1))
    d = cams.pixel_directions()  # [N, H, W, 3]
    t = math.tan(BLENDER_FOV / 2)
    # Top-left pixel: z − x·tan − y·tan; bottom-right: z + x·tan + y·tan (normalised).
    for (row, col, sx, sy) in [(0, 0, -1, -1), (15, 15, 1, 1), (0, 15, 1, -1)]:
        expected = cams.z + sx * t * cams.x + sy * t * cams.y
        expected = expected / expected.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(d[:, row, col], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2, 16, 16), atol=1e-6, rtol=0)


def test_frames_are_orthonormal_right_handed_and_look_at_origin():
    cams = random_cameras(64, generator=torch.Generator().manual_seed(0))
    frame = torch.stack([cams.x, cams.y, cams.z], dim=1)  # [N, 3, 3]
    torch.testing.assert_close(frame @ frame.transpose(1, 2), torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cross(cams.x, cams.y, dim=-1), cams.z, atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.origin.norm(dim=-1), torch.full((64,), 4.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.z, -cams.origin / 4.0, atol=1e-5, rtol=0)
    # Image "down" has a negative world-Z component: +Z is up in the picture.
    assert (cams.y[:, 2] <= 1e-6).all()


def test_random_cameras_are_seeded():
    a = random_cameras(5, generator=torch.Generator().manual_seed(3))
    b = random_cameras(5, generator=torch.Generator().manual_seed(3))
    c = random_cameras(5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.origin, b.origin)
    assert not torch.equal(a.origin, c.origin)


def test_look_at_straight_down_is_well_defined():
    x, y, z = look_at(torch.tensor([[0.0, 0.0, 4.0], [0.0, 0.0, -4.0]]))
    assert torch.isfinite(torch.stack([x, y, z])).all()
    torch.testing.assert_close(z, torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close((x * z).sum(-1), torch.zeros(2), atol=1e-6, rtol=0)


def test_orbit_matches_official_pan_cameras():
    cams = orbit_cameras(20, resolution=8)
    theta = torch.linspace(0, 2 * math.pi, 21, dtype=torch.float64)[:-1]
    z = torch.stack([torch.sin(theta), torch.cos(theta), torch.full_like(theta, -0.5)], -1)
    z = (z / z.norm(dim=-1, keepdim=True)).float()
    x = torch.stack([torch.cos(theta), -torch.sin(theta), torch.zeros_like(theta)], -1).float()
    torch.testing.assert_close(cams.z, z, atol=1e-6, rtol=0)
    torch.testing.assert_close(cams.x, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(cams.y, torch.cross(z, x, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(cams.origin, -4.0 * z, atol=1e-5, rtol=0)


def test_planar_depth_round_trip_and_pixel_rays():
    cams = random_cameras(3, resolution=12, generator=torch.Generator().manual_seed(2))
    depth = torch.rand(3, 12, 12) * 3 + 1
    points = cams.depth_to_points(depth)  # [N, H, W, 3]
    planar = ((points - cams.origin[:, None, None]) * cams.z[:, None, None]).sum(-1)
    torch.testing.assert_close(planar, depth, atol=1e-5, rtol=0)

    origins, dirs = cams.rays()
    view = torch.tensor([0, 2, 1])
    row = torch.tensor([0, 5, 11])
    col = torch.tensor([11, 3, 0])
    o, d = cams.pixel_rays(view, row, col)
    torch.testing.assert_close(o, origins[view, row, col])
    torch.testing.assert_close(d, dirs[view, row, col], atol=1e-6, rtol=0)


def test_matrix_round_trip_and_bad_shapes():
    cams = random_cameras(4, resolution=32)
    back = Cameras.from_matrix(cams.to_matrix(), 32, 32, cams.x_fov)
    assert torch.equal(back.origin, cams.origin) and torch.equal(back.z, cams.z)
    with pytest.raises(ValueError, match=r"\[N, 4, 3\]"):
        Cameras.from_matrix(torch.zeros(4, 3, 3), 32, 32, 0.7)
    with pytest.raises(ValueError, match="field of view"):
        Cameras.from_matrix(cams.to_matrix(), 32, 32, 4.0)
    assert len(cams[1:3]) == 2 and len(cams[0]) == 1


@pytest.mark.parametrize("size", [8, 64])
def test_pytorch3d_projects_our_pixel_rays_onto_the_same_pixels(size):
    """A point on the ray of our pixel (row v, col u) lands on PyTorch3D's pixel centre (u + 0.5, v + 0.5)."""
    cams = random_cameras(3, resolution=size, generator=torch.Generator().manual_seed(5))
    p3d = to_pytorch3d(cams)
    _, dirs = cams.rays()
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(3):
        world = cams.origin[i] + 3.0 * dirs[i].reshape(-1, 3)  # [H·W, 3]
        screen = p3d[i].transform_points_screen(world[None], image_size=((size, size),))[0]  # [H·W, 3]
        torch.testing.assert_close(screen[:, 0], cols.flatten().float() + 0.5, atol=2e-3, rtol=0)
        torch.testing.assert_close(screen[:, 1], rows.flatten().float() + 0.5, atol=2e-3, rtol=0)


def test_pytorch3d_round_trip_and_square_only():
    cams = random_cameras(4, resolution=32, generator=torch.Generator().manual_seed(6))
    back = from_pytorch3d(to_pytorch3d(cams), 32)
    for name in ("origin", "x", "y", "z"):
        torch.testing.assert_close(getattr(back, name), getattr(cams, name), atol=1e-5, rtol=0)
    assert back.x_fov == pytest.approx(cams.x_fov, abs=1e-7)
    with pytest.raises(ValueError, match="square"):
        to_pytorch3d(cams.resized(32, 16))
