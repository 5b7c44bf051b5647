"""``deblurcli eval``: score deblurring with the paper's metrics (pyiqa), optionally over γ."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from deblurcli.cli import options as opt
from deblurcli.cli.options import check_color_fix, check_device, check_tiling, dtype_option
from deblurcli.tiles import DEFAULT_TILE

DEFAULT_GAMMA = "0.7"

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
  deblurcli eval --fetch-metrics lpips,dists    # fetch their weights, exit
  deblurcli eval --dataset gopro --root GOPRO_Large --pred results/gopro \\
      --out eval/gopro
  deblurcli eval --dataset realblur-j --root RealBlur --pred rbj/ --align
  deblurcli eval --dataset gopro --root GOPRO_Large --weights model/ \\
      --gamma 1,0.9,0.8,0.7,0.6 --out eval/sweep --device cuda
  deblurcli eval --blur pairs/blur --sharp pairs/sharp --metrics psnr,ssim
  deblurcli eval --blur photos/ --metrics niqe,musiq     # no reference
"""


def parse_gammas(text: str) -> tuple[float, ...]:
    """``"1,0.9"`` -> ``(1.0, 0.9)``; every value must be in [0, 1] (raises ``BadParameter``)."""
    values: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part) + 0.0  # -0 is 0
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
    from deblurcli.evaluation.metrics import fetch_command, pyiqa_installed

    missing_lines, missing_names = [], []
    for info in list_metrics(metric_weights):
        table.add_row(info.name, info.kind, info.arrow, "yes" if info.needs_weights else "no",
                      "yes" if info.available else "no", info.description)
        missing_lines += [f"  {info.name}: {m}" for m in info.missing]
        missing_names += [info.name] if info.missing else []
    con = stdout_console()
    con.print(table)
    if not pyiqa_installed():
        con.print("no metric can run: pyiqa is not installed (pip install 'deblurcli[eval]')",
                  highlight=False, markup=False)
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
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Official test set layout: gopro, realblur-j, realblur-r, synth "
        "(ROOT/blur + ROOT/sharp).")] = None,
    root: Annotated[Optional[Path], typer.Option(
        "--root", help="Dataset root (GOPRO_Large; the RealBlur folder holding "
        "RealBlur_J_test_list.txt).")] = None,
    blur: Annotated[Optional[Path], typer.Option(
        "--blur", help="Folder of blurry images (searched recursively).")] = None,
    sharp: Annotated[Optional[Path], typer.Option(
        "--sharp", help="Folder of ground-truth images, same relative names as --blur. Without "
        "it only no-reference metrics run.")] = None,
    pred: Annotated[Optional[Path], typer.Option(
        "--pred", help="Score existing outputs in this folder (paired by relative path or unique "
        "name).")] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="Run the model in this model folder and score its outputs.")] = None,
    gamma: Annotated[Optional[str], typer.Option(
        "--gamma", help="γ value(s) for --weights, comma-separated, e.g. 1,0.9,0.8,0.7,0.6.",
        show_default=DEFAULT_GAMMA)] = None,
    metrics: Annotated[Optional[str], typer.Option(
        "--metrics", help="Comma-separated metrics (default: psnr,ssim,lpips,dists with ground "
        "truth, else niqe,musiq,clipiqa,maniqa).")] = None,
    list_metrics: Annotated[bool, typer.Option(
        "--list-metrics", help="List the metrics, their direction and whether their weights are "
        "present, then exit.")] = False,
    metric_weights: Annotated[Optional[Path], typer.Option(
        "--metric-weights", help="Folder searched first for metric weights (layout like "
        "$TORCH_HOME/hub: pyiqa/, checkpoints/, clip/).")] = None,
    fetch_metrics: Annotated[Optional[str], typer.Option(
        "--fetch-metrics", metavar="NAMES", help="Fetch the weights of these metrics "
        "(comma-separated, or 'all') into the cache, checked by SHA-256, then exit.")] = None,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Never fetch metric weights (as HF_HUB_OFFLINE=1): metrics without "
        "them are skipped.")] = False,
    skip_missing: Annotated[bool, typer.Option(
        "--skip-missing", hidden=True,
        help="No effect (metrics without weights are always skipped); kept for old scripts.")]
    = False,
    y_channel: Annotated[bool, typer.Option(
        "--y-channel", help="PSNR/SSIM on the Y channel of YCbCr instead of RGB.")] = False,
    align: Annotated[bool, typer.Option(
        "--align", help="Align each image to its ground truth first (intensity matching + "
        "integer translation search; RealBlur protocol, simplified).")] = False,
    max_shift: Annotated[int, typer.Option(
        "--max-shift", min=0, help="Largest shift in pixels searched by --align.")] = 10,
    include_input: Annotated[bool, typer.Option(
        "--input/--no-input", help="Also score the blurry input (the baseline row).")] = True,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1,
        help="Evaluate only the first N images (in key order; RealBlur: list order).")] = None,
    device: opt.Device = "auto",
    dtype: opt.Dtype = "auto",
    vae_fp32: opt.VaeFp32 = None,
    tile: opt.Tile = DEFAULT_TILE,
    tile_overlap: opt.TileOverlap = None,
    color_fix: opt.ColorFix = 0.0,
    batch_size: opt.BatchSize = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write per_image.csv, summary.json and (γ sweep) gamma_sweep.png "
        "here.")] = None,
    quiet: opt.Quiet = False,
) -> None:
    """Score deblurring with the paper's metrics."""
    from deblurcli.evaluation.datasets import DATASET_CHOICES
    from deblurcli.evaluation.metrics import parse_metric_names

    from deblurcli.modelindex import offline_requested

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
    tile_overlap = check_tiling(tile, tile_overlap)
    check_color_fix(color_fix)

    from deblurcli.cli.console import rich_progress, stderr_console, stdout_console, warn
    from deblurcli.evaluation.datasets import build_set
    from deblurcli.evaluation.report import (check_not_inputs, check_out_dir, results_table,
                                             write_outputs)
    from deblurcli.evaluation.runner import EvalConfig, ModelConfig, run_evaluation

    from rich.markup import escape

    if out is not None:
        check_out_dir(out)
    err = stderr_console()
    eval_set = build_set(dataset.lower() if dataset else None, root, blur, sharp)
    if out is not None:
        check_not_inputs(out, _scored_files(eval_set, pred))
    model = None
    if weights is not None:
        model = ModelConfig(weights=weights, gammas=parse_gammas(gamma or DEFAULT_GAMMA), dtype=dtype,
                            vae_fp32=vae_fp32, tile=tile, overlap=tile_overlap,
                            batch_size=batch_size, color_fix=color_fix,
                            gamma_given=gamma is not None)
    config = EvalConfig(metrics=names, device=device, y_channel=y_channel, align=align,
                        max_shift=max_shift, metric_weights=metric_weights,
                        offline=offline, pred=pred, model=model,
                        include_input=include_input, limit=limit)
    with rich_progress(err, unit="img", enabled=not quiet) as progress:
        result = run_evaluation(eval_set, config, progress=progress,
                                warn=lambda msg: warn(err, escape(msg)),
                                note=lambda msg: err.print(msg, highlight=False, markup=False),
                                keep_partial=True)
    con = stdout_console()
    if result.stopped is not None:  # what was scored is reported, then the exit says stopped
        missed = f"; not reached: {', '.join(result.unreached)}" if result.unreached else ""
        err.print(f"stopped: the rows are compared over the first {result.n_images} of "
                  f"{result.n_planned} image(s), which each of them scored{missed}",
                  highlight=False, markup=False)
    con.print(results_table(result))
    if out is not None:
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items()}
        command = shlex.join(["deblurcli", *sys.argv[1:]]) if sys.argv else None
        for path in write_outputs(out, result, command=command, args=args):
            con.print(f"wrote {path}", highlight=False, markup=False)
    if result.stopped is not None:
        raise result.stopped


def _scored_files(eval_set, pred: Optional[Path]) -> list[Path]:
    """The image files an evaluation reads (those of ``--pred`` it can match)."""
    from deblurcli.errors import DeblurcliError
    from deblurcli.evaluation.datasets import match_predictions

    files = [path for pair in eval_set.pairs for path in (pair.blur, pair.sharp)
             if path is not None]
    if pred is not None:
        try:
            files += match_predictions(eval_set, pred)
        except DeblurcliError:  # (the evaluation says what is wrong with them)
            pass
    return files


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to the root app."""
    app.command("eval", help=HELP, no_args_is_help=True,
                short_help="Score results: PSNR, SSIM, LPIPS, DISTS, NIQE, MUSIQ.")(evaluate)
