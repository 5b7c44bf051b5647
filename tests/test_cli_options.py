"""deblur and eval accept and reject the same device, precision and tiling values; the two
training commands share their flags, declared once."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deblurcli.cli.app import app


@pytest.mark.parametrize("flags, hint", [
    (["--tile", "100"], "--tile"),
    (["--tile", "-8"], "--tile"),
    (["--tile", "64", "--tile-overlap", "60"], "--tile-overlap"),
    (["--tile-overlap", "-1"], "--tile-overlap"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "fp8"], "--dtype"),
])
def test_deblur_and_eval_reject_the_same_run_options(tmp_path, flags, hint):
    blur = tmp_path / "blur"
    blur.mkdir()
    runner = CliRunner()
    deblur = runner.invoke(app, ["deblur", str(blur), str(tmp_path / "o"), *flags])
    evaluate = runner.invoke(app, ["eval", "--blur", str(blur), "--weights", str(tmp_path),
                                   *flags])
    for result in (deblur, evaluate):
        assert result.exit_code == 2, result.output
        assert hint in result.output


def test_deblur_eval_and_library_share_the_tile_defaults():
    import dataclasses
    import inspect

    import typer.main

    from deblurcli.evaluation.runner import ModelConfig
    from deblurcli.pipeline import DeblurPipeline
    from deblurcli.tiles import DEFAULT_OVERLAP, DEFAULT_TILE

    assert (DEFAULT_TILE, DEFAULT_OVERLAP) == (448, 32)
    command = typer.main.get_command(app)
    for name in ("deblur", "eval"):
        params = {p.name: p for p in command.commands[name].params}
        assert params["tile"].default == DEFAULT_TILE, name
        assert params["tile_overlap"].show_default == str(DEFAULT_OVERLAP), name
    signature = inspect.signature(DeblurPipeline.__init__).parameters
    assert (signature["tile"].default, signature["overlap"].default) == (DEFAULT_TILE,
                                                                         DEFAULT_OVERLAP)
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert (fields["tile"], fields["overlap"]) == (DEFAULT_TILE, DEFAULT_OVERLAP)


def test_deblur_and_eval_take_the_run_options_declared_once():
    import ast
    import collections

    import typer.main

    import deblurcli.cli.options as options

    tree = ast.parse(Path(options.__file__).read_text(encoding="utf-8"))
    names = collections.Counter(t.id for node in tree.body if isinstance(node, ast.Assign)
                                for t in node.targets if isinstance(t, ast.Name))
    assert not [n for n, count in names.items() if count > 1]  # a second alias hides the first
    command = typer.main.get_command(app)
    deblur, evaluate = ({p.name: p for p in command.commands[name].params}
                        for name in ("deblur", "eval"))
    for name in ("device", "dtype", "tile", "tile_overlap", "batch_size", "color_fix"):
        assert (deblur[name].opts, deblur[name].help) == (evaluate[name].opts,
                                                          evaluate[name].help), name
    assert deblur["batch_size"].opts == ["--batch-size", "-b"]
    assert deblur["batch_size"].help.startswith("Tiles per network call")


def test_both_training_commands_take_the_shared_flags_with_the_configs_defaults():
    import inspect

    import typer.main

    from deblurcli.cli.options import training_options
    from deblurcli.train.config import CommonConfig, DiffusionTrainConfig

    command = typer.main.get_command(app)
    vae, diffusion = ({p.name: p for p in command.commands[name].params}
                      for name in ("train-vae", "train-diffusion"))
    for name in inspect.signature(training_options).parameters:
        assert (vae[name].opts, vae[name].help) == (diffusion[name].opts, diffusion[name].help)
        if name != "quiet":  # unset: the config file or the dataclass decides
            assert vae[name].default is None, name
    assert vae["crop"].show_default == str(CommonConfig.crop)
    assert diffusion["lambda2"].show_default == str(DiffusionTrainConfig.lambda2)
    assert vae["augment"].show_default == "augment" and vae["cpu"].show_default == "no-cpu"


@pytest.mark.parametrize("flags, hint", [
    (["--max-steps", "0"], "--max-steps"),
    (["--real-fraction", "1.5"], "--real-fraction"),
    (["--crop", "36"], "--crop"),
    (["--lr", "0"], "--lr"),
    (["--layout", "zip"], "--layout"),
])
def test_both_training_commands_reject_the_same_values(tmp_path, flags, hint):
    for name in ("train-vae", "train-diffusion"):
        result = CliRunner().invoke(app, [name, "--data", str(tmp_path), "-o",
                                          str(tmp_path / "o"), *flags])
        assert result.exit_code == 2 and hint in result.output, (name, result.output)
        assert not (tmp_path / "o").exists()


def test_a_small_tile_alone_lowers_the_default_overlap():
    """``--tile 32`` alone exited 2 over the default --tile-overlap 32, a flag not given."""
    from deblurcli.cli.options import check_tiling

    assert [check_tiling(tile, None) for tile in (0, 8, 16, 32, 40, 448)] == \
        [32, 0, 8, 24, 32, 32]
    assert check_tiling(32, 8) == 8
    with pytest.raises(Exception, match="at most --tile minus 8"):
        check_tiling(32, 32)  # given: checked as given
