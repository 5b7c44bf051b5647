"""No flag combination overwrites an input; no single entry stops, hangs or blows up a batch.

The property test builds random folder trees (nested folders, several formats and bit depths,
symlinks, hard links, symlink loops, broken links, named pipes, links to folders) with an OUTPUT
outside, equal to, inside or linked into INPUT, and random ``--shard``/``--overwrite``/
``--suffix``/``--ext``/``-r`` combinations; it runs the real planner and runner (with a cheap
stand-in for the model) on every shard, then once more as a re-run would. It checks, against its
own listing of the inputs, that no input changes and that each input is processed, skipped or
reported failed exactly once over the shards (or that every shard refused the run). A seeded
generator keeps it reproducible: a failure names its seed.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deblurcli.batch import (
    EXT_CHOICES,
    BatchOptions,
    check_output_folder,
    plan_jobs,
    run_jobs,
)
from deblurcli.errors import DeblurcliError
from deblurcli.images import IMAGE_SUFFIXES, write_image

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"),
                                reason="named pipes and alarms need POSIX")

FORMATS = (("png", {}), ("png", {"bit_depth": 16}), ("jpg", {}), ("tif", {"bit_depth": 16}),
           ("webp", {}), ("bmp", {}), ("JPG", {}), ("png", {"grayscale": True}))
STEMS = ("a", "b", "a_s", "IMG_1")


def negate(pixels, progress=None):
    return 1.0 - pixels


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the test run) if anything blocks for 30 s."""
    def stuck(*_):
        raise TimeoutError("the batch blocked")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _image(rng: np.random.Generator, path: Path) -> None:
    fmt, kwargs = FORMATS[rng.integers(len(FORMATS))]
    path = path.with_suffix("." + fmt)
    if not path.exists():
        write_image(path, rng.random((int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3),
                                     dtype=np.float32), **kwargs)


def _build(rng: np.random.Generator, root: Path) -> tuple[Path, Path]:
    """A random INPUT tree under ``root`` and an OUTPUT folder for it."""
    src = root / "in"
    folders = [src, src / "sub", src / "sub" / "deep", src / "res"]
    for folder in folders[: int(rng.integers(1, len(folders) + 1))]:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(int(rng.integers(1, 4))):
            _image(rng, folder / STEMS[rng.integers(len(STEMS))])
    files = sorted(p for p in src.rglob("*") if p.is_file())
    odd = {
        "link": lambda: os.symlink(os.path.relpath(files[0], src), src / "link.png"),
        "hardlink": lambda: os.link(files[-1], src / f"hard{files[-1].suffix}"),
        "loop": lambda: os.symlink("loop.png", src / "loop.png"),
        "dangling": lambda: os.symlink("gone.jpg", src / "dangling.jpg"),
        "fifo": lambda: os.mkfifo(src / "sub" / "pipe.png") if (src / "sub").is_dir() else None,
        "text": lambda: (src / "notes.txt").write_text("x"),
        "dirlink": lambda: os.symlink(".", src / "self"),
        "dirlink_png": lambda: os.symlink(".", src / "folder.png"),
    }
    for make in odd.values():
        if rng.random() < 0.4:
            make()
    where = rng.integers(6)
    if where == 0:
        out = root / "out"
    elif where == 1:
        out = src
    elif where == 2:
        out = src / "sub"
    elif where == 3:
        out = src / "res"
    elif where == 4:  # a link to INPUT, from outside it
        os.symlink(src, root / "alias")
        out = root / "alias"
    else:  # a link inside INPUT to INPUT itself
        if not (src / "self").is_symlink():
            os.symlink(".", src / "self")
        out = src / "self"
    if where == 0 and rng.random() < 0.5:  # a file already where an output may go
        _image(rng, out / "a")
    return src, out


def _options(rng: np.random.Generator) -> tuple[BatchOptions, int]:
    count = int(rng.choice([1, 1, 2, 3]))
    return BatchOptions(suffix=str(rng.choice(["", "", "_s"])),
                        ext=str(rng.choice(EXT_CHOICES)),
                        overwrite=bool(rng.random() < 0.5),
                        recursive=bool(rng.random() < 0.5)), count


