"""Evaluation output: Rich table, per-image CSV, summary JSON and the γ-sweep plot.

Infinite PSNR (a pixel-identical pair) is kept as ``inf`` in the CSV; means are taken over finite
values and the number of infinite scores is reported next to them (``<metric>_inf`` in the JSON,
``(+N inf)`` in the table).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deblurcli.evaluation.metrics import METRICS
from deblurcli.evaluation.runner import EvalResult, RowResult
from deblurcli.errors import DeblurcliError
from deblurcli.images import atomic_write_bytes, writing

CSV_NAME = "per_image.csv"
JSON_NAME = "summary.json"
PLOT_NAME = "gamma_sweep.png"


def _num(value: float | None) -> Any:
    """JSON-safe number: ``nan`` -> ``None``, ``inf`` -> ``"inf"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def header(name: str) -> str:
    """Column title with the metric's direction, e.g. ``"lpips ↓"``."""
    return f"{name} {METRICS[name].arrow}"


def format_score(row: RowResult, name: str) -> str:
    """A table cell: mean with 4 significant decimals, plus the count of infinite scores."""
    s = row.summary[name]
    text = "n/a" if math.isnan(s.mean) else (f"{s.mean:.2f}" if name == "psnr" else f"{s.mean:.4f}")
    text += f" (+{s.n_inf} inf)" if s.n_inf else ""
    return text + (f" ({s.n_scored} of {s.n})" if s.n_scored < s.n else "")


def _stop_record(result: EvalResult) -> dict:
    """How a stopped evaluation ended: interrupted, or the error that stopped it."""
    how = {"interrupted": True} if isinstance(result.stopped, KeyboardInterrupt) else \
        {"error": " ".join(str(result.stopped).split())}
    return {**how, "n_planned": result.n_planned, "rows_not_reached": result.unreached}


def results_table(result: EvalResult):
    """A Rich table: one row per input / pred / γ, one column per metric (with ↑/↓)."""
    from rich.table import Table

    title = f"{result.dataset}: {result.n_images} image(s)"
    if result.stopped is not None:
        title = (f"{result.dataset}: the first {result.n_images} of {result.n_planned} image(s), "
                 + ("interrupted" if isinstance(result.stopped, KeyboardInterrupt)
                    else "stopped by an error"))
    if result.aligned:
        title += ", aligned"
    if result.y_channel:
        title += ", Y channel"
    table = Table(title=title)
    table.add_column("row")
    for name in result.metrics:
        table.add_column(header(name), justify="right")
    table.add_column("s/image", justify="right")
    for row in result.rows:
        secs = row.model_seconds_per_image
        table.add_row(row.label, *[format_score(row, n) for n in result.metrics],
                      "" if secs is None else f"{secs:.3f}")
    return table


def summary_dict(result: EvalResult, command: str | None = None,
                 args: dict | None = None) -> dict:
    """``{"input": {...}, "gamma=0.7": {"psnr": ..., ...}, "meta": {...}}``."""
    out: dict[str, Any] = {}
    for row in result.rows:
        entry: dict[str, Any] = {}
        for name in result.metrics:
            s = row.summary[name]
            entry[name] = _num(s.mean)
            if s.n_inf:
                entry[f"{name}_inf"] = s.n_inf
            entry[f"{name}_n"] = s.n_scored  # the images it scored (its mean: the finite ones)
        entry.update(
            gamma=row.gamma,
            n_images=len(row.images),
            model_seconds_per_image=_num(row.model_seconds_per_image),
            score_seconds_per_image=_num(row.score_seconds_per_image),
            load_seconds=_num(row.load_seconds),
            **({"precision": row.precision} if row.precision else {}),
            peak_rss_mb=_num(row.peak_rss_mb),
            cuda_peak_mb=_num(row.cuda_peak_mb),
        )
        out[row.label] = entry
    out["meta"] = {
        "dataset": result.dataset,
        "n_images": result.n_images,
        "device": result.device,
        "aligned": result.aligned,
        "y_channel": result.y_channel,
        **(_stop_record(result) if result.stopped is not None else {}),
        "metrics": {n: {"kind": METRICS[n].kind, "lower_better": METRICS[n].lower_better}
                    for n in result.metrics},
        **({"skipped_metrics": dict(result.skipped_metrics)} if result.skipped_metrics else {}),
        "inf_handling": "means over finite values; <metric>_inf counts infinite scores, "
                        "<metric>_n the images scored",
        "versions": _versions(),
        "command": command,
        "args": args or {},
    }
    return out


