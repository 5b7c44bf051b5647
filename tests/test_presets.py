"""Architecture presets: sizes that the docs and the default-model budget rely on."""

from __future__ import annotations

import pytest
import torch

from deblurcli.models.presets import PRESETS, preset_config


def _count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd21_preset_matches_stable_diffusion_2_1_unet_size():
    from diffusers import UNet2DConditionModel

    config = preset_config("sd21")
    with torch.device("meta"):  # no memory, no time: only the structure is counted
        unet = UNet2DConditionModel.from_config(config.unet)
    n = _count_params(unet)
    assert 865_000_000 < n < 867_000_000, n  # SD-2.1 UNet: 865.9 M parameters


def test_compact_preset_fits_the_weights_budget():
    from deblurcli.models.osdd import build_osdd

    model = build_osdd(preset_config("compact", sharp_encoder=False))
    n = _count_params(model)
    # weights/ must stay under 50 MB with fp16 storage (2 bytes per parameter)
    assert 2 * n < 45e6, n


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'sd15'"):
        preset_config("sd15")


def test_presets_are_fresh_objects():
    a, b = preset_config("compact"), preset_config("compact")
    a.unet["block_out_channels"] = (1,)
    assert b.unet["block_out_channels"] != (1,)
    assert set(PRESETS) >= {"compact", "sd21", "tiny"}
