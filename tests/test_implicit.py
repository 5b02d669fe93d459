"""shapee.implicit: params projection (per-row matrices, shared LN) and the batched per-asset NeRSTF MLP."""

import math

import pytest
import torch
import torch.nn.functional as F

from shapee.implicit import ChannelsParamsProj, NeRSTFMLP
from shapee.io.official import read_state_dict_tsv
from shapee.nn import nerf_encoding

TSV = "/work/shared/reference/transmitter_state_dict.tsv"
TINY_MLP = dict(d_hidden=8)


def _randomise(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


# ------------------------------------------------------------------------------------------------ params proj
def test_params_proj_equals_per_row_loop():
    shapes = {"mlp.0.weight": (3, 5), "mlp.1.weight": (2, 4)}
    proj = _randomise(ChannelsParamsProj(param_shapes=shapes, d_latent=6)).double()
    latent = torch.randn(2, 5, 6, dtype=torch.float64)
    params = proj(latent)
    assert set(params) == set(shapes)
    assert params["mlp.0.weight"].shape == (2, 3, 5) and params["mlp.1.weight"].shape == (2, 2, 4)
    offset = 0
    for name, (rows, ch) in shapes.items():
        m = proj.projections[("nerstf." + name).replace(".", "__")]
        for b in range(2):
            for v in range(rows):
                w_v = m.proj.weight[v * ch : (v + 1) * ch]  # [C, D]: row v's own matrix
                h = w_v @ latent[b, offset + v]
                h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5) * m.norm.weight + m.norm.bias
                expected = h + m.proj.bias[v * ch : (v + 1) * ch]
                assert torch.allclose(params[name][b, v], expected, atol=1e-10)
        offset += rows
    # a flat latent is accepted too
    assert torch.equal(proj(latent.flatten(1))["mlp.1.weight"], params["mlp.1.weight"])


def test_params_proj_init_and_keys():
    proj = ChannelsParamsProj(param_shapes={"mlp.0.weight": (4, 3)}, d_latent=64)
    m = proj.projections["nerstf__mlp__0__weight"]
    assert torch.all(m.norm.weight == 0.0625) and torch.all(m.norm.bias == 0) and torch.all(m.proj.bias == 0)
    assert m.proj.weight.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.15)
    assert set(proj.state_dict()) == {
        f"projections.nerstf__mlp__0__weight.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
    }
    with pytest.raises(ValueError, match=r"latent must have shape \[B, 4, 64\]"):
        proj(torch.randn(2, 5, 64))


# ------------------------------------------------------------------------------------------------ MLP
def naive_mlp(mlp, params_b, points_b, directions_b=None):
    """One asset, written from reference §2: 4 meta layers (per-asset weight + shared bias), swish, direction
    encoding (zeros if absent) concatenated before layer 4, shared layers 4–6, heads of §2.3."""
    h = nerf_encoding(points_b, 15)
    for i in range(4):
        h = F.silu(h @ params_b[f"mlp.{i}.weight"].T + mlp.mlp[i].bias)
    d = torch.zeros(h.shape[0], 51, dtype=h.dtype) if directions_b is None else nerf_encoding(directions_b, 8)
    h = torch.cat([h, d], dim=-1)
    h = F.silu(F.linear(h, mlp.mlp[4].weight, mlp.mlp[4].bias))
    h = F.silu(F.linear(h, mlp.mlp[5].weight, mlp.mlp[5].bias))
    h = F.linear(h, mlp.mlp[6].weight, mlp.mlp[6].bias)
    return {
        "sdf": torch.tanh(h[:, 0]),
        "density_coarse": F.relu(h[:, 1]),
        "density_fine": F.relu(h[:, 2]),
        "stf_rgb": torch.sigmoid(h[:, 3:6]),
        "nerf_rgb_coarse": torch.sigmoid(h[:, 6:9]),
        "nerf_rgb_fine": torch.sigmoid(h[:, 9:12]),
    }


def _params(mlp, batch, dtype=torch.float64):
    return {k: torch.randn(batch, r, c, dtype=dtype) / math.sqrt(c) for k, (r, c) in mlp.meta_parameter_shapes().items()}


@pytest.mark.parametrize("with_directions", [False, True])
def test_batched_mlp_equals_per_asset_loop(with_directions):
    mlp = _randomise(NeRSTFMLP(**TINY_MLP)).double()
    params = _params(mlp, 3)
    points = torch.rand(3, 11, 3, dtype=torch.float64) * 2 - 1
    dirs = F.normalize(torch.randn(3, 11, 3, dtype=torch.float64), dim=-1) if with_directions else None
    out = mlp(params, points, dirs)
    assert out["sdf"].shape == (3, 11) and out["density_fine"].shape == (3, 11) and out["stf_rgb"].shape == (3, 11, 3)
    for b in range(3):
        ref = naive_mlp(mlp, {k: v[b] for k, v in params.items()}, points[b], None if dirs is None else dirs[b])
        for key in ref:
            assert torch.allclose(out[key][b], ref[key], atol=1e-10), key


