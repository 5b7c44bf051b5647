"""``deblur`` flags a first-time user tries: format aliases and what a fused model reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.images import write_image


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(*args):
    return CliRunner().invoke(app, ["deblur", *map(str, args)])


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "photo.png"
    write_image(path, np.random.default_rng(0).random((24, 32, 3), dtype=np.float32))
    return path


@pytest.mark.parametrize("ext, written", [("jpeg", "photo.jpg"), ("JPEG", "photo.jpg"),
                                          ("tiff", "photo.tif"), ("jpg", "photo.jpg"),
                                          (".webp", "photo.webp")])
def test_ext_accepts_jpeg_and_tiff_spellings(photo, tiny_model_folder, tmp_path, ext, written):
    result = run(photo, tmp_path / "out", "--weights", tiny_model_folder, "--ext", ext,
                 "--tile", "0")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] \
        == [written]


def test_a_fused_model_reports_the_gamma_it_runs_at(photo, tiny_model_folder, tmp_path):
    from deblurcli.modelfolder import fuse_model_folder

    fused = tmp_path / "fused"
    fuse_model_folder(tiny_model_folder, fused, gamma=0.3)
    result = run(photo, tmp_path / "out", "--weights", fused, "--gamma", "1", "--tile", "0")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "fused at gamma=0.3; gamma=1 is ignored" in text
    assert "gamma=0.3 (fused)" in text and "gamma=1," not in text
    # no --gamma: nothing was asked for, so nothing is ignored (it used to say 0.7 was)
    for backend in ("torch", "onnx"):
        quiet = run(photo, tmp_path / f"out-{backend}", "--weights", fused, "--tile", "64",
                    "--backend", backend)
        assert quiet.exit_code == 0, quiet.output
        assert "ignored" not in quiet.stderr and "gamma=0.3 (fused)" in quiet.stderr, backend


def test_progress_reaches_a_log_when_stderr_is_not_a_terminal(photo, tiny_model_folder, tmp_path):
    result = run(photo, tmp_path / "out", "--weights", tiny_model_folder, "--tile", "16",
                 "--tile-overlap", "8")
    assert result.exit_code == 0, result.output
    assert "images 1/1 (100%)" in result.stderr and "tiles 6/6 (100%)" in result.stderr


def test_minus_zero_gamma_is_zero(photo, tiny_model_folder, tmp_path):
    """`--gamma -0` ran and printed `gamma=-0`, and keyed an ONNX export of its own."""
    from deblurcli.cli.evaluate import parse_gammas

    result = run(photo, tmp_path / "out", "--weights", tiny_model_folder, "--gamma", "-0",
                 "--tile", "0")
    assert result.exit_code == 0, result.output
    assert "gamma=0," in " ".join(result.stderr.split())
    assert [str(g) for g in parse_gammas("-0,0")] == ["0.0"]
