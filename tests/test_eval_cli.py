"""``deblurcli eval`` through Typer's CliRunner, and the report writers (tiny images, CPU)."""

from __future__ import annotations

import csv
import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.evaluation import fetch
from deblurcli.evaluation.metrics import Summary
from deblurcli.errors import DeblurcliError
from deblurcli.evaluation import report
from deblurcli.evaluation.report import summary_dict, sweep_png, write_outputs
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
    assert "deblurcli eval --fetch-metrics lpips,dists,niqe,musiq,clipiqa,maniqa" in res.stdout


def test_list_metrics_without_pyiqa_lists_none_as_available(empty_torch_home, monkeypatch):
    from deblurcli.evaluation import metrics

    monkeypatch.setattr(metrics, "pyiqa_installed", lambda: False)
    res = _eval("--list-metrics")
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if " psnr " in line)
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[1:6] == ["psnr", "FR", "↑", "no", "no"]  # needs weights, available
    assert "no metric can run: pyiqa is not installed (pip install 'deblurcli[eval]')" in res.stdout


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


def _one_line_each(stderr: str, word: str) -> list[str]:
    return [line for line in stderr.splitlines() if word in line]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_default_metrics_offline_run_what_they_can_and_say_what_was_skipped(
        folders, empty_torch_home, monkeypatch, how):
    called = []
    monkeypatch.setattr(fetch, "fetch_file", lambda item: called.append(item))
    report = folders.parent / f"report-{how}"
    args = ["--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
            "--pred", str(folders / "pred"), "--device", "cpu", "-q", "-o", str(report)]
    if how == "flag":
        args.append("--offline")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _eval(*args)
    assert res.exit_code == 0, res.output
    assert "psnr ↑" in res.stdout and "ssim ↑" in res.stdout
    assert "lpips" not in res.stdout and "dists" not in res.stdout
    assert called == []  # offline: nothing fetched
    for name, file in (("lpips", "LPIPS_v0.1_alex-df73285e.pth"),
                       ("dists", "DISTS_weights-f5e65c96.pth")):
        (line,) = _one_line_each(res.stderr, f"metric {name} skipped")
        assert file in line and "(offline)" in line
        assert f"deblurcli eval --fetch-metrics {name}" in line
    # summary.json says so too: a script reading it saw only psnr and ssim, asked for or not
    import json

    meta = json.loads((report / "summary.json").read_text())["meta"]
    assert set(meta["metrics"]) == {"psnr", "ssim"}
    assert set(meta["skipped_metrics"]) == {"lpips", "dists"}
    assert "(offline)" in meta["skipped_metrics"]["lpips"]


def test_online_fetches_once_and_a_failed_fetch_skips_the_metric(folders, empty_torch_home,
                                                                  monkeypatch):
    called = []

    def no_network(item):
        called.append(item.name)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(fetch, "fetch_file", no_network)
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--metrics", "psnr,lpips", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    assert called == ["LPIPS_v0.1_alex-df73285e.pth"]  # tried, then gave up on lpips
    (line,) = _one_line_each(res.stderr, "metric lpips skipped")
    assert "could not fetch LPIPS_v0.1_alex-df73285e.pth" in line
    assert "ConnectionError" in line and "deblurcli eval --fetch-metrics lpips" in line
    assert "psnr ↑" in res.stdout


def test_no_metric_able_to_run_is_exit_1_with_the_fetch_command(folders, empty_torch_home):
    res = _eval("--blur", str(folders / "blur"), "--device", "cpu", "-q", "--offline")
    assert res.exit_code == 1
    assert "no metric could run" in res.stderr
    assert "deblurcli eval --fetch-metrics niqe,musiq,clipiqa,maniqa" in res.stderr
    assert len(_one_line_each(res.stderr, "skipped:")) == 4


