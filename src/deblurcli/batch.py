"""The batch runner behind ``deblurcli deblur``: which files, where they go, and running them.

* :func:`plan_jobs` lists the inputs (one file, or a folder, optionally recursive), names the
  outputs (same relative path under the output folder, ``--suffix`` added to the stem, ``--ext``
  applied), refuses the whole run if any output would replace an input (compared by file
  identity, on the complete list) or collide with another output, and only then applies the
  ``--shard i/n`` split (:func:`shard_of`: by a hash of each relative path). Entries that cannot
  be read (symlink loops, broken links, named pipes, devices, folders that cannot be listed)
  become jobs that fail with their reason instead of stopping the plan.
* :func:`run_jobs` reads each image, runs a ``deblur`` function on its pixels and writes the
  result with the input's alpha, grey-ness and bit depth; existing outputs are skipped unless
  ``overwrite``. A failing file (unreadable image, out of memory) is recorded and the batch goes on.
  Video files (:data:`deblurcli.video.VIDEO_SUFFIXES`) are inputs like images: planned and guarded
  the same way, each frame run through the same ``deblur`` function (:mod:`deblurcli.video`),
  written in the input's container whatever ``--ext`` says.

Outputs written inside the input tree (OUTPUT equal to or inside INPUT) are recorded in a hidden
ledger, ``OUTPUT/.deblurcli-outputs.jsonl`` (path, size, modification time, inode, and the input it
was made from), so that a later run recognises them as its own outputs and not as inputs, and a
run over the whole tree leaves out the outputs of photos it reads anyway; a file there that the
ledger does not vouch for is an input like any other and is never replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Optional

import numpy as np

from deblurcli.errors import DeblurcliError, ImageReadError, ImageWriteError
from deblurcli.imagemeta import ImageMetadata
from deblurcli.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    fill_transparent,
    format_of,
    not_regular_reason,
    open_regular,
    read_image,
    scan_folder,
    side_limit_problem,
    stat_problem,
    write_image,
)
from deblurcli.progress import ProgressFn, report
from deblurcli.video import DEFAULT_CRF, VIDEO_SUFFIXES, deblur_video, is_video

EXT_CHOICES = ("auto", "png", "jpg", "webp", "tif", "avif", "heic")
OOM_ADVICE = "out of memory; lower --tile (e.g. --tile 256) or --batch-size"
LEDGER_NAME = ".deblurcli-outputs.jsonl"
INPUT_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES  # what deblur reads from a folder
#: Photo and video formats a folder may hold that deblur does not read (it says so rather than
#: pass them over in silence): camera raw files, JPEG XL, GIF and others.
UNREAD_VIDEO_SUFFIXES = frozenset({".mts", ".m2ts", ".wmv", ".asf", ".flv", ".3gp", ".mpg",
                                   ".mpeg", ".vob", ".ogv"})
UNREAD_MEDIA_SUFFIXES = frozenset({
    ".jxl", ".heics", ".avifs", ".jp2", ".gif", ".psd", ".exr", ".hdr", ".tga", ".ppm",
    ".pgm", ".pnm", ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2",
    ".orf", ".rw2", ".raf", ".pef", ".srw", ".x3f", ".3fp", ".iiq"}) | UNREAD_VIDEO_SUFFIXES
_LEDGER_MAX_BYTES = 256 << 20

DeblurFn = Callable[[np.ndarray, Optional[ProgressFn]], np.ndarray]


@dataclass(frozen=True)
class BatchOptions:
    """How inputs map to outputs.

    Attributes:
        suffix: added to each output file's stem (``photo.jpg`` -> ``photo{suffix}.jpg``).
        ext: output format: ``auto`` (the input's suffix), ``png``, ``jpg``, ``webp``, ``tif``.
        overwrite: replace existing outputs (never inputs).
        recursive: descend into sub-folders of an input folder and mirror them in the output.
        shard: ``(index, count)``, 0-based: keep the files whose :func:`shard_of` is
            ``index``.
        quality: JPEG/WebP quality.
        max_pixels: largest input image (width x height) that is decoded; larger ones fail.
        codec: video encoder (``auto``: libx264 where PyAV has it, see :mod:`deblurcli.video`).
        crf: video constant rate factor.
        metadata: write each photo's ICC profile, EXIF and XMP into its output
            (:mod:`deblurcli.imagemeta`), and each video's tags (title, creation time,
            location, ...).
    """

    suffix: str = ""
    ext: str = "auto"
    overwrite: bool = False
    recursive: bool = False
    shard: Optional[tuple[int, int]] = None
    quality: int = 95
    max_pixels: int = DEFAULT_MAX_PIXELS
    codec: str = "auto"
    crf: int = DEFAULT_CRF
    metadata: bool = True


@dataclass(frozen=True)
class Job:
    """One input file and the output file it will produce.

    Attributes:
        source: the input entry (a file, or a folder that could not be listed).
        target: the output file.
        problem: why the source cannot be read or its target written (a folder there), found
            while planning ("" when nothing stands in the way): such a
            job is reported as failed without touching anything.
        ledger: where to record the output once written (outputs inside the input tree), or None.
    """

    source: Path
    target: Path
    problem: str = ""
    ledger: Optional[Path] = None


@dataclass
class FileResult:
    """What happened to one job: ``status`` is ``"done"``, ``"skipped"`` or ``"failed"``;
    ``frames``: video frames written (0 for an image)."""

    job: Job
    status: str
    seconds: float = 0.0
    error: str = ""
    frames: int = 0


@dataclass
class BatchSummary:
    """Results of a whole run."""

    results: list[FileResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Number of jobs with the given status."""
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[FileResult]:
        """The failed jobs, in order."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def mean_seconds(self) -> float:
        """Mean wall time per processed image, videos left out (0 when none was processed)."""
        done = [r.seconds for r in self.results if r.status == "done" and not r.frames]
        return float(np.mean(done)) if done else 0.0

    @property
    def frames(self) -> int:
        """Video frames written."""
        return sum(r.frames for r in self.results if r.status == "done")

    @property
    def seconds_per_frame(self) -> float:
        """Mean wall time per written video frame (0 when none was written)."""
        frames = self.frames
        seconds = sum(r.seconds for r in self.results if r.status == "done" and r.frames)
        return seconds / frames if frames else 0.0


def convert_advice(suffixes) -> str:
    """What to convert files of the unread formats ``suffixes`` to, for deblur to read them."""
    suffixes = {suffix.lower() for suffix in suffixes}
    videos = suffixes & UNREAD_VIDEO_SUFFIXES
    if not videos:
        return "convert them to JPEG, PNG or TIFF"
    if videos == suffixes:
        return "convert them to MP4, MOV or MKV"
    return "convert the photos to JPEG, PNG or TIFF and the videos to MP4, MOV or MKV"


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (0-based ``i`` in ``0..n-1``, ``n >= 1``); raises ``ValueError``."""
    head, sep, tail = spec.strip().partition("/")
    try:
        index, count = int(head), int(tail)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise ValueError(f"invalid shard {spec!r}: use i/n with n >= 1 and i in 0..n-1 "
                         "(e.g. 0/2 and 1/2 split a folder in two)")
    return index, count


