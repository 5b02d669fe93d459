"""Frozen open_clip embedders for the latent prior (reference §5.2, Appendix A).

* text: ``encode_text`` → L2-normalised embedding ``[B, D]`` (ViT-L/14: D = 768; the prior scales it by sqrt(D)).
* image grid: the visual trunk's patch tokens **before** ``ln_post`` and the projection ``[B, N, W]``
  (ViT-L/14 at 224²: 256 tokens × 1024), after CLIP's own preprocessing (resize shortest side, bicubic, centre crop,
  CLIP mean/std).

Default: OpenAI's ViT-L/14 (``ViT-L-14-quickgelu`` + ``pretrained="openai"``: the OpenAI weights use QuickGELU),
which open_clip downloads itself. Any open_clip model name, a local checkpoint file (``pretrained=/path/to.pt``) or
an explicit architecture dict (``model_cfg=...``, used by the tests with random weights) also work. The CLIP weights
are frozen, kept out of our checkpoints, and run in bf16 on GPUs that support it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shapee.runtime import precision_dtype, resolve_device

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPUnavailableError(RuntimeError):
    """The CLIP weights could not be loaded (offline, missing file): the message says what to do."""


class FrozenCLIP(nn.Module):
    """A frozen open_clip model with the two embeddings the priors are conditioned on.

    Args:
        model_name: an open_clip architecture name (``open_clip.list_models()``).
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``), a local checkpoint path, or ``None`` for
            random weights (tests).
        model_cfg: an explicit open_clip ``CLIP`` config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``,
            ``quick_gelu``) instead of a named architecture; weights are random unless ``pretrained`` is a file.
        device: where to run; ``dtype``: ``"auto"`` (bf16 on capable GPUs, else fp32), ``"fp32"``, ``"bf16"``.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-quickgelu",
        pretrained: str | None = "openai",
        *,
        model_cfg: dict | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        cache_dir: str | None = None,
    ):
        super().__init__()
        import open_clip  # here, not at the top: ~2 s to import, and only building a CLIP needs it

        device = resolve_device(device)
        self.model_name = model_name if model_cfg is None else "custom"
        if model_cfg is not None:
            model = open_clip.model.CLIP(**{k: v for k, v in model_cfg.items()})
            if pretrained is not None:
                _load_local_weights(model, pretrained)
            context_length = model_cfg.get("text_cfg", {}).get("context_length", 77)
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        else:
            if pretrained is not None and not _is_tag(model_name, pretrained) and not Path(pretrained).is_file():
                raise CLIPUnavailableError(
                    f"CLIP weights {pretrained!r} for {model_name!r} are neither an open_clip pretrained tag nor an "
                    "existing file"
                )
            try:
                model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
            except Exception as error:  # download failures, corrupt files
                raise CLIPUnavailableError(
                    f"could not load CLIP {model_name!r} with pretrained={pretrained!r}: {error}. Offline? Download the "
                    "weights once on a machine with network access (open_clip caches them under "
                    f"{cache_dir or os.environ.get('HF_HOME', '~/.cache/huggingface')}), or point "
                    "`pretrained=` at a local checkpoint file."
                ) from error
            self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model = model.eval().requires_grad_(False)
        self.dtype = precision_dtype(dtype, device)
        self.model.to(device=device, dtype=self.dtype)
        visual = self.model.visual
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size)
        self.mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)

    def train(self, mode: bool = True) -> "FrozenCLIP":  # always frozen, always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def text_dim(self) -> int:
        """Width of the text embedding (768 for ViT-L/14)."""
        return int(self.model.text_projection.shape[-1])

    @property
    def grid_dim(self) -> int:
        """Width of an image-grid token (1024 for ViT-L/14)."""
        return int(self.model.visual.transformer.width)

    @property
    def grid_tokens(self) -> int:
        """Number of image-grid tokens (256 for ViT-L/14 at 224²)."""
        patch = self.model.visual.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        return (self.image_size // int(patch)) ** 2

    # --------------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``[B, text_dim]`` (float32)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} is empty: give a text description such as 'a red chair'")
        tokens = self.tokenizer(list(prompts)).to(self.device)  # [B, 77]
        features = self.model.encode_text(tokens)  # [B, D]
        return F.normalize(features.float(), dim=-1)

    # -------------------------------------------------------------------------------------------------- image
    def preprocess(self, images) -> Tensor:
        """CLIP preprocessing of images: ``[B, H, W, 3]`` / ``[B, 3, H, W]`` float in [0, 1], uint8 arrays, or PIL
        images → ``[B, 3, S, S]`` normalised. Shortest side resized to S (bicubic), centre crop."""
        batch = _as_image_batch(images).to(self.device)  # [B, 3, H, W] float in [0, 1]
        h, w = batch.shape[-2:]
        scale = self.image_size / min(h, w)
        new_h, new_w = max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale))
        batch = F.interpolate(batch, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
        batch = batch[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch - mean) / std

    @torch.no_grad()
    def embed_image_grid(self, images) -> Tensor:
        """Patch tokens of the last visual block, before ``ln_post``/projection: ``[B, grid_tokens, grid_dim]``."""
        pixels = self.preprocess(images).to(self.dtype)
        out = self.model.visual.forward_intermediates(
            pixels, indices=1, intermediates_only=True, output_fmt="NLC", normalize_intermediates=False
        )
        return out["image_intermediates"][-1].float()  # [B, N, W], class token already removed

    @torch.no_grad()
    def embed_image(self, images) -> Tensor:
        """L2-normalised image embeddings ``[B, text_dim]`` (for retrieval metrics)."""
        features = self.model.encode_image(self.preprocess(images).to(self.dtype))
        return F.normalize(features.float(), dim=-1)


def _is_tag(model_name: str, pretrained: str) -> bool:
    import open_clip  # not at the top: ~2 s to import (see FrozenCLIP.__init__)

    return pretrained in open_clip.list_pretrained_tags_by_model(model_name)


def _load_local_weights(model: nn.Module, path: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise CLIPUnavailableError(f"CLIP checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CLIPUnavailableError(
            f"CLIP checkpoint {str(path)!r} does not match the configured architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _as_image_batch(images) -> Tensor:
    """Images in any common form → ``[B, 3, H, W]`` float in [0, 1]."""
    if isinstance(images, Tensor):
        batch = images
    elif isinstance(images, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(images))
    else:  # a list of PIL images or arrays
        batch = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB") if hasattr(im, "convert") else im).copy())
                             for im in images])
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4:
        raise ValueError(f"expected images [B, H, W, 3] or [B, 3, H, W], got shape {tuple(batch.shape)}")
    if batch.shape[-1] in (3, 4) and batch.shape[1] not in (3, 4):
        batch = batch[..., :3].permute(0, 3, 1, 2)
    batch = batch[:, :3]
    if batch.dtype == torch.uint8:
        batch = batch.float() / 255.0
    return batch.float()


# A tiny CLIP architecture with random weights: for tests and CPU smoke runs, never for real conditioning.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    "quick_gelu": True,
}
