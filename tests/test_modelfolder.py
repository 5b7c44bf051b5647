"""Model folder: round trips, fp16 storage, fused folders, base models, and clear WeightsErrors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deblurcli.errors import WeightsError
from deblurcli.modelfolder import (
    CHECKSUM_FILE,
    NO_DEFAULT_MODEL,
    default_weights_dir,
    fuse_model_folder,
    load_model_folder,
    read_model_config,
    save_model_folder,
)


def image(size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rewrite_checksums(folder: Path) -> None:
    lines = []
    for line in (folder / CHECKSUM_FILE).read_text().splitlines():
        name = line.split("  ", 1)[1]
        lines.append(f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n")
    (folder / CHECKSUM_FILE).write_text("".join(lines))


@torch.no_grad()
def test_round_trip_unfused_and_fused(tiny_osdd, tiny_model_folder):
    model = tiny_osdd(seed=0)
    x = image()
    model.set_gamma(0.3)
    expected = model(x)
    unfused = load_model_folder(tiny_model_folder, gamma=0.3, fuse=False)
    assert not unfused.training and unfused.fused_gamma is None
    assert torch.equal(unfused(x), expected)
    unfused.set_gamma(0.8)  # gamma stays adjustable when unfused
    model.set_gamma(0.8)
    torch.testing.assert_close(unfused(x), model(x), atol=0, rtol=0)
    fused = load_model_folder(tiny_model_folder, gamma=0.3)
    assert fused.fused_gamma == 0.3 and fused.lora_specs == {}
    torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=0)


def test_folder_contents_and_checksums(tiny_model_folder):
    names = sorted(p.name for p in tiny_model_folder.iterdir())
    assert names == ["checksums.sha256", "config.json", "evae.safetensors",
                     "lora_real.safetensors", "lora_synthetic.safetensors", "prompt.safetensors",
                     "unet.safetensors"]
    for line in (tiny_model_folder / CHECKSUM_FILE).read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((tiny_model_folder / name).read_bytes()).hexdigest() == digest
    config = read_model_config(tiny_model_folder)
    assert config["format_version"] == 1 and config["storage_dtype"] == "float32"
    assert config["lora"]["real"]["rank"] == 2 and config["fused"] is None
    assert {"deblurcli", "torch", "diffusers", "peft"} <= set(config["versions"])
    assert config["timestep"] == 999 and config["prompt_tokens"] == 4


@torch.no_grad()
def test_fp16_storage_and_mixed_run_dtypes(tiny_osdd, tmp_path):
    model = tiny_osdd(seed=1)
    save_model_folder(tmp_path / "m", model, storage_dtype=torch.float16,
                      include_sharp_encoder=False)
    config = read_model_config(tmp_path / "m")
    assert config["storage_dtype"] == "float16" and config["evae"]["sharp_encoder"] is False
    loaded = load_model_folder(tmp_path / "m", gamma=0.5, dtype=torch.bfloat16,
                               vae_dtype=torch.float32)
    assert loaded.unet_dtype == torch.bfloat16 and loaded.vae_dtype == torch.float32
    assert loaded.evae.encoder_sharp is None
    x = image()
    out = loaded(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float(out.abs().max()) <= 1.0
    model.set_gamma(0.5)
    assert (out - model(x)).abs().mean() < 0.05


def test_corrupt_file_is_reported(tiny_model_folder):
    path = tiny_model_folder / "unet.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"unet\.safetensors .*corrupt"):
        load_model_folder(tiny_model_folder)


def test_missing_file_is_reported(tiny_model_folder):
    (tiny_model_folder / "lora_synthetic.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"missing file lora_synthetic\.safetensors"):
        load_model_folder(tiny_model_folder)
    (tiny_model_folder / "checksums.sha256").unlink()
    with pytest.raises(WeightsError, match=r"missing file checksums\.sha256"):
        load_model_folder(tiny_model_folder)
    with pytest.raises(WeightsError, match=r"missing file lora_synthetic\.safetensors"):
        load_model_folder(tiny_model_folder, verify=False)


def test_shape_mismatch_is_reported(tiny_model_folder):
    config = json.loads((tiny_model_folder / "config.json").read_text())
    config["evae"]["latent_channels"] = 8  # same keys, other shapes
    (tiny_model_folder / "config.json").write_text(json.dumps(config))
    rewrite_checksums(tiny_model_folder)
    with pytest.raises(WeightsError, match=r"evae\.safetensors: .* has shape"):
        load_model_folder(tiny_model_folder)


def test_wrong_prompt_shape_is_reported(tiny_model_folder):
    save_file({"prompt_embeds": torch.zeros(1, 5, 16)},
              str(tiny_model_folder / "prompt.safetensors"))
    rewrite_checksums(tiny_model_folder)
    with pytest.raises(WeightsError, match=r"prompt\.safetensors"):
        load_model_folder(tiny_model_folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(WeightsError, match="model folder not found"):
        load_model_folder(tmp_path / "absent")
    with pytest.raises(WeightsError, match="missing config.json"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "deblurcli-osdd",
                                                      "format_version": 99}))
    with pytest.raises(WeightsError, match="upgrade deblurcli"):
        load_model_folder(tmp_path)


def test_default_weights_dir_says_no_model_installed():
    folder = default_weights_dir()
    assert folder.name == "weights" and folder.parent.name == "deblurcli"
    if not (folder / "config.json").is_file():
        with pytest.raises(WeightsError) as info:
            load_model_folder(folder)
        assert str(info.value) == NO_DEFAULT_MODEL


@torch.no_grad()
def test_base_model_supplies_the_unet_and_vae(tiny_osdd, tmp_path):
    from diffusers import AutoencoderKL

    from deblurcli.models import adapters as ad
    from deblurcli.models.evae import VAE_CONFIG_KEYS

    model = tiny_osdd(seed=2)
    # a Stable Diffusion folder with the same base UNet and VAE weights
    sd = tmp_path / "sd"
    unet_state = {k.replace(".base_layer.", "."): v for k, v in model.unet.state_dict().items()
                  if ".lora_" not in k}
    from diffusers import UNet2DConditionModel

    base_unet = UNet2DConditionModel.from_config(model.unet.config)
    base_unet.load_state_dict(unet_state)
    base_unet.save_pretrained(sd / "unet")
    vae = AutoencoderKL(**{k: model.evae.config[k] for k in VAE_CONFIG_KEYS})
    vae.load_state_dict({k: v for k, v in model.evae.state_dict().items()
                         if k.split(".")[0] in ("encoder", "decoder", "quant_conv",
                                                "post_quant_conv")})
    vae.save_pretrained(sd / "vae")

    save_model_folder(tmp_path / "m", model, include_unet=False)
    assert not (tmp_path / "m" / "unet.safetensors").exists()
    with pytest.raises(WeightsError, match="--base-model"):
        load_model_folder(tmp_path / "m")
    loaded = load_model_folder(tmp_path / "m", gamma=0.6, fuse=False, base_model=sd)
    model.set_gamma(0.6)
    x = image()
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)
    assert ad.adapter_names(loaded.unet) == ["real", "synthetic"]


@torch.no_grad()
def test_fuse_model_folder_ignores_gamma_with_a_note(tiny_osdd, tiny_model_folder, tmp_path):
    fuse_model_folder(tiny_model_folder, tmp_path / "fused", 0.25)
    config = read_model_config(tmp_path / "fused")
    assert config["fused"] == {"gamma": 0.25} and config["lora"] == {}
    assert not (tmp_path / "fused" / "lora_real.safetensors").exists()
    notes: list[str] = []
    fused = load_model_folder(tmp_path / "fused", gamma=0.9, warn=notes.append)
    assert len(notes) == 1 and "gamma=0.25" in notes[0]
    model = tiny_osdd(seed=0)
    model.set_gamma(0.25)
    x = image()
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=0)
    with pytest.raises(WeightsError, match="already fused"):
        fused.set_gamma(0.5)
    with pytest.raises(WeightsError, match="already fused"):
        fuse_model_folder(tmp_path / "fused", tmp_path / "again", 0.5)


def test_export_model_folder_keeps_adapters_drops_e2_and_halves_storage(tiny_model_folder, tmp_path):
    import torch

    from deblurcli.modelfolder import export_model_folder, load_model_folder, read_model_config

    out = tmp_path / "exported"
    export_model_folder(tiny_model_folder, out, extra={"note": "test"})
    config = read_model_config(out)
    assert config["storage_dtype"] == "float16"
    assert config["extra"]["note"] == "test"
    assert set(config["lora"]) == {"real", "synthetic"}
    assert (out / "evae.safetensors").stat().st_size < (tiny_model_folder / "evae.safetensors").stat().st_size
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for gamma in (0.0, 1.0):
        a = load_model_folder(tiny_model_folder, gamma=gamma)(x)
        b = load_model_folder(out, gamma=gamma)(x)
        assert torch.allclose(a, b, atol=2e-2), (a - b).abs().max()


def test_model_folder_files_get_normal_permissions(tiny_model_folder, tmp_path):
    import os
    import stat

    from deblurcli.modelfolder import export_model_folder

    old = os.umask(0o022)
    try:
        export_model_folder(tiny_model_folder, tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes
