"""The batch runner: output naming, shards, skip/overwrite, refusal to overwrite inputs,
per-file failures (with a stand-in deblur function; no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deblurcli.batch import (
    LEDGER_NAME,
    BatchOptions,
    Job,
    output_name,
    parse_shard,
    plan_jobs,
    run_jobs,
    shard_items,
)
from deblurcli.errors import DeblurcliError, ImageReadError, ImageWriteError
from deblurcli.images import encode_image, read_image, write_image


def invert(pixels, progress=None):
    return 1.0 - pixels


def _img(path: Path, h: int = 12, w: int = 10, **kwargs) -> Path:
    rng = np.random.default_rng(len(path.name))
    write_image(path, rng.random((h, w, 3), dtype=np.float32), **kwargs)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    for name in ("c.png", "a.jpg", "b.png", "sub/d.png", "notes.txt"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            (src / name).write_text("x")
        else:
            _img(src / name)
    return src


@pytest.mark.parametrize("spec,expected", [("0/1", (0, 1)), ("1/2", (1, 2)), (" 3/4 ", (3, 4))])
def test_parse_shard(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", ""])
def test_parse_shard_rejects(spec):
    with pytest.raises(ValueError, match="0..n-1"):
        parse_shard(spec)


def test_shards_partition_the_sorted_list():
    items = list(range(11))
    parts = [shard_items(items, (i, 3)) for i in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert parts[1] == [1, 4, 7, 10]
    assert shard_items(items, None) == items


def test_output_name():
    assert output_name(Path("photo.JPG"), "", "auto") == "photo.JPG"
    assert output_name(Path("photo.jpg"), "_out", "png") == "photo_out.png"
    assert output_name(Path("a.b.tif"), "", "webp") == "a.b.webp"
    with pytest.raises(ValueError):
        output_name(Path("a.png"), "", "gif")


def test_plan_jobs_folder_recursive_and_shards(folder, tmp_path):
    out = tmp_path / "out"
    flat = plan_jobs(folder, out, BatchOptions())
    assert [j.source.name for j in flat] == ["a.jpg", "b.png", "c.png"]
    assert [j.target for j in flat] == [out / "a.jpg", out / "b.png", out / "c.png"]
    deep = plan_jobs(folder, out, BatchOptions(recursive=True, suffix="_x", ext="png"))
    assert deep[-1].target == out / "sub" / "d_x.png"
    halves = [plan_jobs(folder, out, BatchOptions(recursive=True, shard=(i, 2))) for i in (0, 1)]
    assert sorted(j.source for h in halves for j in h) == sorted(j.source for j in deep)
    assert not {j.source for j in halves[0]} & {j.source for j in halves[1]}


def test_a_name_has_one_shard_whatever_its_unicode_form_or_bytes():
    from deblurcli.batch import shard_of

    composed, decomposed = "caf\u00e9.png", "cafe\u0301.png"  # Linux/Windows, macOS
    assert all(shard_of(composed, n) == shard_of(decomposed, n) for n in range(2, 9))
    assert 0 <= shard_of("caf\udce9.png", 2) < 2  # a Latin-1 byte (os.fsdecode) or a lone
    # surrogate in a Windows name


def test_a_file_keeps_its_shard_when_files_are_added_or_removed(tmp_path):
    """--shard took every n-th file of the listing: a file added between the runs of 0/2 and
    1/2 moved the rest to the other shard, so some were done twice and some never."""
    folder = tmp_path / "in"
    folder.mkdir()
    names = [f"{c}.png" for c in "acegikmoqs"]
    for name in names:
        (folder / name).write_bytes(b"")

    def shards(count):
        return [{j.source.name for j in plan_jobs(folder, tmp_path / "o",
                                                  BatchOptions(shard=(i, count)))}
                for i in range(count)]

    before = shards(3)
    assert set().union(*before) == set(names) and sum(map(len, before)) == len(names)
    assert all(before)  # spread: no shard of 10 files is empty
    for added in "bdfhjlnprt":
        (folder / f"{added}.png").write_bytes(b"")
    (folder / "a.png").unlink()
    after = shards(3)
    assert sum(map(len, after)) == len(names) - 1 + 10
    assert all(b - {"a.png"} <= a for b, a in zip(before, after, strict=True))


def test_plan_jobs_single_file_and_missing_inputs(folder, tmp_path):
    jobs = plan_jobs(folder / "b.png", tmp_path / "o", BatchOptions(suffix="_s"))
    assert jobs == [Job(folder / "b.png", tmp_path / "o" / "b_s.png")]
    with pytest.raises(ImageReadError, match="not found"):
        plan_jobs(tmp_path / "nope", tmp_path / "o", BatchOptions())
    with pytest.raises(ImageReadError, match="not an image"):
        plan_jobs(folder / "notes.txt", tmp_path / "o", BatchOptions())
    with pytest.raises(DeblurcliError, match="must be a folder"):
        plan_jobs(folder, folder / "b.png", BatchOptions())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no images"):
        plan_jobs(tmp_path / "empty", tmp_path / "o", BatchOptions())


def test_never_plans_to_overwrite_an_input(folder):
    for options in (BatchOptions(), BatchOptions(overwrite=True)):
        with pytest.raises(DeblurcliError, match="input file"):
            plan_jobs(folder, folder, options)
        with pytest.raises(DeblurcliError, match="input file"):
            plan_jobs(folder / "b.png", folder, options)
    # with a suffix the outputs may go next to the inputs
    assert len(plan_jobs(folder, folder, BatchOptions(suffix="_sharp"))) == 3


def test_colliding_outputs_are_refused(folder):
    _img(folder / "a.png")
    # a --suffix is added to both names alike: it cannot part them, and is not offered
    with pytest.raises(DeblurcliError, match="both be written .*; use --ext auto \\(each keeps "
                                             "its own format\\), or rename one of them$"):
        plan_jobs(folder, folder.parent / "o", BatchOptions(ext="png"))


def test_a_shard_cannot_bypass_the_input_guard(tmp_path):
    """Issue 20 case a: `deblur s2 s2 --ext png --overwrite --shard 0/2` with a.jpg and a.png
    wrote a.jpg's result over the input a.png because the guard only saw the shard."""
    s2 = tmp_path / "s2"
    _img(s2 / "a.jpg")
    _img(s2 / "a.png")
    before = (s2 / "a.png").read_bytes()
    for shard in ((0, 2), (1, 2), None):
        options = BatchOptions(ext="png", overwrite=True, shard=shard)
        with pytest.raises(DeblurcliError, match="input file"):
            plan_jobs(s2, s2, options)
    assert (s2 / "a.png").read_bytes() == before


