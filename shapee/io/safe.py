"""Rebuilding a model from a config read from a file, without letting the file choose what runs.

``torch.load(weights_only=True)`` guarantees that a snapshot or checkpoint holds only tensors and plain containers,
but its model config still *names* code: handing it to ``hydra.utils.instantiate`` calls whatever ``_target_`` it
holds, at any depth (a nested ``{"_target_": "builtins.open", "_args_": [<file>, "w"]}`` truncates that file). So
file content never reaches Hydra. :func:`check_model_config` walks the whole config first, at every depth, and refuses
it unless its one ``_target_`` (top level) is a shapee model class on :data:`ALLOWED_MODELS` and nothing else in it
is a Hydra construction key; :func:`build_model` then calls that class itself with the remaining keys, bound against
its signature first, and loads the weights strictly. Every loader of our files goes through :func:`build_model`, and
every trainer builds its model through :func:`instantiate_model` (the same check and call, without weights), so one
model config builds the same model in training and at load time.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from shapee.io.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, SNAPSHOT_FORMAT, CheckpointError

# ``_target_`` strings a file may name → (module, class). These are what configs/model/*.yaml name, which the trainers
# (shapee/train/{encoder,diffusion,pointe_sdf}.py) build through instantiate_model and write into snapshots and full
# checkpoints as they are, plus the defining-module spelling of each that the trainers also accept. Nothing nested
# is allowed: the shipped configs nest only plain keyword dicts (denoiser, diffusion, clip; encoder, mlp, params_proj).
ALLOWED_MODELS: dict[str, tuple[str, str]] = {
    "shapee.models.Transmitter": ("shapee.models.transmitter", "Transmitter"),
    "shapee.models.transmitter.Transmitter": ("shapee.models.transmitter", "Transmitter"),
    "shapee.models.LatentDiffusion": ("shapee.models.latent_diffusion", "LatentDiffusion"),
    "shapee.models.latent_diffusion.LatentDiffusion": ("shapee.models.latent_diffusion", "LatentDiffusion"),
    "shapee.models.pointe_sdf.PointESDF": ("shapee.models.pointe_sdf", "PointESDF"),
    "shapee.models.PointESDF": ("shapee.models.pointe_sdf", "PointESDF"),
}
# Keys that files written before a setting moved still carry in their model config, per class: dropped when such a
# file is loaded (they change no weight), refused in a config that is being trained (the setting lives elsewhere now).
# The Transmitter's loss settings moved to the stage config (shapee.models.transmitter.LossSettings).
RETIRED_KEYS: dict[tuple[str, str], dict[str, str]] = {
    ("shapee.models.transmitter", "Transmitter"): {
        key: f"stage.{key}"
        for key in ("teacher", "teacher_checkpoint", "distill_points", "stf_views", "stf_resolution", "stf_sigma")
    },
}
_SCALARS = (str, int, float, bool, type(None))
_MAX_DEPTH = 64  # the shipped configs nest 4 deep (model.clip.model_cfg.vision_cfg); deeper is not ours


def _is_construction_key(key: str) -> bool:
    """Hydra's ``_target_``, ``_args_``, ``_partial_``, ``_recursive_``, ``_convert_`` and any other ``_name_``."""
    return len(key) > 2 and key.startswith("_") and key.endswith("_")


