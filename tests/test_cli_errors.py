"""Scripts fail fast and plainly: a user error is one line naming the key or file and what to do, exit code 2, no
traceback, before any model is built; a training run stopped by SIGTERM exits 3 and its snapshot cannot start the next
stage; prepare_data exits non-zero when no record was produced."""

from __future__ import annotations

import ast
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _tiny_data import REPO, run_script, tiny_records

from shapee.cli import check_command_line
from shapee.eval.config import register_configs
from shapee.settings import register_sample_config

ASSETS_BAD = REPO.parent / "shared" / "assets" / "bad"  # broken meshes
CONFIGS = REPO / "configs"
HYDRA_SCRIPTS = ["prepare_data", "train_encoder", "train_diffusion", "train_pointe_sdf", "extract_latents", "export",
                 "evaluate", "sample"]

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


def _refusal(capsys, script: str, *argv: str) -> str | None:
    """What ``scripts/<script>.py argv`` gets from :func:`check_command_line` before Hydra runs (in this process): its
    one stderr line (exit code 2), or None when the command line is accepted."""
    register_configs()
    register_sample_config()
    try:
        check_command_line(script, CONFIGS, list(argv))
    except SystemExit as e:
        assert e.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]
    return None


def test_every_hydra_script_checks_its_command_line_before_hydra_parses_it():
    # A new @hydra.main script gets the one-line refusals below only if its __main__ block calls the check first.
    scripts = [p for p in sorted((REPO / "scripts").glob("*.py")) if "@hydra.main" in p.read_text()]
    assert sorted(p.stem for p in scripts) == sorted(HYDRA_SCRIPTS)
    for path in scripts:
        tree = ast.parse(path.read_text())
        block = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
        calls = [ast.unparse(n.value) for n in block.body if isinstance(n, ast.Expr)]
        assert calls[-2:] == [f"check_command_line({path.stem!r}, CONFIGS)", "main()"], path.name


@pytest.mark.parametrize("script, argv, line", [
    ("prepare_data", ["reslution=64"], "reslution= is not a setting; did you mean resolution=?"),
    ("train_encoder", ["trainr.seed=1"], "trainr.seed= is not a setting; did you mean trainer.seed=?"),
    ("train_encoder", ["model.encoder.widht=8"], "model.encoder.widht= is not a setting; did you mean "
                                                  "model.encoder.width=?"),
    ("train_diffusion", ["trainer.max_step=3"], "trainer.max_step= is not a setting; did you mean trainer.max_steps=?"),
    ("train_pointe_sdf", ["data.rot=r"], "data.rot= is not a setting; did you mean data.root=?"),
    ("extract_latents", ["batchsize=2"], "batchsize= is not a setting; did you mean batch_size=?"),
    ("export", ["fromat=diffusers"], "fromat= is not a setting; did you mean format=?"),
    ("evaluate", ["task=encoder", "grid_sise=64"], "grid_sise= is not a setting of task=encoder; did you mean "
                                                   "grid_size=?"),
    ("sample", ["guidance=3"], "guidance= is not a setting; did you mean guidance_scale=?"),
    ("train_encoder", ["stage=nerff"], "stage=nerff: no such option; pass stage=distill|finetune|nerf"),
    ("train_diffusion", ["cond=txt"], "cond=txt: no such option; pass cond=image|text"),
    ("prepare_data", ["data=toys"], "data=toys: no such option; pass data="),
    ("sample", ["steps=many"], "steps=many: Value 'many' of type 'str' could not be converted to Integer"),
    ("train_diffusion", ["decoder=x.pt"], "decoder= was renamed to transmitter=: pass transmitter=x.pt"),
])
def test_a_bad_command_line_is_one_line_naming_the_key(capsys, script, argv, line):
    # Hydra itself would print several lines and exit 1, after the script's imports.
    assert _refusal(capsys, script, *argv).startswith(f"{script}: error: {line}")


@pytest.mark.parametrize("script, argv", [
    ("prepare_data", ["data=toy", "n=8", "out=o", "resolution=64", "workers=2", "shard=0/4"]),
    ("prepare_data", ["data=objaverse", "input=uids.txt", "out=o", "captions=captions.json"]),
    ("train_encoder", ["experiment=tiny_nerf", "data.root=r", "+eval.n_points=2048", "hydra.run.dir=."]),
    ("train_encoder", ["stage=distill", "data.root=r", "init_from=s.pt", "trainer.max_steps=2"]),
    ("train_diffusion", ["data=cap3d", "data.latents=l", "data.captions=c.csv", "init_official=text_cond.pt"]),
    ("train_diffusion", ["cond=image", "data.root=l", "transmitter=t.pt"]),
    ("train_pointe_sdf", ["model=pointe_sdf_tiny", "trainer=tiny", "data.root=r"]),
    ("extract_latents", ["records=r", "transmitter=t.pt", "out=o", "cond=image", "image_cond=grid"]),
    ("export", ["format=diffusers", "prior=p.pt", "transmitter=t.pt", "out=o"]),
    ("evaluate", ["task=generation", "prior=p.pt", "transmitter=t.pt", "prompts=p.txt"]),
    ("sample", ["prompt=a chair", "checkpoint=official", "export.texture=1024", "formats=[glb,obj]"]),
    ("train_encoder", ["trainr.seed=1", "--cfg", "job"]),  # Hydra's own flags: the command line is left to Hydra
])
def test_good_command_lines_pass_the_check(capsys, script, argv):
    assert _refusal(capsys, script, *argv) is None


def test_a_typo_key_stops_a_training_script_in_one_line_before_anything_is_built():
    line = _user_error(*_timed("train_encoder.py", "trainr.seed=1"), "train_encoder")
    assert line == "train_encoder: error: trainr.seed= is not a setting; did you mean trainer.seed=?"
