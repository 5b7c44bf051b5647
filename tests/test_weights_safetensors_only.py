"""Weights are read from safetensors only: a folder holding just a pickled ``.bin`` is refused
without being unpickled (issue 20, case 5)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from deblurcli.errors import WeightsError
from deblurcli.models.pretrained import load_part


def test_a_pickle_only_base_model_is_refused_unread(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
                        latent_channels=4, layers_per_block=1)
    folder = tmp_path / "sd" / "vae"
    vae.save_pretrained(folder, safe_serialization=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    assert not list(folder.glob("*.safetensors"))

    unpickled = []

    def no_unpickling(*args, **kwargs):  # diffusers turns any error here into its own OSError
        unpickled.append(args)
        raise RuntimeError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(WeightsError, match="cannot load the VAE"):
        load_part(AutoencoderKL, tmp_path / "sd", "vae", "VAE")
    assert unpickled == []
