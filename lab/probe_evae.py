"""Probe a stage-1 eVAE during training: how much of the deblurring it can do, with which latent.

For blurry/sharp pairs it prints the mean PSNR (dB, on the top-left crop) of
  * the blurry input,
  * D(E2(sharp), skips(E1(blurry))) -- the stage-1 objective: the decoder with the *sharp* latent,
    an upper bound of what stage 2 can reach with this eVAE;
  * D(E1(blurry), skips(E1(blurry))) -- the decoder with the blurry latent (a UNet that changes
    nothing), the lower end of stage 2.
The gap between the last two is the work left to the one-step UNet.

Usage: python lab/probe_evae.py RUN_OR_MODEL_DIR BLUR_DIR SHARP_DIR [--every 4] [--crop 256]
RUN_OR_MODEL_DIR is a train-vae output folder (its newest checkpoint is used, so this works while
training runs) or a train-vae model folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from probe_common import crops, parse_args, to_pixels, to_tensor

from deblurcli.evaluation.metrics import psnr
from deblurcli.models.evae import EVAE


def load(path: Path) -> EVAE:
    """The newest checkpoint of a train-vae run folder, else a finished eVAE model folder."""
    from safetensors.torch import load_file

    from deblurcli.train.checkpoint import list_checkpoints
    from deblurcli.train.config import VaeTrainConfig, config_from_dict
    from deblurcli.train.vae import build_evae, load_evae

    checkpoints = list_checkpoints(path)
    if not checkpoints:
        return load_evae(path / "model" if (path / "model").is_dir() else path).eval()
    newest = checkpoints[-1][1]
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model = build_evae(config_from_dict(VaeTrainConfig, saved))  # same architecture as the run
    state = load_file(str(newest / "weights-evae.safetensors"))
    model.load_state_dict({k.removeprefix("evae."): v for k, v in state.items()})
    print(f"{newest.name} of {path}")
    return model.eval()


def main() -> None:
    args = parse_args(__doc__)
    model = load(args.run)
    rows = []
    for blur, sharp in crops(args):
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
