"""The basic lighting of the training renders (reference §4.3): sRGB transfer, ambient + two-sided diffuse."""

import math

import pytest
import torch

from shapee.render.lighting import LIGHT_DIRECTION, linear_to_srgb, shade_basic, srgb_to_linear


def test_light_direction_is_the_official_one():
    assert LIGHT_DIRECTION == (0.09387503, -0.63953443, -0.7630093)
    assert math.isclose(sum(c * c for c in LIGHT_DIRECTION), 1.0, abs_tol=1e-5)


def test_srgb_known_values_and_round_trip():
    # Values of the exact IEC 61966-2-1 curve (a 2.2 gamma would give 0.2176 for 0.5).
    x = torch.tensor([0.0, 0.04045, 0.5, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.04045 / 12.92, 0.21404114048223255, 1.0], dtype=torch.float64)
    torch.testing.assert_close(srgb_to_linear(x), expected, rtol=1e-7, atol=1e-9)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(linear_to_srgb(srgb_to_linear(grid)), grid, rtol=0, atol=1e-12)
    torch.testing.assert_close(srgb_to_linear(linear_to_srgb(grid)), grid, rtol=0, atol=1e-12)
    # Continuous at the knee: both branches meet.
    knee = torch.tensor([0.0031308 - 1e-9, 0.0031308 + 1e-9], dtype=torch.float64)
    s = linear_to_srgb(knee)
    assert abs(float(s[1] - s[0])) < 1e-6


def test_srgb_gradients_are_finite_and_correct():
    x = torch.tensor([0.0, 0.001, 0.02, 0.3, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    for fn in (srgb_to_linear, linear_to_srgb):
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        assert torch.isfinite(grad).all(), fn.__name__
    inner = torch.tensor([0.02, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(srgb_to_linear, (inner,))
    assert torch.autograd.gradcheck(linear_to_srgb, (inner,))


def test_shade_basic_light_parallel_and_perpendicular():
    light = torch.tensor(LIGHT_DIRECTION, dtype=torch.float64)
    light = light / light.norm()
    perpendicular = torch.linalg.cross(light, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    perpendicular = perpendicular / perpendicular.norm()
    albedo = torch.tensor([[0.8, 0.4, 0.1]] * 3, dtype=torch.float64)
    normals = torch.stack([light, -light, perpendicular])  # [3, 3]
    linear = srgb_to_linear(shade_basic(albedo, normals))
    base = srgb_to_linear(albedo[0])
    torch.testing.assert_close(linear[0], base * 1.0)  # n = L: ambient + full diffuse
    torch.testing.assert_close(linear[1], base * 1.0)  # n = −L: two-sided
    torch.testing.assert_close(linear[2], base * 0.3)  # n ⟂ L: ambient only


def test_shade_basic_broadcasts_and_is_differentiable():
    albedo = torch.rand(2, 5, 3, dtype=torch.float64, requires_grad=True)
    normals = torch.nn.functional.normalize(torch.randn(2, 5, 3, dtype=torch.float64), dim=-1)
    out = shade_basic(albedo, normals)
    assert out.shape == (2, 5, 3)
    # Brightness lies in [0.3, 1]: never brighter than the albedo, never darker than the ambient term.
    assert (out <= albedo + 1e-12).all()
    assert (srgb_to_linear(out) >= 0.3 * srgb_to_linear(albedo) - 1e-12).all()
    (grad,) = torch.autograd.grad(out.sum(), albedo)
    assert torch.isfinite(grad).all() and (grad > 0).all()


def test_shade_basic_rejects_bad_shapes():
    with pytest.raises(ValueError, match="albedo_srgb"):
        shade_basic(torch.rand(4, 4), torch.rand(4, 3))
    with pytest.raises(ValueError, match="normals"):
        shade_basic(torch.rand(4, 3), torch.rand(4, 2))
    with pytest.raises(ValueError, match="light_dir"):
        shade_basic(torch.rand(4, 3), torch.rand(4, 3), light_dir=(0.0, 0.0, 0.0))
