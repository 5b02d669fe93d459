"""Whether a training run finished: ``<run_dir>/checkpoints/status.json``, written by :func:`shapee.train.train`.

    {"finished": false, "step": 39, "max_steps": 300, "stopped_by_signal": true}

The loop writes ``finished: false`` before its first step and ``finished: true`` only after the final checkpoint and
snapshot of a run that reached ``max_steps``; a stop on SIGTERM/SIGINT (checkpoint, then return) and a crash leave
``false``. So ``last.pt`` and ``snapshot.pt`` next to a ``status.json`` that says ``true`` are a finished run's, and a
later stage can refuse to start from an unfinished one (``init_from``, :func:`unfinished_reason`).

Files without a ``status.json`` beside them (runs of older versions, a snapshot copied elsewhere, released weights)
count as finished: nothing says otherwise, and refusing them would break every run made before this file existed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
CHAINABLE = ("last.pt", "snapshot.pt")  # the files of a run directory that status.json speaks for


def write_status(ckpt_dir: str | os.PathLike, **status: Any) -> Path:
    """Atomically write ``ckpt_dir/status.json`` (``finished``, ``step``, ``max_steps``, ...)."""
    path = Path(ckpt_dir) / STATUS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_status(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``ckpt_dir/status.json`` as a dict, or ``None`` when there is none (or it is unreadable)."""
    path = Path(ckpt_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The status of the run in ``run_dir`` (``run_dir/checkpoints/status.json``), or ``None``."""
    return read_status(Path(run_dir) / "checkpoints")


def unfinished_reason(path: str | os.PathLike) -> str | None:
    """Why the checkpoint/snapshot at ``path`` must not start another stage, or ``None`` when it may.

    Only ``last.pt``/``snapshot.pt`` with a ``status.json`` beside them that says ``finished: false`` are refused;
    see the module docstring for files without one.
    """
    path = Path(path)
    if path.name not in CHAINABLE:
        return None
    status = read_status(path.parent)
    if status is None or status.get("finished", True):
        return None
    return (
        f"{str(path)!r} comes from a run that did not finish (step {status.get('step')} of "
        f"{status.get('max_steps')}, {path.parent / STATUS_FILE}): rerun that stage to finish it, or pass "
        f"allow_partial=true to start from it anyway"
    )
