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


def lowpass(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an ``(H, W, C)`` array over its two spatial axes.

    Borders are mirrored with the edge pixel repeated (numpy's ``symmetric``, scipy's
    ``reflect``), so the result equals ``scipy.ndimage.gaussian_filter(pixels, (s, s, 0))``.
    Runs as one separable float32 filter in OpenCV over the padded array (no torch: the ONNX
    Runtime path imports none).
    """
    import cv2

    if pixels.ndim != 3:
        raise ValueError(f"expected an (H, W, C) array, got shape {pixels.shape}")
    kernel = gaussian_kernel1d(sigma)
    radius = len(kernel) // 2
    height, width, channels = pixels.shape
    padded = np.pad(np.asarray(pixels, dtype=np.float32),
                    ((radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    out = np.empty_like(padded)
    for c in range(0, channels, 4):  # OpenCV filters up to 4 channels at a time
        part = np.ascontiguousarray(padded[:, :, c:c + 4])
        filtered = cv2.sepFilter2D(part, cv2.CV_32F, kernel, kernel,
                                   borderType=cv2.BORDER_REFLECT)
        out[:, :, c:c + 4] = filtered.reshape(part.shape)
    # the padding holds every tap of the interior: the border mode never reaches it
    return np.ascontiguousarray(out[radius:radius + height, radius:radius + width])


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
