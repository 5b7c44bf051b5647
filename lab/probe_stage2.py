"""Probe a stage-2 run while it trains: PSNR of the one-step model, and how far its latent got.

For blurry/sharp pairs it prints the mean PSNR (dB, on the top-left crop) of the blurry input and
of the model's output, and the latent gap to the sharp latent E2(sharp) -- mean square of
``z_l - E2(sharp)`` (where the UNet starts) and of ``z_h - E2(sharp)`` (where it got). The two can
disagree: a UNet may close much of the latent gap in directions the decoder ignores (measured in
docs/default-model.md), so judge a run by the PSNR.

Usage: python lab/probe_stage2.py RUN_DIR BLUR_DIR SHARP_DIR [--every 4] [--crop 256]
RUN_DIR is a train-diffusion output folder: its newest checkpoint is used, so this works while
the run trains (with its adapters at the γ the run trains them: γ plays no part with --full).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from probe_common import crops, parse_args, to_pixels, to_tensor

from deblurcli.evaluation.metrics import psnr


def load(path: Path) -> torch.nn.Module:
    """The run's :class:`GeneratorStep` with the weights of its newest checkpoint."""
    from deblurcli.train import checkpoint as ckpt
    from deblurcli.train.diffusion import GeneratorStep
    from deblurcli.train.export import checkpoint_model

    checkpoints = ckpt.list_checkpoints(path)
    if not checkpoints:
        raise SystemExit(f"no checkpoint in {path}")
    print(f"{checkpoints[-1][1].name} of {path}")
    return GeneratorStep(checkpoint_model(checkpoints[-1][1]).model).eval()


def main() -> None:
    args = parse_args(__doc__)
    step = load(args.run)
    evae = step.model.evae
    rows = []
    for blur, sharp in crops(args):
        with torch.no_grad():
            x = to_tensor(blur)
            out, z_h = step(x)
            z_sharp = evae.encode_sharp(to_tensor(sharp))
            z_l = evae.encode(x)[0]
            rows.append((psnr(blur, sharp), psnr(to_pixels(out), sharp),
                         float(torch.mean((z_l - z_sharp) ** 2)),
                         float(torch.mean((z_h - z_sharp) ** 2))))
    m = np.mean(rows, axis=0)
    print(f"{len(rows)} pairs: input {m[0]:.2f} dB   output {m[1]:.2f} dB ({m[1] - m[0]:+.2f})   "
          f"latent gap z_l {m[2]:.4f} -> z_h {m[3]:.4f} ({100 * (1 - m[3] / m[2]):.1f}% closed)")


if __name__ == "__main__":
    main()
