#!/usr/bin/env bash
# Rebuild examples/: two public-domain / CC0 photos shipped with scikit-image (NASA's "astronaut",
# Stefan van der Walt's cat "chelsea"), blurred by `deblurcli synth` with camera-shake kernels.
# Needs the dev extras (scikit-image). Output is deterministic (fixed seed).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python - "$work/src" <<'PY'
import sys
from pathlib import Path
import numpy as np
from skimage import data
from deblurcli.images import write_image
out = Path(sys.argv[1]); out.mkdir(parents=True)
for name in ("astronaut", "chelsea"):
    write_image(out / f"{name}.png", getattr(data, name)().astype(np.float32) / 255.0)
PY
mkdir -p examples "$work/a" "$work/c"
mv "$work/src/astronaut.png" "$work/a/"; mv "$work/src/chelsea.png" "$work/c/"
# One crop per photo: the whole 512x512 astronaut, the left 296x296 of the 300x451 cat.
deblurcli synth --src "$work/a" --out "$work/pa" --crop 512 --seed 7 --no-noise --max-kernel 31 >/dev/null
deblurcli synth --src "$work/c" --out "$work/pc" --crop 296 --stride 1000 --seed 7 --no-noise \
    --max-kernel 31 --limit 1 >/dev/null
cp "$work/pa/blur/astronaut_c000_k0.png" examples/astronaut_blurry.png
cp "$work/pc/blur/chelsea_c000_k0.png" examples/chelsea_blurry.png
ls -l examples
