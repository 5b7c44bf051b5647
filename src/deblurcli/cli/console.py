"""Terminal output for the CLI: results on stdout, progress and warnings on stderr."""

from __future__ import annotations

import contextlib
import time
from typing import Optional, Union
from collections.abc import Iterator

from rich.console import Console
from rich.table import Column
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

PLAIN_INTERVAL_S = 10.0  # seconds between progress lines when stderr is not a terminal
BAR_WIDTH = 20           # columns: leaves room for counts, rate, elapsed and ETA at 80


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
        super().__init__("", table_column=Column(no_wrap=True))
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        return Text(format_rate(task.finished_speed or task.speed,
                                task.fields.get("unit", self.unit)), style="progress.data.speed")


def format_rate(speed: Optional[float], unit: str) -> str:
    """``"2.31 img/s"``, or ``"4.20 s/img"`` below one unit per second; ``""`` when unknown."""
    if not speed:
        return ""
    if speed >= 1:
        return f"{speed:.2f} {unit}/s"
    return f"{1.0 / speed:.2f} s/{unit}"


def format_seconds(seconds: Optional[float]) -> str:
    """``"0:04:05"``; ``"-:--:--"`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_info(info: dict) -> str:
    """``loss=0.0123 lr=5e-05``: the extra values of a progress event."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in info.items())


class _Stage:
    """Counts, rate and ETA of one stage for the plain (no terminal) lines."""

    def __init__(self, now: float, done: int) -> None:
        self.start, self.start_done = now, done
        self.done, self.total, self.info = done, None, ""
        self.ended: Optional[float] = None  # when it reached its total

    def update(self, now: float, done: int, total: Optional[int], info: str) -> None:
        if done < self.done:  # a stage that restarts (e.g. the tiles of the next image)
            self.start, self.start_done = now, done
        self.done, self.total, self.info = done, total, info
        self.ended = now if total is not None and done >= total else None

    def line(self, label: str, unit: str, now: float) -> str:
        # a finished stage keeps its own time and rate, not those of the stages after it
        elapsed = (self.ended if self.ended is not None else now) - self.start
        speed = (self.done - self.start_done) / elapsed if elapsed > 0 else None
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [label, count]
        if self.total:
            parts.append(f"({100.0 * self.done / self.total:.0f}%)")
        if speed:
            parts.append(format_rate(speed, unit))
            if self.total is not None:
                parts.append(f"eta {format_seconds(max(self.total - self.done, 0) / speed)}")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.info:
            parts.append(self.info)
        return " ".join(parts)


@contextlib.contextmanager
def rich_progress(console: Console, labels: Optional[dict[str, str]] = None,
                  unit: Union[str, dict[str, str]] = "it", enabled: bool = True,
                  interval: float = PLAIN_INTERVAL_S) -> Iterator[ProgressFn]:
    """Yield a :data:`ProgressFn` that shows progress on ``console`` (stderr).

    On a terminal: one Rich bar per stage whose counts, rate, elapsed time and ETA fit in 80
    columns (the bar is fixed-width; extra ``info`` values such as ``loss=0.0123`` come last
    and are cut with an ellipsis when the line is full). Without a terminal (a log file, CI,
    ``nohup``): a plain line every ``interval`` seconds and a last one when the work ends, with
    every stage's counts, rate and ETA. ``labels`` maps stage names to the text shown, ``unit``
    names what is counted (one name, or one per stage: ``{"images": "img", "tiles": "tile"}``);
    ``enabled=False`` shows nothing.
    """
    labels = labels or {}
    units = unit if isinstance(unit, dict) else {}
    default_unit = "it" if isinstance(unit, dict) else unit
    if not enabled:
        yield lambda event: None
        return
    if not console.is_terminal:
        plain = _PlainLines(console, labels, units, default_unit, interval)
        try:
            yield plain
        finally:
            plain.flush()
        return
    progress = Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=BAR_WIDTH),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        _RateColumn(default_unit),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        TimeRemainingColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[info]}",
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1, min_width=0)),
        console=console,
        transient=False,
        expand=True,
    )
    tasks: dict[str, TaskID] = {}

    def callback(event: ProgressEvent) -> None:
        info = format_info(event.info)
        if event.stage not in tasks:
            tasks[event.stage] = progress.add_task(
                labels.get(event.stage, event.stage), total=event.total, info=info,
                unit=units.get(event.stage, default_unit))
        progress.update(tasks[event.stage], completed=event.done, total=event.total, info=info)

    with progress:
        yield callback


class _PlainLines:
    """The :data:`ProgressFn` used without a terminal: a line every ``interval`` seconds, with
    each stage's counts, rate and ETA, and a last line when the command's work ends."""

    def __init__(self, console: Console, labels: dict[str, str], units: dict[str, str],
                 unit: str, interval: float) -> None:
        self.console, self.labels, self.interval = console, labels, interval
        self.units, self.unit = units, unit
        self.stages: dict[str, _Stage] = {}
        self.last = time.monotonic()
        self.pending = False

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        stage = self.stages.get(event.stage)
        if stage is None:
            stage = self.stages[event.stage] = _Stage(now, event.done)
        stage.update(now, event.done, event.total, format_info(event.info))
        self.pending = True
        if now - self.last >= self.interval:
            self._print(now)

    def _print(self, now: float) -> None:
        self.last, self.pending = now, False
        text = " | ".join(s.line(self.labels.get(name, name), self.units.get(name, self.unit), now)
                          for name, s in self.stages.items())
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def flush(self) -> None:
        if self.pending:
            self._print(time.monotonic())
