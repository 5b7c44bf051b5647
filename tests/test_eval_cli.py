"""``deblurcli eval`` through Typer's CliRunner, and the report writers (tiny images, CPU)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.evaluation.metrics import Summary
from deblurcli.evaluation.report import plot_sweep, summary_dict, write_outputs
from deblurcli.evaluation.runner import EvalResult, ImageScore, RowResult
from deblurcli.images import write_image

runner = CliRunner()


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args])


@pytest.fixture()
def folders(tmp_path) -> Path:
    """blur/, sharp/ and pred/ with three 40x48 images; pred/a is identical to sharp/a."""
    img = data.astronaut().astype(np.float32) / 255
    for i, name in enumerate(("a", "b", "c")):
        sharp = img[50 * i: 50 * i + 40, 200: 248]
        blur = (sharp + np.roll(sharp, 2, axis=1)) / 2
        write_image(tmp_path / "sharp" / f"{name}.png", sharp)
        write_image(tmp_path / "blur" / f"{name}.png", blur)
        write_image(tmp_path / "pred" / f"{name}.png", sharp if name == "a" else (sharp + blur) / 2)
    return tmp_path


def test_list_metrics(empty_torch_home):
    res = _eval("--list-metrics")
    assert res.exit_code == 0, res.output
    for name in ("psnr", "ssim", "lpips", "dists", "niqe", "musiq", "clipiqa", "maniqa"):
        assert name in res.stdout
    assert "niqe_modelparameters.mat" in res.stdout and "RN50.pt" in res.stdout


def test_pred_mode_writes_table_csv_and_json(folders):
    out = folders / "report"
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--pred", str(folders / "pred"), "--metrics", "psnr,ssim", "--device", "cpu",
                "--out", str(out), "-q")
    assert res.exit_code == 0, res.output
    assert "psnr ↑" in res.stdout and "ssim ↑" in res.stdout and "(+1 inf)" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"input", "pred", "meta"}
    assert summary["pred"]["psnr_inf"] == 1 and "psnr_inf" not in summary["input"]
    assert summary["pred"]["psnr"] > summary["input"]["psnr"]
    assert summary["meta"]["args"]["metrics"] == "psnr,ssim"
    assert summary["meta"]["metrics"]["psnr"] == {"kind": "FR", "lower_better": False}
    assert summary["input"]["peak_rss_mb"] > 0
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 6 and {r["row"] for r in rows} == {"input", "pred"}
    inf_row = next(r for r in rows if r["row"] == "pred" and r["image"] == "a")
    assert math.isinf(float(inf_row["psnr"])) and float(inf_row["ssim"]) == pytest.approx(1.0)
    assert not (out / "gamma_sweep.png").exists()   # no γ sweep, no plot


def test_missing_weights_exit_1_naming_the_file(folders, empty_torch_home):
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--metrics", "psnr,lpips", "--device", "cpu", "-q")
    assert res.exit_code == 1
    assert "LPIPS_v0.1_alex-df73285e.pth" in res.stderr
    assert str(empty_torch_home / "hub" / "pyiqa") in res.stderr


def test_skip_missing_carries_on(folders, empty_torch_home):
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--metrics", "psnr,dists", "--skip-missing", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    assert "psnr ↑" in res.stdout and "dists" not in res.stdout
    assert "warning" in res.stderr and "DISTS_weights-f5e65c96.pth" in res.stderr


def test_unmatched_pred_is_exit_1(folders):
    (folders / "pred" / "c.png").rename(folders / "pred" / "zz.png")
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--pred", str(folders / "pred"), "--metrics", "psnr", "-q")
    assert res.exit_code == 1
    assert "no prediction" in res.stderr and "c (1 in all)" in res.stderr


@pytest.mark.parametrize("args, hint", [
    (["--metrics", "psnr,foo"], "foo"),
    (["--gamma", "0.7"], "--weights"),
    (["--weights", "w", "--gamma", "1.5"], "[0, 1]"),
    (["--device", "tpu"], "device"),
    (["--dataset", "kitti", "--root", "."], "gopro"),
    (["--tile", "-8"], "multiple of 8"),
    (["--color-fix", "-2"], "color-fix"),
])
def test_bad_flags_are_usage_errors(folders, args, hint):
    res = _eval("--blur", str(folders / "blur"), *args)
    assert res.exit_code == 2, res.output
    assert hint in res.output


def _row(label: str, gamma, psnr: float, lpips: float) -> RowResult:
    row = RowResult(label=label, gamma=gamma,
                    images=[ImageScore("x", {"psnr": psnr, "lpips": lpips})])
    row.summary = {"psnr": Summary(psnr, 1, 0), "lpips": Summary(lpips, 1, 0)}
    return row


def test_sweep_plot_and_summary_keys(tmp_path):
    result = EvalResult("gopro", 1, ["psnr", "lpips"], "cpu",
                        [_row("input", None, 25.0, 0.3), _row("gamma=1", 1.0, 30.0, 0.12),
                         _row("gamma=0.7", 0.7, 29.0, 0.10)])
    written = write_outputs(tmp_path, result, command="deblurcli eval ...", args={"a": 1})
    png = tmp_path / "gamma_sweep.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = summary_dict(result)
    assert summary["gamma=0.7"]["psnr"] == 29.0 and summary["gamma=0.7"]["gamma"] == 0.7
    assert summary["input"]["lpips"] == 0.3
    assert not plot_sweep(tmp_path / "none.png", EvalResult("x", 1, ["psnr"], "cpu",
                                                            [_row("gamma=1", 1.0, 30, 0.1)]))


def test_bad_model_folder_fails_before_scoring(folders, tmp_path):
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--weights", str(tmp_path / "no-such-model"), "--metrics", "psnr", "-q")
    assert res.exit_code == 1
    assert "model folder not found" in res.stderr and "input" not in res.stdout