def test_output_folder_inside_a_recursive_input_is_guarded(tmp_path):
    """Issue 20 case b: `deblur s3 s3/sub -r --overwrite` dropped s3/sub/a.png from the inputs,
    then replaced it by the result for s3/a.png (and without --overwrite skipped it silently)."""
    s3 = tmp_path / "s3"
    _img(s3 / "a.png")
    _img(s3 / "sub" / "a.png", h=7)
    before = (s3 / "sub" / "a.png").read_bytes()
    for overwrite in (True, False):
        with pytest.raises(DeblurcliError, match=r"refusing to write .*sub/a\.png: it is an input"):
            plan_jobs(s3, s3 / "sub", BatchOptions(recursive=True, overwrite=overwrite))
    assert (s3 / "sub" / "a.png").read_bytes() == before
    # a file in OUTPUT that no other input maps to is an input like any other
    jobs = plan_jobs(s3, s3 / "sub", BatchOptions(recursive=True, suffix="_s"))
    assert [(j.source.relative_to(s3).as_posix(), j.target.relative_to(s3).as_posix())
            for j in jobs] == [("a.png", "sub/a_s.png"), ("sub/a.png", "sub/sub/a_s.png")]


@pytest.mark.parametrize("out_name,suffix", [(".", "_sharp"), ("out", ""), ("sub", "_s")])
def test_outputs_of_an_earlier_run_inside_the_input_are_recognised(folder, out_name, suffix):
    """A re-run in place (OUTPUT = INPUT with a --suffix, or OUTPUT inside a recursive INPUT)
    skips the earlier outputs instead of reading them as inputs or refusing; the ledger says
    which files this program wrote."""
    out = folder / out_name
    options = BatchOptions(suffix=suffix, recursive=True)
    first = plan_jobs(folder, out, options)
    assert run_jobs(first, invert, options).count("done") == len(first) == 4
    again = plan_jobs(folder, out, options)
    assert again == first
    assert run_jobs(again, invert, options).count("skipped") == 4
    redo = BatchOptions(suffix=suffix, recursive=True, overwrite=True)
    assert run_jobs(plan_jobs(folder, out, redo), invert, redo).count("done") == 4
    assert plan_jobs(folder, out, options) == first