def test_fetch_metrics_fetches_each_missing_file_into_the_cache(empty_torch_home, monkeypatch):
    def fake(item):  # writes what the real fetcher would, where pyiqa/torchvision look
        path = empty_torch_home / "hub" / item.folder / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
        return path

    monkeypatch.setattr(fetch, "fetch_file", fake)
    res = _eval("--fetch-metrics", "lpips,niqe")
    assert res.exit_code == 0, res.output
    assert "lpips: ready" in res.stdout and "niqe: ready" in res.stdout
    assert (empty_torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").is_file()
    listed = _eval("--list-metrics")
    row = next(line for line in listed.stdout.splitlines() if " lpips " in line)
    assert "yes" in row.split("LPIPS")[0].split("↓")[1]  # 'available' column
    # fetched files are not fetched again
    monkeypatch.setattr(fetch, "fetch_file", lambda item: pytest.fail("fetched twice"))
    assert _eval("--fetch-metrics", "lpips").exit_code == 0


def test_fetch_metrics_offline_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _eval("--fetch-metrics", "lpips")
    assert res.exit_code == 2 and "offline" in res.output


def test_eval_without_pyiqa_says_how_to_install_it(folders, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa -> ImportError
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--metrics", "psnr", "--device", "cpu", "-q")
    assert res.exit_code == 1
    assert res.stderr.strip() == ("error: deblurcli eval needs pyiqa, which is not installed: "
                                  "pip install 'deblurcli[eval]'")


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


def test_sweep_plot_and_summary_keys(tmp_path, monkeypatch):
    result = EvalResult("gopro", 1, ["psnr", "lpips"], "cpu",
                        [_row("input", None, 25.0, 0.3), _row("gamma=1", 1.0, 30.0, 0.12),
                         _row("gamma=0.7", 0.7, 29.0, 0.10)])
    written = write_outputs(tmp_path, result, command="deblurcli eval ...", args={"a": 1})
    png = tmp_path / "gamma_sweep.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = summary_dict(result)
    assert summary["gamma=0.7"]["psnr"] == 29.0 and summary["gamma=0.7"]["gamma"] == 0.7
    assert summary["input"]["lpips"] == 0.3
    assert sweep_png(EvalResult("x", 1, ["psnr"], "cpu", [_row("gamma=1", 1.0, 30, 0.1)])) \
        is None
    # a later run without a sweep into the same folder leaves no figure of the earlier one
    write_outputs(tmp_path, EvalResult("gopro", 1, ["psnr"], "cpu", [_row("input", None, 25.0,
                                                                        0.3)]))
    assert not png.exists()
    # a set is written whole or not at all: a new CSV stayed beside an old (or no) summary
    (tmp_path / "summary.json").unlink()
    (tmp_path / "summary.json").mkdir()
    before = (tmp_path / "per_image.csv").read_bytes()
    with pytest.raises(DeblurcliError, match="summary.json: it is not a file"):
        write_outputs(tmp_path, result)
    assert (tmp_path / "per_image.csv").read_bytes() == before and not png.exists()
    # a full disk at the last file: the earlier set stays whole (it lost its CSV and plot)
    (tmp_path / "summary.json").rmdir()
    write_outputs(tmp_path, result)
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = report.atomic_write_bytes

    def full_at_the_plot(path, data, **kwargs):
        if Path(path).name == "gamma_sweep.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(report, "atomic_write_bytes", full_at_the_plot)
    changed = EvalResult("gopro", 1, ["psnr", "lpips"], "cpu", [_row("input", None, 20.0, 0.4),
                         _row("gamma=1", 1.0, 21.0, 0.3), _row("gamma=0.7", 0.7, 22.0, 0.2)])
    with pytest.raises(DeblurcliError, match="gamma_sweep.png: No space left on device"):
        write_outputs(tmp_path, changed)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == earlier


def test_the_summary_says_what_each_mean_covers(folders):
    """SSIM could score 1 of 5 images (the others under its 11-px window): the JSON said
    "ssim": 0.988 with n_images 5, and nothing said which versions made the numbers."""
    small = folders / "small"
    for name in ("a", "b"):
        for kind in ("blur", "sharp"):
            side = 40 if name == "a" else 8
            write_image(small / kind / f"{name}.png", np.full((side, side, 3), 0.5, np.float32))
    out = folders / "report"
    res = _eval("--blur", str(small / "blur"), "--sharp", str(small / "sharp"), "--metrics",
                "psnr,ssim", "--device", "cpu", "--out", str(out), "-q")
    assert res.exit_code == 0, res.output
    assert "ssim needs images of at least 11x11 pixels" in " ".join(res.stderr.split())
    assert "(1 of 2)" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["ssim_n"] == 1 and summary["input"]["psnr_n"] == 2
    versions = summary["meta"]["versions"]
    assert versions["deblurcli"] and versions["pyiqa"] and versions["torch"]


def test_bad_model_folder_fails_before_scoring(folders, tmp_path):
    res = _eval("--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"),
                "--weights", str(tmp_path / "no-such-model"), "--metrics", "psnr", "-q")
    assert res.exit_code == 1
    assert "model folder not found" in res.stderr and "input" not in res.stdout


def test_out_that_is_a_file_or_a_full_disk_is_one_line_naming_the_path(folders, monkeypatch):
    args = ["--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"), "--pred",
            str(folders / "pred"), "--metrics", "psnr", "--device", "cpu", "-q"]
    taken = folders / "report.txt"
    taken.write_text("mine")
    res = _eval(*args, "--out", str(taken))
    assert res.exit_code == 1 and taken.read_text() == "mine"
    assert res.stderr.strip() == f"error: --out must be a folder, but {taken} is a file"
    assert "psnr" not in res.stdout  # refused before scoring
    res = _eval(*args, "--out", str(taken / "report"))  # below a file: found before scoring too
    assert res.exit_code == 1 and "psnr" not in res.stdout
    assert res.stderr.strip() == \
        f"error: cannot write {taken / 'report'}: {taken} is a file, not a folder"

    def full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deblurcli.evaluation.report.atomic_write_bytes", full)
    res = _eval(*args, "--out", str(folders / "report"))
    assert res.exit_code == 1
    assert res.stderr.strip() == \
        f"error: cannot write {folders / 'report' / 'summary.json'}: No space left on device"


