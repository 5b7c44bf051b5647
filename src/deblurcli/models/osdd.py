"""OSDDModel: blurry image -> eVAE E1 -> one UNet evaluation -> eVAE decoder -> sharp image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deblurcli.errors import WeightsError
from deblurcli.models import adapters as ad
from deblurcli.models.evae import EVAE
from deblurcli.models.onestep import (
    DEFAULT_PROMPT_TOKENS,
    DEFAULT_TIMESTEP,
    OneStepDenoiser,
    predict_x0,
)


BLEND_ADAPTER = "blend"  # name of an adapter file loaded by OSDDModel.fuse_adapter_file


@dataclass
class OSDDConfig:
    """Everything needed to build an :class:`OSDDModel` with random weights.

    Attributes:
        evae: :class:`EVAE` config kwargs (AutoencoderKL keys + ``use_skips``, ``sharp_encoder``).
        unet: ``UNet2DConditionModel`` config kwargs.
        timestep: fixed diffusion timestep of the one step.
        prompt_tokens: number of learned prompt tokens.
        lora: adapter name -> :class:`LoraSpec` (normally ``real`` and ``synthetic``; empty: none).
    """

    evae: dict[str, Any]
    unet: dict[str, Any]
    timestep: int = DEFAULT_TIMESTEP
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    lora: dict[str, ad.LoraSpec] = field(default_factory=dict)


def tiny_osdd_config(*, use_skips: bool = True, sharp_encoder: bool = True, lora_rank: int = 2,
                     with_adapters: bool = True) -> OSDDConfig:
    """A tiny OSDD configuration (≈0.34 M parameters) for tests and benchmarks on CPU.

    Same structure as SD 2.1 (4-level VAE, latent factor 8, cross-attention UNet with linear
    projections), with few channels.
    """
    evae = dict(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                norm_num_groups=4, sample_size=64, use_skips=use_skips, sharp_encoder=sharp_encoder)
    unet = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
                use_linear_projection=True)
    spec = ad.LoraSpec(rank=lora_rank, alpha=float(lora_rank))
    lora = {ad.REAL: spec, ad.SYNTHETIC: ad.LoraSpec(rank=lora_rank, alpha=2.0 * lora_rank)} \
        if with_adapters else {}
    return OSDDConfig(evae=evae, unet=unet, timestep=DEFAULT_TIMESTEP, prompt_tokens=4, lora=lora)


class OSDDModel(nn.Module):
    """The one-step deblurring network.

    ``forward(x)`` takes ``(B, 3, H, W)`` in ``[-1, 1]`` (H, W multiples of 8) and returns the
    same shape, clamped to ``[-1, 1]``. The eVAE and the denoiser may hold different dtypes (e.g.
    an fp32 eVAE with an fp16 UNet); forward casts between them and returns ``x.dtype``.

    Attributes:
        evae: the :class:`EVAE`.
        denoiser: the :class:`OneStepDenoiser` (UNet, prompt, timestep).
        lora_specs: adapter name -> :class:`LoraSpec` of the adapters inside the UNet (empty
            once fused).
        fused_gamma: the gamma merged into the UNet weights, or ``None`` when unfused.
        gamma: the current unfused blend weight (``None`` when there are no adapters).
    """

    def __init__(self, evae: EVAE, denoiser: OneStepDenoiser,
                 lora_specs: dict[str, ad.LoraSpec] | None = None, *,
                 fused_gamma: float | None = None) -> None:
        super().__init__()
        self.evae = evae
        self.denoiser = denoiser
        self.lora_specs: dict[str, ad.LoraSpec] = dict(lora_specs or {})
        self.fused_gamma = fused_gamma
        self.gamma: float | None = None

    # ---------------------------------------------------------------- properties
    @property
    def unet(self) -> nn.Module:
        """The denoiser's UNet."""
        return self.denoiser.unet

    @property
    def vae_dtype(self) -> torch.dtype:
        """dtype of the eVAE parameters."""
        return next(self.evae.parameters()).dtype

    @property
    def unet_dtype(self) -> torch.dtype:
        """dtype of the UNet parameters."""
        return next(self.denoiser.unet.parameters()).dtype

    @property
    def has_dual_adapters(self) -> bool:
        """True when both ``real`` and ``synthetic`` adapters are present (unfused)."""
        return all(name in self.lora_specs for name in ad.ADAPTER_NAMES)

    # ---------------------------------------------------------------- adapters
    def set_gamma(self, gamma: float) -> None:
        """Unfused blend: ``W x + gamma * Delta_real x + (1 - gamma) * Delta_synthetic x``."""
        if self.fused_gamma is not None:
            raise WeightsError(f"the adapters are already fused (gamma={self.fused_gamma:g}); "
                               "gamma can no longer change")
        if not self.has_dual_adapters:
            raise WeightsError("this model has no real/synthetic adapters to blend")
        ad.set_gamma(self.denoiser.unet, gamma)
        self.gamma = float(gamma)

    def fuse(self, gamma: float) -> None:
        """Merge the gamma-blend into the UNet's base weights and remove the LoRA layers."""
        if self.fused_gamma is not None:
            raise WeightsError(f"the adapters are already fused (gamma={self.fused_gamma:g})")
        if not self.has_dual_adapters:
            raise WeightsError("this model has no real/synthetic adapters to fuse")
        ad.fuse_adapters(self.denoiser.unet, gamma)
        self.fused_gamma = float(gamma)
        self.gamma = float(gamma)
        self.lora_specs = {}

    def fuse_adapter_file(self, path: str | Path) -> None:
        """Run one adapter file -- ``deblurcli blend``'s output -- instead of the model's own
        adapters: diffusers loads it (``load_lora_adapter``) and fuses it alone into the UNet
        (in float32, exact); every LoRA layer is then unloaded. The blend's γ, recorded in the
        file, becomes :attr:`fused_gamma`.

        Raises :class:`WeightsError` for a model already fused, a file that does not fit or one
        that records no γ (not written by ``deblurcli blend``).
        """
        if self.fused_gamma is not None:
            raise WeightsError(f"this model's adapters are already fused (gamma="
                               f"{self.fused_gamma:g}); an adapter file needs an unfused model "
                               "folder")
        path = Path(path)
        _, _, metadata = ad.read_lora_file(path)
        gamma = ad.blend_gamma(metadata, path)
        try:
            self.unet.load_lora_adapter(str(path), adapter_name=BLEND_ADAPTER, prefix=None)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise WeightsError(f"{path.name} does not fit the model "
                               f"({' '.join(str(exc).split())[:160]})") from None
        ad.merge_and_unload(self.unet, {BLEND_ADAPTER: 1.0})  # real/synthetic go unmerged
        self.fused_gamma = gamma
        self.gamma = gamma
        self.lora_specs = {}

    # ---------------------------------------------------------------- running
    def latent_step(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """``(z_l, z_h, skips)``: blurry latent, one-step sharp latent and the eVAE skips.

        Only the UNet runs in the UNet's dtype; the x0 step uses float32 (at t = 999 it divides
        by sqrt(abar) ~ 0.07, which would magnify half-precision rounding of ``z_l``).
        """
        z_l, skips = self.evae.encode(x.to(self.vae_dtype))
        eps = self.denoiser.predict_eps(z_l.to(self.unet_dtype))
        z_h = predict_x0(z_l.float(), eps.float(), self.denoiser.alpha_bar)
        return z_l, z_h.to(z_l.dtype), skips

    def forward(self, x: Tensor, *, clamp: bool = True) -> Tensor:
        """Deblur ``x`` ``(B, 3, H, W)`` in ``[-1, 1]``; H and W must be multiples of 8."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        factor = 2 ** (self.evae.num_levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"height and width must be multiples of {factor}, "
                             f"got {tuple(x.shape[-2:])}")
        _, z_h, skips = self.latent_step(x)
        out = self.evae.decode(z_h.to(self.vae_dtype), skips)
        if clamp:
            out = out.clamp(-1.0, 1.0)
        return out.to(x.dtype)


def _unet_from_config(unet_config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(dict(unet_config))


def build_osdd(config: OSDDConfig, *, seed: int = 0, randomize_adapters: bool = False) -> OSDDModel:
    """A new :class:`OSDDModel` with random weights, deterministic in ``seed``.

    The global torch RNG is left untouched (weights are drawn inside ``torch.random.fork_rng``).
    New LoRA adapters are no-ops (B = 0) unless ``randomize_adapters`` draws random B factors
    (useful for tests: makes the adapters change the output).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        evae = EVAE(**config.evae)
        evae.init_skip_weights(generator)
        unet = _unet_from_config(config.unet)
        denoiser = OneStepDenoiser(unet, timestep=config.timestep,
                                   prompt_tokens=config.prompt_tokens, generator=generator)
        for name, spec in config.lora.items():
            ad.add_adapter(unet, name, spec)
        if randomize_adapters:
            randomize_lora(unet, generator)
    model = OSDDModel(evae, denoiser, dict(config.lora))
    if model.has_dual_adapters:
        model.set_gamma(0.5)
    return model.eval()


@torch.no_grad()
def randomize_lora(unet: nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """Give every LoRA B factor random values (tests/benchmarks: makes adapters non-trivial)."""
    for _, layer in ad.lora_layers(unet):
        for name in layer.lora_B:
            w = layer.lora_B[name].weight
            w.copy_(std * torch.randn(w.shape, generator=generator).to(w.dtype))


def osdd_from_base_model(base_model: str | Path, *, lora: dict | None = None,
                         timestep: int = DEFAULT_TIMESTEP,
                         prompt_tokens: int = DEFAULT_PROMPT_TOKENS, use_skips: bool = True,
                         sharp_encoder: bool = True, seed: int = 0) -> OSDDModel:
    """An :class:`OSDDModel` whose UNet and eVAE start from a diffusers Stable Diffusion model.

    ``base_model`` is a folder or a hub id in the local cache (see ``models/pretrained.py``); its
    ``unet`` and ``vae`` are loaded with ``local_files_only=True``; the
    eVAE skips start as exact no-ops; ``lora`` (name -> LoraSpec) adapters are added (B = 0).
    Raises :class:`WeightsError` when the folder does not hold a loadable SD model.
    """
    from deblurcli.models.onestep import SD_BETA_END, SD_BETA_START, SD_TRAIN_TIMESTEPS
    from deblurcli.models.pretrained import check_noise_schedule

    check_noise_schedule(base_model, beta_start=SD_BETA_START, beta_end=SD_BETA_END,
                         steps=SD_TRAIN_TIMESTEPS)
    unet = load_base_unet(base_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        evae = EVAE.from_vae(base_model, use_skips=use_skips, sharp_encoder=sharp_encoder,
                             generator=generator)
        denoiser = OneStepDenoiser(unet, timestep=timestep, prompt_tokens=prompt_tokens,
                                   generator=generator)
        for name, spec in (lora or {}).items():
            ad.add_adapter(unet, name, spec)
    model = OSDDModel(evae, denoiser, dict(lora or {}))
    if model.has_dual_adapters:
        model.set_gamma(0.5)
    return model


def load_base_unet(base_model: str | Path) -> nn.Module:
    """``UNet2DConditionModel`` from an SD folder (``unet/``), a UNet folder or a cached hub id."""
    from diffusers import UNet2DConditionModel

    from deblurcli.models.pretrained import load_part

    return load_part(UNet2DConditionModel, base_model, "unet", "UNet")
