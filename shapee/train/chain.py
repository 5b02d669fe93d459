"""Stages that run one after another (``scripts/quickstart.py``): announced, timed, and stopped at the first training
stage that did not finish, so that no later stage ever starts from a partial one.

Rerunning the same chain resumes: a training stage whose run directory holds a finished run returns at once
(``resume=auto`` finds ``last.pt`` at ``max_steps``), the interrupted one resumes from its checkpoint and finishes,
and only then does the next stage start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shapee.cli import StageInterrupted


class Chain:
    """Run named stages in order; ``times`` holds each one's seconds.

    A stage whose result is a mapping with ``finished == 0`` (what :func:`shapee.train.train` returns after a
    SIGTERM/SIGINT stopped it before ``max_steps``) raises :class:`StageInterrupted`, so the stages after it do not
    run. ``total`` (optional) numbers the announcements ``[i/total]``.
    """

    def __init__(self, total: int | None = None, announce: Callable[[str], None] | None = None) -> None:
        self.total = total
        self.times: dict[str, float] = {}
        self._announce = announce or (lambda line: print(line, flush=True))

    def run(self, name: str, fn: Callable[..., Any], *args: Any, run_dir: str | os.PathLike | None = None,
            **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as stage ``name``; ``run_dir`` (a training stage's) goes into the interruption
        message."""
        index = len(self.times) + 1
        counter = f"[{index}/{max(self.total, index)}] " if self.total else ""
        self._announce(f"\n=== {counter}{name}")
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t
        if isinstance(result, Mapping) and "finished" in result and not result["finished"]:
            raise StageInterrupted(
                f"stage {name!r}", result.get("step", -1), result.get("max_steps", -1),
                Path(run_dir) if run_dir is not None else Path("."),
            )
        self._announce(f"=== {name}: {self.times[name]:.1f} s")
        return result
