#!/usr/bin/env bash
# The checks only a GPU can answer, in one call of a lent GPU machine (device time is short: prepare here, run once).
#
#   bash scripts/gpu_check.sh [quick|full]      # quick (default): GPU tests + marching cubes; full: + bench.py all
#
# On a lent machine (Python 3.12 and torch preinstalled, no PyPI): prepare the missing packages here first with
#   bash ../shared/tools/gpu-wheels.sh
# then run this script there with .gpuwheels carried (the device tool's `carry: [".gpuwheels"]`); it installs them.
# Everything it prints is also written under $OUT (the device tool brings that folder back), default runs/gpu_check.
# DEVICE=cpu runs the same steps on a CPU (the GPU tests skip): a dry run of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

mode="${1:-quick}"
case "$mode" in quick|full) ;; *) echo "usage: bash scripts/gpu_check.sh [quick|full]" >&2; exit 2 ;; esac
out="${OUT:-runs/gpu_check}"
device="${DEVICE:-cuda}"
mkdir -p "$out"
if [ -x .gpuwheels/install.sh ]; then
  bash .gpuwheels/install.sh || { echo "gpu_check: installing .gpuwheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
PY="${PYTHON:-python3}"
failed=()

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure and go on
  local name="$1"; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc="${PIPESTATUS[0]}"
  [ "$rc" -eq 0 ] || { failed+=("$name (exit $rc)"); echo "== $name FAILED (exit $rc)"; }
}

if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"; fi
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| device available:',
torch.cuda.is_available())" | tee -a "$out/gpu.txt"

step gpu_tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
# The issue's target (one 128³ field ≥ 20× scikit-image on an H100). The batched run times the single field again
# before the batch of 8, so the two runs give two single-field timings: their spread shows the noise.
step marching_cubes "$PY" scripts/bench.py marching_cubes --device "$device" --repeats 20 \
  --json "$out/marching_cubes.json"
step marching_cubes_batch8 "$PY" scripts/bench.py marching_cubes --device "$device" --repeats 20 --batch 8 \
  --json "$out/marching_cubes_batch8.json"
if [ "$mode" = full ]; then
  step bench_all "$PY" scripts/bench.py all --device "$device" --json "$out/bench_all.json"
fi

echo
echo "== summary ($mode, $device)"
grep -h "ratio\|per field" "$out"/marching_cubes*.log
grep -h -E "passed|failed|skipped" "$out/gpu_tests.log" | tail -1
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
