"""Loading and exporting the released latent priors ``text300M`` / ``image300M`` (reference §5.1, §7.2).

The released ``text_cond.pt`` / ``image_cond.pt`` hold exactly the keys of ``reference/{text,image}_cond_state_dict.tsv``
(303 / 305 keys, module tree ``wrapped.*``). :class:`~shapee.models.LatentDiffusion` keeps the denoiser under
``denoiser.`` with the official names inside it, so the mapping is one prefix: ``wrapped.`` ↔ ``denoiser.``.

The head count is not visible in the weights (``c_qkv`` is ``[3·W, W]`` for any head count), so it comes from the
model name: 16 heads for ``text300M`` and 8 for ``image300M`` (the verified config; §8.3.11: the diffusers
conversion assumes 16 for both, which would silently give wrong outputs for the image prior).

Loading is strict (exact keys and shapes, every offending key listed), never unpickles code, and adopts the file's
tensors (``assign=True`` on a meta-device model: no random init and no second copy of the ~1.26 GB of weights).
:func:`save_official_prior` writes the official layout back, so a loaded file round-trips bit for bit.

:data:`shapee.io.official.OFFICIAL_LOADERS` names :func:`prior_from_state_dict` for both, so
``shapee.io.load_official("text300M", "text_cond.pt")`` works.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shapee.io.layout import _read_state_dict, adopt_state_dict, check_state_dict, read_state_dict_file, write_state_dict
from shapee.models.latent_diffusion import LatentDiffusion

OFFICIAL_PREFIX = "wrapped."
OUR_PREFIX = "denoiser."
PRIOR_COND_MODE = {"text300M": "text", "image300M": "image"}


def _cond_mode(name: str) -> str:
    if name not in PRIOR_COND_MODE:
        raise ValueError(f"unknown official prior {name!r}; expected one of {sorted(PRIOR_COND_MODE)}")
    return PRIOR_COND_MODE[name]


def _to_official_key(key: str) -> str:
    if not key.startswith(OUR_PREFIX):
        raise KeyError(f"no official name for prior key {key!r} (expected the prefix {OUR_PREFIX!r})")
    return OFFICIAL_PREFIX + key[len(OUR_PREFIX) :]


def _from_official_key(key: str) -> str:
    return OUR_PREFIX + key[len(OFFICIAL_PREFIX) :]


def to_official_prior_state_dict(model: "LatentDiffusion") -> dict[str, Tensor]:
    """The prior's weights under the official keys (tensors shared, not copied)."""
    return {_to_official_key(k): v for k, v in model.state_dict().items()}


def _build(name: str, **model_kwargs) -> "LatentDiffusion":
    kwargs = dict(model_kwargs)
    mode = kwargs.pop("cond_mode", _cond_mode(name))
    if mode != _cond_mode(name):
        raise ValueError(f"{name} is a {_cond_mode(name)}-conditional prior, got cond_mode={mode!r}")
    return LatentDiffusion(cond_mode=mode, **kwargs)


def official_prior_keys(name: str, **model_kwargs) -> dict[str, tuple[int, ...]]:
    """``{official key: shape}`` of ``text300M`` / ``image300M``, derived from our module on the meta device.

    ``model_kwargs`` (``denoiser={...}`` size overrides) give the layout of a resized prior. Equals
    ``reference/{text,image}_cond_state_dict.tsv`` at the defaults (tested).
    """
    with torch.device("meta"):
        model = _build(name, **model_kwargs)
    return {k: tuple(v.shape) for k, v in to_official_prior_state_dict(model).items()}


def prior_from_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    name: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    **model_kwargs: Any,
) -> "LatentDiffusion":
    """Build :class:`~shapee.models.LatentDiffusion` for ``name`` and load an official-layout state dict strictly.

    Args:
        state_dict: ``wrapped.*`` tensors (what ``text_cond.pt`` / ``image_cond.pt`` hold).
        name: ``"text300M"`` or ``"image300M"`` (decides the conditioning and the head count).
        device: where the weights go (default: where the tensors are). ``dtype``: cast floating tensors (``None``
            keeps the file's; the only copy made is this cast/move, if any).
        model_kwargs: further :class:`LatentDiffusion` kwargs: ``denoiser`` size overrides (tests use tiny sizes),
            ``clip``, ``guidance_scale``, ``diffusion``, ``precision``.

    Raises:
        OfficialCheckpointError: keys or shapes differ from the layout (every offending key listed), or a value is
            not a tensor.
    """
    with torch.device("meta"):
        model = _build(name, **model_kwargs)
    adopt_state_dict(
        model, state_dict, name=name, to_official=_to_official_key, from_official=_from_official_key,
        device=device, dtype=dtype,
    )
    return model.eval()


def save_official_prior(model: "LatentDiffusion", path: str | os.PathLike) -> Path:
    """Write ``model``'s denoiser in the official ``wrapped.*`` layout, atomically (``.safetensors`` by suffix,
    else ``torch.save`` of a plain tensor dict, loadable with ``weights_only=True``)."""
    return write_state_dict(to_official_prior_state_dict(model), path)


def load_official_prior(name: str, path_or_state_dict, **kwargs) -> "LatentDiffusion":
    """The prior ``name`` from a path to a ``.pt`` / ``.safetensors`` file or a state dict, at the sizes given in
    ``kwargs`` (see :func:`prior_from_state_dict`); :func:`shapee.io.load_official` also reads the sizes from the
    weights' shapes."""
    _cond_mode(name)
    if not isinstance(path_or_state_dict, Mapping):
        path_or_state_dict = read_state_dict_file(path_or_state_dict, what=f"official {name} checkpoint")
    return prior_from_state_dict(path_or_state_dict, name=name, **kwargs)


def load_official_prior_weights(model: "LatentDiffusion", path_or_state_dict, *, name: str | None = None) -> None:
    """Load a released-layout ``text_cond.pt`` / ``image_cond.pt`` (``wrapped.*`` keys) into an existing ``model``,
    strictly (fine-tuning starts from it): every missing, unexpected or mismatched key is listed in the
    :class:`~shapee.io.OfficialCheckpointError` (e.g. a text checkpoint given to an image prior)."""
    state = _read_state_dict(path_or_state_dict)
    expected = {k: tuple(v.shape) for k, v in to_official_prior_state_dict(model).items()}
    check_state_dict(expected, state, name=name or f"{model.cond_mode} prior")
    model.load_state_dict({_from_official_key(k): v for k, v in state.items()}, strict=True)

