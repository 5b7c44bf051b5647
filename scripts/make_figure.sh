#!/usr/bin/env bash
# Make docs/images/before_after.png: a real blurry photo (no ground truth) next to what the default
# model makes of it at gamma 1 and gamma 0.7, same crop, pixels not resampled.
# Usage: scripts/make_figure.sh [PHOTO=../shared/data/val/real_blurry/gopro_seq_id-6_frame-8_Input.png]
#        [TOP=200] [LEFT=440] [SIZE=320] [MODEL=src/deblurcli/weights]
set -euo pipefail
PHOTO=${1:-../shared/data/val/real_blurry/gopro_seq_id-6_frame-8_Input.png}
TOP=${2:-200}; LEFT=${3:-440}; SIZE=${4:-320}; MODEL=${5:-src/deblurcli/weights}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
deblurcli deblur "$PHOTO" "$work/g1" --weights "$MODEL" --gamma 1
deblurcli deblur "$PHOTO" "$work/g07" --weights "$MODEL" --gamma 0.7
name=$(basename "$PHOTO")
python - "$PHOTO" "$work/g1/$name" "$work/g07/$name" "$TOP" "$LEFT" "$SIZE" <<'PY'
import sys
import numpy as np
from deblurcli.images import read_image, write_image
paths, (top, left, size) = sys.argv[1:4], map(int, sys.argv[4:7])
crops = [read_image(p).pixels[top:top + size, left:left + size, :3] for p in paths]
gap = np.ones((size, 8, 3), np.float32)
panel = np.concatenate([crops[0], gap, crops[1], gap, crops[2]], axis=1)
write_image("docs/images/before_after.png", panel)
PY
echo "wrote docs/images/before_after.png (input | gamma 1 | gamma 0.7)"
