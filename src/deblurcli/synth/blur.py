"""Applying blur kernels in linear light, plus optional noise and JPEG.

The sRGB image is decoded to linear light (IEC 61966-2-1 transfer curve), convolved with the
kernel (FFT convolution, float32), re-encoded to sRGB and clipped to ``[0, 1]`` (never stretched).

Boundaries: the kernel is applied to a *larger* region — the real neighbouring pixels of the source
image where they exist, reflect padding beyond the image edge — and the result is cropped back
("valid" convolution). Borders are therefore neither darkened (no zero padding) nor shifted, and with
an odd kernel whose centre of mass is its centre pixel (see :mod:`deblurcli.synth.psf`) the sharp
and blurred images stay pixel-aligned.

Degradations after blurring (each optional, drawn per sample by :func:`degrade`):

* Poisson (shot) noise in linear light: ``y = Poisson(x·P)/P`` with photon count ``P``;
* Gaussian noise in sRGB: ``y = x + σ·n``;
* JPEG re-compression at a random quality.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np

from deblurcli.synth.psf import kernel_from_trajectory
from deblurcli.synth.trajectory import (
    TrajectoryRanges,
    make_trajectory,
    sample_trajectory_params,
)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in ``[0, 1]`` -> linear light (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return np.where(
        x <= 0.04045, x / 12.92, np.power((np.maximum(x, 0.04045) + 0.055) / 1.055, 2.4)
    ).astype(np.float32)


def linear_to_srgb(y: np.ndarray) -> np.ndarray:
    """Linear light -> sRGB-encoded values (float32; input is clipped to ``[0, 1]`` first)."""
    y = np.clip(np.asarray(y, dtype=np.float32), 0.0, 1.0)
    return np.where(
        y <= 0.0031308, y * 12.92, 1.055 * np.power(np.maximum(y, 0.0031308), 1.0 / 2.4) - 0.055
    ).astype(np.float32)


def is_delta(kernel: np.ndarray) -> bool:
    """True for a kernel whose only non-zero tap is its centre pixel."""
    k = np.asarray(kernel)
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        return False
    c = (k.shape[0] // 2, k.shape[1] // 2)
    return bool(k[c] != 0 and np.count_nonzero(k) == 1)


def _check_kernel(kernel: np.ndarray) -> np.ndarray:
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"kernel must be 2-D with odd sides, got shape {k.shape}")
    return k


def extract_region(
    image: np.ndarray, box: tuple[int, int, int, int], margin: tuple[int, int]
) -> np.ndarray:
    """Cut ``box = (x, y, w, h)`` grown by ``margin = (my, mx)`` from ``image``.

    Pixels outside the image come from reflect padding (``numpy.pad(mode="reflect")``, repeated if
    the margin is larger than the image).
    """
    x, y, w, h = box
    my, mx = margin
    H, W = image.shape[:2]
    y0, y1, x0, x1 = y - my, y + h + my, x - mx, x + w + mx
    cy0, cy1, cx0, cx1 = max(0, y0), min(H, y1), max(0, x0), min(W, x1)
    region = image[cy0:cy1, cx0:cx1]
    pads = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(region, pads, mode="reflect")  # numpy reflects repeatedly past the size


def convolve_valid(region_linear: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'Valid' FFT convolution of an ``(H + S − 1, W + T − 1, C)`` region with an ``(S, T)`` kernel.

    Returns float32 ``(H, W, C)``; ``out[i, j] = Σ_{m,n} k[m, n] · region[i + S − 1 − m, j + T − 1 − n]``.
    Uses real FFTs (``scipy.fft``) over both spatial axes at a fast transform length, in float32.
    """
    from scipy import fft as sfft

    k = _check_kernel(kernel)
    region = np.asarray(region_linear, dtype=np.float32)
    squeeze = region.ndim == 2
    if squeeze:
        region = region[..., None]
    rh, rw = region.shape[:2]
    kh, kw = k.shape
    if rh < kh or rw < kw:
        raise ValueError(f"region {rh}x{rw} is smaller than the kernel {kh}x{kw}")
    fh, fw = sfft.next_fast_len(rh, real=True), sfft.next_fast_len(rw, real=True)
    spec = sfft.rfft2(region, s=(fh, fw), axes=(0, 1))
    spec *= sfft.rfft2(k, s=(fh, fw))[:, :, None]
    full = sfft.irfft2(spec, s=(fh, fw), axes=(0, 1))
    out = full[kh - 1 : rh, kw - 1 : rw]
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out[..., 0] if squeeze else out


