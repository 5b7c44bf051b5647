"""What lab/probe_evae.py and probe_stage2.py share: arguments, held-out crops, tensors."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from deblurcli.images import read_image


def parse_args(doc: str) -> argparse.Namespace:
    """``RUN BLUR_DIR SHARP_DIR [--every N] [--crop C]``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("blur", type=Path)
    ap.add_argument("sharp", type=Path)
    ap.add_argument("--every", type=int, default=4, help="use every N-th pair (default 4)")
    ap.add_argument("--crop", type=int, default=256, help="top-left crop side (multiple of 8)")
    return ap.parse_args()


def crops(args: argparse.Namespace) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every ``--every``-th blurry/sharp pair (same file name), top-left ``--crop`` pixels."""
    c = args.crop
    for blur_path in sorted(args.blur.glob("*.png"))[:: args.every]:
        yield (read_image(blur_path).pixels[:c, :c],
               read_image(args.sharp / blur_path.name).pixels[:c, :c])


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    from deblurcli.train.data import to_tensor as one_image

    return one_image(pixels)[None]


def to_pixels(x: torch.Tensor) -> np.ndarray:
    return ((x[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
