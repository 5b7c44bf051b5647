"""``deblurcli train-vae`` and ``deblurcli train-diffusion``: the two training stages."""

from __future__ import annotations

from typing import Any

import typer

from deblurcli.train import config as cfg

VAE_HELP = (
    "Stage 1: train the eVAE (blurry-image skips + sharp-image latent).\n\n"
    "E1 reads the blurry image and supplies skip features, E2 reads the sharp image and "
    "supplies the latent; the decoder learns to rebuild the sharp image (L1 + alpha * "
    "perceptual). Writes OUTPUT/model (diffusers format), which train-diffusion --evae "
    "reads.\n\n"
    "Flags override --config FILE (TOML, YAML or JSON). Several GPUs or nodes: accelerate "
    "launch -m deblurcli train-vae ... (see docs/training.md).\n\n"
    "\b\n"
    "Examples:\n"
    "  deblurcli train-vae --data GoPro --base-model sd21-base -o runs/evae\n"
    "  deblurcli train-vae --blur b/ --sharp s/ --preset tiny --cpu -o runs/t\n"
    "  deblurcli train-vae --resume latest -o runs/evae --max-steps 80000"
)

DIFFUSION_HELP = (
    "Stage 2: train the one-step UNet (one LoRA adapter, or --full) with a frozen eVAE.\n\n"
    "Loss: L2 + lambda1 * edge-aware perceptual + lambda2 * latent GAN. Writes "
    "OUTPUT/model, a complete model folder for deblurcli deblur --weights; when one adapter"
    " trains, the other one comes from --init DIR. --progressive uses the paper's 160..512 "
    "px crop schedule.\n\n"
    "\b\n"
    "Examples:\n"
    "  deblurcli train-diffusion --sharp-photos DF2K --base-model sd21-base \\\n"
    "      --evae runs/evae/model --adapter synthetic -o runs/lora_s --progressive\n"
    "  deblurcli train-diffusion --data GoPro --base-model sd21-base \\\n"
    "      --init runs/lora_s/model --adapter real -o runs/lora_r\n"
    "  deblurcli train-diffusion --blur b/ --sharp s/ --preset tiny --full --cpu \\\n"
    "      --random-evae -o runs/t2   # a smoke test: untrained eVAE"
)

# ----------------------------------------------------------------------------- shared options
_O = typer.Option
CONFIG = _O(None, "--config", help="TOML / YAML / JSON file of settings (flags override it).")
DATA = _O(None, "--data",
    help="Dataset: a GoPro root, a synth output folder or a RealBlur list file.")
LAYOUT = _O(None, "--layout", help="Layout of --data: auto, gopro, realblur, synth or folders.")
SPLIT = _O(None, "--split", help="GoPro split folder to use (default train).")
DATA_ROOT = _O(None, "--data-root",
    help="Root the RealBlur list paths are relative to (default: the list's folder).")
BLUR = _O(None, "--blur", help="Folder of blurry images (paired with --sharp by relative path).")
SHARP = _O(None, "--sharp", help="Folder of sharp images (paired with --blur).")
SHARP_PHOTOS = _O(None, "--sharp-photos",
    help="Folder of sharp photos blurred on the fly (trajectory kernels).")
FRAMES = _O(None, "--frames",
    help="Folder of video frames (or clip sub-folders) averaged on the fly.")
FRAMES_PER_BLUR = _O(None, "--frames-per-blur",
    help="Frames averaged per blurry image with --frames (odd; default 7).")
REAL_FRACTION = _O(None, "--real-fraction",
    help="With --frames and another source: share of samples made from the frames (default "
         "0.25).")
DEVICE_DATA = _O(None, "--device-data/--host-data",
    help="Keep --sharp-photos/--frames in GPU memory and blur every batch there (no step waits "
         "for disk or CPU decoding); --workers then draw kernels ahead.")
TIME_BUDGET = _O(None, "--time-budget",
    help="Wall-clock seconds for this run: it plans the steps that fit, then checkpoints and "
         "writes its model (0 = no limit).")
