"""Our two checkpoint kinds, written atomically and read without unpickling code.

* **Full checkpoint** (``save_checkpoint`` / ``load_checkpoint``): everything needed to resume a run bit for bit —
  model, EMA, optimiser, LR scheduler, grad scaler, step, RNG states, data-order position, resolved config, code
  version. Written by :func:`shapee.train.train` to ``<run_dir>/checkpoints/last.pt``.
* **Snapshot** (``save_snapshot`` / ``load_snapshot``): the EMA weights plus the model config needed to rebuild the
  model; what sampling, evaluation and the next stage (``init_from``) use.

Both are ``torch.save`` files holding only tensors and plain Python containers/scalars, so every load uses
``torch.load(..., weights_only=True)``: a file carrying a pickled arbitrary object is refused, never executed
(STYLE.md rule 10, DESIGN.md "Dependencies"). Writes go to a temporary file in the same directory, are fsync'ed and
then ``os.replace``'d over the target, so a crash or a full disk never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shapee import __version__

CHECKPOINT_FORMAT = "shapee.checkpoint"
SNAPSHOT_FORMAT = "shapee.snapshot"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or snapshot file is missing, corrupt, unsafe, or does not match what is loading it."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that either fully succeeds or leaves ``path`` untouched.

    The bytes go to a temporary file beside ``path`` (same filesystem, so the final ``os.replace`` is atomic), are
    flushed and fsync'ed, and only then renamed over ``path``. If anything raises, the temporary file is removed.
    The file gets the mode the process umask gives new files (0644 under umask 022), not the temporary's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; the final file gets what open() would give it (POSIX)
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt during the write must not leave the temporary file either.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only set it, which would
    briefly race other threads creating files); elsewhere set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _safe_load(path: str | os.PathLike, *, map_location: str | torch.device | None) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist (or is not a file)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True refuses any global that is not a tensor/plain container: that is the point.
        raise CheckpointError(
            f"checkpoint file {str(path)!r} contains objects that are not plain weights/containers and was "
            f"refused by torch.load(weights_only=True); shapee checkpoints never hold pickled code ({e})"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt or truncated and cannot be read: {e}") from e


def _check_format(obj: Any, path: str | os.PathLike, expected: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping) or obj.get("format") != expected:
        found = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"file {str(path)!r} is not a {expected!r} file (found format {found!r})")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"file {str(path)!r} has {expected} format version {obj.get('format_version')!r}; "
            f"this shapee reads version {FORMAT_VERSION}"
        )
    return dict(obj)


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Atomically write a full training checkpoint.

    Args:
        path: target file (``.pt``); parent directories are created.
        state: tensors, state dicts and plain Python values only (``weights_only``-loadable). The training loop
            stores ``model``, ``ema``, ``optimizer``, ``scheduler``, ``scaler``, ``step``, ``rng``, ``data``,
            ``config`` and ``code_version``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    reserved = {"format", "format_version"} & set(state)
    if reserved:
        raise ValueError(f"save_checkpoint: state must not contain the reserved keys {sorted(reserved)}")
    return atomic_torch_save({"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **state}, path)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a full checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, corrupt, holds pickled objects, or is not a shapee checkpoint.
    """
    return _check_format(_safe_load(path, map_location=map_location), path, CHECKPOINT_FORMAT)


def save_snapshot(
    path: str | os.PathLike,
    *,
    weights: Mapping[str, Tensor],
    model_config: Mapping[str, Any] | None = None,
    step: int | None = None,
    code_version: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write an inference snapshot: (EMA) weights + the model config that rebuilds the model.

    Args:
        weights: the model state dict (the EMA copy when written by the training loop); moved to CPU.
        model_config: plain mapping (e.g. the resolved Hydra ``model`` node with its ``_target_``) or ``None``.
        step: training step the weights come from.
        code_version: see :func:`code_version`.
    """
    cpu_weights = {k: v.detach().cpu() for k, v in weights.items()}
    return atomic_torch_save(
        {
            "format": SNAPSHOT_FORMAT,
            "format_version": FORMAT_VERSION,
            "weights": cpu_weights,
            "model_config": dict(model_config) if model_config is not None else None,
            "step": step,
            "code_version": dict(code_version) if code_version is not None else None,
        },
        path,
    )


def load_snapshot(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Read a snapshot written by :func:`save_snapshot`.

    Returns:
        dict with ``weights`` (state dict), ``model_config`` (mapping or None), ``step``, ``code_version``.

    Raises:
        CheckpointError: the file is missing, corrupt, holds pickled objects, or is not a shapee snapshot.
    """
    return _check_format(_safe_load(path, map_location=map_location), path, SNAPSHOT_FORMAT)


def load_weights(path: str | os.PathLike, *, map_location: str | torch.device | None = "cpu") -> dict[str, Tensor]:
    """The model weights of either file kind: a snapshot's ``weights`` or a full checkpoint's ``ema``.

    A full checkpoint's EMA (not its raw ``model``) is taken because the EMA weights are the result of a run
    (STYLE.md rule 9); this is what ``init_from`` uses to chain the encoder stages.
    """
    obj = _safe_load(path, map_location=map_location)
    kind = obj.get("format") if isinstance(obj, Mapping) else None
    if kind == SNAPSHOT_FORMAT:
        return dict(_check_format(obj, path, SNAPSHOT_FORMAT)["weights"])
    if kind == CHECKPOINT_FORMAT:
        return dict(_check_format(obj, path, CHECKPOINT_FORMAT)["ema"])
    raise CheckpointError(
        f"file {str(path)!r} is neither a {SNAPSHOT_FORMAT!r} nor a {CHECKPOINT_FORMAT!r} file (found format {kind!r})"
    )


def code_version() -> dict[str, str | None]:
    """``{"package": shapee.__version__, "git_commit": <HEAD sha or None>}`` for provenance in checkpoints."""
    commit = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout (an installed wheel): the package version still identifies the code
    return {"package": __version__, "git_commit": commit}
