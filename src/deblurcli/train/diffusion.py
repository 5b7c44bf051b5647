"""Stage 2: train the one-step UNet (LoRA adapters or all weights) with a frozen eVAE (Sec. 3.2).

For a blurry/sharp pair ``(y, x)``::

    z_l, skips = E1(y);  ẑ_h = predict_x0(z_l, UNet(z_l, t, prompt), ᾱ_t);  x̂ = D(ẑ_h, skips)
    L   = L2(x̂, x) + λ1 · EA-perceptual(x̂, x) + λ2 · L_G(ẑ_h) [+ β · ‖ẑ_h − sg(E2(x))‖²]
    L_D = −log D(z_h) − log(1 − D(ẑ_h)),  z_h = E2(x)

``--train-encoder`` (with ``--full``, not in the paper) also trains E1 and its skip blocks, which
the paper keeps frozen: a from-scratch E1 is a small network whose latent may not keep what the
UNet needs, whereas SD's encoder is a near-lossless code of the blurry image.

The β term (``--latent-weight``, default 0, not in the paper) regresses the one-step latent
straight onto the sharp image's E2 latent. A pretrained SD UNet already lands near the latent
manifold; a UNet trained from scratch gets only the gradient that the frozen decoder passes back,
which in the compact CPU runs did not move the validation PSNR in 1,000 steps.

with the latent discriminator of :mod:`deblurcli.models.discriminator` (logits, BCEWithLogits,
non-saturating ``L_G = −log D(ẑ_h)``). Trainable: the chosen LoRA adapter (``real`` or
``synthetic``; the other one is inactive and frozen) or, with ``full``, every UNet weight; the
learned prompt embedding trains too unless ``--init`` supplies it (it is shared by both adapters).
Weights stay float32; mixed precision runs the computation in bf16/fp16 through autocast.

Output: ``OUTPUT/model``, a complete model folder (``modelfolder.save_model_folder``) with both
adapters and the latent discriminator; when one adapter trains, the other one comes from
``--init DIR``, whose discriminator (when it has one of the same shape) continues too.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deblurcli.errors import DeblurcliError
from deblurcli.progress import ProgressFn
from deblurcli.train import engine, sources
from deblurcli.train.config import DiffusionTrainConfig, validate_common, with_absolute_paths
from deblurcli.train.losses import (build_perceptual, check_perceptual_size, discriminator_loss,
                                    edge_aware, generator_loss)

from deblurcli.train.config import ADAPTER_CHOICES  # re-exported


def preset_osdd_config(name: str, lora_rank: int | None):
    """The OSDD configuration of preset ``name`` (E2 included; ``lora_rank`` overrides).

    Raises:
        DeblurcliError: unknown preset name.
    """
    from deblurcli.models.presets import PRESETS, preset_config

    if name not in PRESETS:
        raise DeblurcliError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    kwargs = {"sharp_encoder": True}
    if lora_rank is not None:
        kwargs["lora_rank"] = lora_rank
    return preset_config(name, **kwargs)


def build_model(config: DiffusionTrainConfig):
    """The :class:`OSDDModel` stage 2 starts from (``--init``, ``--base-model`` or ``--preset``),
    with the eVAE replaced by ``--evae`` when given.

    Raises:
        DeblurcliError / WeightsError: missing or conflicting sources, unloadable weights.
    """
    from deblurcli.models import adapters as ad
    from deblurcli.models import osdd

    if config.init and config.base_model:
        raise DeblurcliError("give --init MODEL_DIR or --base-model SD, not both (a model folder "
                             "holds its own UNet)")
    if config.init:
        from deblurcli.modelfolder import load_model_folder

        model = load_model_folder(config.init, fuse=False, gamma=0.5)
        if not model.has_dual_adapters:
            raise DeblurcliError(f"--init {config.init}: needs an unfused model folder with "
                                 "'real' and 'synthetic' adapters")
    elif config.base_model:
        from deblurcli.models.presets import PAPER_LORA_RANK

        model = osdd.osdd_from_base_model(config.base_model,
                                          lora=ad.dual_lora(config.lora_rank or PAPER_LORA_RANK),
                                          seed=config.seed)
    elif config.preset:
        spec = preset_osdd_config(config.preset, config.lora_rank)
        if not config.full:  # its output conv starts at zero (below): no gradient reaches
            # anything upstream of it, and an adapter trained alone would stay at zero
            raise DeblurcliError(f"--preset {config.preset} builds an untrained UNet, and an "
                                 "adapter learns nothing on it: train the whole UNet with "
                                 "--full, then the adapters on that model with --init MODEL_DIR")
        model = osdd.build_osdd(spec, seed=config.seed)
        # No pretrained prior: start from eps = 0, i.e. z_h = z_l / sqrt(abar), so the first
        # predictions are the blurry latent (rescaled) rather than noise from a random UNet.
        with torch.no_grad():
            model.unet.conv_out.weight.zero_()
            model.unet.conv_out.bias.zero_()
    else:
        raise DeblurcliError("give --base-model (a Stable Diffusion 2.1-base folder), --preset "
                             "or --init (an existing model folder)")
    if config.evae:
        from deblurcli.train.vae import load_evae

        evae = load_evae(config.evae)
        latent, unet = evae.config.latent_channels, model.unet.config
        if latent != unet.in_channels or latent != unet.out_channels:
            source = f"--preset {config.preset}" if config.preset else "the UNet"
            raise DeblurcliError(f"--evae {config.evae} makes {latent}-channel latents but "
                                 f"{source} takes {unet.in_channels}: train the eVAE with the "
                                 "same --preset")
        model.evae = evae
    return model


def set_trainable(model, config: DiffusionTrainConfig) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what stage 2 trains; returns those parameters."""
    from deblurcli.models import adapters as ad

    model.requires_grad_(False)
    unet = model.unet
    if config.full:
        ad.set_gamma(unet, 0.5)
        for name, p in unet.named_parameters():
            p.requires_grad_(".lora_" not in name)
    else:
        ad.set_adapter_weights(unet, {config.adapter: 1.0})
        ad.set_trainable_adapter(unet, config.adapter)
    if config.train_encoder:
        evae = model.evae
        for part in (evae.encoder, evae.quant_conv, evae.skip_blocks):
            if part is not None:
                part.requires_grad_(True)
    train_prompt = config.full or not config.init
    model.denoiser.prompt_embeds.requires_grad_(train_prompt)
    return [p for p in model.parameters() if p.requires_grad]


