#!/usr/bin/env bash
# Reduced CPU run of the YOLO11s lesion detector on real HAM10000 (seed 000's system), from scratch:
# one lesion-grouped split of the 5,123 masked images, the same images labelled twice (the expert
# masks' boxes, and seed 000's saliency boxes), trained on the mask boxes at 224 px (the images'
# size here) on a 15% random sample of the class-balanced training list per epoch, then evaluated
# on the test split against both label sets. Resumable. Results: training/results/detector_cpu/.
# Usage: training/experiments/detector_cpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/det}
D=${LESIONSERVE_REAL:-../shared/data/isic-real}
PY=${PY:-.venv/bin/python}
for src in masks saliency; do
  extra=(); [ "$src" = saliency ] && extra=(--masked-only)
  [ -f "$OUT/data_$src/data.yaml" ] || $PY -m lesionserve detect-dataset --data "$D/ham10000_metadata.csv" \
    --masks "$D/ham10000_masks.csv" --boxes "$src" "${extra[@]}" --splits "$OUT/splits.csv" --out "$OUT/data_$src" --no-progress
done
if [ ! -f "$OUT/yolo/.done" ]; then
  resume=(); [ -f "$OUT/yolo/train/weights/last.pt" ] && resume=(--resume)
  $PY -m lesionserve detect-train --data "$OUT/data_masks/data.yaml" --out "$OUT/yolo" --imgsz 224 --epochs 6 \
    --batch 16 --fraction 0.15 "${resume[@]}"
  touch "$OUT/yolo/.done"
fi
echo TRAINING DONE
W="$OUT/yolo/train/weights/best.pt"
[ -f "$OUT/eval/detector_eval.json" ] || $PY -m lesionserve detect-evaluate --weights "$W" --split test \
  --data masks="$OUT/data_masks/data.yaml" --data saliency="$OUT/data_saliency/data.yaml" --out "$OUT/eval"
[ -f "$OUT/served/model.onnx" ] || $PY -m lesionserve detect-export --weights "$W" --out "$OUT/served/model.onnx" --imgsz 224
[ -f "$OUT/maps/detector_maps.json" ] || $PY -m lesionserve detect-maps --weights "$W" --onnx "$OUT/served/model.onnx" \
  --data "$OUT/data_masks" --split test --masks "$D/ham10000_masks.csv" --images 100 --out "$OUT/maps"
echo ALL DONE
