"""Video in, video out: ``deblurcli deblur clip.mp4 out/`` and :mod:`deblurcli.video`.

Clips are made here with PyAV (64x48, 10 frames, with an AAC track), so the tests need no data.
"""

from __future__ import annotations

import os

import sys
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from typer.testing import CliRunner

av = pytest.importorskip("av")

from deblurcli.batch import BatchOptions, plan_jobs, run_jobs  # noqa: E402
from deblurcli.cli.app import app  # noqa: E402
from deblurcli.errors import DeblurcliError, ImageReadError  # noqa: E402
from deblurcli.images import read_image, write_image  # noqa: E402
from deblurcli.video import (  # noqa: E402
    INSTALL_HINT,
    FrameSpan,
    continuous_dts,
    deblur_segment,
    deblur_video,
    frame_ranges,
    frame_spans,
    join_segments,
    plan_spans,
    probe_video,
)

W, H, N, FPS, SR = 64, 48, 10, 24, 16000


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The command sets torch's thread count for the process; restore it after each test."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_clip(path: Path, *, frames: int = N, width: int = W, height: int = H, fps: int = FPS,
              audio: bool = True, rotate: int = 0, vfr: bool = False,
              x264: Optional[dict] = None, audio_codec: str = "aac") -> Path:
    """An H.264 clip of moving colour ramps; ``vfr``: millisecond timestamps with uneven gaps;
    ``audio``: a 440 Hz mono AAC track as long as the video; ``x264``: encoder options."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps, options=x264 or {})
        v.width, v.height = width, height
        v.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        if rotate:
            v.set_display_rotation(rotate)
        if vfr:
            v.codec_context.time_base = Fraction(1, 1000)
        a = c.add_stream(audio_codec, rate=SR, layout="mono") if audio else None
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(frames):
            img = np.stack([(xx * 3 + i * 8) % 256, (yy * 4 + i * 5) % 256,
                            np.full_like(xx, 40 + 10 * i)], axis=-1)
            f = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            if vfr:
                f.pts, f.time_base = i * 40 + (i % 2) * 15, Fraction(1, 1000)
            else:
                f.pts, f.time_base = i, Fraction(1, fps)
            c.mux(v.encode(f))
        c.mux(v.encode())
        if a is not None:
            total = SR * frames // fps
            samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / SR)).astype(np.float32)
            for s in range(0, total, 1024):
                af = av.AudioFrame.from_ndarray(samples[None, s:s + 1024], format="flt",
                                                layout="mono")
                af.sample_rate, af.pts, af.time_base = SR, s, Fraction(1, SR)
                c.mux(a.encode(af))
            c.mux(a.encode())
    return path


def streams(path: Path) -> dict:
    """Frame timestamps, rate, size, rotation and audio packets/duration of a video file."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = list(c.decode(v))
        out = {"pts": [f.pts for f in frames], "rate": v.average_rate,
               "size": (frames[0].width, frames[0].height), "rotation": frames[0].rotation,
               "rgb": [f.to_ndarray(format="rgb24") for f in frames], "audio": None}
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            packets = [(p.pts, p.duration, bytes(p)) for p in c.demux(a) if p.size]
            out["audio"] = {"codec": a.codec_context.name, "packets": packets,
                            "seconds": float(sum(d for _, d, _ in packets) * a.time_base)}
    return out


def run(*args):
    return CliRunner().invoke(app, ["deblur", *map(str, args)])