CROP = _O(None, "--crop", help="Training crop side in pixels, a multiple of 8 (default 256).")
AUGMENT = _O(None, "--augment/--no-augment", help="Random flips and 90° rotations (default on).")
VAL_DATA = _O(None, "--val-data", help="Held-out dataset for validation (same forms as --data).")
VAL_COUNT = _O(None, "--val-count",
    help="Without --val-data: hold out this many training pairs (default 0).")
VAL_SIZE = _O(None, "--val-size", help="Centre-crop side of validation images (default 256).")
WORKERS = _O(None, "--workers", help="Data-loading worker processes (default 0).")
OUTPUT = _O(None, "--output", "-o",
    help="Run folder: checkpoints/, model/, train_log.csv, validation/.")
MAX_STEPS = _O(None, "--max-steps", help="Optimiser steps to train for (total, resume included).")
BATCH = _O(None, "--batch-size", help="Pairs per micro-batch and process (default 4).")
LR = _O(None, "--lr", help="Learning rate (default 5e-5).")
WARMUP = _O(None, "--warmup-steps", help="Linear LR warm-up steps (default 0).")
LR_SCHEDULE = _O(None, "--lr-schedule",
    help="LR after the warm-up: constant (default) or cosine (decays to 0 at --max-steps).")
SEED = _O(None, "--seed", help="Seed of data order, crops, augmentation and initial weights.")
ACCUM = _O(None, "--grad-accum", help="Micro-batches accumulated per optimiser step.")
MIXED = _O(None, "--mixed-precision",
    help="no, fp16 or bf16 (computation; weights stay float32). GPU, or bf16 on a CPU with "
         "bfloat16 units (Intel AMX / AVX512-BF16).")
GCKPT = _O(None, "--grad-checkpointing/--no-grad-checkpointing", help="Trade compute for memory.")
CKPT_EVERY = _O(None, "--checkpoint-every", help="Save a checkpoint every N steps (default 500).")
KEEP = _O(None, "--keep-checkpoints", help="Keep the newest N checkpoints (0: all; default 2).")
VAL_EVERY = _O(None, "--validate-every", help="Validate every N steps (default 500).")
LOG_EVERY = _O(None, "--log-every", help="Write a CSV/TensorBoard row every N steps (default 10).")
PERCEPTUAL = _O(None, "--perceptual",
    help="Perceptual loss: dists, lpips, stlpips or none (default stlpips).")
PERC_FB = _O(None, "--perceptual-fallback",
    help="Back-end to use when the --perceptual weights are missing.")
RESUME = _O(None, "--resume",
    help="'latest' (newest checkpoint in --output) or a checkpoint folder.")
CPU = _O(None, "--cpu/--no-cpu", help="Train on the CPU even when a GPU exists.")
BASE = _O(None, "--base-model",
    help="Stable Diffusion 2.1(-base): a diffusers folder or a hub id already in the local "
         "Hugging Face cache (for train-vae, also a VAE folder or VAE hub id).")
PRESET = _O(None, "--preset",
    help="Built-in architecture with random weights: compact, sd21 or tiny.")
QUIET = _O(False, "--quiet", "-q", help="No progress bar.")

_CHOICES = {
    "layout": cfg.LAYOUT_CHOICES,
    "mixed_precision": cfg.MIXED_PRECISION_CHOICES,
    "lr_schedule": cfg.LR_SCHEDULE_CHOICES,
    "perceptual": cfg.PERCEPTUAL_CHOICES,
    "perceptual_fallback": cfg.PERCEPTUAL_CHOICES,
    "pixel_loss": cfg.PIXEL_LOSS_CHOICES,
    "adapter": cfg.ADAPTER_CHOICES,
    "mode": cfg.VAE_MODES,
}
_POSITIVE = ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "validate_every",
             "log_every", "frames_per_blur", "progressive_steps")


