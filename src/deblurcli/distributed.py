"""Many processes, one ``deblur`` run: ``accelerate launch -m deblurcli deblur IN OUT``.

Under a launcher (``accelerate launch``, ``torchrun``: the ``WORLD_SIZE`` environment variable
is above 1) every process plans the same complete job list (so the input guard sees every
input), takes every ``count``-th job starting at its own ``index`` (an interleaved split of the
one list all of them planned, after waiting for each other), and at the end the results of all
processes are gathered, so that one summary lists the failures of every process. Without a
launcher nothing here imports accelerate.

Videos are split by frames instead (:func:`deblur_video_split`): every process deblurs its own
contiguous span of each video into a segment file, and the main process joins the segments.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from deblurcli.progress import ProgressEvent, ProgressFn

if TYPE_CHECKING:
    import torch

    from deblurcli.batch import BatchOptions, DeblurFn, FileResult, Job

POLL_S = 0.2  # how often a process that waits for the others asks whether they have arrived


def launched_processes() -> int:
    """Number of processes a launcher started (1 when none did)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass
class ProcessGroup:
    """This process's place among the launched ones.

    Attributes:
        index: 0-based process number (0 is the main process).
        count: number of processes.
        device: the device accelerate gives this process (``cuda:LOCAL_RANK`` on GPUs, else cpu).
        state: accelerate's ``PartialState``.
        gathers: :meth:`gather` calls so far (every process makes the same ones).
    """

    index: int
    count: int
    device: torch.device
    state: Any
    gathers: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is the main process (the one that reports)."""
        return self.index == 0

    def wait(self) -> None:
        """Wait until every process gets here (e.g. until the main process has reported)."""
        self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's ``items`` (picklable), concatenated in process order, on every
        process.

        The processes first wait for each other through the launcher's key-value store, which
        has no time limit (one may still be deblurring its part of a long video), so that the
        collective itself, which has one (10 minutes for NCCL), starts only when all are there.
        """
        from accelerate.utils import gather_object

        self.gathers += 1
        key = f"gather{self.gathers}"
        if self.add(key, 1) is not None:
            while (self.add(key, 0) or self.count) < self.count:  # None: the store went away
                time.sleep(POLL_S)
        return list(gather_object(list(items)))

    def add(self, key: str, amount: int) -> Optional[int]:
        """Add ``amount`` to the counter ``key`` that all processes share and return its new
        value; None where there is no shared store to hold it."""
        try:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()  # noqa: SLF001 - no public accessor
            return int(store.add(f"deblurcli/{key}", amount))
        except Exception:  # noqa: BLE001 - no store, or it went away: nothing is shared
            return None


def process_group(cpu: bool) -> Optional[ProcessGroup]:
    """The process group when a launcher started several processes, else None.

    ``cpu``: use the CPU (gloo) even where CUDA is available.
    """
    if launched_processes() <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return ProcessGroup(index=state.process_index, count=state.num_processes,
                        device=torch.device(state.device), state=state)