def test_cli_video_keeps_frames_rate_size_rotation_and_audio(tiny_model_folder, tmp_path):
    clip = make_clip(tmp_path / "in" / "clip.mp4", rotate=90)
    result = run(clip, tmp_path / "out", "--weights", tiny_model_folder, "--tile", "0",
                 "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "processed 1, skipped 0, failed 0" in result.stdout
    assert f"{N} video frame(s)" in result.stdout and "s/image" not in result.stdout
    src, out = streams(clip), streams(tmp_path / "out" / "clip.mp4")
    assert len(out["pts"]) == N and out["pts"] == src["pts"]
    assert out["rate"] == FPS and out["size"] == (W, H) and out["rotation"] == 90
    # the audio: present, the same codec, the same packets (copied, not re-encoded), same length
    assert out["audio"] is not None and out["audio"]["codec"] == "aac"
    assert out["audio"]["packets"] == src["audio"]["packets"]
    assert out["audio"]["seconds"] == pytest.approx(N / FPS, abs=0.07)
    # the random tiny model is no identity: the frames were really run through it
    pairs = zip(src["rgb"], out["rgb"], strict=True)
    diff = np.mean([np.abs(a.astype(int) - b).mean() for a, b in pairs])
    assert diff > 5
    # a second run skips the finished video (no model needed)
    again = run(clip, tmp_path / "out", "--weights", tiny_model_folder)
    assert again.exit_code == 0 and "skipped 1" in again.stdout


def test_variable_frame_rate_and_odd_size_kept(tmp_path):
    clip = make_clip(tmp_path / "vfr.mkv", vfr=True, width=63, height=47, audio=False)
    events = []
    n = deblur_video(clip, tmp_path / "out" / "vfr.mkv", lambda x, progress: x,
                     progress=events.append)
    src, out = streams(clip), streams(tmp_path / "out" / "vfr.mkv")
    assert n == N and out["pts"] == src["pts"] == [i * 40 + (i % 2) * 15 for i in range(N)]
    assert out["size"] == (63, 47) and out["audio"] is None
    # an identity "model": only the encoder's loss (4:4:4, crf 18) separates input and output
    pairs = zip(src["rgb"], out["rgb"], strict=True)
    assert max(np.abs(a.astype(int) - b).mean() for a, b in pairs) < 2
    frames = [e for e in events if e.stage == "frames"]
    assert [e.done for e in frames] == list(range(N + 1))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_encode_leaves_no_file(tmp_path, error):
    clip = make_clip(tmp_path / "clip.mp4")
    seen = []

    def fails_on_frame_4(pixels, progress):
        seen.append(1)
        if len(seen) == 4:
            raise error("stop")
        return pixels

    out = tmp_path / "out"
    with pytest.raises(error):
        deblur_video(clip, out / "clip.mp4", fails_on_frame_4)
    assert list(out.iterdir()) == []  # neither the final name nor a hidden temporary file


def test_folder_mixing_videos_and_photos(tmp_path):
    src = tmp_path / "in"
    make_clip(src / "clip.mov", frames=4, audio=False)
    write_image(src / "photo.png", np.random.default_rng(0).random((20, 30, 3), dtype=np.float32))
    (src / "broken.mp4").write_bytes(b"\0\0\0\x18ftypisom" + b"\xff" * 200)
    options = BatchOptions(ext="jpg")  # --ext converts photos; a video keeps its container
    jobs = plan_jobs(src, tmp_path / "out", options)
    assert sorted(j.target.name for j in jobs) == ["broken.mp4", "clip.mov", "photo.jpg"]
    events = []
    summary = run_jobs(jobs, lambda x, progress: 1 - x, options, progress=events.append)
    status = {r.job.source.name: r for r in summary.results}
    assert status["clip.mov"].status == "done" and status["clip.mov"].frames == 4
    assert status["photo.png"].status == "done"
    assert status["broken.mp4"].status == "failed" and "broken.mp4" in status["broken.mp4"].error
    assert "\n" not in status["broken.mp4"].error
    assert summary.frames == 4 and read_image(tmp_path / "out" / "photo.jpg").pixels.shape == (20, 30, 3)
    assert len(streams(tmp_path / "out" / "clip.mov")["pts"]) == 4
    assert not (tmp_path / "out" / "broken.mp4").exists()
    assert any(e.stage == "frames" and e.done == 4 for e in events)


def test_input_guard_covers_videos(tmp_path):
    src = tmp_path / "in"
    make_clip(src / "clip.mp4", frames=2, audio=False)
    with pytest.raises(DeblurcliError, match="refusing to write .*clip.mp4"):
        plan_jobs(src, src, BatchOptions())
    with pytest.raises(DeblurcliError, match="refusing to write"):
        plan_jobs(src / "clip.mp4", src, BatchOptions(ext="png"))  # --ext does not rename videos
    jobs = plan_jobs(src, src, BatchOptions(suffix="_sharp"))
    assert [j.target.name for j in jobs] == ["clip_sharp.mp4"]


def test_without_pyav_a_video_fails_with_the_install_command(tmp_path, monkeypatch):
    src = tmp_path / "in"
    make_clip(src / "clip.mp4", frames=2, audio=False)
    write_image(src / "photo.png", np.zeros((8, 8, 3), dtype=np.float32))
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    summary = run_jobs(plan_jobs(src, tmp_path / "out", BatchOptions()), lambda x, p: x,
                       BatchOptions())
    status = {r.job.source.name: r for r in summary.results}
    assert status["photo.png"].status == "done"
    assert status["clip.mp4"].status == "failed" and status["clip.mp4"].error == INSTALL_HINT
    assert "pip install 'deblurcli[video]'" in INSTALL_HINT


def test_bad_video_options_exit_2(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=2, audio=False)
    bad_codec = run(clip, tmp_path / "out", "--codec", "no-such-codec")
    assert bad_codec.exit_code == 2 and "no-such-codec" in bad_codec.output
    bad_crf = run(clip, tmp_path / "out", "--crf", "70")
    assert bad_crf.exit_code == 2 and "--crf" in bad_crf.output
    from deblurcli.video import has_encoder

    if has_encoder("libvpx"):  # VP8 refused a crf under 4 at its first frame, video after video
        vp8 = run(clip, tmp_path / "out", "--codec", "libvpx", "--crf", "3")
        assert vp8.exit_code == 2 and "4..63 for libvpx" in vp8.output, vp8.output
    short = run(clip, tmp_path / "out", "--codec", "h264", "--crf", "60")  # libx264's range
    assert short.exit_code == 2 and "0..51 for libx264" in short.output, short.output
    audio = run(clip, tmp_path / "out", "--codec", "aac")  # an encoder, but not of video
    assert audio.exit_code == 2 and "no video encoder 'aac'" in audio.output
    # --codec auto: --crf is checked against the encoder auto picks, before the model loads
    # (no --weights: the run would otherwise stop on the missing model, exit 1)
    auto = run(clip, tmp_path / "out", "--crf", "60")
    assert auto.exit_code == 2 and "0..51" in auto.output, auto.output
    assert not (tmp_path / "out").exists()
    # encoders without a rate factor take any --crf (it does not apply to them)
    assert "--crf" not in run(clip, tmp_path / "out", "--codec", "mpeg4", "--crf", "60").output


def test_a_file_that_is_no_video_is_one_plain_line(tmp_path):
    from deblurcli.video import probe_video

    fake = tmp_path / "fake.mp4"
    fake.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ImageReadError) as caught:
        probe_video(fake)
    assert str(caught.value) == f"cannot read {fake}: Invalid data found when processing input"
    # FFmpeg reads a photo given a video's suffix as a one-frame video: it made a video of it
    write_image(tmp_path / "photo.png", np.zeros((8, 8, 3), np.float32))
    (tmp_path / "photo.png").rename(tmp_path / "photo.mp4")
    with pytest.raises(ImageReadError, match="it is a PNG image, not a video"):
        probe_video(tmp_path / "photo.mp4")


