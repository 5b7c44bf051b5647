"""The one-step denoiser: a Stable Diffusion UNet evaluated once at a fixed timestep.

OSDD treats the latent of the blurry image, ``z_l``, as the noisy latent ``z_t`` at a fixed timestep
``t``. The UNet (conditioned on a learned prompt embedding instead of a text encoder) predicts the
noise ``eps``; the sharp latent is the DDPM clean-sample estimate

    z_h = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)

where ``abar_t`` comes from Stable Diffusion's "scaled linear" beta schedule.

Default timestep: 999 -- the convention of one-step restoration methods built on SD
(OSEDiff and its successors, which OSDD follows): the degraded latent is placed at the
most-noisy training timestep, so the pretrained UNet is used in the regime where it makes the
largest, most generative corrections. It is configurable (``OneStepDenoiser(timestep=...)``) and
stored in the model folder.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

#: Stable Diffusion's training schedule (v1.x / 2.x): "scaled_linear" betas.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_TIMESTEPS = 1000
DEFAULT_TIMESTEP = 999
DEFAULT_PROMPT_TOKENS = 77


@lru_cache(maxsize=8)
def _alphas_cumprod_cached(beta_start: float, beta_end: float, steps: int) -> tuple[float, ...]:
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return tuple(torch.cumprod(1.0 - betas, dim=0).tolist())


def sd_alphas_cumprod(beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END,
                      steps: int = SD_TRAIN_TIMESTEPS) -> Tensor:
    """``abar_t`` for each timestep of SD's scaled-linear schedule (float64, shape ``(steps,)``).

    betas are linear in sqrt-space from ``beta_start`` to ``beta_end``; ``abar_t = prod(1 - beta)``.
    """
    return torch.tensor(_alphas_cumprod_cached(float(beta_start), float(beta_end), int(steps)),
                        dtype=torch.float64)


def alpha_bar_at(timestep: int, *, steps: int = SD_TRAIN_TIMESTEPS) -> float:
    """``abar`` at one integer timestep of the SD schedule (a Python float, computed in float64)."""
    if not 0 <= int(timestep) < steps:
        raise ValueError(f"timestep must be in [0, {steps - 1}], got {timestep}")
    return float(sd_alphas_cumprod(steps=steps)[int(timestep)])


def predict_x0(z_t: Tensor, eps: Tensor, alpha_bar: float | Tensor) -> Tensor:
    """Clean-sample estimate ``(z_t - sqrt(1 - abar) * eps) / sqrt(abar)`` (pure function).

    ``alpha_bar`` is a scalar or a per-sample tensor of shape ``(B,)``.
    """
    if isinstance(alpha_bar, Tensor) and alpha_bar.ndim > 0:
        ab = alpha_bar.to(torch.float64).reshape(-1, *([1] * (z_t.ndim - 1)))
        return (z_t - (1 - ab).sqrt().to(z_t) * eps) / ab.sqrt().to(z_t)
    ab = float(alpha_bar)
    return (z_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)


def _unet_call(unet: nn.Module):
    """``unet`` itself, or -- for a UNet without LoRA layers or hooks -- its forward without
    diffusers' LoRA-scale wrapper.

    Recent diffusers wrap ``UNet2DConditionModel.forward`` in ``apply_lora_scale``, which scales
    peft LoRA layers by ``cross_attention_kwargs["scale"]`` and, to do so, imports peft (and with
    it transformers: about 2 s on a 2-core CPU) on every call. deblurcli passes no scale, so for
    a UNet without LoRA layers (fused weights) the wrapper does nothing but that import.
    """
    forward = getattr(type(unet), "forward", None)
    inner = getattr(forward, "__wrapped__", None)
    code = getattr(forward, "__code__", None)
    if (inner is None or code is None or not code.co_filename.endswith("peft_utils.py")
            or getattr(unet, "_hf_peft_config_loaded", False) or unet._forward_hooks
            or unet._forward_pre_hooks):
        return unet
    return lambda *args, **kwargs: inner(unet, *args, **kwargs)


class OneStepPrompt(ModelMixin, ConfigMixin):
    """The learned prompt embedding and the fixed timestep: the ``prompt`` component of an
    :class:`~deblurcli.models.osdd_pipeline.OSDDPipeline` (its own ``config.json`` and weights,
    saved and loaded with ``save_pretrained`` / ``from_pretrained``).

    Args:
        timestep: the fixed timestep ``t`` in ``[0, 999]``.
        num_tokens: number of learned prompt tokens ``N``.
        embed_dim: the UNet's ``cross_attention_dim`` ``D``.
    """

    @register_to_config
    def __init__(self, timestep: int = DEFAULT_TIMESTEP, num_tokens: int = DEFAULT_PROMPT_TOKENS,
                 embed_dim: int = 1024) -> None:
        super().__init__()
        alpha_bar_at(int(timestep))  # ValueError for a timestep outside the schedule
        self.prompt_embeds = nn.Parameter(torch.zeros(1, int(num_tokens), int(embed_dim)))


class OneStepDenoiser(nn.Module):
    """A diffusers ``UNet2DConditionModel`` + a learned prompt embedding + a fixed timestep.

    Args:
        unet: any ``UNet2DConditionModel`` (its ``cross_attention_dim`` sets the prompt width).
        prompt: a :class:`OneStepPrompt` (as loaded); otherwise one is made from the arguments:
        timestep: the fixed timestep ``t`` in ``[0, 999]``.
        prompt_tokens: number of learned prompt tokens ``N``.
        prompt_init: optional ``(N, D)`` or ``(1, N, D)`` tensor to initialise the prompt with
            (e.g. an empty-prompt CLIP embedding); otherwise ``N(0, 1)`` drawn from ``generator``.
        generator: ``torch.Generator`` for the random prompt initialisation.
    """

    def __init__(self, unet: nn.Module, prompt: OneStepPrompt | None = None, *,
                 timestep: int = DEFAULT_TIMESTEP, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                 prompt_init: Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.unet = unet
        dim = int(unet.config.cross_attention_dim)
        if prompt is None:
            if prompt_init is not None:
                init = prompt_init.detach().reshape(1, -1, dim).float().clone()
            else:
                init = torch.randn(1, int(prompt_tokens), dim, generator=generator)
            prompt = OneStepPrompt(timestep=int(timestep), num_tokens=int(init.shape[1]),
                                   embed_dim=dim)
            with torch.no_grad():
                prompt.prompt_embeds.copy_(init)
        elif int(prompt.config.embed_dim) != dim:
            raise ValueError(f"the prompt is {prompt.config.embed_dim} wide, the UNet's "
                             f"cross_attention_dim is {dim}")
        self.prompt = prompt
        self.alpha_bar = alpha_bar_at(self.timestep)

    @property
    def timestep(self) -> int:
        """The fixed timestep of the one step."""
        return int(self.prompt.config.timestep)

    @property
    def prompt_embeds(self) -> nn.Parameter:
        """The learned prompt embedding ``(1, N, D)``."""
        return self.prompt.prompt_embeds

    @property
    def prompt_tokens(self) -> int:
        """Number of learned prompt tokens."""
        return int(self.prompt_embeds.shape[1])

    def predict_eps(self, z_t: Tensor) -> Tensor:
        """One UNet evaluation: the predicted noise for ``z_t`` at the fixed timestep."""
        batch = z_t.shape[0]
        prompt = self.prompt_embeds.to(z_t.dtype).expand(batch, -1, -1)
        t = torch.full((batch,), self.timestep, device=z_t.device, dtype=torch.long)
        return _unet_call(self.unet)(z_t, t, encoder_hidden_states=prompt, return_dict=False)[0]

    def forward(self, z_t: Tensor) -> Tensor:
        """The sharp-latent estimate ``predict_x0(z_t, unet(z_t), abar_t)``."""
        return predict_x0(z_t, self.predict_eps(z_t), self.alpha_bar)