def shard_of(rel: str, count: int) -> int:
    """The shard (0..count-1) of the file at relative path ``rel`` for ``--shard i/count``: from
    a hash of the path alone, so that each file stays in its shard whatever files are added or
    removed between the runs of the shards (an index into the listing moved them all). The
    path is taken in Unicode's composed form, as Linux and Windows store names and macOS may
    not (``café`` is one name everywhere); a name's undecodable bytes take part as they are."""
    import unicodedata

    name = unicodedata.normalize("NFC", rel)
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def shard_items(items: list, shard: Optional[tuple[int, int]]) -> list:
    """Every ``count``-th item starting at ``index`` (all items when ``shard`` is None)."""
    if shard is None:
        return list(items)
    index, count = shard
    return list(items[index::count])


def output_name(source: Path, suffix: str, ext: str) -> str:
    """File name of the output for ``source`` (``ext``: auto|png|jpg|webp|tif; a video keeps its
    own container suffix)."""
    if ext not in EXT_CHOICES:
        raise ValueError(f"unknown output format {ext!r}; use one of {', '.join(EXT_CHOICES)}")
    new_suffix = source.suffix if ext == "auto" or is_video(source) else "." + ext
    return f"{source.stem}{suffix}{new_suffix}"


Identity = tuple[int, int]


