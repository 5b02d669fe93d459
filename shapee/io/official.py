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
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from shapee.encoder.encoder import ChannelsEncoder
from shapee.implicit.mlp import NeRSTFMLP
from shapee.implicit.params_proj import ChannelsParamsProj

# (ours, official) key prefixes; the more specific official prefix comes first so that it wins when mapping back.
_TRANSMITTER_PREFIXES = (
    ("params_proj.", "encoder.params_proj."),
    ("encoder.", "encoder."),
    ("nerstf.", "renderer.nerstf."),
    ("void_background", "renderer.void.background"),
)


class OfficialCheckpointError(ValueError):
    """A file that is not a readable weights-only state dict, or a state dict that does not match the official layout;
    the message names the file (or the model) and the problem, listing every offending key."""


class TransmitterModules(nn.Module):
    """The learned pieces of the released transmitter: ``encoder``, ``params_proj``, ``nerstf`` (+ black background).

    ``latent = encoder(batch)``; ``params = params_proj(latent)``; ``nerstf(params, points)``. The renderers that turn
    queries into pixels are parameter-free and live in :mod:`shapee.render`.
    """

    def __init__(self, encoder: ChannelsEncoder, params_proj: ChannelsParamsProj, nerstf: NeRSTFMLP) -> None:
        super().__init__()
        if params_proj.latent_ctx != encoder.latent_ctx or params_proj.d_latent != encoder.d_latent:
            raise ValueError(
                f"params_proj consumes [{params_proj.latent_ctx}, {params_proj.d_latent}] latents but the encoder makes "
                f"[{encoder.latent_ctx}, {encoder.d_latent}]"
            )
        if dict(params_proj.param_shapes) != nerstf.meta_parameter_shapes():
            raise ValueError(
                f"params_proj produces {params_proj.param_shapes} but the MLP needs {nerstf.meta_parameter_shapes()}"
            )
        self.encoder = encoder
        self.params_proj = params_proj
        self.nerstf = nerstf
        # The official VoidNeRFModel's background colour: kept only so that checkpoints round-trip exactly.
        self.register_buffer("void_background", torch.zeros(3))


def build_transmitter_modules(
    *,
    encoder_kwargs: Mapping | None = None,
    mlp_kwargs: Mapping | None = None,
    params_proj_kwargs: Mapping | None = None,
) -> TransmitterModules:
    """Transmitter modules at the released sizes, with optional keyword overrides per piece.

    ``latent_ctx`` of the encoder defaults to the MLP's total number of meta rows, and ``d_latent`` of the params
    projection to the encoder's. Build under ``with torch.device("meta"):`` to get shapes without memory.
    """
    mlp = NeRSTFMLP(**dict(mlp_kwargs or {}))
    shapes = mlp.meta_parameter_shapes()
    enc_kwargs = dict(encoder_kwargs or {})
    enc_kwargs.setdefault("latent_ctx", sum(rows for rows, _ in shapes.values()))
    encoder = ChannelsEncoder(**enc_kwargs)
    proj_kwargs = dict(params_proj_kwargs or {})
    proj_kwargs.setdefault("d_latent", encoder.d_latent)
    params_proj = ChannelsParamsProj(param_shapes=shapes, **proj_kwargs)
    return TransmitterModules(encoder, params_proj, mlp)


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


