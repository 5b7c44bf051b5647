"""What one training micro-batch holds, drawn on the CPU as a pure function of ``(seed, index)``.

The accelerator data path (:mod:`deblurcli.train.ondevice`) keeps the sharp photos and the video
frames in device memory and makes every pair there. What it needs from the CPU is small: for each
sample, which photo or clip, where to cut, which flips, and -- for synthetic blur -- a fresh
camera-shake kernel from the project's trajectory generator (:func:`deblurcli.synth.blur.sample_kernel`)
and the noise draws of :func:`deblurcli.synth.blur.degrade`. This module draws exactly that,
with numpy only, so that worker processes can draw future batches while the device trains.

Micro-batch ``index`` (counted over all processes: ``k · world + rank``) is a pure function of
``(seed, index)`` and the static shapes of the data, so resuming at step ``s`` reproduces the
batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deblurcli.synth.blur import BlurParams, sample_kernel


@dataclass(frozen=True)
class Shapes:
    """The static layout of the data a plan refers to.

    Attributes:
        photos: ``(H, W)`` of each sharp photo (synthetic blur is made from these).
        clips: ``(frames, H, W)`` of each clip of consecutive video frames (real blur).
    """

    photos: tuple[tuple[int, int], ...]
    clips: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class PlanSettings:
    """How samples are drawn.

    Attributes:
        batch_size: samples per micro-batch.
        crop: side of the square training crop.
        real_fraction: probability that a sample comes from the clips (averaged frames) rather
            than from a photo blurred with a kernel; used only when both kinds of data exist.
        window: inclusive range of the odd number of frames averaged for a real sample.
        blur: ranges of the synthetic kernels and noise (the same as ``deblurcli synth``).
        augment: random flips and 90° rotations.
    """

    batch_size: int
    crop: int
    real_fraction: float = 0.25
    window: tuple[int, int] = (7, 13)
    blur: BlurParams = BlurParams()
    augment: bool = True


@dataclass
class SamplePlan:
    """One sample of a micro-batch. ``top``/``left`` place the crop (may need reflection when the
    source is smaller than the crop); ``kernel`` is set for synthetic samples, ``start`` and
    ``length`` for real ones."""

    real: bool
    source: int
    top: int
    left: int
    hflip: bool
    vflip: bool
    turns: int
    kernel: np.ndarray | None = None
    poisson_peak: float = 0.0  # 0: no shot noise
    gaussian_sigma: float = 0.0  # 0: no Gaussian noise
    start: int = 0
    length: int = 1


@dataclass
class BatchPlan:
    """Every draw of one micro-batch; ``noise_seed`` seeds the device's noise generator."""

    index: int
    crop: int
    samples: list[SamplePlan]
    noise_seed: int


def _odd_lengths(window: tuple[int, int], frames: int) -> list[int]:
    lo, hi = window
    return [n for n in range(max(1, lo), min(hi, frames) + 1) if n % 2 == 1]


def _place(rng: np.random.Generator, size: tuple[int, int], crop: int) -> tuple[int, int]:
    h, w = size
    return int(rng.integers(0, max(0, h - crop) + 1)), int(rng.integers(0, max(0, w - crop) + 1))


def plan_batch(seed: int, index: int, shapes: Shapes, settings: PlanSettings,
               crop: int | None = None) -> BatchPlan:
    """Draw micro-batch ``index`` (a pure function of its arguments).

    ``crop`` overrides ``settings.crop`` (a progressive crop schedule). Each sample has its own
    generator, so sample ``j`` does not depend on the kinds of the samples before it.

    Raises:
        ValueError: no data of either kind, or clips too short for the frame window.
    """
    if not shapes.photos and not shapes.clips:
        raise ValueError("no photos and no clips to draw training samples from")
    crop = int(crop or settings.crop)
    usable_clips = [i for i, (t, _, _) in enumerate(shapes.clips)
                    if _odd_lengths(settings.window, t)]
    if shapes.clips and not usable_clips:
        raise ValueError(f"every clip is shorter than the smallest frame window "
                         f"{settings.window[0]}")
    fraction = (settings.real_fraction if shapes.photos and usable_clips
                else (1.0 if usable_clips else 0.0))
    samples = []
    for j in range(settings.batch_size):
        rng = np.random.default_rng([seed, 5, index, j])
        real = bool(rng.random() < fraction)
        hflip, vflip = (bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        turns = int(rng.integers(0, 4))
        if not settings.augment:
            hflip = vflip = False
            turns = 0
        if real:
            source = usable_clips[int(rng.integers(0, len(usable_clips)))]
            frames, h, w = shapes.clips[source]
            lengths = _odd_lengths(settings.window, frames)
            length = lengths[int(rng.integers(0, len(lengths)))]
            start = int(rng.integers(0, frames - length + 1))
            top, left = _place(rng, (h, w), crop)
            samples.append(SamplePlan(True, source, top, left, hflip, vflip, turns,
                                      start=start, length=length))
            continue
        source = int(rng.integers(0, len(shapes.photos)))
        top, left = _place(rng, shapes.photos[source], crop)
        kernel, _ = sample_kernel(rng, settings.blur)
        noise = settings.blur.noise
        u_poisson, u_gauss = rng.random(2)
        lo, hi = noise.poisson_peak
        peak = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        s_lo, s_hi = noise.gaussian_sigma
        sigma = float(rng.uniform(s_lo, s_hi)) if s_hi > s_lo else float(s_lo)
        samples.append(SamplePlan(
            False, source, top, left, hflip, vflip, turns, kernel=kernel,
            poisson_peak=peak if u_poisson < noise.poisson_prob else 0.0,
            gaussian_sigma=sigma if u_gauss < noise.gaussian_prob else 0.0))
    noise_seed = int(np.random.default_rng([seed, 6, index]).integers(0, 2**62))
    return BatchPlan(index=index, crop=crop, samples=samples, noise_seed=noise_seed)


def stack_kernels(kernels: list[np.ndarray]) -> np.ndarray:
    """Centre kernels of different odd sizes in one ``(n, K, K)`` float32 array (``K`` the
    largest side), each normalised to sum 1. Zero taps around a kernel change nothing."""
    size = max(k.shape[0] for k in kernels)
    out = np.zeros((len(kernels), size, size), dtype=np.float32)
    for i, k in enumerate(kernels):
        off = (size - k.shape[0]) // 2
        out[i, off:off + k.shape[0], off:off + k.shape[1]] = k / k.sum()
    return out
