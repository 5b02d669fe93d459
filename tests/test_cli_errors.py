"""Scripts fail fast and plainly: a user error is one line naming the key or file and what to do, exit code 2, no
traceback, before any model is built; a training run stopped by SIGTERM exits 3 and its snapshot cannot start the next
stage; prepare_data exits non-zero when no record was produced."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny_data import REPO, run_script, tiny_records

ASSETS_BAD = REPO.parent / "shared" / "assets" / "bad"  # broken meshes

FAST_S = 15.0  # loose: the point is that no model is built (the real encoder takes ~30 s to build on this CPU)


def _user_error(proc: subprocess.CompletedProcess, elapsed: float, script: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    assert elapsed < FAST_S, elapsed
    return lines[0]


def _timed(script: str, *overrides: str, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    proc = run_script(script, *overrides, check=False, **kwargs)
    return proc, time.perf_counter() - t


def test_train_encoder_without_data_root(tmp_path):
    line = _user_error(*_timed("train_encoder.py", "stage=distill", f"run_dir={tmp_path / 'run'}"), "train_encoder")
    assert "data.root is not set: pass data.root=" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["train_encoder.py", "train_diffusion.py", "train_pointe_sdf.py"])
def test_training_with_a_missing_data_folder(tmp_path, script):
    proc, elapsed = _timed(script, f"data.root={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}")
    line = _user_error(proc, elapsed, script.removesuffix(".py"))
    assert f"data.root='{tmp_path / 'nope'}': no such folder" in line


def test_missing_init_from_and_unfinished_init_from(tmp_path):
    data = tmp_path / "records"
    data.mkdir()
    (data / "manifest.jsonl").write_text("")
    line = _user_error(*_timed("train_encoder.py", f"data.root={data}", f"init_from={tmp_path / 'x.pt'}"),
                       "train_encoder")
    assert "init_from=" in line and "no such file" in line

    ckpts = tmp_path / "nerf" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "snapshot.pt").write_bytes(b"not read: the status beside it decides")
    (ckpts / "status.json").write_text(json.dumps({"finished": False, "step": 39, "max_steps": 300}))
    proc, elapsed = _timed("train_encoder.py", "stage=distill", f"data.root={data}", f"init_from={ckpts / 'snapshot.pt'}")
    line = _user_error(proc, elapsed, "train_encoder")
    assert "did not finish (step 39 of 300" in line and "allow_partial=true" in line


def test_extract_latents_refuses_the_encoder_of_an_unfinished_run(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    (records / "manifest.jsonl").write_text("")
    ckpts = tmp_path / "finetune" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "snapshot.pt").write_bytes(b"")
    (ckpts / "status.json").write_text(json.dumps({"finished": False, "step": 2, "max_steps": 5}))
    proc, elapsed = _timed("extract_latents.py", f"records={records}", f"transmitter={ckpts / 'snapshot.pt'}",
                           f"out={tmp_path / 'latents'}")
    line = _user_error(proc, elapsed, "extract_latents")
    assert line.startswith("extract_latents: error: transmitter=") and "did not finish (step 2 of 5" in line
    assert not (tmp_path / "latents").exists()


def test_sample_without_weights_names_transmitter(tmp_path):
    line = _user_error(*_timed("sample.py", "prompt=a chair", f"out={tmp_path}"), "sample")
    assert "transmitter=" in line and "prior=" in line and "decoder=" not in line and "head=" not in line


def test_extract_latents_and_evaluate_without_inputs(tmp_path):
    line = _user_error(*_timed("extract_latents.py", f"records={tmp_path / 'nope'}", "transmitter=e.pt", "out=o"),
                       "extract_latents")
    assert "records=" in line and "no such folder" in line
    line = _user_error(*_timed("evaluate.py", "task=encoder", f"transmitter={tmp_path / 'e.pt'}"), "evaluate")
    assert "transmitter: no such file" in line


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    proc = run_script("train_encoder.py", "stage=distill", env={"HYDRA_FULL_ERROR": "1"}, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_prepare_data_fails_when_no_record_was_produced(tmp_path):
    proc = run_script("prepare_data.py", f"input={ASSETS_BAD}", f"out={tmp_path / 'out'}", "resolution=32", "views=2",
                      "targets=2", "pc_views=2", "pc_resolution=32", "n_points=64", "sdf_uniform=64", "sdf_near=64",
                      "progress=false", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    n_bad = len(list(Path(ASSETS_BAD).iterdir()))
    # The run's summary (records, colour sources, failures by kind) comes first; the error is the one last line.
    assert lines[0].startswith("prepare_data: 0 records written") and any("failures by kind" in x for x in lines)
    assert lines[-1] == (f"prepare_data: error: no record was produced: {n_bad} of {n_bad} assets failed; why: "
                         f"{tmp_path / 'out'}/failures*.jsonl")
    assert sum("error" in x for x in lines) == 1


@pytest.mark.slow
def test_sigterm_stops_a_training_script_with_exit_3_and_its_snapshot_cannot_start_the_next_stage(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    records, run_dir = tiny_records(base), base / "stopped_nerf"
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train_encoder.py"), "experiment=tiny_nerf", f"data.root={records}",
         f"run_dir={run_dir}", "trainer.max_steps=1000", "trainer.eval_every=0", "trainer.ckpt_every=0",
         "trainer.log_every=1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, out + err
    status = json.loads((run_dir / "checkpoints" / "status.json").read_text())
    assert status["finished"] is False and 2 <= status["step"] < 1000
    assert err.strip().splitlines()[-1] == (
        f"train_encoder: stopped: the run was interrupted at step {status['step']} of 1000 (checkpoint in "
        f"{run_dir / 'checkpoints'}); run the same command again to resume it"
    )
    assert json.loads(out[out.index("{"):])["finished"] == 0

    nxt = run_script("train_encoder.py", "experiment=tiny_distill", f"data.root={records}",
                     f"run_dir={base / 'distill'}", f"init_from={run_dir / 'checkpoints' / 'snapshot.pt'}", check=False)
    assert nxt.returncode == 2 and "did not finish" in nxt.stderr and "Traceback" not in nxt.stderr


@pytest.mark.parametrize("script, old, new", [("extract_latents.py", "encoder", "transmitter"),
                                              ("train_diffusion.py", "decoder", "transmitter"),
                                              ("sample.py", "decoder", "head"),
                                              ("evaluate.py", "decoder", "transmitter"),
                                              ("evaluate.py", "renderer", "head")])
def test_renamed_keys_name_the_new_key_in_one_line(script, old, new):
    # One name per thing: transmitter= is the weights that decode latents in every script, head= the stf|nerf head.
    proc = run_script(script, f"{old}=x.pt", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"{script[:-3]}: error: {old}= was renamed to {new}=: pass {new}=x.pt"]


@pytest.mark.parametrize("task, new", [("encoder", "transmitter"), ("generation", "prior")])
def test_evaluate_ckpt_names_the_new_key_of_its_task(task, new):
    # ckpt= was the encoder's transmitter and the generation task's prior; each task now says which it is.
    proc = run_script("evaluate.py", f"task={task}", "ckpt=x.pt", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"evaluate: error: ckpt= was renamed to {new}=: pass {new}=x.pt"]
    proc = run_script("evaluate.py", "ckpt=x.pt", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "evaluate: error: ckpt= was renamed per task: pass task=encoder transmitter=x.pt, task=generation prior=x.pt"]


def test_evaluate_unknown_key_is_one_line(tmp_path):
    # A typo, or a key of the other task: one line naming it (and the nearest key), exit 2, before any model is built;
    # a key added with + (which Hydra lets through) is refused by the task's schema the same way.
    line = _user_error(*_timed("evaluate.py", "task=encoder", "transmitter=x.pt", "grid_sise=64"), "evaluate")
    assert line == "evaluate: error: grid_sise= is not a setting of task=encoder; did you mean grid_size=?"
    line = _user_error(*_timed("evaluate.py", "task=generation", "holdout=8"), "evaluate")
    assert line.startswith("evaluate: error: holdout= is not a setting of task=generation")
    records = tmp_path / "records"
    records.mkdir()
    (records / "manifest.jsonl").write_text("")
    (tmp_path / "e.pt").write_bytes(b"")
    line = _user_error(*_timed("evaluate.py", "task=encoder", f"transmitter={tmp_path / 'e.pt'}",
                               f"data.root={records}", "+grid_sise=64"), "evaluate")
    assert "unknown setting 'grid_sise'" in line