def _identity(info: os.stat_result) -> Identity:
    return info.st_dev, info.st_ino


def _stat_or_none(path: Path) -> Optional[os.stat_result]:
    """``os.stat`` (links followed), or None where nothing can be reached at ``path``."""
    try:
        return os.stat(path)
    except (OSError, ValueError):
        return None


def _path_key(path: Path) -> str:
    """A path's spelling for comparisons (absolute, normalised, case-folded where the OS does)."""
    return os.path.normcase(os.path.abspath(path))


def _list_inputs(source: Path, recursive: bool
                 ) -> tuple[list[tuple[Path, Path, os.stat_result]], list[tuple[Path, Path, str]],
                            set[Identity], list[Path]]:
    """Every input entry: ``(path, relative path, stat)`` of the readable image files, ``(path,
    relative path, reason)`` of the entries that cannot be read, the folders listed and the
    files passed over (no image or video suffix)."""
    try:
        info = os.stat(source)
    except FileNotFoundError:
        if source.is_symlink():
            raise ImageReadError(f"cannot read {source}: broken symlink (its target does not "
                                 "exist)") from None
        raise ImageReadError(f"input not found: {source}") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read {source}: {stat_problem(exc, source.is_symlink())}") \
            from None
    if os.path.isdir(source):
        listing = scan_folder(source, recursive=recursive, suffixes=INPUT_SUFFIXES)
        files = [(p, p.relative_to(source), st) for p, st in listing.images]
        problems = [(p, p.relative_to(source), why) for p, why in listing.problems]
        if not files and not problems:
            where = "or its sub-folders " if recursive else ""
            unread = sorted({p.suffix.lower() for p in listing.others
                             if p.suffix.lower() in UNREAD_MEDIA_SUFFIXES})
            found = f"; it holds {', '.join(unread)} files, which deblurcli does not read " \
                f"({convert_advice(unread)})" if unread else ""
            raise ImageReadError(f"no images or videos found in {source} {where}"
                                 f"(looked for {', '.join(sorted(INPUT_SUFFIXES))}){found}"
                                 f"{_elsewhere(source, recursive)}")
        return files, problems, listing.folders, listing.others
    reason = not_regular_reason(info.st_mode)
    if reason:
        raise ImageReadError(f"cannot read {source}: {reason}")
    if source.suffix.lower() not in INPUT_SUFFIXES:
        hint = f"; deblurcli does not read {source.suffix.lower()} files: " \
            f"{convert_advice([source.suffix])} first" \
            if source.suffix.lower() in UNREAD_MEDIA_SUFFIXES else ""
        raise ImageReadError(f"{source} is not an image or video file (suffix "
                             f"{source.suffix!r}){hint}")
    # its folder counts as listed: an OUTPUT there is inside the input's tree, and recorded
    parent = _stat_or_none(source.parent if str(source.parent) else Path("."))
    return [(source, Path(source.name), info)], [], \
        {_identity(parent)} if parent is not None else set(), []


def _elsewhere(folder: Path, recursive: bool) -> str:
    """Where the photos of a folder that seems to hold none may be, for its error: in its
    sub-folders (without ``-r``; one level down is looked at), or under hidden names, which
    are passed over (in the folder itself). Nothing when the folder cannot be looked at."""
    def wanted(entry: os.DirEntry) -> bool:
        return os.path.splitext(entry.name)[1].lower() in INPUT_SUFFIXES

    notes = []
    try:
        with os.scandir(folder) as entries:
            top = list(entries)
        hidden = sum(1 for e in top if e.name.startswith(".") and (wanted(e) or e.is_dir()))
        deeper = 0
        if not recursive:
            for sub in (e for e in top if not e.name.startswith(".") and e.is_dir()):
                with os.scandir(sub.path) as entries:
                    deeper += sum(1 for e in entries if not e.name.startswith(".") and wanted(e))
        if deeper:
            notes.append(f"its sub-folders hold {deeper}: add -r")
        if hidden:
            notes.append(f"{hidden} hidden file(s) or folder(s) (names starting with a dot) are "
                         "passed over")
    except OSError:
        return ""
    return "".join(f"; {note}" for note in notes)


