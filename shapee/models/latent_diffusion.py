"""The latent diffusion prior: denoiser + frozen CLIP conditioner + Gaussian process (reference §5).

:class:`LatentDiffusion` is where the pieces of the prior meet (DESIGN.md): the x₀-predicting
:class:`~shapee.models.denoiser.LatentDenoiser` (the only learned part, ``self.denoiser``), the frozen open_clip
embedder (:class:`~shapee.conditioning.FrozenCLIP`, built lazily and never part of the state dict), and the
:class:`~shapee.diffusion.GaussianDiffusion` process (schedule, ``q_sample``, losses; plain Python, no weights). The
process is separate from the network (STYLE.md rule 4): the network is seen by the process only through the denoise
function ``(x_t, t) -> (x0, var_values)``.

State-dict keys are ``"denoiser." + <official key without "wrapped.">`` so that the released ``text300M`` /
``image300M`` checkpoints map one-to-one (:mod:`shapee.io.official_priors`).

Conditioning (reference §5.1–5.2): text → the L2-normalised CLIP text embedding ``[B, 768]``; image → the CLIP
ViT-L/14 patch grid ``[B, 256, 1024]`` before ``ln_post``. The unconditional input is the zero tensor of the same
shape, which the denoiser sees with probability ``cond_drop_prob`` in training and which classifier-free guidance
uses at sampling time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from shapee.conditioning.clip import FrozenCLIP
from shapee.diffusion import SAMPLERS, GaussianDiffusion, guided_denoiser
from shapee.diffusion.cuda_graph import CUDAGraphDenoiser, maybe_cuda_graphed
from shapee.models.denoiser import LatentDenoiser
from shapee.runtime import PRECISIONS, autocast_dtype

# The released priors' sizes (reference §5.1): everything but the heads and the conditioning width is shared.
OFFICIAL_DENOISER = dict(d_latent=1024, n_ctx=1024, width=1024, layers=24, init_scale=0.25, pos_emb_init_scale=0.05,
                         cond_drop_prob=0.1, cond_tokens=256, learn_sigma=True)
OFFICIAL_BY_MODE = {
    "text": dict(heads=16, cond_dim=768),  # head dim 64; CLIP ViT-L/14 text embedding width
    "image": dict(heads=8, cond_dim=1024),  # head dim 128 (§8.3.11: not 16); ViT-L/14 patch-token width
}
DEFAULT_GUIDANCE = {"text": 15.0, "image": 3.0}  # the notebooks' scales (§5.4)
DEFAULT_CLIP = dict(model_name="ViT-L-14-quickgelu", pretrained="openai")


def build_frozen_clip(kwargs: Mapping[str, Any], *, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """:class:`~shapee.conditioning.FrozenCLIP` built under a forked CPU RNG seeded with ``seed``: the caller's random
    stream is untouched, and a random-weight CLIP (``pretrained=None``) is the same wherever it is built (latent
    extraction storing CLIP grids, training, sampling), so conditioning stays consistent across processes."""
    with torch.random.fork_rng(devices=[]):  # open_clip builds on the CPU, then moves
        torch.manual_seed(seed)
        return FrozenCLIP(device=device, **dict(kwargs))


class _LazyCLIP:
    """Holds the frozen CLIP outside the module tree: not a submodule, so never in ``state_dict`` or checkpoints.

    Built on first use on the requested device, under a forked RNG seeded with ``seed``: building never disturbs the
    training run's random stream (bitwise resume), and random-weight CLIPs (tests, ``pretrained=None``) are the same
    in every process, so a prior trained with one is sampled with the same conditioning later. Deep copies (the
    trainer's EMA) share the one frozen instance instead of holding a second ~1.7 GB copy.
    """

    def __init__(self, kwargs: Mapping[str, Any], seed: int = 0) -> None:
        self.kwargs = dict(kwargs)
        self.seed = seed
        self.model = None

    def get(self, device: torch.device) -> nn.Module:
        if self.model is None:
            self.model = build_frozen_clip(self.kwargs, seed=self.seed, device=device)
        elif self.model.device != device:
            self.model.to(device)
        return self.model

    def __deepcopy__(self, memo) -> "_LazyCLIP":
        return self


class LatentDiffusion(nn.Module):
    """Text- or image-conditional latent prior: ``loss_dict(batch)`` for training, ``sample(...)`` for latents.

    Args:
        cond_mode: ``"text"`` (text300M) or ``"image"`` (image300M).
        denoiser: keyword overrides for :class:`~shapee.models.denoiser.LatentDenoiser`; defaults are the released
            sizes (24 × 1024, 1024 latent tokens × 1024 channels; 16 heads / cond_dim 768 for text, 8 heads /
            cond_dim 1024 for image).
        diffusion: :meth:`GaussianDiffusion.from_config` kwargs: ``schedule`` ("exp"), ``num_steps`` (1024),
            ``learned_variance`` (True) (reference §5.3).
        clip: :class:`~shapee.conditioning.FrozenCLIP` kwargs (``model_name``, ``pretrained``, ``model_cfg``,
            ``dtype``, ``cache_dir``); default OpenAI ViT-L/14. Built lazily, kept out of the state dict.
        clip_seed: seed of the (forked) RNG while building CLIP: fixes random-weight CLIPs (tests) across processes.
        guidance_scale: default classifier-free guidance scale of :meth:`sample` (15 text, 3 image).
        precision: denoiser autocast in :meth:`sample`: ``auto`` (bf16 on capable CUDA, fp32 on CPU), ``bf16``,
            ``fp16``, ``fp32``. Training precision is the training loop's. Process math is always fp32.
    """

    def __init__(
        self,
        *,
        cond_mode: str = "text",
        denoiser: Mapping[str, Any] | None = None,
        diffusion: Mapping[str, Any] | None = None,
        clip: Mapping[str, Any] | None = None,
        clip_seed: int = 0,
        guidance_scale: float | None = None,
        precision: str = "auto",
    ) -> None:
        super().__init__()
        if cond_mode not in OFFICIAL_BY_MODE:
            raise ValueError(f"cond_mode must be 'text' or 'image', got {cond_mode!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be {'|'.join(PRECISIONS)}, got {precision!r}")
        denoiser_kwargs = {**OFFICIAL_DENOISER, **OFFICIAL_BY_MODE[cond_mode], **dict(denoiser or {})}
        if denoiser_kwargs.pop("cond_mode", cond_mode) != cond_mode:
            raise ValueError(f"denoiser.cond_mode disagrees with cond_mode={cond_mode!r}; set only cond_mode")
        diffusion_kwargs = {"schedule": "exp", "num_steps": 1024, "learned_variance": True, **dict(diffusion or {})}
        if bool(diffusion_kwargs["learned_variance"]) != bool(denoiser_kwargs["learn_sigma"]):
            raise ValueError(
                f"diffusion.learned_variance={diffusion_kwargs['learned_variance']} needs denoiser.learn_sigma to be "
                f"the same, got {denoiser_kwargs['learn_sigma']}"
            )
        self.cond_mode = cond_mode
        self.denoiser = LatentDenoiser(cond_mode=cond_mode, **denoiser_kwargs)
        self.process = GaussianDiffusion.from_config(**diffusion_kwargs)
        self._clip = _LazyCLIP({**DEFAULT_CLIP, **dict(clip or {})}, seed=clip_seed)
        self.guidance_scale = float(DEFAULT_GUIDANCE[cond_mode] if guidance_scale is None else guidance_scale)
        self.precision = precision
        # Training samples whose asset had no caption, so were trained unconditionally (text mode).
        self.empty_caption_count = 0
        # How the last sample_from_cond ran: denoiser calls (each a batch of cond + uncond with guidance) and how
        # many of them were CUDA graph replays.
        self.sampling_stats: dict[str, int] = {}

    # ----------------------------------------------------------------------------------------------- shapes
    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(n_ctx, d_latent)`` of one latent (``(1024, 1024)`` released)."""
        return self.denoiser.n_ctx, self.denoiser.d_latent

    @property
    def cond_shape(self) -> tuple[int, ...]:
        """Shape of one conditioning input: ``(cond_dim,)`` text, ``(cond_tokens, cond_dim)`` image grid."""
        d = self.denoiser
        return (d.cond_dim,) if self.cond_mode == "text" else (d.cond_tokens, d.cond_dim)

    @property
    def device(self) -> torch.device:
        return self.denoiser.pos_emb.device

    def compile_targets(self) -> list[nn.Module]:
        """What ``trainer.compile`` compiles: the denoiser (all of the prior's training compute)."""
        return [self.denoiser]

    # ------------------------------------------------------------------------------------------------- CLIP
    def use_clip(self, clip: Mapping[str, Any], *, clip_seed: int | None = None) -> None:
        """Swap the frozen CLIP for another (``FrozenCLIP`` kwargs over the default OpenAI ViT-L/14, e.g. a local
        ``pretrained`` file): for priors whose file carries no CLIP choice (released and diffusers layouts). Built
        lazily, checked against the denoiser's conditioning shape on first use."""
        seed = self._clip.seed if clip_seed is None else clip_seed
        self._clip = _LazyCLIP({**DEFAULT_CLIP, **dict(clip)}, seed=seed)

    @property
    def clip(self) -> nn.Module:
        """The frozen CLIP embedder on this model's device (built on first access; checked against the denoiser)."""
        clip = self._clip.get(self.device)
        if self.cond_mode == "text":
            have, want = (clip.text_dim,), self.cond_shape
        else:
            have, want = (clip.grid_tokens, clip.grid_dim), self.cond_shape
        if have != want:
            raise ValueError(
                f"CLIP {clip.model_name!r} gives {self.cond_mode} conditioning of shape {list(have)} but the denoiser "
                f"expects {list(want)}: configure model.clip and model.denoiser.cond_dim/cond_tokens to agree"
            )
        return clip

    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts → L2-normalised CLIP text embeddings ``[P, cond_dim]`` (fp32). Empty prompts raise ``ValueError``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one text prompt such as 'a red chair'")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts[{i}] = {prompt!r} is empty: give a text description such as 'a red chair'")
        return self.clip.embed_text(prompts).float()  # [P, D]

    def embed_images(self, images) -> Tensor:
        """Images → CLIP patch grids ``[P, cond_tokens, cond_dim]`` (fp32).

        ``images``: one image or a list of them; each a file path, a PIL image, a ``[H, W, 3]`` uint8/float array,
        or a ``[3, H, W]``/``[H, W, 3]`` tensor (floats in [0, 1]); a ``[P, ...]`` batch array/tensor also works.
        Each image is preprocessed on its own, so sizes may differ.
        """
        items = _image_list(images)
        if not items:
            raise ValueError("images is empty: give at least one image (path, PIL image, array or tensor)")
        grids = [self.clip.embed_image_grid(_load_image(im, i)) for i, im in enumerate(items)]  # P × [1, N, D]
        return torch.cat(grids).float()  # [P, N, D]

    # ----------------------------------------------------------------------------------------------- training
    def conditioning(self, batch: Mapping[str, Any]) -> Tensor:
        """The training conditioning of a batch ``[B, *cond_shape]`` (see :meth:`loss_dict` for the keys read)."""
        b = batch["latent"].shape[0]
        if batch.get("cond") is not None:
            cond = torch.as_tensor(batch["cond"], device=self.device).float()
        elif self.cond_mode == "text":
            cond = self._caption_conditioning(batch.get("captions"), b)
        elif batch.get("clip_grid") is not None:
            cond = torch.as_tensor(batch["clip_grid"], device=self.device).float()
        elif batch.get("cond_image") is not None:
            cond = self.clip.embed_image_grid(batch["cond_image"]).float()
        else:
            raise KeyError(
                "image conditioning needs batch['clip_grid'] [B, tokens, dim] or batch['cond_image'] [B, H, W, 3] "
                f"(or a precomputed batch['cond']); the batch has keys {sorted(batch)}"
            )
        if tuple(cond.shape) != (b, *self.cond_shape):
            raise ValueError(f"{self.cond_mode} conditioning must be {[b, *self.cond_shape]}, got {list(cond.shape)}")
        return cond

    def _caption_conditioning(self, captions: Sequence[Sequence[str]] | None, b: int) -> Tensor:
        """One uniformly random caption per asset → CLIP; assets without captions get the unconditional zeros."""
        if captions is None or len(captions) != b:
            raise KeyError(
                f"text conditioning needs batch['captions']: one list of captions per asset ({b}), or batch['cond']"
            )
        cond = torch.zeros(b, *self.cond_shape, device=self.device)  # [B, D]
        chosen, rows = [], []
        for i, caps in enumerate(captions):
            caps = [caps] if isinstance(caps, str) else [c for c in caps if isinstance(c, str) and c.strip()]
            if not caps:
                continue
            # The global torch RNG (not Python's) so that a resumed run picks the same captions.
            chosen.append(caps[int(torch.randint(len(caps), ()))])
            rows.append(i)
        self.empty_caption_count += b - len(rows)
        if rows:
            cond[rows] = self.clip.embed_text(chosen).float()
        return cond

    def denoise_fn(self, cond: Tensor):
        """The process's view of the network for conditioning ``cond``: ``(x_t, t) -> (x0 [B, n_ctx, d], var)``."""

        def fn(x_t: Tensor, t: Tensor):
            return self.denoiser.split_output(self.denoiser(x_t, t, cond))

        return fn

    def loss_dict(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Training losses of one batch (reference §5.3): ``mse`` (x₀ MSE) and ``vb`` (learned-variance bound, mean
        stop-gradiented), batch means; plus ``metric/mse_q1..q4``, the x₀ MSE per timestep quartile (a quartile with
        no sample in the batch is left out), and ``metric/uncond_frac`` (text: share of assets without a caption).

        ``batch``: ``latent`` ``[B, n_ctx, d_latent]`` (tanh-bounded, used as is) and conditioning: ``cond`` (any
        mode, precomputed ``[B, *cond_shape]``), else text ``captions`` (list of caption lists; one drawn per asset,
        none → unconditional), image ``clip_grid`` ``[B, tokens, dim]`` or ``cond_image`` ``[B, H, W, 3]``.
        """
        x0 = torch.as_tensor(batch["latent"], device=self.device).float()  # [B, n_ctx, d]
        if x0.ndim != 3 or tuple(x0.shape[1:]) != self.latent_shape:
            n_ctx, d = self.latent_shape
            raise ValueError(f"batch['latent'] must be [B, {n_ctx}, {d}], got {list(x0.shape)}")
        before = self.empty_caption_count
        cond = self.conditioning(batch)  # [B, *cond_shape]
        t = torch.randint(0, self.process.num_steps, (x0.shape[0],), device=x0.device)  # [B], t ~ U{0..T−1}
        terms = self.process.training_losses(self.denoise_fn(cond), x0, t)  # per sample [B]
        out = {"mse": terms["mse"].mean()}
        if "vb" in terms:
            out["vb"] = terms["vb"].mean()
        with torch.no_grad():
            mse = terms["mse"].detach()
            quartile = (t * 4) // self.process.num_steps  # [B] in {0, 1, 2, 3}
            for q in range(4):
                mask = quartile == q
                if bool(mask.any()):
                    out[f"metric/mse_q{q + 1}"] = mse[mask].mean()
            if self.cond_mode == "text" and batch.get("cond") is None:
                uncond = (self.empty_caption_count - before) / x0.shape[0]
                out["metric/uncond_frac"] = torch.tensor(uncond, device=x0.device)
        return out

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        prompts: str | Sequence[str] | None = None,
        images=None,
        n: int = 1,
        guidance_scale: float | None = None,
        steps: int = 64,
        sampler: str = "karras",
        generator: torch.Generator | None = None,
        s_churn: float = 0.0,
        progress: bool = False,
        **sampler_kwargs,
    ) -> Tensor:
        """Latents ``[P·n, n_ctx, d_latent]`` for ``P`` prompts (text) or images (image), ``n`` each, in order
        (prompt 0's ``n`` samples first).

        Classifier-free guidance with ``guidance_scale`` (default: the model's; 1 = conditional only) in x₀ space,
        the unconditional branch batched with the conditional one (:func:`shapee.diffusion.guided_denoiser`).
        ``sampler``: ``karras`` (Heun, σ 160 → 1e-3, the notebooks' default; ``s_churn``), ``ddim`` or
        ``ancestral``; ``steps`` sampler steps; ``sampler_kwargs`` go to the sampler (e.g. ``sigma_min``) or, for
        ``clip_denoised``, to :meth:`sample_from_cond`. Seeded ``generator`` → the same latents (on its device). The denoiser runs under bf16
        autocast on capable GPUs; the process math in fp32.

        Raises:
            ValueError: neither or both of ``prompts`` / ``images``, the one that does not fit ``cond_mode``, an
                empty prompt, ``n < 1``, an unknown sampler.
            FileNotFoundError: an image path that does not exist.
        """
        if (prompts is None) == (images is None):
            raise ValueError("sample() needs exactly one of prompts= (text prior) or images= (image prior)")
        if prompts is not None and self.cond_mode != "text":
            raise ValueError("this is an image-conditional prior: pass images=, not prompts=")
        if images is not None and self.cond_mode != "image":
            raise ValueError("this is a text-conditional prior: pass prompts=, not images=")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt/image) must be a positive integer, got {n!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        cond = self.embed_prompts(prompts) if prompts is not None else self.embed_images(images)  # [P, *cond_shape]
        return self.sample_from_cond(
            cond, n=n, guidance_scale=guidance_scale, steps=steps, sampler=sampler, generator=generator,
            s_churn=s_churn, progress=progress, **sampler_kwargs,
        )

    @torch.no_grad()
    def sample_from_cond(
        self,
        cond: Tensor,
        n: int = 1,
        guidance_scale: float | None = None,
        steps: int = 64,
        sampler: str = "karras",
        generator: torch.Generator | None = None,
        s_churn: float = 0.0,
        progress: bool = False,
        cuda_graph: bool | None = None,
        clip_denoised: bool = True,
        **sampler_kwargs,
    ) -> Tensor:
        """:meth:`sample` from precomputed conditioning ``cond`` ``[P, *cond_shape]`` (e.g. stored CLIP grids):
        latents ``[P·n, n_ctx, d_latent]``.

        ``clip_denoised``: clip each guidance branch's x₀ to [−1, 1] before guidance (never the guided result), or the
        single x₀ without guidance, as the released sampler does (:func:`shapee.diffusion.guided_denoiser` is the one
        place that clips; the samplers do not). With the defaults this reproduces the official ``sample_latents``
        (``tests/test_official_parity.py``).

        ``cuda_graph``: replay a captured CUDA graph for the fixed-shape denoiser calls
        (:class:`~shapee.diffusion.cuda_graph.CUDAGraphDenoiser`); ``None`` (default): on a CUDA device. The same
        latents either way, up to floating-point reassociation. :attr:`sampling_stats` tells how the last call ran."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt/image) must be a positive integer, got {n!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        if sampler == "karras":
            sampler_kwargs.update(s_churn=s_churn, progress=progress)
        elif s_churn:
            raise ValueError(f"s_churn applies to the karras sampler only, not {sampler!r}")
        device = self.device
        cond = torch.as_tensor(cond).to(device=device, dtype=torch.float32)
        if tuple(cond.shape[1:]) != self.cond_shape:
            raise ValueError(f"cond must be [P, {', '.join(map(str, self.cond_shape))}], got {list(cond.shape)}")
        cond = cond.repeat_interleave(n, dim=0)  # [P·n, *cond_shape]
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        amp_dtype = autocast_dtype(self.precision, device)

        def model(x_t: Tensor, t: Tensor, c: Tensor):
            # No autocast weight cache: each weight is cast once per call anyway, and a CUDA graph must own its casts.
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                                cache_enabled=False):
                out = self.denoiser(x_t, t, c)  # [B, n_ctx, out_channels]
            return self.denoiser.split_output(out.float())  # the process math stays fp32

        denoise = maybe_cuda_graphed(guided_denoiser(model, cond, scale, clip=clip_denoised), device, cuda_graph)
        calls = 0

        def counted(x_t: Tensor, t: Tensor):
            nonlocal calls
            calls += 1
            return denoise(x_t, t)

        was_training = self.training
        self.eval()  # no conditioning dropout while sampling
        try:
            latents = SAMPLERS[sampler](
                self.process,
                counted,
                (cond.shape[0], *self.latent_shape),
                steps=steps,
                generator=generator,
                device=device,
                dtype=torch.float32,
                **sampler_kwargs,
            )
        finally:
            self.train(was_training)
        graphed = isinstance(denoise, CUDAGraphDenoiser)
        self.sampling_stats = {"denoiser_calls": calls, "graph_replays": denoise.replays if graphed else 0}
        return latents


# ---------------------------------------------------------------------------------------------------- images
def _image_list(images) -> list:
    """One image or a list of images → a list; ``[P, ...]`` batches (4-d arrays/tensors) are split."""
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
        return [images]
    if isinstance(images, (np.ndarray, Tensor)):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def _load_image(image, index: int):
    """A path → PIL image (``FileNotFoundError`` naming it); other kinds pass through to CLIP's preprocessing."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"images[{index}]: image file {str(path)!r} does not exist")
        with Image.open(path) as im:
            return [im.convert("RGB")]
    if hasattr(image, "convert"):  # PIL
        return [image.convert("RGB")]
    if isinstance(image, (np.ndarray, Tensor)):
        if image.ndim != 3:
            raise ValueError(f"images[{index}] must be [H, W, 3] or [3, H, W], got shape {tuple(image.shape)}")
        return image[None]  # [1, H, W, 3] / [1, 3, H, W]
    raise TypeError(f"images[{index}] is a {type(image).__name__}: expected a path, PIL image, array or tensor")


__all__ = ["LatentDiffusion", "build_frozen_clip", "OFFICIAL_DENOISER", "OFFICIAL_BY_MODE", "DEFAULT_GUIDANCE"]
