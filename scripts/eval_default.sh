#!/usr/bin/env bash
# Measure the default model the way docs/default-model.md and the README report it.
# Usage: scripts/eval_default.sh [MODEL_DIR=src/deblurcli/weights] [DATA_DIR=../shared/data]
#        [WORK_DIR=runs/default] [OUT_DIR=runs/eval-default]
# The held-out synthetic set (WORK_DIR/synth_kodak24, from kodak24, which no recipe trains on)
# is made here on the first run and reused afterwards.
# EVAL_FLAGS adds run options to every eval, e.g. EVAL_FLAGS="--color-fix 2".
set -euo pipefail
# shellcheck disable=SC2206  # EVAL_FLAGS may hold several flags
FLAGS=(${EVAL_FLAGS:-})
MODEL=${1:-src/deblurcli/weights}
DATA=${2:-../shared/data}
WORK=${3:-runs/default}
OUT=${4:-runs/eval-default}
mkdir -p "$OUT"
# Held-out synthetic trajectory blur (kodak24, never trained on): PSNR/SSIM at gamma 1 and 0.7.
deblurcli synth --src "$DATA/sharp/kodak24" --out "$WORK/synth_kodak24" --crop 512 --stride 1024 \
    --seed 2026 --workers 2
deblurcli eval --blur "$WORK/synth_kodak24/blur" --sharp "$WORK/synth_kodak24/sharp" \
    --weights "$MODEL" --gamma 1,0.7 --metrics psnr,ssim "${FLAGS[@]}" --out "$OUT/synthetic_kodak24"
# Real frame-averaged GoPro pairs (not overlapping the training frames).
deblurcli eval --blur "$DATA/val/gopro_avg/blur" --sharp "$DATA/val/gopro_avg/sharp" \
    --weights "$MODEL" --gamma 1,0.7 --metrics psnr,ssim "${FLAGS[@]}" --out "$OUT/gopro_avg"
# Real blurry photos without ground truth: NIQE (offline parameters from shared/metric-weights).
deblurcli eval --blur "$DATA/val/real_blurry" --weights "$MODEL" --gamma 1,0.7 --metrics niqe "${FLAGS[@]}" \
    --metric-weights "$DATA/../metric-weights" --out "$OUT/real_blurry"