def _inside_listed_folder(folder: Path, listed: set[Identity]) -> bool:
    """Whether ``folder`` (which may not exist yet) is one of the ``listed`` folders or lies
    inside one, by identity: spelt any way, through links or not."""
    if not listed:
        return False
    chain = [Path(os.path.abspath(folder)), Path(os.path.realpath(folder))]
    for start in chain:
        for candidate in (start, *start.parents):
            info = _stat_or_none(candidate)
            if info is not None and _identity(info) in listed:
                return True
    return False


def _ledger_items(path: Path) -> list[dict]:
    """The lines of a ledger, parsed; a missing or unreadable ledger has none, torn or foreign
    lines are left out."""
    try:
        with open_regular(path) as fh:
            text = fh.read(_LEDGER_MAX_BYTES).decode("utf-8", errors="replace")
    except (ImageReadError, OSError):
        return []
    items = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):  # torn, foreign, or nested beyond parsing
            item = _after_torn(line)
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            items.append(item)
    return items


def _after_torn(line: str) -> object:
    """The entry appended after a torn one (a line cut short by a full disk), or None."""
    start = line.rfind('{"path": ', 1)
    try:
        return json.loads(line[start:]) if start > 0 else None
    except (ValueError, RecursionError):
        return None


def _recorded_outputs(items: list[dict]) -> dict[str, tuple[int, int]]:
    entries: dict[str, tuple[int, int]] = {}
    for item in items:
        try:
            entries[os.path.normcase(item["path"])] = (int(item["size"]), int(item["mtime_ns"]))
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def read_ledger(path: Path) -> dict[str, tuple[int, int]]:
    """The outputs recorded in a ledger: output path relative to its folder (as
    :func:`_path_key` spells it) -> ``(size, mtime_ns)`` (the inode each line also records is
    not compared: a copy changes it). Torn or foreign lines are ignored; a missing or
    unreadable ledger records nothing."""
    return _recorded_outputs(_ledger_items(path))


def record_output(ledger: Path, target: Path, written: Path,
                  source: Optional[Path] = None) -> None:
    """Append ``target`` (relative to the ledger's folder) with the size, modification time and
    inode of ``written`` (the finished file, under its final or temporary name), and the input
    ``source`` it was made from, to ``ledger``, flushed to disk."""
    info = os.stat(written)
    folder = os.path.abspath(ledger.parent)
    rel = os.path.relpath(os.path.abspath(target), folder)
    entry = {"path": Path(rel).as_posix(), "size": info.st_size, "mtime_ns": info.st_mtime_ns,
             "inode": info.st_ino}
    if source is not None:  # relative to the real folder, as the OS resolves ".." after links
        try:
            origin = os.path.relpath(os.path.realpath(source), os.path.realpath(folder))
        except ValueError:  # another drive (Windows)
            origin = os.path.realpath(source)
        entry["source"] = Path(origin).as_posix()
    line = json.dumps(entry) + "\n"
    # never through a symlink planted in OUTPUT: the line would land in another file
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        reason = not_regular_reason(os.fstat(fd).st_mode)
        if reason:
            raise DeblurcliError(f"cannot record outputs in {ledger}: {reason}")
        data = line.encode("utf-8")
        if os.write(fd, data) < len(data):  # a full disk (no error): the output is not kept
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (recording it in {ledger})")
        os.fsync(fd)
    finally:
        os.close(fd)


