#!/usr/bin/env bash
# Reduced CPU run on the real HAM10000 pool, then its heatmaps scored against the expert lesion masks
# (test split and PH2) and its classification on the test split. Results: training/RESULTS.md
# ("Do the heatmaps point at the lesion?") and docs/explanations.md. Resumable: a finished member
# is skipped, an interrupted one continues from its last.pt.
# Usage: training/experiments/ham10000_cam.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/ham_cam}
D=${LESIONSERVE_REAL:-../shared/data/isic-real}
PY=${PY:-.venv/bin/python}
for spec in resnet50:8 densenet121:6 efficientnet_b3:5; do
  b=${spec%%:*}; e=${spec##*:}
  [ -f "$OUT/$b/.done" ] && continue
  resume=(); [ -f "$OUT/$b/last.pt" ] && resume=(--resume "$OUT/$b/last.pt")
  $PY -m training.train --backbone "$b" --data "$D/ham10000_metadata.csv" --layout ham10000 --out "$OUT/$b" \
    --profile from_scratch --input-size 128 --max-images-per-class 150 --epochs "$e" --batch-size 32 --threads 2 "${resume[@]}"
  touch "$OUT/$b/.done"
done
$PY -m training.calibrate --artifacts "$OUT" --views 2
$PY -m training.evaluate_maps --artifacts "$OUT" --masks "$D/ham10000_masks.csv" --ph2 "$D/ph2_labels.csv" \
  --views 8 --cases 4 --threads 2 --out "$OUT/maps_t8"
$PY -m training.evaluate --artifacts "$OUT" --split test --views 8 --out "$OUT/eval_test" --bootstrap 1000