def _check(values: dict[str, Any]) -> None:
    """Raise ``typer.BadParameter`` for bad flag values (exit status 2)."""
    for key, allowed in _CHOICES.items():
        value = values.get(key)
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}",
                                     param_hint="--" + key.replace("_", "-"))
    for key in _POSITIVE:
        value = values.get(key)
        if value is not None and value < 1:
            raise typer.BadParameter(f"must be >= 1, got {value}",
                                     param_hint="--" + key.replace("_", "-"))
    for key in ("crop", "val_size"):
        value = values.get(key)
        if value is not None and (value < 8 or value % 8):
            raise typer.BadParameter(f"must be a multiple of 8 and >= 8, got {value}",
                                     param_hint="--" + key.replace("_", "-"))
    for key in ("alpha", "latent_weight", "blurry_decode_weight", "lambda1", "lambda2"):
        value = values.get(key)
        if value is not None and value < 0:
            raise typer.BadParameter(f"must be >= 0, got {value}",
                                     param_hint="--" + key.replace("_", "-"))
    value = values.get("real_fraction")
    if value is not None and not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {value}", param_hint="--real-fraction")
    value = values.get("time_budget")
    if value is not None and value < 0:
        raise typer.BadParameter(f"must be >= 0, got {value}", param_hint="--time-budget")
    for key in ("lr", "disc_lr"):
        value = values.get(key)
        if value is not None and value <= 0:
            raise typer.BadParameter(f"must be > 0, got {value}",
                                     param_hint="--" + key.replace("_", "-"))


RANDOM_EVAE = ("--preset {preset} alone trains on a random, untrained eVAE; give --evae DIR "
               "(train-vae's OUTPUT/model), --init MODEL_DIR or --base-model SD, or --random-evae "
               "to train on it anyway")


def _refuse_random_evae(config, random_evae: bool) -> None:
    """Stage 2 freezes the eVAE: started from a bare preset it would learn around random
    encoder/decoder weights, which no later stage repairs. Resuming continues a run that was
    allowed to start."""
    from deblurcli.errors import DeblurcliError

    if config.preset and not (config.evae or config.init or config.base_model or config.resume
                              or random_evae):
        raise DeblurcliError(RANDOM_EVAE.format(preset=config.preset))


def _with_validation_lines(progress, console):
    """Show each validation as a line (``val_psnr`` next to the blurry input's own PSNR, the
    baseline to beat); pass every other event to ``progress``."""

    def callback(event) -> None:
        if event.stage != "validation":
            progress(event)
            return
        info = dict(event.info)
        parts = []
        if "val_psnr" in info:
            text = f"val_psnr {info.pop('val_psnr'):.2f} dB"
            if "val_input_psnr" in info:
                base = info.pop("val_input_psnr")
                text += f" (input {base:.2f} dB)"
            parts.append(text)
        parts += [f"{k} {v:.4g}" for k, v in info.items()]
        console.print(f"step {event.done}: {', '.join(parts)}", highlight=False, markup=False)

    return callback


def _run(kind: str, config_file: str | None, values: dict[str, Any], quiet: bool,
         random_evae: bool = False) -> None:
    """Resolve the config, train with a progress bar, print the summary."""
    import os

    from deblurcli.cli.console import rich_progress, stderr_console, stdout_console, warn
    from deblurcli.train import config as cfg

    if kind == "vae":
        from deblurcli.train.vae import train_vae as train

        config = cfg.resolve_config(cfg.VaeTrainConfig, config_file, values)
    else:
        from deblurcli.train.diffusion import train_diffusion as train

        config = cfg.resolve_config(cfg.DiffusionTrainConfig, config_file, values)
        _refuse_random_evae(config, random_evae)
    err = stderr_console()
    main_rank = os.environ.get("RANK", "0") == "0"  # set by accelerate launch / torchrun
    if config.resume and main_rank:
        err.print(f"resuming from {config.resume}", highlight=False)
    if config.mixed_precision != "no":
        from deblurcli.train.engine import effective_mixed_precision

        if effective_mixed_precision(config) == "no":
            warn(err, f"--mixed-precision {config.mixed_precision} needs a CUDA GPU (or, for "
                      "bf16, a CPU with bfloat16 units such as Intel AMX); training in float32")
    with rich_progress(err, labels={"steps": "training"}, unit="it",
                       enabled=not quiet and main_rank) as progress:
        result = train(config, progress=_with_validation_lines(progress, err))
    if not result.main_process:  # accelerate launch: only the main process reports
        if result.interrupted:
            raise typer.Exit(130)
        return
    out = stdout_console()
    losses = " ".join(f"{k}={v:.4g}" for k, v in result.last_losses.items())
    val = " ".join(f"{k}={v:.4g}" for k, v in result.validation.items())
    if result.interrupted:
        err.print(f"interrupted at step {result.step}; checkpoint saved to {result.checkpoint}; "
                  f"continue with: --resume latest -o {result.output}", highlight=False)
        raise typer.Exit(130)
    done = result.step - result.start_step
    since = f" (resumed at {result.start_step})" if result.start_step else ""
    if result.out_of_time:
        since += " (time budget reached)"
    out.print(f"step {result.step}{since}: {done} steps in {result.seconds:.1f} s  {losses}  "
              f"{val}".rstrip(), highlight=False)
    out.print(f"model folder: {result.model_folder}", highlight=False)