def _earlier_output(ledger: dict[str, tuple[int, int]], out_dir: Path, path: Path,
                   info: os.stat_result) -> bool:
    """Whether the input file ``path`` is an output the ledger of ``out_dir`` records, unchanged
    since it was written."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir))
    return not rel.startswith(os.pardir) and _recorded(ledger, Path(rel), info)


def _recorded(ledger: dict[str, tuple[int, int]], rel: Path, info: os.stat_result) -> bool:
    """Whether the ledger records ``rel`` as it is: its size and modification time, which a
    copy keeping times to the nanosecond (``cp -a``, ``rsync -a``) keeps, unlike the inode."""
    return ledger.get(os.path.normcase(rel.as_posix())) == (info.st_size, info.st_mtime_ns)


def _without_outputs_of_these_inputs(source: Path, files: list) -> list:
    """``files`` of the input folder ``source`` without those that the ledger of a folder of it
    records as outputs made from another of ``files`` (unchanged since), compared by identity:
    after ``deblur DIR DIR --suffix _sharp``, ``deblur DIR out/`` reads the photos, not their
    outputs again. An output whose photo is gone, or lies outside ``source`` (``deblur photos
    photos/out``, then ``deblur photos/out final/``), is an input like any other."""
    if not source.is_dir():
        return files
    ledgers: dict[Path, tuple[dict, dict[str, str]]] = {}
    for folder in {parent for _, rel, _ in files for parent in rel.parents}:
        items = _ledger_items(source / folder / LEDGER_NAME)
        sources = {os.path.normcase(item["path"]): item["source"] for item in items
                   if isinstance(item.get("source"), str)}  # lines written since they say
        if sources:
            ledgers[folder] = (_recorded_outputs(items), sources)
    if not ledgers:
        return files
    inputs = {_identity(info) for _, _, info in files}

    def made_here(rel: Path, info: os.stat_result) -> bool:
        for folder in rel.parents:
            if folder not in ledgers:
                continue
            recorded, sources = ledgers[folder]
            inner = rel.relative_to(folder)
            made_from = sources.get(os.path.normcase(inner.as_posix()))
            if made_from is None or not _recorded(recorded, inner, info):
                continue
            where = os.path.join(source, folder, made_from)
            # as written, ".." resolved by the OS after links; as older lines meant it, lexically
            for spelling in (where, os.path.normpath(where)):
                origin = _stat_or_none(Path(spelling))
                if origin is not None and _identity(origin) != _identity(info) and \
                        _identity(origin) in inputs:
                    return True
        return False

    return [(p, rel, info) for p, rel, info in files if not made_here(rel, info)]


def plan_jobs(source: Path, out_dir: Path, options: BatchOptions,
              on_unread: Optional[Callable[[list[Path]], None]] = None) -> list[Job]:
    """Map the input file or folder to output files under ``out_dir`` (see the module docstring).

    ``on_unread`` gets the files of the input folder in photo or video formats that are not read
    (:data:`UNREAD_MEDIA_SUFFIXES`: camera raw, JPEG XL, ...), when there are any.

    The input guard sees the complete input list, before sharding and before any output is
    skipped: an output may not be an input file, compared by identity (the same path, a hard
    link, a symlink, a case variant on a case-insensitive file system), nor an entry that cannot
    be read. The one exception: with OUTPUT inside the input tree, a file at the output path of
    another input that the ledger records as written there by this program is that output (an
    earlier run's), not an input.

    Raises:
        ImageReadError: the input does not exist, is not an image, or the folder has no images.
        DeblurcliError: ``out_dir`` is a file, an output would replace an input, or two inputs
            map to the same output.
    """
    source, out_dir = Path(source), Path(out_dir)
    out_info = _stat_or_none(out_dir)
    if out_info is not None and not os.path.isdir(out_dir):
        raise DeblurcliError(f"OUTPUT must be a folder, but {out_dir} is a file")
    files, problems, listed, others = _list_inputs(source, options.recursive)
    unread = [path for path in others if path.suffix.lower() in UNREAD_MEDIA_SUFFIXES]
    if unread and on_unread is not None:
        on_unread(unread)
    inside = _inside_listed_folder(out_dir, listed)
    ledger_path = out_dir / LEDGER_NAME
    ledger = read_ledger(ledger_path) if inside else {}
    if ledger:  # outputs of earlier runs, whatever --suffix or --ext made them, are no inputs
        files = [(p, rel, info) for p, rel, info in files
                 if not _earlier_output(ledger, out_dir, p, info)]
    files = _without_outputs_of_these_inputs(source, files)

    def target_of(rel: Path) -> Path:
        return out_dir / rel.parent / output_name(rel, options.suffix, options.ext)

    planned = [(path, rel, info, target_of(rel)) for path, rel, info in files]
    books = [ledger]

    def vouched(target: Path, found: os.stat_result) -> bool:
        """Whether a ledger records ``target`` as it is: the one read above, or else as it is
        now (another process, a --shard run, may have written it since), its name also
        compared case-blind (a case-insensitive file system, --ext jpg after .JPG)."""
        rel = target.relative_to(out_dir)
        wanted = (found.st_size, found.st_mtime_ns)
        for book in books:
            if _recorded(book, rel, found) or any(
                    value == wanted and key.casefold() == rel.as_posix().casefold()
                    for key, value in book.items()):
                return True
        if len(books) == 1:
            books.append(read_ledger(ledger_path))
            return vouched(target, found)
        return False

    inputs = {_identity(info): path for path, _, info, _ in planned}
    hits: dict[Path, tuple[Path, os.stat_result]] = {}  # source -> (input at its target, stat)
    earlier: set[Identity] = set()  # earlier outputs of this command, recorded in the ledger
    unlisted: set[Path] = set()  # inputs whose target is a file of yours the listing left out
    for path, _, _, target in planned:
        found = _stat_or_none(target)
        if found is not None and _identity(found) in inputs:
            hit = inputs[_identity(found)]
            hits[path] = (hit, found)
            if hit != path and ledger and _recorded(ledger, target.relative_to(out_dir), found):
                earlier.add(_identity(found))
        elif inside and options.overwrite and found is not None and \
                stat.S_ISREG(found.st_mode) and not vouched(target, found):
            # under an OUTPUT inside the input's tree every file is an input, also one the
            # listing did not reach (a sub-folder without -r, the folder of a single photo):
            # --overwrite would replace it (without, it is skipped: nothing is replaced)
            unlisted.add(path)
    unreadable = {_path_key(p): p for p, _, _ in problems}
    jobs: list[tuple[Path, Job]] = []
    seen: dict[str, Path] = {}
    folders_seen: dict[Path, Path | None] = {}
    for path, rel, info, target in planned:
        if _identity(info) in earlier:
            continue  # the output of another input, written by an earlier run
        hit = hits.get(path)
        key = _path_key(target)
        if (hit is not None and _identity(hit[1]) not in earlier) or key in unreadable or \
                path in unlisted:
            other = hit[0] if hit is not None else unreadable.get(key, target)
            what = "" if _path_key(other) == key else f" ({other})"
            if ledger and os.path.normcase(target.relative_to(out_dir).as_posix()) in ledger:
                what += " (an earlier run wrote it, but it has changed since, so it is taken " \
                    "for a photo of yours)"
            elif path in unlisted:
                what += " (no run is recorded writing it, so it is taken for a photo of yours)"
            raise DeblurcliError(f"refusing to write {target}: it is an input file{what}; choose "
                                 "another OUTPUT folder or a --suffix")
        if key in seen:
            # (a --suffix is added to both names alike: it cannot part them)
            advice = "use --ext auto (each keeps its own format), or rename one of them" \
                if options.ext != "auto" else "rename one of them"
            raise DeblurcliError(f"{seen[key]} and {path} would both be written to {target}; "
                                 f"{advice}")
        seen[key] = path
        in_the_way = f"{target} is a folder: move it away, or choose another OUTPUT folder or " \
            "a --suffix" if _is_folder(target) else ""  # found now, not after the deblurring
        if not options.overwrite and os.path.islink(target) and not os.path.exists(target):
            # it was skipped as if an output (--overwrite replaces it, as any other link)
            in_the_way = f"{target} is a broken symlink, not an output: remove it (or " \
                "--overwrite replaces it), or choose another OUTPUT folder"
        blocked = _file_for_folder(target.parent, out_dir, folders_seen)
        if blocked is not None:
            in_the_way = f"{blocked} is not a folder, but outputs go into it: move it away, " \
                "or choose another OUTPUT folder"
        if len(os.fsencode(target.name)) > 255:  # file systems take 255 bytes a name
            in_the_way = f"{target.name[:40]}…: the output name is {len(os.fsencode(target.name))}" \
                " bytes, more than the 255 a file system allows; shorten the --suffix or the name"
        jobs.append((rel, Job(path, target, ledger=ledger_path if inside else None,
                              problem=in_the_way)))
    _check_file_folder_clash([job for _, job in jobs], seen, out_dir)
    for path, rel, reason in problems:
        name = output_name(rel, options.suffix, options.ext) if rel.suffix else rel.name
        jobs.append((rel, Job(path, out_dir / rel.parent / name, problem=reason)))
    jobs.sort(key=lambda item: item[0].as_posix())
    if options.shard is None:
        return [job for _, job in jobs]
    index, count = options.shard
    return [job for rel, job in jobs if shard_of(rel.as_posix(), count) == index]


def _check_file_folder_clash(jobs: list[Job], seen: dict[str, Path], out_dir: Path) -> None:
    """Refuse a run where one output would be written where another's folder goes (``z.jpg``
    beside a folder ``z.png/`` with ``--ext png``): found now, not as a failure after the
    deblurring of whichever came second."""
    for job in jobs:
        try:
            folders = job.target.relative_to(out_dir).parents[:-1]  # (without OUTPUT itself)
        except ValueError:
            continue
        for folder in folders:
            other = seen.get(_path_key(out_dir / folder))
            if other is not None:
                raise DeblurcliError(f"{other} would be written to {out_dir / folder}, the "
                                     f"folder that {job.source}'s output goes into; rename one "
                                     "of them")


def _is_folder(path: Path) -> bool:
    """A real folder (not a link to one) at ``path``."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def check_output_folder(folder: Path) -> None:
    """Make sure files can be created in ``folder`` -- or, while it does not exist yet, in the
    nearest existing folder above it, where the first output will create it -- so that a
    read-only or full output folder stops a run before any work is done. Nothing is created
    (a run that fails later, e.g. on a missing model, leaves no empty folder behind).

    Raises:
        DeblurcliError: the folder (or that parent) is not a writable folder.
    """
    folder = Path(folder)
    existing = folder
    try:
        while not existing.exists() and not existing.is_symlink() and \
                existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".deblurcli-check-", suffix=".part")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DeblurcliError(f"cannot write to the output folder {folder}: "
                             f"{exc.strerror or exc}") from None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def _file_for_folder(folder: Path, out_dir: Path,
                     known: dict[Path, Path | None]) -> Path | None:
    """The first of ``folder`` and its parents below ``out_dir`` that exists as something other
    than a folder (a file there would fail the output only after its deblurring, as "File
    exists"), or None; ``known`` keeps the answers per folder."""
    if folder == out_dir or out_dir not in folder.parents:
        return None
    if folder not in known:
        above = _file_for_folder(folder.parent, out_dir, known)
        if above is None:
            info = _stat_or_none(folder)  # a link to a folder is a folder; a broken one is not
            if info is None and os.path.lexists(folder) or \
                    info is not None and not stat.S_ISDIR(info.st_mode):
                above = folder
        known[folder] = above
    return known[folder]


