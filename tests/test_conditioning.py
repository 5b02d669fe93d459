"""open_clip embedders: shapes, normalisation, the pre-ln_post patch grid, errors that name the input."""

import numpy as np
import pytest
import torch

from shapee.conditioning import TINY_CLIP_CFG, CLIPUnavailableError, FrozenCLIP


@pytest.fixture(scope="module")
def clip() -> FrozenCLIP:
    torch.manual_seed(0)
    return FrozenCLIP(model_cfg=TINY_CLIP_CFG, pretrained=None, device="cpu")


def test_text_embeddings_are_normalised_and_prompt_dependent(clip):
    emb = clip.embed_text(["a red cube", "a blue sphere", "a red cube"])
    assert emb.shape == (3, clip.text_dim) == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert torch.equal(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])


def test_empty_prompt_is_rejected(clip):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        clip.embed_text(["a chair", "  "])


def test_image_grid_is_the_last_block_before_ln_post(clip):
    images = torch.rand(2, 40, 48, 3)
    grid = clip.embed_image_grid(images)
    assert grid.shape == (2, clip.grid_tokens, clip.grid_dim) == (2, 16, 48)
    # Recompute by hand: patch embed + class token + positions, ln_pre, all blocks; drop the class token.
    visual = clip.model.visual
    x = clip.preprocess(images)
    x = visual.conv1(x).flatten(2).transpose(1, 2)  # [B, 16, W]
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    for block in visual.transformer.resblocks:
        x = block(x)
    torch.testing.assert_close(grid, x[:, 1:], atol=1e-5, rtol=1e-5)
    # ln_post would change them: make sure we are not returning normalised tokens.
    assert not torch.allclose(grid, visual.ln_post(x[:, 1:]), atol=1e-3)


def test_image_inputs_in_all_layouts_agree(clip):
    hwc = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    a = clip.embed_image_grid(hwc)
    b = clip.embed_image_grid(torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert clip.embed_image(hwc).shape == (2, 32)


def test_missing_checkpoint_and_unknown_tag_are_named():
    with pytest.raises(CLIPUnavailableError, match="does not exist"):
        FrozenCLIP(model_cfg=TINY_CLIP_CFG, pretrained="/nonexistent/clip.pt", device="cpu")
    with pytest.raises(CLIPUnavailableError, match="no-such-tag"):
        FrozenCLIP("ViT-B-32", pretrained="no-such-tag", device="cpu")


def test_local_checkpoint_round_trip(tmp_path, clip):
    path = tmp_path / "clip.pt"
    torch.save(clip.model.state_dict(), path)
    other = FrozenCLIP(model_cfg=TINY_CLIP_CFG, pretrained=str(path), device="cpu")
    torch.testing.assert_close(other.embed_text(["a chair"]), clip.embed_text(["a chair"]))
    assert not any(p.requires_grad for p in other.parameters())