class GeneratorStep(nn.Module):
    """The stage-2 forward pass as one module: blurry image → ``(x̂, ẑ_h)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, z_h, skips = self.model.latent_step(blur)
        return self.model.evae.decode(z_h, skips), z_h


def sharp_latent(evae: nn.Module, sharp: torch.Tensor) -> torch.Tensor:
    """``E2(x_sharp)``, or ``E1``'s latent when the eVAE was saved without E2."""
    if getattr(evae, "encoder_sharp", None) is not None:
        return evae.encode_sharp(sharp)
    return evae.encode(sharp)[0]


def missing_training_state(config: DiffusionTrainConfig) -> str | None:
    """A note on what the ``--init`` folder of a new run lacks that its losses use: the sharp
    encoder E2 (the latent term's and the GAN's target; E1's latent stands in) and the latent
    discriminator (a new one starts). None when nothing is missing or no term uses it."""
    from deblurcli.modelindex import DISCRIMINATOR_FILE

    if not config.init or config.resume or (config.latent_weight <= 0 and config.lambda2 <= 0):
        return None
    from deblurcli.errors import WeightsError
    from deblurcli.modelindex import RECORD_KEY, read_model_index
    from deblurcli.train.vae import evae_folder

    folder = Path(config.init)
    try:
        if read_model_index(folder)[RECORD_KEY].get("fused_gamma") is not None:
            return None  # no adapters to train on: loading it says so, alone
    except WeightsError:
        return None  # not a model folder: loading it says what is wrong
    evae_config = evae_folder(config.evae) / "config.json" if config.evae else \
        folder / "evae" / "config.json"  # --evae replaces the folder's eVAE
    try:
        evae = json.loads(evae_config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not a model folder: loading it says what is wrong
    missing = []
    if not evae.get("sharp_encoder", True):
        missing.append("no sharp encoder E2 (E1's latent stands in as the latent target)")
    if config.lambda2 > 0 and not (folder / DISCRIMINATOR_FILE).is_file():
        missing.append("no latent discriminator (the GAN term starts with a new one)")
    if not missing:
        return None
    return (f"--init {config.init} has {' and '.join(missing)}: a model folder exported for "
            "inference has neither; 'deblurcli export RUN -o DIR --keep-training-state' keeps "
            "both")


def train_diffusion(config: DiffusionTrainConfig,
                    progress: ProgressFn | None = None) -> engine.TrainResult:
    """Run stage 2 (see the module docstring); returns the :class:`TrainResult`.

    Raises:
        DeblurcliError: bad settings, data or weights (one line, before any training step).
    """
    from deblurcli.modelfolder import save_model_folder
    from deblurcli.models.discriminator import DiscriminatorConfig, LatentDiscriminator

    if not config.full and config.adapter not in ADAPTER_CHOICES:
        raise DeblurcliError(f"unknown adapter {config.adapter!r}; choose real or synthetic")
    if config.train_encoder and not config.full:
        raise DeblurcliError("--train-encoder needs --full (a LoRA run keeps the eVAE frozen)")
    if config.progressive and (not config.progressive_sizes or any(
            not isinstance(s, int) or s < 8 or s % 8 for s in config.progressive_sizes)):
        raise DeblurcliError("progressive sizes must be positive multiples of 8 (got "
                             f"{config.progressive_sizes})")
    if config.init and config.lora_rank is not None and not config.resume:
        # (a run resumed or exported from before this check keeps its recorded, unused rank)
        raise DeblurcliError(f"--lora-rank sets the rank of new adapters; --init {config.init} "
                             "brings its own, whose rank stays: leave --lora-rank out")
    validate_common(config)
    accelerator = engine.make_accelerator(config)
    progressive = (tuple(config.progressive_sizes), config.progressive_steps) \
        if config.progressive else None
    data = engine.build_data(config, world=accelerator.num_processes, progressive=progressive,
                             device=accelerator.device)
    output, state = engine.prepare_output(config)
    model = build_model(config)
    params = set_trainable(model, config)
    if state is not None:
        sources.check(state.config, model, doing="--resume")
    frozen = sources.fingerprints(model)  # what a resume or an export must rebuild the same
    if config.grad_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.evae.enable_gradient_checkpointing()
    perceptual = build_perceptual(config.perceptual, fallback=config.perceptual_fallback,
                                  device=accelerator.device)
    if perceptual.name != config.perceptual:  # the fallback: the run records what it trains with
        config = dataclasses.replace(config, perceptual=perceptual.name)
    if config.lambda1 > 0:
        check_perceptual_size(perceptual, min(progressive[0]) if progressive else config.crop,
                              "larger progressive sizes" if progressive else "a larger --crop")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        disc = LatentDiscriminator(DiscriminatorConfig(
            in_channels=int(model.evae.config.latent_channels)))
    if config.init:  # continue the GAN of the folder's run when it saved its discriminator
        from deblurcli.modelfolder import read_discriminator

        saved = read_discriminator(config.init)
        if saved is not None and {k: tuple(v.shape) for k, v in saved.items()} == \
                {k: tuple(v.shape) for k, v in disc.state_dict().items()}:
            disc.load_state_dict(saved)
    gen = GeneratorStep(model)
    opt_g = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=config.disc_lr or config.lr,
                              betas=(0.5, 0.999))
    sched_g = engine.lr_scheduler(opt_g, config.warmup_steps, config.lr_schedule,
                                  config.max_steps)
    # the discriminator steps from --gan-start on: its warm-up starts there, its cosine ends
    # with the generator's
    sched_d = engine.lr_scheduler(opt_d, config.warmup_steps, config.lr_schedule,
                                  max(1, config.max_steps - config.gan_start))
    gen, disc, opt_g, opt_d = accelerator.prepare(gen, disc, opt_g, opt_d)
    perceptual = perceptual.to(accelerator.device)
    use_gan = config.lambda2 > 0

    def train_step(batch: dict, step: int) -> dict[str, float]:
        blur, sharp = batch["blur"], batch["sharp"]
        gan_on = use_gan and step >= config.gan_start
        raw_disc = accelerator.unwrap_model(disc)
        with accelerator.accumulate(gen, disc):
            with accelerator.autocast():
                pred, z_hat = gen(blur)
            pred = pred.float()
            l2 = F.mse_loss(pred, sharp)
            ea = edge_aware(perceptual, pred, sharp) if config.lambda1 > 0 else l2.new_zeros(())
            loss = l2 + config.lambda1 * ea
            z_real = None
            if config.latent_weight > 0 or gan_on:
                with torch.no_grad(), accelerator.autocast():
                    z_real = sharp_latent(accelerator.unwrap_model(gen).model.evae, sharp)
            lat = l2.new_zeros(())
            if config.latent_weight > 0:
                lat = F.mse_loss(z_hat.float(), z_real.float())
                loss = loss + config.latent_weight * lat
            lg = l2.new_zeros(())
            if gan_on:
                frozen = {n: p.detach() for n, p in raw_disc.named_parameters()}
                with accelerator.autocast():
                    fake_logits = torch.func.functional_call(raw_disc, frozen, (z_hat,))
                lg = generator_loss(fake_logits.float())
                loss = loss + config.lambda2 * lg
            engine.optimizer_step(accelerator, loss, opt_g, sched_g, params=params,
                                  max_grad_norm=config.max_grad_norm)
            ld = l2.new_zeros(())
            if gan_on:
                with accelerator.autocast():
                    logits = disc(torch.cat([z_real, z_hat.detach()], dim=0))
                real_logits, fake_logits = logits.float().chunk(2)
                ld = discriminator_loss(real_logits, fake_logits)
                engine.optimizer_step(accelerator, ld, opt_d, sched_d)
        return {"loss": loss.item(), "l2": l2.item(), "ea": float(ea.item()),
                "latent": float(lat.item()),
                "gan_g": float(lg.item()), "gan_d": float(ld.item())}

    def predict(blur: torch.Tensor, sharp: torch.Tensor) -> torch.Tensor:
        return accelerator.unwrap_model(gen)(blur)[0]

    def save_output(folder: Path) -> None:
        net = accelerator.unwrap_model(gen).model
        extra = {"trained_by": "deblurcli train-diffusion",
                 "trained": "full" if config.full else f"adapter:{config.adapter}",
                 **with_absolute_paths({"init": config.init, "evae": config.evae,
                                        "base_model": config.base_model})}
        save_model_folder(folder, net, extra=extra,
                          discriminator=accelerator.unwrap_model(disc).state_dict())

    stage = engine.Stage(modules={"unet": gen, "disc": disc},
                         optimizers={"unet": opt_g, "disc": opt_d},
                         schedulers={"unet": sched_g, "disc": sched_d}, train_step=train_step,
                         predict=predict, save_output=save_output, trained=[gen, disc],
                         saved={sources.RECORD_KEY: frozen},
                         schedule_starts={"disc": config.gan_start})
    return engine.run(config, accelerator, stage, data, output, state, progress)