def process_file(job: Job, deblur: DeblurFn, options: BatchOptions,
                 progress: Optional[ProgressFn] = None) -> int:
    """Read ``job.source``, deblur it and write ``job.target`` keeping alpha, grey and bit depth
    (16 bits only where the output format stores them: PNG, TIFF) and, unless
    ``options.metadata`` is off, the ICC profile, EXIF, XMP and DPI; a video is deblurred frame by
    frame (:func:`deblurcli.video.deblur_video`), with its tags unless ``options.metadata`` is
    off. Returns the video frames written (0 for an
    image)."""
    record = ledger_hook(job)
    if is_video(job.source):
        return deblur_video(job.source, job.target, deblur, codec=options.codec, crf=options.crf,
                            max_pixels=options.max_pixels, progress=progress,
                            before_replace=record, tags=options.metadata)
    image = read_image(job.source, max_pixels=options.max_pixels)
    height, width = image.pixels.shape[:2]
    too_large = side_limit_problem(format_of(job.target) or "", width, height)
    if too_large:  # before the deblurring, whose output could not be written
        raise ImageWriteError(f"cannot write {job.target}: {too_large}")
    result = deblur(fill_transparent(image.pixels, image.alpha), progress)
    stripped = {} if options.metadata else {"metadata": _colour_only(image.metadata)}
    write_image(job.target, result, like=image, quality=options.quality, before_replace=record,
                **stripped)  # (formats without 16 bits get 8: encode_image)
    return 0


