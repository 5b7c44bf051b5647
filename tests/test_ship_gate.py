"""``scripts/ship_gate.py``: the shipping bar of docs/default-model.md, read from eval reports."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_gate.py"


def _reports(folder: Path, *, synthetic=(25.15, 26.9, 25.8), gopro=(31.46, 32.6, 31.9),
             niqe=(6.0, 5.5, 5.8)) -> Path:
    """Reports as ``eval_default.sh`` writes them: (input, gamma=1, gamma=0.7) per set."""
    rows = ("input", "gamma=1", "gamma=0.7")
    for name, values, metric in (("synthetic_kodak24", synthetic, "psnr"),
                                 ("gopro_avg", gopro, "psnr"), ("real_blurry", niqe, "niqe")):
        summary = {row: {metric: value, **({"ssim": 0.8} if metric == "psnr" else {})}
                   for row, value in zip(rows, values, strict=True)}
        summary["meta"] = {}
        (folder / name).mkdir(parents=True)
        (folder / name / "summary.json").write_text(json.dumps(summary))
    return folder


def _gate(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True)


def test_a_model_that_does_no_harm_ships_with_its_table(tmp_path):
    done = _gate(_reports(tmp_path / "r"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| held-out synthetic (kodak24): PSNR / SSIM | 25.15 dB / 0.8000 | 26.90 dB" \
        in done.stdout
    assert "target met: synthetic_kodak24 gamma=1 +1.75 dB" in done.stdout
    assert "target met: gopro_avg gamma=1 +1.14 dB" in done.stdout
    assert done.stdout.strip().endswith("verdict: ship it")


@pytest.mark.parametrize("change, failed", [
    ({"gopro": (31.46, 31.5, 31.4)}, "FAIL: gopro_avg gamma=0.7 PSNR -0.06 dB"),
    ({"synthetic": (25.15, 25.1, 25.9)}, "FAIL: synthetic_kodak24 gamma=1 PSNR -0.05 dB"),
    ({"niqe": (6.0, 5.5, 6.1)}, "FAIL: real_blurry gamma=0.7 NIQE 6.100"),
])
def test_any_harm_stops_it(tmp_path, change, failed):
    done = _gate(_reports(tmp_path / "r", **change))
    assert done.returncode == 1 and failed in done.stdout
    assert done.stdout.strip().endswith("verdict: do not ship")


def test_below_the_targets_it_still_ships(tmp_path):
    done = _gate(_reports(tmp_path / "r", synthetic=(25.15, 25.5, 25.3)))
    assert done.returncode == 0 and "target not met: synthetic_kodak24 gamma=1 +0.35" in done.stdout


def test_it_replaces_the_shipped_model_only_when_better_on_both_sets(tmp_path):
    new = _reports(tmp_path / "new")
    worse = _reports(tmp_path / "old1", gopro=(31.46, 32.7, 31.9))
    better = _reports(tmp_path / "old2", synthetic=(25.15, 26.0, 25.5), gopro=(31.46, 32.0, 31.6))
    done = _gate(new, "--baseline", worse)
    assert done.returncode == 1 and "FAIL: gopro_avg gamma=1 PSNR 32.60 dB" in done.stdout
    assert _gate(new, "--baseline", better).returncode == 0


def test_a_missing_report_or_row_is_exit_2(tmp_path):
    folder = _reports(tmp_path / "r")
    (folder / "gopro_avg" / "summary.json").unlink()
    done = _gate(folder)
    assert done.returncode == 2 and "gopro_avg" in done.stderr
    read_reports = runpy.run_path(str(SCRIPT))["read_reports"]
    folder = _reports(tmp_path / "s")
    summary = json.loads((folder / "real_blurry" / "summary.json").read_text())
    del summary["gamma=0.7"]
    (folder / "real_blurry" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit):
        read_reports(folder)
