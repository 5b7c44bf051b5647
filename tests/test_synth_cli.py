"""``deblurcli synth`` end to end through Typer's CliRunner (tiny images, CPU)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.images import read_image, write_image

runner = CliRunner()


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    write_image(src / "astro.png", data.astronaut()[:72, :100] / 255.0)  # 2x3 crops of 48
    write_image(src / "sub" / "coffee.jpg", data.coffee()[:48, :48] / 255.0)  # exactly one crop
    write_image(
        src / "tiny.png", data.camera()[:30, :40] / 255.0, grayscale=True
    )  # small-image rule
    (src / "readme.txt").write_text("not an image")
    return src


def _synth(*args: str):
    return runner.invoke(app, ["synth", *args])


def test_layout_manifest_and_small_image_rule(photos, tmp_path):
    out = tmp_path / "out"
    res = _synth(
        "--src", str(photos), "--out", str(out), "--crop", "48", "--stride", "32", "--seed", "3"
    )
    assert res.exit_code == 0, res.output
    assert "wrote 8 pairs" in res.stdout and "not an image" in res.stderr
    lines = (out / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    names = [r["name"] for r in recs]
    assert len(names) == len(set(names)) == 8
    assert names[0] == "astro_c000_k0" and "sub__coffee_c000_k0" in names
    for r in recs:
        blur, sharp = (
            read_image(out / "blur" / f"{r['name']}.png"),
            read_image(out / "sharp" / f"{r['name']}.png"),
        )
        assert blur.pixels.shape == sharp.pixels.shape
        x, y, w, h = r["crop_box"]
        assert sharp.pixels.shape[:2] == (h, w)
        k = np.load(out / r["kernel_file"], allow_pickle=False)
        assert abs(float(k.sum()) - 1) < 1e-5 and k.shape[0] == r["kernel"]["size"]
        assert {"source", "seed", "run_seed", "crop_index", "k", "kernel", "noise"} <= set(r)
    tiny = [r for r in recs if r["source"] == "tiny.png"]
    assert len(tiny) == 1 and tiny[0]["crop_box"] == [
        0,
        3,
        40,
        24,
    ]  # 30 -> 24 rows, 40 -> 40 cols, centred
    source = read_image(photos / "astro.png").pixels
    first = recs[0]
    x, y, w, h = first["crop_box"]
    np.testing.assert_array_equal(
        read_image(out / "sharp" / "astro_c000_k0.png").pixels, source[y : y + h, x : x + w]
    )


def test_workers_do_not_change_bytes_and_resume(photos, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [
        "--src",
        str(photos),
        "--crop",
        "48",
        "--stride",
        "32",
        "--per-crop",
        "2",
        "--seed",
        "9",
    ]
    assert _synth(*args, "--out", str(a), "--workers", "1").exit_code == 0
    res = _synth(*args, "--out", str(b), "--workers", "2")
    assert res.exit_code == 0, res.output
    tree_a = _tree(a)
    assert tree_a == _tree(b)

    # resume after an "interruption": lose a blurred image, a manifest line and leave a partial line
    lines = (b / "manifest.jsonl").read_text().splitlines()
    victim = json.loads(lines[3])["name"]
    (b / "blur" / f"{victim}.png").unlink()
    (b / "manifest.jsonl").write_text("\n".join(lines[:5] + lines[6:]) + "\n" + lines[6][:20])
    res = _synth(*args, "--out", str(b), "--workers", "2")
    assert res.exit_code == 0, res.output
    assert "wrote 2 pairs" in res.stdout and "14 already done" in res.stdout
    assert _tree(b) == tree_a

    # a finished run is a no-op
    res = _synth(*args, "--out", str(a))
    assert "wrote 0 pairs" in res.stdout and _tree(a) == tree_a

    # other settings into the same folder are refused
    res = _synth(*args[:-1], "10", "--out", str(a))
    assert res.exit_code == 1 and "different synth settings" in res.stderr


def test_limit_caps_pairs_and_matches_full_run_prefix(photos, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--src", str(photos), "--crop", "48", "--stride", "32"]
    assert _synth(*args, "--out", str(full)).exit_code == 0
    res = _synth(*args, "--out", str(part), "--limit", "3")
    assert res.exit_code == 0 and "wrote 3 pairs" in res.stdout
    part_lines = (part / "manifest.jsonl").read_text().splitlines()
    assert part_lines == (full / "manifest.jsonl").read_text().splitlines()[:3]
    for line in part_lines:
        name = json.loads(line)["name"]
        assert (part / "blur" / f"{name}.png").read_bytes() == (
            full / "blur" / f"{name}.png"
        ).read_bytes()


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEBLURCLI_DATA", raising=False)
    res = _synth("--src", "DF2K", "--out", "o")
    assert res.exit_code == 1
    assert "DF2K" in res.stderr and "3,550" in res.stderr and "DEBLURCLI_DATA" in res.stderr
    (tmp_path / "empty").mkdir()
    res = _synth("--src", "empty", "--out", "o")
    assert res.exit_code == 1 and "no images found" in res.stderr
    res = _synth("--src", "empty", "--out", "o", "--crop", "50")
    assert res.exit_code == 2
    res = _synth("--out", "o")
    assert res.exit_code == 2

    # bare names are found in $DEBLURCLI_DATA
    data_dir = tmp_path / "data" / "MYSET"
    write_image(data_dir / "x.png", data.astronaut()[:40, :40] / 255.0)
    (data_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    monkeypatch.setenv("DEBLURCLI_DATA", str(tmp_path / "data"))
    res = _synth("--src", "MYSET", "--out", "o2", "--crop", "40")
    assert res.exit_code == 0, res.output
    assert (
        "wrote 1 pairs" in res.stdout and "broken.png" in res.stdout and "broken.png" in res.stderr
    )
    # a truncated file whose header reads: its crops were planned, and the count looked short
    whole = tmp_path / "data" / "CUT" / "whole.png"
    write_image(whole, data.astronaut()[:80, :80] / 255.0)
    (whole.parent / "cut.png").write_bytes(whole.read_bytes()[:200])
    res = _synth("--src", "CUT", "--out", "o3", "--crop", "40")
    assert res.exit_code == 0, res.output
    assert "(0 already done, 8 planned, 4 not written: their inputs are skipped below)" in \
        " ".join(res.stdout.split())


def test_frames_mode(tmp_path):
    rng = np.random.default_rng(0)
    base = data.astronaut()[:40, :56] / 255.0
    for seq, count in (("seqA", 20), ("seqB", 9), ("short", 3)):
        for i in range(count):
            shifted = np.roll(base, shift=i, axis=1)
            write_image(
                tmp_path / "frames" / seq / f"{i:04d}.png",
                np.clip(shifted + rng.normal(0, 0.01, base.shape), 0, 1),
            )
    out = tmp_path / "out"
    args = [
        "--frames",
        str(tmp_path / "frames"),
        "--n-min",
        "5",
        "--n-max",
        "7",
        "--frame-step",
        "8",
    ]
    res = _synth(*args, "--out", str(out), "--crop", "32")
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["source"] for r in recs] == ["seqA", "seqA", "seqB"]
    for r in recs:
        assert r["num_frames"] in (5, 7) and r["sharp_frame"] == r["frames"][r["num_frames"] // 2]
        assert read_image(out / "blur" / f"{r['name']}.png").pixels.shape == (32, 32, 3)
        assert not (out / "kernels").exists()
    res2 = _synth(*args, "--out", str(tmp_path / "out2"), "--crop", "32", "--workers", "2")
    assert res2.exit_code == 0 and _tree(out) == _tree(tmp_path / "out2")
    res = _synth(*args, "--out", str(tmp_path / "o3"), "--seed", "-1")
    assert res.exit_code == 2 and "--seed" in res.stderr


def test_frames_numbered_without_zeros_are_taken_in_number_order(tmp_path):
    """ffmpeg's f%d.png names sort f1, f10, f11, f2 by name: windows mixed far-apart frames."""
    from deblurcli.train import data as dt

    base = data.astronaut()[:40, :56] / 255.0
    for i in range(1, 15):
        write_image(tmp_path / "frames" / f"frame{i}.png", np.roll(base, i, axis=1))
    out = tmp_path / "out"
    res = _synth("--frames", str(tmp_path / "frames"), "--n-min", "7", "--n-max", "7",
                 "--out", str(out))
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["frames"] for r in recs] == [[f"frame{i}.png" for i in range(1, 8)],
                                          [f"frame{i}.png" for i in range(8, 15)]]
    windows = dt.frame_items(tmp_path / "frames", 7)
    assert [[p.name for p in w.frames] for w in windows] == [r["frames"] for r in recs]
    assert [p.name for p in dt.frame_clips(tmp_path / "frames")[0]][8:10] == \
        ["frame9.png", "frame10.png"]