def read_state_dict_tsv(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Parse a ``key<TAB>(d0, d1, ...)`` listing such as ``reference/transmitter_state_dict.tsv``."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            key, shape = line.split("\t")
            dims = shape.strip().strip("()").replace(" ", "")
            out[key] = tuple(int(d) for d in dims.split(",") if d)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: expected 'key<TAB>(d0, d1, ...)', got {line!r}") from e
    return out


def check_state_dict(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, Tensor], *, name: str) -> None:
    """Raise :class:`OfficialCheckpointError` unless ``state_dict`` has exactly the ``expected`` keys and shapes."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        parts = [f"state dict does not match the official {name} layout:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"  {len(items)} {label}:\n    {shown}")
        raise OfficialCheckpointError("\n".join(parts))


def adopt_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    name: str,
    to_official: Callable[[str], str] = lambda key: key,
    from_official: Callable[[str], str | None] = lambda key: key,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Load an official-layout ``state_dict`` strictly into ``model`` (built on the meta device) by adopting its
    tensors (``assign=True``: no random init, no second copy), cast to ``dtype`` (``None`` keeps the file's) and
    moved to ``device``. ``to_official`` / ``from_official`` map our key names to the file's and back.

    Raises:
        OfficialCheckpointError: keys or shapes differ (every offending key listed), or a value is not a tensor.
    """
    expected = {to_official(k): tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(expected, state_dict, name=name)
    ours = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise OfficialCheckpointError(f"{name}: {key} is a {type(value).__name__}, not a tensor")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        ours[from_official(key)] = value.to(device) if device is not None else value
    model.load_state_dict(ours, strict=True, assign=True)
    return model


def write_state_dict(state_dict: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write a plain tensor dict atomically: ``.safetensors`` by suffix, else ``torch.save`` (loadable with
    ``weights_only=True``). Returns the path."""
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp))
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ load / save
def read_state_dict_file(path: str | os.PathLike, *, what: str = "official checkpoint") -> dict[str, Tensor]:
    """A plain tensor dict from a ``.safetensors`` file or a ``.pt`` file read with ``torch.load(weights_only=True)``.

    Never runs code from the file: ``weights_only=True`` refuses any pickled global that is not a tensor or a plain
    container *before* calling it, so a file whose pickle would call e.g. ``os.system`` is refused, not executed.

    Raises:
        FileNotFoundError: no such file (named, with ``what``).
        OfficialCheckpointError: naming the file and the problem: not a readable torch / safetensors file (garbage,
            truncated), pickled objects other than tensors (refused by ``weights_only``), or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses (without calling) any global that is not a tensor/plain container; garbage bytes land
        # here too ("invalid load key").
        raise OfficialCheckpointError(
            f"{what} {str(path)!r}: cannot be read as a weights-only state dict: not a torch checkpoint, or it holds "
            f"pickled objects other than tensors (refused, never executed) ({type(e).__name__}: {e})"
        ) from e
    except Exception as e:  # truncated zip, safetensors header errors, EOFError, ...
        raise OfficialCheckpointError(
            f"{what} {str(path)!r}: cannot be read as a weights-only state dict: corrupt, truncated or not a "
            f"{'safetensors' if path.suffix == '.safetensors' else 'torch'} file ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(sd, Mapping):
        raise OfficialCheckpointError(f"{what} {str(path)!r} does not hold a state dict (got {type(sd).__name__})")
    bad = sorted(repr(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor))
    if bad:
        raise OfficialCheckpointError(
            f"{what} {str(path)!r} is not a plain tensor dict: entries {bad[:5]}{'...' if len(bad) > 5 else ''} "
            "are not tensors"
        )
    return dict(sd)


def _read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A state dict as given, or read from a file by :func:`read_state_dict_file`."""
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    return read_state_dict_file(path_or_state_dict)


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
    from shapee.models.transmitter import Transmitter  # the composite; imported here to avoid an import cycle

    with torch.device("meta"):
        modules = Transmitter(encoder=encoder_kwargs, mlp=mlp_kwargs, params_proj=params_proj_kwargs)
    return adopt_state_dict(
        modules, state_dict, name="transmitter", to_official=_to_official_key, from_official=_from_official_key,
        device=device, dtype=dtype,
    )


def save_official_transmitter(modules: TransmitterModules, path: str | os.PathLike) -> None:
    """Write ``modules`` in the official transmitter layout (a plain tensor dict), atomically."""
    write_state_dict(to_official_state_dict(modules), path)


# name → loader(state_dict, **kwargs); the priors (text300M, image300M) are registered by their own module.
OFFICIAL_LOADERS: dict[str, Callable[..., nn.Module]] = {"transmitter": transmitter_modules_from_state_dict}


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
    from shapee.io import official_sizes as sizes

    if name == "transmitter":
        try:
            inferred = sizes.transmitter_sizes(state_dict)
        except OfficialCheckpointError:
            inferred = {}
        from_config = sizes.transmitter_config_kwargs(config) if config is not None else {}
        return sizes.merge_sizes(inferred, from_config, kwargs)
    try:
        inferred = {"denoiser": sizes.prior_sizes(state_dict)}
    except OfficialCheckpointError:
        inferred = {}
    from_config = {"denoiser": sizes.prior_config_kwargs(config)} if config is not None else {}
    return sizes.merge_sizes(inferred, from_config, kwargs)
