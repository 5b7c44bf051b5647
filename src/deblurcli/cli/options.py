"""Options shared by several commands: checks and ``Annotated`` aliases, declared once.

* The run options that ``deblur`` and ``eval`` share (device, precision, tiling, colour fix) as
  ``Annotated`` aliases, and their checks: one home for the rules, so both commands accept and
  reject the same values with the same words. Each check raises ``typer.BadParameter`` (exit
  status 2) naming the flag.
* The training flags of ``train-vae`` and ``train-diffusion`` as ``Annotated`` aliases
  (:func:`training_options` lists those both take). A training flag defaults to ``None`` (unset:
  the ``--config`` file or the configuration dataclass decides); its ``--help`` shows the
  dataclass default (:func:`training_option`), ranges are Typer's ``min``/``max``.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Optional

import typer

from deblurcli.tiles import DEFAULT_OVERLAP
from deblurcli.train import config as cfg

# ----------------------------------------------------------------------------- run options
# deblur and eval: Annotated aliases (the defaults stay at each parameter: ``tile: Tile = ...``)
Device = Annotated[str, typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).")]
Dtype = Annotated[str, typer.Option(
    "--dtype", help="auto | fp32 | fp16 | bf16 (auto: bf16/fp16 on GPU, fp32 on CPU).")]
Tile = Annotated[int, typer.Option(
    "--tile", help="Largest tile side in pixels (multiple of 8; tiles shrink to cover the "
        "image evenly; 0 = whole image at once).")]
TileOverlap = Annotated[Optional[int], typer.Option(
    "--tile-overlap", show_default=str(DEFAULT_OVERLAP),
    help="Pixels shared by neighbouring tiles (at most --tile minus 8, to which the default "
    "is lowered for a small --tile).")]
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", "-b", min=1, help="Tiles per network call (default: 1 on the CPU, where "
    "single tiles run faster, 4 on a GPU).")]
ColorFix = Annotated[float, typer.Option(
    "--color-fix", metavar="SIGMA", help="Take the output's lowest frequencies (Gaussian SIGMA "
    "px, e.g. 2) from the input, against colour/brightness drift; 0 = off.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
VaeFp32 = Annotated[Optional[bool], typer.Option(
    "--vae-fp32/--no-vae-fp32", help="Run the VAE in fp32 while the UNet uses half precision "
    "(default: under fp16, which the VAE can overflow; not under bf16).")]


def check_tiling(tile: int, overlap: int | None) -> int:
    """``--tile``: 0 (whole image) or a positive multiple of 8; ``--tile-overlap``: 0 .. tile - 8,
    by default :data:`~deblurcli.tiles.DEFAULT_OVERLAP` or less for a small tile. Returns the
    overlap."""
    if tile < 0 or tile % 8:
        raise typer.BadParameter(f"must be 0 or a positive multiple of 8, got {tile}",
                                 param_hint="--tile")
    if overlap is None:  # --tile 32 alone: no error about a flag that was not given
        return min(DEFAULT_OVERLAP, tile - 8) if tile else DEFAULT_OVERLAP
    if overlap < 0 or (tile and overlap > tile - 8):
        raise typer.BadParameter(f"must be >= 0 and at most --tile minus 8 ({max(tile - 8, 0)} "
                                 f"for --tile {tile}), got {overlap}", param_hint="--tile-overlap")
    return overlap


def check_device(device: str) -> None:
    """``--device``: auto, cpu, cuda, cuda:N or mps."""
    from deblurcli.device import check_device_name

    try:
        check_device_name(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None


def dtype_option(dtype: str, fp32: bool = False) -> str:
    """The normalised ``--dtype`` name (``--fp32`` is a synonym of ``--dtype fp32``)."""
    from deblurcli.device import DTYPE_CHOICES

    if fp32 and dtype.lower() not in ("auto", "fp32"):
        raise typer.BadParameter(f"--fp32 contradicts --dtype {dtype}", param_hint="--fp32")
    name = "fp32" if fp32 else dtype.lower()
    if name not in DTYPE_CHOICES:
        raise typer.BadParameter(f"use {', '.join(DTYPE_CHOICES)}; got {dtype!r}",
                                 param_hint="--dtype")
    return name


def check_color_fix(sigma: float) -> None:
    """``--color-fix``: 0 (off) or a positive, finite Gaussian sigma in pixels."""
    import math

    if not (math.isfinite(sigma) and sigma >= 0):
        raise typer.BadParameter(f"must be 0 (off) or a positive number of pixels, got {sigma}",
                                 param_hint="--color-fix")


# ----------------------------------------------------------------------------- training flags
def training_option(*decls: str, help: str, config: type = cfg.CommonConfig, **kwargs: Any) -> Any:
    """``typer.Option(*decls)`` for a training flag, its ``--help`` showing the default that
    ``config`` (a training dataclass) gives the setting the first flag names, if any."""
    name = decls[0].split("/")[0].lstrip("-").replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(config)}
    default = fields[name].default if name in fields else None
    if isinstance(default, bool) and "/" in decls[0]:  # --augment/--no-augment: as Typer shows it
        default = decls[0].split("/")[0 if default else 1].lstrip("-")
    if default is not None and default is not dataclasses.MISSING:
        kwargs["show_default"] = str(default)
    return typer.Option(*decls, help=help, **kwargs)


_o = training_option
ConfigFile = Annotated[Optional[list[str]], _o("--config", metavar="FILE",
    help="TOML / YAML / JSON file of settings (flags override it; one file).")]
Data = Annotated[Optional[str], _o("--data",
    help="Dataset: a GoPro root, a synth output folder or a RealBlur list file.")]
Layout = Annotated[Optional[str], _o("--layout",
    help="Layout of --data: auto, gopro, realblur, synth or folders.")]
Split = Annotated[Optional[str], _o("--split", help="GoPro split folder to use.")]
DataRoot = Annotated[Optional[str], _o("--data-root",
    help="Root the RealBlur list paths are relative to (default: the list's folder).")]
Blur = Annotated[Optional[str], _o("--blur",
    help="Folder of blurry images (paired with --sharp by relative path).")]
Sharp = Annotated[Optional[str], _o("--sharp", help="Folder of sharp images (paired with --blur).")]
SharpPhotos = Annotated[Optional[str], _o("--sharp-photos",
    help="Folder of sharp photos blurred on the fly (trajectory kernels).")]
Frames = Annotated[Optional[str], _o("--frames",
    help="Folder of video frames (or clip sub-folders) averaged on the fly.")]
FramesPerBlur = Annotated[Optional[int], _o("--frames-per-blur", min=1,
    help="Frames averaged per blurry image with --frames (odd).")]
RealFraction = Annotated[Optional[float], _o("--real-fraction", min=0.0, max=1.0,
    help="With --frames and another source: share of samples made from the frames.")]
DeviceData = Annotated[Optional[bool], _o("--device-data/--host-data",
    help="Keep --sharp-photos/--frames in GPU memory and blur every batch there (no step waits "
         "for disk or CPU decoding); --workers then draw kernels ahead.")]
TimeBudget = Annotated[Optional[float], _o("--time-budget", min=0.0,
    help="Wall-clock seconds for this run: it plans the steps that fit, then checkpoints and "
         "writes its model (0 = no limit).")]
Crop = Annotated[Optional[int], _o("--crop", min=8,
    help="Training crop side in pixels, a multiple of 8.")]
Augment = Annotated[Optional[bool], _o("--augment/--no-augment",
    help="Random flips and 90° rotations.")]
ValData = Annotated[Optional[str], _o("--val-data",
    help="Held-out dataset for validation (same forms as --data).")]
ValCount = Annotated[Optional[int], _o("--val-count", min=0,
    help="Without --val-data: hold out this many training pairs (of synth output: photos, "
         "with all their pairs).")]
ValSize = Annotated[Optional[int], _o("--val-size", min=8,
    help="Centre-crop side of validation images, a multiple of 8.")]
Workers = Annotated[Optional[int], _o("--workers", min=0, help="Data-loading worker processes.")]
Output = Annotated[Optional[str], _o("--output", "-o",
    help="Run folder: checkpoints/, model/, train_log.csv, validation/.")]
MaxSteps = Annotated[Optional[int], _o("--max-steps", min=1,
    help="Optimiser steps to train for (total, resume included).")]
TrainBatchSize = Annotated[Optional[int], _o("--batch-size", min=1,
    help="Pairs per micro-batch and process.")]
Lr = Annotated[Optional[float], _o("--lr", help="Learning rate (> 0).")]
WarmupSteps = Annotated[Optional[int], _o("--warmup-steps", min=0,
    help="Linear LR warm-up steps.")]
LrSchedule = Annotated[Optional[str], _o("--lr-schedule",
    help="LR after the warm-up: constant or cosine (decays to 0 at --max-steps).")]
Seed = Annotated[Optional[int], _o("--seed", min=0,
    help="Seed of data order, crops, augmentation and initial weights.")]
GradAccum = Annotated[Optional[int], _o("--grad-accum", min=1,
    help="Micro-batches accumulated per optimiser step.")]
MixedPrecision = Annotated[Optional[str], _o("--mixed-precision",
    help="no, fp16 or bf16 (computation; weights stay float32). GPU, or bf16 on a CPU with "
         "bfloat16 units (Intel AMX / AVX512-BF16).")]
GradCheckpointing = Annotated[Optional[bool], _o("--grad-checkpointing/--no-grad-checkpointing",
    help="Trade compute for memory.")]
CheckpointEvery = Annotated[Optional[int], _o("--checkpoint-every", min=1,
    help="Save a checkpoint every N steps.")]
KeepCheckpoints = Annotated[Optional[int], _o("--keep-checkpoints", min=0,
    help="Keep the newest N checkpoints (0: all).")]
ValidateEvery = Annotated[Optional[int], _o("--validate-every", min=1,
    help="Validate every N steps.")]
LogEvery = Annotated[Optional[int], _o("--log-every", min=1,
    help="Write a CSV/TensorBoard row every N steps.")]
Perceptual = Annotated[Optional[str], _o("--perceptual",
    help="Perceptual loss: dists, lpips, stlpips or none.")]
PerceptualFallback = Annotated[Optional[str], _o("--perceptual-fallback",
    help="Back-end to use when the --perceptual weights are missing.")]
Resume = Annotated[Optional[str], _o("--resume",
    help="'latest' (newest checkpoint in --output), a run folder (its newest checkpoint) or a "
         "checkpoint folder.")]
Cpu = Annotated[Optional[bool], _o("--cpu/--no-cpu",
    help="Train on the CPU even when a GPU exists.")]
BaseModel = Annotated[Optional[str], _o("--base-model",
    help="Stable Diffusion 2.1(-base): a diffusers folder or a hub id already in the local "
         "Hugging Face cache (for train-vae, also a VAE folder or VAE hub id).")]
Preset = Annotated[Optional[str], _o("--preset",
    help="Built-in architecture with random weights: compact, sd21 or tiny.")]


def training_options(
    config: ConfigFile = None, data: Data = None, layout: Layout = None, split: Split = None,
    data_root: DataRoot = None, blur: Blur = None, sharp: Sharp = None,
    sharp_photos: SharpPhotos = None, frames: Frames = None,
    frames_per_blur: FramesPerBlur = None, real_fraction: RealFraction = None,
    device_data: DeviceData = None, time_budget: TimeBudget = None, crop: Crop = None,
    augment: Augment = None, val_data: ValData = None, val_count: ValCount = None,
    val_size: ValSize = None, workers: Workers = None, output: Output = None,
    max_steps: MaxSteps = None, batch_size: TrainBatchSize = None, lr: Lr = None,
    warmup_steps: WarmupSteps = None, lr_schedule: LrSchedule = None, seed: Seed = None,
    grad_accum: GradAccum = None, mixed_precision: MixedPrecision = None,
    grad_checkpointing: GradCheckpointing = None, checkpoint_every: CheckpointEvery = None,
    keep_checkpoints: KeepCheckpoints = None, validate_every: ValidateEvery = None,
    log_every: LogEvery = None, perceptual: Perceptual = None,
    perceptual_fallback: PerceptualFallback = None, resume: Resume = None, cpu: Cpu = None,
    base_model: BaseModel = None, preset: Preset = None, quiet: Quiet = False,
) -> None:
    """The flags ``train-vae`` and ``train-diffusion`` share, in ``--help`` order (only this
    signature is used: :func:`with_training_options` puts each command's own flags before the
    last one, ``--quiet``)."""


def with_training_options(command):
    """``command(**values)`` with the :func:`training_options` flags around its own, for Typer,
    which reads a command's options from its signature; ``values`` holds every flag's value."""
    import functools
    import inspect

    *shared, quiet = inspect.signature(training_options, eval_str=True).parameters.values()
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params = [*shared, *own, quiet]

    @functools.wraps(command)
    def run(**values: Any) -> None:
        command(**values)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run
