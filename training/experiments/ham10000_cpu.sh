#!/usr/bin/env bash
# Reduced-resolution CPU run on the real HAM10000 pool (../shared/data/isic-real), lesion-grouped
# 60/20/20 split, from scratch: shows the pipeline learns on real images. Results: training/RESULTS.md.
# Usage: training/experiments/ham10000_cpu.sh [OUT] [EPOCHS] [SIZE] [CAP]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/ham10000_cpu}
EPOCHS=${2:-8}
SIZE=${3:-128}
CAP=${4:-150}
DATA=${LESIONSERVE_HAM10000:-../shared/data/isic-real/ham10000_metadata.csv}
PY=${PY:-.venv/bin/python}
for b in resnet50 densenet121 efficientnet_b3; do
  $PY -m training.train --backbone $b --data "$DATA" --layout ham10000 --out "$OUT/$b" \
    --profile from_scratch --input-size "$SIZE" --max-images-per-class "$CAP" \
    --epochs "$EPOCHS" --batch-size 32 --threads 2 --no-save-state
done
$PY -m training.calibrate --artifacts "$OUT" --views 8
$PY -m training.evaluate --artifacts "$OUT" --split test --views 8 --out "$OUT/eval_test" --bootstrap 1000
