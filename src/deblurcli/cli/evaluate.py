"""``deblurcli eval``: score deblurring with the paper's metrics (pyiqa), optionally over γ."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from deblurcli.cli.options import check_color_fix, check_device, check_tiling, dtype_option
from deblurcli.tiles import DEFAULT_OVERLAP, DEFAULT_TILE

HELP = """Score deblurring with the paper's metrics (PSNR, SSIM, LPIPS, DISTS, NIQE, MUSIQ, ...).

Full-reference metrics need ground truth (--dataset, or --blur with --sharp); with --blur alone
the no-reference metrics run. Rows: "input" (the blurry images themselves), "pred" (--pred DIR:
existing outputs, paired by relative path or name) and "gamma=G" (--weights DIR: the model run
at each --gamma). Metric weights are read from --metric-weights DIR or pyiqa's cache
($TORCH_HOME/hub/pyiqa, .../checkpoints, .../clip); a missing file is fetched once into that
cache and checked by SHA-256, unless --offline or HF_HUB_OFFLINE=1: then the metrics without
their weights are skipped, one line each, and the others run. PSNR of identical images is inf:
means are over finite values, with the inf count shown. Needs pip install 'deblurcli[eval]';
pyiqa is licensed PolyForm-Noncommercial. See docs/evaluation.md.

\b
Examples:
  deblurcli eval --list-metrics
  deblurcli eval --fetch-metrics lpips,dists                 # fetch weights now, then exit
  deblurcli eval --dataset gopro --root GOPRO_Large --pred results/gopro --out eval/gopro
  deblurcli eval --dataset realblur-j --root RealBlur --pred results/rbj --align
  deblurcli eval --dataset gopro --root GOPRO_Large --weights model/ --gamma 1,0.9,0.8,0.7,0.6 \\
      --out eval/sweep --device cuda
  deblurcli eval --blur pairs/blur --sharp pairs/sharp --metrics psnr,ssim
  deblurcli eval --blur photos/ --metrics niqe,musiq          # no reference
