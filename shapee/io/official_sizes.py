"""Model sizes of an official-layout checkpoint, read from its tensors' shapes and, optionally, its official config.

The released checkpoints load at the released sizes, but researchers train at other sizes (and the parity references
in ``shared/reference/official_outputs`` are tiny), so :func:`shapee.io.load_official` infers every size that the
weights determine from the state dict's shapes. What the weights cannot show comes from the official config YAML when
one is given (``config=``), else from the released values:

- transmitter: the head count, ``data_ctx``, the inner batch (``n_points``, ``n_views``), ``image_size``, the point
  conv's radius/samples/stride, ``max_depth``, the bottleneck;
- priors: the head count (16 ``text300M``, 8 ``image300M``) and the image prior's number of CLIP grid tokens (256).

Explicit keyword arguments to the loader override both. Nothing here builds a model or reads weights' values.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml
from torch import Tensor

from shapee.io.layout import OfficialCheckpointError
from shapee.nn.encoding import POSITION_OCTAVES, nerf_encoding_width


def _count(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    """How many distinct integers ``N`` make a key match ``pattern`` (a regex with one ``(\\d+)`` group)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := rx.match(k))})


def _shape(state_dict: Mapping[str, Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise OfficialCheckpointError(f"{what}: key {key!r} is missing, so the model's sizes cannot be read from it")
    return tuple(state_dict[key].shape)


def transmitter_sizes(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """``{"encoder_kwargs": ..., "mlp_kwargs": ...}`` that the official transmitter's weights determine."""
    what = "official transmitter state dict"
    width = _shape(state_dict, "encoder.ln_pre.weight", what)[0]
    xattn = _count(state_dict, r"encoder\.encoder\.0\.resblocks\.(\d+)\.")
    processor = _count(state_dict, r"encoder\.processor\.resblocks\.(\d+)\.")
    n_convs = _count(state_dict, r"encoder\.point_conv\.mlp_convs\.(\d+)\.weight")
    conv0 = _shape(state_dict, "encoder.point_conv.mlp_convs.0.weight", what)  # [hidden, in, patch, 1]
    input_width = _shape(state_dict, "encoder.input_proj.weight", what)[1]
    encoder = dict(
        width=width,
        layers=xattn + processor,
        xattn_layers=xattn,
        d_latent=_shape(state_dict, "encoder.output_proj.weight", what)[0],
        latent_ctx=_shape(state_dict, "encoder.output_tokens", what)[0],
        input_channels=input_width // nerf_encoding_width(1, POSITION_OCTAVES),
        pointconv_hidden=[
            _shape(state_dict, f"encoder.point_conv.mlp_convs.{i}.weight", what)[0] for i in range(n_convs)
        ],
        pointconv_patch_size=conv0[2],
        mv_hidden=_shape(state_dict, "encoder.mv_pcl_embed.weight", what)[0],
        patch_size=_shape(state_dict, "encoder.patch_emb.weight", what)[-1],
    )
    mlp = dict(
        d_hidden=_shape(state_dict, "renderer.nerstf.mlp.0.weight", what)[0],
        n_hidden_layers=_count(state_dict, r"renderer\.nerstf\.mlp\.(\d+)\.weight") - 1,
        n_meta_layers=_count(state_dict, r"encoder\.params_proj\.projections\.nerstf__mlp__(\d+)__weight\."),
    )
    return {"encoder_kwargs": encoder, "mlp_kwargs": mlp}


def prior_sizes(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """``denoiser`` kwargs that an official prior's (``wrapped.*``) weights determine."""
    what = "official prior state dict"
    n_ctx, width = _shape(state_dict, "wrapped.pos_emb", what)
    out_channels = _shape(state_dict, "wrapped.output_proj.weight", what)[0]
    d_latent = _shape(state_dict, "wrapped.input_proj.weight", what)[1]
    if "wrapped.clip_embed.weight" in state_dict:  # text: one Linear
        cond_dim = _shape(state_dict, "wrapped.clip_embed.weight", what)[1]
    else:  # image: LayerNorm then Linear
        cond_dim = _shape(state_dict, "wrapped.clip_embed.1.weight", what)[1]
    return dict(
        d_latent=d_latent,
        n_ctx=n_ctx,
        width=width,
        layers=_count(state_dict, r"wrapped\.backbone\.resblocks\.(\d+)\."),
        cond_dim=cond_dim,
        learn_sigma=out_channels == 2 * d_latent,
    )


def _read_config(config: str | os.PathLike | Mapping) -> Mapping:
    if isinstance(config, Mapping):
        return config
    with open(config) as f:
        data = yaml.safe_load(f)  # plain data only: safe_load builds no objects
    if not isinstance(data, Mapping):
        raise ValueError(f"official config {str(config)!r} is not a YAML mapping")
    return data


def transmitter_config_kwargs(config: str | os.PathLike | Mapping) -> dict[str, dict[str, Any]]:
    """The transmitter kwargs an official ``transmitter_config.yaml`` (path or parsed dict) sets."""
    cfg = _read_config(config)
    enc, mlp = dict(cfg.get("encoder", {})), dict(cfg.get("renderer", {}).get("nerstf", {}))
    names = {
        "width": "width", "heads": "heads", "layers": "layers", "init_scale": "init_scale", "data_ctx": "data_ctx",
        "d_latent": "d_latent", "input_channels": "input_channels", "max_depth": "max_depth",
        "patch_size": "patch_size", "image_size": "image_size", "pointconv_samples": "pointconv_samples",
        "pointconv_stride": "pointconv_stride", "pointconv_patch_size": "pointconv_patch_size",
    }
    encoder = {ours: enc[theirs] for theirs, ours in names.items() if theirs in enc}
    if "pointconv_hidden" in enc:
        encoder["pointconv_hidden"] = list(enc["pointconv_hidden"])
    if "inner_batch_size" in enc:
        encoder["n_points"], encoder["n_views"] = (int(n) for n in enc["inner_batch_size"])
    bottleneck = enc.get("latent_bottleneck", {})
    if "diffusion_prob" in bottleneck:
        encoder["bottleneck_prob"] = bottleneck["diffusion_prob"]
    diffusion = bottleneck.get("diffusion", {})
    if "timesteps" in diffusion:
        encoder["bottleneck_timesteps"] = diffusion["timesteps"]
    if "power" in diffusion.get("schedule_args", {}):
        encoder["bottleneck_power"] = diffusion["schedule_args"]["power"]
    mlp_names = ("d_hidden", "n_hidden_layers", "n_meta_layers", "insert_direction_at", "init_scale",
                 "initial_density_bias")
    return {"encoder_kwargs": encoder, "mlp_kwargs": {k: mlp[k] for k in mlp_names if k in mlp}}


def prior_config_kwargs(config: str | os.PathLike | Mapping) -> dict[str, Any]:
    """The ``denoiser`` kwargs an official ``{text,image}_cond_config.yaml`` (path or parsed dict) sets."""
    cfg = _read_config(config)
    inner = dict(cfg.get("inner", {}))
    out = {k: inner[k] for k in ("width", "layers", "heads", "init_scale", "pos_emb_init_scale", "cond_drop_prob")
           if k in inner}
    if "latent_ctx" in cfg:
        out["n_ctx"] = cfg["latent_ctx"]
        if "d_latent" in cfg:
            out["d_latent"] = cfg["d_latent"] // cfg["latent_ctx"]
    return out


def merge_sizes(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge kwargs dicts left to right, one level deep for nested dicts (later wins)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in dict(layer or {}).items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = dict(value) if isinstance(value, Mapping) else value
    return merged


__all__ = [
    "transmitter_sizes",
    "prior_sizes",
    "transmitter_config_kwargs",
    "prior_config_kwargs",
    "merge_sizes",
]
