"""``deblurcli train-vae`` and ``deblurcli train-diffusion``: the two training stages."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Optional

import typer

from deblurcli.cli import options as opt
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
    "  deblurcli train-vae --data GoPro -o runs/evae \\\n"
    "      --base-model stabilityai/stable-diffusion-2-1-base\n"
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
    "  deblurcli train-diffusion --sharp-photos DF2K \\\n"
    "      --base-model stabilityai/stable-diffusion-2-1-base \\\n"
    "      --evae runs/evae/model --adapter synthetic -o runs/lora_s --progressive\n"
    "  deblurcli train-diffusion --data GoPro --init runs/lora_s/model \\\n"
    "      --adapter real -o runs/lora_r\n"
    "  deblurcli train-diffusion --blur b/ --sharp s/ --preset tiny --full --cpu \\\n"
    "      --random-evae -o runs/t2   # a smoke test: untrained eVAE"
)

_CHOICES = {
    "layout": cfg.LAYOUT_CHOICES,
    "mixed_precision": cfg.MIXED_PRECISION_CHOICES,
    "lr_schedule": cfg.LR_SCHEDULE_CHOICES,
    "perceptual": cfg.PERCEPTUAL_CHOICES,
    "perceptual_fallback": cfg.PERCEPTUAL_CHOICES,
    "pixel_loss": cfg.PIXEL_LOSS_CHOICES,
    "adapter": cfg.ADAPTER_CHOICES,
    "mode": cfg.VAE_MODES,
    "preset": cfg.PRESET_CHOICES,
}


def _check(values: dict[str, Any]) -> None:
    """Raise ``typer.BadParameter`` (exit status 2) for what Typer's ranges cannot say: names
    outside their choices, sizes that are not multiples of 8, a learning rate of 0."""
    for key, allowed in _CHOICES.items():
        value = values.get(key)
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}",
                                     param_hint="--" + key.replace("_", "-"))
    for key in ("crop", "val_size"):
        value = values.get(key)
        if value is not None and value % 8:
            raise typer.BadParameter(f"must be a multiple of 8, got {value}",
                                     param_hint="--" + key.replace("_", "-"))
    for key in ("lr", "disc_lr"):
        value = values.get(key)
        if value is not None and value <= 0:
            raise typer.BadParameter(f"must be > 0, got {value}",
                                     param_hint="--" + key.replace("_", "-"))
    frames = values.get("frames_per_blur")
    if frames is not None and frames % 2 == 0:  # the middle frame is the sharp image
        raise typer.BadParameter(f"must be odd, got {frames}", param_hint="--frames-per-blur")


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


def unused_settings(config: Any, given: dict[str, Any]) -> list[str]:
    """One line for each flag given (``given``: the flags' values, None when not given) that
    the run ``config`` makes of no effect, and for a perceptual back-end replaced by the
    fallback because its weights are missing."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def asked(*names: str) -> list[str]:
        return [flag(name) for name in names if given.get(name) is not None]

    notes = []
    if not config.frames:
        for name in asked("real_fraction", "frames_per_blur"):
            notes.append(f"{name} has no effect without --frames")
    if getattr(config, "full", False) and asked("adapter"):
        notes.append("--adapter has no effect with --full (the whole UNet trains; the "
                     "model's adapters stay as they were)")
    if getattr(config, "lambda2", None) == 0:
        for name in asked("disc_lr", "gan_start"):
            notes.append(f"{name} has no effect with --lambda2 0 (no GAN term)")
    if not getattr(config, "progressive", True):
        for name in asked("progressive_steps", "progressive_sizes"):
            notes.append(f"{name} has no effect without --progressive")
    if config.perceptual_fallback:
        from deblurcli.train.losses import perceptual_available

        if not perceptual_available(config.perceptual)[0]:
            notes.append(f"the weights of --perceptual {config.perceptual} are missing: "
                         f"training with --perceptual-fallback {config.perceptual_fallback}")
    return notes


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


def _run(kind: str, values: dict[str, Any], random_evae: bool = False) -> None:
    """Check the flags' ``values``, resolve the config, train with a progress bar, print the
    summary."""
    import os

    from rich.markup import escape

    from deblurcli.cli.console import rich_progress, stderr_console, stdout_console, warn

    config_files, quiet = values.pop("config") or [None], values.pop("quiet")
    if len(config_files) > 1:  # the last one alone would count, the others dropped unsaid
        raise typer.BadParameter(f"give one file, not {len(config_files)}: put the settings of "
                                 "all in one", param_hint="--config")
    config_file = config_files[0]
    _check(values)
    if kind == "vae":
        from deblurcli.train.vae import train_vae as train

        config = cfg.resolve_config(cfg.VaeTrainConfig, config_file, values)
    else:
        from deblurcli.train.diffusion import train_diffusion as train

        config = cfg.resolve_config(cfg.DiffusionTrainConfig, config_file, values)
        _refuse_random_evae(config, random_evae)
    err = stderr_console()
    main_rank = os.environ.get("RANK", "0") == "0"  # set by accelerate launch / torchrun
    if main_rank:
        for note in unused_settings(config, values):
            warn(err, escape(note))
    if config.resume and main_rank:
        from deblurcli.train.checkpoint import superseded_note

        err.print(f"resuming from {config.resume}", highlight=False)
        note = superseded_note(config.output, config.resume)
        if note:
            warn(err, escape(note))
    if kind != "vae" and main_rank:
        from deblurcli.train.diffusion import missing_training_state

        note = missing_training_state(config)
        if note:
            warn(err, escape(note))
    if config.mixed_precision != "no":
        from deblurcli.train.engine import effective_mixed_precision

        if effective_mixed_precision(config) == "no":
            warn(err, f"--mixed-precision {config.mixed_precision} needs a CUDA GPU (or, for "
                      "bf16, a CPU with bfloat16 units such as Intel AMX); training in float32")
    with rich_progress(err, labels={"steps": "training"}, unit="it",
                       enabled=not quiet and main_rank) as progress:
        result = train(config, progress=_with_validation_lines(progress, err))
    stopped = 143 if result.terminated else 130  # SIGTERM or Ctrl-C
    if not result.main_process:  # accelerate launch: only the main process reports
        if result.interrupted:
            raise typer.Exit(stopped)
        return
    out = stdout_console()
    losses = " ".join(f"{k}={v:.4g}" for k, v in result.last_losses.items())
    val = " ".join(f"{k}={v:.4g}" for k, v in result.validation.items())
    if result.interrupted:
        how = "terminated" if result.terminated else "interrupted"
        if not result.torn:
            err.print(f"{how} at step {result.step}; checkpoint saved to {result.checkpoint}; "
                      f"continue with: --resume latest -o {result.output}", highlight=False)
        elif result.checkpoint is not None:
            err.print(f"{how} at once after step {result.step} (a second signal), without a "
                      f"checkpoint; the last one is {result.checkpoint}; continue with: "
                      f"--resume latest -o {result.output}", highlight=False)
        else:
            err.print(f"{how} at once after step {result.step} (a second signal), before any "
                      "checkpoint: nothing to resume", highlight=False)
        raise typer.Exit(stopped)
    done = result.step - result.start_step
    since = f" (resumed at {result.start_step})" if result.start_step else ""
    if result.out_of_time:
        since += " (time budget reached)"
    out.print(f"step {result.step}{since}: {done} steps in {result.seconds:.1f} s  {losses}  "
              f"{val}".rstrip(), highlight=False)
    out.print(f"model folder: {result.model_folder}", highlight=False)


_vae = functools.partial(opt.training_option, config=cfg.VaeTrainConfig)
_diffusion = functools.partial(opt.training_option, config=cfg.DiffusionTrainConfig)


@opt.with_training_options
def train_vae(
    evae_config: Annotated[Optional[str], _vae("--evae-config",
        help="JSON file of eVAE (AutoencoderKL) settings, for training from scratch.")] = None,
    mode: Annotated[Optional[str], _vae("--mode",
        help="joint (eVAE3), freeze-e2 (eVAE2) or no-skips.")] = None,
    freeze_e2: Annotated[bool, _vae("--freeze-e2",
        help="Keep E2 frozen (eVAE2); same as --mode freeze-e2.")] = False,
    no_skips: Annotated[bool, _vae("--no-skips",
        help="Plain VAE fine-tuning without skips (ablation baseline).")] = False,
    alpha: Annotated[Optional[float], _vae("--alpha", min=0.0,
        help="Weight of the perceptual term.")] = None,
    pixel_loss: Annotated[Optional[str], _vae("--pixel-loss",
        help="l1 (the paper's) or l2 (mean squared error, aims at PSNR).")] = None,
    latent_weight: Annotated[Optional[float], _vae("--latent-weight", min=0.0,
        help="Weight of ||E1(blurry) - E2(sharp)||^2 (for eVAEs trained from scratch).")] = None,
    blurry_decode_weight: Annotated[Optional[float], _vae("--blurry-decode-weight", min=0.0,
        help="Weight of the pixel loss of decoder(E1(blurry), skips) vs sharp (for eVAEs "
             "trained from scratch).")] = None,
    **shared: Any,
) -> None:
    """Stage 1: train the eVAE."""
    values = dict(locals())
    values.update(values.pop("shared"))
    if values.pop("freeze_e2"):
        values["mode"] = "freeze-e2"
    if values.pop("no_skips"):
        if values["mode"] == "freeze-e2":
            raise typer.BadParameter("--freeze-e2 and --no-skips exclude each other")
        values["mode"] = "no-skips"
    _run("vae", values)


@opt.with_training_options
def train_diffusion(
    evae: Annotated[Optional[str], _diffusion("--evae",
        help="Stage-1 output folder (train-vae's OUTPUT or OUTPUT/model) or a model "
             "folder.")] = None,
    init: Annotated[Optional[str], _diffusion("--init",
        help="Existing model folder to start from (its other adapter is carried over).")] = None,
    full: Annotated[Optional[bool], _diffusion("--full/--lora",
        help="Train every UNet weight (compact models) instead of one LoRA.")] = None,
    train_encoder: Annotated[Optional[bool], _diffusion("--train-encoder/--frozen-encoder",
        help="With --full: also train the eVAE's blurry encoder E1 and its skip blocks "
             "(frozen: the whole eVAE stays frozen).")] = None,
    adapter: Annotated[Optional[str], _diffusion("--adapter",
        help="LoRA to train: synthetic or real.")] = None,
    lora_rank: Annotated[Optional[int], _diffusion("--lora-rank", min=1,
        help="Rank of new LoRA adapters (default: the preset's; 4 with --base-model).")] = None,
    lambda1: Annotated[Optional[float], _diffusion("--lambda1", min=0.0,
        help="Weight of the edge-aware perceptual loss.")] = None,
    lambda2: Annotated[Optional[float], _diffusion("--lambda2", min=0.0,
        help="Weight of the latent GAN loss (0 disables the discriminator).")] = None,
    latent_weight: Annotated[Optional[float], _diffusion("--latent-weight", min=0.0,
        help="Weight of ||z_h - E2(sharp)||^2, a direct latent target (for models trained "
             "from scratch).")] = None,
    disc_lr: Annotated[Optional[float], _diffusion("--disc-lr",
        help="Discriminator learning rate (default: --lr).")] = None,
    gan_start: Annotated[Optional[int], _diffusion("--gan-start", min=0,
        help="Step at which the GAN terms start.")] = None,
    progressive: Annotated[Optional[bool], _diffusion("--progressive/--no-progressive",
        help="Paper schedule: crops 160,192,256,320,384,448,512.")] = None,
    progressive_steps: Annotated[Optional[int], _diffusion("--progressive-steps", min=1,
        help="Steps per progressive size.")] = None,
    random_evae: Annotated[bool, _diffusion("--random-evae",
        help="Allow --preset without --evae/--init/--base-model: train on an untrained eVAE "
             "(smoke tests only).")] = False,
    **shared: Any,
) -> None:
    """Stage 2: train the one-step UNet."""
    values = dict(locals())
    values.update(values.pop("shared"))
    random_evae = values.pop("random_evae")
    _run("diffusion", values, random_evae)


def register(app: typer.Typer) -> None:
    """Add ``train-vae`` and ``train-diffusion`` to the root app."""
    app.command("train-vae", help=VAE_HELP,
                short_help="Stage 1: train the eVAE.")(train_vae)
    app.command("train-diffusion", help=DIFFUSION_HELP,
                short_help="Stage 2: train the one-step UNet and its adapters.")(train_diffusion)