"""


def parse_gammas(text: str) -> tuple[float, ...]:
    """``"1,0.9"`` -> ``(1.0, 0.9)``; every value must be in [0, 1] (raises ``BadParameter``)."""
    values: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise typer.BadParameter(f"not a number: {part!r}", param_hint="--gamma") from None
        if not 0.0 <= value <= 1.0:
            raise typer.BadParameter(f"γ must be in [0, 1], got {value}", param_hint="--gamma")
        if value not in values:
            values.append(value)
    if not values:
        raise typer.BadParameter("give at least one value, e.g. 0.7 or 1,0.8,0.6",
                                 param_hint="--gamma")
    return tuple(values)


def _list_metrics(metric_weights: Path | None) -> None:
    from rich.table import Table

    from deblurcli.cli.console import stdout_console
    from deblurcli.evaluation.metrics import list_metrics

    table = Table(title="metrics (deblurcli eval --metrics a,b,c)")
    for col in ("name", "kind", "better", "needs weights", "available", "description"):
        table.add_column(col)
    from deblurcli.evaluation.metrics import fetch_command

    missing_lines, missing_names = [], []
    for info in list_metrics(metric_weights):
        table.add_row(info.name, info.kind, info.arrow, "yes" if info.needs_weights else "no",
                      "yes" if info.available else "no", info.description)
        missing_lines += [f"  {info.name}: {m}" for m in info.missing]
        missing_names += [info.name] if info.missing else []
    con = stdout_console()
    con.print(table)
    if missing_lines:
        con.print("missing weight files:", highlight=False, markup=False)
        for line in missing_lines:
            con.print(line, highlight=False, markup=False)
        con.print(f"fetch them (once, checked by SHA-256) with: {fetch_command(missing_names)}",
                  highlight=False, markup=False)


def _fetch_metrics(text: str, metric_weights: Path | None) -> None:
    from deblurcli.cli.console import stderr_console, stdout_console
    from deblurcli.errors import DeblurcliError
    from deblurcli.evaluation import fetch
    from deblurcli.evaluation.metrics import METRICS, fetch_metric_weights, parse_metric_names

    try:
        names = list(METRICS) if text.strip().lower() == "all" else parse_metric_names(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--fetch-metrics") from None
    err, out = stderr_console(), stdout_console()
    results = fetch_metric_weights(names, fetch.fetch_file, metric_weights,
                                   note=lambda m: err.print(m, highlight=False, markup=False))
    for name, problem in results.items():
        out.print(f"{name}: {'ready' if problem is None else 'NOT ready: ' + problem}",
                  highlight=False, markup=False)
    failed = [name for name, problem in results.items() if problem is not None]
    if failed:
        raise DeblurcliError(f"could not fetch the weights of {', '.join(failed)}")


def evaluate(
    ctx: typer.Context,
    dataset: str | None = typer.Option(
        None, "--dataset",
        help="Official test set layout: gopro, realblur-j, realblur-r, synth (ROOT/blur + "
             "ROOT/sharp)."
    ),
    root: Path | None = typer.Option(
        None, "--root",
        help="Dataset root (GOPRO_Large; the RealBlur folder holding RealBlur_J_test_list.txt)."
    ),
    blur: Path | None = typer.Option(
        None, "--blur",
        help="Folder of blurry images (searched recursively)."
    ),
    sharp: Path | None = typer.Option(
        None, "--sharp",
        help="Folder of ground-truth images, same relative names as --blur. Without it only "
             "no-reference metrics run."
    ),
    pred: Path | None = typer.Option(
        None, "--pred",
        help="Score existing outputs in this folder (paired by relative path or unique name)."
    ),
    weights: Path | None = typer.Option(
        None, "--weights",
        help="Run the model in this model folder and score its outputs."
    ),
    gamma: str | None = typer.Option(
        None, "--gamma",
        help="γ value(s) for --weights, comma-separated, e.g. 1,0.9,0.8,0.7,0.6 (default 0.7)."
    ),
    metrics: str | None = typer.Option(
        None, "--metrics",
        help="Comma-separated metrics (default: psnr,ssim,lpips,dists with ground truth, else "
             "niqe,musiq,clipiqa,maniqa)."
    ),
    list_metrics: bool = typer.Option(
        False, "--list-metrics",
        help="List the metrics, their direction and whether their weights are present, then exit."
    ),
    metric_weights: Path | None = typer.Option(
        None, "--metric-weights",
        help="Folder searched first for metric weights (layout like $TORCH_HOME/hub: pyiqa/, "
             "checkpoints/, clip/)."
    ),
    fetch_metrics: str | None = typer.Option(
        None, "--fetch-metrics", metavar="NAMES",
        help="Fetch the weights of these metrics (comma-separated, or 'all') into the cache, "
             "checked by SHA-256, then exit."
    ),
    offline: bool = typer.Option(
        False, "--offline",
        help="Never fetch metric weights (as HF_HUB_OFFLINE=1): metrics without them are "
             "skipped."
    ),
    skip_missing: bool = typer.Option(
        False, "--skip-missing", hidden=True,
        help="No effect (metrics without weights are always skipped); kept for old scripts."
    ),
    y_channel: bool = typer.Option(
        False, "--y-channel",
        help="PSNR/SSIM on the Y channel of YCbCr instead of RGB."
    ),
    align: bool = typer.Option(
        False, "--align",
        help="Align each image to its ground truth first (intensity matching + integer translation"
             " search; RealBlur protocol, simplified)."
    ),
    max_shift: int = typer.Option(
        10, "--max-shift",
        help="Largest shift in pixels searched by --align."
    ),
    include_input: bool = typer.Option(
        True, "--input/--no-input",
        help="Also score the blurry input (the baseline row)."
    ),
    limit: int | None = typer.Option(
        None, "--limit",
        help="Evaluate only the first N images (in key order)."
    ),
    device: str = typer.Option(
        "auto", "--device",
        help="auto, cpu, cuda, cuda:N or mps (model and metrics)."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="Model precision: auto, fp32, fp16, bf16."),
    tile: int = typer.Option(
        DEFAULT_TILE, "--tile",
        help="Tile side in pixels for the model (multiple of 8; 0 = whole image)."
    ),
    tile_overlap: int = typer.Option(
        DEFAULT_OVERLAP, "--tile-overlap",
        help="Pixels shared by neighbouring tiles (at most --tile minus 8)."
    ),
    color_fix: float = typer.Option(
        0.0, "--color-fix", metavar="SIGMA",
        help="As deblur --color-fix: the input's lowest frequencies (Gaussian SIGMA px); 0 = off."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Tiles per model call (default: 1 on the CPU, 4 on a GPU, as deblur)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o",
        help="Write per_image.csv, summary.json and (γ sweep) gamma_sweep.png here."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Score deblurring with the paper's metrics."""
    from deblurcli.evaluation.datasets import DATASET_CHOICES
    from deblurcli.evaluation.metrics import parse_metric_names

    from deblurcli.evaluation.fetch import offline_requested

    offline = offline_requested(offline)
    if list_metrics:
        _list_metrics(metric_weights)
        return
    if fetch_metrics is not None:
        if offline:
            raise typer.BadParameter("cannot fetch offline (--offline or HF_HUB_OFFLINE=1)",
                                     param_hint="--fetch-metrics")
        _fetch_metrics(fetch_metrics, metric_weights)
        return
    if dataset is not None and dataset.lower() not in DATASET_CHOICES:
        raise typer.BadParameter(f"choose from {', '.join(DATASET_CHOICES)}",
                                 param_hint="--dataset")
    try:
        names = tuple(parse_metric_names(metrics)) if metrics is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--metrics") from None
    check_device(device)
    dtype = dtype_option(dtype)
    if gamma is not None and weights is None:
        raise typer.BadParameter("--gamma needs --weights DIR (the model to run)",
                                 param_hint="--gamma")
    if pred is not None and weights is not None:
        raise typer.BadParameter("give either --pred or --weights, not both", param_hint="--pred")
    check_tiling(tile, tile_overlap)
    check_color_fix(color_fix)
    for hint, value in (("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"must be >= 1, got {value}", param_hint=hint)
    if max_shift < 0:
        raise typer.BadParameter(f"must be >= 0, got {max_shift}", param_hint="--max-shift")

    from deblurcli.cli.console import rich_progress, stderr_console, stdout_console, warn
    from deblurcli.evaluation.datasets import build_set
    from deblurcli.evaluation.report import results_table, write_outputs
    from deblurcli.evaluation.runner import EvalConfig, ModelConfig, run_evaluation

    from rich.markup import escape

    err = stderr_console()
    eval_set = build_set(dataset.lower() if dataset else None, root, blur, sharp)
    model = None
    if weights is not None:
        model = ModelConfig(weights=weights, gammas=parse_gammas(gamma or "0.7"), dtype=dtype,
                            tile=tile, overlap=tile_overlap, batch_size=batch_size,
                            color_fix=color_fix)
    config = EvalConfig(metrics=names, device=device, y_channel=y_channel, align=align,
                        max_shift=max_shift, metric_weights=metric_weights,
                        offline=offline, pred=pred, model=model,
                        include_input=include_input, limit=limit)
    with rich_progress(err, unit="img", enabled=not quiet) as progress:
        result = run_evaluation(eval_set, config, progress=progress,
                                warn=lambda msg: warn(err, escape(msg)),
                                note=lambda msg: err.print(msg, highlight=False, markup=False))
    con = stdout_console()
    con.print(results_table(result))
    if out is not None:
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items()}
        command = shlex.join(["deblurcli", *sys.argv[1:]]) if sys.argv else None
        for path in write_outputs(out, result, command=command, args=args):
            con.print(f"wrote {path}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to the root app."""
    app.command("eval", help=HELP, no_args_is_help=True)(evaluate)
