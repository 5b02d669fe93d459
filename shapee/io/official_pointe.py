"""Point-E's released SDF regressor ``sdf.pt`` (reference §9) ↔ :class:`shapee.models.pointe_sdf.PointESDF`.

Our module uses the official names throughout (``encoder_input_proj``, ``encoder.resblocks.{0..7}``,
``decoder_input_proj``, ``decoder.resblocks.{0..3}``, ``ln_post``, ``output_proj``), so the official state dict
*is* our state dict: no key mapping. The expected key/shape list is derived from our module built on the meta
device (no memory), and loading is strict: exact keys and shapes, with an error that lists every missing,
unexpected and mismatched key. Files are read with ``torch.load(weights_only=True)`` (or safetensors), never
unpickling code; :func:`save_official_pointe_sdf` writes the same layout back, so a loaded file round-trips exactly.

:data:`shapee.io.official.OFFICIAL_LOADERS` names it, so ``shapee.io.load_official("pointe_sdf", path)`` works.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

from shapee.io.layout import (
    OfficialCheckpointError,  # noqa: F401  (re-exported: the error this module's loaders raise)
    adopt_state_dict,
    read_state_dict_file,
    write_state_dict,
)
from shapee.models.pointe_sdf import PointESDF


def official_pointe_sdf_keys(**model_kwargs) -> dict[str, tuple[int, ...]]:
    """``{official key: shape}`` of Point-E's SDF model at the released sizes (or resized by ``model_kwargs``).

    Built on the meta device; at the defaults: 168 tensors, 9,481,985 parameters.
    """
    with torch.device("meta"):
        model = PointESDF(**model_kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def pointe_sdf_from_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    **model_kwargs,
) -> PointESDF:
    """Build :class:`PointESDF` and load an official-layout state dict strictly (in eval mode).

    The model is built on the meta device and adopts the tensors (``assign=True``: no random init, no second
    copy), cast to ``dtype`` (``None`` keeps the file's) and moved to ``device``. ``model_kwargs`` resize the model
    (tests use tiny sizes) or set its training options (``n_query``, ``loss``).
    """
    with torch.device("meta"):
        model = PointESDF(**model_kwargs)
    adopt_state_dict(model, state_dict, name="Point-E sdf", device=device, dtype=dtype)
    return model.eval()


def load_official_pointe_sdf(
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor], **kwargs
) -> PointESDF:
    """Load Point-E's released ``sdf.pt`` (a path or an already loaded state dict); see :func:`pointe_sdf_from_state_dict`.

    Raises:
        FileNotFoundError: no such file. :class:`OfficialCheckpointError`: the file is not a weights-only tensor dict
            (garbage, truncated, pickled code: refused without running it) or its keys/shapes differ.
    """
    if isinstance(path_or_state_dict, Mapping):
        sd = path_or_state_dict
    else:
        sd = read_state_dict_file(path_or_state_dict, what="Point-E SDF checkpoint")
    return pointe_sdf_from_state_dict(sd, **kwargs)


def save_official_pointe_sdf(model: PointESDF, path: str | os.PathLike) -> None:
    """Write ``model`` in the official ``sdf.pt`` layout (``torch.save`` of a plain CPU tensor dict), atomically."""
    write_state_dict(model.state_dict(), path)
