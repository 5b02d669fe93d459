"""What every script in ``scripts/`` shares: user errors as one line, exit codes, input checks, progress bars.

A *user error* is a mistake in the command line or in the inputs (a key not set, a folder that is not there, a
checkpoint of the wrong kind): the script prints one line ``<script>: error: <what is wrong>; <what to do>`` on
stderr and exits with :data:`EXIT_USER_ERROR`, without a traceback. Everything else is a bug and keeps its traceback.
``HYDRA_FULL_ERROR=1`` re-raises user errors too, for the full stack.

Exit codes: 0 done; 2 user error; 3 a training stage was stopped (SIGTERM/SIGINT) before ``max_steps`` after writing
its checkpoint (run the same command again to resume it); 130 interrupted outside a training loop (Ctrl-C).

This module imports no torch, so that the checks run before anything heavy is loaded.
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from tqdm import tqdm

from shapee.runstatus import unfinished_reason

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 3
EXIT_SIGINT = 130


class UserError(Exception):
    """A mistake of the user's (config key, path, file kind), reported as one line with what to do about it."""


class StageInterrupted(Exception):
    """A training stage stopped on a signal before ``max_steps``; its checkpoint is written and a rerun resumes it."""

    def __init__(self, stage: str, step: int, max_steps: int, run_dir: str | os.PathLike) -> None:
        self.stage, self.step, self.max_steps, self.run_dir = stage, int(step), int(max_steps), Path(run_dir)
        super().__init__(
            f"{stage} was interrupted at step {self.step} of {self.max_steps} (checkpoint in "
            f"{self.run_dir / 'checkpoints'}); run the same command again to resume it"
        )


# Exceptions that are user errors wherever they come from; named, not imported, so that this module stays light.
USER_ERROR_TYPES = (
    "shapee.cli.UserError",
    "omegaconf.errors.MissingMandatoryValue",
    "shapee.io.checkpoint.CheckpointError",  # a missing, corrupt or mismatched checkpoint file
    "shapee.io.layout.OfficialCheckpointError",  # a released-layout / diffusers file whose keys do not fit
    "shapee.io.loading.EncoderLoadError",  # an encoder=/transmitter= file that is not a transmitter
)


def user_errors(name: str, *also: str) -> Callable[[Callable], Callable]:
    """Decorator for a script's ``main``: :class:`UserError`, a missing mandatory config value, a
    ``CheckpointError`` and the exception types named in ``also`` (``"module.Class"``, matched along the MRO, e.g.
    ``"shapee.data.prepare.PrepareError"``) become one line on stderr and exit code 2; :class:`StageInterrupted` one
    line and exit 3; Ctrl-C outside a training loop one line and exit 130. Any other exception keeps its traceback.
    Put it *under* ``@hydra.main`` so that it sees the task's exceptions before Hydra does."""
    names = set(USER_ERROR_TYPES) | set(also)

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except StageInterrupted as e:
                fail(name, str(e), EXIT_INTERRUPTED, prefix="stopped")
            except KeyboardInterrupt:
                fail(name, "interrupted (Ctrl-C); what was written so far stays, a rerun resumes", EXIT_SIGINT,
                     prefix="stopped")
            except Exception as e:
                if not is_user_error(e, names) or os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                fail(name, _one_line(e), EXIT_USER_ERROR)

        return wrapped

    return decorate


def is_user_error(e: BaseException, names: Iterable[str] = USER_ERROR_TYPES) -> bool:
    """Whether ``e``'s class (or a base class) is one of the ``"module.Class"`` ``names``."""
    names = set(names)
    return any(f"{c.__module__}.{c.__qualname__}" in names for c in type(e).__mro__)