def blur_region(
    image: np.ndarray,
    box: tuple[int, int, int, int],
    kernel: np.ndarray,
    *,
    linear: np.ndarray | None = None,
) -> np.ndarray:
    """Blur the crop ``box = (x, y, w, h)`` of an sRGB image with ``kernel`` in linear light.

    The neighbouring pixels of the crop (reflect-padded past the image edge) feed the convolution,
    so the result is the crop of a blurred photograph, aligned with ``image[y:y+h, x:x+w]``.
    A centred delta kernel returns the crop unchanged (bit-exact). ``linear`` may hold
    ``srgb_to_linear(image)`` computed once when many crops are cut from one image.
    """
    k = _check_kernel(kernel)
    if is_delta(k):
        return np.ascontiguousarray(extract_region(image, box, (0, 0)), dtype=np.float32)
    margin = (k.shape[0] // 2, k.shape[1] // 2)
    if linear is None:
        region = srgb_to_linear(extract_region(image, box, margin))
    else:
        region = extract_region(linear, box, margin)
    out = convolve_valid(region, k / k.sum())
    return linear_to_srgb(out)


def blur_image(pixels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Blur a whole sRGB image in linear light (reflect padding at the borders), same shape out."""
    h, w = pixels.shape[:2]
    return blur_region(pixels, (0, 0, w, h), kernel)


@dataclass(frozen=True)
class NoiseRanges:
    """How :func:`degrade` draws the optional degradations applied after blurring.

    Attributes:
        gaussian_prob: probability of adding Gaussian noise.
        gaussian_sigma: range of its standard deviation (sRGB units, 0-1 scale).
        poisson_prob: probability of adding Poisson shot noise (in linear light).
        poisson_peak: range of the photon count ``P`` at full white (log-uniform).
        jpeg_prob: probability of JPEG re-compression.
        jpeg_quality: range of JPEG quality (inclusive integers).
    """

    gaussian_prob: float = 0.5
    gaussian_sigma: tuple[float, float] = (0.0, 0.01)
    poisson_prob: float = 0.25
    poisson_peak: tuple[float, float] = (300.0, 3000.0)
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (70, 95)


NO_NOISE = NoiseRanges(gaussian_prob=0.0, poisson_prob=0.0, jpeg_prob=0.0)


@dataclass(frozen=True)
class BlurParams:
    """Everything :func:`random_blur_pair` draws from.

    Attributes:
        trajectory: ranges of the camera-shake trajectory parameters.
        exposure: range of the exposure fraction (part of the trajectory integrated).
        max_kernel: largest kernel side in pixels (odd); bigger paths are scaled down to fit.
        noise: optional noise / JPEG degradations.
    """

    trajectory: TrajectoryRanges = field(default_factory=TrajectoryRanges)
    exposure: tuple[float, float] = (0.5, 1.0)
    max_kernel: int = 65
    noise: NoiseRanges = field(default_factory=NoiseRanges)


def sample_kernel(
    rng: np.random.Generator, params: BlurParams = BlurParams()
) -> tuple[np.ndarray, dict]:
    """Draw a trajectory and rasterise it: ``(kernel float32 (S, S), meta dict)``."""
    tp = sample_trajectory_params(rng, params.trajectory)
    lo, hi = params.exposure
    exposure = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    traj = make_trajectory(tp, rng)
    kernel, kmeta = kernel_from_trajectory(traj, exposure=exposure, max_size=params.max_kernel)
    meta = {"trajectory": tp.to_dict(), "exposure": round(exposure, 6), **kmeta}
    return kernel, meta


def degrade(
    pixels: np.ndarray, rng: np.random.Generator, noise: NoiseRanges = NoiseRanges()
) -> tuple[np.ndarray, dict]:
    """Apply the optional Poisson / Gaussian noise and JPEG to an sRGB image; clip to ``[0, 1]``.

    The decisions are always drawn (same number of draws whatever the outcome), so one sample's
    randomness does not depend on the previous decisions. Returns ``(pixels, meta)``.
    """
    out = np.asarray(pixels, dtype=np.float32)
    meta: dict = {}
    u_poisson, u_gauss, u_jpeg = rng.random(3)
    peak = math.exp(rng.uniform(math.log(noise.poisson_peak[0]), math.log(noise.poisson_peak[1])))
    sigma = (
        float(rng.uniform(*noise.gaussian_sigma))
        if noise.gaussian_sigma[1] > noise.gaussian_sigma[0]
        else float(noise.gaussian_sigma[0])
    )
    qlo, qhi = noise.jpeg_quality
    quality = int(rng.integers(qlo, qhi + 1))
    noise_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
    if u_poisson < noise.poisson_prob:
        lin = srgb_to_linear(out)
        lin = noise_rng.poisson(lin.astype(np.float64) * peak).astype(np.float32) / np.float32(peak)
        out = linear_to_srgb(lin)
        meta["poisson_peak"] = round(peak, 3)
    if u_gauss < noise.gaussian_prob and sigma > 0:
        out = out + noise_rng.standard_normal(out.shape, dtype=np.float32) * np.float32(sigma)
        meta["gaussian_sigma"] = round(sigma, 6)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if u_jpeg < noise.jpeg_prob:
        out = jpeg_roundtrip(out, quality)
        meta["jpeg_quality"] = quality
    return out, meta


def jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Encode an sRGB image as an 8-bit JPEG in memory and decode it again."""
    from PIL import Image

    from deblurcli.images import encode_image

    data = encode_image("jpeg", pixels, quality=int(quality))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def random_blur_pair(
    sharp_pixels: np.ndarray, rng: np.random.Generator, params: BlurParams | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Make a synthetic blurred version of an sRGB image, for on-the-fly training pairs.

    Args:
        sharp_pixels: float32 ``(H, W, 3)`` sRGB in ``[0, 1]``.
        rng: the only source of randomness (same state -> same result).
        params: ranges to draw from (defaults: :class:`BlurParams`).

    Returns:
        ``(blurred, kernel, meta)``: blurred float32 ``(H, W, 3)`` aligned with ``sharp_pixels``
        (reflect padding at the borders), the kernel, and a JSON-ready dict of drawn parameters.
    """
    params = params or BlurParams()
    kernel, meta = sample_kernel(rng, params)
    blurred = blur_image(sharp_pixels, kernel)
    blurred, nmeta = degrade(blurred, rng, params.noise)
    meta["noise"] = nmeta
    return blurred, kernel, meta
