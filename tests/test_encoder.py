"""shapee.encoder at tiny sizes: ball query, point conv, multiview pixels, bottleneck statistics, the whole encoder."""


import pytest
import torch
import torch.nn.functional as F

from shapee.cameras import Cameras, random_cameras
from shapee.encoder import (
    ChannelsEncoder,
    ClampDiffusionNoise,
    MultiviewPointCloudEmbedding,
    PointSetEmbedding,
    ball_query,
    inv_parabola_alpha_bar,
    pixel_points,
)
from shapee.encoder.multiview import compose_patch_conv, patch_tokens, split_patch_conv

TINY = dict(
    width=32, heads=2, layers=3, data_ctx=16, latent_ctx=24, d_latent=16, n_points=256, n_views=2,
    pointconv_samples=16, pointconv_hidden=(32, 32), image_size=32, pointconv_chunk=5, view_chunk=3,
)


def tiny_batch(B=2, V=2, N=256, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cams = random_cameras(B * V, resolution=S, generator=g)
    return dict(
        points=torch.cat([torch.rand(B, N, 3, generator=g) * 2 - 1, torch.rand(B, N, 3, generator=g)], -1),
        views=torch.rand(B, V, S, S, 3, generator=g),
        view_alpha=(torch.rand(B, V, S, S, generator=g) > 0.3).float(),
        view_depth=torch.where(torch.rand(B, V, S, S, generator=g) > 0.2, 3 + torch.rand(B, V, S, S, generator=g), torch.inf),
        view_cameras=cams.to_matrix().view(B, V, 4, 3),
        view_fov=torch.full((B,), cams.x_fov),
    )


# ------------------------------------------------------------------------------------------------ ball query
def test_ball_query_handcrafted_cloud():
    xyz = torch.tensor(
        [[0, 0, 0], [2, 0, 0], [0.3, 0, 0], [0.5, 0, 0], [0.51, 0, 0], [0, 0.2, 0], [0, 0, -0.4], [3, 3, 3]],
        dtype=torch.float32,
    )[None]
    centroids = torch.tensor([[0, 0, 0], [2, 0, 0], [10, 10, 10]], dtype=torch.float32)[None]
    idx4 = ball_query(xyz, centroids, radius=0.5, n_samples=4)
    # lowest-index points within the radius (0.5 exactly on the boundary counts, 0.51 does not)
    assert idx4[0, 0].tolist() == [0, 2, 3, 5]
    assert idx4[0, 1].tolist() == [1, 1, 1, 1]  # one hit, padded with it
    assert idx4[0, 2].tolist() == [7, 7, 7, 7]  # no hit at all: nearest point
    idx8 = ball_query(xyz, centroids, radius=0.5, n_samples=10)  # more samples than points
    assert idx8[0, 0].tolist() == [0, 2, 3, 5, 6, 0, 0, 0, 0, 0]


def test_ball_query_chunked_equals_naive_loop():
    g = torch.Generator().manual_seed(1)
    xyz = torch.rand(2, 300, 3, generator=g) * 2 - 1
    centroids = xyz[:, :37]
    got = ball_query(xyz, centroids, radius=0.5, n_samples=16, chunk_size=7)
    for b in range(2):
        for m in range(37):
            d2 = (xyz[b] - centroids[b, m]).square().sum(-1)
            hits = torch.nonzero(d2 <= 0.25).flatten()[:16].tolist()
            expected = hits + [hits[0]] * (16 - len(hits))
            assert got[b, m].tolist() == expected


# ------------------------------------------------------------------------------------------------ point conv
def test_pointconv_release_lengths():
    with torch.device("meta"):
        pc = PointSetEmbedding(d_input=1024)
    assert pc.lengths == [64, 17, 5]
    assert pc.mlp_convs[0].weight.shape == (1024, 1027, 8, 1)
    assert pc.mlp_convs[0].padding_mode == "circular"


def test_pointconv_unshuffled_equals_naive_grouping():
    torch.manual_seed(0)
    pc = PointSetEmbedding(d_input=5, hidden=(6, 7), radius=0.6, n_samples=8, patch_size=4, stride=2, shuffle=False, chunk_size=3)
    pc = pc.double()
    xyz = torch.rand(2, 40, 3, dtype=torch.float64) * 2 - 1
    feats = torch.randn(2, 40, 5, dtype=torch.float64)
    got = pc(xyz, feats, xyz[:, :10])
    assert got.shape == (2, 10, 7)
    idx = ball_query(xyz, xyz[:, :10], radius=0.6, n_samples=8)
    for b in range(2):
        for m in range(10):
            group = torch.cat([xyz[b, idx[b, m]] - xyz[b, m], feats[b, idx[b, m]]], dim=-1)  # [S, 3 + D]
            h = group.T[None, :, :, None]  # [1, C, S, 1]
            for conv in pc.mlp_convs:
                h = F.pad(h, (0, 0, 2, 2), mode="circular")
                h = F.silu(F.conv2d(h, conv.weight, conv.bias, stride=(2, 1)))
            assert torch.allclose(got[b, m], h[0, :, :, 0].mean(-1), atol=1e-10)


def test_pointconv_shuffle_permutes_neighbours_per_batch_and_channel():
    # Replay the generator to get the permutations, apply them naively (loop over batch and channel, same
    # permutation for every centroid), and compare with the module.
    torch.manual_seed(0)
    pc = PointSetEmbedding(d_input=4, hidden=(6, 5), radius=0.7, n_samples=8, patch_size=4, stride=2, chunk_size=4).double()
    xyz = torch.rand(2, 30, 3, dtype=torch.float64)
    feats = torch.randn(2, 30, 4, dtype=torch.float64)
    got = pc(xyz, feats, xyz[:, :6], generator=torch.Generator().manual_seed(5))
    perms = pc._permutations(2, torch.device("cpu"), torch.Generator().manual_seed(5))
    assert [p.shape for p in perms] == [(2, 7, 8), (2, 6, 5)]
    assert torch.equal(perms[0].sort(-1).values, torch.arange(8).expand(2, 7, 8))
    idx = ball_query(xyz, xyz[:, :6], radius=0.7, n_samples=8)
    h = torch.stack(
        [torch.cat([xyz[b][idx[b]] - xyz[b, :6, None], feats[b][idx[b]]], dim=-1) for b in range(2)]
    ).permute(0, 3, 2, 1)  # [B, C, S, M]
    for conv, perm in zip(pc.mlp_convs, perms):
        h = torch.stack([torch.stack([h[b, c, perm[b, c]] for c in range(h.shape[1])]) for b in range(2)])
        h = F.silu(F.conv2d(F.pad(h, (0, 0, 2, 2), mode="circular"), conv.weight, conv.bias, stride=(2, 1)))
    assert torch.allclose(got, h.mean(2).transpose(1, 2), atol=1e-10)
    unshuffled = PointSetEmbedding(d_input=4, hidden=(6, 5), radius=0.7, n_samples=8, patch_size=4, stride=2, shuffle=False)
    unshuffled.load_state_dict(pc.state_dict())
    assert not torch.allclose(got, unshuffled.double()(xyz, feats, xyz[:, :6]), atol=1e-4)


def test_pointconv_shuffle_is_random_in_eval_and_seeded_by_generator():
    pc = PointSetEmbedding(d_input=4, hidden=(6, 6), radius=0.7, n_samples=16, patch_size=8, stride=4).eval()
    xyz, feats = torch.rand(1, 50, 3), torch.randn(1, 50, 4)
    run = lambda seed: pc(xyz, feats, xyz[:, :8], generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


# ------------------------------------------------------------------------------------------------ multiview
def test_pixel_points_lie_on_depth_plane_and_match_cameras():
    cams = random_cameras(3, resolution=8, generator=torch.Generator().manual_seed(0))
    depth = torch.full((3, 8, 8), 2.5)
    depth[:, 0, 0] = torch.inf
    origin, position = pixel_points(cams.to_matrix(), torch.full((3,), cams.x_fov), depth, max_depth=9.0)
    planar = ((position - cams.origin[:, None, None]) * cams.z[:, None, None]).sum(-1)
    expected = torch.full_like(planar, 2.5)
    expected[:, 0, 0] = 9.0  # +inf clamped to max_depth
    assert torch.allclose(planar, expected, atol=1e-5)
    assert torch.allclose(position[:, 1:], cams.depth_to_points(depth)[:, 1:], atol=1e-5)
    assert torch.equal(origin, cams.origin)


def test_pixel_points_per_view_fov():
    cams = random_cameras(2, resolution=6)
    matrix = cams.to_matrix()
    fov = torch.tensor([0.5, 0.9])
    _, pos = pixel_points(matrix, fov, torch.full((2, 6, 6), 3.0), max_depth=9.0)
    for i in range(2):
        ref = Cameras.from_matrix(matrix[i : i + 1], 6, 6, float(fov[i])).depth_to_points(torch.full((1, 6, 6), 3.0))
        assert torch.allclose(pos[i], ref[0], atol=1e-5)


def test_mv_embedding_uses_unk_token_for_transparent_pixels():
    emb = MultiviewPointCloudEmbedding(8)
    assert emb.weight.shape == (8, 279, 3, 3) and emb.unk_token.shape == (279,)
    origin, pos = torch.randn(1, 3), torch.randn(1, 5, 5, 3)
    valid = torch.ones(1, 5, 5, dtype=torch.bool)
    valid[0, :, :2] = False  # left two columns transparent
    a = emb(torch.rand(1, 5, 5, 3) * 2 - 1, origin, pos, valid)
    b = emb(torch.rand(1, 5, 5, 3) * 2 - 1, origin, pos, valid)
    assert torch.allclose(a[..., 0], b[..., 0])  # column 0 sees only transparent pixels (3×3 kernel)
    assert not torch.allclose(a[..., 1], b[..., 1])  # column 1 sees column 2


def _mv_inputs(N=3, S=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(N, S, S, generator=g) > 0.4
    valid[0, :5] = False  # a transparent band touching the border
    valid[1] = True
    return (torch.rand(N, S, S, 3, generator=g, dtype=dtype) * 2 - 1, torch.randn(N, 3, generator=g, dtype=dtype),
            torch.randn(N, S, S, 3, generator=g, dtype=dtype), valid)


def test_composed_view_conv_equals_the_two_convs_values_and_grads():
    """patch_emb(mv_pcl_embed(x)) (3×3 pad-1 conv, then p×p stride-p conv) == one (p+2)² stride-p conv, with the
    per-view origin channels folded into a mask conv: same values and the same gradients for every weight."""
    torch.manual_seed(0)
    emb = MultiviewPointCloudEmbedding(12).double()
    patch = torch.nn.Conv2d(12, 20, kernel_size=4, stride=4).double()
    with torch.no_grad():
        emb.unk_token.normal_()  # an unk token as large as the features, so masking mistakes show
    rgb, origin, position, valid = _mv_inputs()
    ref = patch(emb(rgb, origin, position, valid))  # [3, 20, 4, 4]
    weight, bias = compose_patch_conv(emb, patch)
    assert weight.shape == (20, 279, 6, 6)
    got = patch_tokens(emb, split_patch_conv(emb, weight, bias), rgb, origin, position, valid, stride=4)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-10, rtol=0)
    params = [emb.weight, emb.bias, emb.unk_token, patch.weight, patch.bias]
    probe = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * probe).sum(), params)
    g_got = torch.autograd.grad((got * probe).sum(), params)
    for a, b in zip(g_ref, g_got):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


