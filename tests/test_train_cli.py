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
    ("train-diffusion", ["--config", "huge.toml", "--random-evae"], "unknown model preset 'huge'"),
    ("train-diffusion", ["--preset", "tiny", "--full", "--evae", "nope"], "no eVAE in nope"),
    ("train-vae", ["--config", "huge.toml"], "unknown eVAE preset 'huge'"),
])
def test_a_run_that_fails_on_its_settings_leaves_no_output_folder(pairs, tmp_path, command,
                                                                  extra, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "huge.toml").write_text('preset = "huge"\n')  # a file's value: not a flag's
    data = ["--blur", str(pairs / "blur"), "--sharp", str(pairs / "sharp"), "--cpu", "-q", *extra]
    result = CliRunner().invoke(app, [command, *data, "-o", str(tmp_path / "new" / "run")])
    assert result.exit_code == 1 and words in result.stderr, result.output
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"  # a folder that was there before keeps what it held
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert CliRunner().invoke(app, [command, *data, "-o", str(mine)]).exit_code == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["train-vae", "train-diffusion"])
def test_an_unknown_preset_flag_is_a_usage_error(tmp_path, command) -> None:
    """It exited 1 (the library's error) where every other unknown choice exits 2."""
    from deblurcli.models.presets import PRESETS
    from deblurcli.train.config import PRESET_CHOICES

    assert PRESET_CHOICES == tuple(PRESETS)
    result = CliRunner().invoke(app, [command, "--preset", "huge", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "--preset: 'huge' is not one of compact, sd21, tiny" in result.stderr
    assert not (tmp_path / "r").exists()


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


def test_flags_a_run_makes_of_no_effect_are_said(pairs, tmp_path):
    """They were accepted without a word: --real-fraction without --frames, --adapter with
    --full, GAN settings with --lambda2 0, --progressive-steps without --progressive."""
    result = _train(pairs, tmp_path / "run", "--random-evae", "--max-steps", "1",
                    "--real-fraction", "0.9", "--adapter", "real", "--gan-start", "5",
                    "--progressive-steps", "5")
    assert result.exit_code == 0, result.stderr
    for words in ("--real-fraction has no effect without --frames",
                  "--adapter has no effect with --full",
                  "--gan-start has no effect with --lambda2 0",
                  "--progressive-steps has no effect without --progressive"):
        assert f"warning: {words}" in result.stderr, words
    quiet = _train(pairs, tmp_path / "plain", "--random-evae", "--max-steps", "1")
    assert "warning" not in quiet.stderr


def test_config_given_twice_is_refused(pairs, tmp_path):
    """The last file alone counted: the settings of the first were dropped without a word."""
    for name in ("a.toml", "b.toml"):
        (tmp_path / name).write_text("max-steps = 1\n")
    result = _train(pairs, tmp_path / "run", "--random-evae", "--config",
                    str(tmp_path / "a.toml"), "--config", str(tmp_path / "b.toml"))
    assert result.exit_code == 2 and "give one file, not 2" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resuming_past_max_steps_is_refused(pairs, tmp_path):
    """It trained 0 steps, wrote the model again and recorded the lower --max-steps."""
    out = tmp_path / "run"
    assert _train(pairs, out, "--random-evae", "--max-steps", "3").exit_code == 0
    before = (out / "config.json").read_text()
    result = CliRunner().invoke(app, ["train-diffusion", "--resume", "latest", "-o", str(out),
                                      "--max-steps", "2", "-q"])
    assert result.exit_code == 1
    assert "the run is at step 3, past --max-steps 2" in result.stderr
    assert (out / "config.json").read_text() == before


def test_a_perceptual_fallback_is_said_and_recorded(pairs, tmp_path, monkeypatch):
    """--perceptual dists without its weights trained with the fallback silently, and the run
    recorded dists."""
    import json

    from deblurcli.train import losses

    real = losses.perceptual_available
    monkeypatch.setattr(losses, "perceptual_available",
                        lambda name: (False, ["its weights"]) if name == "dists" else real(name))
    out = tmp_path / "run"
    result = _train(pairs, out, "--random-evae", "--max-steps", "1", "--perceptual", "dists",
                    "--perceptual-fallback", "none")
    assert result.exit_code == 0, result.stderr
    assert "weights of --perceptual dists are missing: training with --perceptual-fallback " \
        "none" in " ".join(result.stderr.split())
    assert json.loads((out / "config.json").read_text())["perceptual"] == "none"
