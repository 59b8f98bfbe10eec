#!/usr/bin/env bash
# Fashion-MNIST quality of every method under one fixed budget (the protocol of issue 2):
# an encoder trained WITHOUT labels on the 60k training images for BUDGET seconds of wall clock,
# then weighted kNN (k=200, tau=0.07, cosine) top-1/top-5 on the 10k test images, memory = the
# 60k training images. Prints one line per method and writes runs/quality/<method>/eval.json.
#
#   bash bench/quality.sh                    # CPU: ResNet-18 x0.25, 8 min per method
#   BUDGET=1200 DEVICE=cuda ARCH="--arch resnet18" AMP=bf16 EPOCHS=20 bash bench/quality.sh
#
# Learning curves (kNN against minutes and epochs, every method in one PNG): KNN_EVERY=1 records
# the kNN monitor each epoch (on KNN_SUBSET training images as memory) and plots them to CURVES;
# SUBSET trains on that many images so that short budgets still give several epochs:
#   SUBSET=10000 EPOCHS=100 BUDGET=300 KNN_EVERY=1 CURVES=bench/curves-methods.png bash bench/quality.sh
#
# Short runs use a short warm-up (the papers' 10 epochs would never reach the peak lr) and, for
# MoCo v1/v2, the CIFAR demo's queue K=4096 (the paper's 65536 exceeds this 60k data set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BUDGET=${BUDGET:-480}
EPOCHS=${EPOCHS:-1}
DEVICE=${DEVICE:-cpu}
AMP=${AMP:-auto}
KNN_EVERY=${KNN_EVERY:-0}
KNN_SUBSET=${KNN_SUBSET:-10000}
SUBSET=${SUBSET:-}
CURVES=${CURVES:-}
ARCH=${ARCH:---arch resnet18 --width 0.25}
OUT=${OUT:-runs/quality}
METHODS=${METHODS:-"simclr nnclr moco-v2 moco-v3 moco-v1 instdisc instdisc-softmax"}
COMMON="--data fashion-mnist $ARCH --batch-size 256 --epochs $EPOCHS --warmup-epochs 0.05 \
  --time-budget $BUDGET --device $DEVICE --amp $AMP --knn-every $KNN_EVERY --knn-subset $KNN_SUBSET \
  --no-progress${SUBSET:+ --subset $SUBSET}"

command_for() {
  case "$1" in
    simclr)   echo "-m training.simclr" ;;
    nnclr)    echo "-m training.nnclr" ;;
    moco-v1)  echo "-m training.moco --version 1 --moco-k 4096 --lr-schedule cosine" ;;
    moco-v2)  echo "-m training.moco --version 2 --moco-k 4096" ;;
    moco-v3)  echo "-m training.moco --version 3" ;;
    instdisc) echo "-m training.instdisc" ;;
    # the exact softmax: NCE does not learn on Fashion-MNIST (bench/RESULTS.md)
    instdisc-softmax) echo "-m training.instdisc --nce-k 0 --proximal-lambda 0" ;;
  esac
}

mkdir -p "$OUT"
printf '%-16s %8s %8s %8s %s\n' method top1 top5 minutes command
for method in $METHODS; do
  out="$OUT/$method"
  start=$(date +%s)
  # shellcheck disable=SC2046
  $PY $(command_for "$method") $COMMON --out "$out" > "$out.log" 2>&1 || { echo "$method failed: see $out.log"; continue; }
  minutes=$(awk "BEGIN {printf \"%.1f\", ($(date +%s) - $start) / 60}")
  $PY -m training.evaluate --checkpoint "$out/encoder.pt" --data fashion-mnist:test --device "$DEVICE" \
    --json "$out/eval.json" > "$out/eval.log" 2>&1
  $PY - "$out/eval.json" "$method" "$minutes" "$(command_for "$method") $COMMON" <<'PY'
import json, sys
path, method, minutes, command = sys.argv[1:]
result = json.load(open(path))
print(f"{method:<16} {result['knn/top1']:7.2f}% {result['knn/top5']:7.2f}% {minutes:>8} python {command}")
PY
done
if [ "$KNN_EVERY" != 0 ] && [ -n "$CURVES" ]; then
  runs=()
  for method in $METHODS; do runs+=("$OUT/$method"); done
  $PY bench/plot_curves.py "${runs[@]}" --out "$CURVES" \
    --title "Fashion-MNIST kNN monitor (${KNN_SUBSET} memory): ${SUBSET:-60000} training images, ${BUDGET} s per method"
fi
