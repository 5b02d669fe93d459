"""The one place that turns a file into a model: :func:`load_model` (``expect=`` the kind of model).

Kinds and what each accepts (a path to a file, or a folder):

=============  ==========================================================================================
``prior``      our snapshot / full checkpoint (EMA weights); a released ``text_cond.pt`` / ``image_cond.pt``
               (``wrapped.*`` keys, any size); a diffusers Shap-E folder (its ``prior/``)
``transmitter`` our snapshot / full checkpoint; a released ``transmitter.pt`` (any size); a diffusers folder (its
               ``shap_e_renderer/``: decoder only)
``pointe_sdf`` our Point-E SDF snapshot; the released ``sdf.pt``
``None``       our snapshot / full checkpoint of any allowed shapee model (:func:`shapee.io.load`)
=============  ==========================================================================================

Nothing a file names runs: files are read with ``torch.load(weights_only=True)`` or safetensors, our files' model
configs are checked at every depth against an allow-list before the class is called (:func:`shapee.io.safe.build_model`),
and the released layouts name no code at all. The kind-specific loaders below (:func:`load_prior`,
:func:`load_transmitter`, :func:`load_sdf_teacher`) are what :func:`load_model` dispatches to; they keep their own
error types (``EncoderLoadError`` names the ``transmitter=`` file) for the scripts that report them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shapee.io.checkpoint import CHECKPOINT_FORMAT, SNAPSHOT_FORMAT, CheckpointError, _safe_load
from shapee.io.diffusers_format import (
    is_diffusers_folder,
    load_diffusers_prior,
    load_diffusers_transmitter,
)
from shapee.io.layout import load_weights_only
from shapee.io.official import OfficialCheckpointError, load_official
from shapee.io.official_pointe import load_official_pointe_sdf
from shapee.io.safe import build_model, is_model_file

ENCODER_FORMATS = ("auto", "shapee", "official")
KINDS = ("prior", "transmitter", "pointe_sdf")


class EncoderLoadError(ValueError):
    """The ``transmitter=`` file is missing, unreadable, or is not a transmitter of the expected format."""


def load_model(
    path: str | os.PathLike, *, expect: str | None = None, device: str | torch.device = "cpu", **kwargs: Any
) -> nn.Module:
    """The model in ``path`` (eval mode), which must be of kind ``expect`` (see the module docstring).

    ``kwargs`` go to the kind's loader: ``official_name`` (prior: ``text300M``/``image300M`` for a released file),
    ``official`` (transmitter: size overrides / ``config`` for a released file), ``encoder_format``.

    Raises:
        ValueError: an unknown ``expect``. FileNotFoundError / :class:`~shapee.io.CheckpointError` /
        :class:`EncoderLoadError` / :class:`~shapee.io.OfficialCheckpointError`: naming the file and the problem
        (missing, unreadable, refused config, another kind of model, keys that do not fit).
    """
    if expect == "prior":
        return load_prior(path, device=device, **kwargs)
    if expect == "transmitter":
        return load_transmitter(path, device=device, **kwargs)
    if expect == "pointe_sdf":
        return load_sdf_teacher(path).to(device)
    if expect is None:
        return build_model(_safe_load(path, map_location="cpu"), source=f"checkpoint file {str(path)!r}").to(device)
    raise ValueError(f"expect must be one of {KINDS} or None, got {expect!r}")


def load_transmitter(
    path: str | os.PathLike,
    *,
    encoder_format: str = "auto",
    official: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
):
    """A :class:`~shapee.models.Transmitter` (eval mode) from one of our snapshots / full checkpoints (its EMA
    weights), from a released-layout ``transmitter.pt`` / ``.safetensors`` (any size: read from the shapes), or from a
    diffusers Shap-E folder (its ``shap_e_renderer/``: a decoder-only transmitter).

    Args:
        encoder_format: ``auto`` (detected from the file), ``shapee`` or ``official`` (then the file must be that).
        official: size overrides for an official-layout file: ``encoder_kwargs``, ``mlp_kwargs``,
            ``params_proj_kwargs``, ``config`` (the official YAML); sizes the weights show are read from them.

    Raises:
        EncoderLoadError: naming the file: missing, unreadable, wrong format, not a transmitter, or weights that do
            not fit (every mismatched key listed for official files).
        CheckpointError: our file whose model config names code other than a shapee model class, at any depth
            (refused before anything runs, see :func:`shapee.io.safe.build_model`), or a newer format version.
    """

    if encoder_format not in ENCODER_FORMATS:
        raise ValueError(f"encoder_format must be one of {ENCODER_FORMATS}, got {encoder_format!r}")
    path = Path(path)
    if path.is_dir() and is_diffusers_folder(path):  # decoder only: latent → mesh/renders, no encoder
        try:
            return load_diffusers_transmitter(path, device=device)
        except (OfficialCheckpointError, FileNotFoundError) as e:
            raise EncoderLoadError(f"transmitter={str(path)!r}: {e}") from e
    if not path.is_file():
        raise EncoderLoadError(f"transmitter checkpoint {str(path)!r} does not exist (or is not a file)")
    try:
        obj = load_weights_only(path, mmap=True)
    except Exception as e:  # truncated file, pickled objects refused by weights_only, not a torch file
        raise EncoderLoadError(f"transmitter checkpoint {str(path)!r} cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise EncoderLoadError(f"transmitter checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")

    kind = obj.get("format")
    is_ours = kind in (SNAPSHOT_FORMAT, CHECKPOINT_FORMAT)
    if encoder_format == "shapee" and not is_ours:
        raise EncoderLoadError(f"transmitter={str(path)!r} is not a shapee snapshot/checkpoint (encoder_format=shapee)")
    if encoder_format == "official" and is_ours:
        raise EncoderLoadError(f"transmitter={str(path)!r} is a shapee {kind!r} file, not an official state dict")

    if is_ours:
        # Refused configs raise CheckpointError (naming the key path) before anything is built.
        model = build_model(
            obj, source=f"transmitter={str(path)!r}", expected="shapee.models.Transmitter", error=EncoderLoadError,
            hint=" (give the encoder's snapshot, e.g. runs/encoder_nerf/checkpoints/snapshot.pt)",
        )
    else:
        try:  # sizes from the weights' shapes (any size loads), ``official`` overrides them
            model = load_official("transmitter", obj, **dict(official or {}))
        except OfficialCheckpointError as e:
            raise EncoderLoadError(f"transmitter={str(path)!r} is not an official transmitter state dict: {e}") from e
    return model.to(device).eval()




def load_prior(path: str | os.PathLike, *, official_name: str | None = None, device: str | torch.device = "cpu"):
    """A :class:`~shapee.models.LatentDiffusion` (eval mode) from our snapshot, our full checkpoint (its EMA weights),
    a released-layout state dict (``wrapped.*`` keys; ``official_name`` = ``text300M`` / ``image300M``), or a diffusers
    Shap-E folder (its ``prior/``).

    Raises:
        FileNotFoundError: no such file. :class:`~shapee.io.CheckpointError`: unreadable, holds another model, or
            its config names code other than a shapee model class (refused before anything runs, see
            :func:`shapee.io.safe.build_model`).
        :class:`~shapee.io.OfficialCheckpointError`: a released-layout file whose keys/shapes do not fit.
    """

    path = Path(path)
    if path.is_dir():

        if is_diffusers_folder(path):
            return load_diffusers_prior(path, device=device)
    if not path.is_file():
        raise FileNotFoundError(f"prior checkpoint {str(path)!r} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        if official_name is None:
            raise CheckpointError(f"prior={str(path)!r}: a .safetensors prior must be in the released layout")
        return load_official(official_name, path, device=device).eval()
    obj = _safe_load(path, map_location="cpu")
    kind = obj.get("format") if isinstance(obj, Mapping) else None
    if is_model_file(obj):
        model = build_model(
            obj, source=f"prior={str(path)!r}", expected="shapee.models.LatentDiffusion",
            hint=" (give the prior's snapshot, e.g. runs/prior_text/checkpoints/snapshot.pt)",
        )
        return model.to(device).eval()
    if isinstance(obj, Mapping) and any(str(k).startswith("wrapped.") for k in obj):
        if official_name is None:
            raise CheckpointError(f"prior={str(path)!r} is a released-layout state dict; say which (text300M/image300M)")
        return load_official(official_name, obj, device=device).eval()
    raise CheckpointError(
        f"prior={str(path)!r} is neither a shapee snapshot/checkpoint nor a released text_cond.pt/image_cond.pt state "
        f"dict (found format {kind!r})"
    )




def load_sdf_teacher(path: str):
    """A Point-E SDF teacher from our snapshot (``scripts/train_pointe_sdf.py``) or the official ``sdf.pt`` layout.

    Our files are built by :func:`shapee.io.safe.build_model` (their config checked against the allow-list first);
    anything else is read as a released state dict, which names no code at all.
    """


    source = path
    if Path(path).suffix != ".safetensors":
        try:
            obj = _safe_load(path, map_location="cpu")
        except CheckpointError:
            obj = None  # missing or unreadable: the official reader below says why, in its own words
        if is_model_file(obj):
            model = build_model(
                obj, source=f"teacher_checkpoint={str(path)!r}", expected="shapee.models.pointe_sdf.PointESDF"
            )
            return model.eval().requires_grad_(False)
        source = obj if isinstance(obj, Mapping) else path
    return load_official_pointe_sdf(source).eval().requires_grad_(False)
