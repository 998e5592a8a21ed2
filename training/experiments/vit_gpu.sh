#!/usr/bin/env bash
# Seed 001's full recipe on a GPU (not run here: no GPU was lent): DeiT-Base/16 (ViT-Base) at 224 px,
# heads ham10000 and ph2, 5 head-only epochs then one piece per epoch (25 epochs), seed 001's
# per-group learning rates, batch 8, on the lesion-grouped splits of training/experiments/vit_cpu.sh
# (the whole HAM10000 training split, no limit), then the same evaluation and export.
# From scratch unless PRETRAINED=deit_base_patch16_224.pth (a local timm/DeiT state dict, loaded strictly).
# One prepared command; resumable (--resume picks up <OUT>/gpu/last.pt).
# Usage: training/experiments/vit_gpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/vit}
D=${LESIONSERVE_REAL:-../shared/data/isic-real}
PY=${PY:-.venv/bin/python}
run="$OUT/gpu"
mkdir -p "$run"
extra=(); [ -n "${PRETRAINED:-}" ] && extra=(--pretrained "$PRETRAINED")
resume=(); [ -f "$run/last.pt" ] && resume=(--resume)
$PY -m lesionserve vit-train --data "ham10000=$D/ham10000_metadata.csv" --data "ph2=$D/ph2_labels.csv" \
  --set val_fraction=0.2 --set test_fraction=0.25 --device cuda --out "$run" --no-progress "${extra[@]}" "${resume[@]}"
$PY -m lesionserve vit-evaluate --checkpoint "$run/checkpoint.pt" --splits "$run/splits.json" --out "$run/eval" --device cuda --no-progress
$PY -m lesionserve vit-export --checkpoint "$run/checkpoint.pt" --out "$run/served/model.onnx"
cp "$run/eval/thresholds.json" "$run/served/"
