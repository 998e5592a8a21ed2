#!/usr/bin/env bash
# Crop-guided classification on real HAM10000 (seed 004's CropBest), reduced for CPU: the same
# recipe, split and budget as training/experiments/ham10000_cam.sh (from scratch, 128 px, 150 images
# per class, lesion-grouped), but every image cut to its lesion box as the served segmenter finds it
# (runs/seg_real: training/experiments/segmenter_cpu.sh), plus the CROP_MARGIN margin.
# Then calibration and the side-by-side evaluation: whole-image models and crop models, each on whole
# images and on crops, on the same test split (lesionserve evaluate --crop-boxes / --no-crop).
# Resumable: rerun after an interruption. Results: training/results/crop_cpu/, training/RESULTS.md.
# Usage: training/experiments/crop_cpu.sh [OUT] [WHOLE_ARTIFACTS]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/crop_real}
WHOLE=${2:-runs/ham_cam}
SEG=${SEG:-runs/seg_real/segmenter/checkpoint.pt}
D=${LESIONSERVE_REAL:-../shared/data/isic-real}
PY=${PY:-.venv/bin/python}
SPLITS=$WHOLE/splits.csv
[ -f "$OUT/boxes.csv" ] || $PY -m lesionserve crop-boxes --splits "$SPLITS" --segmenter "$SEG" --out "$OUT/boxes.csv" --threads 2
for spec in resnet50:8 densenet121:6 efficientnet_b3:5; do
  b=${spec%%:*}; e=${spec##*:}; m=crop_$b
  if [ -f "$OUT/$m/checkpoint.pt" ] && [ -f "$OUT/$m/.done" ]; then continue; fi
  resume=(); [ -f "$OUT/$m/last.pt" ] && resume=(--resume "$OUT/$m/last.pt")
  $PY -m training.train --backbone "$b" --data "$D/ham10000_metadata.csv" --layout ham10000 --out "$OUT/$m" \
    --splits "$SPLITS" --crop-boxes "$OUT/boxes.csv" --profile from_scratch --input-size 128 --max-images-per-class 150 \
    --epochs "$e" --batch-size 32 --threads 2 "${resume[@]}"
  touch "$OUT/$m/.done"
done
echo TRAINING DONE
[ -f "$OUT/calibration.json" ] || $PY -m training.calibrate --artifacts "$OUT" --views 2 --pipeline lesion_crop_classify
# The 2 x 2: {whole-image models, crop models} x {whole images, crops}, one test split, T=2.
EVAL=(--split test --views 2 --bootstrap 1000 --threads 2 --no-progress)
evaluate() { local out=$1; shift; [ -f "$out/metrics.json" ] || $PY -m training.evaluate "$@" "${EVAL[@]}" --out "$out"; }
evaluate "$OUT/eval_whole_models_whole_images" --artifacts "$WHOLE" --no-crop
evaluate "$OUT/eval_whole_models_crops" --artifacts "$WHOLE" --crop-boxes "$OUT/boxes.csv"
evaluate "$OUT/eval_crop_models_whole_images" --artifacts "$OUT" --pipeline lesion_crop_classify --no-crop
evaluate "$OUT/eval_crop_models_crops" --artifacts "$OUT" --pipeline lesion_crop_classify
echo ALL DONE
