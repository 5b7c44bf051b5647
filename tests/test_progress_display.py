"""Progress as the user sees it: 80-column bars that keep counts, rate and ETA; plain lines
every ~10 s when stderr is not a terminal (logs, CI), in every long command."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from deblurcli.cli import console as console_module
from deblurcli.cli.console import rich_progress
from deblurcli.progress import ProgressEvent

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _last_frame(text: str) -> str:
    lines = [line for line in ANSI.sub("", text).replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1]


def test_an_80_column_bar_keeps_counts_rate_elapsed_and_eta():
    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=True, color_system=None)
    info = {"loss": 0.0123456, "l2": 0.5, "gan": 0.7, "val_psnr": 23.456, "val_ssim": 0.812}
    with rich_progress(con, labels={"steps": "training"}, unit="it") as progress:
        for step in range(0, 40_000, 1000):
            progress(ProgressEvent("steps", step, 80_000, info))
    line = _last_frame(buf.getvalue())
    assert len(line) <= 80
    assert "39000/80000" in line and "it/s" in line
    assert len(re.findall(r"\d+:\d\d:\d\d", line)) == 2  # elapsed and remaining
    assert "loss=0.01235" in line or "…" in line         # extra values come last, cut if need be


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_plain_line_every_ten_seconds_and_at_the_end(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(console_module.time, "monotonic", clock)
    buf = io.StringIO()
    con = Console(file=buf, width=80)  # a file: not a terminal
    with rich_progress(con, labels={"images": "images"},
                       unit={"images": "img", "tiles": "tile"}) as progress:
        for i in range(30):  # one image every 2 s, each in 4 tiles
            for tile in range(1, 5):
                clock.now += 0.5
                progress(ProgressEvent("tiles", tile, 4))
            progress(ProgressEvent("images", i + 1, 30))
    lines = buf.getvalue().splitlines()
    # 60 s of work: a line at 10, 20, ..., 60 s and one at the end (nothing new after 60 s)
    assert 5 <= len(lines) <= 7, lines
    assert all("\x1b" not in line for line in lines)
    assert lines[-1].startswith("tiles 4/4 (100%)") or "images 30/30 (100%)" in lines[-1]
    middle = next(line for line in lines if "images 1" in line)
    assert re.search(r"images \d+/30 \(\d+%\) 2\.\d\d s/img eta 0:00:\d\d", middle), middle
    assert "tile/s" in middle


def test_a_finished_stage_keeps_its_own_rate_and_time_in_plain_lines(monkeypatch):
    """eval's input row, done in 0.5 s, read "2.01 s/img ... elapsed 0:00:16" in the last line
    of a log: its clock ran on through the model rows after it."""
    clock = _Clock()
    monkeypatch.setattr(console_module.time, "monotonic", clock)
    buf = io.StringIO()
    with rich_progress(Console(file=buf, width=120), unit="img") as progress:
        for i in range(9):
            progress(ProgressEvent("input", i, 8))
            clock.now += 0.0625 if i < 8 else 0
        for i in range(9):
            progress(ProgressEvent("gamma 1", i, 8))
            clock.now += 2.0
    last = buf.getvalue().splitlines()[-1]
    assert "input 8/8 (100%) 16.00 img/s eta 0:00:00 elapsed 0:00:00" in last, last


def test_disabled_progress_prints_nothing():
    buf = io.StringIO()
    with rich_progress(Console(file=buf), enabled=False) as progress:
        progress(ProgressEvent("x", 1, 1))
    assert buf.getvalue() == ""


@pytest.fixture()
def pairs(tmp_path):
    import numpy as np

    from deblurcli.images import write_image

    rng = np.random.default_rng(0)
    for kind in ("blur", "sharp"):
        for name in ("a", "b"):
            write_image(tmp_path / kind / f"{name}.png", rng.random((24, 24, 3), dtype=np.float32))
    return tmp_path


def test_eval_and_synth_show_progress_lines_in_a_log(pairs, tmp_path):
    from typer.testing import CliRunner

    from deblurcli.cli.app import app

    res = CliRunner().invoke(app, ["eval", "--blur", str(pairs / "blur"), "--sharp",
                                   str(pairs / "sharp"), "--metrics", "psnr", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert re.search(r"^input 2/2 \(100%\)", res.stderr, flags=re.M), res.stderr
    res = CliRunner().invoke(app, ["synth", "--src", str(pairs / "sharp"), "--out",
                                   str(tmp_path / "synth"), "--crop", "16", "--stride", "16"])
    assert res.exit_code == 0, res.output
    assert re.search(r"^pairs \d+/\d+ \(100%\)", res.stderr, flags=re.M), res.stderr
