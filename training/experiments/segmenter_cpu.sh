#!/usr/bin/env bash
# Reduced CPU run of the lesion segmenter on the real HAM10000 masks (../shared/data/isic-real), from
# scratch: lesion-grouped 60/20/20 split of the 5,123 masked images, 800 training images, sizes
# 128 -> 192, 3 one-cycle epochs each (no frozen phase: there are no pretrained weights), then the
# Task 1 metrics on the test split and PH2, the ONNX export and the speed benchmark.
# Resumable: rerun after an interruption. Results: training/RESULTS.md, docs/segmentation.md.
# Usage: training/experiments/segmenter_cpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/seg_real}
D=${LESIONSERVE_REAL:-../shared/data/isic-real}
PY=${PY:-.venv/bin/python}
if [ ! -f "$OUT/segmenter/metrics.json" ]; then
  resume=(); [ -f "$OUT/segmenter/last.pt" ] && resume=(--resume "$OUT/segmenter/last.pt")
  $PY -m training.segment --data "$D/ham10000_metadata.csv" --masks "$D/ham10000_masks.csv" --out "$OUT/segmenter" \
    --sizes 128 192 --frozen-epochs 0 --unfrozen-epochs 3 --unfrozen-lr 1e-3 --max-images 800 --batch-size 16 --threads 2 "${resume[@]}"
fi
$PY -m lesionserve segment-evaluate --checkpoint "$OUT/segmenter/checkpoint.pt" --data "$D/ham10000_metadata.csv" \
  --masks "$D/ham10000_masks.csv" --ph2 "$D/ph2_labels.csv" --threads 2 --out "$OUT/eval"
$PY -m export.segmenter_export --checkpoint "$OUT/segmenter/checkpoint.pt" --out "$OUT/segmenter/model.onnx"
$PY -m benchmarks.segment --checkpoint "$OUT/segmenter/checkpoint.pt" --out "$OUT/bench"
