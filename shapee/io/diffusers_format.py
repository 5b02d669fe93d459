"""Shap-E weights in diffusers' folder layout, in and out.

A diffusers Shap-E folder (``ShapEPipeline`` / ``ShapEImg2ImgPipeline``) holds components, each a ``config.json`` and
``diffusion_pytorch_model.safetensors`` (or ``.bin``, or sharded with an ``.index.json``):

- ``prior/``: a ``PriorTransformer`` (the text300M / image300M denoiser);
- ``shap_e_renderer/`` (older releases: ``renderer/``): a ``ShapERenderer`` = the transmitter's decoder (latent →
  MLP weights ``params_proj`` + the NeRSTF ``mlp``);
- ``scheduler/``: the ``HeunDiscreteScheduler`` config (exp schedule, 1024 steps, Karras σ, x₀ prediction).

Reading needs no diffusers: the weights are mapped onto the official key layout and loaded through
:func:`shapee.io.load_official` (strict; sizes from the shapes). Writing (:func:`export_diffusers`) builds diffusers'
own classes so that ``from_pretrained`` loads exactly what diffusers expects; it needs ``pip install diffusers``
(the ``diffusers`` extra).

Facts the mapping rests on (diffusers' ``models/transformers/prior_transformer.py`` and
``pipelines/shap_e/{pipeline_shap_e,renderer}.py``, checked against diffusers 0.42 by ``tests/test_diffusers.py``):

- official ``c_qkv`` ``[3W, W]`` is per-head interleaved: viewed as ``[heads, 3, W/heads, W]``, ``[:, 0]`` is
  ``to_q``, ``[:, 1]`` ``to_k``, ``[:, 2]`` ``to_v``; so the head count (``num_attention_heads``) is needed to map.
- ``time_embed.c_fc/c_proj`` ↔ ``time_embedding.linear_1/linear_2``; ``ln_pre/ln_post`` ↔ ``norm_in/norm_out``;
  ``input_proj/output_proj`` ↔ ``proj_in/proj_to_clip_embeddings``; ``pos_emb [n, W]`` ↔ ``positional_embedding
  [1, n, W]``; blocks ``ln_1, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj`` ↔ ``norm1, attn1.to_out.0, norm3,
  ff.net.0.proj, ff.net.2``.
- text prior: ``clip_embed`` (Linear) ↔ ``embedding_proj``; diffusers' pipeline multiplies the normalised CLIP text
  embedding by √768 before the model, shapee's denoiser does it inside, so the weights map as they are and
  ``ours(x, t, e) == diffusers(x, t, proj_embedding=√D·e)``.
- image prior: ``clip_embed.0`` (LayerNorm) / ``clip_embed.1`` (Linear) ↔ ``embedding_proj_norm`` / ``embedding_proj``;
  the 256 grid tokens go in as ``proj_embedding [B, 256, 1024]`` (their order before the latents does not matter:
  no mask, no position embedding on them).
- ``clip_mean``/``clip_std`` are not part of Shap-E (the pipelines never call ``post_process_latents``); the
  released conversion leaves them out. Export writes the identity (mean 0, std 1).
- renderer: ``params_proj.projections.*`` ↔ ``encoder.params_proj.projections.*``, ``mlp.mlp.{i}`` ↔
  ``renderer.nerstf.mlp.{i}``, ``void.background`` ↔ ``renderer.void.background``; ``mesh_decoder.*`` (diffusers'
  marching-cube tables) are not weights and are ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from shapee.io.layout import OfficialCheckpointError
from shapee.io.official import _from_official_key, _to_official_key, load_official, to_official_state_dict
from shapee.io.official_priors import to_official_prior_state_dict
from shapee.models.transmitter import Transmitter

PRIOR_DIR = "prior"
RENDERER_DIRS = ("shap_e_renderer", "renderer")
SCHEDULER_DIR = "scheduler"
WEIGHTS = "diffusion_pytorch_model"
# What diffusers' Shap-E pipelines use (exp schedule, 1024 steps, Karras sigmas 1e-3..160, x0 prediction, clipped).
SCHEDULER_CONFIG = {
    "_class_name": "HeunDiscreteScheduler",
    "beta_schedule": "exp",
    "num_train_timesteps": 1024,
    "prediction_type": "sample",
    "use_karras_sigmas": True,
    "clip_sample": True,
    "clip_sample_range": 1.0,
}

_BLOCK = {  # official (inside backbone.resblocks.{i}.) → diffusers (inside transformer_blocks.{i}.)
    "ln_1": "norm1", "attn.c_proj": "attn1.to_out.0", "ln_2": "norm3", "mlp.c_fc": "ff.net.0.proj",
    "mlp.c_proj": "ff.net.2",
}
_TOP = {
    "time_embed.c_fc": "time_embedding.linear_1", "time_embed.c_proj": "time_embedding.linear_2",
    "ln_pre": "norm_in", "ln_post": "norm_out", "input_proj": "proj_in", "output_proj": "proj_to_clip_embeddings",
}
_TEXT_COND = {"clip_embed": "embedding_proj"}
_IMAGE_COND = {"clip_embed.0": "embedding_proj_norm", "clip_embed.1": "embedding_proj"}


# ------------------------------------------------------------------------------------------------ reading
def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder with a ``prior/`` or a renderer component (or one component folder itself)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "config.json").is_file():
        return True
    return any((p / d / "config.json").is_file() for d in (PRIOR_DIR, *RENDERER_DIRS))


def _component_dir(folder: Path, names: tuple[str, ...], what: str) -> Path:
    if (folder / "config.json").is_file():
        return folder  # the component folder itself
    for name in names:
        if (folder / name / "config.json").is_file():
            return folder / name
    raise FileNotFoundError(
        f"{str(folder)!r} has no diffusers {what} (looked for {', '.join(n + '/config.json' for n in names)})"
    )


def read_component(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state_dict)`` of one diffusers component folder. Weights: safetensors, a sharded safetensors index,
    or ``.bin`` read with ``torch.load(weights_only=True)``: nothing in the folder can run code."""
    d = Path(directory)
    with open(d / "config.json") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise OfficialCheckpointError(f"{str(d / 'config.json')!r} is not a JSON object")
    single, index = d / f"{WEIGHTS}.safetensors", d / f"{WEIGHTS}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        with open(index) as f:
            files = sorted({d / name for name in json.load(f)["weight_map"].values()})
    elif (d / f"{WEIGHTS}.bin").is_file():
        files = [d / f"{WEIGHTS}.bin"]
    else:
        raise FileNotFoundError(f"{str(d)!r} has no {WEIGHTS}.safetensors (or .bin / sharded index)")
    state: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
                raise OfficialCheckpointError(f"{str(file)!r} is not a weights-only tensor file: {e}") from e
            if not isinstance(obj, Mapping):
                raise OfficialCheckpointError(f"{str(file)!r} does not hold a state dict")
            state.update(obj)
    return config, state


