"""Stage 1: train the eVAE (paper Sec. 3.1.3).

E1 sees the blurry image and supplies the skip features, E2 sees the sharp image and supplies the
latent, and the decoder must rebuild the sharp image from ``(E2(x_sharp), skips(E1(x_blurry)))``::

    L = L1(x̂, x_sharp) + α · perceptual(x̂, x_sharp) [+ β · ‖E1(x_blurry) − sg(E2(x_sharp))‖²]
        [+ δ · L1(x̂_l, x_sharp)],   x̂_l = decoder(E1(x_blurry), skips(E1(x_blurry)))

The optional β term (``--latent-weight``, default 0) is for eVAEs trained *from scratch*: with a
Stable Diffusion VAE, E1's latent head already maps images into the latent space E2 shares (both
start as the same pretrained encoder), which stage 2 relies on when it starts from ``z_l = E1(y)``.
A randomly initialised E1 has no such head; the β term trains it to land in E2's latent space
(``sg``: E2 gets no gradient from it).

The optional δ term (``--blurry-decode-weight``, default 0, also not in the paper) trains the
decoder on the latent the one-step UNet *starts* from, ``z_l = E1(x_blurry)``, as well as on the
sharp latent it aims at. A from-scratch UNet that learns slowly then starts from a decoder that
already deblurs what its skips carry, instead of one that needs a near-perfect ẑ_h (measured in
docs/default-model.md). The pixel loss of the δ term is the same as the main term's.

Modes: ``joint`` (eVAE₃: E1, E2, skips and decoder train), ``freeze-e2`` (eVAE₂: E2 frozen) and
``no-skips`` (plain VAE fine-tuning without skips: E2(sharp) → decoder, the ablation baseline).

The output folder (``OUTPUT/model``) holds the eVAE in diffusers format (``config.json`` +
``diffusion_pytorch_model.safetensors``); stage 2 picks it up with ``train-diffusion --evae DIR``.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deblurcli.errors import DeblurcliError, WeightsError
from deblurcli.progress import ProgressFn
from deblurcli.train import engine
from deblurcli.train.config import (PIXEL_LOSS_CHOICES, VAE_MODES, VaeTrainConfig,
                                    validate_common)
from deblurcli.train.losses import build_perceptual, check_perceptual_size


def evae_presets() -> dict[str, dict]:
    """Named eVAE configurations for training from scratch (``--preset``)."""
    from deblurcli.models.presets import PRESETS, preset_config

    return {name: dict(preset_config(name, sharp_encoder=True).evae) for name in PRESETS}


def build_evae(config: VaeTrainConfig):
    """The eVAE stage 1 starts from: a diffusers VAE / SD folder, a preset or a JSON config."""
    from deblurcli.models.evae import EVAE

    use_skips = config.mode != "no-skips"
    sources = [s for s in (config.base_model, config.preset, config.evae_config) if s]
    if len(sources) != 1:
        raise DeblurcliError("give exactly one of --base-model (a diffusers VAE or Stable "
                             "Diffusion folder), --preset or --evae-config")
    generator = torch.Generator().manual_seed(config.seed)
    if config.base_model:
        return EVAE.from_vae(config.base_model, use_skips=use_skips, sharp_encoder=True,
                             generator=generator)
    if config.preset:
        presets = evae_presets()
        if config.preset not in presets:
            raise DeblurcliError(f"unknown eVAE preset {config.preset!r}; "
                                 f"known: {', '.join(sorted(presets))}")
        kwargs = dict(presets[config.preset])
    else:
        path = Path(config.evae_config)
        try:
            kwargs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DeblurcliError(f"cannot read the eVAE config {path}: {exc}") from None
    kwargs.update(use_skips=use_skips, sharp_encoder=True)
    if not use_skips:
        kwargs["image_skip"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model = EVAE(**kwargs)
        except (TypeError, ValueError) as exc:
            raise DeblurcliError(f"invalid eVAE config: {exc}") from None
    model.init_skip_weights(generator, live=True)  # from scratch: no pretrained decoder to protect
    return model


def evae_folder(path: str | Path) -> Path:
    """The folder of the eVAE that ``--evae path`` names: ``RUN/model`` of a train-vae run, the
    ``evae/`` of a model folder, or ``path`` itself."""
    path = Path(path)
    for _ in range(2):  # a run's finished model, then a model folder's component
        inner = next((path / name for name in ("evae", "model")
                      if any((path / name / index).is_file()
                             for index in ("config.json", "model_index.json"))), None)
        if inner is None:
            break
        path = inner
    return path


def load_evae(path: str | Path):
    """Load an eVAE from a stage-1 run (``train-vae``'s ``RUN`` or its ``RUN/model``) or from
    the ``evae/`` component of a model folder: all hold ``EVAE.save_pretrained`` folders.

    Raises:
        WeightsError: no eVAE there, or the weights do not fit.
    """
    from deblurcli.models.evae import EVAE

    path = evae_folder(path)
    if not (path / "diffusion_pytorch_model.safetensors").is_file():
        run = (path / "checkpoints").is_dir()
        raise WeightsError(f"no eVAE in {path} (expected train-vae's output folder, its "
                           "model/ or a model folder" +
                           ("; this run has not finished: export one with deblurcli export "
                            "RUN -o DIR" if run else "") + ")")
    try:
        return EVAE.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"cannot load the eVAE from {path}: "
                           f"{' '.join(str(exc).split())}") from None


class VaeStep(nn.Module):
    """The stage-1 forward pass as one module (so DDP sees every trained parameter)."""

    def __init__(self, evae: nn.Module, mode: str, latent_weight: float = 0.0,
                 blurry_decode: bool = False) -> None:
        super().__init__()
        self.evae = evae
        self.mode = mode
        self.latent_weight = latent_weight
        self.blurry_decode = blurry_decode

    def forward(self, blur: torch.Tensor, sharp: torch.Tensor) \
            -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x̂, latent loss, x̂_l)``.

        The latent loss is 0 unless ``latent_weight > 0``; ``x̂_l`` (the decoder on E1's own
        latent) is ``None`` unless ``blurry_decode``.
        """
        z = self.evae.encode_sharp(sharp)
        if self.mode == "no-skips":
            return self.evae.decode(z, ()), z.new_zeros(()), None
        if self.latent_weight > 0 or self.blurry_decode:
            z_blur, skips = self.evae.encode(blur)
            latent = (F.mse_loss(z_blur.float(), z.detach().float()) if self.latent_weight > 0
                      else z.new_zeros(()))
        else:  # E1's latent head is not needed: skip it
            z_blur, skips, latent = None, self.evae.encode_skips(blur), z.new_zeros(())
        pred_blurry = self.evae.decode(z_blur, skips) if self.blurry_decode else None
        return self.evae.decode(z, skips), latent, pred_blurry


def set_trainable(evae: nn.Module, mode: str) -> None:
    """``requires_grad`` per mode (see the module docstring)."""
    for p in evae.parameters():
        p.requires_grad_(True)
    if mode == "freeze-e2":
        for module in (evae.encoder_sharp, evae.quant_conv_sharp):
            if module is not None:
                module.requires_grad_(False)
    elif mode == "no-skips":  # E1 is not used: keep it as it is
        for module in (evae.encoder, evae.quant_conv):
            if module is not None:
                module.requires_grad_(False)


def train_vae(config: VaeTrainConfig, progress: ProgressFn | None = None) -> engine.TrainResult:
    """Run stage 1 (see the module docstring); returns the :class:`TrainResult`.

    Raises:
        DeblurcliError: bad settings, data or weights (one line, before any training step).
    """
    if config.mode not in VAE_MODES:
        raise DeblurcliError(f"unknown mode {config.mode!r}; choose from {', '.join(VAE_MODES)}")
    if config.pixel_loss not in PIXEL_LOSS_CHOICES:
        raise DeblurcliError(f"unknown pixel loss {config.pixel_loss!r}; choose l1 or l2")
    validate_common(config)
    accelerator = engine.make_accelerator(config, find_unused_parameters=True)
    data = engine.build_data(config, world=accelerator.num_processes, device=accelerator.device)
    output, state = engine.prepare_output(config)
    evae = build_evae(config)
    if config.mode == "no-skips" and evae.skip_blocks is not None:
        raise DeblurcliError("--no-skips needs an eVAE without skips")
    set_trainable(evae, config.mode)
    if config.grad_checkpointing:
        evae.enable_gradient_checkpointing()
    perceptual = build_perceptual(config.perceptual, fallback=config.perceptual_fallback,
                                  device=accelerator.device)
    if perceptual.name != config.perceptual:  # the fallback: the run records what it trains with
        config = dataclasses.replace(config, perceptual=perceptual.name)
    if config.alpha > 0:  # (the perceptual term's weight)
        check_perceptual_size(perceptual, config.crop)
    if config.latent_weight > 0 and config.mode == "no-skips":
        raise DeblurcliError("--latent-weight trains E1, which --no-skips does not use")
    if config.blurry_decode_weight > 0 and config.mode == "no-skips":
        raise DeblurcliError("--blurry-decode-weight decodes E1's latent, which --no-skips does "
                             "not use")
    step_module = VaeStep(evae, config.mode, config.latent_weight,
                          blurry_decode=config.blurry_decode_weight > 0)
    pixel_loss = F.mse_loss if config.pixel_loss == "l2" else F.l1_loss
    params = [p for p in evae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = engine.lr_scheduler(optimizer, config.warmup_steps, config.lr_schedule,
                                    config.max_steps)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    perceptual = perceptual.to(accelerator.device)

    def train_step(batch: dict, step: int) -> dict[str, float]:
        with accelerator.accumulate(step_module):
            with accelerator.autocast():
                pred, latent, pred_blurry = step_module(batch["blur"], batch["sharp"])
            pred = pred.float()
            pixel = pixel_loss(pred, batch["sharp"])
            perc = perceptual(pred, batch["sharp"]) if config.alpha > 0 else pred.new_zeros(())
            blurry = (pixel_loss(pred_blurry.float(), batch["sharp"]) if pred_blurry is not None
                      else pred.new_zeros(()))
            loss = (pixel + config.alpha * perc + config.latent_weight * latent
                    + config.blurry_decode_weight * blurry)
            engine.optimizer_step(accelerator, loss, optimizer, scheduler, params=params,
                                  max_grad_norm=config.max_grad_norm)
        return {"loss": loss.item(), config.pixel_loss: pixel.item(),
                "perceptual": float(perc.item()),
                "latent": float(latent.item()), "blurry_decode": float(blurry.item())}

    def predict(blur: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
        # the training objective itself: decoder(E2(sharp), skips(E1(blurry))) -> sharp
        return accelerator.unwrap_model(step_module)(blur, sharp)[0]

    def save_output(folder: Path) -> None:
        model = accelerator.unwrap_model(step_module).evae
        model.save_pretrained(folder, safe_serialization=True)

    stage = engine.Stage(modules={"evae": step_module}, optimizers={"evae": optimizer},
                         schedulers={"evae": scheduler}, train_step=train_step,
                         predict=predict, save_output=save_output,
                         trained=[step_module])
    return engine.run(config, accelerator, stage, data, output, state, progress)