def _walk(node: Any, path: str, source: str, depth: int, on_path: set[int]) -> None:
    """Refuse anything below ``node`` that is not a plain value or container, or that is a construction key."""
    if isinstance(node, _SCALARS):
        return
    if depth > _MAX_DEPTH or id(node) in on_path:
        raise CheckpointError(f"{source}: refused model config: {path} is nested too deep or refers to itself")
    if isinstance(node, Mapping):
        on_path.add(id(node))
        for key in sorted(node, key=lambda k: k != "_target_"):  # a _target_ first: the error names what it calls
            value = node[key]
            if not isinstance(key, str):
                raise CheckpointError(f"{source}: refused model config: {path} has a {type(key).__name__} key")
            child = f"{path}.{key if key.isprintable() else repr(key)}"  # the message stays one line
            if _is_construction_key(key) and not (depth == 0 and key == "_target_"):
                shown = value if isinstance(value, _SCALARS) else type(value).__name__
                raise CheckpointError(
                    f"{source}: refused model config: {child} = {shown!r}: only the top-level _target_ may name "
                    "code, and only a shapee model class; nothing was built"
                )
            _walk(value, child, source, depth + 1, on_path)
        on_path.discard(id(node))
    elif isinstance(node, (list, tuple)):
        on_path.add(id(node))
        for i, value in enumerate(node):
            _walk(value, f"{path}[{i}]", source, depth + 1, on_path)
        on_path.discard(id(node))
    else:
        raise CheckpointError(
            f"{source}: refused model config: {path} is a {type(node).__name__}, not a plain config value"
        )


def check_model_config(
    config: Any, *, source: str, root: str = "model", retired: str = "drop"
) -> tuple[type[nn.Module], dict[str, Any]]:
    """Check a model config read from a file and return ``(model class, constructor kwargs)``; calls nothing.

    The whole config is checked before anything is called (dicts, lists, ``DictConfig``/``ListConfig``, every
    depth): the top-level ``_target_`` must be a key of :data:`ALLOWED_MODELS`, no other ``_target_``/``_args_``/
    ``_partial_``/... key may appear anywhere, values must be plain (str, numbers, bool, None, lists, dicts), and
    the remaining top-level keys must bind to the class's signature.

    Args:
        source: names the file in errors (e.g. ``"prior='runs/x/snapshot.pt'"``).
        root: the config's name in the key paths of errors (``model.denoiser._target_``).
        retired: what to do with the class's :data:`RETIRED_KEYS` (settings that older files still carry in their
            model config): ``drop`` them (loading a file) or ``refuse`` them, naming where they live now (training).

    Raises:
        CheckpointError: one line naming ``source``, the offending key path and the value found there.
    """
    if retired not in ("drop", "refuse"):
        raise ValueError(f"retired must be 'drop' or 'refuse', got {retired!r}")
    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)  # resolvers are code too: never resolved here
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: {root} is {type(config).__name__}, not a model config with a _target_")
    target = config.get("_target_")
    if target is None:
        raise CheckpointError(f"{source}: {root} has no _target_, so the model cannot be rebuilt")
    if not isinstance(target, str) or target not in ALLOWED_MODELS:
        shown = target if isinstance(target, (str, int, float, bool)) else type(target).__name__
        raise CheckpointError(
            f"{source}: refused model config: {root}._target_ = {shown!r} is not a shapee model class "
            f"(allowed: {', '.join(sorted(ALLOWED_MODELS))}); nothing was built"
        )
    _walk(config, root, source, 0, set())
    module, name = ALLOWED_MODELS[target]
    cls = getattr(importlib.import_module(module), name)
    moved = RETIRED_KEYS.get((module, name), {})
    if retired == "refuse" and set(config) & set(moved):
        key = sorted(set(config) & set(moved))[0]
        raise CheckpointError(
            f"{source}: {root}.{key} is not a model setting any more: set {moved[key]} (a training setting, "
            "never saved with the model)"
        )
    kwargs = {k: v for k, v in config.items() if k != "_target_" and k not in moved}
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise CheckpointError(f"{source}: {root} does not fit {target}: {e}") from e
    return cls, kwargs


def is_model_file(obj: Any) -> bool:
    """Whether a loaded file object is one of ours (a snapshot or a full checkpoint), i.e. holds a model config."""
    return isinstance(obj, Mapping) and obj.get("format") in (SNAPSHOT_FORMAT, CHECKPOINT_FORMAT)


