"""Blur synthesis: camera-shake kernels, linear-light blurring, frame averaging, the synth job.

Pure, seeded building blocks (every random draw comes from an explicit ``numpy.random.Generator``):

* :func:`random_blur_pair` — sharp sRGB image -> ``(blurred, kernel, meta)`` for on-the-fly pairs;
* :func:`sample_kernel`, :func:`blur_region`, :func:`blur_image`, :func:`degrade`;
* :func:`frame_windows`, :func:`average_frames` — GoPro-style frame averaging;
* :func:`run_synth` / :class:`SynthConfig` — the ``deblurcli synth`` job.
"""

from deblurcli.synth.blur import (
    NO_NOISE,
    BlurParams,
    NoiseRanges,
    blur_image,
    blur_region,
    degrade,
    linear_to_srgb,
    random_blur_pair,
    sample_kernel,
    srgb_to_linear,
)
from deblurcli.synth.build import SynthConfig, SynthResult, resolve_source, run_synth, sample_seed
from deblurcli.synth.frames import FrameWindow, average_frames, frame_windows
from deblurcli.synth.psf import kernel_centroid, kernel_from_trajectory
from deblurcli.synth.trajectory import (
    TrajectoryParams,
    TrajectoryRanges,
    make_trajectory,
    sample_trajectory_params,
)

__all__ = [
    "NO_NOISE",
    "BlurParams",
    "FrameWindow",
    "NoiseRanges",
    "SynthConfig",
    "SynthResult",
    "TrajectoryParams",
    "TrajectoryRanges",
    "average_frames",
    "blur_image",
    "blur_region",
    "degrade",
    "frame_windows",
    "kernel_centroid",
    "kernel_from_trajectory",
    "linear_to_srgb",
    "make_trajectory",
    "random_blur_pair",
    "resolve_source",
    "run_synth",
    "sample_kernel",
    "sample_seed",
    "sample_trajectory_params",
    "srgb_to_linear",
]
