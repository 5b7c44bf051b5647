"""``--base-model`` sources: an SD folder, a part's own folder, or a hub id in the local cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from deblurcli.errors import WeightsError
from deblurcli.models.pretrained import load_part

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
                         latent_channels=4, layers_per_block=1)


def _cache_repo(cache: Path, repo: str) -> Path:
    """An offline Hugging Face cache entry for ``repo`` (what `huggingface-cli download` makes)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return root / "snapshots" / COMMIT


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_model_folder_or_the_parts_own_folder(tmp_path):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "sd" / "vae")
    assert _same(load_part(AutoencoderKL, tmp_path / "sd", "vae", "VAE"), vae)
    assert _same(load_part(AutoencoderKL, str(tmp_path / "sd" / "vae"), "vae", "VAE"), vae)


def test_a_hub_id_is_read_from_the_local_cache(hub_cache):
    vae = _tiny_vae()
    vae.save_pretrained(_cache_repo(hub_cache, "acme/tiny-sd") / "vae")
    assert _same(load_part(AutoencoderKL, "acme/tiny-sd", "vae", "VAE"), vae)
    # a repository that holds only the VAE (config at its top)
    vae.save_pretrained(_cache_repo(hub_cache, "acme/tiny-vae"))
    assert _same(load_part(AutoencoderKL, "acme/tiny-vae", "vae", "VAE"), vae)


def test_a_hub_id_that_is_not_cached_says_how_to_fetch_it(hub_cache, recwarn):
    with pytest.raises(WeightsError, match="hf download acme/absent") as info:
        load_part(UNet2DConditionModel, "acme/absent", "unet", "UNet")
    assert "\n" not in str(info.value)
    # and only that: diffusers' deprecated huggingface_hub argument was warned about first
    assert not [w for w in recwarn if "local_dir_use_symlinks" in str(w.message)]


def test_the_fetch_command_is_one_the_installed_huggingface_hub_ships():
    import shutil

    from deblurcli.models.pretrained import hf_download_command

    command = hf_download_command("acme/tiny", "model.safetensors")
    assert command.endswith(" download acme/tiny model.safetensors")
    # the console script named in the hint is installed next to this Python
    tool = command.split()[0]
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / tool).exists() or shutil.which(tool) is not None


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(WeightsError, match="UNet source not found"):
        load_part(UNet2DConditionModel, tmp_path / "missing", "unet", "UNet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no diffusers UNet found"):
        load_part(UNet2DConditionModel, tmp_path / "empty", "unet", "UNet")
    (tmp_path / "broken" / "unet").mkdir(parents=True)
    (tmp_path / "broken" / "unet" / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot load the UNet"):
        load_part(UNet2DConditionModel, tmp_path / "broken", "unet", "UNet")


def test_a_base_model_predicting_v_or_on_another_schedule_is_refused(tmp_path, hub_cache):
    """An SD 2.x 768 model predicts v: its UNet's output was taken for the noise ε."""
    import json

    from deblurcli.models.onestep import SD_BETA_END, SD_BETA_START, SD_TRAIN_TIMESTEPS
    from deblurcli.models.pretrained import check_noise_schedule

    def sd_folder(root: Path, **scheduler) -> Path:
        (root / "scheduler").mkdir(parents=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
            "prediction_type": "epsilon", **scheduler}))
        (root / "unet").mkdir()
        return root

    def check(source):
        check_noise_schedule(source, beta_start=SD_BETA_START, beta_end=SD_BETA_END,
                             steps=SD_TRAIN_TIMESTEPS)

    check(sd_folder(tmp_path / "eps"))  # SD 1.x / 2.x-base: fine, as is its unet/ folder
    check(tmp_path / "eps" / "unet")
    check(tmp_path / "eps-less")  # nothing to read: nothing refused
    with pytest.raises(WeightsError, match="predicts 'v_prediction'.*stable-diffusion-2-1-base"):
        check(sd_folder(tmp_path / "v", prediction_type="v_prediction") / "unet")
    with pytest.raises(WeightsError, match="another noise schedule \\(linear"):
        check(sd_folder(tmp_path / "lin", beta_schedule="linear"))
    with pytest.raises(WeightsError, match="another noise schedule \\(zero-SNR rescaled"):
        check(sd_folder(tmp_path / "zsnr", rescale_betas_zero_snr=True))
    with pytest.raises(WeightsError, match="does not say its noise schedule"):
        check(sd_folder(tmp_path / "null", beta_start=None))
    sd_folder(_cache_repo(hub_cache, "acme/sd-768"), prediction_type="v_prediction")
    with pytest.raises(WeightsError, match="acme/sd-768 predicts 'v_prediction'"):
        check("acme/sd-768")
