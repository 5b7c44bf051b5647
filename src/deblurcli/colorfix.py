"""Colour fix: give the output the blurry input's lowest spatial frequencies.

Motion blur moves detail, not the average colour of a neighbourhood: a Gaussian low-pass of a
blurry photo and of its sharp original are nearly equal. A one-step latent model, on the other
hand, can drift in colour or brightness (its VAE decoder and the single denoising step are only
approximately colour-preserving). One-step SD restoration code therefore often re-imposes the
input's low frequencies after decoding; this module does that with a Gaussian split:

    fixed = output + G_sigma(input - output)        (= output - G(output) + G(input))

which keeps every frequency well above ``1 / sigma`` from the model and takes the rest from the
input. ``sigma`` is in pixels of the full image; larger values trust the model with more of the
low frequencies. Pure functions on float32 ``(H, W, C)`` arrays in ``[0, 1]``.
"""

from __future__ import annotations

import math

import numpy as np

TRUNCATE = 4.0  # kernel radius in sigmas (as scipy.ndimage.gaussian_filter)


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` (radius ``round(4 * sigma)``)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def axis_kernel(sigma: float, n: int) -> np.ndarray:
    """The Gaussian of :func:`gaussian_kernel1d` as it acts on an axis of ``n`` samples
    mirrored at both ends: folded onto one period of the mirrored signal (``2n`` samples), so
    that it is at most ``2n + 1`` taps long whatever ``sigma``. A kernel that fits (radius
    under ``n``) is returned as it is; from ``sigma >= 2n`` on the folded Gaussian is flat to
    float precision (its first harmonic is ``exp(-2 pi^2 sigma^2 / (2n)^2)``) and the axis's
    mean is taken: scipy's kernel, cut at 4 sigma, is less flat (up to 1.2e-5 of the range
    apart, measured on a ramp)."""
    period = 2 * n
    if sigma >= period:
        folded = np.full(period + 1, 1.0 / period)
        folded[[0, -1]] /= 2  # offsets -n and +n: one sample of the period, shared
        return folded.astype(np.float32)
    kernel = gaussian_kernel1d(sigma).astype(np.float64)
    radius = len(kernel) // 2
    if radius < n:
        return kernel.astype(np.float32)
    folded = np.zeros(period + 1)
    offsets = (np.arange(-radius, radius + 1) + n) % period  # 0 .. 2n-1: offset + n
    np.add.at(folded, offsets, kernel)
    folded[0] /= 2  # offset -n is offset +n too: half each keeps the kernel symmetric
    folded[-1] = folded[0]
    return folded.astype(np.float32)


def lowpass(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an ``(H, W, C)`` array over its two spatial axes.

    Borders are mirrored with the edge pixel repeated (numpy's ``symmetric``, scipy's
    ``reflect``), so the result equals ``scipy.ndimage.gaussian_filter(pixels, (s, s, 0))``
    (for a sigma under twice the side: see :func:`axis_kernel` for wider ones).
    Runs as one separable float32 filter in OpenCV over the padded array (no torch: the ONNX
    Runtime path imports none); a kernel wider than the image is folded onto it
    (:func:`axis_kernel`), so that the cost never grows past that of a kernel the image's size.
    """
    import cv2

    if pixels.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {pixels.shape}")
    height, width, channels = pixels.shape
    ky, kx = axis_kernel(sigma, height), axis_kernel(sigma, width)
    ry, rx = len(ky) // 2, len(kx) // 2
    padded = np.pad(np.asarray(pixels, dtype=np.float32),
                    ((ry, ry), (rx, rx), (0, 0)), mode="symmetric")
    out = np.empty_like(padded)
    for c in range(0, channels, 4):  # OpenCV filters up to 4 channels at a time
        part = np.ascontiguousarray(padded[:, :, c:c + 4])
        filtered = cv2.sepFilter2D(part, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT)
        out[:, :, c:c + 4] = filtered.reshape(part.shape)
    # the padding holds every tap of the interior: the border mode never reaches it
    return np.ascontiguousarray(out[ry:ry + height, rx:rx + width])


def color_fix(output: np.ndarray, source: np.ndarray, sigma: float) -> np.ndarray:
    """``output`` with the low frequencies (Gaussian ``sigma`` px) of ``source``, clipped to
    ``[0, 1]``. Both are float32 ``(H, W, C)`` arrays of the same shape; ``output`` is not
    changed."""
    if output.shape != source.shape:
        raise ValueError(f"output {output.shape} and source {source.shape} differ in shape")
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a positive number of pixels, got {sigma}")
    fixed = lowpass(np.asarray(source, dtype=np.float32) - output, sigma)
    fixed += output
    np.clip(fixed, 0.0, 1.0, out=fixed)
    return fixed