def fail(name: str, message: str, code: int = EXIT_USER_ERROR, *, prefix: str = "error") -> None:
    """Print ``<name>: <prefix>: <message>`` as one line on stderr and exit with ``code``."""
    print(f"{name}: {prefix}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _one_line(e: BaseException) -> str:
    if is_user_error(e, ["omegaconf.errors.MissingMandatoryValue"]):
        key = getattr(e, "full_key", None) or "a required key"
        return f"{key} is not set: pass {key}=<value> on the command line"
    text = " ".join(str(e).split())  # one line, whatever the exception's message held
    return text or type(e).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Input checks: run them first thing in a script's main, before models or data are built.


def _get(cfg: Any, key: str) -> Any:
    """``cfg[a][b]`` for ``key="a.b"`` (DictConfig or plain mapping); ``None`` when unset, absent or ``???``."""
    node = cfg
    for part in key.split("."):
        if OmegaConf.is_config(node):
            if part not in node or OmegaConf.is_missing(node, part):
                return None
            node = node[part]
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
        if node is None:
            return None
    return node


# Keys that were renamed so that one name means one thing everywhere (transmitter= the weights that decode latents,
# prior= the prior's weights, head= the stf|nerf head): script → {old key: new key, or {task=<choice>: new key}}. An
# old key on the command line is a one-line error.
RENAMED_KEYS: dict[str, dict[str, str | dict[str, str]]] = {
    "extract_latents": {"encoder": "transmitter"},
    "train_diffusion": {"decoder": "transmitter"},
    "sample": {"decoder": "head"},
    "evaluate": {"decoder": "transmitter", "renderer": "head",
                 "ckpt": {"encoder": "transmitter", "generation": "prior"}},
}


def _override_key(arg: str) -> tuple[str, str]:
    """``"+a.b=v"`` → ``("a.b", "v")``."""
    key, _, value = arg.lstrip("+~").partition("=")
    return key, value


def refuse_renamed_keys(script: str, argv: list[str] | None = None) -> None:
    """Exit with one line (code 2) when the command line uses a key that ``script`` renamed; call before Hydra
    parses (Hydra would only say the key is not in the config). A key renamed per task names the new key of the
    ``task=`` on the command line (or each task's, when there is none)."""
    argv = sys.argv[1:] if argv is None else argv
    renamed = RENAMED_KEYS.get(script, {})
    task = dict(_override_key(a) for a in argv).get("task")
    for arg in argv:
        key, value = _override_key(arg)
        if key not in renamed:
            continue
        new = renamed[key]
        if isinstance(new, dict) and task in new:
            new = new[task]
        if isinstance(new, dict):
            each = ", ".join(f"task={t} {n}={value or '<value>'}" for t, n in new.items())
            fail(script, f"{key}= was renamed per task: pass {each}")
        fail(script, f"{key}= was renamed to {new}=: pass {new}={value or '<value>'}")


def check_overrides(config_dir: str | os.PathLike, config_name: str, argv: list[str] | None = None) -> None:
    """Compose ``config_name`` with the command line's overrides (Hydra's compose API) and raise a one-line
    :class:`UserError` for what Hydra would report in several lines with exit code 1: a key the config does not have
    (with the nearest known key), a value of the wrong type, a config group left unset or set to an option that does
    not exist. Call before ``@hydra.main`` runs, after any ConfigStore registration; a command line with Hydra flags
    (``--cfg``, ``-m``, ...) is left to Hydra."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("-") for a in argv):
        return
    overrides = [a for a in argv if not _override_key(a)[0].startswith(("hydra.", "hydra/"))]

    def _compose(overrides: list[str]):
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)

    try:
        _compose(overrides)
    except OverrideParseException as e:
        raise UserError(f"{e.override}: {str(e).splitlines()[0]}") from None
    except MissingConfigException as e:
        group = (e.missing_cfg_file or "").rpartition("/")[0]
        choice = dict(_override_key(a) for a in overrides).get(group)
        options = "|".join(e.options or [])
        raise UserError(f"{group}={choice}: no such option; pass {group}={options}") from None
    except HydraException as e:
        cause, text = e.__cause__, str(e)
        key = getattr(cause, "full_key", None)
        if text.startswith("You must specify"):
            group = text.split("'")[1]
            options = [line.strip() for line in text.splitlines()[2:] if line.strip()]
            raise UserError(f"{group} is not set: pass {group}={'|'.join(options)}") from None
        if key and text.startswith("Could not override"):
            key = text.split("'")[1]  # the override's key: the cause names its first missing part (trainr of trainr.x)
            bad = next((a for a in overrides if _override_key(a)[0] == key), key)
            raise UserError(f"{key}= is not a setting{_where(overrides)}{_nearest(key, _compose, overrides, bad)}") \
                from None
        if key:
            arg = next((a for a in overrides if _override_key(a)[0] == key), key)
            raise UserError(f"{arg}: {str(cause).splitlines()[0]}") from None
        raise UserError(text.splitlines()[0]) from None


def check_command_line(script: str, config_dir: str | os.PathLike, argv: list[str] | None = None) -> None:
    """What every Hydra script in ``scripts/`` runs before ``@hydra.main`` parses its command line: a renamed key
    (:func:`refuse_renamed_keys`), then a key ``configs/<script>.yaml`` does not have, a value of the wrong type or
    a config group option that does not exist (:func:`check_overrides`), each as one line on stderr and exit code 2
    (:func:`user_errors`), in the second it takes to compose the config, before anything heavy is imported. Register
    the script's ConfigStore schemas first."""

    @user_errors(script)
    def check() -> None:
        refuse_renamed_keys(script, argv)
        check_overrides(config_dir, script, argv)

    check()


def _where(overrides: list[str]) -> str:
    """`` of task=<choice>`` when the command line picks a task."""
    task = dict(_override_key(a) for a in overrides).get("task")
    return f" of task={task}" if task else ""


def _nearest(key: str, compose_with: Callable, overrides: list[str], bad: str) -> str:
    """``; did you mean <k>=?`` with the known key nearest to ``key`` (the config composed without ``bad``)."""
    try:
        cfg = compose_with([a for a in overrides if a != bad])
    except Exception:
        return ""
    known: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for k in node:
            path = f"{prefix}{k}"
            known.append(path)
            if OmegaConf.is_dict(node._get_node(k)):
                walk(node[k], path + ".")

    walk(cfg, "")
    ratio = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in known}
    best = max(ratio.values(), default=0.0)
    # A near-spelling (a typo) gets the one key; a looser match its two nearest (views= → grid_views=, render_views=).
    floor = max(0.5, best - 0.1) if best < 0.8 else best
    close = sorted((k for k in known if ratio[k] >= floor), key=lambda k: -ratio[k])[:2]
    if close:
        return f"; did you mean {' or '.join(c + '=' for c in close)}?"
    return f"; known: {', '.join(k for k in known if '.' not in k)}"



