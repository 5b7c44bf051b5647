"""Calibrate the issue-6 bar: how far does a plain pixel-space CNN get on this CPU in a fixed time?

Not part of deblurcli and not the OSDD method. It trains the easiest model we know for the same
task -- a small residual U-Net working on pixels (no latent, no eVAE, no diffusion step) -- on the
same synthetic pairs, batch and crop as the compact recipe, for a fixed wall-clock budget, and
prints held-out PSNR as it goes. If even this model cannot raise the held-out set by the bar's
margin within a session, no compact latent model trained the same way will (it spends more compute
per pixel on a harder problem); docs/default-model.md records the result.

Usage: python lab/calibrate_pixel_cnn.py TRAIN_DIR TEST_DIR [--minutes 40] [--width 32]
    [--batch 8] [--crop 128] [--lr 1e-3] [--cosine] [--every-steps 250] [--max-steps N] [--seed 0]
TRAIN_DIR and TEST_DIR hold blur/ and sharp/ (as `deblurcli synth` writes them). Progress is
PSNR on the probe crops (every 4th test pair, top-left 256², as lab/probe_stage2.py); at the
end the whole test set is measured at full size.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from deblurcli.evaluation.metrics import psnr
from deblurcli.train.data import PairedDataset, synth_pairs
from probe_common import crops, to_pixels, to_tensor


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GELU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GELU())


class PixelUNet(nn.Module):
    """Three-level residual U-Net on ``[-1, 1]`` pixels: ``out = x + f(x)``, ``f`` starting at zero."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = (width, 2 * width, 4 * width)
        self.enc = nn.ModuleList([block(3, w[0]), block(w[0], w[1]), block(w[1], w[2])])
        self.down = nn.ModuleList([nn.Conv2d(w[0], w[0], 2, stride=2), nn.Conv2d(w[1], w[1], 2, stride=2)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[2], w[1], 2, stride=2),
                                 nn.ConvTranspose2d(w[1], w[0], 2, stride=2)])
        self.dec = nn.ModuleList([block(2 * w[1], w[1]), block(2 * w[0], w[0])])
        self.out = nn.Conv2d(w[0], 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc[0](x)
        e1 = self.enc[1](self.down[0](e0))
        e2 = self.enc[2](self.down[1](e1))
        d1 = self.dec[0](torch.cat([self.up[0](e2), e1], 1))
        d0 = self.dec[1](torch.cat([self.up[1](d1), e0], 1))
        return x + self.out(d0)


def evaluate(model: nn.Module, test: Path, *, every: int, crop: int | None) -> tuple[float, float]:
    """Mean PSNR of the input and of the model's output on every ``every``-th test pair
    (top-left ``crop`` pixels, or the whole image)."""
    rows = []
    with torch.no_grad():
        for blur, sharp in crops(argparse.Namespace(blur=test / "blur", sharp=test / "sharp",
                                                    every=every, crop=crop)):
            rows.append((psnr(blur, sharp), psnr(to_pixels(model(to_tensor(blur))), sharp)))
    m = np.mean(rows, axis=0)
    return float(m[0]), float(m[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train", type=Path)
    ap.add_argument("test", type=Path)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cosine", action="store_true", help="decay the lr to 0 over --minutes")
    ap.add_argument("--every-steps", type=int, default=250)
    ap.add_argument("--max-steps", type=int, default=None, help="stop earlier after this many steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    items, problems = synth_pairs(args.train)
    if problems:
        raise SystemExit(f"{args.train}: {problems[0]}")
    # The recipe's own sampler: epoch permutations, random crop, flips and 90° turns.
    data = PairedDataset(items, crop=args.crop, seed=args.seed)
    n_test = len(list((args.test / "blur").glob("*.png")))
    model = PixelUNet(args.width)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"{len(items)} training pairs, {n_test} test pairs, "
          f"{params / 1e6:.2f} M parameters, {torch.get_num_threads()} threads", flush=True)

    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < 60 * args.minutes and step != args.max_steps:
        batch = [data[step * args.batch + i] for i in range(args.batch)]
        if args.cosine:
            done = (time.perf_counter() - start) / (60 * args.minutes)
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        blur = torch.stack([b["blur"] for b in batch])
        sharp = torch.stack([b["sharp"] for b in batch])
        loss = F.mse_loss(model(blur), sharp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % args.every_steps == 0:
            model.eval()
            inp, out = evaluate(model, args.test, every=4, crop=256)
            model.train()
            elapsed = time.perf_counter() - start
            print(f"step {step}  {elapsed / 60:.1f} min  {elapsed / step:.2f} s/step  "
                  f"probe: input {inp:.2f} dB  output {out:.2f} dB ({out - inp:+.2f})", flush=True)
    model.eval()
    inp, out = evaluate(model, args.test, every=1, crop=None)
    print(f"end, step {step}: whole test set ({n_test} pairs): input {inp:.2f} dB  "
          f"output {out:.2f} dB ({out - inp:+.2f})", flush=True)


if __name__ == "__main__":
    main()