def _colour_only(metadata: Optional[ImageMetadata]) -> Optional[ImageMetadata]:
    """What ``--strip-metadata`` keeps of a photo's metadata: how to show its values (the ICC
    profile, a PNG's colour chunks), as a video keeps its colour tags; without them the colours
    of a wide-gamut photo shift."""
    if metadata is None or not (metadata.icc or metadata.png_colour):
        return None
    return ImageMetadata(icc=metadata.icc, png_colour=metadata.png_colour)


def ledger_hook(job: Job) -> Optional[Callable[[Path], None]]:
    """The ``before_replace`` hook that records ``job.target`` in its ledger (None when the
    output lies outside the input tree)."""
    ledger = job.ledger
    return None if ledger is None else (
        lambda tmp: record_output(ledger, job.target, tmp, job.source))


def failure_reason(job: Job, exc: BaseException) -> Optional[str]:
    """The one-line reason recorded when ``job`` raised ``exc`` (a bad input or output, out of
    memory), or None when ``exc`` is not a failure of that one file (to be raised)."""
    if isinstance(exc, DeblurcliError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError):
        return f"{job.target}: {exc.strerror or exc}"
    if _is_oom(exc):
        _release_cuda_cache()
        return f"{job.source.name}: {OOM_ADVICE}"
    return None


