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


def test_a_model_with_one_adapter_runs_it_whole_and_says_gamma_is_ignored(photo, tmp_path,
                                                                           tiny_model_folder):
    """A folder with only its real adapter ran it at full strength whatever --gamma said,
    while the run reported --gamma's value: it runs as γ = 1 and says so."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from deblurcli.images import read_image
    from deblurcli.modelindex import sha256_file

    folder = tiny_model_folder
    real = load_file(folder / "lora_real.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=gen) * 0.3 if "lora_B" in k else v
               for k, v in real.items()}, folder / "lora_real.safetensors")
    (folder / "lora_synthetic.safetensors").unlink()
    index = json.loads((folder / "model_index.json").read_text())
    del index["_deblurcli"]["adapters"]["synthetic"]
    (folder / "model_index.json").write_text(json.dumps(index))
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != "checksums.sha256")
    (folder / "checksums.sha256").write_text(
        "".join(f"{sha256_file(folder / n)}  {n}\n" for n in names))
    outputs = []
    for backend, gamma in (("torch", "0.2"), ("torch", "1")):
        out = tmp_path / f"out-{backend}-{gamma}"
        result = run(photo, out, "--weights", folder, "--gamma", gamma, "--tile", "32",
                     "--backend", backend)
        assert result.exit_code == 0, result.output
        said = " ".join(result.stderr.split())
        assert "gamma=1 (real adapter only)" in said, said
        ignored = "this model has only its real adapter (it runs as gamma=1); gamma=0.2 is ignored"
        assert (ignored in said) == (gamma == "0.2"), said
        outputs.append(read_image(out / "photo.png").pixels)
    assert np.abs(outputs[0] - outputs[1]).max() == 0
