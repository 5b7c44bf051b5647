"""Probe a stage-1 eVAE during training: how much of the deblurring it can do, with which latent.

For blurry/sharp pairs it prints the mean PSNR (dB, on the top-left crop) of
  * the blurry input,
  * D(E2(sharp), skips(E1(blurry))) -- the stage-1 objective: the decoder with the *sharp* latent,
    an upper bound of what stage 2 can reach with this eVAE;
  * D(E1(blurry), skips(E1(blurry))) -- the decoder with the blurry latent (a UNet that changes
    nothing), the lower end of stage 2.
The gap between the last two is the work left to the one-step UNet.

Usage: python scripts/probe_evae.py RUN_OR_MODEL_DIR BLUR_DIR SHARP_DIR [--every 4] [--crop 256]
RUN_OR_MODEL_DIR is a train-vae output folder (its newest checkpoint is used, so this works while
training runs) or a train-vae model folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from deblurcli.images import read_image
from deblurcli.models.evae import EVAE


def load(path: Path) -> EVAE:
    """The newest checkpoint of a train-vae run folder, else a finished eVAE model folder."""
    from safetensors.torch import load_file

    from deblurcli.train.config import VaeTrainConfig, config_from_dict
    from deblurcli.train.vae import build_evae, load_evae

    checkpoints = sorted((path / "checkpoints").glob("step-*"))
    if not checkpoints:
        return load_evae(path / "model" if (path / "model").is_dir() else path).eval()
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model = build_evae(config_from_dict(VaeTrainConfig, saved))  # same architecture as the run
    state = load_file(str(checkpoints[-1] / "weights-evae.safetensors"))
    model.load_state_dict({k.removeprefix("evae."): v for k, v in state.items()})
    print(f"{checkpoints[-1].name} of {path}")
    return model.eval()


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    from deblurcli.train.data import to_tensor as one_image

    return one_image(pixels)[None]


def to_pixels(x: torch.Tensor) -> np.ndarray:
    return ((x[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


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
    model = load(args.run)
    rows = []
    for blur_path in sorted(args.blur.glob("*.png"))[:: args.every]:
        c = args.crop
        blur = read_image(blur_path).pixels[:c, :c]
        sharp = read_image(args.sharp / blur_path.name).pixels[:c, :c]
        with torch.no_grad():
            z_blur, skips = model.encode(to_tensor(blur))
            z_sharp = model.encode_sharp(to_tensor(sharp))
            rows.append((psnr(blur, sharp), psnr(to_pixels(model.decode(z_sharp, skips)), sharp),
                         psnr(to_pixels(model.decode(z_blur, skips)), sharp)))
    mean = np.mean(rows, axis=0)
    print(f"{len(rows)} pairs: input {mean[0]:.2f} dB   D(E2 sharp latent) {mean[1]:.2f} dB   "
          f"D(E1 blurry latent) {mean[2]:.2f} dB")


if __name__ == "__main__":
    main()