def test_composed_view_conv_rejects_other_conv_shapes():
    emb = MultiviewPointCloudEmbedding(12)
    with pytest.raises(ValueError, match="p×p stride-p"):
        compose_patch_conv(emb, torch.nn.Conv2d(12, 20, kernel_size=4, stride=2))


def test_encoder_view_tokens_equal_reference_and_cache_follows_weights():
    torch.manual_seed(0)
    enc = ChannelsEncoder(**TINY).eval()
    batch = tiny_batch()

    def reference(e, batch=batch):  # the two convs of the reference, view by view
        rgb, alpha, depth, cams = (batch[k].flatten(0, 1) for k in ("views", "view_alpha", "view_depth", "view_cameras"))
        rgb, depth = rgb.float(), depth.float()  # the encoder's pixel geometry is fp32 whatever the weights
        fov = batch["view_fov"].repeat_interleave(batch["views"].shape[1])
        origin, position = pixel_points(cams, fov, depth, max_depth=e.max_depth)
        h = e.patch_emb(e.mv_pcl_embed(rgb * 2 - 1, origin, position, alpha >= e.alpha_threshold))  # [B·V, W, 4, 4]
        return h.flatten(2).transpose(1, 2).reshape(2, -1, e.width)

    with torch.no_grad():
        first = enc.embed_views(batch)
        assert torch.allclose(first, reference(enc), atol=2e-5)
        enc.patch_emb.weight.mul_(2.0)  # an in-place update: the cached composed conv must be rebuilt
        enc.mv_pcl_embed.unk_token.add_(0.5)
        second = enc.embed_views(batch)
        assert not torch.allclose(first, second, atol=1e-3)
        assert torch.allclose(second, reference(enc), atol=2e-5)
        enc.double()  # new storage and dtype
        batch64 = {k: v.double() for k, v in batch.items()}
        third = enc.embed_views(batch64)
        assert third.dtype == torch.float64 and torch.allclose(third, reference(enc, batch64), atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------ bottleneck
def test_inv_parabola_alpha_bar_values():
    abar = inv_parabola_alpha_bar(1024, 5.0)
    assert abar.shape == (1024,)
    assert abar[511].item() == pytest.approx(1 - 0.5**5, rel=1e-12)  # 0.96875
    assert abar[767].item() == pytest.approx(1 - 0.75**5, rel=1e-12)  # ≈ 0.763
    assert abar[1023].item() == pytest.approx(0.001 * (1 - (1023 / 1024) ** 5), rel=1e-9)  # ≈ 4.9e-6
    assert abar[1023].item() == pytest.approx(4.9e-6, rel=0.01)
    assert 1 - abar[0].item() < 1e-14
    assert torch.all(abar[1:] < abar[:-1])


def test_bottleneck_noise_statistics():
    bn = ClampDiffusionNoise()
    t = bn.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    noised = t > 0
    # P(t > 0) = 0.1 · 1023/1024; std of the estimate ≈ 7e-4
    assert noised.float().mean().item() == pytest.approx(0.1 * 1023 / 1024, abs=3e-3)
    assert t[noised].float().mean().item() == pytest.approx(512, abs=5)  # uniform on 1..1023
    assert t.max().item() <= 1023


def test_bottleneck_train_vs_eval():
    bn = ClampDiffusionNoise()
    x = torch.randn(64, 5, 7) * 3
    bn.eval()
    assert torch.equal(bn(x), torch.tanh(x))
    bn.train()
    y = bn(x, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = bn.sample_timesteps(64, generator=g)
    noise = torch.randn(x.shape, generator=g)
    a = inv_parabola_alpha_bar()[t].float().view(-1, 1, 1)
    assert torch.allclose(y, a.sqrt() * torch.tanh(x) + (1 - a).sqrt() * noise, atol=1e-6)
    clean = t == 0
    assert clean.any() and (~clean).any()
    assert torch.allclose(y[clean], torch.tanh(x)[clean], atol=1e-6)


# ------------------------------------------------------------------------------------------------ encoder
def test_encoder_shapes_range_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    enc = ChannelsEncoder(**TINY).train()
    out = enc(tiny_batch(), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 24, 16)
    (out * torch.randn_like(out)).sum().backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    enc.eval()
    with torch.no_grad():
        latent = enc(tiny_batch())
    assert torch.all(latent.abs() < 1)


def test_encoder_official_module_names():
    enc = ChannelsEncoder(**TINY)
    keys = set(enc.state_dict())
    for key in (
        "output_tokens", "input_proj.weight", "point_conv.mlp_convs.1.weight", "ln_pre.weight",
        "encoder.0.resblocks.0.attn.c_kv.weight", "encoder.1.resblocks.0.ln_3.bias",
        "processor.resblocks.1.attn.c_qkv.weight", "ln_post.bias", "output_proj.weight",
        "mv_pcl_embed.unk_token", "patch_emb.weight",
    ):
        assert key in keys, key
    assert enc.input_proj.weight.shape == (32, 186) and len(enc.processor.resblocks) == 2


def test_encoder_batched_equals_per_asset():
    torch.manual_seed(0)
    enc = ChannelsEncoder(**TINY, pointconv_shuffle=False).eval()
    batch = tiny_batch(B=2)
    with torch.no_grad():
        both = enc(batch)
        for b in range(2):
            one = {k: (v[b : b + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}
            assert torch.allclose(both[b], enc(one)[0], atol=1e-5)


def test_encoder_seeded_randomness_and_chunk_invariance():
    torch.manual_seed(0)
    enc = ChannelsEncoder(**TINY).eval()
    batch = tiny_batch()
    run = lambda seed, e=enc: e(batch, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    with torch.no_grad():
        a = run(1)
        assert torch.equal(a, run(1))
        assert not torch.allclose(a, run(2), atol=1e-6)  # point-conv shuffle is random at eval too
        other = ChannelsEncoder(**{**TINY, "pointconv_chunk": 16, "view_chunk": 1}).eval()
        other.load_state_dict(enc.state_dict())
        assert torch.allclose(a, run(1, other), atol=1e-5)


def test_encoder_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    a = ChannelsEncoder(**TINY).eval()
    b = ChannelsEncoder(**TINY, checkpoint=True).eval()
    b.load_state_dict(a.state_dict())
    batch = tiny_batch()
    ya = a(batch, generator=torch.Generator().manual_seed(0))
    yb = b(batch, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ya, yb, atol=1e-6)
    ya.sum().backward()
    yb.sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), n


def test_encoder_subsets_extra_points_and_views():
    torch.manual_seed(0)
    enc = ChannelsEncoder(**{**TINY, "n_points": 100, "n_views": 1}, pointconv_shuffle=False).eval()
    batch = tiny_batch(V=3)
    with torch.no_grad():
        a = enc(batch, generator=torch.Generator().manual_seed(0))
        b = enc(batch, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 24, 16) and not torch.allclose(a, b)  # a different random subset was used


def test_encoder_bad_batches():
    enc = ChannelsEncoder(**TINY)
    batch = tiny_batch()
    with pytest.raises(KeyError, match="view_depth"):
        enc({k: v for k, v in batch.items() if k != "view_depth"})
    with pytest.raises(ValueError, match=r"batch\['points'\] must have shape \[B, N, 6\]"):
        enc({**batch, "points": batch["points"][..., :3]})
    with pytest.raises(ValueError, match="fewer than data_ctx=16"):
        enc({**batch, "points": batch["points"][:, :10]})
    with pytest.raises(ValueError, match=r"batch\['views'\] must have shape \[2, V, 32, 32, 3\]"):
        enc({**batch, "views": batch["views"][:, :, :16, :16]})
    with pytest.raises(ValueError, match=r"batch\['view_cameras'\]"):
        enc({**batch, "view_cameras": batch["view_cameras"][:, :1]})
    with pytest.raises(ValueError, match="pointconv_hidden"):
        ChannelsEncoder(**{**TINY, "pointconv_hidden": (32, 16)})


def test_encoder_half_precision_weights_keep_fp32_geometry():
    torch.manual_seed(0)
    enc = ChannelsEncoder(**TINY, pointconv_shuffle=False).eval()
    batch = tiny_batch()
    with torch.no_grad():
        ref = enc(batch)
        low = enc.to(torch.bfloat16)(batch)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low.float()).all()
    assert (low.float() - ref).abs().max().item() < 0.1


@pytest.mark.gpu
def test_encoder_cuda_matches_cpu_and_runs_under_bf16_autocast():
    torch.manual_seed(0)
    enc = ChannelsEncoder(**TINY, pointconv_shuffle=False).eval()
    batch = tiny_batch()
    with torch.no_grad():
        ref = enc(batch)
        enc_cuda = enc.cuda()
        cuda_batch = {k: v.cuda() for k, v in batch.items()}
        got = enc_cuda(cuda_batch)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = enc_cuda(cuda_batch)
    assert torch.allclose(got.cpu(), ref, atol=1e-4)
    assert torch.isfinite(low).all() and (low.float().cpu() - ref).abs().max().item() < 0.1
