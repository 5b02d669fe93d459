"""The shared training loop on a tiny MLP regression problem (CPU, seconds).

Resume is bitwise, DDP ranks agree (2-process gloo) and equal one big batch, gradient accumulation equals one big
batch, SIGTERM leaves a checkpoint and exit code 0, non-finite steps are skipped/counted/aborted, init_from loads
weights, losses are weighted and logged, configs compose.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from shapee.io.checkpoint import CheckpointError, load_checkpoint, load_snapshot
from shapee.runtime import precision_dtype
from shapee.train import (
    EMA,
    TrainerConfig,
    ema_beta,
    lr_factor,
    resolve_trainer_config,
    train,
    weighted_total,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------------
# Toy model and data (also imported by the subprocess scripts below via PYTHONPATH=tests/).


class ToyRegression(Dataset):
    """y = x·W + 0.1·noise with fixed W; item = dict(x [4], y [2], index)."""

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        w = torch.randn(4, 2, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class ToyMLP(nn.Module):
    """4 → 16 → 2 MLP with dropout; loss_dict = mse + l1 (+ a metric). Records the sample indices it saw.

    ``nan_calls``: loss_dict call numbers (0-based) whose loss is NaN; ``sleep_s``: a slow step for signal tests.
    """

    def __init__(self, p_drop: float = 0.2, nan_calls: tuple[int, ...] = (), sleep_s: float = 0.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Dropout(p_drop), nn.Linear(16, 2))
        self.nan_calls, self.sleep_s = set(nan_calls), sleep_s
        self.calls = 0
        self.seen: list[int] = []

    def loss_dict(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.seen += batch["index"].tolist()
        pred = self.net(batch["x"])  # [B, 2]
        mse = (pred - batch["y"]).square().mean()
        l1 = (pred - batch["y"]).abs().mean()
        if self.calls in self.nan_calls:
            mse = mse * float("nan")
        self.calls += 1
        return {"mse": mse, "l1": l1, "metric/abs_err_max": (pred - batch["y"]).abs().max().detach()}


class ToyMLPWithExtra(ToyMLP):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.extra = nn.Linear(2, 2)


@functools.lru_cache(maxsize=1)
def _tiny_yaml() -> str:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_yaml(compose(overrides=["+trainer=tiny"]).trainer)


def tiny_cfg(**overrides):
    """configs/trainer/tiny.yaml composed through Hydra, with dotted-key overrides."""
    cfg = OmegaConf.create(_tiny_yaml())
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False)
    return cfg


def _state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def _assert_tree_equal(a, b, path="") -> None:
    """Bitwise equality of nested dicts/lists of tensors and scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"tensor differs at {path}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {path}"
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"length differs at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"value differs at {path}: {a!r} vs {b!r}"


def _random_eval(ema_model, step):
    # Consumes every RNG: the loop must restore the training stream afterwards.
    return {"rand": float(torch.rand(())) + np.random.rand() + __import__("random").random()}


# ---------------------------------------------------------------------------------------------------------------------
# Resume, accumulation, DDP


