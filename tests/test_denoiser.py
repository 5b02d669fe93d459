"""The latent diffusion Transformer: official key layout, equivalence with a from-the-reference forward, dropout."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shapee.models.denoiser import LatentDenoiser

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def tiny(cond_mode: str, **kw) -> LatentDenoiser:
    size = dict(d_latent=8, n_ctx=6, width=16, layers=2, heads=4, cond_dim=12, cond_tokens=5)
    size.update(kw)
    return LatentDenoiser(cond_mode=cond_mode, **size)


def _randomise(model: torch.nn.Module) -> None:
    # The output projection is zero-initialised; give every weight a value so the comparison means something.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


def _reference_forward(sd: dict, x, t, cond, *, heads: int, mode: str, cond_dim: int) -> torch.Tensor:
    """The released prior's forward written from SHAPE_E_REFERENCE.md §5.2 with explicit per-head q|k|v rows."""
    lin = lambda h, name: h @ sd[name + ".weight"].T + sd[name + ".bias"]  # noqa: E731
    ln = lambda h, name: F.layer_norm(h, h.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], 1e-5)  # noqa: E731
    width = sd["pos_emb"].shape[1]
    half = width // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t.float()[:, None] * freqs
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)  # cos half first
    temb = lin(F.gelu(lin(temb, "time_embed.c_fc")), "time_embed.c_proj")
    if mode == "text":
        extra = torch.stack([lin(cond * math.sqrt(cond_dim), "clip_embed"), temb], 1)
    else:
        extra = torch.cat([temb[:, None], lin(ln(cond, "clip_embed.0"), "clip_embed.1")], 1)
    h = torch.cat([extra, lin(x, "input_proj") + sd["pos_emb"]], 1)
    h = ln(h, "ln_pre")
    d = width // heads
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("backbone.resblocks.")})
    for i in range(n_blocks):
        p = f"backbone.resblocks.{i}"
        qkv = lin(ln(h, p + ".ln_1"), p + ".attn.c_qkv")  # [B, N, 3W]
        B, N, _ = qkv.shape
        qkv = qkv.view(B, N, heads, 3 * d)  # per head: q (d), k (d), v (d)
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        scale = d ** -0.25
        w = torch.einsum("bthc,bshc->bhts", q * scale, k * scale).float().softmax(-1)
        att = torch.einsum("bhts,bshc->bthc", w, v).reshape(B, N, width)
        h = h + lin(att, p + ".attn.c_proj")
        h = h + lin(F.gelu(lin(ln(h, p + ".ln_2"), p + ".mlp.c_fc")), p + ".mlp.c_proj")
    h = ln(h, "ln_post")
    return lin(h[:, extra.shape[1] :], "output_proj")


@pytest.mark.parametrize("mode", ["text", "image"])
def test_matches_the_reference_forward(mode):
    model = tiny(mode).eval()
    _randomise(model)
    x = torch.randn(3, 6, 8)
    t = torch.tensor([0, 500, 1023])
    cond = torch.randn(3, 12) if mode == "text" else torch.randn(3, 5, 12)
    out = model(x, t, cond)
    assert out.shape == (3, 6, 16)
    ref = _reference_forward(model.state_dict(), x, t, cond, heads=4, mode=mode, cond_dim=12)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    x0, var = model.split_output(out)
    assert torch.equal(x0, out[..., :8]) and torch.equal(var, out[..., 8:])


def _tsv(name: str) -> dict[str, tuple[int, ...]]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return {k.removeprefix("wrapped."): tuple(int(s) for s in v.strip("()").split(",") if s.strip()) for k, v in rows}


@pytest.mark.parametrize("mode, heads, tsv, params_m", [("text", 16, "text_cond_state_dict.tsv", 315.69),
                                                       ("image", 8, "image_cond_state_dict.tsv", 315.96)])
def test_official_size_has_exactly_the_released_keys(mode, heads, tsv, params_m):
    with torch.device("meta"):
        model = LatentDenoiser(cond_mode=mode, heads=heads, cond_dim=768 if mode == "text" else 1024)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _tsv(tsv)
    # Reference §5.1 parameter counts (the released priors, without CLIP).
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


def test_output_is_zero_at_init_and_gradients_reach_every_parameter():
    model = tiny("text")
    x, t, cond = torch.randn(2, 6, 8), torch.tensor([3, 9]), torch.randn(2, 12)
    assert torch.all(model(x, t, cond) == 0)  # zero-initialised output projection
    _randomise(model)
    model(x, t, cond).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_conditioning_dropout_only_in_training():
    model = tiny("text", cond_drop_prob=0.5)
    _randomise(model)
    x, t = torch.randn(400, 6, 8), torch.full((400,), 10)
    cond = torch.randn(400, 12)
    uncond = model.eval()(x, t, torch.zeros_like(cond))
    torch.manual_seed(0)
    out = model.train()(x, t, cond)
    dropped = (out - uncond).abs().amax(dim=(1, 2)) < 1e-6
    assert 0.4 < dropped.float().mean() < 0.6
    assert not torch.allclose(model.eval()(x, t, cond), uncond)


def test_bad_shapes_are_named():
    model = tiny("image")
    with pytest.raises(ValueError, match="image conditioning must have shape"):
        model(torch.randn(2, 6, 8), torch.tensor([1, 2]), torch.randn(2, 12))
    with pytest.raises(ValueError, match="x_t must be"):
        model(torch.randn(2, 7, 8), torch.tensor([1, 2]), torch.randn(2, 5, 12))
