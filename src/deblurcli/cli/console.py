"""Terminal output for the CLI: results on stdout, progress and warnings on stderr."""

from __future__ import annotations

import contextlib
import time
from typing import Optional
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from deblurcli.progress import ProgressEvent, ProgressFn


def stdout_console() -> Console:
    """Console for results (tables, summaries)."""
    return Console(soft_wrap=True)


def stderr_console() -> Console:
    """Console for progress, warnings and errors."""
    return Console(stderr=True, soft_wrap=True)


def warn(console: Console, message: str) -> None:
    """Print a one-line warning on the given (stderr) console."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, markup=True)


class _RateColumn(TextColumn):
    """Shows units per second (or seconds per unit when slower than 1/s)."""

    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        if not speed:
            return Text("", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.2f} {self.unit}/s", style="progress.data.speed")
        return Text(f"{1.0 / speed:.2f} s/{self.unit}", style="progress.data.speed")


@contextlib.contextmanager
def rich_progress(console: Console, labels: Optional[dict[str, str]] = None,
                  unit: str = "it", enabled: bool = True) -> Iterator[ProgressFn]:
    """Yield a :data:`ProgressFn` that draws one Rich bar per stage on ``console``.

    ``labels`` maps stage names to the text shown before each bar. Extra ``info`` values in the
    events are shown after the bar (e.g. ``loss=0.0123``). With ``enabled=False`` (or when the
    console is not a terminal and ``CI`` output is wanted quiet) the callback does nothing visible.
    """
    labels = labels or {}
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not enabled,
    )
    tasks: dict[str, TaskID] = {}
    started = time.perf_counter()

    def callback(event: ProgressEvent) -> None:
        info = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.info.items()
        )
        if event.stage not in tasks:
            tasks[event.stage] = progress.add_task(
                labels.get(event.stage, event.stage), total=event.total, info=info
            )
        progress.update(tasks[event.stage], completed=event.done, total=event.total, info=info)

    with progress:
        yield callback
    _ = started