@pytest.mark.parametrize("out_name,first,second", [
    (".", BatchOptions(suffix="_sharp", recursive=True),
     BatchOptions(suffix="_v2", recursive=True)),
    ("out", BatchOptions(recursive=True), BatchOptions(recursive=True, ext="jpg"))])
def test_earlier_outputs_are_no_inputs_whatever_suffix_or_format_came_next(folder, out_name,
                                                                           first, second):
    """A second run in place with another --suffix or --ext deblurred the first run's outputs
    again (p_sharp_v2.png, out/out/p.jpg): recorded outputs are never inputs."""
    out = folder / out_name
    done = run_jobs(plan_jobs(folder, out, first), invert, first)
    assert done.count("done") == 4
    jobs = plan_jobs(folder, out, second)
    assert len(jobs) == 4 and not [j for j in jobs if "_sharp" in j.source.name
                                   or "out" in j.source.parts[len(folder.parts):-1]]


def test_a_one_photo_run_into_its_own_folder_is_recorded(folder):
    """`deblur dir/a.jpg dir --suffix _s`, then `deblur dir dir --suffix _s`: the second run
    refused a_s.jpg as 'an input file' although deblurcli had written it."""
    options = BatchOptions(suffix="_s")
    assert run_jobs(plan_jobs(folder / "a.jpg", folder, options), invert, options).count(
        "done") == 1
    jobs = plan_jobs(folder, folder, options)
    assert len(jobs) == 3 and all(not j.source.stem.endswith("_s") for j in jobs)


def test_a_file_in_place_of_an_earlier_output_is_an_input(folder):
    """Only the ledger's word makes a file at an output path an earlier output: a file the user
    put there, or an output edited since, is an input and stops the run."""
    options = BatchOptions(suffix="_sharp")
    _img(folder / "b_sharp.png", h=5)  # the user's own file, named like b.png's output
    with pytest.raises(DeblurcliError, match="b_sharp.png: it is an input file"):
        plan_jobs(folder, folder, options)
    (folder / "b_sharp.png").unlink()
    run_jobs(plan_jobs(folder, folder, options), invert, options)
    edited = folder / "c_sharp.png"
    _img(edited, h=5)  # replaced after the run: no longer what was recorded
    with pytest.raises(DeblurcliError, match="c_sharp.png: it is an input file"):
        plan_jobs(folder, folder, options)


def test_run_jobs_skip_overwrite_and_failures(folder, tmp_path):
    out = tmp_path / "out"
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    jobs = plan_jobs(folder, out, BatchOptions())
    events, seen = [], []
    summary = run_jobs(jobs, invert, BatchOptions(), progress=events.append, on_result=seen.append)
    assert [r.status for r in summary.results] == ["done", "done", "failed", "done"]
    assert "bad.png" in summary.failed[0].error and len(seen) == 4
    assert summary.count("done") == 3 and summary.mean_seconds > 0
    assert events[-1].stage == "images" and events[-1].done == events[-1].total == 4
    # while a file is at work, the bar names it (it named the one before), and the mean time
    # per photo shows once there is one
    working = [(e.done, e.info["file"], "s_per_image" in e.info) for e in events
               if e.stage == "images" and e.info.get("file")]
    assert working[:3] == [(0, jobs[0].source.name, False), (1, jobs[0].source.name, True),
                           (1, jobs[1].source.name, True)]
    src = read_image(folder / "b.png").pixels
    np.testing.assert_allclose(read_image(out / "b.png").pixels, 1.0 - src, atol=1 / 255 + 1e-6)

    again = run_jobs(jobs, invert, BatchOptions())
    assert [r.status for r in again.results] == ["skipped", "skipped", "failed", "skipped"]
    before = (out / "b.png").stat().st_mtime_ns
    redo = run_jobs(jobs, invert, BatchOptions(overwrite=True))
    assert redo.count("done") == 3 and (out / "b.png").stat().st_mtime_ns >= before


