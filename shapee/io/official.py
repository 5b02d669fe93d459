"""Loading and exporting the released Shap-E checkpoints (reference §7).

``transmitter``: the released ``transmitter.pt`` holds exactly the 213 keys of ``reference/transmitter_state_dict.tsv``
(the official loader is strict). Our modules use the official names inside each piece; only the tree differs:

=================================  ==================================
official key prefix                ours (:class:`TransmitterModules`)
=================================  ==================================
``encoder.params_proj.``           ``params_proj.``
``encoder.``                       ``encoder.`` (:class:`ChannelsEncoder`)
``renderer.nerstf.``               ``nerstf.`` (:class:`NeRSTFMLP`)
``renderer.void.background``       ``void_background`` (buffer, black)
=================================  ==================================

Loading is strict (exact keys and shapes, with an error listing every missing, unexpected and mismatched key) and
never unpickles code (``torch.load(weights_only=True)`` or safetensors). Export writes the official layout back, so
a loaded file round-trips bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn

from shapee.io.layout import (  # noqa: F401  (re-exported: the layout helpers were first defined here)
    OfficialCheckpointError,
    _read_state_dict,
    adopt_state_dict,
    check_state_dict,
    read_state_dict_file,
    read_state_dict_tsv,
    write_state_dict,
)
from shapee.io import official_sizes as sizes
from shapee.io.official_pointe import pointe_sdf_from_state_dict
from shapee.io.official_priors import PRIOR_COND_MODE, prior_from_state_dict
from shapee.models.transmitter import (  # noqa: F401  (re-exported: the composite's pieces live in models/)
    Transmitter,
    TransmitterModules,
    build_transmitter_modules,
)

# (ours, official) key prefixes; the more specific official prefix comes first so that it wins when mapping back.
_TRANSMITTER_PREFIXES = (
    ("params_proj.", "encoder.params_proj."),
    ("encoder.", "encoder."),
    ("nerstf.", "renderer.nerstf."),
    ("void_background", "renderer.void.background"),
)


# ------------------------------------------------------------------------------------------------ key mapping
def _to_official_key(key: str) -> str:
    for ours, official in _TRANSMITTER_PREFIXES:
        if key.startswith(ours):
            return official + key[len(ours) :]
    raise KeyError(f"no official name for transmitter key {key!r}")


def _from_official_key(key: str) -> str | None:
    for ours, official in _TRANSMITTER_PREFIXES:
        if key.startswith(official):
            return ours + key[len(official) :]
    return None


def to_official_state_dict(modules: TransmitterModules) -> dict[str, Tensor]:
    """Our modules' weights under the official transmitter keys (tensors are shared, not copied)."""
    return {_to_official_key(k): v for k, v in modules.state_dict().items()}


def official_transmitter_keys(**build_kwargs) -> dict[str, tuple[int, ...]]:
    """``{official key: shape}`` of the transmitter, derived from our modules at the released sizes.

    Built on the meta device (no memory). With ``build_kwargs`` (see :func:`build_transmitter_modules`) it gives
    the layout of a resized model. Equals ``reference/transmitter_state_dict.tsv`` at the defaults (tested).
    """
    with torch.device("meta"):
        modules = build_transmitter_modules(**build_kwargs)
    return {k: tuple(v.shape) for k, v in to_official_state_dict(modules).items()}


def transmitter_modules_from_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    encoder_kwargs: Mapping | None = None,
    mlp_kwargs: Mapping | None = None,
    params_proj_kwargs: Mapping | None = None,
) -> TransmitterModules:
    """Build a :class:`shapee.models.Transmitter` and load an official-layout transmitter state dict strictly.

    The modules are built on the meta device and adopt the checkpoint's tensors (``assign=True``: no random init,
    no second copy of the ~1.8 GB of weights), cast to ``dtype`` (``None`` keeps the file's) and moved to
    ``device``. Sizes are the released ones unless overridden by the ``*_kwargs`` (tests use tiny sizes).
    """
    with torch.device("meta"):
        modules = Transmitter(encoder=encoder_kwargs, mlp=mlp_kwargs, params_proj=params_proj_kwargs)
    return adopt_state_dict(
        modules, state_dict, name="transmitter", to_official=_to_official_key, from_official=_from_official_key,
        device=device, dtype=dtype,
    )


def save_official_transmitter(modules: TransmitterModules, path: str | os.PathLike) -> None:
    """Write ``modules`` in the official transmitter layout (a plain tensor dict), atomically."""
    write_state_dict(to_official_state_dict(modules), path)


# name → loader(state_dict, **kwargs): the one table of released layouts (no registration by import side effects).
OFFICIAL_LOADERS: dict[str, Callable[..., nn.Module]] = {
    "transmitter": transmitter_modules_from_state_dict,
    "text300M": partial(prior_from_state_dict, name="text300M"),
    "image300M": partial(prior_from_state_dict, name="image300M"),
    "pointe_sdf": pointe_sdf_from_state_dict,
}


def load_official(
    name: str,
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    config: str | os.PathLike | Mapping | None = None,
    **kwargs,
) -> nn.Module:
    """Load an official-layout checkpoint (a path to a ``.pt``/``.safetensors`` file, or a state dict) by model name.

    ``load_official("transmitter", "transmitter.pt")`` → :class:`shapee.models.Transmitter`. Any size loads with one
    call: the sizes the weights determine are read from the tensors' shapes (:mod:`shapee.io.official_sizes`); what
    they cannot show (head counts, the encoder's inner batch and image size, ...) comes from ``config``, the official
    config YAML (path or dict), when given, else from the released values. ``kwargs`` go to the loader (``device``,
    ``dtype``) and override sizes (``encoder_kwargs``/``mlp_kwargs`` for the transmitter, ``denoiser`` for the priors).

    Raises:
        ValueError: unknown ``name``. FileNotFoundError: no such file. :class:`OfficialCheckpointError`: naming the
            file and the problem: not a weights-only tensor dict (garbage, truncated, pickled code: refused without
            running it; see :func:`read_state_dict_file`), or keys/shapes that differ from the layout.
    """
    if name not in OFFICIAL_LOADERS:
        raise ValueError(f"unknown official model {name!r}; supported: {sorted(OFFICIAL_LOADERS)}")
    if isinstance(path_or_state_dict, Mapping):
        state_dict = path_or_state_dict
    else:
        state_dict = read_state_dict_file(path_or_state_dict, what=f"official {name} checkpoint")
    return OFFICIAL_LOADERS[name](state_dict, **_sized_kwargs(name, state_dict, config, kwargs))


def _sized_kwargs(name: str, state_dict: Mapping[str, Tensor], config, kwargs: Mapping) -> dict:
    """The loader's kwargs with the model sizes filled in: shapes < ``config`` < explicit ``kwargs``.

    A state dict whose size-bearing keys are missing gets no inferred sizes, so that the strict loader reports every
    missing and unexpected key at once."""
    if name == "transmitter":
        try:
            inferred = sizes.transmitter_sizes(state_dict)
        except OfficialCheckpointError:
            inferred = {}
        from_config = sizes.transmitter_config_kwargs(config) if config is not None else {}
        return sizes.merge_sizes(inferred, from_config, kwargs)
    if name not in PRIOR_COND_MODE:  # pointe_sdf: sizes as given
        return dict(kwargs)
    try:
        inferred = {"denoiser": sizes.prior_sizes(state_dict)}
    except OfficialCheckpointError:
        inferred = {}
    from_config = {"denoiser": sizes.prior_config_kwargs(config)} if config is not None else {}
    return sizes.merge_sizes(inferred, from_config, kwargs)
