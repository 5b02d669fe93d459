"""Reading, checking and writing plain tensor dicts in a fixed key layout (the released checkpoints' and the
diffusers folders'): generic helpers of :mod:`shapee.io.official`, :mod:`shapee.io.official_priors`,
:mod:`shapee.io.official_pointe` and :mod:`shapee.io.diffusers_format`. Nothing here knows a model class, and
nothing here unpickles code (``torch.load(weights_only=True)`` or safetensors).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class OfficialCheckpointError(ValueError):
    """A file that is not a readable weights-only state dict, or a state dict that does not match the official layout;
    the message names the file (or the model) and the problem, listing every offending key."""


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
        save_file(sd, str(tmp))
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)
    return path


def load_weights_only(path: Path, *, mmap: bool = False) -> object:
    """What a ``.safetensors`` file (by suffix) or a ``.pt`` file read with ``torch.load(weights_only=True)`` holds;
    the readers' errors propagate (each caller names the file in its own error type)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


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
        sd = load_weights_only(path)
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