@pytest.mark.parametrize("error", [MemoryError(), torch.cuda.OutOfMemoryError("CUDA OOM")])
def test_out_of_memory_is_a_per_file_failure_with_advice(folder, tmp_path, error):
    def oom(pixels, progress=None):
        raise error

    summary = run_jobs(plan_jobs(folder, tmp_path / "o", BatchOptions()), oom, BatchOptions())
    assert summary.count("failed") == 3 and "lower --tile" in summary.failed[0].error


def test_a_file_its_format_cannot_hold_fails_alone(tmp_path, capfd):
    """WebP's encoder refuses sides over 16383 px with a ValueError, which ended the batch; now
    such a photo fails alone, before its deblurring (JPEG's 65500 px too, without libjpeg's
    own line on stderr)."""
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (16400, 8)).save(src / "a_wide.png")
    Image.new("RGB", (20, 12)).save(src / "b.png")
    Image.new("RGB", (8, 65600)).save(src / "c_tall.png")
    for ext, failing in (("webp", ["a_wide", "c_tall"]), ("jpg", ["c_tall"])):
        deblurred: list[tuple] = []

        def deblur(pixels, progress=None, seen=deblurred):
            seen.append(pixels.shape)
            return pixels

        options = BatchOptions(ext=ext)
        summary = run_jobs(plan_jobs(src, tmp_path / ext, options), deblur, options)
        assert [r.job.source.stem for r in summary.failed] == failing
        assert len(deblurred) == 3 - len(failing)  # those that fail were not deblurred
        error = summary.failed[0].error
        assert "at most" in error and "choose another --ext" in error
    assert "a_wide.webp: WebP holds at most 16383 px a side, not this 16400x8 image" in \
        run_jobs(plan_jobs(src, tmp_path / "w2", BatchOptions(ext="webp")),
                 lambda px, progress=None: px, BatchOptions(ext="webp")).failed[0].error
    assert sorted(p.name for p in (tmp_path / "webp").iterdir()) == ["b.webp"]
    assert "65500" not in capfd.readouterr().err  # libjpeg's "Maximum supported image ..."
    with pytest.raises(ImageWriteError, match="JPEG holds at most 65500 px a side"):
        encode_image("jpeg", np.zeros((65501, 2, 3), np.float32))


def test_programming_errors_are_not_swallowed(folder, tmp_path):
    def buggy(pixels, progress=None):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_jobs(plan_jobs(folder, tmp_path / "o", BatchOptions()), buggy, BatchOptions())


def test_alpha_grey_and_16_bit_are_kept(tmp_path):
    src = tmp_path / "in"
    rng = np.random.default_rng(1)
    alpha = rng.random((12, 10), dtype=np.float32)
    _img(src / "rgba16.png", alpha=alpha, bit_depth=16)
    _img(src / "grey.png", grayscale=True)
    _img(src / "deep.tif", bit_depth=16)
    out = tmp_path / "out"
    jobs = plan_jobs(src, out, BatchOptions())
    assert run_jobs(jobs, invert, BatchOptions()).count("done") == 3
    rgba = read_image(out / "rgba16.png")
    assert rgba.bit_depth == 16 and rgba.alpha is not None
    np.testing.assert_array_equal(rgba.alpha, read_image(src / "rgba16.png").alpha)
    grey = read_image(out / "grey.png")
    assert grey.grayscale and grey.bit_depth == 8
    assert read_image(out / "deep.tif").bit_depth == 16
    as_jpg = plan_jobs(src / "rgba16.png", tmp_path / "jpg", BatchOptions(ext="jpg"))
    run_jobs(as_jpg, invert, BatchOptions())
    assert read_image(as_jpg[0].target).bit_depth == 8  # JPEG cannot hold 16 bits