def train_vae(
    config: str | None = CONFIG, data: str | None = DATA, layout: str | None = LAYOUT,
    split: str | None = SPLIT, data_root: str | None = DATA_ROOT,
    blur: str | None = BLUR, sharp: str | None = SHARP,
    sharp_photos: str | None = SHARP_PHOTOS, frames: str | None = FRAMES,
    frames_per_blur: int | None = FRAMES_PER_BLUR, real_fraction: float | None = REAL_FRACTION,
    device_data: bool | None = DEVICE_DATA, time_budget: float | None = TIME_BUDGET,
    crop: int | None = CROP,
    augment: bool | None = AUGMENT, val_data: str | None = VAL_DATA,
    val_count: int | None = VAL_COUNT, val_size: int | None = VAL_SIZE,
    workers: int | None = WORKERS, output: str | None = OUTPUT,
    max_steps: int | None = MAX_STEPS, batch_size: int | None = BATCH,
    lr: float | None = LR, warmup_steps: int | None = WARMUP,
    lr_schedule: str | None = LR_SCHEDULE, seed: int | None = SEED,
    grad_accum: int | None = ACCUM, mixed_precision: str | None = MIXED,
    grad_checkpointing: bool | None = GCKPT, checkpoint_every: int | None = CKPT_EVERY,
    keep_checkpoints: int | None = KEEP, validate_every: int | None = VAL_EVERY,
    log_every: int | None = LOG_EVERY, perceptual: str | None = PERCEPTUAL,
    perceptual_fallback: str | None = PERC_FB, resume: str | None = RESUME,
    cpu: bool | None = CPU, base_model: str | None = BASE,
    preset: str | None = PRESET,
    evae_config: str | None = _O(None, "--evae-config",
        help="JSON file of eVAE (AutoencoderKL) settings, for training from scratch."),
    mode: str | None = _O(None, "--mode",
        help="joint (eVAE3, default), freeze-e2 (eVAE2) or no-skips."),
    freeze_e2: bool = _O(False, "--freeze-e2",
        help="Keep E2 frozen (eVAE2); same as --mode freeze-e2."),
    no_skips: bool = _O(False, "--no-skips",
        help="Plain VAE fine-tuning without skips (ablation baseline)."),
    alpha: float | None = _O(None, "--alpha", help="Weight of the perceptual term (default 1)."),
    pixel_loss: str | None = _O(None, "--pixel-loss",
        help="l1 (the paper's, default) or l2 (mean squared error, aims at PSNR)."),
    latent_weight: float | None = _O(None, "--latent-weight",
        help="Weight of ||E1(blurry) - E2(sharp)||^2 (default 0; for eVAEs trained from scratch)."),
    blurry_decode_weight: float | None = _O(None, "--blurry-decode-weight",
        help="Weight of the pixel loss of decoder(E1(blurry), skips) vs sharp (default 0; "
             "for eVAEs trained from scratch)."),
    quiet: bool = QUIET,
) -> None:
    """Stage 1: train the eVAE."""
    values = dict(locals())
    config_file = values.pop("config")
    values.pop("quiet")
    if values.pop("freeze_e2"):
        values["mode"] = "freeze-e2"
    if values.pop("no_skips"):
        if values["mode"] == "freeze-e2":
            raise typer.BadParameter("--freeze-e2 and --no-skips exclude each other")
        values["mode"] = "no-skips"
    _check(values)
    _run("vae", config_file, values, quiet)


