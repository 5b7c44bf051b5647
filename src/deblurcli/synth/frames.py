"""GoPro-style blur: average consecutive video frames in linear light.

A window of ``N`` consecutive sharp frames ``f_1 … f_N`` (N odd) becomes one blurred frame::

    blurred = srgb( (1/N) · Σ_k linear(f_k) )

and the middle frame ``f_{(N+1)/2}`` is the sharp target (Nah et al., 2017). Averaging in linear
light imitates a longer exposure; averaging the sRGB values would darken moving highlights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deblurcli.synth.blur import linear_to_srgb, srgb_to_linear


@dataclass(frozen=True)
class FrameWindow:
    """One averaging window: frames ``start … start + length − 1``; the sharp target is ``middle``."""

    start: int
    length: int

    @property
    def middle(self) -> int:
        """Index of the sharp target frame."""
        return self.start + self.length // 2


def draw_window_length(rng: np.random.Generator, n_range: tuple[int, int] = (7, 13)) -> int:
    """Draw an odd window length uniformly from the odd numbers in ``n_range`` (inclusive)."""
    lo, hi = int(n_range[0]), int(n_range[1])
    odds = [n for n in range(max(1, lo), hi + 1) if n % 2 == 1]
    if not odds:
        raise ValueError(f"the frame range {lo}-{hi} contains no odd number")
    return int(odds[int(rng.integers(0, len(odds)))])


def frame_windows(
    num_frames: int, rng: np.random.Generator, *, n_range: tuple[int, int] = (7, 13), step: int = 13
) -> list[FrameWindow]:
    """Plan averaging windows over a sequence of ``num_frames`` frames.

    Window ``i`` starts at frame ``i · step`` and has an odd length drawn from ``n_range``; windows
    that would run past the last frame are shortened to the longest odd length in range that fits,
    or dropped. The lengths are drawn from ``rng`` in window order.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    windows: list[FrameWindow] = []
    start = 0
    lo = int(n_range[0]) if int(n_range[0]) % 2 == 1 else int(n_range[0]) + 1
    while start + lo <= num_frames:
        n = draw_window_length(rng, n_range)
        while start + n > num_frames:
            n -= 2
        if n >= lo:
            windows.append(FrameWindow(start=start, length=n))
        start += step
    return windows


def average_frames(frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Average sRGB frames in linear light; returns ``(blurred, sharp_middle_frame)`` (float32).

    An odd number of frames: an even one has no middle frame, and either of its two middle
    ones would sit half a frame's motion away from the blur."""
    if len(frames) == 0:
        raise ValueError("no frames to average")
    if len(frames) % 2 == 0:
        raise ValueError(f"an odd number of frames has a middle one to be the target, not "
                         f"{len(frames)}")
    shape = frames[0].shape
    acc = np.zeros(shape, dtype=np.float64)
    for f in frames:
        if f.shape != shape:
            raise ValueError(f"frames differ in size: {f.shape} vs {shape}")
        acc += srgb_to_linear(f)
    blurred = linear_to_srgb((acc / len(frames)).astype(np.float32))
    sharp = np.asarray(frames[len(frames) // 2], dtype=np.float32)
    return blurred, sharp