def test_a_folder_where_an_output_goes_is_no_finished_output(tmp_path):
    """It was counted as an existing output: "every output already exists", no photo made."""
    src = tmp_path / "in"
    write_image(src / "a.png", np.zeros((4, 4, 3), np.float32))
    (tmp_path / "out" / "a.png").mkdir(parents=True)
    summary = run_jobs(plan_jobs(src, tmp_path / "out", BatchOptions()), lambda x, p: x,
                       BatchOptions())
    [result] = summary.results
    assert result.status == "failed" and result.error
    # anything else there is left alone without --overwrite: a link to a folder, a pipe
    (tmp_path / "out" / "a.png").rmdir()
    (tmp_path / "out" / "a.png").symlink_to(tmp_path / "in")
    summary = run_jobs(plan_jobs(src, tmp_path / "out", BatchOptions()), lambda x, p: x,
                       BatchOptions())
    assert summary.results[0].status == "skipped" and (tmp_path / "out" / "a.png").is_symlink()


def test_outputs_of_these_inputs_recorded_in_input_are_no_inputs_of_a_later_run(tmp_path):
    """`deblur photos photos --suffix _sharp`, then `deblur photos out -r` read the _sharp
    outputs again as photos. Outputs made from files outside INPUT stay inputs: `deblur photos
    photos/out`, then `deblur photos/out final` deblurs what photos/out holds."""
    photos = tmp_path / "photos"
    write_image(photos / "a.png", np.zeros((4, 4, 3), np.float32))
    write_image(photos / "sub" / "b.png", np.zeros((4, 4, 3), np.float32))
    first = BatchOptions(suffix="_sharp", recursive=True)
    assert run_jobs(plan_jobs(photos, photos, first), invert, first).count("done") == 2
    later = BatchOptions(recursive=True)
    jobs = plan_jobs(photos, tmp_path / "elsewhere", later)
    assert sorted(job.source.name for job in jobs) == ["a.png", "b.png"]
    (photos / "a_sharp.png").touch()  # changed since: a photo of the user's now
    assert "a_sharp.png" in [job.source.name for job in plan_jobs(photos, tmp_path / "o", later)]

    other = tmp_path / "other"
    write_image(other / "c.png", np.zeros((4, 4, 3), np.float32))
    plain = BatchOptions()
    assert run_jobs(plan_jobs(other, other / "out", plain), invert, plain).count("done") == 1
    assert [job.source.name for job in plan_jobs(other / "out", tmp_path / "final", plain)] \
        == ["c.png"]


def test_outputs_count_as_made_from_these_inputs_only_where_those_photos_are(tmp_path):
    """The check was a path prefix: outputs whose photos were deleted, or whose folder was moved
    away from them, were left out of every later run (the only copies, never deblurred); a
    root folder INPUT matched nothing; an OUTPUT spelt through a link was missed; a ledger line
    nested past the parser's depth stopped the plan."""
    first, later = BatchOptions(suffix="_sharp"), BatchOptions(recursive=True)
    kept = tmp_path / "kept"
    _img(kept / "a.png")
    _img(kept / "b.png")
    run_jobs(plan_jobs(kept, kept / "sharp", first), invert, first)
    assert [j.source.name for j in plan_jobs(kept, tmp_path / "o1", later)] == ["a.png", "b.png"]
    (kept / "a.png").unlink()  # its output is now the only copy
    assert sorted(j.source.name for j in plan_jobs(kept, tmp_path / "o2", later)) == [
        "a_sharp.png", "b.png"]

    album = tmp_path / "album"
    album.mkdir()
    (kept / "sharp").rename(album / "sharp")  # away from its photos
    assert len(plan_jobs(album, tmp_path / "o3", later)) == 2

    real = tmp_path / "real"
    _img(real / "c.png")
    (tmp_path / "link").symlink_to(real)
    run_jobs(plan_jobs(real, tmp_path / "link" / "sharp", first), invert, first)
    assert [j.source.name for j in plan_jobs(tmp_path / "link", tmp_path / "o4", later)] == [
        "c.png"]
    with open(real / "sharp" / LEDGER_NAME, "a") as fh:
        fh.write("[" * 200_000 + "\n")
    assert [j.source.name for j in plan_jobs(real, tmp_path / "o5", later)] == ["c.png"]


