#!/usr/bin/env bash
# Seed 000's full recipe on a GPU (not run here: no GPU was lent): yolo11s.yaml from scratch (add
# --pretrained yolo11s.pt for a local COCO checkpoint), imgsz 640, 80 epochs, batch 32, on the
# mask-box dataset of training/experiments/detector_cpu.sh, then the same evaluation, export and maps.
# One prepared command; resumable (--resume picks up <OUT>/yolo_gpu/train/weights/last.pt).
# Usage: training/experiments/detector_gpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/det}
D=${LESIONSERVE_REAL:-../shared/data/isic-real}
PY=${PY:-.venv/bin/python}
[ -f "$OUT/data_masks/data.yaml" ] || training/experiments/detector_cpu.sh "$OUT"   # datasets (and the CPU run)
resume=(); [ -f "$OUT/yolo_gpu/train/weights/last.pt" ] && resume=(--resume)
$PY -m lesionserve detect-train --data "$OUT/data_masks/data.yaml" --out "$OUT/yolo_gpu" --device 0 "${resume[@]}"
W="$OUT/yolo_gpu/train/weights/best.pt"
$PY -m lesionserve detect-evaluate --weights "$W" --split test --data masks="$OUT/data_masks/data.yaml" \
  --data saliency="$OUT/data_saliency/data.yaml" --out "$OUT/eval_gpu"
$PY -m lesionserve detect-export --weights "$W" --out "$OUT/served_gpu/model.onnx" --imgsz 640
$PY -m lesionserve detect-maps --weights "$W" --onnx "$OUT/served_gpu/model.onnx" --data "$OUT/data_masks" --split test \
  --masks "$D/ham10000_masks.csv" --images 200 --out "$OUT/maps_gpu"