def _input_entries(src: Path, recursive: bool) -> list[Path]:
    """The inputs, listed independently of the code under test: every entry with an image suffix
    that is not a real folder (links, pipes and loops included), hidden names excluded, links
    to folders not followed."""
    found = []
    for here, dirs, names in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in [*names, *dirs]:
            path = Path(here) / name
            if (not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
                    and not stat.S_ISDIR(os.lstat(path).st_mode)):
                found.append(path)
        if not recursive:
            break
    return sorted(found)


def _state(path: Path) -> tuple:
    """What must not change about an input entry: its kind, link target and bytes."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        try:
            content = path.read_bytes() if stat.S_ISREG(os.stat(path).st_mode) else None
        except OSError:
            content = None
        return ("link", os.readlink(path), content)
    if stat.S_ISREG(info.st_mode):
        return ("file", info.st_ino, path.read_bytes())
    return ("other", stat.S_IFMT(info.st_mode))


def _key(path: Path) -> str:
    """Where a path puts its last name: its folder resolved (OUTPUT may be a link to INPUT)."""
    return os.path.normcase(os.path.join(os.path.realpath(path.parent), path.name))


def _expected_target(src: Path, out: Path, path: Path, options: BatchOptions) -> str:
    """The output path of an input by the documented naming rule, as a :func:`_key`."""
    rel = path.relative_to(src)
    suffix = rel.suffix if options.ext == "auto" else "." + options.ext
    return _key(out / rel.parent / f"{rel.stem}{options.suffix}{suffix}")


def _same_entry(a: Path, b: Path) -> bool:
    if _key(a) == _key(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_refusal(message: str, src: Path, out: Path, options: BatchOptions) -> None:
    """A refusal must name a real clash (a planner refusing every run must not pass): a target
    that is an input, or two inputs whose outputs share one path."""
    inputs = _input_entries(src, options.recursive)
    clash = re.match(r"refusing to write (.+?): it is an input file", message)
    if clash:
        target = Path(clash.group(1))
        assert any(_same_entry(target, p) for p in inputs), f"no input at {target}: {message}"
        return
    clash = re.match(r"(.+?) would be written to (.+?), the folder that (.+?)'s output goes "
                     "into; ", message)
    if clash:
        first, folder, second = (Path(g) for g in clash.groups())
        assert first in inputs and second in inputs, message
        assert _expected_target(src, out, first, options) == _key(folder), message
        assert _expected_target(src, out, second, options).startswith(_key(folder) + os.sep), \
            message
        return
    clash = re.match(r"(.+?) and (.+?) would both be written to (.+?); ", message)
    assert clash, f"unexpected refusal: {message}"
    first, second, target = (Path(g) for g in clash.groups())
    for path in (first, second):
        assert path in inputs and _expected_target(src, out, path, options) == _key(target), \
            f"{path} is not an input written to {target}: {message}"


def _run_all_shards(src: Path, out: Path, options: BatchOptions, count: int):
    """Plan and run every shard in turn (as separate machines would); None if refused."""
    plans, refusals = [], []
    for index in range(count):
        shard = None if count == 1 else (index, count)
        sharded = BatchOptions(**{**options.__dict__, "shard": shard})
        try:
            plans.append((plan_jobs(src, out, sharded), sharded))
        except DeblurcliError as exc:
            refusals.append(str(exc))
    assert not refusals or not plans, f"only some shards refused: {refusals}"
    for message in refusals:
        _check_refusal(message, src, out, options)
    if refusals:
        return None
    return [result for jobs, sharded in plans for result in run_jobs(jobs, negate, sharded).results]


@pytest.mark.parametrize("seed", range(40))
def test_random_trees_and_flags_never_touch_an_input(tmp_path, seed, no_hang):
    rng = np.random.default_rng(seed)
    src, out = _build(rng, tmp_path)
    options, count = _options(rng)
    originals = {p: _state(p) for p in _input_entries(src, options.recursive)}

    for attempt in ("first run", "re-run"):
        entries = _input_entries(src, options.recursive)
        before = {p: _state(p) for p in entries}
        results = _run_all_shards(src, out, options, count)
        for path, state in originals.items():
            assert _state(path) == state, f"{attempt}: input {path} changed ({options})"
        if results is None:
            assert attempt == "first run", f"a re-run in place was refused ({options})"
            return
        sources = [r.job.source for r in results]
        assert len(sources) == len(set(sources)), f"{attempt}: an input ran twice ({options})"
        assert all(r.status in ("done", "skipped", "failed") for r in results)
        assert all(r.error for r in results if r.status != "done")
        targets = {_key(r.job.target) for r in results}
        for path in entries:
            if path in originals or path in set(sources):
                assert path in set(sources), f"{attempt}: input {path} not accounted ({options})"
                assert _state(path) == before[path], f"{attempt}: {path} changed ({options})"
            else:  # an earlier run's output: recognised as the output of another input
                assert _key(path) in targets, f"{attempt}: {path} neither input nor output"


def test_the_cases_of_issue_20_stop_nothing_but_themselves(tmp_path, no_hang):
    """A symlink loop aborted a whole batch before any image (case 2); a pipe called x.png hung
    it and a link to /dev/zero read until memory ran out (case 3): each is now one failed entry
    with its reason, and the good files are processed."""
    src = tmp_path / "in"
    for name in ("a.png", "b.jpg", "sub/c.tif"):
        write_image(src / name, np.zeros((4, 5, 3), np.float32))
    os.symlink("loop.png", src / "loop.png")
    os.symlink("missing.png", src / "dangling.png")
    os.mkfifo(src / "x.png")
    os.symlink("/dev/zero", src / "sub" / "zero.png")
    options = BatchOptions(recursive=True)
    jobs = plan_jobs(src, tmp_path / "out", options)
    summary = run_jobs(jobs, negate, options)
    failed = {r.job.source.relative_to(src).as_posix(): r.error for r in summary.failed}
    assert summary.count("done") == 3
    assert failed == {"dangling.png": "broken symlink (its target does not exist)",
                      "loop.png": "symlink loop (too many levels of links)",
                      "sub/zero.png": "a device, not a regular file",
                      "x.png": "a named pipe, not a regular file"}
    assert not any((tmp_path / "out" / name).exists() for name in failed)


def test_an_unlistable_sub_folder_is_a_failed_entry(tmp_path, unlistable):
    src = tmp_path / "in"
    for name in ("a.png", "locked/b.png"):
        write_image(src / name, np.zeros((4, 5, 3), np.float32))
    options = BatchOptions(recursive=True)
    summary = run_jobs(plan_jobs(src, tmp_path / "out", options), negate, options)
    assert summary.count("done") == 1
    assert [(r.job.source, r.error) for r in summary.failed] == [
        (src / "locked", "cannot list this folder: Permission denied")]


def test_a_read_only_output_folder_is_found_before_any_work(tmp_path, monkeypatch):
    import deblurcli.batch as batch

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(batch.tempfile, "mkstemp", refuse)  # chmod does not stop root
    with pytest.raises(DeblurcliError, match="cannot write to the output folder .*Permission"):
        check_output_folder(tmp_path / "out")
    monkeypatch.undo()
    check_output_folder(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing is created (the first output does that)
    assert list(tmp_path.iterdir()) == []  # and the probe file is gone
    (tmp_path / "out").mkdir()
    check_output_folder(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_checks_the_output_folder_before_loading_the_model(tmp_path, monkeypatch):
    import deblurcli.modelfolder as mf
    from deblurcli.cli.app import app

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mf, "load_model_folder", never)
    write_image(tmp_path / "in" / "a.png", np.zeros((4, 5, 3), np.float32))
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["deblur", str(tmp_path / "in"), str(tmp_path / "file" / "out"),
                                      "--weights", str(tmp_path / "model")])
    assert result.exit_code == 1, result.output
    assert "cannot write to the output folder" in result.output


def test_cli_reports_unreadable_entries_without_loading_a_model(tmp_path, monkeypatch, no_hang):
    """With every readable output already there, the unreadable entries are still listed (one
    line each) and the exit status is 1; no model is needed for that."""
    import deblurcli.modelfolder as mf
    from deblurcli.cli.app import app

    monkeypatch.setattr(mf, "load_model_folder", lambda *a, **k: pytest.fail("model loaded"))
    write_image(tmp_path / "in" / "a.png", np.zeros((4, 5, 3), np.float32))
    write_image(tmp_path / "out" / "a.png", np.zeros((4, 5, 3), np.float32))
    os.mkfifo(tmp_path / "in" / "x.png")
    result = CliRunner().invoke(app, ["deblur", str(tmp_path / "in"), str(tmp_path / "out"),
                                      "--weights", str(tmp_path / "model")])
    assert result.exit_code == 1, result.output
    assert "processed 0, skipped 1, failed 1" in result.stdout
    assert f"failed: {tmp_path / 'in' / 'x.png'}: a named pipe, not a regular file" in result.stdout


def test_the_output_record_is_never_written_through_a_symlink(tmp_path):
    """A symlink planted as OUTPUT's record file must not redirect the record into another file
    (an input, a shell profile): the write is refused and the outside file is untouched."""
    from deblurcli.batch import record_output

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "out").mkdir()
    ledger = tmp_path / "out" / ".deblurcli-outputs.jsonl"
    ledger.symlink_to(victim)
    written = tmp_path / "out" / "a.png"
    written.write_bytes(b"x")
    with pytest.raises(OSError):
        record_output(ledger, written, written)
    assert victim.read_text() == "precious\n"


def test_a_record_cut_short_by_a_full_disk_fails_its_output_and_loses_no_other(tmp_path,
                                                                               monkeypatch):
    """os.write wrote part of the line on a full disk without an error: the output counted as
    written, and the torn line swallowed the next one, whose output then read as an input
    ("refusing to write ...: it is an input file") in every later run in place."""
    import errno

    from deblurcli import batch

    out = tmp_path / "out"
    out.mkdir()
    ledger = out / ".deblurcli-outputs.jsonl"
    first, second = out / "a_s.png", out / "b_s.png"
    first.write_bytes(b"x")
    second.write_bytes(b"yy")
    real = os.write
    monkeypatch.setattr(batch.os, "write", lambda fd, data: real(fd, data[:12]))
    with pytest.raises(OSError) as caught:
        batch.record_output(ledger, first, first)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.setattr(batch.os, "write", real)
    batch.record_output(ledger, second, second)
    assert list(batch.read_ledger(ledger)) == ["b_s.png"]


def test_an_unsearchable_parent_is_one_clear_error(tmp_path, monkeypatch):
    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "exists", refuse)  # what Python 3.11 raises without +x on a parent
    with pytest.raises(DeblurcliError, match="cannot write to the output folder"):
        check_output_folder(tmp_path / "locked" / "out")


def test_a_write_only_folder_still_counts_the_write_as_done(tmp_path, monkeypatch):
    from deblurcli import images

    real_open = os.open

    def no_read(path, flags, *args):
        if flags & getattr(os, "O_DIRECTORY", 0):
            raise PermissionError(13, "Permission denied", str(path))  # a -wx folder
        return real_open(path, flags, *args)

    monkeypatch.setattr(images.os, "open", no_read)
    write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))
    assert (tmp_path / "a.png").stat().st_size > 0


def test_an_output_name_past_255_bytes_fails_at_planning(tmp_path):
    """--suffix made a 250-byte name 262 bytes: the photo was deblurred, then not written,
    and a dry run said 'write'."""
    from deblurcli.batch import BatchOptions, plan_jobs, run_jobs
    from deblurcli.images import write_image

    name = "a" * 246 + ".png"
    write_image(tmp_path / "in" / name, np.zeros((4, 4, 3), np.float32))
    options = BatchOptions(suffix="_sharpened_x")
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out", options)
    assert "more than the 255 a file system allows" in jobs[0].problem
    summary = run_jobs(jobs, lambda px, progress=None: pytest.fail("deblurred"), options)
    assert summary.count("failed") == 1


def test_an_output_where_another_output_needs_a_folder_is_refused_when_planned(tmp_path):
    """z.jpg and a folder z.png/ with --ext png: planned (and promised by --dry-run) as two
    writes, the second failed after its deblurring with "File exists"."""
    src = tmp_path / "in"
    write_image(src / "z.jpg", np.zeros((4, 5, 3), np.float32))
    write_image(src / "z.png" / "inner.jpg", np.zeros((4, 5, 3), np.float32))
    options = BatchOptions(recursive=True, ext="png")
    with pytest.raises(DeblurcliError) as refused:
        plan_jobs(src, tmp_path / "out", options)
    _check_refusal(str(refused.value), src, tmp_path / "out", options)
    assert str(refused.value).startswith(f"{src / 'z.jpg'} would be written to "
                                         f"{tmp_path / 'out' / 'z.png'}, the folder that "
                                         f"{src / 'z.png' / 'inner.jpg'}'s output goes into")
    assert len(plan_jobs(src, tmp_path / "out", BatchOptions(recursive=True))) == 2


def test_a_file_of_yours_the_listing_does_not_reach_is_an_input_too(tmp_path):
    """Under an OUTPUT inside the input's tree every file is an input, as the docs say; but one
    the listing did not reach (a sub-folder OUTPUT without -r, the folder of a single photo)
    was replaced with --overwrite (or skipped as if it were an earlier output)."""
    pixels = np.zeros((8, 8, 3), np.float32)
    photos = tmp_path / "photos"
    write_image(photos / "a.png", pixels)
    write_image(photos / "out" / "a.png", pixels + 0.5)  # the user's own, no run wrote it
    write_image(photos / "a_s.png", pixels + 0.5)  # the user's own too
    for source, out, suffix in ((photos, photos / "out", ""), (photos / "a.png", photos / "out", ""),
                                (photos / "a.png", photos, "_s")):
        with pytest.raises(DeblurcliError, match="it is an input file .*no run is recorded "
                                                 "writing it"):
            plan_jobs(source, out, BatchOptions(suffix=suffix, overwrite=True))
        # without --overwrite it is skipped as before: nothing is replaced
        jobs = [job for job in plan_jobs(source, out, BatchOptions(suffix=suffix))
                if job.target.exists()]
        assert len(jobs) == 1 and run_jobs(jobs, lambda p, progress=None: p, BatchOptions()) \
            .count("skipped") == 1
    # recorded outputs of earlier runs are outputs: skipped, or redone with --overwrite
    (photos / "out" / "a.png").unlink()
    jobs = plan_jobs(photos, photos / "out", BatchOptions())
    assert run_jobs(jobs, lambda p, progress=None: p, BatchOptions()).count("done") == 2
    again = plan_jobs(photos / "a.png", photos / "out", BatchOptions(overwrite=True))
    assert [job.target for job in again] == [photos / "out" / "a.png"]
    # recorded by another process (a --shard run) after this one read the record: its output
    import deblurcli.batch as batch

    real, calls = batch.read_ledger, []

    def read_before_the_other_wrote(path):
        calls.append(path)
        return {} if len(calls) == 1 else real(path)

    batch.read_ledger = read_before_the_other_wrote
    try:
        assert plan_jobs(photos / "a.png", photos / "out", BatchOptions(overwrite=True))
    finally:
        batch.read_ledger = real
    assert len(calls) == 2
    # an OUTPUT outside the input's tree: existing files there are outputs, as before
    write_image(tmp_path / "elsewhere" / "a.png", pixels)
    assert plan_jobs(photos, tmp_path / "elsewhere", BatchOptions(overwrite=True))


def test_a_broken_symlink_where_an_output_goes_fails_that_file(tmp_path):
    """It counted as an existing output: 'skipped 1', exit 0, and no output written."""
    write_image(tmp_path / "in" / "a.png", np.zeros((8, 8, 3), np.float32))
    write_image(tmp_path / "in" / "b.png", np.zeros((8, 8, 3), np.float32))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").symlink_to(tmp_path / "nowhere.png")
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out", BatchOptions())
    assert [job.problem for job in jobs] == [
        f"{tmp_path / 'out' / 'a.png'} is a broken symlink, not an output: remove it (or "
        "--overwrite replaces it), or choose another OUTPUT folder", ""]
    summary = run_jobs(jobs, lambda p, progress=None: p, BatchOptions())
    assert [r.status for r in summary.results] == ["failed", "done"]
    assert (tmp_path / "out" / "a.png").is_symlink()  # the user's link is left as it was
    options = BatchOptions(overwrite=True)  # replaced, as any other link
    summary = run_jobs(plan_jobs(tmp_path / "in", tmp_path / "out", options),
                       lambda p, progress=None: p, options)
    assert [r.status for r in summary.results] == ["done", "done"]
    assert not (tmp_path / "out" / "a.png").is_symlink()