def refuse_renamed_kwargs(**renamed: str) -> Callable:
    """Decorator for the Python API's side of :data:`RENAMED_KEYS`: a call with an old keyword (``decoder=...``)
    raises a one-line ``TypeError`` naming the function and what to pass instead (``renamed[old]``), where Python
    would only say the keyword is unexpected. The signature shown by ``help()`` stays the wrapped function's."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            for old in renamed:
                if old in kwargs:
                    raise TypeError(f"{fn.__qualname__}: {old}= was renamed: {renamed[old]}")
            return fn(*args, **kwargs)

        return checked

    return wrap

def require_key(cfg: Any, key: str, hint: str) -> Any:
    """The value of ``key``; a :class:`UserError` naming it and ``hint`` (what to pass) when it is not set."""
    value = _get(cfg, key)
    if value is None or value == "":
        raise UserError(f"{key} is not set: pass {key}={hint}")
    return value


def require_dir(cfg: Any, key: str, hint: str, *, optional: bool = False) -> Path | None:
    """``key`` names an existing folder (``optional``: or is unset → ``None``)."""
    if optional and _get(cfg, key) in (None, ""):
        return None
    path = Path(str(require_key(cfg, key, hint))).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}={str(path)!r}: no such folder; pass {key}={hint}")
    return path


def require_file(cfg: Any, key: str, hint: str, *, optional: bool = False) -> Path | None:
    """``key`` names an existing file (``optional``: or is unset → ``None``)."""
    if optional and _get(cfg, key) in (None, ""):
        return None
    path = Path(str(require_key(cfg, key, hint))).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise UserError(f"{key}={str(path)!r}: {what}; pass {key}={hint}")
    return path


def is_diffusers_folder(path: Path) -> bool:
    """A diffusers Shap-E folder (``prior/`` or ``shap_e_renderer/``/``renderer/`` with a ``config.json``), or one
    component folder; path checks only (the loader, :mod:`shapee.io.diffusers_format`, reads it)."""
    return path.is_dir() and any(
        (path / sub / "config.json").is_file() for sub in ("", "prior", "shap_e_renderer", "renderer")
    )


def require_weights(cfg: Any, key: str, hint: str, *, optional: bool = False) -> Path | None:
    """``key`` names an existing checkpoint file or a diffusers Shap-E folder (``optional``: or is unset)."""
    if optional and _get(cfg, key) in (None, ""):
        return None
    path = Path(str(require_key(cfg, key, hint))).expanduser()
    if path.is_file() or is_diffusers_folder(path):
        return path
    what = "is a folder but not a diffusers Shap-E folder" if path.is_dir() else "no such file"
    raise UserError(f"{key}={str(path)!r}: {what}; pass {key}={hint}")


def require_files(cfg: Any, key: str, hint: str) -> list[Path]:
    """``key`` is one file or a list of files, all existing."""
    value = require_key(cfg, key, hint)
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    missing = [str(v) for v in values if not Path(str(v)).expanduser().is_file()]
    if missing:
        raise UserError(f"{key}: no such file {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                        else "") + f"; pass {key}={hint}")
    return [Path(str(v)).expanduser() for v in values]


def require_dataset(cfg: Any, key: str, hint: str) -> Path:
    """``key`` names a folder with ``manifest*.jsonl`` (what prepare_data / extract_latents write)."""
    root = require_dir(cfg, key, hint)
    if not any(root.glob("manifest*.jsonl")):
        raise UserError(f"{key}={str(root)!r} holds no manifest*.jsonl; pass {key}={hint}")
    return root


def require_finished(cfg: Any, key: str, path: Path | None) -> None:
    """Refuse the checkpoint/snapshot ``path`` (given as ``key``) of a run that did not finish (its ``status.json``
    says so), unless the config sets ``allow_partial=true``."""
    if path is None or _get(cfg, "allow_partial"):
        return
    reason = unfinished_reason(path)
    if reason is not None:
        raise UserError(f"{key}={reason}")


def check_training_inputs(cfg: Any, *, data_hint: str) -> None:
    """The inputs every training script reads, checked before a model is built: ``data.root`` (a prepared folder),
    ``init_from`` (an existing file of a *finished* run unless ``allow_partial=true``), ``resume`` (auto | never |
    an existing file) and, where the config has them, ``init_official`` and ``transmitter``."""
    if _get(cfg, "data.kind") == "cap3d":  # Cap3D's latents + caption file, as they ship
        require_dir(cfg, "data.latents", "<folder of Cap3D <uid>.pt latents>")
        require_file(cfg, "data.captions", "<Cap3D_automated_Objaverse*.csv or a {uid: caption} JSON>")
    else:
        require_dataset(cfg, "data.root", data_hint)
    init_from = require_file(cfg, "init_from", "<checkpoint or snapshot .pt of an earlier run>", optional=True)
    require_finished(cfg, "init_from", init_from)
    resume = _get(cfg, "resume")
    if resume not in (None, "", "auto", "never"):
        require_file(cfg, "resume", "auto|never|<checkpoint last.pt>")
    require_file(cfg, "init_official", "<released weights file>", optional=True)
    require_file(cfg, "transmitter", "<transmitter snapshot or transmitter.pt>", optional=True)


# ----------------------------------------------------------------------------------------------------------------------
# Progress bars: one rule for all of them.


def progress_enabled(setting: bool | None = True) -> bool:
    """Whether a progress bar shows: never when ``setting`` is false or ``SHAPEE_PROGRESS=0``; always with
    ``SHAPEE_PROGRESS=1``; otherwise only when stderr is a terminal (logs of CI or ``nohup`` stay readable)."""
    env = os.environ.get("SHAPEE_PROGRESS", "").strip().lower()
    if setting is False or env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Iterable | None = None, *, enabled: bool | None = True, **kwargs: Any):
    """A tqdm bar (on stderr) shown by the rule of :func:`progress_enabled`; a disabled one costs nothing and
    prints nothing. ``kwargs`` go to tqdm (``total``, ``desc``, ``unit``, ``initial``, ...)."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not progress_enabled(enabled), file=sys.stderr, **kwargs)
