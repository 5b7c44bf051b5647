"""Translation alignment of an output to its ground truth (the RealBlur protocol, simplified).

RealBlur's ground truth is not pixel-aligned with the blurry capture, so its official evaluation
first aligns each deblurred image to the ground truth. This module implements:

1. intensity matching, as in the official code: ``z <- (sum(x*z) / sum(z*z)) * z``;
2. an exhaustive search over integer translations ``|dy|, |dx| <= max_shift`` that maximises the
   zero-mean normalised cross-correlation of the grey images over their overlap (computed for all
   shifts at once with an FFT correlation and integral images);
3. cropping both images to the overlap at the best shift.

It differs from the official Python script (``evaluation_RealBlur_ecc.py``), which estimates a
*homography* with OpenCV's ECC (sub-pixel, 100 iterations), warps with cubic interpolation and
scores PSNR/SSIM over a validity mask in the full frame: here the motion is an integer
translation and the scored region is the cropped overlap. Numbers are therefore close to, but not
identical with, published RealBlur tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Alignment:
    """The aligned, cropped images and the shift found.

    ``pred`` is the intensity-matched prediction (clipped to [0, 1]) cropped to the overlap,
    ``ref`` the ground truth cropped to the same region; ``pred_aligned(i, j) = pred(i+dy, j+dx)``.
    """

    pred: np.ndarray
    ref: np.ndarray
    dy: int
    dx: int
    scale: float
    ncc: float
    radius: int = 0  # the search's bound: max_shift, less for a small image


FLAT = 1e-9  # a variance under this share of the mean square: an overlap without detail


def _grey(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    out[1:, 1:] = a.cumsum(0).cumsum(1)
    return out


def _box(integral: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> float:
    return float(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])


def _overlap(n: int, d: int) -> tuple[int, int, int, int]:
    """Ranges [r0, r1) in the reference and [p0, p1) in the prediction for shift ``d``."""
    r0, r1 = max(0, -d), min(n, n - d)
    return r0, r1, r0 + d, r1 + d


def align_to_reference(pred: np.ndarray, ref: np.ndarray, max_shift: int = 10) -> Alignment:
    """Intensity-match ``pred`` to ``ref`` and find the integer translation that aligns them.

    Both are float (H, W, 3) arrays of the same shape. ``max_shift`` bounds the search (pixels);
    it is reduced for tiny images so that the overlap keeps at least half of each side.
    """
    from scipy.signal import fftconvolve

    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    h, w = ref.shape[:2]
    m = int(max(0, min(max_shift, h // 2, w // 2)))
    z = pred.astype(np.float64)
    x = ref.astype(np.float64)
    zz = float(np.sum(z * z))
    scale = float(np.sum(x * z) / zz) if zz > 0 else 1.0
    zs = scale * z
    a, b = _grey(x), _grey(zs)
    # cross[dy, dx] = sum_i a(i) * b(i + d): correlate b with a.
    full = fftconvolve(b, a[::-1, ::-1], mode="full")
    ia, ib = _integral(a), _integral(b)
    ia2, ib2 = _integral(a * a), _integral(b * b)
    best = (-np.inf, 0, 0)
    shifts = sorted(((dy, dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)),
                    key=lambda s: (abs(s[0]) + abs(s[1]), s))  # ties go to the smaller shift
    for dy, dx in shifts:
        ry0, ry1, py0, py1 = _overlap(h, dy)
        rx0, rx1, px0, px1 = _overlap(w, dx)
        n = (ry1 - ry0) * (rx1 - rx0)
        cross = float(full[dy + h - 1, dx + w - 1])
        sa, sb = _box(ia, ry0, ry1, rx0, rx1), _box(ib, py0, py1, px0, px1)
        qa, qb = _box(ia2, ry0, ry1, rx0, rx1), _box(ib2, py0, py1, px0, px1)
        va, vb = qa - sa * sa / n, qb - sb * sb / n
        # a flat overlap has no shift to find; its variance is the rounding left of qa - sa²/n
        flat = va <= FLAT * qa or vb <= FLAT * qb
        ncc = -np.inf if flat else (cross - sa * sb / n) / np.sqrt(va * vb)
        if ncc > best[0] + 1e-12:
            best = (ncc, dy, dx)
    ncc, dy, dx = best
    ry0, ry1, py0, py1 = _overlap(h, dy)
    rx0, rx1, px0, px1 = _overlap(w, dx)
    pred_c = np.clip(zs[py0:py1, px0:px1], 0.0, 1.0).astype(np.float32)
    ref_c = ref[ry0:ry1, rx0:rx1].astype(np.float32)
    return Alignment(pred_c, ref_c, dy, dx, scale, float(ncc) if np.isfinite(ncc) else float("nan"),
                     radius=m)
