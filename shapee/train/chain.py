"""Stages that run one after another (``scripts/quickstart.py``): announced, timed, and stopped at the first training
stage that did not finish, so that no later stage ever starts from a partial one.

Rerunning the same chain resumes: a training stage whose run directory holds a finished run returns at once
(``resume=auto`` finds ``last.pt`` at ``max_steps``), the interrupted one resumes from its checkpoint and finishes,
and only then does the next stage start. A stage whose earlier results are older than the files it is built from
(say the previous stage was trained further since, or an older version of this code let it start from a partial
one) is refused with a :class:`~shapee.cli.UserError` instead of being silently kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shapee.cli import StageInterrupted, UserError


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
            made: str | os.PathLike | None = None, built_from: Sequence[str | os.PathLike] = (),
            **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as stage ``name``.

        Args:
            run_dir: a training stage's run directory (named in the interruption message).
            made: the file that holds this stage's results once it has run (default ``run_dir/checkpoints/last.pt``).
            built_from: files this stage starts from (the previous stage's snapshot, the latents' manifest). When
                ``made`` exists and is older than one of them, the stage's results come from an older input: a
                :class:`~shapee.cli.UserError` says what to delete instead of resuming them.
        """
        if made is None and run_dir is not None:
            made = Path(run_dir) / "checkpoints" / "last.pt"
        check_fresh(name, made, built_from)
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


def check_fresh(name: str, made: str | os.PathLike | None, built_from: Sequence[str | os.PathLike]) -> None:
    """Refuse (:class:`~shapee.cli.UserError`) when ``made`` exists and one of ``built_from`` was written after it."""
    if made is None or not Path(made).exists():
        return
    made = Path(made)
    newer = [Path(p) for p in built_from if Path(p).exists() and Path(p).stat().st_mtime > made.stat().st_mtime]
    if newer:
        where = made.parent.parent if made.parent.name == "checkpoints" else made.parent
        raise UserError(
            f"{name}: {where} was made from an older {newer[0]} (it changed since); delete {where} and the stages "
            f"after it to redo them from the new one"
        )
