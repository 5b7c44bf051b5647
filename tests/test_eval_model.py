"""Model mode of ``deblurcli eval``: exact per-γ fusing and a 2-value γ sweep (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from skimage import data
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.evaluation.runner import ModelConfig, _model_for_gammas
from deblurcli.images import write_image


def _pairs(folder: Path, count: int) -> None:
    """``count`` 40x40 crops of a photo in ``folder/sharp``, blurred by 2 px in ``folder/blur``."""
    img = data.astronaut().astype(np.float32) / 255
    for i in range(count):
        sharp = img[100 + 40 * i: 140 + 40 * i, 200:240]
        write_image(folder / "sharp" / f"p{i}.png", sharp)
        write_image(folder / "blur" / f"p{i}.png", (sharp + np.roll(sharp, 2, axis=1)) / 2)


def test_each_gamma_equals_a_fresh_fused_load(tiny_model_folder):
    from deblurcli.modelfolder import load_model_folder

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    mc = ModelConfig(weights=tiny_model_folder, gammas=(1.0, 0.3))
    outputs = {}
    with torch.no_grad():
        for gamma, model, seconds in _model_for_gammas(mc, torch.device("cpu"), torch.float32,
                                                       None):
            assert model.fused_gamma == gamma and seconds >= 0
            outputs[gamma] = model(x)
        for gamma, got in outputs.items():
            fresh = load_model_folder(tiny_model_folder, gamma=gamma, fuse=True)
            assert torch.equal(got, fresh(x)), gamma
    assert not torch.allclose(outputs[1.0], outputs[0.3])   # γ changes the output


def test_gamma_sweep_writes_json_and_plot(tiny_model_folder, tmp_path):
    _pairs(tmp_path, 2)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, [
        "eval", "--blur", str(tmp_path / "blur"), "--sharp", str(tmp_path / "sharp"),
        "--weights", str(tiny_model_folder), "--gamma", "1,0.5", "--metrics", "psnr,ssim",
        "--device", "cpu", "--dtype", "fp32", "--tile", "0", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "gamma=1" in res.stdout and "gamma=0.5" in res.stdout and "input" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {"input", "gamma=1", "gamma=0.5", "meta"} <= set(summary)
    for key in ("gamma=1", "gamma=0.5"):
        row = summary[key]
        assert np.isfinite(row["psnr"]) and 0 <= row["ssim"] <= 1
        assert row["model_seconds_per_image"] > 0 and row["peak_rss_mb"] > 0
        assert row["n_images"] == 2
        assert row["precision"] == "float32"  # (an fp16 UNet's row says "float16, eVAE float32")
    assert "precision" not in summary["input"]
    assert summary["gamma=1"]["psnr"] != summary["gamma=0.5"]["psnr"]
    assert summary["meta"]["args"]["gamma"] == "1,0.5"
    assert (out / "gamma_sweep.png").read_bytes()[:4] == b"\x89PNG"

    fixed = tmp_path / "fixed"
    res = CliRunner().invoke(app, [
        "eval", "--blur", str(tmp_path / "blur"), "--sharp", str(tmp_path / "sharp"),
        "--weights", str(tiny_model_folder), "--gamma", "1", "--metrics", "psnr",
        "--device", "cpu", "--dtype", "fp32", "--tile", "0", "--color-fix", "2",
        "--out", str(fixed), "-q"])
    assert res.exit_code == 0, res.output
    with_fix = json.loads((fixed / "summary.json").read_text())
    assert with_fix["meta"]["args"]["color_fix"] == 2.0
    assert with_fix["gamma=1"]["psnr"] != summary["gamma=1"]["psnr"]


def test_a_fused_model_warns_only_when_it_runs(tiny_model_folder, tmp_path):
    """A γ sweep of a fused folder warned that γ was ignored and then stopped with an error."""
    import pytest

    from deblurcli.errors import WeightsError
    from deblurcli.modelfolder import fuse_model_folder

    fused = tmp_path / "fused"
    fuse_model_folder(tiny_model_folder, fused, gamma=0.3)
    notes: list[str] = []
    with pytest.raises(WeightsError, match="they are fused at gamma=0.3.*a gamma sweep needs"):
        list(_model_for_gammas(ModelConfig(weights=fused, gammas=(1.0, 0.7)),
                               torch.device("cpu"), torch.float32, notes.append))
    assert notes == []
    ran = list(_model_for_gammas(ModelConfig(weights=fused, gammas=(1.0,)),
                                 torch.device("cpu"), torch.float32, notes.append))
    assert [gamma for gamma, _, _ in ran] == [0.3]
    assert notes == ["this model's adapters are fused at gamma=0.3; gamma=1 is ignored"]
    notes.clear()  # no --gamma given: nothing asked for is ignored
    ran = list(_model_for_gammas(ModelConfig(weights=fused, gammas=(0.7,), gamma_given=False),
                                 torch.device("cpu"), torch.float32, notes.append))
    assert [gamma for gamma, _, _ in ran] == [0.3] and notes == []


def test_an_interrupted_sweep_reports_the_images_every_row_scored(tiny_model_folder, tmp_path,
                                                                   monkeypatch):
    import csv

    from deblurcli.pipeline import DeblurPipeline

    _pairs(tmp_path, 3)
    real_call, calls = DeblurPipeline.__call__, []

    def ctrl_c_at_the_sixth(self, *args, **kwargs):  # γ=1 runs 3 images, γ=0.5 2 of them
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(DeblurPipeline, "__call__", ctrl_c_at_the_sixth)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, [
        "eval", "--blur", str(tmp_path / "blur"), "--sharp", str(tmp_path / "sharp"),
        "--weights", str(tiny_model_folder), "--gamma", "1,0.5,0.3", "--metrics", "psnr",
        "--device", "cpu", "--dtype", "fp32", "--tile", "0", "--out", str(out), "-q"])
    assert res.exit_code == 130, res.output
    assert "first 2 of 3 image(s), which each of them scored; not reached: gamma=0.3" in \
        " ".join(res.stderr.split()) and res.stderr.rstrip().endswith("interrupted")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["interrupted"] is True and summary["meta"]["n_planned"] == 3
    assert summary["meta"]["rows_not_reached"] == ["gamma=0.3"]
    assert summary["meta"]["n_images"] == 2
    with open(out / "per_image.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [line["row"] for line in lines] == ["input"] * 3 + ["gamma=1"] * 3 + ["gamma=0.5"] * 2
    for label in ("input", "gamma=1", "gamma=0.5"):  # every mean is of the same two images
        assert summary[label]["n_images"] == summary[label]["psnr_n"] == 2
        first_two = [float(line["psnr"]) for line in lines if line["row"] == label][:2]
        assert summary[label]["psnr"] == np.mean(first_two)


def test_an_interrupt_before_any_score_leaves_no_report(tmp_path, monkeypatch):
    from deblurcli.evaluation import runner

    write_image(tmp_path / "sharp" / "a.png", np.full((16, 16, 3), 0.5, np.float32))
    write_image(tmp_path / "blur" / "a.png", np.full((16, 16, 3), 0.4, np.float32))

    def ctrl_c(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_read", ctrl_c)
    res = CliRunner().invoke(app, [
        "eval", "--blur", str(tmp_path / "blur"), "--sharp", str(tmp_path / "sharp"),
        "--metrics", "psnr", "--device", "cpu", "--out", str(tmp_path / "report"), "-q"])
    assert res.exit_code == 130 and res.stdout == "", res.output
    assert not (tmp_path / "report").exists()


def test_an_interrupt_while_the_model_loads_reports_nothing(tiny_model_folder, tmp_path,
                                                            monkeypatch):
    """The baseline row was done: a report of it alone replaced an earlier full one."""
    from deblurcli import modelfolder

    img = data.astronaut().astype(np.float32) / 255
    sharp = img[100:140, 200:240]
    write_image(tmp_path / "sharp" / "p.png", sharp)
    write_image(tmp_path / "blur" / "p.png", (sharp + np.roll(sharp, 2, axis=1)) / 2)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelfolder, "ready_model", ctrl_c)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, [
        "eval", "--blur", str(tmp_path / "blur"), "--sharp", str(tmp_path / "sharp"),
        "--weights", str(tiny_model_folder), "--gamma", "1,0.5", "--metrics", "psnr",
        "--device", "cpu", "--dtype", "fp32", "--tile", "0", "--out", str(out), "-q"])
    assert res.exit_code == 130 and res.stdout == "" and not out.exists(), res.output


def test_an_fp16_unets_rows_say_the_evae_ran_in_fp32(monkeypatch) -> None:
    """fp16 results were not comparable with earlier ones: their eVAE's precision changed and
    the report did not say; --no-vae-fp32 keeps it in fp16."""
    import torch

    from deblurcli.evaluation import runner

    seen = []
    monkeypatch.setattr(runner, "_model_for_gammas",
                        lambda mc, device, dtype, warn, vae_dtype=None: seen.append(vae_dtype)
                        or iter(()))
    monkeypatch.setattr("deblurcli.device.resolve_dtype", lambda name, device, warn=None:
                        torch.float16)
    for flag, want in ((None, torch.float32), (False, None), (True, torch.float32)):
        mc = runner.ModelConfig(weights=Path("m"), gammas=(1.0,), vae_fp32=flag)
        runner._model_rows([], None, [], runner.EvalConfig(model=mc), torch.device("cpu"), None,
                           None)
        assert seen[-1] == want


def test_a_sweep_of_a_fused_model_is_refused_before_the_input_is_scored(tiny_model_folder,
                                                                         tmp_path, monkeypatch):
    from deblurcli.evaluation import runner
    from deblurcli.modelfolder import fuse_model_folder

    fused = tmp_path / "fused"
    fuse_model_folder(tiny_model_folder, fused, gamma=0.3)
    for i in range(2):
        write_image(tmp_path / "blur" / f"p{i}.png", np.full((16, 16, 3), 0.5, np.float32))
        write_image(tmp_path / "sharp" / f"p{i}.png", np.full((16, 16, 3), 0.4, np.float32))
    scored = []
    monkeypatch.setattr(runner, "score_image", lambda *a, **k: scored.append(1))
    res = CliRunner().invoke(app, [
        "eval", "--blur", str(tmp_path / "blur"), "--sharp", str(tmp_path / "sharp"),
        "-w", str(fused), "--gamma", "1,0.5", "--metrics", "psnr", "--device", "cpu", "-q"])
    assert res.exit_code == 1 and "a gamma sweep needs a model folder with both, unfused" in res.output
    assert scored == []


def test_model_rows_score_what_deblur_writes(tiny_model_folder, tmp_path):
    """A grey photo: deblur writes a grey file (8-bit), and its row scores that, not the
    model's float RGB; the same for a JPEG (re-encoded at deblur's quality)."""
    from deblurcli.images import read_image

    rng = np.random.default_rng(0)
    grey = rng.random((24, 32, 1), dtype=np.float32).repeat(3, axis=2)
    write_image(tmp_path / "set" / "blur" / "g.png", grey, grayscale=True)
    write_image(tmp_path / "set" / "sharp" / "g.png", np.roll(grey, 1, axis=1), grayscale=True)
    photo = rng.random((24, 32, 3), dtype=np.float32)
    write_image(tmp_path / "set" / "blur" / "c.jpg", photo)
    write_image(tmp_path / "set" / "sharp" / "c.jpg", np.roll(photo, 1, axis=0))
    common = ["--metrics", "psnr,ssim", "--device", "cpu", "--dtype", "fp32", "-q"]
    ran = CliRunner().invoke(app, ["deblur", str(tmp_path / "set" / "blur"),
                                   str(tmp_path / "pred"), "-w", str(tiny_model_folder),
                                   "--gamma", "1", "--backend", "torch", "-q"])
    assert ran.exit_code == 0, ran.output
    assert read_image(tmp_path / "pred" / "g.png").grayscale
    sets = ["--blur", str(tmp_path / "set" / "blur"), "--sharp", str(tmp_path / "set" / "sharp")]
    for args, out in ((["--pred", str(tmp_path / "pred")], "scored"),
                      (["-w", str(tiny_model_folder), "--gamma", "1"], "model")):
        res = CliRunner().invoke(app, ["eval", *sets, *args, *common, "--out", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
    scored = json.loads((tmp_path / "scored" / "summary.json").read_text())["pred"]
    model = json.loads((tmp_path / "model" / "summary.json").read_text())["gamma=1"]
    for name in ("psnr", "ssim"):
        assert model[name] == scored[name], name


def test_an_image_that_cannot_be_read_partway_keeps_what_was_scored(tiny_model_folder, tmp_path,
                                                                     monkeypatch):
    """A file whose header reads but whose pixels do not (a truncated photo) stopped the run
    at that image with nothing written: an hour of scoring lost."""
    from deblurcli.errors import ImageReadError

    _pairs(tmp_path, 3)
    from deblurcli import images

    real_read, reads = images.read_image, []

    def truncated(path, **kwargs):  # read whole as the input row's, then not: the model's
        reads.append(Path(path))
        if reads.count(tmp_path / "blur" / "p2.png") == 2:
            raise ImageReadError(f"cannot read {path}: corrupt or unsupported PNG (truncated)")
        return real_read(path, **kwargs)

    monkeypatch.setattr(images, "read_image", truncated)
    out = tmp_path / "report"
    res = CliRunner().invoke(app, [
        "eval", "--blur", str(tmp_path / "blur"), "--sharp", str(tmp_path / "sharp"),
        "--weights", str(tiny_model_folder), "--gamma", "1", "--metrics", "psnr",
        "--device", "cpu", "--dtype", "fp32", "--tile", "0", "--out", str(out), "-q"])
    assert res.exit_code == 1, res.output
    assert res.stderr.rstrip().splitlines()[-1].startswith("error: cannot read")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["n_images"] == 2 and summary["meta"]["n_planned"] == 3
    assert "truncated" in summary["meta"]["error"] and "interrupted" not in summary["meta"]
    assert summary["gamma=1"]["n_images"] == 2 and "stopped by an error" in res.stdout


def test_what_a_model_row_scores_is_what_deblur_writes_and_reads_back(tmp_path):
    """For every kind of input: grey, 16-bit, alpha (WebP rewrites the colour under clear
    pixels), lossy and lossless formats, values past [0, 1]; the format from the suffix."""
    from deblurcli.evaluation.runner import as_deblur_writes
    from deblurcli.images import read_image

    rng = np.random.default_rng(0)
    output = rng.random((20, 30, 3), dtype=np.float32) * 1.2 - 0.1
    alpha = rng.random((20, 30), dtype=np.float32)
    cases = [("a.png", {}), ("b.png", {"bit_depth": 16}), ("c.png", {"grayscale": True}),
             ("d.png", {"grayscale": True, "bit_depth": 16, "alpha": alpha}),
             ("e.tif", {"bit_depth": 16}), ("f.bmp", {}), ("g.webp", {"alpha": alpha}),
             ("h.webp", {"lossless": True, "alpha": alpha}), ("i.jpg", {"grayscale": True})]
    for name, options in cases:
        write_image(tmp_path / name, rng.random((20, 30, 3), dtype=np.float32), **options)
        image = read_image(tmp_path / name)
        write_image(tmp_path / f"out-{name}", output, like=image)  # as deblur does
        written = read_image(tmp_path / f"out-{name}").pixels
        assert np.array_equal(as_deblur_writes(output, image, tmp_path / name), written), name
    (tmp_path / "a.png").rename(tmp_path / "png-named.jpg")  # deblur goes by the suffix
    image = read_image(tmp_path / "png-named.jpg")
    write_image(tmp_path / "out.jpg", output, like=image)
    assert np.array_equal(as_deblur_writes(output, image, tmp_path / "png-named.jpg"),
                          read_image(tmp_path / "out.jpg").pixels)