def _split_qkv(weight: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Official per-head interleaved ``c_qkv`` (weight ``[3W, ...]`` or bias ``[3W]``) → q, k, v each ``[W, ...]``."""
    width = weight.shape[0] // 3
    per_head = weight.reshape(heads, 3, width // heads, *weight.shape[1:])
    return tuple(per_head[:, i].reshape(width, *weight.shape[1:]) for i in range(3))


def _join_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    width = q.shape[0]
    parts = [t.reshape(heads, 1, width // heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(3 * width, *q.shape[1:])


def _cond_map(cond_mode: str) -> dict[str, str]:
    return _TEXT_COND if cond_mode == "text" else _IMAGE_COND


def prior_to_official(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """A diffusers ``PriorTransformer`` state dict → official ``wrapped.*`` keys, and the prior's conditioning mode."""
    heads = int(config["num_attention_heads"])
    mode = "image" if "embedding_proj_norm.weight" in state else "text"
    rename = {**_TOP, **_cond_map(mode)}
    out: dict[str, Tensor] = {}
    for ours, theirs in rename.items():
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in state:
                out[f"wrapped.{ours}.{p}"] = state[f"{theirs}.{p}"]
    if "positional_embedding" in state:
        out["wrapped.pos_emb"] = state["positional_embedding"].reshape(state["positional_embedding"].shape[-2:])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    for i in sorted(blocks):
        src, dst = f"transformer_blocks.{i}.", f"wrapped.backbone.resblocks.{i}."
        for ours, theirs in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = state[f"{src}{theirs}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = (state[f"{src}attn1.to_{x}.{p}"] for x in "qkv")
            out[f"{dst}attn.c_qkv.{p}"] = _join_qkv(q, k, v, heads)
    known = {"clip_mean", "clip_std", "positional_embedding"}
    unused = sorted(k for k in state if k not in known and not k.startswith("transformer_blocks.")
                    and k.rsplit(".", 1)[0] not in rename.values())
    if unused:
        raise OfficialCheckpointError(
            f"diffusers prior has weights shapee's denoiser does not have: {unused[:5]} (a PriorTransformer configured "
            "for Shap-E has no prd_embedding / encoder_hidden_states_proj)"
        )
    return out, mode


def prior_from_official(state: Mapping[str, Tensor], heads: int, cond_mode: str) -> dict[str, Tensor]:
    """Official ``wrapped.*`` keys → a diffusers ``PriorTransformer`` state dict (``clip_mean`` 0, ``clip_std`` 1)."""
    rename = {**_TOP, **_cond_map(cond_mode)}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key[len("wrapped."):]
        if name == "pos_emb":
            out["positional_embedding"] = value[None]
            continue
        m = re.match(r"backbone\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            i, part, p = m.groups()
            if part == "attn.c_qkv":
                for x, t in zip("qkv", _split_qkv(value, heads)):
                    out[f"transformer_blocks.{i}.attn1.to_{x}.{p}"] = t
            else:
                out[f"transformer_blocks.{i}.{_BLOCK[part]}.{p}"] = value
            continue
        module, p = name.rsplit(".", 1)
        out[f"{rename[module]}.{p}"] = value
    d = out["proj_to_clip_embeddings.weight"].shape[0]
    out["clip_mean"] = torch.zeros(1, d, dtype=out["proj_in.weight"].dtype)
    out["clip_std"] = torch.ones(1, d, dtype=out["proj_in.weight"].dtype)
    return out


def renderer_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers ``ShapERenderer`` state dict → the official transmitter's decoder keys."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("params_proj."):
            out["encoder." + key] = value
        elif key.startswith("mlp.mlp."):
            out["renderer.nerstf." + key[len("mlp."):]] = value
        elif key == "void.background":
            out["renderer.void.background"] = value
    return out


# ----------------------------------------------------------------------------------------------- loading
def load_diffusers_prior(folder: str | os.PathLike, *, device: str | torch.device = "cpu", **kwargs):
    """:class:`~shapee.models.LatentDiffusion` from a diffusers Shap-E folder's ``prior/`` (or that folder itself).
    ``kwargs`` go to :func:`shapee.io.load_official` (e.g. ``denoiser={"cond_tokens": ...}``, ``clip={...}``)."""
    directory = _component_dir(Path(folder), (PRIOR_DIR,), "prior")
    config, state = read_component(directory)
    official, mode = prior_to_official(state, config)
    name = "text300M" if mode == "text" else "image300M"
    denoiser = {"heads": int(config["num_attention_heads"]), **dict(kwargs.pop("denoiser", {}) or {})}
    return load_official(name, official, device=device, denoiser=denoiser, **kwargs).eval()


def load_diffusers_transmitter(folder: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """A decoder-only :class:`~shapee.models.Transmitter` from a diffusers folder's ``shap_e_renderer/`` (older:
    ``renderer/``): latent → MLP weights → fields, meshes and renders. diffusers holds no encoder, so the transmitter's
    encoder is a small placeholder and :meth:`~shapee.models.Transmitter.encode` refuses to run."""
    directory = _component_dir(Path(folder), RENDERER_DIRS, "renderer (shap_e_renderer/)")
    config, state = read_component(directory)
    official = renderer_to_official(state)
    shapes = [tuple(s) for s in config.get("param_shapes", [])]
    if not shapes:
        raise OfficialCheckpointError(f"{str(directory / 'config.json')!r} has no param_shapes")
    mlp = dict(
        d_hidden=int(config.get("d_hidden", shapes[0][0])),
        n_hidden_layers=int(config.get("n_hidden_layers", 6)),
        n_meta_layers=len(shapes),
        insert_direction_at=int(config.get("insert_direction_at", 4)),
    )
    d_latent = int(config.get("d_latent", 1024))
    model = Transmitter(encoder=decoder_only_encoder_kwargs(d_latent), mlp=mlp)
    expected = {k for k in (_to_official_key(k) for k in model.state_dict()) if not k.startswith("encoder.")
                or k.startswith("encoder.params_proj.")}
    missing, unexpected = sorted(expected - set(official)), sorted(set(official) - expected)
    if missing or unexpected:
        raise OfficialCheckpointError(
            f"diffusers renderer {str(directory)!r} does not fit a NeRSTF decoder of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    decoder = {_from_official_key(k): v for k, v in official.items()}
    own = model.state_dict()
    bad = [k for k, v in decoder.items() if tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise OfficialCheckpointError(f"diffusers renderer {str(directory)!r}: shapes differ for {bad[:5]}")
    model.load_state_dict(decoder, strict=False)
    model.decoder_only = True
    return model.to(device).eval()


def decoder_only_encoder_kwargs(d_latent: int) -> dict[str, Any]:
    """A ~34k-parameter placeholder encoder whose latent shape matches the decoder (the encoder is never run)."""
    return dict(width=8, heads=1, layers=1, data_ctx=1, n_points=1, n_views=1, pointconv_hidden=(8,),
                pointconv_samples=8, image_size=8, patch_size=8, d_latent=d_latent)


# --------------------------------------------------------------------------------------------------- export
def _require_diffusers():
    try:
        import diffusers  # noqa: F401  (the optional [diffusers] extra: only exporting imports it)
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise ImportError("exporting to diffusers needs diffusers: pip install 'shapee[diffusers]'") from e
    return diffusers


def prior_config(model) -> dict[str, Any]:
    """The ``PriorTransformer`` config of a shapee :class:`~shapee.models.LatentDiffusion`."""
    d = model.denoiser
    heads = d.backbone.resblocks[0].attn.heads
    return dict(
        num_attention_heads=heads, attention_head_dim=d.width // heads, num_layers=len(d.backbone.resblocks),
        embedding_dim=d.d_latent, num_embeddings=d.n_ctx, additional_embeddings=0, time_embed_act_fn="gelu",
        norm_in_type="layer", embedding_proj_norm_type="layer" if d.cond_mode == "image" else None,
        encoder_hid_proj_type=None, added_emb_type=None, time_embed_dim=4 * d.width, embedding_proj_dim=d.cond_dim,
        clip_embed_dim=d.out_channels,
    )


def renderer_config(transmitter) -> dict[str, Any]:
    """The ``ShapERenderer`` config of a shapee :class:`~shapee.models.Transmitter`'s decoder."""
    shapes = transmitter.nerstf.meta_parameter_shapes()
    mlp = transmitter.nerstf
    return dict(
        param_names=[f"nerstf.{k}" for k in shapes], param_shapes=[list(s) for s in shapes.values()],
        d_latent=transmitter.params_proj.d_latent, d_hidden=mlp.mlp[0].weight.shape[0], n_output=12,
        n_hidden_layers=len(mlp.mlp) - 1, act_fn="swish", insert_direction_at=mlp.insert_direction_at,
        background=[float(x) * 255.0 for x in transmitter.void_background.tolist()],
    )


def export_diffusers(out: str | os.PathLike, *, prior=None, transmitter=None) -> Path:
    """Write ``prior`` (a :class:`~shapee.models.LatentDiffusion`) and/or ``transmitter``'s decoder as a diffusers
    Shap-E folder: ``prior/``, ``shap_e_renderer/``, ``scheduler/`` and a ``model_index.json`` naming them. The text
    encoder / image encoder (CLIP ViT-L/14) are not written: pass diffusers' own to the pipeline."""
    _require_diffusers()
    # diffusers is the optional [diffusers] extra (and ~1.4 s to import): only exporting needs it.
    from diffusers import HeunDiscreteScheduler, PriorTransformer
    from diffusers.pipelines.shap_e.renderer import ShapERenderer

    if prior is None and transmitter is None:
        raise ValueError("export_diffusers needs prior= and/or transmitter=")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": "ShapEPipeline"}
    if prior is not None:
        config = prior_config(prior)
        module = PriorTransformer(**config)
        weights = prior_from_official(
            {k: v.detach().cpu().float() for k, v in to_official_prior_state_dict(prior).items()},
            config["num_attention_heads"], prior.cond_mode,
        )
        module.load_state_dict(weights, strict=True)
        module.save_pretrained(out / PRIOR_DIR)
        index[PRIOR_DIR] = ["diffusers", "PriorTransformer"]
        if prior.cond_mode == "image":
            index["_class_name"] = "ShapEImg2ImgPipeline"
    if transmitter is not None:
        config = renderer_config(transmitter)
        module = ShapERenderer(**config)
        official = {k: v.detach().cpu().float() for k, v in to_official_state_dict(transmitter).items()}
        weights = {**module.state_dict()}  # keeps diffusers' own mesh_decoder tables
        for key, value in official.items():
            if key.startswith("encoder.params_proj."):
                weights[key[len("encoder."):]] = value
            elif key.startswith("renderer.nerstf.mlp."):
                weights["mlp." + key[len("renderer.nerstf."):]] = value
            elif key == "renderer.void.background":
                weights["void.background"] = value
        module.load_state_dict(weights, strict=True)
        module.save_pretrained(out / RENDERER_DIRS[0])
        index[RENDERER_DIRS[0]] = ["shap_e", "ShapERenderer"]
    scheduler = HeunDiscreteScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")})
    scheduler.save_pretrained(out / SCHEDULER_DIR)
    index[SCHEDULER_DIR] = ["diffusers", "HeunDiscreteScheduler"]
    with open(out / "model_index.json", "w") as f:
        json.dump(index, f, indent=2)
    return out


def text_embedding_scale(cond_dim: int) -> float:
    """What diffusers' ShapEPipeline multiplies the normalised CLIP text embedding by (shapee's denoiser does it
    inside): √cond_dim."""
    return math.sqrt(cond_dim)


__all__ = [
    "SCHEDULER_CONFIG",
    "export_diffusers",
    "is_diffusers_folder",
    "load_diffusers_prior",
    "load_diffusers_transmitter",
    "prior_from_official",
    "prior_to_official",
    "read_component",
    "renderer_to_official",
]