def instantiate_model(
    config: Any,
    *,
    source: str,
    expected: str | None = None,
    error: type[Exception] = CheckpointError,
    hint: str = "",
    retired: str = "refuse",
) -> nn.Module:
    """The model a ``_target_`` config describes, built with fresh weights (train mode); the trainers' one way in.

    :func:`check_model_config` approves the whole config (allow-listed ``_target_``, nothing else that names code, keys
    that bind) before the class is called, exactly as for a file (:func:`build_model`). ``expected``, ``error``,
    ``hint``: as for :func:`build_model`; ``retired``: see :func:`check_model_config` (a training config refuses the
    old keys by default).
    """
    cls, kwargs = _checked(config, source=source, expected=expected, error=error, hint=hint, retired=retired)
    return _construct(cls, kwargs, source=source, target=config["_target_"], error=error)


def build_model(
    obj: Mapping[str, Any],
    *,
    source: str,
    expected: str | None = None,
    error: type[Exception] = CheckpointError,
    hint: str = "",
) -> nn.Module:
    """The model a loaded snapshot (its ``weights``) or full checkpoint (its ``ema`` weights) describes, in eval mode.

    The one way our files become models: :func:`check_model_config` approves the whole config before the allowed
    class is called with it, then the weights load strictly. Keys a model config no longer holds
    (:data:`RETIRED_KEYS`, e.g. the Transmitter's loss settings in files written before they moved to the stage
    config) are dropped; any other unknown key is refused.

    Args:
        obj: what ``torch.load(weights_only=True)`` read from the file.
        source: names the file in errors.
        expected: a key of :data:`ALLOWED_MODELS`: the file must hold that model (``None``: any allowed model).
        error: exception class for a file that holds another model or weights that do not fit (a loader's own
            error type); a refused config is always a :class:`CheckpointError`.
        hint: appended to the "holds another model" message (e.g. which file to give instead).

    Raises:
        CheckpointError: not our file, wrong format version, or a refused config (see :func:`check_model_config`).
        error: another model than ``expected``, values the class refuses, or weights that do not match the config.
    """
    if not is_model_file(obj):
        raise CheckpointError(f"{source} is neither a {SNAPSHOT_FORMAT!r} nor a {CHECKPOINT_FORMAT!r} file")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format version {obj.get('format_version')!r}; this shapee reads version {FORMAT_VERSION}"
        )
    if obj["format"] == SNAPSHOT_FORMAT:
        config, weights = obj.get("model_config"), obj.get("weights")
    else:
        run_config = obj.get("config")
        config, weights = (run_config.get("model") if isinstance(run_config, Mapping) else None), obj.get("ema")
    cls, kwargs = _checked(config, source=source, expected=expected, error=error, hint=hint, retired="drop")
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise error(f"{source}: its weights are not a state dict of tensors")
    model = _construct(cls, kwargs, source=source, target=config["_target_"], error=error)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise error(f"{source}: weights do not match its own model config: {e}") from e
    return model.eval()


def _checked(
    config: Any, *, source: str, expected: str | None, error: type[Exception], hint: str, retired: str
) -> tuple[type[nn.Module], dict[str, Any]]:
    """:func:`check_model_config`, then: is it the ``expected`` model?"""
    cls, kwargs = check_model_config(config, source=source, retired=retired)
    target = config["_target_"]
    if expected is not None and ALLOWED_MODELS[target] != ALLOWED_MODELS[expected]:
        raise error(f"{source} holds a model with _target_={target!r}, not a {expected}{hint}")
    return cls, kwargs


def _construct(
    cls: type[nn.Module], kwargs: dict[str, Any], *, source: str, target: str, error: type[Exception]
) -> nn.Module:
    """``cls(**kwargs)``, an allowed class refusing its values (e.g. an unknown stage) raising ``error``."""
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise error(f"{source}: its model config does not build a {target}: {e}") from e
