#!/usr/bin/env bash
# The checks that need a CUDA card, in one short run (about 8 minutes at most): what the
# CPU-only test suite cannot show. Each step has its own time limit, so one that hangs still
# leaves the others' figures. Logs and JSON go to $OUT (default runs/gpu_check); each step's
# tail is printed.
#
#   1. bench line 8: stage-2 training-step images/s at 224 px, fp32 against bf16 AMP, MFU, and
#      feature extraction, for ViT-B/16 and RN50 (random weights: speed does not need OpenAI's)
#   2. a reproduce smoke on the card through Ray: v1, v5, v9 of both backbones (6 trials),
#      full-size models, --gpus-per-trial auto (the memory probe decides how many trials share
#      the card, and Ray knows), device: cuda (a trial that sees no card fails, it never falls
#      back to the CPU), 2 + 3 epochs of 10 batches on a synthetic 190-identity dataset
#   3. bench line 3 (quick): the share of a CUDA epoch spent waiting for data
#   4. the training, learning and loss tests, run where device: auto now means CUDA
#
# Usage: scripts/gpu_check.sh   (TUNE_CLIPFH and PYTHON name other commands; OUT the folder)
set -u
OUT=${OUT:-runs/gpu_check}
TC=${TUNE_CLIPFH:-tune-clipfh}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # also when a step is interrupted

step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2 started rc
    shift 2
    echo "== $name (limit ${limit}s)"
    started=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - started))s"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step bench_cuda 100 $TC bench --only 8 --json "$OUT/bench_cuda.json"

$TC data synth "$work/synth" --identities 190 --images-per-identity 24 >/dev/null &&
    $TC data prepare --src "$work/synth" --out "$work/prepared" >/dev/null
TAIL=20 step reproduce 180 $TC reproduce --profile full --backbones vitb16,rn50 \
    --versions v1,v5,v9 --data "$work/prepared" --cache-dir "$work/cache" \
    --storage "$work/ray" --name gpu-check --gpus-per-trial auto \
    --set pretrained=none --set device=cuda --set epochs_prompt=2 --set epochs_image=3 \
    --set limit_train_batches=10
grep -E "gpus-per-trial|probe" "$OUT/reproduce.log" | head -5

step bench_pipeline 75 $TC bench --only 3 --quick --json "$OUT/bench_pipeline.json"

TAIL=15 step pytest 120 $PY -m pytest -q -p no:cacheprovider tests/test_train.py \
    tests/test_learning.py tests/test_full_profile.py tests/test_losses.py
