#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one H100):
#   1. full vs bare training-step images/s (MoCo v2, ResNet-18 small stem, bf16), 1 vs all GPUs;
#   2. MoCo v2 ResNet-18 (small stem) on Fashion-MNIST 60k with AMP for a fixed time budget;
#   3. weighted kNN top-1/top-5 (k=200, tau=0.07) of the result on the 10k test set.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # CPU, tiny model and data: checks the script end to end
#
# Environment: TRAIN_SECONDS (default 240), OUT (results folder, default runs/gpu_check),
# FASHION_MNIST_DIR (the IDX .gz files; machines without internet need them carried).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Python: the project's .venv, else a python3 that already has torch (GPU images), else a new venv.
if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif python3 -c "import torch, torchvision, tqdm" 2>/dev/null; then
  PY=python3
else
  echo "setting up .venv (needs network access)"
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet torch torchvision
  .venv/bin/python -m pip install --quiet -e .
  PY=.venv/bin/python
fi
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")
EOF

if [[ $DRY_RUN == 1 ]]; then
  DEVICE=cpu; NGPU=1; TRAIN_SECONDS="${TRAIN_SECONDS:-20}"
  MODEL=(--arch resnet18 --width 0.125 --small-stem)
  BENCH=(--steps 3 --warmup 1)
  DATA=(--subset 2048 --knn-subset 1000)
  BATCH=64
else
  DEVICE=cuda; TRAIN_SECONDS="${TRAIN_SECONDS:-240}"
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [[ $NGPU -ge 1 ]] || { echo "error: no CUDA device visible (use --dry-run on CPU)" >&2; exit 1; }
  MODEL=(--arch resnet18 --width 1 --small-stem)
  BENCH=(--steps 30 --warmup 5)
  DATA=()
  BATCH=256
fi
COMMON=(--data fashion-mnist --device "$DEVICE" --amp bf16 "${MODEL[@]}")

echo "== 1. training step throughput: full vs bare, 1 vs $NGPU GPU(s) =="
NPROC_FLAG=()
[[ $NGPU -gt 1 ]] && NPROC_FLAG=(--nproc "$NGPU")
"$PY" bench/train_throughput.py --method moco-v2 "${BENCH[@]}" "${NPROC_FLAG[@]}" -- \
  "${COMMON[@]}" --batch-size "$BATCH" ${DATA[@]+"${DATA[@]}"} --channels-last 2>&1 | tee "$OUT_DIR/throughput.txt"

echo "== 2. MoCo v2 on Fashion-MNIST for ${TRAIN_SECONDS}s =="
# Epochs sized so that the cosine schedule ends near the time budget (from the measured full-step
# rate, 85% to leave room for the kNN monitor); --time-budget stops cleanly if it runs over.
RATE=$(sed -n 's/^  full step *\([0-9.]*\) images\/s/\1/p' "$OUT_DIR/throughput.txt" | head -1)
N_IMAGES=$([[ $DRY_RUN == 1 ]] && echo 2048 || echo 60000)
EPOCHS=$("$PY" -c "print(max(1, int(0.85 * $TRAIN_SECONDS * ${RATE:-1000} / $N_IMAGES)))")
echo "full-step rate ${RATE:-?} images/s -> $EPOCHS epochs"
LAUNCH=("$PY" -m training.moco)
[[ $NGPU -gt 1 ]] && LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m training.moco)
"${LAUNCH[@]}" --version 2 "${COMMON[@]}" --channels-last --batch-size "$BATCH" --epochs "$EPOCHS" \
  --moco-k 16384 --knn-every 5 ${DATA[@]+"${DATA[@]}"} --time-budget "$TRAIN_SECONDS" --out "$OUT_DIR/moco-v2" \
  --no-progress 2>&1 | tee "$OUT_DIR/train.txt"

echo "== 3. weighted kNN on the 10k Fashion-MNIST test set =="
EVAL_SUBSET=()
[[ $DRY_RUN == 1 ]] && EVAL_SUBSET=(--subset 1000)
"$PY" -m training.evaluate --checkpoint "$OUT_DIR/moco-v2/encoder.pt" --data fashion-mnist:test \
  --device "$DEVICE" ${EVAL_SUBSET[@]+"${EVAL_SUBSET[@]}"} --json "$OUT_DIR/evaluation.json" 2>&1 | tee "$OUT_DIR/evaluation.txt"
echo "results in $OUT_DIR"
