"""Runs that cannot lie: a stage stopped by a signal says so (return value, status.json, checkpoint), a chain of stages
stops there and its rerun finishes that stage before the next; init_from refuses an unfinished run's snapshot. Also
the one progress-bar rule (shapee.cli.progress_bar)."""

from __future__ import annotations

import io
import json
import os
import signal
import sys

import pytest
from test_train_loop import ToyMLP, ToyRegression, tiny_cfg

from shapee.cli import StageInterrupted, UserError, progress_bar, progress_enabled
from shapee.io.checkpoint import CheckpointError, load_checkpoint, load_snapshot
from shapee.train import train
from shapee.train.chain import Chain
from shapee.train.status import run_status, unfinished_reason


class SelfTerminating(ToyMLP):
    """Sends SIGTERM to its own process during loss_dict call ``at`` (what `kill <pid>` does mid-training)."""

    def __init__(self, at: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at = at

    def loss_dict(self, batch):
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss_dict(batch)


def _stage(run_dir, max_steps, *, kill_at=None, init_from=None, **overrides):
    """A tiny training stage as the quick start runs one: resume=auto, optionally chained by init_from."""
    cfg = tiny_cfg(max_steps=max_steps, ckpt_every=0, eval_every=0, log_every=1, resume="auto", init_from=init_from,
                   **overrides)
    return lambda: train(cfg, model=SelfTerminating(kill_at), train_set=ToyRegression(), run_dir=run_dir)


def test_a_stopped_stage_is_recorded_as_unfinished_and_a_finished_one_as_finished(tmp_path):
    out = _stage(tmp_path / "a", 20, kill_at=4)()
    assert out["stopped_by_signal"] == 1 and out["finished"] == 0
    assert out["step"] == 5 and out["max_steps"] == 20  # the step in flight finishes, then checkpoint and stop
    status = run_status(tmp_path / "a")
    assert status == {"finished": False, "step": 5, "max_steps": 20, "stopped_by_signal": True}
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["finished"] is False

    done = _stage(tmp_path / "a", 20)()  # the rerun resumes at step 5 and reaches max_steps
    assert done["finished"] == 1 and done["stopped_by_signal"] == 0 and done["step"] == 20
    assert run_status(tmp_path / "a")["finished"] is True
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["finished"] is True


def test_chain_stops_at_an_interrupted_stage_and_its_rerun_finishes_it_before_the_next(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    lines: list[str] = []

    def run_chain(kill_at):
        chain = Chain(total=2, announce=lines.append)
        chain.run("stage a", _stage(a, 12, kill_at=kill_at), run_dir=a)
        return chain.run("stage b", _stage(b, 3, init_from=str(a / "checkpoints" / "snapshot.pt")), run_dir=b)

    with pytest.raises(StageInterrupted) as info:
        run_chain(kill_at=3)
    assert (info.value.step, info.value.max_steps, info.value.run_dir) == (4, 12, a)
    assert "stage 'stage a' was interrupted at step 4 of 12" in str(info.value)
    assert "run the same command again to resume it" in str(info.value)
    assert not b.exists()  # the later stage never started
    assert "\n=== [1/2] stage a" in lines and not any("stage b" in line for line in lines)

    lines.clear()
    out_b = run_chain(kill_at=None)
    assert run_status(a) == {"finished": True, "step": 12, "max_steps": 12, "stopped_by_signal": False}
    assert load_snapshot(a / "checkpoints" / "snapshot.pt")["step"] == 12
    assert out_b["finished"] == 1 and run_status(b)["finished"] is True
    # stage a resumed (its metrics go on from step 4; a restart would log from step 1 again)
    steps = [json.loads(line)["step"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 12 and steps.count(1) == 1
    assert lines.index("\n=== [1/2] stage a") < lines.index("\n=== [2/2] stage b")


def test_chain_refuses_to_keep_a_stage_made_from_an_older_input(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    snapshot = a / "checkpoints" / "snapshot.pt"

    def run_chain(a_steps):
        chain = Chain(announce=lambda line: None)
        chain.run("stage a", _stage(a, a_steps), run_dir=a)
        return chain.run("stage b", _stage(b, 2, init_from=str(snapshot)), run_dir=b, built_from=[snapshot])

    run_chain(3)
    assert run_chain(3)["step"] == 2  # a rerun with nothing new: b is kept (resumed at its end)
    with pytest.raises(UserError, match="stage b: .* was made from an older .*snapshot.pt .*delete"):
        run_chain(5)  # a trained further: b's results come from the old a
    assert load_snapshot(snapshot)["step"] == 5 and run_status(b)["step"] == 2


def test_init_from_an_unfinished_run_is_refused_unless_allowed(tmp_path):
    _stage(tmp_path / "a", 20, kill_at=2)()
    snapshot = tmp_path / "a" / "checkpoints" / "snapshot.pt"
    reason = unfinished_reason(snapshot)
    assert reason is not None and "step 3 of 20" in reason and "allow_partial=true" in reason
    with pytest.raises(CheckpointError, match="did not finish"):
        _stage(tmp_path / "b", 2, init_from=str(snapshot))()
    assert not (tmp_path / "b" / "checkpoints" / "last.pt").exists()

    # allowed: it trains, starting from the partial weights
    out = _stage(tmp_path / "c", 1, init_from=str(snapshot), init_allow_partial=True)()
    assert out["finished"] == 1


def test_files_without_a_status_count_as_finished(tmp_path):
    _stage(tmp_path / "a", 20, kill_at=2)()
    ckpt_dir = tmp_path / "a" / "checkpoints"
    (ckpt_dir / "status.json").unlink()  # a run of an older version, or a snapshot copied elsewhere
    assert unfinished_reason(ckpt_dir / "snapshot.pt") is None
    copied = tmp_path / "weights.pt"
    copied.write_bytes((ckpt_dir / "snapshot.pt").read_bytes())
    assert unfinished_reason(copied) is None
    assert _stage(tmp_path / "b", 1, init_from=str(ckpt_dir / "snapshot.pt"))()["finished"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Progress bars


def test_progress_rule(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.delenv("SHAPEE_PROGRESS", raising=False)
    assert progress_enabled(True) is False and progress_enabled(None) is False
    monkeypatch.setenv("SHAPEE_PROGRESS", "1")
    assert progress_enabled(True) is True and progress_enabled(False) is False
    monkeypatch.setenv("SHAPEE_PROGRESS", "0")
    assert progress_enabled(True) is False


def test_progress_bar_draws_when_enabled_and_prints_nothing_when_not(monkeypatch):
    for env, expect_bar in (("1", True), ("0", False)):
        monkeypatch.setenv("SHAPEE_PROGRESS", env)
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        for _ in progress_bar(range(7), desc="work", mininterval=0):
            pass
        text = err.getvalue()
        assert ("work" in text and "7/7" in text) is expect_bar, text
        assert (text == "") is (not expect_bar)


def test_training_bar_shows_step_rate_and_smoothed_loss(tmp_path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("SHAPEE_PROGRESS", "1")
    cfg = tiny_cfg(max_steps=6, eval_every=0, log_every=1, progress_bar=True)
    train(cfg, model=ToyMLP(sleep_s=0.06), train_set=ToyRegression(), run_dir=tmp_path / "run")  # > mininterval
    text = err.getvalue()
    assert "train run" in text and "6/6" in text and "loss=" in text, text
    assert "step/s" in text or "s/step" in text, text  # the rate; tqdm's own ETA field follows it

    err.truncate(0)
    err.seek(0)
    cfg = tiny_cfg(max_steps=3, eval_every=0, log_every=1, progress_bar=False)
    train(cfg, model=ToyMLP(), train_set=ToyRegression(), run_dir=tmp_path / "quiet")
    assert "train quiet" not in err.getvalue() and "loss=" not in err.getvalue()
