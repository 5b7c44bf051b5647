"""Progress reporting without printing.

Library functions never print. Long-running ones take an optional ``progress`` callback and call
it with :class:`ProgressEvent` objects; the CLI turns those into Rich progress bars on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional
from collections.abc import Callable


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update.

    Attributes:
        stage: what is progressing, e.g. ``"images"``, ``"tiles"``, ``"pairs"``, ``"steps"``.
        done: units finished so far in this stage.
        total: units expected in this stage (``None`` if unknown).
        info: optional extra values for display (loss, current file name, ...).
    """

    stage: str
    done: int
    total: Optional[int] = None
    info: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None]


def report(progress: Optional[ProgressFn], stage: str, done: int, total: Optional[int] = None,
           **info: Any) -> None:
    """Send an event to ``progress`` if a callback was given."""
    if progress is not None:
        progress(ProgressEvent(stage=stage, done=done, total=total, info=dict(info)))