def test_a_failed_video_is_counted_as_a_video(tiny_model_folder, tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(np.random.default_rng(0).bytes(3000))
    result = run(fake, tmp_path / "out", "--weights", tiny_model_folder)
    assert result.exit_code == 1
    assert "1 of 1 video(s) failed" in result.output and "s/image" not in result.output
    # the summary named an OUTPUT folder that was never made
    assert f"failed 1; nothing written ({tmp_path / 'out'} was not created)" in result.stdout
    assert not (tmp_path / "out").exists()


def test_probe_reports_what_the_clip_holds(tmp_path):
    info = probe_video(make_clip(tmp_path / "clip.mp4", rotate=-90))
    assert (info.width, info.height, info.frames, info.rate) == (W, H, N, FPS)
    assert info.rotation == -90 and info.audio_streams == 1


def test_pyav_is_an_extra_that_dev_includes_and_photo_runs_do_not_import():
    import subprocess

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not any(r.startswith("av") for r in project["dependencies"])
    assert all(r.startswith("av>=") for r in project["optional-dependencies"]["video"])
    assert "deblurcli[video]" in project["optional-dependencies"]["dev"]
    code = ("import sys, deblurcli.batch, deblurcli.cli.app\n"
            "print('av' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_synth_frames_from_a_video_file_equal_those_from_its_frames(tmp_path):
    """``synth --frames clip.mp4`` makes the same pairs as ``--frames`` on the clip's frames saved
    as PNG files (a folder of the same name); in a folder, a video is one more sequence."""
    import json

    from deblurcli.video import _exact

    clip = make_clip(tmp_path / "src" / "clip.mp4", frames=20, audio=False)
    with av.open(str(clip)) as c:  # decoded as the tool decodes them
        for i, f in enumerate(c.decode(video=0)):
            write_image(tmp_path / "clip" / f"{i:04d}.png",
                        f.to_ndarray(format="rgb24", interpolation=_exact(av))
                        .astype(np.float32) / 255.0)
    args = ["--n-min", "5", "--n-max", "7", "--frame-step", "8", "--crop", "32"]

    def synth(frames, out):
        result = CliRunner().invoke(app, ["synth", "--frames", str(frames), "--out",
                                          str(out), *args])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]

    from_video = synth(clip, tmp_path / "a")
    from_pngs = synth(tmp_path / "clip", tmp_path / "b")
    assert [r["name"] for r in from_video] == [r["name"] for r in from_pngs] == \
        ["clip_w0000", "clip_w0001"]
    for rv, rp in zip(from_video, from_pngs, strict=True):
        assert rv["frames"] == list(range(rv["frames"][0], rv["frames"][0] + rv["num_frames"]))
        assert rv["num_frames"] == rp["num_frames"] and rv["crop_box"] == rp["crop_box"]
        assert rv["sharp_frame"] == rv["frames"][rv["num_frames"] // 2]
        for kind in ("blur", "sharp"):
            a = (tmp_path / "a" / kind / f"{rv['name']}.png").read_bytes()
            assert a == (tmp_path / "b" / kind / f"{rp['name']}.png").read_bytes()
    # a folder holding a frame sequence and a video: two sequences, the video named by its path
    import shutil

    shutil.copytree(tmp_path / "clip", tmp_path / "src" / "seq")
    (tmp_path / "src" / "notes.txt").write_text("not a video")
    (tmp_path / "src" / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3" + b"\xff" * 100)
    result = CliRunner().invoke(app, ["synth", "--frames", str(tmp_path / "src"), "--out",
                                      str(tmp_path / "c"), *args])
    assert result.exit_code == 0 and "broken.mkv" in result.output, result.output
    mixed = [json.loads(line)
             for line in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in mixed) == ["clip_w0000", "clip_w0001", "seq_w0000",
                                               "seq_w0001"]
    assert {r["source"] for r in mixed} == {"clip.mp4", "seq"}


def test_video_written_inside_its_input_folder_is_recorded_and_not_an_input_next_time(tmp_path):
    src = tmp_path / "clips"
    make_clip(src / "clip.mp4", frames=3, audio=False)
    options = BatchOptions(suffix="_sharp")
    first = run_jobs(plan_jobs(src, src, options), lambda x, p: x, options)
    assert [r.status for r in first.results] == ["done"] and (src / "clip_sharp.mp4").exists()
    again = plan_jobs(src, src, options)  # the ledger vouches for clip_sharp.mp4: not an input
    assert [j.source.name for j in again] == ["clip.mp4"]
    assert [r.status for r in run_jobs(again, lambda x, p: x, options).results] == ["skipped"]


def test_frame_ranges_are_contiguous_and_even():
    assert frame_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert frame_ranges(10, 1) == [(0, 10)]
    assert frame_ranges(2, 4) == [(0, 0), (0, 1), (1, 1), (1, 2)]  # fewer frames than parts
    for n, parts in [(0, 3), (7, 7), (1000, 8), (999, 8)]:
        ranges = frame_ranges(n, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    with pytest.raises(ValueError):
        frame_ranges(5, 0)


def test_frame_spans_split_by_timestamp_or_else_by_frame_number():
    # packets in decoding order (B-frames): the spans follow presentation order
    spans = frame_spans([0, 30, 10, 20, 50, 40], 2)
    assert spans == [FrameSpan(0, 3, lo=None, hi=30, origin=0, frames=3),
                     FrameSpan(3, None, lo=30, hi=None, origin=0, frames=3)]
    # repeated or missing timestamps: frames are counted from the start instead
    assert frame_spans([0, 10, 10, 20], 2) == [FrameSpan(0, 2, frames=2),
                                               FrameSpan(2, None, frames=2)]
    assert frame_spans([0, None, 20], 3)[1:] == [FrameSpan(1, 2, frames=1),
                                                 FrameSpan(2, None, frames=1)]


def test_continuous_dts_fills_missing_and_stays_increasing():
    assert continuous_dts([0, 40, 20], [None, None, 0], None) == [-2, -1, 0]  # Matroska's start
    assert continuous_dts([100, 140], [60, 100], 80) == [81, 100]  # raised above the previous
    assert continuous_dts([100, 140], [None, None], 90) == [98, 99]
    with pytest.raises(ValueError):
        continuous_dts([100], [None], 100)


@pytest.mark.parametrize("suffix, x264", [
    (".mp4", {"g": "4"}),  # keyframes every 4 frames: the later parts seek
    (".mkv", {"g": "4"}),  # no decoding timestamps stored for a file's first packets
    (".mp4", {"x264-params": "intra-refresh=1:keyint=4"}),  # no clean keyframe: decode from 0
])
def test_video_deblurred_in_parts_and_joined_equals_one_run(tmp_path, suffix, x264):
    """Lossless (crf 0), so the decoded frames must be equal; and so must the timestamps, the
    frame rate, the size, the rotation and the audio packets."""
    clip = make_clip(tmp_path / f"clip{suffix}", frames=13, x264=x264,
                     rotate=90 if suffix == ".mp4" else 0)
    whole = tmp_path / "whole" / f"clip{suffix}"
    deblur_video(clip, whole, lambda x, p: 1 - x, crf=0)
    target = tmp_path / "out" / f"clip{suffix}"
    spans = plan_spans(clip, 3)
    assert [s.start for s in spans] == [0, 4, 8] and spans[-1].stop is None
    segments = [deblur_segment(clip, target, lambda x, p: 1 - x, i, span, crf=0)
                for i, span in enumerate(spans)]
    assert [s.frames for s in segments] == [4, 4, 5]
    assert join_segments(clip, segments, target) == 13
    a, b = streams(whole), streams(target)
    assert b["pts"] == a["pts"] and len(b["pts"]) == 13
    assert (b["rate"], b["size"], b["rotation"]) == (a["rate"], a["size"], a["rotation"])
    assert b["audio"]["packets"] == a["audio"]["packets"]
    assert all(np.array_equal(x, y) for x, y in zip(a["rgb"], b["rgb"], strict=True))
    # the segment files are left to the caller (who removes them)
    assert sorted(p.name for p in target.parent.iterdir()) == \
        [f".clip{suffix}.segment{i:04d}.part" for i in range(3)] + [f"clip{suffix}"]


@pytest.mark.parametrize("codec,suffix,noise", [("libx265", ".mp4", "x265 [info]"),
                                                ("libsvtav1", ".mkv", "Svt[info]")])
def test_encoders_keep_their_settings_off_stderr(tmp_path, capfd, monkeypatch, codec, suffix,
                                                 noise):
    """x265 and SVT-AV1 printed ~25 lines of settings on every video."""
    from deblurcli.video import deblur_video, has_encoder

    if not has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec}")
    monkeypatch.delenv("SVT_LOG", raising=False)
    clip = make_clip(tmp_path / "clip.mp4", frames=8, audio=False)
    deblur_video(clip, tmp_path / f"out{suffix}", lambda x, p: x, codec=codec, crf=30)
    assert noise not in capfd.readouterr().err
    assert "SVT_LOG" not in os.environ  # set only while SVT-AV1 encodes


def test_x265_encodes_a_one_or_two_frame_video_every_time(tmp_path):
    """With B-frames, x265 gave the first packet of a 1- or 2-frame stream a garbage decoding
    time in about one encode in 4 to 8, and the muxer refused it ('Not yet implemented in
    FFmpeg')."""
    from deblurcli.video import deblur_video, has_encoder

    if not has_encoder("libx265"):
        pytest.skip("this PyAV build has no libx265")
    for frames in (1, 2):
        clip = make_clip(tmp_path / f"clip{frames}.mp4", frames=frames, audio=False)
        for i in range(25):
            out = tmp_path / f"out{frames}-{i}.mp4"
            assert deblur_video(clip, out, lambda x, p: x, codec="libx265") == frames


def test_without_pyav_a_named_codec_does_not_stop_the_photos(tiny_model_folder, tmp_path,
                                                             monkeypatch):
    """`--codec libx264` on a folder of photos failed the whole run when PyAV was missing."""
    src = tmp_path / "in"
    write_image(src / "photo.png", np.zeros((8, 8, 3), dtype=np.float32))
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    result = run(src, tmp_path / "out", "--weights", tiny_model_folder, "--tile", "0",
                 "--codec", "libx264", "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "photo.png").is_file()


def test_an_avi_keeps_its_frames_in_order_and_in_their_places(tmp_path):
    """AVI stores no timestamps, only a place per frame: FFmpeg guesses them, one frame late for
    H.264 and out of order with B-frames. Frames were written with those times (shuffled, and
    every run made the video longer); now a frame's place counts, a dropped frame's place stays
    empty, and outputs have no B-frames."""
    clip = make_clip(tmp_path / "clip.avi", frames=10, audio=False)  # x264 with B-frames
    gappy = tmp_path / "gappy.avi"  # MPEG-4 Part 2, the frame at place 2 dropped
    with av.open(str(gappy), "w") as c:
        v = c.add_stream("mpeg4", rate=FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        for i in (0, 1, 3, 4, 5):
            f = av.VideoFrame.from_ndarray(np.full((H, W, 3), 40 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            c.mux(v.encode(f))
        c.mux(v.encode())

    def places(path):
        with av.open(str(path)) as c:
            return [p.dts for p in c.demux(c.streams.video[0]) if p.size]

    for source, expected in ((clip, list(range(10))), (gappy, [0, 1, 3, 4, 5])):
        assert places(source) == expected
        once, twice = tmp_path / "1" / source.name, tmp_path / "2" / source.name
        deblur_video(source, once, lambda x, p: x, crf=0)
        deblur_video(once, twice, lambda x, p: x, crf=0)
        assert places(once) == places(twice) == expected, source.name
        blues = [round(float(rgb[..., 2].mean())) for rgb in streams(twice)["rgb"]]
        assert blues == sorted(blues) and len(set(blues)) == len(expected), source.name


def test_a_codecs_own_name_gets_its_encoders_settings(tmp_path):
    """--codec h264 (hevc, vp9, vp8, av1) ran the encoder at its own defaults: --crf ignored
    and unchecked, x265's and SVT-AV1's logs on stderr, VP8's colour rule passed over."""
    from deblurcli.video import choose_codec

    assert choose_codec("h264", ".mp4") == "libx264"
    assert choose_codec("libx264", ".mp4") == "libx264"
    clip = make_clip(tmp_path / "clip.mp4", frames=6, width=96, height=64, audio=False)
    sizes = []
    for crf in (0, 51):
        out = tmp_path / str(crf) / "clip.mp4"
        deblur_video(clip, out, lambda x, p: x, codec="h264", crf=crf)
        sizes.append(out.stat().st_size)
    assert sizes[0] > 4 * sizes[1], sizes


def test_a_codec_its_container_cannot_hold_is_refused_before_the_model_loads(tmp_path):
    """x264 in WebM stopped a folder run half-way with 'ValueError: 'webm' format does not
    support 'libx264' codec', after the model had loaded and other videos were written."""
    from deblurcli.video import check_container

    folder = tmp_path / "clips"
    make_clip(folder / "a.mp4", frames=2, audio=False)
    deblur_video(folder / "a.mp4", folder / "b.webm", lambda x, p: x)  # auto: VP9
    result = run(folder, tmp_path / "out", "--codec", "libx264")  # no --weights: exit 2 first
    assert result.exit_code == 2 and "a .webm file cannot hold libx264 video" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(DeblurcliError, match="cannot hold libx264 video; leave --codec at auto"):
        deblur_video(folder / "a.mp4", tmp_path / "c.webm", lambda x, p: x, codec="libx264")
    check_container("libx264", ".mkv")  # no error


def test_each_encoder_gets_a_pixel_format_it_takes(tmp_path, monkeypatch):
    """ProRes (10-bit 4:2:2 only) and x264rgb failed with 'Invalid argument', and so did
    SVT-AV1 on an odd size, which it cannot encode: that is said now, before any frame."""
    from deblurcli import video

    assert video.pixel_format("libx264", 64, 48) == "yuv420p"
    assert video.pixel_format("libx264", 65, 47) == "yuv444p"
    assert video.pixel_format("mjpeg", 64, 48) == "yuvj420p"
    assert video.pixel_format("mpeg4", 65, 47) == "yuv420p"
    if video.has_encoder("libx264rgb"):
        assert video.pixel_format("libx264rgb", 64, 48) == "bgr0"
    if video.has_encoder("prores_ks"):
        assert video.pixel_format("prores_ks", 64, 48) == "yuv422p10le"
        clip = make_clip(tmp_path / "clip.mp4", frames=3, audio=False)
        assert deblur_video(clip, tmp_path / "pro.mov", lambda x, p: x, codec="prores_ks") == 3
    if video.has_encoder("libsvtav1"):
        odd = make_clip(tmp_path / "odd.mp4", frames=2, width=65, height=47, audio=False)
        with pytest.raises(DeblurcliError, match="cannot encode frames of 65x47"):
            deblur_video(odd, tmp_path / "odd.mkv", lambda x, p: x, codec="libsvtav1")
    # an encoder that refuses its frames all the same is named, with what it was given
    if video.has_encoder("libvpx"):
        monkeypatch.setattr(video, "pixel_format", lambda *args: "yuv444p")  # VP8: 4:2:0 only
        clip = make_clip(tmp_path / "vp8.mp4", frames=2, audio=False)
        with pytest.raises(DeblurcliError, match="the libvpx encoder refused its 64x48 yuv444p"):
            deblur_video(clip, tmp_path / "vp8.webm", lambda x, p: x, codec="libvpx")


@pytest.mark.parametrize("suffix", [".mov", ".mkv"])
def test_container_and_stream_tags_are_kept(tmp_path, suffix):
    """Creation time and title (phone videos) and each audio track's language were lost, and
    a phone's reverse-DNS tags (make, model, location) from a QuickTime file; the tags the
    muxer writes itself are its own, not the input's."""
    clip = make_clip(tmp_path / f"clip{suffix}", frames=6)
    tagged = tmp_path / f"tagged{suffix}"
    phone = {"movflags": "use_metadata_tags"} if suffix == ".mov" else {}  # as phones write
    with av.open(str(clip)) as inp, av.open(str(tagged), "w", options=phone) as out:
        streams_out = [out.add_stream_from_template(s) for s in inp.streams]
        out.metadata.update({"title": "Holiday", "creation_time": "2024-05-06T07:08:09.000000Z",
                             "encoder": "OldMuxer 1.0", "com.apple.quicktime.make": "Apple"})
        streams_out[1].metadata["language"] = "fra"
        for packet in inp.demux():
            if packet.size:  # not the demuxer's final empty packets
                packet.stream = streams_out[packet.stream.index]
                out.mux(packet)
    whole, parts = tmp_path / "whole" / tagged.name, tmp_path / "parts" / tagged.name
    deblur_video(tagged, whole, lambda x, p: x)
    segments = [deblur_segment(tagged, parts, lambda x, p: x, i, span)
                for i, span in enumerate(plan_spans(tagged, 2))]
    join_segments(tagged, segments, parts)
    for path in (whole, parts):
        with av.open(str(path)) as c:
            tags = {k.lower(): v for k, v in c.metadata.items()}
            assert tags["title"] == "Holiday", path
            assert tags["com.apple.quicktime.make"] == "Apple", path  # QuickTime: mdta only
            assert tags["creation_time"].startswith("2024-05-06T07:08:09"), path
            assert "OldMuxer" not in str(tags), path
            assert c.streams.audio[0].metadata.get("language") == "fra", path
    # --strip-metadata: none of them (a phone video's location among them)
    stripped, parts = tmp_path / "stripped" / tagged.name, tmp_path / "sparts" / tagged.name
    deblur_video(tagged, stripped, lambda x, p: x, tags=False)
    join_segments(tagged, [deblur_segment(tagged, parts, lambda x, p: x, i, span)
                           for i, span in enumerate(plan_spans(tagged, 2))], parts, tags=False)
    options = BatchOptions(metadata=False)  # what deblur --strip-metadata runs
    assert run_jobs(plan_jobs(tagged, tmp_path / "cli", options), lambda x, progress=None: x,
                    options).count("done") == 1
    for path in (stripped, parts, tmp_path / "cli" / tagged.name):
        with av.open(str(path)) as c:
            tags = {k.lower(): v for k, v in c.metadata.items()}
            assert "title" not in tags and "Holiday" not in str(tags), path
            assert not str(tags.get("creation_time", "")).startswith("2024"), path
            assert c.streams.audio[0].metadata.get("language") != "fra", path


@pytest.mark.parametrize("suffix", [".mkv", ".mp4", ".avi"])
def test_a_truncated_video_fails_rather_than_passing_for_whole(tmp_path, suffix):
    """A Matroska file cut in half (an interrupted copy) decoded its first half without an error
    and was counted as processed, its output half the video; in several processes too. The
    size the container states for itself tells, not durations (a video may start late or hold
    its last frame)."""
    from deblurcli.video import declared_size

    clip = make_clip(tmp_path / f"clip{suffix}", frames=60)
    data = clip.read_bytes()
    assert declared_size(clip) == len(data)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[:len(data) // 2])
    words = f"the file ends at {len(data) // 2:,} bytes of the [0-9,]+ its container"
    with pytest.raises(ImageReadError, match=words):
        deblur_video(cut, tmp_path / "out" / cut.name, lambda x, p: x)
    with pytest.raises(ImageReadError, match=words):
        deblur_segment(cut, tmp_path / "out" / cut.name, lambda x, p: x, 1, plan_spans(clip, 2)[1])
    with pytest.raises(ImageReadError, match=words):  # several processes plan its spans first
        plan_spans(cut, 2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert deblur_video(clip, tmp_path / "out" / clip.name, lambda x, p: x) == 60
    # bytes a tool appended (a caption, a log) are no part of the container
    trailer = tmp_path / f"trailer{suffix}"
    trailer.write_bytes(data + b"Recorded with MyCam v1.2 serial 12345\n")
    assert deblur_video(trailer, tmp_path / "out" / trailer.name, lambda x, p: x) == 60
    # held last frame, late start: still whole
    held = tmp_path / f"held{suffix}"
    with av.open(str(held), "w") as c:
        v = c.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        for pts in (12, 13, 14, 200):  # starts half a second in; the third frame held 7 s
            f = av.VideoFrame.from_ndarray(np.full((H, W, 3), pts % 256, np.uint8),
                                           format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, FPS)
            c.mux(v.encode(f))
        c.mux(v.encode())
    assert deblur_video(held, tmp_path / "out" / held.name, lambda x, p: x) == 4


def test_what_a_container_cannot_write_and_sizes_an_encoder_cannot_take_are_said_first(tmp_path):
    """FFmpeg lists VP8, VP9 and AV1 for MOV but cannot write them there ("Invalid argument"
    after the model had run); an odd size VP8 cannot encode was sent to libx264, which WebM
    cannot hold."""
    from deblurcli import video

    if video.has_encoder("libvpx-vp9"):
        with pytest.raises(DeblurcliError, match="a .mov file cannot hold libvpx-vp9 video"):
            video.check_container("libvpx-vp9", ".mov")
    if video.has_encoder("libvpx"):
        odd = make_clip(tmp_path / "odd.mp4", frames=2, width=65, height=47, audio=False)
        with pytest.raises(DeblurcliError) as caught:
            deblur_video(odd, tmp_path / "odd.webm", lambda x, p: x, codec="libvpx")
        assert "libvpx cannot encode frames of 65x47" in str(caught.value)
        assert "libvpx-vp9" in str(caught.value) and "libx264" not in str(caught.value)


def test_matroska_statistics_tags_of_the_input_are_not_carried(tmp_path):
    """mkvmerge writes DURATION-eng, NUMBER_OF_FRAMES-eng, ...: they were copied, so the output
    claimed the input's length and frame count."""
    clip = make_clip(tmp_path / "clip.mkv", frames=4, audio=False)
    tagged = tmp_path / "tagged.mkv"
    with av.open(str(clip)) as inp, av.open(str(tagged), "w") as out:
        vout = out.add_stream_from_template(inp.streams.video[0])
        vout.metadata.update({"DURATION-eng": "00:10:00.000000000", "NUMBER_OF_FRAMES-eng": "9",
                              "language": "eng"})
        for packet in inp.demux(inp.streams.video[0]):
            if packet.size:
                packet.stream = vout
                out.mux(packet)
    deblur_video(tagged, tmp_path / "out.mkv", lambda x, p: x)
    with av.open(str(tmp_path / "out.mkv")) as c:
        tags = dict(c.streams.video[0].metadata)
    assert tags.get("language") == "eng"
    assert not any(key.upper().startswith(("DURATION-", "NUMBER_OF_FRAMES")) for key in tags)


def test_an_avi_starting_between_key_frames_keeps_its_frames_in_their_places(tmp_path):
    """The packets before the first key frame decode to nothing: the k-th decoded frame took
    the k-th packet's place, and every frame moved earlier."""
    whole = tmp_path / "whole.avi"
    with av.open(str(whole), "w") as c:
        v = c.add_stream("libx264", rate=FPS, options={"bf": "0", "x264-params":
                                                       "keyint=10:min-keyint=10:scenecut=0"})
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        for i in range(30):
            f = av.VideoFrame.from_ndarray(np.full((H, W, 3), i * 8, np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, FPS)
            c.mux(v.encode(f))
        c.mux(v.encode())
    cut = tmp_path / "cut.avi"  # from frame 4 on: the first key frame is frame 10
    with av.open(str(whole)) as inp, av.open(str(cut), "w") as out:
        vout = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.size and packet.dts >= 4:
                packet.stream = vout
                out.mux(packet)
    deblur_video(cut, tmp_path / "out.avi", lambda x, p: x, crf=0)
    with av.open(str(tmp_path / "out.avi")) as c:
        places = [p.dts for p in c.demux(c.streams.video[0]) if p.size]
    assert places[-5:] == [25, 26, 27, 28, 29] and len(places) == 20


def test_mpeg4_follows_crf_instead_of_a_200_kbps_default(tmp_path):
    """Without a rate factor, MPEG-4 Part 2 and MJPEG ran at FFmpeg's 200 kb/s default: some
    4 dB below x264 at --crf 18. They take a fixed quantiser from --crf now."""
    from deblurcli.video import quantiser

    assert (quantiser(0), quantiser(18), quantiser(51)) == (2, 3, 8)
    clip = make_clip(tmp_path / "clip.mkv", frames=6, width=320, height=240, audio=False)

    def psnr(path):
        a, b = streams(clip)["rgb"], streams(path)["rgb"]
        mse = np.mean([((x.astype(float) - y) ** 2).mean() for x, y in zip(a, b, strict=True)])
        return 10 * np.log10(255 ** 2 / mse)

    sizes = {}
    for crf in (6, 18, 48):
        out = tmp_path / f"mpeg4-{crf}.mkv"
        deblur_video(clip, out, lambda x, p: x, codec="mpeg4", crf=crf)
        sizes[crf] = out.stat().st_size
    assert sizes[6] > sizes[18] > sizes[48]
    x264 = tmp_path / "x264.mkv"
    deblur_video(clip, x264, lambda x, p: x, crf=18)
    assert psnr(tmp_path / "mpeg4-18.mkv") > psnr(x264) - 1.5


def _solid_clip(path: Path, rgb, *, matrix: int, levels: int) -> Path:
    """Three 32x16 frames of one colour, converted and tagged with ``matrix`` and ``levels``
    (FFmpeg's AVColorSpace and AVColorRange), the swscale flags the tool converts with."""
    from deblurcli.video import _exact

    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=24, options={"crf": "0"})
        v.width, v.height, v.pix_fmt = 32, 16, "yuv420p"
        v.codec_context.colorspace, v.codec_context.color_range = matrix, levels
        for i in range(3):
            f = av.VideoFrame.from_ndarray(np.tile(np.uint8(rgb), (16, 32, 1)), format="rgb24")
            f = f.reformat(format="yuv420p", dst_colorspace=matrix, dst_color_range=levels,
                           interpolation=_exact(av))
            f.pts = i
            c.mux(v.encode(f))
        c.mux(v.encode())
    return path


@pytest.mark.parametrize("codec,suffix", [("libx264", ".mp4"), ("mjpeg", ".mp4"),
                                          ("libx264rgb", ".mkv"), ("libvpx", ".webm"),
                                          ("mpeg4", ".avi"), ("ffv1", ".avi")])
def test_colours_come_back_as_they_went_in_whatever_the_codec(tmp_path, codec, suffix):
    """A BT.709 clip came back shifted where the output cannot record BT.709 (MJPEG, VP8,
    MPEG-4 Part 2 or FFV1 in AVI: read as BT.601), red (199, 39, 90) as (154, 0, 0) from an RGB
    encoder given YUV tags, and every pass made the colours 2 levels darker."""
    from deblurcli.video import _exact, has_encoder

    if not has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    red = (199, 39, 90)
    source = _solid_clip(tmp_path / "bt709.mp4", red, matrix=1, levels=1)
    out = tmp_path / f"out{suffix}"
    deblur_video(source, out, lambda x, progress: x, codec=codec,
                 crf=4 if codec == "libvpx" else 0)
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 3
    got = frames[-1].to_ndarray(format="rgb24", interpolation=_exact(av)).reshape(-1, 3)
    assert np.abs(got.mean(axis=0) - red).max() <= 1.5, got.mean(axis=0)


def test_the_video_with_the_largest_frames_is_deblurred_not_a_cover_before_it(tmp_path):
    """A Matroska file whose first video stream is a one-frame 32x32 picture came out as a
    one-frame 32x32 video, the film itself dropped."""
    path = tmp_path / "cover.mkv"
    with av.open(str(path), "w") as c:
        cover = c.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        film = c.add_stream("libx264", rate=FPS)
        film.width, film.height, film.pix_fmt = W, H, "yuv420p"
        picture = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        picture = picture.reformat(format="yuvj420p")
        picture.pts = 0
        c.mux(cover.encode(picture))
        c.mux(cover.encode())
        for i in range(N):
            f = av.VideoFrame.from_ndarray(np.full((H, W, 3), 20 * i, np.uint8), format="rgb24")
            f.pts = i
            c.mux(film.encode(f))
        c.mux(film.encode())
    info = probe_video(path)
    assert (info.width, info.height) == (W, H)
    assert deblur_video(path, tmp_path / "out.mkv", lambda x, progress: x) == N
    got = streams(tmp_path / "out.mkv")
    assert got["size"] == (W, H) and len(got["pts"]) == N


def test_damaged_video_data_is_located_and_mkv_progress_has_a_total(tmp_path):
    """A damaged packet failed the video as 'Invalid data found when processing input', with no
    word of where; a Matroska file's progress had no total (its container declares no count)."""
    clip = make_clip(tmp_path / "clip.mp4", frames=40, audio=False, x264={"g": "10"})
    with av.open(str(clip)) as c:
        positions = [p.pos for p in c.demux(video=0) if p.size]
    data = bytearray(clip.read_bytes())
    data[positions[25]] ^= 0xFF  # the length of packet 25's first unit: nonsense
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"damaged video data at 1\.0[0-9] s, after 2[0-9] "
                                             r"decoded frame\(s\)"):
        deblur_video(damaged, tmp_path / "out" / "damaged.mp4", lambda x, p: x)
    mkv = make_clip(tmp_path / "clip.mkv", frames=20, audio=False)
    events = []
    assert deblur_video(mkv, tmp_path / "out" / "clip.mkv", lambda x, p: x,
                        progress=events.append) == 20
    frames = [(e.done, e.total) for e in events if e.stage == "frames"]
    assert frames[0] == (0, 20) and frames[-1] == (20, 20)


def test_a_damaged_packet_fails_the_video_where_it_is_even_the_last(tmp_path):
    """Decoded with frames in parallel, a damaged packet near the end was dropped without an
    error: frames lost, the video counted as done (exit 0); one elsewhere was located two
    frames late."""
    clip = make_clip(tmp_path / "clip.mp4", frames=40, width=160, height=120, audio=False)
    with av.open(str(clip)) as c:
        packets = sorted((p.pos, p.size, float(p.pts * p.time_base))
                         for p in c.demux(video=0) if p.size)
    for pos, size, seconds in (packets[-1], packets[-2], packets[3], packets[0]):
        data = bytearray(clip.read_bytes())
        for k in range(pos + 4, pos + size):  # its payload, not its length
            data[k] ^= 0x5A
        damaged = tmp_path / "damaged.mp4"
        damaged.write_bytes(bytes(data))
        where = f"at {seconds:.2f} s" if pos != packets[0][0] else "before its first frame"
        with pytest.raises(ImageReadError, match=f"damaged video data {where}"):
            deblur_video(damaged, tmp_path / "out" / "damaged.mp4", lambda x, p: x)
        assert not (tmp_path / "out" / "damaged.mp4").exists()


def _durations(path: Path) -> tuple[float, list]:
    """FFmpeg's duration of a video file and its video packets' (pts, duration)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return c.duration / 1e6, sorted((p.pts, p.duration) for p in c.demux(stream) if p.size)


def test_a_variable_rate_mp4_keeps_each_frame_duration_and_its_length(tmp_path):
    """The encoder's packets carried no duration, and B-frames' decoding times (an MP4 times
    samples by them) were those of other frames: a phone's uneven frames came out with a
    shorter video track (FFmpeg: 0.44 s for 0.84 s) and a last frame of a guessed length."""
    clip = make_clip(tmp_path / "vfr.mp4", vfr=True, audio=False, x264={"bf": "0"})
    whole, parts = tmp_path / "whole" / clip.name, tmp_path / "parts" / clip.name
    assert deblur_video(clip, whole, lambda x, p: x) == N
    join_segments(clip, [deblur_segment(clip, parts, lambda x, p: x, i, span)
                         for i, span in enumerate(plan_spans(clip, 2))], parts)
    source = _durations(clip)
    assert len(source[1]) == N and len({d for _, d in source[1]}) > 1  # uneven
    assert _durations(whole) == source and _durations(parts) == source


def test_audio_its_container_cannot_hold_fails_that_video_alone(tmp_path):
    """A Matroska file named .webm with AAC audio (WebM takes Opus and Vorbis): PyAV's
    ValueError stopped the whole batch; it fails that video with what would hold it."""
    folder = tmp_path / "in"
    make_clip(folder / "mislabelled.mkv", frames=3).rename(folder / "mislabelled.webm")
    make_clip(folder / "fine.mp4", frames=3)
    options = BatchOptions()
    summary = run_jobs(plan_jobs(folder, tmp_path / "out", options), lambda x, progress=None: x,
                       options)
    failed = [r for r in summary.results if r.status == "failed"]
    assert [r.job.source.name for r in failed] == ["mislabelled.webm"]
    assert "its aac audio cannot be copied into a .webm file; rename it to" in failed[0].error
    assert ".mkv" in failed[0].error and ".avi" not in failed[0].error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fine.mp4"]
    # refused only when the header is written: Opus in QuickTime
    make_clip(folder / "opus.mkv", frames=3, audio_codec="libopus").rename(folder / "opus.mov")
    summary = run_jobs(plan_jobs(folder / "opus.mov", tmp_path / "out", options),
                       lambda x, progress=None: x, options)
    assert "its opus audio cannot be copied into a .mov file" in summary.results[0].error
    assert ".mov" not in summary.results[0].error.split("rename it to")[1]


def test_parts_of_a_video_whose_name_has_a_colon_are_joined(tmp_path, monkeypatch):
    """FFmpeg read the relative segment name ``.a:b.mp4.segment0000.part`` as a URL of the
    protocol ``.a``: "Protocol not found" with OUTPUT ``.``."""
    clip = make_clip(tmp_path / "a:b.mp4", frames=4, audio=False)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    target = Path("a:b.mp4")
    segments = [deblur_segment(clip, target, lambda x, p: x, i, span)
                for i, span in enumerate(plan_spans(clip, 2))]
    assert join_segments(clip, segments, target) == 4
    assert len(streams(target.resolve())["pts"]) == 4
