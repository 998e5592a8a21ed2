#!/usr/bin/env bash
# Reduced CPU run of the ViT melanoma classifier on real data (seed 001's system), from scratch:
# DeiT-Tiny/16 at 224 px, heads ham10000 (melanoma vs rest) and ph2 (3 diagnoses), lesion-grouped
# splits (val 20%, test 25%), 1,500 HAM10000 training images per epoch, 6 epochs (planned 8; cut to
# 6 when the 2 shared cores made an epoch take ~9 min: the gradual run resumed from its epoch-3
# state), the unfreezing schedule compressed (1 head-only epoch, then 6 pieces per epoch), seed
# 001's learning rates x10 (they were set for a pretrained backbone; this one starts random). Then
# the same split, budget and rates all at once. Each evaluated on its test split (threshold from
# validation), attention maps scored against the lesion masks. Resumable.
# Results: training/results/vit_cpu/.
# Usage: training/experiments/vit_cpu.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/vit}
D=${LESIONSERVE_REAL:-../shared/data/isic-real}
PY=${PY:-.venv/bin/python}
COMMON=(--data "ham10000=$D/ham10000_metadata.csv" --data "ph2=$D/ph2_labels.csv"
  --set timm_name=deit_tiny_patch16_224 --set epochs=6 --set batch_size=16 --set head_only_epochs=1
  --set unfreeze_per_epoch=6 --set val_fraction=0.2 --set test_fraction=0.25
  --set 'limits={ham10000: {train: 1500}}'
  --set 'lr={heads: 1.0e-3, blocks: 1.0e-4, norm: 1.0e-5, patch_embed: 1.0e-5, tokens: 1.0e-6}' --no-progress)
for schedule in gradual all_at_once; do
  run="$OUT/$schedule"
  mkdir -p "$run"
  [ "$schedule" = gradual ] || [ -f "$run/splits.json" ] || cp "$OUT/gradual/splits.json" "$run/splits.json"
  if [ ! -f "$run/.done" ]; then
    resume=(); [ -f "$run/last.pt" ] && resume=(--resume)
    $PY -m lesionserve vit-train "${COMMON[@]}" --set schedule=$schedule --out "$run" "${resume[@]}"
    touch "$run/.done"
  fi
done
echo TRAINING DONE
for schedule in gradual all_at_once; do
  run="$OUT/$schedule"
  [ -f "$run/eval/metrics.json" ] || $PY -m lesionserve vit-evaluate --checkpoint "$run/checkpoint.pt" --splits "$run/splits.json" \
    --masks "ham10000=$D/ham10000_masks.csv" --masks "ph2=$D/ph2_labels.csv" --out "$run/eval" --no-progress
done
echo ALL DONE