def test_out_never_replaces_an_image_being_scored(folders):
    """--out at the input folder replaced (or, without a sweep, deleted) a photo of it named
    gamma_sweep.png."""
    blur = folders / "blur"
    one = next(p for p in blur.iterdir() if p.suffix == ".png")
    for kind in ("blur", "sharp"):
        (folders / kind / one.name).rename(folders / kind / "gamma_sweep.png")
    before = (blur / "gamma_sweep.png").read_bytes()
    res = _eval("--blur", str(blur), "--sharp", str(folders / "sharp"), "--metrics", "psnr",
                "--device", "cpu", "-q", "--out", str(blur))
    assert res.exit_code == 1 and "psnr" not in res.stdout
    assert res.stderr.strip() == (f"error: --out {blur}: the report's gamma_sweep.png would "
                                  f"replace {blur / 'gamma_sweep.png'}, an image being scored; "
                                  "choose another --out folder")
    assert (blur / "gamma_sweep.png").read_bytes() == before
    assert not (blur / "summary.json").exists()


def test_weights_has_the_same_short_flag_in_every_command():
    """`eval -w MODEL` was "No such option" while deblur and blend took it."""
    import typer

    commands = typer.main.get_command(app).commands
    for name in ("deblur", "eval", "blend"):
        weights = next(p for p in commands[name].params if p.name == "weights")
        assert weights.opts == ["--weights", "-w"], name


def test_an_alignment_that_stops_at_max_shift_is_said(folders):
    """A pair 12 px apart scored with --max-shift 4 reported the shift of the search's edge and
    a poor score, without a word."""
    img = data.astronaut().astype(np.float32) / 255
    shifted = folders / "shifted"
    write_image(shifted / "sharp" / "a.png", img[100:196, 100:196])
    write_image(shifted / "blur" / "a.png", img[100:196, 112:208])  # 12 px to the side
    res = _eval("--blur", str(shifted / "blur"), "--sharp", str(shifted / "sharp"), "--metrics",
                "psnr", "--align", "--max-shift", "4", "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    text = " ".join(res.stderr.split())
    assert "the alignment of 1 of 1 image(s) of input stopped at the edge of its search " \
        "(--max-shift 4" in text
    # a small image's search is narrower than --max-shift: its edge counts
    narrow = folders / "narrow"
    write_image(narrow / "sharp" / "a.png", img[100:118, 100:300])
    write_image(narrow / "blur" / "a.png", img[100:118, 112:312])
    res = _eval("--blur", str(narrow / "blur"), "--sharp", str(narrow / "sharp"), "--metrics",
                "psnr", "--align", "--device", "cpu", "-q")
    assert "stopped at the edge of its search" in " ".join(res.stderr.split())
    wide = _eval("--blur", str(shifted / "blur"), "--sharp", str(shifted / "sharp"),
                 "--metrics", "psnr", "--align", "--max-shift", "16", "--device", "cpu", "-q")
    assert "--max-shift" not in wide.stderr


def test_a_pair_of_two_sizes_or_an_unreadable_image_is_found_before_scoring(folders,
                                                                            monkeypatch):
    """The last pair's prediction is cropped: the error came after scoring everything else."""
    from deblurcli.evaluation import runner as eval_runner

    scored = []
    real_score = eval_runner.score_image
    monkeypatch.setattr(eval_runner, "score_image",
                        lambda *a, **k: scored.append(1) or real_score(*a, **k))
    write_image(folders / "pred" / "c.png", np.zeros((40, 40, 3), np.float32))
    args = ["--blur", str(folders / "blur"), "--sharp", str(folders / "sharp"), "--metrics",
            "psnr", "--device", "cpu", "-q"]
    res = _eval(*args, "--pred", str(folders / "pred"))
    assert res.exit_code == 1 and scored == []
    assert res.stderr.strip() == ("error: c: the images of this pair differ in size (its "
                                  "blurry image 48x40, its ground truth 48x40, its prediction "
                                  "40x40)")
    (folders / "sharp" / "b.png").write_bytes(b"not a picture")
    res = _eval(*args)
    assert res.exit_code == 1 and scored == [] and "b.png" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