def test_a_copied_folder_keeps_its_record_of_outputs(tmp_path):
    """The record compared inodes: after `cp -a photos copy`, `deblur copy copy --suffix
    _sharp` stopped on its own earlier outputs ("it is an input file"), and an edited output
    stopped it without saying that it was an output once."""
    import shutil

    options = BatchOptions(suffix="_sharp")
    photos = tmp_path / "photos"
    _img(photos / "a.png")
    run_jobs(plan_jobs(photos, photos, options), invert, options)
    copy = tmp_path / "copy"
    shutil.copytree(photos, copy)  # copies modification times, not inodes
    assert [j.source.name for j in plan_jobs(copy, copy, options)] == ["a.png"]
    _img(copy / "a_sharp.png", h=5)  # edited since
    with pytest.raises(DeblurcliError, match="an earlier run wrote it, but it has changed since"):
        plan_jobs(copy, copy, options)


def test_a_folder_that_seems_empty_says_where_its_photos_are(tmp_path):
    """Photos only in sub-folders (without -r), or only under hidden names, gave just "no
    images or videos found"."""
    from deblurcli.errors import ImageReadError

    _img(tmp_path / "trip" / "day1" / "a.png")
    with pytest.raises(ImageReadError, match="its sub-folders hold 1: add -r"):
        plan_jobs(tmp_path / "trip", tmp_path / "o", BatchOptions())
    _img(tmp_path / "hid" / ".b.png")
    _img(tmp_path / "hid" / ".sub" / "c.png")
    with pytest.raises(ImageReadError, match="2 hidden file\\(s\\) or folder\\(s\\) \\(names "
                                             "starting with a dot\\) are passed over"):
        plan_jobs(tmp_path / "hid", tmp_path / "o", BatchOptions(recursive=True))


def test_a_folder_at_the_target_fails_before_the_deblurring(tmp_path):
    """It failed only when the output was written, after the whole photo (or video) had been
    deblurred; a dry run said it would be written."""
    src = tmp_path / "in"
    _img(src / "a.png")
    _img(src / "b.png")
    (tmp_path / "out" / "a.png").mkdir(parents=True)
    calls = []

    def counting(pixels, progress=None):
        calls.append(1)
        return pixels

    for overwrite in (False, True):  # b.png: written, then written again
        options = BatchOptions(overwrite=overwrite)
        summary = run_jobs(plan_jobs(src, tmp_path / "out", options), counting, options)
        assert [r.status for r in summary.results] == ["failed", "done"]
        assert "out/a.png is a folder: move it away" in summary.failed[0].error
    assert len(calls) == 2  # b.png, twice; never a.png
    assert (tmp_path / "out" / "a.png").is_dir()



def test_a_file_where_an_output_folder_goes_fails_before_the_deblurring(tmp_path):
    """``out/sub`` a file (or a broken link) where sub/y.png's output folder goes: it failed
    after the deblurring with "File exists", a file that did not exist."""
    src = tmp_path / "in"
    for rel in ("sub/y.png", "sub/deeper/z.png", "other/w.png", "x.png", "fine/v.png"):
        _img(src / rel)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("mine")
    (out / "other").symlink_to(tmp_path / "nowhere")
    (out / "fine").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    calls = []

    def counting(pixels, progress=None):
        calls.append(1)
        return pixels

    options = BatchOptions(recursive=True)
    summary = run_jobs(plan_jobs(src, out, options), counting, options)
    assert {r.job.source.relative_to(src).as_posix(): r.status for r in summary.results} == {
        "fine/v.png": "done", "other/w.png": "failed", "sub/deeper/z.png": "failed",
        "sub/y.png": "failed", "x.png": "done"}
    assert len(calls) == 2
    errors = sorted(r.error for r in summary.failed)
    assert errors[0].startswith(f"{out / 'other'} is not a folder, but outputs go into it")
    assert all(e.startswith(f"{out / 'sub'} is not a folder") for e in errors[1:])
    assert (out / "sub").read_text() == "mine"
