"""The batch runner behind ``deblurcli deblur``: which files, where they go, and running them.

* :func:`plan_jobs` lists the inputs (one file, or a folder, optionally recursive), applies the
  ``--shard i/n`` split to the sorted list, names the outputs (same relative path under the output
  folder, ``--suffix`` added to the stem, ``--ext`` applied) and refuses any output that would
  replace an input or collide with another output.
* :func:`run_jobs` reads each image, runs a ``deblur`` function on its pixels and writes the
  result with the input's alpha, grey-ness and bit depth; existing outputs are skipped unless
  ``overwrite``. A failing file (unreadable image, out of memory) is recorded and the batch goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Optional

import numpy as np

from deblurcli.errors import DeblurcliError, ImageReadError
from deblurcli.images import IMAGE_SUFFIXES, list_images, read_image, write_image
from deblurcli.progress import ProgressFn, report

EXT_CHOICES = ("auto", "png", "jpg", "webp", "tif")
SIXTEEN_BIT_SUFFIXES = frozenset({".png", ".tif", ".tiff"})
OOM_ADVICE = "out of memory; lower --tile (e.g. --tile 256) or --batch-size"

DeblurFn = Callable[[np.ndarray, Optional[ProgressFn]], np.ndarray]


@dataclass(frozen=True)
class BatchOptions:
    """How inputs map to outputs.

    Attributes:
        suffix: added to each output file's stem (``photo.jpg`` -> ``photo{suffix}.jpg``).
        ext: output format: ``auto`` (the input's suffix), ``png``, ``jpg``, ``webp``, ``tif``.
        overwrite: replace existing outputs (never inputs).
        recursive: descend into sub-folders of an input folder and mirror them in the output.
        shard: ``(index, count)``, 0-based: keep files ``index, index+count, ...`` of the
            sorted list.
        quality: JPEG/WebP quality.
    """

    suffix: str = ""
    ext: str = "auto"
    overwrite: bool = False
    recursive: bool = False
    shard: Optional[tuple[int, int]] = None
    quality: int = 95


@dataclass(frozen=True)
class Job:
    """One input file and the output file it will produce."""

    source: Path
    target: Path


@dataclass
class FileResult:
    """What happened to one job: ``status`` is ``"done"``, ``"skipped"`` or ``"failed"``."""

    job: Job
    status: str
    seconds: float = 0.0
    error: str = ""


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
        """Mean wall time per processed image (0 when none was processed)."""
        done = [r.seconds for r in self.results if r.status == "done"]
        return float(np.mean(done)) if done else 0.0


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


def shard_items(items: list, shard: Optional[tuple[int, int]]) -> list:
    """Every ``count``-th item starting at ``index`` (all items when ``shard`` is None)."""
    if shard is None:
        return list(items)
    index, count = shard
    return list(items[index::count])


def output_name(source: Path, suffix: str, ext: str) -> str:
    """File name of the output for ``source`` (``ext``: auto|png|jpg|webp|tif)."""
    if ext not in EXT_CHOICES:
        raise ValueError(f"unknown output format {ext!r}; use one of {', '.join(EXT_CHOICES)}")
    new_suffix = source.suffix if ext == "auto" else "." + ext
    return f"{source.stem}{suffix}{new_suffix}"


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def plan_jobs(source: Path, out_dir: Path, options: BatchOptions) -> list[Job]:
    """Map the input file or folder to output files under ``out_dir`` (see the module docstring).

    Raises:
        ImageReadError: the input does not exist, is not an image, or the folder has no images.
        DeblurcliError: ``out_dir`` is a file, an output would replace an input, or two inputs
            map to the same output.
    """
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DeblurcliError(f"OUTPUT must be a folder, but {out_dir} is a file")
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageReadError(f"{source} is not an image file (suffix {source.suffix!r})")
        pairs = [(source, Path(source.name))]
    elif source.is_dir():
        files = list_images(source, recursive=options.recursive)
        out_abs = out_dir.resolve()
        # outputs written inside the input folder must not become inputs of the next run
        if out_abs != source.resolve():
            files = [f for f in files if out_abs not in f.resolve().parents]
        pairs = [(f, f.relative_to(source)) for f in files]
        if not pairs:
            where = "or its sub-folders " if options.recursive else ""
            raise ImageReadError(f"no images found in {source} {where}"
                                 f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    else:
        raise ImageReadError(f"input not found: {source}")
    pairs = shard_items(sorted(pairs, key=lambda p: p[1].as_posix()), options.shard)
    jobs: list[Job] = []
    seen: dict[Path, Path] = {}
    inputs = {f.resolve() for f, _ in pairs}
    for f, rel in pairs:
        target = out_dir / rel.parent / output_name(rel, options.suffix, options.ext)
        key = target.resolve()
        if key in inputs or _same_file(target, f):
            raise DeblurcliError(f"refusing to write {target}: it is an input file; choose another "
                                 "OUTPUT folder or a --suffix")
        if key in seen:
            raise DeblurcliError(f"{seen[key]} and {f} would both be written to {target}; "
                                 "use --ext auto or a different --suffix")
        seen[key] = f
        jobs.append(Job(f, target))
    return jobs


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def process_file(job: Job, deblur: DeblurFn, options: BatchOptions,
                 progress: Optional[ProgressFn] = None) -> None:
    """Read ``job.source``, deblur it and write ``job.target`` keeping alpha, grey and bit depth
    (16 bits only where the output format stores them: PNG, TIFF)."""
    image = read_image(job.source)
    result = deblur(image.pixels, progress)
    bit_depth = image.bit_depth if job.target.suffix.lower() in SIXTEEN_BIT_SUFFIXES else 8
    write_image(job.target, result, alpha=image.alpha, grayscale=image.grayscale,
                bit_depth=bit_depth, quality=options.quality)


def run_jobs(jobs: list[Job], deblur: DeblurFn, options: BatchOptions,
             progress: Optional[ProgressFn] = None,
             on_result: Optional[Callable[[FileResult], None]] = None) -> BatchSummary:
    """Run every job; existing targets are skipped unless ``options.overwrite``.

    Failures (unreadable or unwritable images, out-of-memory) are recorded with a one-line
    reason and the run continues. Emits ``"images"`` progress events with the file name and the
    mean seconds per processed image; ``deblur`` receives ``progress`` for its ``"tiles"`` events.
    ``on_result`` is called after each job (e.g. to print a failure as it happens).
    """
    summary = BatchSummary()
    total = len(jobs)
    report(progress, "images", 0, total)
    for number, job in enumerate(jobs, start=1):
        if job.target.exists() and not options.overwrite:
            result = FileResult(job, "skipped", error="output exists (use --overwrite)")
        else:
            start = time.perf_counter()
            try:
                process_file(job, deblur, options, progress)
                result = FileResult(job, "done", time.perf_counter() - start)
            except DeblurcliError as exc:
                result = FileResult(job, "failed", error=" ".join(str(exc).split()))
            except OSError as exc:
                result = FileResult(job, "failed", error=f"{job.target}: {exc.strerror or exc}")
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is a per-file failure
                if not _is_oom(exc):
                    raise
                result = FileResult(job, "failed", error=f"{job.source.name}: {OOM_ADVICE}")
                _release_cuda_cache()
        summary.results.append(result)
        if on_result is not None:
            on_result(result)
        report(progress, "images", number, total, file=job.source.name,
               s_per_image=round(summary.mean_seconds, 2))
    return summary


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