def test_resume_is_bitwise_equal_to_straight_run(tmp_path):
    # 6 samples, batch 2: 3 batches per epoch, so step 4 crosses an epoch and the resume lands mid-epoch.
    cfg = tiny_cfg(max_steps=4, ckpt_every=2, **{"loss_weights": {"l1": 0.5}})
    straight = ToyMLP(seed=1)
    out_straight = train(cfg, model=straight, train_set=ToyRegression(), run_dir=tmp_path / "a", eval_fn=_random_eval)

    first = ToyMLP(seed=1)
    train(tiny_cfg(max_steps=2, ckpt_every=2, loss_weights={"l1": 0.5}), model=first, train_set=ToyRegression(),
          run_dir=tmp_path / "b", eval_fn=_random_eval)
    resumed = ToyMLP(seed=7)  # a different init: everything must come from the checkpoint
    out_resumed = train(cfg, model=resumed, train_set=ToyRegression(), run_dir=tmp_path / "b", eval_fn=_random_eval)

    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "data"):
        _assert_tree_equal(a[key], b[key], key)
    assert first.seen + resumed.seen == straight.seen  # same data order across the resume
    assert out_resumed["loss/total"] == out_straight["loss/total"]
    assert out_resumed["eval/rand"] == out_straight["eval/rand"]
    assert b["config"] == OmegaConf.to_container(cfg) and b["code_version"]["package"] == "0.1.0"
    # Dropout was active during training (otherwise the RNG part of this test would prove nothing).
    assert straight.training and straight.net[2].p > 0


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = ToyMLP(p_drop=0.0, seed=3)
    acc = ToyMLP(p_drop=0.0, seed=3)
    train(tiny_cfg(batch_size=2, grad_accum_steps=1), model=big, train_set=ToyRegression(), run_dir=tmp_path / "big")
    train(tiny_cfg(batch_size=1, grad_accum_steps=2), model=acc, train_set=ToyRegression(), run_dir=tmp_path / "acc")
    assert big.seen == acc.seen
    a, b = _state(tmp_path / "big"), _state(tmp_path / "acc")
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["model"]["net.0.weight"], ToyMLP(p_drop=0.0, seed=3).net[0].weight)  # it trained


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        WANDB_MODE="disabled",
        **extra,
    )
    return env


DDP_SCRIPT = """
import sys, torch
from omegaconf import OmegaConf
from test_train_loop import ToyMLP, ToyRegression
from shapee.train import train
torch.set_num_threads(1)
run_dir, rank = sys.argv[1], int(sys.argv[2])
cfg = OmegaConf.create(sys.argv[3])
model = ToyMLP(p_drop=0.0, seed=100 + rank)  # different inits per rank: DDP must broadcast rank 0's
train(cfg, model=model, train_set=ToyRegression(n=8), run_dir=run_dir, device="cpu")
torch.save({"model": model.state_dict(), "seen": model.seen}, f"{run_dir}/rank{rank}.pt")
"""


def test_ddp_two_processes_gloo_agree_and_match_one_big_batch(tmp_path):
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    # 2 ranks × batch 1 × 2 accumulated micro-batches (no_sync on the first) per step.
    cfg_yaml = json.dumps(OmegaConf.to_container(tiny_cfg(batch_size=1, grad_accum_steps=2, eval_every=0)))
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(run_dir), str(rank), cfg_yaml],
            env=_subprocess_env(
                RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                GLOO_SOCKET_IFNAME="lo",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)

    r0 = torch.load(run_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(run_dir / "rank1.pt", weights_only=True)
    _assert_tree_equal(r0["model"], r1["model"], "model")
    assert set(r0["seen"][:4]).isdisjoint(r1["seen"][:4])  # each rank gets its own shard of epoch 0
    assert "[shapee.train]" in outputs[0] and "[shapee.train]" not in outputs[1]  # rank-0-only printing

    # 2 ranks × 2 micro-batches of 1 = the same 4 samples per step as 1 process × batch 4 (DistributedSampler
    # interleaves one permutation), so the averaged gradients and the weights agree.
    single = ToyMLP(p_drop=0.0, seed=100)
    train(tiny_cfg(batch_size=4, eval_every=0), model=single, train_set=ToyRegression(n=8), run_dir=tmp_path / "one")
    assert sorted(single.seen) == sorted(r0["seen"] + r1["seen"])
    for name, value in single.state_dict().items():
        torch.testing.assert_close(r0["model"][name], value, rtol=1e-5, atol=1e-6)
    ddp_ckpt = _state(run_dir)
    assert len(ddp_ckpt["rng"]) == 2 and not torch.equal(ddp_ckpt["rng"][0]["torch"], ddp_ckpt["rng"][1]["torch"])


# ---------------------------------------------------------------------------------------------------------------------
# Stopping, non-finite losses


SIGTERM_SCRIPT = """
import json, sys
from omegaconf import OmegaConf
from test_train_loop import ToyMLP, ToyRegression
from shapee.train import train
cfg = OmegaConf.create(sys.argv[2])
out = train(cfg, model=ToyMLP(sleep_s=0.05), train_set=ToyRegression(), run_dir=sys.argv[1])
print("RESULT " + json.dumps(out))
"""


def test_sigterm_finishes_step_writes_checkpoint_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    script = tmp_path / "sigterm_worker.py"
    script.write_text(SIGTERM_SCRIPT)
    cfg = tiny_cfg(max_steps=100_000, ckpt_every=0, eval_every=0, log_every=1)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), json.dumps(OmegaConf.to_container(cfg))],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    result = json.loads(out.split("RESULT ", 1)[1])
    ckpt = _state(run_dir)
    assert result["stopped_by_signal"] == 1
    assert 3 <= ckpt["step"] == result["step"] < 100_000
    assert load_snapshot(run_dir / "checkpoints" / "snapshot.pt")["step"] == ckpt["step"]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    model = ToyMLP(nan_calls=(1,))
    out = train(tiny_cfg(), model=model, train_set=ToyRegression(), run_dir=tmp_path)
    ckpt = _state(tmp_path)
    assert out["nonfinite_steps"] == 1 and out["step"] == 4
    assert ckpt["nonfinite"] == {"total": 1, "in_a_row": 0}
    assert all(float(s["step"]) == 3.0 for s in ckpt["optimizer"]["state"].values())  # 3 real AdamW updates
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r.get("loss/total", 0.0)) for r in logged)


