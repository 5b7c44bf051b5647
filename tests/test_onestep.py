"""SD noise schedule, the x0 formula and the one-step denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from deblurcli.models.onestep import (
    DEFAULT_TIMESTEP,
    OneStepDenoiser,
    alpha_bar_at,
    predict_x0,
    sd_alphas_cumprod,
)


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False)


def test_schedule_matches_diffusers_scaled_linear():
    ours = sd_alphas_cumprod()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), sd_scheduler().alphas_cumprod, atol=1e-6, rtol=1e-5)
    # first beta is exactly beta_start, abar decreases monotonically
    assert math.isclose(1 - float(ours[0]), 0.00085, rel_tol=1e-12)
    assert bool((ours[1:] < ours[:-1]).all())
    assert alpha_bar_at(DEFAULT_TIMESTEP) == float(ours[DEFAULT_TIMESTEP])
    with pytest.raises(ValueError):
        alpha_bar_at(1000)


def test_predict_x0_inverts_the_forward_process_and_matches_ddpm():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in (0, 250, 999):
        ab = alpha_bar_at(t)
        z_t = math.sqrt(ab) * z0 + math.sqrt(1 - ab) * eps
        torch.testing.assert_close(predict_x0(z_t, eps, ab), z0, atol=1e-9, rtol=1e-9)
        sched = sd_scheduler()
        ref = sched.step(eps.float(), t, z_t.float()).pred_original_sample
        torch.testing.assert_close(predict_x0(z_t.float(), eps.float(), ab), ref,
                                   atol=1e-4, rtol=1e-4)
    # per-sample alpha_bar
    abs_ = torch.tensor([alpha_bar_at(10), alpha_bar_at(900)], dtype=torch.float64)
    z_t = abs_.sqrt().view(-1, 1, 1, 1) * z0 + (1 - abs_).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(predict_x0(z_t, eps, abs_), z0, atol=1e-9, rtol=1e-9)


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=4,
                                norm_num_groups=4).eval()


@torch.no_grad()
def test_denoiser_is_one_unet_call_then_x0():
    unet = tiny_unet()
    den = OneStepDenoiser(unet, timestep=500, prompt_tokens=3,
                          generator=torch.Generator().manual_seed(0))
    assert den.prompt_embeds.shape == (1, 3, 16) and den.prompt_embeds.requires_grad
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    eps = unet(z, torch.tensor([500, 500]),
               encoder_hidden_states=den.prompt_embeds.expand(2, -1, -1)).sample
    torch.testing.assert_close(den.predict_eps(z), eps)
    torch.testing.assert_close(den(z), predict_x0(z, eps, alpha_bar_at(500)))
    with pytest.raises(ValueError):
        OneStepDenoiser(unet, timestep=-1)


def test_prompt_init_and_gradient():
    unet = tiny_unet()
    init = torch.arange(32, dtype=torch.float32).reshape(2, 16)
    den = OneStepDenoiser(unet, prompt_init=init)
    assert den.prompt_tokens == 2 and torch.equal(den.prompt_embeds[0], init)
    den(torch.randn(1, 4, 8, 8)).mean().backward()
    assert den.prompt_embeds.grad is not None and den.prompt_embeds.grad.abs().sum() > 0


@torch.no_grad()
def test_osdd_forward_is_encode_one_unet_call_decode(tiny_osdd):
    model = tiny_osdd(seed=0)
    calls = []
    model.unet.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = model(x)
    assert len(calls) == 1 and out.shape == x.shape and float(out.abs().max()) <= 1.0
    z_l, skips = model.evae.encode(x)
    manual = model.evae.decode(model.denoiser(z_l), skips).clamp(-1, 1)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 3, 30, 32))