def needs_processing(job: Job, options: BatchOptions) -> bool:
    """Whether :func:`run_jobs` would read and deblur this job (not fail or skip it at once).
    Anything at the target counts as done but a real folder, which fails the job when it is
    written (a link, a pipe is never replaced without ``--overwrite``)."""
    if job.problem:
        return False
    if options.overwrite:
        return True
    try:
        return stat.S_ISDIR(os.lstat(job.target).st_mode)
    except OSError:  # nothing there (or nothing that can be looked at): write it
        return True


def run_jobs(jobs: list[Job], deblur: DeblurFn, options: BatchOptions,
             progress: Optional[ProgressFn] = None,
             on_result: Optional[Callable[[FileResult], None]] = None) -> BatchSummary:
    """Run every job; existing targets are skipped unless ``options.overwrite``.

    Failures (entries found unreadable while planning, unreadable or unwritable images,
    out-of-memory) are recorded with a one-line reason and the run continues. Emits ``"images"``
    progress events with the file name and the mean seconds per processed image; ``deblur``
    receives ``progress`` for its ``"tiles"`` events.
    ``on_result`` is called after each job (e.g. to print a failure as it happens).
    """
    summary = BatchSummary()
    total = len(jobs)
    report(progress, "images", 0, total)
    for number, job in enumerate(jobs, start=1):
        if job.problem:
            result = FileResult(job, "failed", error=job.problem)
        elif not needs_processing(job, options):
            result = FileResult(job, "skipped", error="output exists (use --overwrite)")
        else:
            report(progress, "images", number - 1, total, **_progress_info(summary, job))
            start = time.perf_counter()
            try:
                frames = process_file(job, deblur, options, progress)
                result = FileResult(job, "done", time.perf_counter() - start, frames=frames)
            except Exception as exc:  # noqa: BLE001 - failure_reason tells a file's failure
                reason = failure_reason(job, exc)
                if reason is None:
                    raise
                result = FileResult(job, "failed", error=reason)
        summary.results.append(result)
        if on_result is not None:
            on_result(result)
        report(progress, "images", number, total, **_progress_info(summary, job))
    return summary


def _progress_info(summary: BatchSummary, job: Job) -> dict:
    """The ``"images"`` event's extras: the file at work (or just done), and the mean seconds
    per photo once a photo is done."""
    info: dict = {"file": job.source.name}
    if summary.mean_seconds:
        info["s_per_image"] = round(summary.mean_seconds, 2)
    return info


def _release_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")  # a run without torch (ONNX Runtime) holds no CUDA cache
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