def test_mlp_output_ranges_and_init_biases():
    mlp = NeRSTFMLP()
    bias = mlp.mlp[6].bias
    assert bias[0].item() == pytest.approx(-0.1) and bias[1].item() == pytest.approx(0.1)
    assert torch.count_nonzero(bias[2:]) == 0
    assert mlp.mlp[4].weight.std().item() == pytest.approx(0.25 / math.sqrt(307), rel=0.05)
    params = {k: v.float() for k, v in _params(mlp, 2).items()}
    out = mlp(params, torch.rand(2, 50, 3) * 2 - 1)
    assert torch.all(out["sdf"].abs() < 1) and torch.all(out["density_coarse"] >= 0)
    for key in ("stf_rgb", "nerf_rgb_coarse", "nerf_rgb_fine"):
        assert torch.all((out[key] > 0) & (out[key] < 1))


def test_mlp_gradients_reach_params_and_shared_weights_not_buffers():
    mlp = NeRSTFMLP(**TINY_MLP)
    params = {k: v.float().requires_grad_() for k, v in _params(mlp, 2).items()}
    out = mlp(params, torch.rand(2, 20, 3) * 2 - 1)
    sum(v.sum() for v in out.values()).backward()
    for k, v in params.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k
    for name, p in mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in mlp.named_buffers()} == {f"mlp.{i}.weight" for i in range(4)}


def test_mlp_without_params_uses_buffers():
    mlp = NeRSTFMLP(**TINY_MLP)
    pts = torch.rand(2, 7, 3)
    buffers = {f"mlp.{i}.weight": mlp.mlp[i].weight.expand(2, -1, -1) for i in range(4)}
    assert torch.equal(mlp(None, pts)["sdf"], mlp(buffers, pts)["sdf"])


def test_mlp_keys_match_official_renderer_layout():
    official = {k[len("renderer.nerstf.") :]: v for k, v in read_state_dict_tsv(TSV).items() if k.startswith("renderer.nerstf.")}
    with torch.device("meta"):
        mlp = NeRSTFMLP()
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == official
    assert mlp.meta_parameter_shapes() == {"mlp.0.weight": (256, 93), **{f"mlp.{i}.weight": (256, 256) for i in (1, 2, 3)}}


def test_mlp_bad_inputs():
    mlp = NeRSTFMLP(**TINY_MLP)
    params = {k: v.float() for k, v in _params(mlp, 2).items()}
    with pytest.raises(ValueError, match=r"points must have shape \[B, P, 3\]"):
        mlp(params, torch.rand(2, 7))
    with pytest.raises(ValueError, match=r"params\['mlp.0.weight'\] must have shape \[3, 8, 93\], got \(2, 8, 93\)"):
        mlp(params, torch.rand(3, 7, 3))
    with pytest.raises(ValueError, match="directions"):
        mlp(params, torch.rand(2, 7, 3), torch.rand(2, 6, 3))


def test_mlp_without_directions_skips_the_zero_direction_columns():
    """Release size, fp32: the direction-less forward (direction weight columns skipped) equals the explicit zero
    encoding concatenated (naive_mlp), and does not read those columns at all."""
    mlp = NeRSTFMLP()
    params = {k: v.float() for k, v in _params(mlp, 2).items()}
    points = torch.rand(2, 300, 3) * 2 - 1
    with torch.no_grad():
        out = mlp(params, points)
        for b in range(2):
            ref = naive_mlp(mlp, {k: v[b] for k, v in params.items()}, points[b])
            for key in ref:
                torch.testing.assert_close(out[key][b], ref[key], rtol=0, atol=1e-6)
        mlp.mlp[4].weight[:, 256:] = float("nan")  # the 51 direction columns
        assert torch.equal(mlp(params, points)["sdf"], out["sdf"])
        with_dirs = mlp(params, points, F.normalize(torch.randn(2, 300, 3), dim=-1))["sdf"]
        assert bool(with_dirs.isnan().all())  # with directions the columns are used
    # With a graph recorded (training), the in-place swish is off and gradients are those of the naive graph.
    params = {k: v.requires_grad_() for k, v in params.items()}
    mlp.mlp[4].weight.data[:, 256:] = 0.0
    mlp(params, points)["sdf"].sum().backward()
    expected = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    sum(naive_mlp(mlp, {k: v[b] for k, v in expected.items()}, points[b])["sdf"].sum() for b in range(2)).backward()
    for k in params:
        torch.testing.assert_close(params[k].grad, expected[k].grad, rtol=1e-4, atol=1e-6)