def _versions() -> dict[str, str | None]:
    """The versions the scores depend on: deblurcli's, pyiqa's (LPIPS, NIQE, ... change with
    it), torch's."""
    from importlib.metadata import PackageNotFoundError, version

    from deblurcli._version import __version__

    found: dict[str, str | None] = {"deblurcli": __version__}
    for name in ("pyiqa", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def csv_bytes(result: EvalResult) -> bytes:
    """One line per (row, image): scores, model seconds and the alignment shift (of an
    interrupted evaluation, every image scored, also those out of the summary)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "gamma", "image", *result.metrics, "model_seconds", "shift_y",
                     "shift_x"])
    for row in result.rows:
        for im in [*row.images, *row.unmatched]:
            writer.writerow([
                row.label, "" if row.gamma is None else row.gamma, im.key,
                *[repr(float(im.scores[n])) for n in result.metrics],
                "" if im.model_seconds is None else f"{im.model_seconds:.4f}",
                "" if im.shift is None else im.shift[0], "" if im.shift is None else im.shift[1],
            ])
    return buf.getvalue().encode()


def sweep_png(result: EvalResult) -> bytes | None:
    """A PNG plot of every metric against γ (one panel each; the input as a dashed line), or
    ``None`` when fewer than two γ rows exist. Uses the Agg canvas directly, so no global
    matplotlib backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep = sorted((r for r in result.rows if r.gamma is not None), key=lambda r: r.gamma)
    if len(sweep) < 2:
        return None
    baseline = next((r for r in result.rows if r.label == "input"), None)
    n = len(result.metrics)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    gammas = [r.gamma for r in sweep]
    for i, name in enumerate(result.metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(gammas, [r.summary[name].mean for r in sweep], marker="o", label="OSDD")
        if baseline is not None and not math.isnan(baseline.summary[name].mean):
            ax.axhline(baseline.summary[name].mean, linestyle="--", color="grey", label="input")
        ax.set_title(header(name))
        ax.set_xlabel("γ")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize="small")
    fig.suptitle(f"{result.dataset}: metrics vs γ")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` that cannot be written (before the evaluation, not after it): an
    existing file, a path below a file, or below a folder that this user cannot write in."""
    import os

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DeblurcliError(f"--out must be a folder, but {out_dir} is a file")
    there = Path(os.path.abspath(out_dir))
    while not there.exists() and there != there.parent:  # the nearest part that exists
        there = there.parent
    if not there.is_dir():
        raise DeblurcliError(f"cannot write {out_dir}: {there} is a file, not a folder")
    if not os.access(there, os.W_OK | os.X_OK):
        raise DeblurcliError(f"cannot write {out_dir}: no permission to write in {there}")


def check_not_inputs(out_dir: Path, inputs: Iterable[Path]) -> None:
    """Refuse an ``out_dir`` where a report file would replace one of the images scored (an
    input named ``gamma_sweep.png`` in the folder given as ``--out``)."""
    import os

    def key(path: Path) -> str:
        return os.path.normcase(os.path.realpath(path))

    reports = {key(Path(out_dir) / name): name for name in (CSV_NAME, JSON_NAME, PLOT_NAME)}
    for path in inputs:
        name = reports.get(key(path))
        if name is not None:
            raise DeblurcliError(f"--out {out_dir}: the report's {name} would replace {path}, "
                                 "an image being scored; choose another --out folder")


def _write_together(files: list[tuple[Path, bytes]]) -> None:
    """Write every file to a temporary one before any takes its name (the first last): a
    failure (a full disk) leaves the earlier set as it was, not a new CSV beside an old
    summary."""
    (path, data), rest = files[0], files[1:]
    with writing(path):
        atomic_write_bytes(path, data, before_replace=(lambda _: _write_together(rest))
                           if rest else None)


def write_outputs(out_dir: Path, result: EvalResult, command: str | None = None,
                  args: dict | None = None) -> list[Path]:
    """Write the CSV, JSON and (for a γ sweep) the plot into ``out_dir``; return the paths.

    Raises:
        DeblurcliError: ``out_dir`` is a file, or a file cannot be written (one line naming it).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    plot = sweep_png(result)
    files = [(out_dir / JSON_NAME, (json.dumps(summary_dict(result, command, args), indent=2,
                                               default=str) + "\n").encode()),
             (out_dir / CSV_NAME, csv_bytes(result)),
             *([(out_dir / PLOT_NAME, plot)] if plot else [])]
    for path, _ in files:
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise DeblurcliError(f"cannot write {path}: it is not a file; move it away")
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    _write_together(files)
    if plot is None:  # an earlier sweep's figure would sit beside these results as if it were theirs
        with writing(out_dir / PLOT_NAME):
            (out_dir / PLOT_NAME).unlink(missing_ok=True)
    return [out_dir / CSV_NAME, out_dir / JSON_NAME, *([out_dir / PLOT_NAME] if plot else [])]