def cpu_threads_share(group: Optional[ProcessGroup]) -> int:
    """torch threads for one process on the CPU: the usable cores divided among the processes
    (0 = all of them, when not launched)."""
    if group is None:
        return 0
    from deblurcli.device import usable_cpu_count

    return max(1, usable_cpu_count() // group.count)


def gather_results(group: ProcessGroup, results: list, jobs: list, shared: tuple = ()) -> list:
    """The :class:`~deblurcli.batch.FileResult` lists of every process and the ``shared`` ones
    (that every process holds: the videos split by frames), in the order of the complete job list
    ``jobs``."""
    order = {job: i for i, job in enumerate(jobs)}
    return sorted([*group.gather(results), *shared], key=lambda r: order.get(r.job, len(order)))


def split_jobs(jobs: list[Job], options: BatchOptions,
               group: Optional[ProcessGroup]) -> tuple[list[Job], list[Job]]:
    """``(videos, share)``: the videos to deblur that every process takes a part of (none for
    one process) and this process's share of the other jobs (every ``count``-th)."""
    from deblurcli.batch import needs_processing, shard_items
    from deblurcli.video import is_video

    if group is None:
        return [], list(jobs)
    videos = [job for job in jobs if is_video(job.source) and needs_processing(job, options)]
    split = set(videos)
    rest = [job for job in jobs if job not in split]
    return videos, shard_items(rest, (group.index, group.count))


def deblur_video_split(group: ProcessGroup, job: Job, deblur: DeblurFn, options: BatchOptions,
                       progress: Optional[ProgressFn] = None) -> FileResult:
    """Deblur the video of ``job`` with every process, each its own contiguous span of frames
    (:func:`deblurcli.video.plan_spans`) into a segment file next to the output; then the main
    process joins the segments into ``job.target`` (:func:`deblurcli.video.join_segments`)
    unless a process failed, and every process removes its segment. Every process must call
    this for the same videos in the same order; each gets the same result back.

    ``progress`` gets this process's ``"tiles"`` events and, on the main process, ``"frames"``
    events that count the frames of all processes (of the main process alone where the
    processes share no store).
    """
    from deblurcli.batch import FileResult, failure_reason, ledger_hook
    from deblurcli.video import deblur_segment, join_segments, plan_spans

    start = time.perf_counter()
    segment, error = None, ""
    counter = _FrameCounter(group, f"frames:{job.target}", progress)
    try:
        try:
            spans = plan_spans(job.source, group.count)
            counter.total = sum(span.frames or 0 for span in spans)  # all processes'
            segment = deblur_segment(job.source, job.target, deblur, group.index,
                                     spans[group.index], codec=options.codec, crf=options.crf,
                                     max_pixels=options.max_pixels, progress=counter)
        except Exception as exc:  # noqa: BLE001 - failure_reason tells a file's failure
            error = failure_reason(job, exc)
            if error is None:
                raise
        outcomes = group.gather([(group.index, segment, error)])
        result = None
        if group.is_main:
            failures = [(index, why) for index, _, why in outcomes if why]
            if failures:
                result = FileResult(job, "failed", error=_failures_line(failures, group.count))
            else:
                try:
                    frames = join_segments(job.source, [seg for _, seg, _ in outcomes],
                                           job.target, before_replace=ledger_hook(job),
                                           tags=options.metadata)
                    result = FileResult(job, "done", time.perf_counter() - start, frames=frames)
                    counter.report(frames, frames)
                except Exception as exc:  # noqa: BLE001 - failure_reason tells a file's failure
                    reason = failure_reason(job, exc)
                    if reason is None:
                        raise
                    result = FileResult(job, "failed", error=reason)
        return group.gather([result] if group.is_main else [])[0]
    finally:
        if segment is not None and segment.path is not None:
            segment.path.unlink(missing_ok=True)


def _failures_line(failures: list[tuple[int, str]], count: int) -> str:
    """One line for the processes that failed on their parts of a video: the reason alone when
    every process failed for the same one, else each with its process number."""
    if len(failures) == count and len({why for _, why in failures}) == 1:
        return failures[0][1]
    return "; ".join(f"process {index + 1}/{count}: {why}" for index, why in failures)


class _FrameCounter:
    """A :data:`ProgressFn` for one process's part of a video: adds its ``"frames"`` events to a
    counter that all processes share, and on the main process passes on the sum over all of them
    (out of ``total``); other events pass through."""

    def __init__(self, group: ProcessGroup, key: str, progress: Optional[ProgressFn]) -> None:
        self.group, self.key, self.progress = group, key, progress
        self.done, self.total = 0, None

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != "frames":
            if self.progress is not None:
                self.progress(event)
            return
        shared = self.group.add(self.key, event.done - self.done)
        self.done = event.done
        if shared is None:  # nothing shared: this process's own frames
            self.report(event.done, event.total)
        else:
            self.report(shared, self.total)

    def report(self, done: int, total: Optional[int]) -> None:
        if self.group.is_main and self.progress is not None:
            self.progress(ProgressEvent("frames", done, total))
