"""``accelerate launch -m deblurcli deblur IN OUT``: two CPU processes share a folder, and split
a video by frames.

accelerate's ``--cpu`` starts a single process, so the tests launch two through its torchrun
launcher (``--multi_gpu``, which needs no GPU) and give ``--device cpu`` (gloo between them). The
video-splitting steps are also run by threads standing in for processes (fast).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deblurcli.batch import BatchOptions, plan_jobs
from deblurcli import onnx_backend
from deblurcli.distributed import cpu_threads_share, deblur_video_split, launched_processes
from deblurcli.errors import DeblurcliError
from deblurcli.images import write_image

pytest.importorskip("accelerate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: list, cwd, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``deblurcli ARGS`` in ``processes`` CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "deblurcli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


class _Threads:
    """Stands in for :class:`deblurcli.distributed.ProcessGroup` in one of ``count`` threads."""

    def __init__(self, index: int, count: int, shared: dict) -> None:
        self.index, self.count, self.shared = index, count, shared

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def gather(self, items: list) -> list:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.index] = list(items)
        barrier.wait()
        everything = [item for slot in slots for item in slot]
        barrier.wait()  # nobody refills the slots before all have read them
        return everything

    def add(self, key: str, amount: int) -> int:
        with self.shared["lock"]:
            self.shared["counters"][key] += amount
            return self.shared["counters"][key]


def _shared(count: int) -> dict:
    return {"slots": [None] * count, "barrier": threading.Barrier(count),
            "lock": threading.Lock(), "counters": defaultdict(int)}


def _split_in_threads(job, options, deblurs: list, progress, shared=None) -> list:
    shared = shared or _shared(len(deblurs))
    with ThreadPoolExecutor(len(deblurs)) as pool:
        runs = [pool.submit(deblur_video_split, _Threads(i, len(deblurs), shared), job, deblur,
                            options, progress if i == 0 else None)
                for i, deblur in enumerate(deblurs)]
        return [run.result(timeout=300) for run in runs]


def test_video_split_by_frames_counts_every_process_and_leaves_no_segment(tmp_path):
    av = pytest.importorskip("av")
    from test_video import make_clip

    clip = make_clip(tmp_path / "in" / "clip.mp4", frames=9)
    options = BatchOptions()
    [job] = plan_jobs(clip, tmp_path / "out", options)
    events, shared = [], _shared(3)

    def main_waits_for_the_others(pixels, progress):
        # the main process's last frame: the other two have counted their 6 frames by then
        if len(events) == 3:
            deadline = time.monotonic() + 60
            while sum(shared["counters"].values()) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
        return pixels

    results = _split_in_threads(job, options, [main_waits_for_the_others] + [lambda x, p: x] * 2,
                                events.append, shared)
    assert [(r.status, r.frames) for r in results] == [("done", 9)] * 3  # the same everywhere
    with av.open(str(job.target)) as c:
        assert len(list(c.decode(video=0))) == 9 and len(c.streams.audio) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["clip.mp4"]
    # the main process's display counts the frames of all three, out of the video's 9
    assert [e.total for e in events] == [9] * 5 and events[3].done == 9  # after its 3rd frame
    assert [e.done for e in events] == sorted(e.done for e in events)


def test_a_failed_part_fails_the_video_and_leaves_no_file(tmp_path):
    pytest.importorskip("av")
    from test_video import make_clip

    clip = make_clip(tmp_path / "in" / "clip.mp4", frames=9)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"an earlier output")
    options = BatchOptions(overwrite=True)
    [job] = plan_jobs(clip, out, options)
    seen = []

    def fails_on_second_frame(pixels, progress):
        seen.append(1)
        if len(seen) == 2:
            raise DeblurcliError("the model gave up")
        return pixels

    results = _split_in_threads(job, options, [lambda x, p: x, fails_on_second_frame,
                                               lambda x, p: x], None)
    assert {(r.status, r.error) for r in results} == \
        {("failed", "process 2/3: the model gave up")}
    # the earlier output untouched, no segment and no temporary file left
    assert [p.name for p in out.iterdir()] == ["clip.mp4"]
    assert (out / "clip.mp4").read_bytes() == b"an earlier output"


def test_launched_processes_reads_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1 and cpu_threads_share(None) == 0
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4


@pytest.mark.slow  # two fresh Python processes import torch and load the model: ~20-60 s
def test_two_processes_deblur_every_file_once_and_split_a_video_by_frames(tiny_model_folder,
                                                                         tmp_path):
    """Files are shared out, each deblurred once, with one summary for both processes; the
    video made by two processes, each deblurring half of its frames, equals the one made by one
    process: lossless (crf 0), so frame for frame; and timestamps, rate, size, audio. (One
    launch for both: each costs ~20 s.)"""
    pytest.importorskip("av")
    from typer.testing import CliRunner

    from deblurcli.cli.app import app
    from test_video import make_clip, streams

    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    names = [f"p{i}.png" for i in range(5)]
    for name in names:
        write_image(src / name, rng.random((24, 32, 3), dtype=np.float32))
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    clip = make_clip(src / "clip.mp4", frames=12, x264={"g": "4"})
    args = ["--weights", tiny_model_folder, "--device", "cpu", "--threads", "1", "--crf", "0"]
    out = tmp_path / "two"
    res = _launch(["deblur", src, out, *args], cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr  # bad.png failed in one process
    if onnx_backend.available():  # the main process exports, the other opens its export
        assert res.stderr.count("exporting the model for ONNX Runtime") == 1, res.stderr
        assert res.stderr.count("ONNX Runtime), gamma") == 2, res.stderr
        assert len(list((tiny_model_folder / ".onnx").glob("*/model.onnx"))) == 1
    # one summary for both processes: every file counted once, the failure listed once
    assert re.findall(r"processed \d+, skipped \d+, failed \d+", res.stdout) == \
        ["processed 6, skipped 0, failed 1"], res.stdout
    assert res.stdout.count("failed: ") == 1 and "bad.png" in res.stdout
    assert "process 1/2" in res.stderr and "process 2/2" in res.stderr
    assert "12 video frame(s)" in res.stdout
    assert "1 video(s) split by frames among 2 processes" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["clip.mp4"])
    one = CliRunner().invoke(app, ["deblur", str(clip), str(tmp_path / "one"), *map(str, args)])
    assert one.exit_code == 0, one.output
    a, b = streams(tmp_path / "one" / "clip.mp4"), streams(out / "clip.mp4")
    assert len(b["pts"]) == 12 and b["pts"] == a["pts"] == streams(clip)["pts"]
    assert (b["rate"], b["size"]) == (a["rate"], a["size"]) == (24, (64, 48))
    assert b["audio"]["packets"] == a["audio"]["packets"]
    assert b["audio"]["seconds"] == pytest.approx(12 / 24, abs=0.07)
    assert all(np.array_equal(x, y) for x, y in zip(a["rgb"], b["rgb"], strict=True))


class _LateProcess:
    """The second of two launched processes, as ``deblur`` sees its process group."""

    index, count, is_main = 1, 2, False

    def __init__(self) -> None:
        self.waits = 0

    def wait(self) -> None:
        self.waits += 1


def test_a_process_waits_for_all_to_plan_and_leaves_reports_to_the_main_one(tmp_path,
                                                                            monkeypatch):
    """A process that planned after the others had written every output ended at once, while
    they waited for it in the final gather (forever); one that found only unreadable entries
    printed the error line again; --dry-run printed the whole plan once per process."""
    from typer.testing import CliRunner

    from deblurcli.cli import deblur as cli_deblur
    from deblurcli.cli.app import app

    late = _LateProcess()
    monkeypatch.setattr(cli_deblur, "_process_group", lambda device: late)
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png", np.zeros((8, 8, 3), np.float32))
    write_image(tmp_path / "out" / "a.png", np.zeros((8, 8, 3), np.float32))
    args = ["deblur", str(tmp_path / "in"), str(tmp_path / "out"), "-w", str(tmp_path / "none")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and late.waits == 1
    (tmp_path / "in" / "b.png").symlink_to(tmp_path / "gone.png")  # unreadable
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and late.waits == 3  # and it waits for the main one to report
    assert result.output == ""  # the main process reports it
    result = CliRunner().invoke(app, [*args, "--dry-run"], env={"RANK": "1"})
    assert result.exit_code == 1 and result.output == ""
    result = CliRunner().invoke(app, [*args, "--dry-run"], env={"RANK": "0"})
    assert result.exit_code == 1 and "dry run: would process 0, skip 1, fail 1" in result.output


def test_what_is_left_to_do_is_decided_before_any_process_writes(tmp_path, monkeypatch):
    """Deciding after the barrier, a process that got there late found the output the main
    process had just written, ended at once, and left it waiting in the final gather."""
    from typer.testing import CliRunner

    from deblurcli.cli import deblur as cli_deblur
    from deblurcli.cli.app import app

    class MainWritesMeanwhile(_LateProcess):
        def wait(self) -> None:
            super().wait()
            if self.waits == 1:  # while this one was descheduled at the barrier
                write_image(tmp_path / "out" / "a.png", np.zeros((8, 8, 3), np.float32))

    monkeypatch.setattr(cli_deblur, "_process_group", lambda device: MainWritesMeanwhile())
    write_image(tmp_path / "in" / "a.png", np.zeros((8, 8, 3), np.float32))
    result = CliRunner().invoke(app, ["deblur", str(tmp_path / "in"), str(tmp_path / "out"),
                                      "-w", str(tmp_path / "none")])
    assert "already exists" not in result.output  # it went on (to its device, faked here)
    assert result.exit_code == 1
