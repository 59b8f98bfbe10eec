#!/usr/bin/env bash
# One row of the small-image recipe ablation (bench/RESULTS.md): train without labels with the given
# flags, then weighted kNN (k=200, tau=0.07) on the held-out split; appends a row to $OUT/results.tsv.
#
#   DATA=fashion-mnist bash bench/recipe_ablation.sh small-crop20 --augmentation small
#   DATA=glyphs GLYPHS=/tmp/glyphs bash bench/recipe_ablation.sh small-noflip --augmentation small-noflip
#
# DATA=glyphs is bench/make_glyphs.py's set (letters from fonts unseen in training). Equal numbers of
# steps (EPOCHS), not equal minutes, so that rows compare recipes, not how busy the machine was.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-fashion-mnist}
GLYPHS=${GLYPHS:-/tmp/glyphs}
METHOD=${METHOD:-"-m training.simclr"}
EPOCHS=${EPOCHS:-4}
OUT=${OUT:-runs/ablation}
name=$1
shift
case "$DATA" in
  fashion-mnist) train="fashion-mnist"; eval_args=(--data fashion-mnist:test) ;;
  glyphs) train="folder:$GLYPHS/train"; eval_args=(--data "folder:$GLYPHS/test" --train-data "folder:$GLYPHS/train") ;;
  *) echo "DATA must be fashion-mnist or glyphs" >&2; exit 2 ;;
esac
run="$OUT/$DATA/$name"
mkdir -p "$run"
start=$(date +%s)
# shellcheck disable=SC2086
$PY $METHOD --data "$train" --arch resnet18 --width 0.25 --crop-size 28 --small-stem --batch-size 256 \
  --epochs "$EPOCHS" --amp bf16 --channels-last --knn-every 0 --no-progress --out "$run" "$@" > "$run/train.log" 2>&1
minutes=$(awk "BEGIN {printf \"%.1f\", ($(date +%s) - $start) / 60}")
$PY -m training.evaluate --checkpoint "$run/encoder.pt" "${eval_args[@]}" --json "$run/eval.json" > "$run/eval.log" 2>&1
top1=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['knn/top1'])" "$run/eval.json")
printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$DATA" "$name" "$top1" "$EPOCHS" "$minutes" "$METHOD $*" | tee -a "$OUT/results.tsv"