def test_output_inside_source_is_not_used_as_input(photos):
    out = photos / "pairs"
    args = ["--src", str(photos), "--out", str(out), "--crop", "48", "--stride", "32"]
    assert _synth(*args).exit_code == 0
    res = _synth(*args)
    assert res.exit_code == 0 and "wrote 0 pairs" in res.stdout and "8 planned" in res.stdout
    # the output's own files were each a "skipping" line (one per kernel: thousands)
    assert [line for line in res.stderr.splitlines() if "skipping" in line] == \
        [line for line in res.stderr.splitlines() if "readme.txt" in line]
    # a photo of the user's inside the output folder is left out, and said to be
    write_image(out / "mine.png", np.zeros((48, 48, 3), np.float32))
    res = _synth(*args)
    assert res.exit_code == 0 and "leaving out 1 image(s) inside --out" in res.stderr


def test_sources_whose_names_collide_get_distinct_outputs(tmp_path):
    # 'a/b.png' and 'a__b.png' both flatten to the stem 'a__b'; x.png and x.jpg both to 'x'.
    src = tmp_path / "src"
    image = data.astronaut()[:64, :64].astype(np.float32) / 255.0
    for rel in ("a/b.png", "a__b.png", "x.png", "x.jpg"):
        write_image(src / rel, image)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["synth", "--src", str(src), "--out", str(out), "--crop", "64",
                                      "--seed", "3"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    names = [r["name"] for r in records]
    assert len(records) == 4 and len(set(names)) == 4, names
    assert len(list((out / "blur").glob("*.png"))) == 4


def test_a_run_that_makes_no_pair_fails_and_leaves_no_output(tmp_path):
    for i in range(7):  # frames of two sizes: the one window cannot be averaged
        write_image(tmp_path / "frames" / f"{i:03d}.png",
                    data.astronaut()[: 32 + 8 * (i % 2), :32] / 255.0)
    res = _synth("--frames", str(tmp_path / "frames"), "--out", str(tmp_path / "new" / "s7"))
    assert res.exit_code == 1 and "no pairs could be made" in res.stderr
    assert "frames differ in size" in res.stderr.splitlines()[-1]
    assert not (tmp_path / "new").exists()

    kept = tmp_path / "kept"  # a folder the user made is kept, as empty as it was
    kept.mkdir()
    assert _synth("--frames", str(tmp_path / "frames"), "--out", str(kept)).exit_code == 1
    assert list(kept.iterdir()) == []

    # --src: a PNG whose header reads but whose pixels do not
    write_image(tmp_path / "src" / "cut.png", data.astronaut()[:64, :64] / 255.0)
    whole = (tmp_path / "src" / "cut.png").read_bytes()
    (tmp_path / "src" / "cut.png").write_bytes(whole[: len(whole) // 2])
    res = _synth("--src", str(tmp_path / "src"), "--out", str(tmp_path / "s8"), "--crop", "32")
    assert res.exit_code == 1 and "cut.png" in res.stderr.splitlines()[-1]
    assert not (tmp_path / "s8").exists()


def test_out_must_not_be_the_source_nor_hold_it(photos, tmp_path):
    before = _tree(photos)
    res = _synth("--src", str(photos), "--out", str(photos), "--crop", "48")
    assert res.exit_code == 1 and "--out must differ from --src" in res.stderr
    res = _synth("--src", str(photos / "sub"), "--out", str(photos), "--crop", "48")
    assert res.exit_code == 1 and "--out must not hold --src" in res.stderr
    res = _synth("--frames", str(photos), "--out", str(photos))
    assert res.exit_code == 1 and "--out must differ from --frames" in res.stderr
    assert _tree(photos) == before


def test_frames_mode_may_write_beside_its_frames_but_not_among_them(tmp_path):
    data_dir = tmp_path / "data"
    for i in range(9):
        write_image(data_dir / "clip" / f"{i:04d}.png",
                    np.roll(data.astronaut()[:32, :32], i, axis=1) / 255.0)
    args = ["--n-min", "3", "--n-max", "3", "--frame-step", "1"]
    res = _synth("--frames", str(data_dir / "clip"), "--out", str(data_dir), *args)
    assert res.exit_code == 0 and "wrote 7 pairs" in res.stdout, res.output
    before = _tree(data_dir)
    res = _synth("--frames", str(data_dir / "sharp"), "--out", str(data_dir), *args)
    assert res.exit_code == 1 and "lies in a folder of pairs" in res.stderr
    assert _tree(data_dir) == before


def test_frames_mode_does_not_read_its_output_inside_the_frames_folder(tmp_path):
    frames = tmp_path / "frames"
    for i in range(9):
        write_image(frames / f"{i:04d}.png", np.roll(data.astronaut()[:32, :32], i, axis=1) / 255.0)
    args = ["--frames", str(frames), "--out", str(frames / "pairs"), "--n-min", "3", "--n-max",
            "3", "--frame-step", "1"]
    assert _synth(*args).exit_code == 0  # 7 pairs: pairs/blur and pairs/sharp hold 7 frames each
    res = _synth(*args)
    assert res.exit_code == 0 and "wrote 0 pairs" in res.stdout and "7 planned" in res.stdout


def test_out_that_is_a_file_or_a_full_disk_is_one_line_naming_the_path(photos, tmp_path,
                                                                        monkeypatch):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    res = _synth("--src", str(photos), "--out", str(taken), "--crop", "48")
    assert res.exit_code == 1 and taken.read_bytes() == b"mine"
    assert res.stderr.strip() == f"error: --out must be a folder, but {taken} is a file"

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("deblurcli.synth.build.write_image", full)
    out = tmp_path / "out"
    res = _synth("--src", str(photos), "--out", str(out), "--crop", "48")
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1] == \
        f"error: cannot write {out / 'sharp' / 'astro_c000_k0.png'}: No space left on device"
    assert not out.exists()  # the kernel file of the unfinished pair went with the folder


def test_quiet_like_every_other_command(photos, tmp_path):
    """synth -q was 'No such option', where deblur, eval and training take it."""
    res = _synth("--src", str(photos), "--out", str(tmp_path / "q"), "--crop", "32", "-q")
    assert res.exit_code == 0, res.output
    assert "pairs/s" not in res.stderr  # the progress line a run without -q prints
    loud = _synth("--src", str(photos), "--out", str(tmp_path / "loud"), "--crop", "32")
    assert "pairs/s" in loud.stderr


def test_an_interrupted_synth_says_what_is_kept_and_how_to_go_on(photos, tmp_path, monkeypatch):
    from deblurcli.synth import build

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "run_synth", stopped)
    args = ["synth", "--src", str(photos), "--out", str(tmp_path / "o"), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    lines = result.stderr.strip().splitlines()
    assert "nothing is kept" in lines[0] and "starts again" in lines[0]  # (it said "kept")
    assert lines[-1] == "interrupted"
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.jsonl").write_text("")
    lines = runner.invoke(app, args).stderr.strip().splitlines()
    assert "finished so far are kept" in lines[0] and "the same command goes on" in lines[0]


def _fresh(photos: Path, tmp_path: Path, name: str, *more: str) -> dict[str, bytes]:
    out = tmp_path / name
    assert _synth("--src", str(photos), "--out", str(out), "--crop", "48", "--stride", "32",
                  *more).exit_code == 0
    return _tree(out)


def test_a_file_name_that_is_not_utf8_is_a_source_like_any_other(photos, tmp_path):
    """``caf\\xe9.png`` (Latin-1 bytes) stopped the whole run with a UnicodeEncodeError."""
    import os

    (photos / "sub" / "coffee.jpg").rename(os.fsdecode(bytes(photos / "sub") + b"/caf\xe9.jpg"))
    tree = _fresh(photos, tmp_path, "o")
    assert any(name.startswith("blur/sub__caf") for name in tree)
    assert _fresh(photos, tmp_path, "o") == tree  # resumed: nothing made again


def test_a_resume_after_a_source_name_changed_holds_what_a_fresh_run_does(photos, tmp_path):
    """Adding coffee.png beside coffee.jpg renames the latter's pairs: the old ones stayed, twice
    the pairs of one photo in the folders training reads."""
    out = tmp_path / "o"
    _fresh(photos, tmp_path, "o")
    write_image(photos / "sub" / "coffee.png", data.coffee()[48:96, :48] / 255.0)
    assert _fresh(photos, tmp_path, "o") == _fresh(photos, tmp_path, "fresh")
    assert not [p for p in (out / "blur").iterdir() if p.name.startswith("sub__coffee_c")]


def test_an_interrupted_run_leaves_no_part_of_an_unrecorded_pair(photos, tmp_path, monkeypatch):
    """Interrupted before its first pair was recorded, in a folder that existed: the written
    files of that pair stayed (the settings went), so a run with other settings then mixed
    them into blur/ and sharp/, which training reads. A killed run's temporary files stay too."""
    from deblurcli.synth import build

    real = build.run_image_task

    def stopped_after_writing(*args):
        real(*args)
        raise KeyboardInterrupt

    out = tmp_path / "o"
    out.mkdir()
    monkeypatch.setattr(build, "run_image_task", stopped_after_writing)
    args = ("--per-crop", "2", "--workers", "1")
    assert _synth("--src", str(photos), "--out", str(out), "--crop", "48", *args).exit_code == 130
    assert not [p for p in out.rglob("*") if p.is_file()]
    monkeypatch.setattr(build, "run_image_task", real)
    (out / "blur").mkdir(exist_ok=True)
    (out / "blur" / ".astro_c000_k0.png.x1y2z3w4.part").write_bytes(b"half")
    assert _fresh(photos, tmp_path, "o") == _fresh(photos, tmp_path, "fresh")


def test_a_bare_name_with_a_slash_after_it_is_looked_up_in_deblurcli_data(tmp_path,
                                                                          monkeypatch):
    from deblurcli.synth.build import resolve_source

    (tmp_path / "data" / "DF2K").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    env = {"DEBLURCLI_DATA": str(tmp_path / "data")}
    assert resolve_source("DF2K/", env=env) == tmp_path / "data" / "DF2K"


def test_unreadable_videos_are_said_as_such_and_listed(tmp_path):
    """It warned "skipping cannot read ...", left them out of the summary, and with no video
    readable said only that no sequence was long enough."""
    pytest.importorskip("av")
    frames = tmp_path / "frames"
    (frames / "a").mkdir(parents=True)
    (frames / "a" / "bad.mp4").write_bytes(b"garbage")
    res = _synth("--frames", str(frames), "--out", str(tmp_path / "o"))
    assert res.exit_code == 1 and "skipping cannot" not in res.stderr
    assert "1 unreadable: cannot read" in " ".join(res.stderr.split())
    base = data.astronaut()[:40, :56] / 255.0
    for i in range(9):
        write_image(frames / "seq" / f"{i:04d}.png", np.roll(base, shift=i, axis=1))
    res = _synth("--frames", str(frames), "--out", str(tmp_path / "o"), "--crop", "32")
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable input(s)" in res.stdout and "bad.mp4" in res.stdout


def _write_clip(av, path: Path, base: np.ndarray, count: int) -> None:
    """An MPEG-4 clip of ``count`` frames: ``base`` shifted by one pixel more each frame."""
    height, width = base.shape[:2]
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=24)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        for i in range(count):
            c.mux(v.encode(av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")))
        c.mux(v.encode())


def test_limit_in_frames_mode_takes_the_first_pairs_of_the_manifest(tmp_path):
    """A folder's videos were planned before its sub-folders of frames, the manifest sorts by
    path: --limit 1 made zz.mp4's first pair where a full run's manifest starts with aa's."""
    av = pytest.importorskip("av")
    base = (data.astronaut()[:40, :56]).astype(np.uint8)
    frames = tmp_path / "frames"
    for i in range(9):
        write_image(frames / "aa" / f"{i:04d}.png", np.roll(base, shift=i, axis=1) / 255.0)
    _write_clip(av, frames / "zz.mp4", base, 9)
    args = ("--frames", str(frames), "--crop", "32", "--n-max", "9")
    assert _synth(*args, "--out", str(tmp_path / "full")).exit_code == 0
    assert _synth(*args, "--out", str(tmp_path / "one"), "--limit", "1").exit_code == 0
    full = (tmp_path / "full" / "manifest.jsonl").read_text().splitlines()
    assert len(full) > 1 and (tmp_path / "one" / "manifest.jsonl").read_text().splitlines() == \
        full[:1]


def test_a_refused_or_interrupted_resume_keeps_the_pairs_made_before(photos, tmp_path,
                                                                     monkeypatch):
    """The clean-up of unrecorded pairs ran when a resume was refused (other settings) or
    stopped while it read the manifest, with nothing recorded yet in this run: it deleted
    every pair of the folder."""
    from deblurcli.synth import build

    made = _fresh(photos, tmp_path, "o")
    out = str(tmp_path / "o")
    res = _synth("--src", str(photos), "--out", out, "--crop", "48", "--stride", "32",
                 "--seed", "1")
    assert res.exit_code == 1 and "different synth settings" in res.stderr
    assert _tree(tmp_path / "o") == made

    def stopped(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "_read_manifest", stopped)
    res = _synth("--src", str(photos), "--out", out, "--crop", "48", "--stride", "32")
    assert res.exit_code == 130 and _tree(tmp_path / "o") == made


def test_an_interrupted_video_keeps_the_pairs_it_finished(tmp_path, monkeypatch):
    """A video is one task: interrupted, every pair of it was removed, so a run on one long
    video started from its first frame however far it had come."""
    av = pytest.importorskip("av")
    from deblurcli.synth import build

    base = (data.astronaut()[:40, :56]).astype(np.uint8)
    frames = tmp_path / "frames"
    frames.mkdir()
    _write_clip(av, frames / "clip.mp4", base, 15)
    real, calls = build._window_pair, []

    def stopped_at_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(build, "_window_pair", stopped_at_the_third)
    args = ("--frames", str(frames), "--crop", "32", "--n-min", "3", "--n-max", "3", "-j", "1")
    out = tmp_path / "o"
    result = _synth(*args, "--out", str(out))
    assert result.exit_code == 130 and "finished so far are kept" in result.stderr
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    assert len(list((out / "blur").iterdir())) == 2 and not list(out.glob(".*"))
    monkeypatch.setattr(build, "_window_pair", real)
    calls.clear()
    resumed = _synth(*args, "--out", str(out))
    assert resumed.exit_code == 0 and "2 already" in " ".join(resumed.stdout.split())
    assert _synth(*args, "--out", str(tmp_path / "fresh")).exit_code == 0
    assert _tree(out) == _tree(tmp_path / "fresh")
    # recording them fails too (a full disk): the files of every unrecorded pair still go
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build, "_window_pair", stopped_at_the_third)
    monkeypatch.setattr(build, "_keep_partial", full)
    calls.clear()
    assert _synth(*args, "--out", str(tmp_path / "full")).exit_code != 0
    assert not [p for p in (tmp_path / "full").rglob("*.png")]
    monkeypatch.undo()
    # killed (no clean-up): the next run takes the pairs its log recorded
    killed = tmp_path / "killed"
    monkeypatch.setattr(build, "_window_pair", stopped_at_the_third)
    monkeypatch.setattr(build, "_keep_partial", lambda *a: None)
    monkeypatch.setattr(build, "_remove_unfinished", lambda *a: None)
    monkeypatch.setattr(build, "_remove_new", lambda *a: None)
    calls.clear()
    assert _synth(*args, "--out", str(killed)).exit_code == 130
    assert len(list(killed.glob(".video-*.jsonl"))) == 1
    monkeypatch.undo()
    resumed = _synth(*args, "--out", str(killed))
    assert resumed.exit_code == 0 and "2 already" in " ".join(resumed.stdout.split())
    assert _tree(killed) == _tree(tmp_path / "fresh")
