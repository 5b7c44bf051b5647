"""Trajectory -> blur kernel (PSF) with sub-pixel bilinear splatting and an exposure fraction.

Only the first ``exposure`` fraction of the trajectory is integrated (the shutter closes before
the camera stops moving): ``m = max(2, round(exposure · N))`` samples. Their mean is moved to the
centre pixel of an odd-sized square kernel and each sample deposits weight ``1/m`` on its four
neighbouring pixels with bilinear weights. Bilinear splatting preserves the first moment, so the
kernel's centre of mass is *exactly* its centre pixel: blurring with it does not shift content
(sharp and blurred images stay aligned on average).

The kernel size follows the trajectory's extent: ``size = 2·(ceil(r) + 1) + 1`` where ``r`` is the
largest |coordinate| of the centred samples, clamped to ``[1, max_size]``; a trajectory too large for
``max_size`` is scaled down uniformly to fit (recorded as ``scale`` in the metadata).
"""

from __future__ import annotations

import math

import numpy as np


def kernel_from_trajectory(
    trajectory: np.ndarray, *, exposure: float = 1.0, max_size: int = 65
) -> tuple[np.ndarray, dict]:
    """Rasterise a complex trajectory (pixels) into a normalised float32 kernel.

    Args:
        trajectory: complex positions ``(N,)``, ``re`` = x (columns), ``im`` = y (rows).
        exposure: fraction in ``(0, 1]`` of the trajectory integrated by the shutter.
        max_size: largest kernel side (odd, >= 3); bigger trajectories are scaled down to fit.

    Returns:
        ``(kernel, meta)``: kernel float32 ``(S, S)``, S odd, non-negative, sums to 1 with its
        centre of mass on the centre pixel; meta ``{"size", "exposure_samples", "scale"}``.
    """
    if not 0.0 < exposure <= 1.0:
        raise ValueError(f"exposure must be in (0, 1], got {exposure}")
    if max_size < 3 or max_size % 2 == 0:
        raise ValueError(f"max_size must be odd and >= 3, got {max_size}")
    traj = np.asarray(trajectory, dtype=np.complex128).ravel()
    if traj.size == 0:
        raise ValueError("empty trajectory")
    m = min(traj.size, max(2, round(exposure * traj.size))) if traj.size > 1 else 1
    pts = traj[:m] - traj[:m].mean()
    xs, ys = pts.real.copy(), pts.imag.copy()
    r = float(max(np.abs(xs).max(), np.abs(ys).max()))
    max_half = max_size // 2
    scale = 1.0
    if r > max_half - 1:
        scale = (max_half - 1) / r
        xs *= scale
        ys *= scale
        r = max_half - 1
    if r < 1e-9:
        kernel = np.ones((1, 1), dtype=np.float32)
        return kernel, {"size": 1, "exposure_samples": int(m), "scale": scale}
    half = min(max_half, math.ceil(r) + 1)
    size = 2 * half + 1
    cx, cy = xs + half, ys + half
    x0 = np.floor(cx).astype(np.int64)
    y0 = np.floor(cy).astype(np.int64)
    fx, fy = cx - x0, cy - y0
    k = np.zeros((size, size), dtype=np.float64)
    w = 1.0 / m
    np.add.at(k, (y0, x0), (1 - fx) * (1 - fy) * w)
    np.add.at(k, (y0, x0 + 1), fx * (1 - fy) * w)
    np.add.at(k, (y0 + 1, x0), (1 - fx) * fy * w)
    np.add.at(k, (y0 + 1, x0 + 1), fx * fy * w)
    k = np.clip(k, 0.0, None)
    k /= k.sum()
    return k.astype(np.float32), {
        "size": int(size),
        "exposure_samples": int(m),
        "scale": round(float(scale), 6),
    }


def kernel_centroid(kernel: np.ndarray) -> tuple[float, float]:
    """Centre of mass ``(row, col)`` of a kernel, relative to its centre pixel."""
    k = np.asarray(kernel, dtype=np.float64)
    rows, cols = np.indices(k.shape)
    total = k.sum()
    return (
        float((rows * k).sum() / total - (k.shape[0] - 1) / 2),
        float((cols * k).sum() / total - (k.shape[1] - 1) / 2),
    )
