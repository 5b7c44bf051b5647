"""A blended adapter file is usable: ``deblur --weights MODEL --lora blend.safetensors`` gives
what ``deblur --weights MODEL --gamma G`` gives."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.images import read_image, write_image


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_deblur_with_a_blend_file_equals_deblur_at_its_gamma(tiny_model_folder, tmp_path):
    photo = tmp_path / "in" / "photo.png"
    write_image(photo, np.random.default_rng(1).random((32, 40, 3), dtype=np.float32))
    blend = tmp_path / "blend.safetensors"
    made = cli("blend", "--weights", tiny_model_folder, "--gamma", "0.3", "-o", blend)
    assert made.exit_code == 0, made.output
    with_file = cli("deblur", photo, tmp_path / "a", "--weights", tiny_model_folder, "--lora",
                    blend, "--tile", "0")
    at_gamma = cli("deblur", photo, tmp_path / "b", "--weights", tiny_model_folder, "--gamma",
                   "0.3", "--tile", "0")
    other = cli("deblur", photo, tmp_path / "c", "--weights", tiny_model_folder, "--gamma",
                "1", "--tile", "0")
    for result in (with_file, at_gamma, other):
        assert result.exit_code == 0, result.output
    assert "gamma=0.3 (fused)" in " ".join(with_file.stderr.split())
    # a --gamma the blend overrides: said of the blend, not of the (unfused) folder
    for backend in ("torch", "onnx"):
        asked = cli("deblur", photo, tmp_path / f"d-{backend}", "--weights", tiny_model_folder,
                    "--lora", blend, "--gamma", "0.9", "--tile", "32", "--backend", backend)
        assert asked.exit_code == 0, asked.output
        said = " ".join(asked.stderr.split())
        assert "the blend blend.safetensors holds gamma=0.3; gamma=0.9 is ignored" in said, said
    a, b, c = (read_image(tmp_path / d / "photo.png").pixels for d in "abc")
    np.testing.assert_allclose(a, b, atol=2 / 255)
    assert np.abs(a - c).max() > 4 / 255  # the file's gamma, not the default, was used


def test_lora_errors_are_one_line(tiny_model_folder, tmp_path):
    photo = tmp_path / "photo.png"
    write_image(photo, np.full((16, 16, 3), 0.5, dtype=np.float32))
    missing = cli("deblur", photo, tmp_path / "o", "--weights", tiny_model_folder, "--lora",
                  tmp_path / "none.safetensors")
    assert missing.exit_code == 1 and "--lora" in missing.stderr  # a bad path, as -w's
    fused = tmp_path / "fused"
    assert cli("blend", "--fuse", "--weights", tiny_model_folder, "--gamma", "0.5",
               "-o", fused).exit_code == 0
    blend = tmp_path / "blend.safetensors"
    assert cli("blend", "--weights", tiny_model_folder, "--gamma", "0.5", "-o", blend).exit_code == 0
    again = cli("deblur", photo, tmp_path / "o", "--weights", fused, "--lora", blend)
    assert again.exit_code == 1
    assert again.stderr.strip().splitlines() == [again.stderr.strip()]
    assert "already fused" in again.stderr


@pytest.mark.parametrize("fuse", [True, False])
def test_an_adapter_file_without_a_blend_gamma_is_refused(tiny_model_folder, tmp_path, fuse):
    """A model folder's own adapter file records no γ: merged at full strength it would run a
    blend nobody asked for while the run reported --gamma's value."""
    photo = tmp_path / "in" / "photo.png"
    write_image(photo, np.zeros((16, 16, 3), np.float32))
    result = cli("deblur", photo, tmp_path / "out", "--weights", tiny_model_folder, "--lora",
                 tiny_model_folder / "lora_real.safetensors", "--tile", "0",
                 *([] if fuse else ["--no-fuse"]))
    assert result.exit_code == 1
    assert "not a 'deblurcli blend' file" in result.output
    assert not (tmp_path / "out").exists()
