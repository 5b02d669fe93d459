"""Learning, not just running: the tiny encoder on 8 toy assets, through the three stages (issues 3 and 4).

One module-scoped toy world at 64² (4 encoder views, 6 target views of which 2 are held out), then
``scripts/train_encoder.py``'s library function for ``tiny_nerf`` → ``tiny_distill`` → ``tiny_finetune``, each stage
initialised from the previous one's snapshot, exactly as a user chains them. The numbers these tests reach are the
ones quoted in README (the same commands, see README "Results"). Evaluation is fixed (``evaluate.py``'s function and
defaults, :func:`shapee.eval.encoder.evaluate_checkpoint`): the 2 held-out target views of all 8 assets at 64² (never
trained on), NeRF with deterministic sampling, STF = the mesh of the tiny model's 32³ grid rendered at 64². The
assertions read the pooled PSNR (of the MSE pooled over the assets: ``eval/nerf_psnr_pooled``,
``eval/stf_psnr_pooled@32``), the aggregate they were calibrated on; the headline mean of per-asset PSNRs is dominated
by the black cube on the black background (41.9 → 32.0 dB over finetune in one CI run while 6 of 8 assets improved).

The recipe (batch 8 = every asset every step, AdamW, CPU at 2 threads; the whole file took 7:20–8:15 wall-clock on
the 2-core development machine):

* all stages: the tiny transmitter with a 64-wide NeRSTF MLP (``model.mlp.d_hidden=64``; the preset's 32 underfits:
  training-ray PSNR = held-out PSNR ≈ 18 dB, and 300 / 400 steps with a cosine decay only reach 18.0 / 18.2 dB).
* nerf: NERF_STEPS steps at lr 3e-3 (20 warm-up steps), constant (held out after 250 steps: 21.56 / 21.50 / 20.27 dB
  with seeds 0 / 1 / 2; before the initial weights were seeded, one start read 17.0 / 18.7 / 21.65 dB after 100 / 200
  / 250 steps: the last 50 steps matter).
* distill: DISTILL_STEPS steps at lr 3e-3 (20 warm-up steps). Its first steps cost the NeRF up to ~2 dB (training
  rays, seed 1: 22.2 → 19.8 dB at step 30) before it recovers: after 40 steps seed 1 was still 1.34 dB below its nerf
  stage, after 80 steps 0.45 dB above it, with the mesh far better (STF 17.8 → 21.7 dB).
* finetune: FINETUNE_STEPS steps at lr 1e-4 (5 warm-up steps), the mesh-render loss on 1 random training view per
  asset at the records' 64² with the official soft-raster σ 1e-5. A finetune step costs ~4–6× a nerf step on a CPU:
  the grid query, marching cubes, PyTorch3D's naive rasteriser and the backward through them. After the 80-step
  distill, cheaper renders hurt the mesh: at 32² (σ 1e-3) the finetune lost 0.96 / 0.96 dB STF with seeds 0 / 1
  (also with 2 views, lr 3e-5, or the NeRF terms off: −0.5 to −1.5 dB; Chamfer 40 → 54 ×10⁻³, F-score 0.31 → 0.12
  for seed 1 by ``evaluate.py``), while at 64² it gains with every seed (README "Results"). At lr 3e-3 a fresh
  optimiser costs the NeRF ~3 dB in 10 steps; at 5e-4 (32²) seed 0 lost 1.15 dB STF.
* "NeRF quality kept" is one-sided: the later stages keep training the NeRF loss, so their NeRF PSNR may rise above
  the nerf stage's (it does, by up to 1.24 dB); what the check guards against is losing more than 1 dB.

``SHAPEE_LEARN_{NERF,DISTILL,FINETUNE}_STEPS`` and ``SHAPEE_LEARN_SEED`` override the step counts and the seed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from shapee.train.encoder import train_encoder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Step counts of the README table (CPU, 2 threads); override to explore.
NERF_STEPS = int(os.environ.get("SHAPEE_LEARN_NERF_STEPS", "250"))
DISTILL_STEPS = int(os.environ.get("SHAPEE_LEARN_DISTILL_STEPS", "80"))
FINETUNE_STEPS = int(os.environ.get("SHAPEE_LEARN_FINETUNE_STEPS", "40"))
SEED = int(os.environ.get("SHAPEE_LEARN_SEED", "0"))

TOY_WORLD = [
    "data=toy", "n=8", "resolution=64", "views=4", "targets=6", "pc_resolution=64", "pc_views=8", "n_points=1024",
    "sdf_uniform=4096", "sdf_near=4096", "progress=false",
]
TRAIN = ["model.mlp.d_hidden=64", "trainer.batch_size=8", "trainer.ema.halflife_ksamples=0.4", "trainer.log_every=10",
         "eval.n_assets=8",
         "resume=never", f"trainer.seed={SEED}"]  # then RECIPE[stage] (later overrides win)
RECIPE = {
    "nerf": ["trainer.optimizer.lr=3e-3", "trainer.lr_schedule.warmup_steps=20"],
    "distill": ["trainer.optimizer.lr=3e-3", "trainer.lr_schedule.warmup_steps=20"],
    "finetune": ["trainer.optimizer.lr=1e-4", "trainer.lr_schedule.warmup_steps=5", "stage.stf_views=1"],
}


@pytest.fixture(scope="module")
def toy64(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy64")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), f"out={out}", *TOY_WORLD],
                   check=True, cwd=REPO, env=env, capture_output=True)
    return out


def _history(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r[key] for r in rows if key in r]


def _run(stage: str, steps: int, root: Path, run_dir: Path, init_from: Path | None = None) -> dict:
    overrides = [f"experiment=tiny_{stage}", f"data.root={root}", f"run_dir={run_dir}", f"trainer.max_steps={steps}",
                 f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}", *TRAIN, *RECIPE[stage]]
    if init_from is not None:
        overrides.append(f"init_from={init_from}")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train_encoder", overrides=overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return train_encoder(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stages(toy64, tmp_path_factory) -> dict[str, dict]:
    runs = tmp_path_factory.mktemp("runs")
    out = {"runs": runs, "nerf": _run("nerf", NERF_STEPS, toy64, runs / "nerf")}
    out["distill"] = _run("distill", DISTILL_STEPS, toy64, runs / "distill", runs / "nerf/checkpoints/snapshot.pt")
    out["finetune"] = _run("finetune", FINETUNE_STEPS, toy64, runs / "finetune", runs / "distill/checkpoints/snapshot.pt")
    for stage in ("nerf", "distill", "finetune"):
        metrics = out[stage]
        print(f"{stage}: nerf_psnr {metrics['eval/nerf_psnr']:.2f} dB (pooled {metrics['eval/nerf_psnr_pooled']:.2f}), "
              f"stf_psnr {metrics['eval/stf_psnr@32']:.2f} dB (pooled {metrics['eval/stf_psnr_pooled@32']:.2f})")
    return out


def test_nerf_stage_reaches_20_db_on_held_out_views(stages):
    # Issue 3: >= 20 dB on the held-out views at 64² (README, Results: 21.56 / 21.50 / 20.27 dB with seeds 0 / 1 / 2;
    # 250 steps; seed 2 is near the bound), and far above the untrained model (~11 dB) on views it never saw.
    first = _history(stages["runs"] / "nerf", "metric/ray_psnr")[0]
    assert stages["nerf"]["eval/nerf_psnr_pooled"] >= 20.0
    assert stages["nerf"]["eval/nerf_psnr_pooled"] >= first + 6.0


def test_distill_makes_a_mesh_and_keeps_nerf_quality(stages):
    sdf = _history(stages["runs"] / "distill", "loss/distill_sdf")
    assert sdf[-1] < 0.7 * sdf[0]
    # Meshes appear (STF PSNR rises over the NeRF-only encoder's) while NeRF quality stays within 1 dB.
    assert stages["distill"]["eval/stf_psnr_pooled@32"] > stages["nerf"]["eval/stf_psnr_pooled@32"] + 1.0
    assert stages["distill"]["eval/nerf_psnr_pooled"] >= stages["nerf"]["eval/nerf_psnr_pooled"] - 1.0


def test_finetune_chains_from_distill(stages):
    # The mesh-render loss is finite and the meshes survive the stage (STF PSNR far above the NeRF-only encoder's).
    assert all(v == v and v < 10 for v in _history(stages["runs"] / "finetune", "loss/stf_rgba"))
    assert stages["finetune"]["eval/stf_psnr_pooled@32"] > stages["nerf"]["eval/stf_psnr_pooled@32"] + 2.0


def test_finetune_improves_the_mesh_and_keeps_nerf_quality(stages):
    # Issue 4: the held-out STF PSNR after finetune is above the one after distill, and the NeRF PSNR stays within
    # 1 dB of the nerf stage's (no more than 1 dB lost; module docstring). Seeds 0 / 1 / 2 (README "Results"): STF
    # +1.73 / +0.23 / +0.85 dB over distill, NeRF +0.66 / +1.14 / +0.78 dB over the nerf stage.
    assert stages["finetune"]["eval/stf_psnr_pooled@32"] > stages["distill"]["eval/stf_psnr_pooled@32"]
    assert stages["finetune"]["eval/nerf_psnr_pooled"] >= stages["nerf"]["eval/nerf_psnr_pooled"] - 1.0
