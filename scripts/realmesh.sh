#!/usr/bin/env bash
# The tiny learning recipe of tests/test_learning.py on real meshes, then evaluate.py: README "Encoder learning on
# real meshes". Same records settings (64², 4 encoder + 6 target views, 2 held out, 1024 points, 4096 + 4096 SDF
# samples), same stages, step counts and hyper-parameters (nerf 250 → distill 80 → finetune 40, 64-wide MLP,
# lr 3e-3 / 3e-3 / 1e-4, finetune on one view at 64²); every asset in every batch (the toy recipe's batch 8 of 8 is
# batch = number of assets here).
#
#   bash scripts/realmesh.sh [MESH_FOLDER] [OUT]     # default: ../shared/assets/good → runs/realmesh
#
# Writes OUT/records, OUT/{nerf,distill,finetune} (runs: metrics.jsonl with the trainer's eval/* numbers, snapshots),
# OUT/eval/results.{md,json} and OUT/eval/grids/encoder_{0,1,2}.png (target | NeRF | STF rows per asset, per stage).
# SHAPEE_LEARN_{NERF,DISTILL,FINETUNE}_STEPS and SHAPEE_LEARN_SEED as in tests/test_learning.py; PYTHON picks the
# interpreter. About 30 min on a 2-core CPU (evaluate.py's 128³ meshes and the finetune steps dominate).
set -euo pipefail
cd "$(dirname "$0")/.."

meshes="$(realpath "${1:-../shared/assets/good}")"  # absolute: the manifest names the source files
out="${2:-runs/realmesh}"
nerf_steps="${SHAPEE_LEARN_NERF_STEPS:-250}"
distill_steps="${SHAPEE_LEARN_DISTILL_STEPS:-80}"
finetune_steps="${SHAPEE_LEARN_FINETUNE_STEPS:-40}"
seed="${SHAPEE_LEARN_SEED:-0}"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled

# 1. Records: tests/test_learning.py's toy-world settings, on mesh files.
"$PY" scripts/prepare_data.py input="$meshes" out="$out/records" resolution=64 views=4 targets=6 pc_resolution=64 \
  pc_views=8 n_points=1024 sdf_uniform=4096 sdf_near=4096 progress=false
n_assets=$(grep -c '"record"' "$out"/records/manifest*.jsonl | awk -F: '{s += $NF} END {print s}')
echo "realmesh: $n_assets records in $out/records"

# 2. The three stages, each from the previous one's snapshot (tests/test_learning.py TRAIN + RECIPE).
train=(model.mlp.d_hidden=64 "trainer.batch_size=$n_assets" trainer.ema.halflife_ksamples=0.4 trainer.log_every=10
       "eval.n_assets=$n_assets" resume=never "trainer.seed=$seed")
stage() {  # stage NAME STEPS [overrides...]
  local name="$1" steps="$2"; shift 2
  "$PY" scripts/train_encoder.py "experiment=tiny_$name" "data.root=$out/records" "run_dir=$out/$name" \
    "trainer.max_steps=$steps" "trainer.eval_every=$steps" "trainer.ckpt_every=$steps" "${train[@]}" "$@"
}
stage nerf "$nerf_steps" trainer.optimizer.lr=3e-3 trainer.lr_schedule.warmup_steps=20
stage distill "$distill_steps" trainer.optimizer.lr=3e-3 trainer.lr_schedule.warmup_steps=20 \
  "init_from=$out/nerf/checkpoints/snapshot.pt"
stage finetune "$finetune_steps" trainer.optimizer.lr=1e-4 trainer.lr_schedule.warmup_steps=5 stage.stf_views=1 \
  "init_from=$out/distill/checkpoints/snapshot.pt"

# 3. evaluate.py with its defaults (held-out views, 128³ mesh grid, Chamfer / F-score against the source meshes).
snap() { echo "$out/$1/checkpoints/snapshot.pt"; }
"$PY" scripts/evaluate.py task=encoder "transmitter=[$(snap nerf),$(snap distill),$(snap finetune)]" \
  "labels=[nerf,distill,finetune]" "data.root=$out/records" "out=$out/eval" "grid_assets=$n_assets" device=cpu
