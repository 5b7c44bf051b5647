"""Probe a model folder for low-frequency drift: PSNR as is, and with the input's low frequencies.

For each blurry/sharp pair it deblurs the whole image once (512/64 tiles, float32, CPU) and prints
the mean PSNR (dB) of the input, of the output, and of the output colour-fixed at each of the given
Gaussian sigmas (pixels) -- what ``deblurcli deblur --color-fix SIGMA`` writes, without running the
model once per sigma. Motion blur leaves the lowest frequencies of a photo nearly unchanged, so
when the last numbers beat the output's, the model drifts in colour or brightness rather than
(only) missing detail.

Usage: python lab/probe_color_fix.py MODEL_DIR BLUR_DIR SHARP_DIR [--gamma 1] [--every 1]
       [--sigmas 2,4,8,16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from deblurcli.evaluation.metrics import psnr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("blur", type=Path)
    ap.add_argument("sharp", type=Path)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--every", type=int, default=1, help="use every N-th pair (default 1)")
    ap.add_argument("--sigmas", default="2,4,8,16", help="Gaussian sigmas in pixels")
    args = ap.parse_args()
    from deblurcli.colorfix import color_fix
    from deblurcli.images import read_image
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.pipeline import DeblurPipeline

    sigmas = [float(s) for s in args.sigmas.split(",")]
    model = load_model_folder(args.model, device="cpu", gamma=args.gamma)
    pipe = DeblurPipeline(model, device="cpu", dtype=torch.float32, tile=512, overlap=64)
    rows = []
    for path in sorted(args.blur.glob("*.png"))[:: args.every]:
        blur = read_image(path).pixels[..., :3]
        sharp = read_image(args.sharp / path.name).pixels[..., :3]
        out = pipe(blur)
        row = [psnr(blur, sharp), psnr(out, sharp)]
        row += [psnr(color_fix(out, blur, s), sharp) for s in sigmas]
        rows.append(row)
    mean = np.mean(rows, axis=0)
    fixed = "   ".join(f"sigma {s:g}: {v:.2f}" for s, v in zip(sigmas, mean[2:], strict=True))
    print(f"{len(rows)} pairs at gamma {args.gamma:g}: input {mean[0]:.2f} dB   output "
          f"{mean[1]:.2f} dB   with the input's low frequencies: {fixed}")


if __name__ == "__main__":
    main()
