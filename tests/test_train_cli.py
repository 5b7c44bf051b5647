"""``train-diffusion`` as a first-time user meets it: no silent random eVAE, readable validation."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deblurcli.cli.app import app

FAST = ["--preset", "tiny", "--cpu", "--crop", "32", "--batch-size", "2", "--val-size", "32",
        "--perceptual", "none", "--lambda2", "0", "--full"]


def _train(pairs: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["train-diffusion", "--blur", str(pairs / "blur"), "--sharp",
                                    str(pairs / "sharp"), *FAST, "-o", str(out), "-q", *extra])


def test_a_bare_preset_is_refused_before_anything_is_written(pairs, tmp_path):
    result = _train(pairs, tmp_path / "run", "--max-steps", "1")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "random, untrained eVAE" in lines[0]
    for way in ("--evae", "--init", "--base-model", "--random-evae"):
        assert way in lines[0]
    assert not (tmp_path / "run").exists()


def test_validation_lines_show_the_inputs_psnr(pairs, tmp_path):
    out = tmp_path / "run"
    result = _train(pairs, out, "--random-evae", "--max-steps", "2", "--validate-every", "1",
                    "--val-count", "1")
    assert result.exit_code == 0, result.stderr
    lines = re.findall(r"^step (\d): val_psnr ([\d.]+) dB \(input ([\d.]+) dB\)", result.stderr,
                       flags=re.M)
    assert [int(step) for step, _, _ in lines] == [1, 2]
    # the input's PSNR is a property of the held-out pair: the same at every validation
    assert lines[0][2] == lines[1][2] and float(lines[0][2]) > 10
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    logged = [r for r in rows if r.get("val_input_psnr")]
    assert len(logged) == 2 and float(logged[0]["val_input_psnr"]) == pytest.approx(
        float(lines[0][2]), abs=0.01)


def test_training_progress_reaches_a_log(pairs, tmp_path):
    result = CliRunner().invoke(app, ["train-diffusion", "--blur", str(pairs / "blur"), "--sharp",
                                      str(pairs / "sharp"), *FAST, "--random-evae",
                                      "--max-steps", "2", "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^training 2/2 \(100%\) [\d.]+ (it/s|s/it) .*loss=", result.stderr, flags=re.M), \
        result.stderr


@pytest.mark.parametrize("command, extra, words", [
    ("train-diffusion", ["--preset", "huge", "--random-evae"], "unknown model preset 'huge'"),
    ("train-diffusion", ["--preset", "tiny", "--full", "--evae", "nope"], "no eVAE in nope"),
    ("train-vae", ["--preset", "huge"], "unknown eVAE preset 'huge'"),
])
def test_a_run_that_fails_on_its_settings_leaves_no_output_folder(pairs, tmp_path, command,
                                                                  extra, words):
    data = ["--blur", str(pairs / "blur"), "--sharp", str(pairs / "sharp"), "--cpu", "-q", *extra]
    result = CliRunner().invoke(app, [command, *data, "-o", str(tmp_path / "new" / "run")])
    assert result.exit_code == 1 and words in result.stderr, result.output
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"  # a folder that was there before keeps what it held
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert CliRunner().invoke(app, [command, *data, "-o", str(mine)]).exit_code == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_settings_that_would_be_silently_ignored_are_refused(tmp_path) -> None:
    from deblurcli.errors import DeblurcliError
    from deblurcli.train.config import VaeTrainConfig, read_config_file, validate_common

    twice = tmp_path / "twice.toml"
    twice.write_text("max-steps = 3\nmax_steps = 5\n")
    with pytest.raises(DeblurcliError, match="the setting max-steps is given twice"):
        read_config_file(twice)
    tables = tmp_path / "tables.toml"
    tables.write_text("[train]\ncrop = 32\n[data]\ncrop = 64\n")
    with pytest.raises(DeblurcliError, match="the setting crop is given twice"):
        read_config_file(tables)
    for settings, words in (({"val_data": "v", "val_count": 5}, "--val-data or --val-count"),
                            ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
                            ({"seed": -1}, "seed must be >= 0")):
        with pytest.raises(DeblurcliError, match=f"invalid setting: .*{words}"):
            validate_common(VaeTrainConfig(**settings))
