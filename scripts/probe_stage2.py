"""Probe a stage-2 run while it trains: PSNR of the one-step model, and how far its latent got.

For blurry/sharp pairs it prints the mean PSNR (dB, on the top-left crop) of the blurry input and
of the model's output, and the latent gap to the sharp latent E2(sharp) -- mean square of
``z_l - E2(sharp)`` (where the UNet starts) and of ``z_h - E2(sharp)`` (where it got). The two can
disagree: a UNet may close much of the latent gap in directions the decoder ignores (measured in
docs/default-model.md), so judge a run by the PSNR.

Usage: python scripts/probe_stage2.py RUN_DIR BLUR_DIR SHARP_DIR [--every 4] [--crop 256]
RUN_DIR is a train-diffusion output folder: its newest checkpoint is used, so this works while
the run trains (with its adapters at the γ the run trains them: γ plays no part with --full).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from deblurcli.images import read_image


def load(path: Path) -> torch.nn.Module:
    """The run's :class:`GeneratorStep` with the weights of its newest checkpoint."""
    from deblurcli.train import checkpoint as ckpt
    from deblurcli.train.config import DiffusionTrainConfig, config_from_dict
    from deblurcli.train.diffusion import GeneratorStep, build_model, set_trainable

    checkpoints = ckpt.list_checkpoints(path)
    if not checkpoints:
        raise SystemExit(f"no checkpoint in {path}")
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config = config_from_dict(DiffusionTrainConfig, saved)
    model = build_model(config)
    set_trainable(model, config)
    step = GeneratorStep(model)
    ckpt.load_trainable_state(step, ckpt.load_checkpoint(checkpoints[-1][1]).weights["unet"])
    print(f"{checkpoints[-1][1].name} of {path}")
    return step.eval()


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    from deblurcli.train.data import to_tensor as one_image

    return one_image(pixels)[None]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("blur", type=Path)
    ap.add_argument("sharp", type=Path)
    ap.add_argument("--every", type=int, default=4, help="use every N-th pair (default 4)")
    ap.add_argument("--crop", type=int, default=256, help="top-left crop side (multiple of 8)")
    args = ap.parse_args()
    step = load(args.run)
    evae = step.model.evae
    rows = []
    for blur_path in sorted(args.blur.glob("*.png"))[:: args.every]:
        c = args.crop
        blur = read_image(blur_path).pixels[:c, :c]
        sharp = read_image(args.sharp / blur_path.name).pixels[:c, :c]
        with torch.no_grad():
            x = to_tensor(blur)
            out, z_h = step(x)
            z_sharp = evae.encode_sharp(to_tensor(sharp))
            z_l = evae.encode(x)[0]
            pixels = ((out[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
            rows.append((psnr(blur, sharp), psnr(pixels, sharp),
                         float(torch.mean((z_l - z_sharp) ** 2)),
                         float(torch.mean((z_h - z_sharp) ** 2))))
    m = np.mean(rows, axis=0)
    print(f"{len(rows)} pairs: input {m[0]:.2f} dB   output {m[1]:.2f} dB ({m[1] - m[0]:+.2f})   "
          f"latent gap z_l {m[2]:.4f} -> z_h {m[3]:.4f} ({100 * (1 - m[3] / m[2]):.1f}% closed)")


if __name__ == "__main__":
    main()
