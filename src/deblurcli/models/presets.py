"""Named architecture presets for :class:`~deblurcli.models.osdd.OSDDModel`.

* ``compact`` -- the architecture of the embedded default model: the same structure as OSDD
  (eVAE with skips and two encoders, a cross-attention UNet with a learned prompt, two LoRA
  adapters), with a 3-level eVAE (latent factor 4, 16 channels: see ``compact_config``), sized
  to deblur a 1280x720 photo in seconds on a laptop CPU and to fit in
  ``weights/`` (< 50 MB in fp16). It has no pretrained prior: its base UNet is trained with
  ``train-diffusion --full``, and its eVAE has an image skip (the decoder corrects its input
  image; see ``EVAE``), which an eVAE trained from scratch needs.
* ``sd21`` -- paper scale: the Stable Diffusion 2.1 VAE (83.7 M parameters; 96.1 M with our skip
  blocks, without E2) and the SD-2.1 UNet (865.9 M parameters). Normally initialised from a diffusers SD-2.1
  folder (``--base-model``); built with random weights for benchmarks (cost does not depend on
  the values).
* ``tiny`` -- a few hundred thousand parameters, for tests.

The functions return fresh :class:`OSDDConfig` objects (no shared mutable state).
"""

from __future__ import annotations

from collections.abc import Callable

from deblurcli.models import adapters as ad
from deblurcli.models.osdd import OSDDConfig, tiny_osdd_config

#: LoRA rank used by one-step SD restorers (OSEDiff uses 4); the OSDD paper gives no rank.
PAPER_LORA_RANK = 4


def sd21_config(*, sharp_encoder: bool = False, lora_rank: int = PAPER_LORA_RANK,
                timestep: int = 999) -> OSDDConfig:
    """Paper-scale configuration: SD-2.1 VAE + SD-2.1 UNet (the diffusers ``config.json`` values)."""
    evae = dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
        norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
        use_skips=True, sharp_encoder=sharp_encoder,
    )
    unet = dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                        "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
        norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    )
    return OSDDConfig(evae=evae, unet=unet, timestep=timestep, prompt_tokens=77,
                      lora=ad.dual_lora(lora_rank))


#: Fixed timestep of the compact model. SD-based OSDD uses t = 999 so that the *pretrained* UNet
#: works in its most generative regime; the compact UNet has no prior to exploit and is trained
#: from scratch, where t = 999 would multiply every error of the predicted noise by
#: 1/sqrt(abar_999) = 14.6. At t = 200 (abar = 0.754) the one-step formula stays the same but the
#: blurry latent dominates z_h = (z_l - 0.496 eps) / 0.868, which trains stably on a CPU budget.
COMPACT_TIMESTEP = 200


def compact_config(*, sharp_encoder: bool = True, lora_rank: int = 8,
                   timestep: int = COMPACT_TIMESTEP) -> OSDDConfig:
    """The embedded default model's architecture (CPU-friendly OSDD).

    Latent factor 4 with 16 channels (SD's VAE: factor 8, 4 channels). An SD VAE's latent is a
    near-lossless code because it was pretrained at scale; a from-scratch eVAE with 4 channels at
    1/8 resolution is not, and its blurry latent then no longer holds the detail the one-step UNet
    needs to undo the blur (measured in docs/default-model.md: attempts 1-5 used factor 8 and
    4 channels). 48 values per 4x4 RGB patch in 16 channels keep that detail. The eVAE's mid
    block has no self-attention: at 1/4 resolution it would cost more than the whole model.
    """
    evae = dict(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, act_fn="silu",
        norm_num_groups=4, sample_size=256, scaling_factor=1.0, mid_block_add_attention=False,
        use_skips=True, sharp_encoder=sharp_encoder, image_skip=True,
    )
    unet = dict(
        sample_size=64, in_channels=16, out_channels=16, layers_per_block=1,
        block_out_channels=(48, 96, 192),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # diffusers reads ``attention_head_dim`` as the number of heads (a legacy name): (3, 3, 6)
        # heads give 32-channel heads at 96 and 192 channels (smaller heads ran slower on the CPU,
        # docs/performance.md); the first level has no attention.
        attention_head_dim=(3, 3, 6), cross_attention_dim=256, use_linear_projection=True,
        norm_num_groups=16, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
    )
    return OSDDConfig(evae=evae, unet=unet, timestep=timestep, prompt_tokens=8,
                      lora=ad.dual_lora(lora_rank))


PRESETS: dict[str, Callable[..., OSDDConfig]] = {
    "compact": compact_config,
    "sd21": sd21_config,
    "tiny": tiny_osdd_config,
}


def preset_config(name: str, **kwargs) -> OSDDConfig:
    """The :class:`OSDDConfig` of a named preset (``compact``, ``sd21``, ``tiny``)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
    return factory(**kwargs)