def test_too_many_nonfinite_steps_abort_with_clear_error(tmp_path):
    model = ToyMLP(nan_calls=tuple(range(100)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps"):
        train(tiny_cfg(max_steps=10, max_nonfinite_in_a_row=3), model=model, train_set=ToyRegression(),
              run_dir=tmp_path)
    _assert_tree_equal(before, model.state_dict())  # no update ever applied


# ---------------------------------------------------------------------------------------------------------------------
# init_from, losses and logging, eval, configs


def test_init_from_snapshot_loads_weights_strictly(tmp_path):
    source = ToyMLP(seed=1)
    train(tiny_cfg(max_steps=2), model=source, train_set=ToyRegression(), run_dir=tmp_path / "src")
    snapshot = tmp_path / "src" / "checkpoints" / "snapshot.pt"
    ema_weights = load_snapshot(snapshot)["weights"]

    target = ToyMLP(seed=2)
    train(tiny_cfg(max_steps=0, init_from=str(snapshot)), model=target, train_set=ToyRegression(),
          run_dir=tmp_path / "dst")
    _assert_tree_equal(dict(target.state_dict()), ema_weights)

    with pytest.raises(CheckpointError, match=r"missing \['extra.weight', 'extra.bias'\]"):
        train(tiny_cfg(max_steps=0, init_from=str(snapshot)), model=ToyMLPWithExtra(seed=2),
              train_set=ToyRegression(), run_dir=tmp_path / "strict")
    extra = ToyMLPWithExtra(seed=2)
    train(tiny_cfg(max_steps=0, init_from=str(snapshot), init_allow_missing=["extra.*"]), model=extra,
          train_set=ToyRegression(), run_dir=tmp_path / "lenient")
    torch.testing.assert_close(extra.net[0].weight, ema_weights["net.0.weight"], rtol=0, atol=0)


def test_losses_weighted_summed_and_every_term_logged(tmp_path):
    cfg = tiny_cfg(loss_weights={"mse": 2.0, "l1": 0.5}, **{"optimizer.lr": 0.01})
    out = train(cfg, model=ToyMLP(p_drop=0.0), train_set=ToyRegression(), run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["loss/total"] == pytest.approx(2.0 * r["loss/mse"] + 0.5 * r["loss/l1"], rel=1e-6)
        assert {"metric/abs_err_max", "lr", "grad_norm", "samples_per_s", "ema_beta", "nonfinite_steps"} <= r.keys()
        assert r["samples_per_s"] > 0
    assert [r["lr"] for r in records] == pytest.approx([0.005, 0.01, 0.01, 0.01])  # linear warm-up over 2 steps
    assert records[0]["ema_beta"] == 0.0  # ramp-up: the first EMA update copies the model
    assert out["loss/total"] == records[-1]["loss/total"]

    with pytest.raises(TypeError, match=r"model.loss_dict\(\)\['bad'\] must be a 0-d tensor"):
        weighted_total({"bad": torch.ones(3)}, {})
    assert float(weighted_total({"a": torch.tensor(1.0), "b": torch.tensor(2.0), "metric/x": torch.tensor(9.0)},
                                {"b": 0.0})) == 1.0


def test_eval_fn_gets_the_ema_model_on_schedule_and_logs_images(tmp_path):
    calls = []

    def eval_fn(ema_model, step):
        calls.append((step, ema_model.training, any(p.requires_grad for p in ema_model.parameters())))
        return {"score": step * 1.5, "image": np.zeros((8, 8, 3), np.uint8)}

    model = ToyMLP()
    out = train(tiny_cfg(eval_every=2), model=model, train_set=ToyRegression(), run_dir=tmp_path, eval_fn=eval_fn)
    assert calls == [(2, False, False), (4, False, False)]
    assert out["eval/score"] == 6.0
    with pytest.raises(ValueError, match=r"eval_fn returned 'curve' with shape \(5,\)"):
        train(tiny_cfg(), model=ToyMLP(), train_set=ToyRegression(), run_dir=tmp_path / "bad",
              eval_fn=lambda m, s: {"curve": np.zeros(5)})


def test_wandb_offline_logging_writes_inside_run_dir(tmp_path):
    def eval_fn(ema_model, step):
        return {"score": 1.0, "image": np.random.rand(8, 8, 3)}

    train(tiny_cfg(max_steps=2, **{"logger.mode": "offline"}), model=ToyMLP(), train_set=ToyRegression(),
          run_dir=tmp_path, eval_fn=eval_fn)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    assert len(list(runs[0].glob("files/media/images/eval/image_2_*.png"))) == 1  # the eval image, as wandb.Image


def test_resume_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        train(tiny_cfg(resume=str(tmp_path / "nope.pt")), model=ToyMLP(), train_set=ToyRegression(), run_dir=tmp_path)
    train(tiny_cfg(max_steps=1), model=ToyMLP(), train_set=ToyRegression(), run_dir=tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"last.pt.*'model' weights do not match"):
        train(tiny_cfg(max_steps=2), model=ToyMLPWithExtra(), train_set=ToyRegression(), run_dir=tmp_path / "a")


def test_precision_policy_bf16_and_fp16_on_cpu(tmp_path):
    assert precision_dtype("auto", torch.device("cpu")) == torch.float32  # fp32 on CPU
    assert precision_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    dtypes = []

    class Probe(ToyMLP):
        def loss_dict(self, batch):
            dtypes.append(self.net(batch["x"]).dtype)  # what autocast made of the matmuls
            return super().loss_dict(batch)

    model = Probe(p_drop=0.0)
    out = train(tiny_cfg(precision="bf16", max_steps=2), model=model, train_set=ToyRegression(), run_dir=tmp_path / "b")
    assert set(dtypes) == {torch.bfloat16} and math.isfinite(out["loss/total"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights

    out = train(tiny_cfg(precision="fp16", max_steps=2), model=ToyMLP(), train_set=ToyRegression(),
                run_dir=tmp_path / "h")
    assert _state(tmp_path / "h")["scaler"]["scale"] > 0  # GradScaler active and checkpointed (fp16 only)
    assert _state(tmp_path / "b")["scaler"] == {}


def test_lr_schedule_warmup_then_constant_or_cosine():
    assert [lr_factor(s, warmup_steps=4, decay="constant", max_steps=10) for s in (0, 1, 3, 4, 9)] == [
        0.25, 0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, warmup_steps=2, decay="cosine", max_steps=12, min_lr_ratio=0.1) for s in (2, 7, 12, 20)]
    assert cos == pytest.approx([1.0, 0.55, 0.1, 0.1])


def test_ema_half_life_math_and_update():
    # Without ramp-up, halflife_samples worth of updates leaves exactly half the weight on the old value.
    beta = ema_beta(batch_samples=32, samples_seen=10**9, halflife_samples=3200, rampup_ratio=0.05)
    assert beta ** (3200 / 32) == pytest.approx(0.5)
    # Ramp-up: half-life = ratio × samples seen (0 at the start: the EMA copies the model).
    assert ema_beta(batch_samples=32, samples_seen=0, halflife_samples=3200, rampup_ratio=0.05) == 0.0
    assert ema_beta(batch_samples=32, samples_seen=6400, halflife_samples=3200, rampup_ratio=0.05) == pytest.approx(
        0.5 ** (32 / 320))
    assert ema_beta(batch_samples=32, samples_seen=0, halflife_samples=3200, rampup_ratio=None) == pytest.approx(
        0.5 ** 0.01)

    model = nn.Linear(3, 2)
    ema = EMA(model)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.training and not ema.module.training
    old = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, beta=0.25)
    torch.testing.assert_close(ema.module.weight, 0.25 * old + 0.75 * model.weight.detach())


def test_trainer_configs_compose_and_match_schema():
    default = OmegaConf.load(CONFIGS / "trainer" / "default.yaml")
    assert OmegaConf.to_container(default) == OmegaConf.to_container(OmegaConf.structured(TrainerConfig))
    tiny = resolve_trainer_config(tiny_cfg())
    assert (tiny.max_steps, tiny.batch_size, tiny.num_workers, tiny.precision) == (4, 2, 0, "fp32")
    assert tiny.logger.mode in ("disabled", "offline")
    with pytest.raises(ValueError, match="precision must be auto\\|bf16\\|fp16\\|fp32, got 'fp8'"):
        resolve_trainer_config(tiny_cfg(precision="fp8"))
    with pytest.raises(Exception, match="bach_size"):
        resolve_trainer_config({"bach_size": 3})
    with pytest.raises(TypeError, match="has no loss_dict"):
        train(tiny_cfg(), model=nn.Linear(2, 2), train_set=ToyRegression(), run_dir="/nonexistent")


def test_interval_meter_averages_each_key_over_the_batches_that_reported_it():
    from shapee.train.logger import IntervalMeter

    meter = IntervalMeter()
    meter.add_micro({"mse": torch.tensor(1.0), "metric/q1": torch.tensor(4.0)}, torch.tensor(1.0))
    meter.end_step(applied=True)
    meter.add_micro({"mse": torch.tensor(3.0)}, torch.tensor(3.0))  # no q1 sample in this batch
    meter.end_step(applied=True)
    out = meter.flush(global_batch=2)
    assert out["loss/mse"] == 2.0 and out["metric/q1"] == 4.0 and out["loss/total"] == 2.0


class ToyMLPCompiled(ToyMLP):
    def compile_targets(self):
        return [self.net]


def test_trainer_compile_compiles_the_targets_in_place_and_keeps_state_dict_names(tmp_path):
    # The "eager" backend runs TorchDynamo's capture without code generation: the plumbing, in seconds on CPU.
    plain, compiled = ToyMLPCompiled(p_drop=0.0, seed=2), ToyMLPCompiled(p_drop=0.0, seed=2)
    out_plain = train(tiny_cfg(max_steps=2), model=plain, train_set=ToyRegression(), run_dir=tmp_path / "a")
    out_compiled = train(tiny_cfg(max_steps=2, compile="eager"), model=compiled, train_set=ToyRegression(),
                         run_dir=tmp_path / "b")
    assert getattr(compiled.net, "_compiled_call_impl", None) is not None  # Module.compile ran on the target
    assert getattr(plain.net, "_compiled_call_impl", None) is None
    assert math.isclose(out_compiled["loss/total"], out_plain["loss/total"], rel_tol=1e-6)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["model"].keys() == b["model"].keys() and not any("_orig_mod" in k for k in b["model"])
    with pytest.raises(ValueError, match="trainer.compile must be"):
        train(tiny_cfg(max_steps=1, compile=3), model=ToyMLPCompiled(), train_set=ToyRegression(),
              run_dir=tmp_path / "c")