def train_diffusion(
    config: str | None = CONFIG, data: str | None = DATA, layout: str | None = LAYOUT,
    split: str | None = SPLIT, data_root: str | None = DATA_ROOT,
    blur: str | None = BLUR, sharp: str | None = SHARP,
    sharp_photos: str | None = SHARP_PHOTOS, frames: str | None = FRAMES,
    frames_per_blur: int | None = FRAMES_PER_BLUR, real_fraction: float | None = REAL_FRACTION,
    device_data: bool | None = DEVICE_DATA, time_budget: float | None = TIME_BUDGET,
    crop: int | None = CROP,
    augment: bool | None = AUGMENT, val_data: str | None = VAL_DATA,
    val_count: int | None = VAL_COUNT, val_size: int | None = VAL_SIZE,
    workers: int | None = WORKERS, output: str | None = OUTPUT,
    max_steps: int | None = MAX_STEPS, batch_size: int | None = BATCH,
    lr: float | None = LR, warmup_steps: int | None = WARMUP,
    lr_schedule: str | None = LR_SCHEDULE, seed: int | None = SEED,
    grad_accum: int | None = ACCUM, mixed_precision: str | None = MIXED,
    grad_checkpointing: bool | None = GCKPT, checkpoint_every: int | None = CKPT_EVERY,
    keep_checkpoints: int | None = KEEP, validate_every: int | None = VAL_EVERY,
    log_every: int | None = LOG_EVERY, perceptual: str | None = PERCEPTUAL,
    perceptual_fallback: str | None = PERC_FB, resume: str | None = RESUME,
    cpu: bool | None = CPU, base_model: str | None = BASE,
    preset: str | None = PRESET,
    evae: str | None = _O(None, "--evae",
        help="Stage-1 output folder (train-vae's OUTPUT/model) or a model folder."),
    init: str | None = _O(None, "--init",
        help="Existing model folder to start from (its other adapter is carried over)."),
    full: bool | None = _O(None, "--full/--lora",
        help="Train every UNet weight (compact models) instead of one LoRA."),
    train_encoder: bool | None = _O(None, "--train-encoder/--frozen-encoder",
        help="With --full: also train the eVAE's blurry encoder E1 and its skip blocks "
             "(default: the whole eVAE stays frozen)."),
    adapter: str | None = _O(None, "--adapter", help="LoRA to train: synthetic (default) or real."),
    lora_rank: int | None = _O(None, "--lora-rank",
        help="Rank of new LoRA adapters (default: the preset's; 4 with --base-model)."),
    lambda1: float | None = _O(None, "--lambda1",
        help="Weight of the edge-aware perceptual loss (default 1)."),
    lambda2: float | None = _O(None, "--lambda2",
        help="Weight of the latent GAN loss (default 1; 0 disables the discriminator)."),
    latent_weight: float | None = _O(None, "--latent-weight",
        help="Weight of ||z_h - E2(sharp)||^2, a direct latent target (default 0; for models "
             "trained from scratch)."),
    disc_lr: float | None = _O(None, "--disc-lr",
        help="Discriminator learning rate (default: --lr)."),
    gan_start: int | None = _O(None, "--gan-start",
        help="Step at which the GAN terms start (default 0)."),
    progressive: bool | None = _O(None, "--progressive/--no-progressive",
        help="Paper schedule: crops 160,192,256,320,384,448,512."),
    progressive_steps: int | None = _O(None, "--progressive-steps",
        help="Steps per progressive size (default 10000)."),
    random_evae: bool = _O(False, "--random-evae",
        help="Allow --preset without --evae/--init/--base-model: train on an untrained eVAE "
             "(smoke tests only)."),
    quiet: bool = QUIET,
) -> None:
    """Stage 2: train the one-step UNet."""
    values = dict(locals())
    config_file = values.pop("config")
    values.pop("quiet")
    random_evae = values.pop("random_evae")
    _check(values)
    _run("diffusion", config_file, values, quiet, random_evae)


def register(app: typer.Typer) -> None:
    """Add ``train-vae`` and ``train-diffusion`` to the root app."""
    app.command("train-vae", help=VAE_HELP)(train_vae)
    app.command("train-diffusion", help=DIFFUSION_HELP)(train_diffusion)
