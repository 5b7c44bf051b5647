"""Run an evaluation: score the blurry input, existing outputs (``--pred``) or the model over γ.

Rows of a result:

* ``input``      -- the blurry images themselves (the baseline every method must beat);
* ``pred``       -- images in a ``--pred`` folder, paired to the test set by relative path/name;
* ``gamma=<γ>``  -- the model from ``--weights`` run at each γ. The folder is read from disk once
  (adapters unfused, float32); for each γ a copy is fused at that γ in float32 and then cast --
  the steps ``load_model_folder(..., gamma=γ, fuse=True)`` takes -- so no γ leaks into the next
  and each row equals ``deblurcli deblur --gamma γ``.

Timing (model seconds per image, synchronised on CUDA) and memory (peak process RSS, peak CUDA
memory allocated per row) are recorded with the scores.

An evaluation stopped by Ctrl-C (or SIGTERM), or by an image it cannot read partway through,
can keep what it scored (``keep_partial``): the rows
are compared over the first images that every row with any score reached, so that their means
are of the same images; a row's later scores are kept aside (:attr:`RowResult.unmatched`).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deblurcli.errors import DatasetError, DeblurcliError, WeightsError
from deblurcli.evaluation.align import align_to_reference
from deblurcli.evaluation.datasets import EvalSet, match_predictions
from deblurcli.evaluation.metrics import (
    DEFAULT_FR_METRICS,
    DEFAULT_NR_METRICS,
    METRICS,
    Metric,
    Summary,
    create_metrics,
    summarise,
)
from deblurcli.progress import ProgressFn, report
from deblurcli.tiles import DEFAULT_OVERLAP, DEFAULT_TILE

DEBLUR_QUALITY = 95  # deblur's --quality default: the model rows are scored as it writes them

WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class ModelConfig:
    """How to run the model (the same knobs as ``deblurcli deblur``)."""

    weights: Path
    gammas: tuple[float, ...]
    dtype: str = "auto"
    vae_fp32: bool | None = None  # None: fp32 under an fp16 UNet (device.vae_dtype_for)
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int | None = None  # None: pipeline.default_batch_size(device), as in deblur
    color_fix: float = 0.0  # Gaussian sigma (px) of deblur --color-fix; 0 = off
    gamma_given: bool = True  # False: the default γ, that a fixed-γ model runs without a note


@dataclass(frozen=True)
class EvalConfig:
    """Everything an evaluation needs besides the test set."""

    metrics: tuple[str, ...] | None = None     # None: FR defaults with GT, NR defaults without
    device: str = "auto"
    y_channel: bool = False
    align: bool = False
    max_shift: int = 10
    metric_weights: Path | None = None
    offline: bool = False  # True: never fetch metric weights (skip the metrics missing them)
    pred: Path | None = None
    model: ModelConfig | None = None
    include_input: bool = True
    limit: int | None = None


@dataclass
class ImageScore:
    """Scores of one image in one row."""

    key: str
    scores: dict[str, float]
    model_seconds: float | None = None
    shift: tuple[int, int] | None = None
    at_edge: bool = False  # the shift lies on the search's bound (the true one may be beyond)


@dataclass
class RowResult:
    """One row of the results table (input, pred, or one γ)."""

    label: str
    gamma: float | None
    images: list[ImageScore] = field(default_factory=list)
    # an interrupted evaluation: the images this row scored beyond those every row scored (in
    # the per-image CSV, out of the summary)
    unmatched: list[ImageScore] = field(default_factory=list)
    summary: dict[str, Summary] = field(default_factory=dict)
    model_seconds_per_image: float | None = None
    score_seconds_per_image: float | None = None
    load_seconds: float | None = None
    precision: str | None = None  # the model's rows: "bfloat16", "float16, eVAE float32", ...
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None


@dataclass
class EvalResult:
    """A whole evaluation."""

    dataset: str
    n_images: int
    metrics: list[str]
    device: str
    rows: list[RowResult]
    aligned: bool = False
    y_channel: bool = False
    # set when Ctrl-C, SIGTERM or an error (an unreadable image) stopped it (``keep_partial``):
    # the interrupt or error, to be raised again once the partial result is reported;
    # ``n_images`` then counts the images compared and ``n_planned`` those it was to score
    stopped: KeyboardInterrupt | DeblurcliError | None = None
    n_planned: int | None = None
    unreached: list[str] = field(default_factory=list)  # the rows it stopped before
    skipped_metrics: dict[str, str] = field(default_factory=dict)  # asked for, not run: why


def choose_metrics(requested: Sequence[str] | None, has_reference: bool) -> list[str]:
    """The metric list: as requested (FR ones need ground truth) or the defaults for the set."""
    if requested is None:
        return list(DEFAULT_FR_METRICS if has_reference else DEFAULT_NR_METRICS)
    names = list(requested)
    fr = [n for n in names if METRICS[n].full_reference]
    if fr and not has_reference:
        raise DatasetError(f"full-reference metric(s) {', '.join(fr)} need ground-truth images; "
                           f"give --sharp DIR or --dataset, or choose no-reference metrics "
                           f"({', '.join(DEFAULT_NR_METRICS)})")
    return names


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (``None`` where unknown: Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _read(path: Path) -> np.ndarray:
    from deblurcli.images import read_image

    return read_image(path).pixels


def score_image(metrics: Sequence[Metric], pred: np.ndarray, ref: np.ndarray | None, *,
                align: bool = False, max_shift: int = 10, key: str = "",
                failures: dict[str, list[tuple[str, str]]] | None = None) -> ImageScore:
    """Score one image with every metric (aligning it to ``ref`` first when asked).

    With ``failures``, a metric that cannot score this image (NIQE on an image smaller than its
    96-pixel blocks, say) gives ``nan``, left out of its mean, and ``(key, reason)`` is added to
    ``failures[metric name]``; without it, the metric's error is raised."""
    shift, at_edge = None, False
    fr_pred, fr_ref = pred, ref
    if ref is not None:
        if pred.shape != ref.shape:
            raise DatasetError(f"{key}: the image scored is {pred.shape[1]}x{pred.shape[0]} but "
                               f"its ground truth is {ref.shape[1]}x{ref.shape[0]}")
        if align and any(m.spec.full_reference for m in metrics):
            aligned = align_to_reference(pred, ref, max_shift)
            fr_pred, fr_ref, shift = aligned.pred, aligned.ref, (aligned.dy, aligned.dx)
            at_edge = 0 < aligned.radius <= max(abs(aligned.dy), abs(aligned.dx))
    # full-reference metrics see the aligned pair; no-reference ones the image as it is
    scores = {}
    for m in metrics:
        try:
            scores[m.name] = m(fr_pred, fr_ref) if m.spec.full_reference else m(pred)
        except (ValueError, RuntimeError) as exc:  # pyiqa's errors on images it cannot score
            if failures is None or type(exc).__name__ == "OutOfMemoryError" or \
                    "out of memory" in str(exc).lower():  # memory is not the image's fault
                raise
            failures.setdefault(m.name, []).append(
                (key, " ".join(str(exc).split()) or type(exc).__name__))
            scores[m.name] = float("nan")
    return ImageScore(key=key, scores=scores, shift=shift, at_edge=at_edge)


def _finish_row(row: RowResult, names: Sequence[str], score_seconds: float, device,
                failures: dict[str, list[tuple[str, str]]], warn: WarnFn | None,
                max_shift: int | None = None) -> RowResult:
    for name, failed in failures.items():
        if warn is not None:
            key, reason = failed[0]
            warn(f"{name} could not score {len(failed)} of {len(row.images)} image(s) of "
                 f"{row.label} (e.g. {key}: {reason}); they are left out of its mean")
    at_limit = [im for im in row.images if im.at_edge]
    if at_limit and warn is not None:  # the best shift may lie beyond the search
        first = at_limit[0]
        warn(f"the alignment of {len(at_limit)} of {len(row.images)} image(s) of {row.label} "
             f"stopped at the edge of its search (--max-shift {max_shift}, less for an image "
             f"under {2 * (max_shift or 0)} px; e.g. {first.key}: dy={first.shift[0]}, "
             f"dx={first.shift[1]}); their true shift may be larger")
    for name in names:  # scores a metric gave as nan without an error: left out as well
        quiet = sum(1 for im in row.images if math.isnan(im.scores[name])) - \
            len(failures.get(name, ()))
        if quiet > 0 and warn is not None:
            warn(f"{name} gave no score (nan) for {quiet} of {len(row.images)} image(s) of "
                 f"{row.label}; they are left out of its mean")
    row.summary = {n: summarise([im.scores[n] for im in row.images]) for n in names}
    count = max(len(row.images), 1)
    row.score_seconds_per_image = score_seconds / count
    times = [im.model_seconds for im in row.images if im.model_seconds is not None]
    row.model_seconds_per_image = float(np.mean(times)) if times else None
    row.peak_rss_mb = peak_rss_mb()
    row.cuda_peak_mb = _cuda_peak_mb(device)
    return row


def _cuda_peak_mb(device) -> float | None:
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _reset_cuda_peak(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def _score_files(rows: list[RowResult], label: str, eval_set: EvalSet, sources: Sequence[Path],
                 metrics: Sequence[Metric], config: EvalConfig, device,
                 progress: ProgressFn | None, warn: WarnFn | None = None) -> None:
    """Score the files ``sources`` (one per pair) as the row ``label``, appended to ``rows``.
    An interrupt finishes the row with the images scored so far and is raised again."""
    row = RowResult(label=label, gamma=None)
    rows.append(row)
    failures: dict[str, list[tuple[str, str]]] = {}
    _reset_cuda_peak(device)
    total = len(eval_set.pairs)
    report(progress, label, 0, total)
    elapsed = 0.0
    try:
        for i, (pair, src) in enumerate(zip(eval_set.pairs, sources, strict=True)):
            pred = _read(src)
            ref = _read(pair.sharp) if pair.sharp is not None else None
            start = time.perf_counter()
            row.images.append(score_image(metrics, pred, ref, align=config.align,
                                          max_shift=config.max_shift, key=pair.key,
                                          failures=failures))
            elapsed += time.perf_counter() - start
            report(progress, label, i + 1, total)
    except (KeyboardInterrupt, DeblurcliError):  # (an image that cannot be read, say)
        _finish_row(row, [m.name for m in metrics], elapsed, device, failures, warn,
                    max_shift=config.max_shift)
        raise
    _finish_row(row, [m.name for m in metrics], elapsed, device, failures, warn,
                max_shift=config.max_shift)


def _model_for_gammas(mc: ModelConfig, device, dtype, warn: WarnFn | None, vae_dtype=None):
    """Yield ``(gamma, model, load_seconds)`` for each γ, reading the folder from disk once.

    The folder is loaded unfused in float32 on the CPU; each γ fuses a copy in float32 and then
    moves it to ``device``/``dtype`` with ``modelfolder.ready_model``, which is how
    ``load_model_folder(..., gamma=γ, fuse=True)`` ends, so the outputs equal ``deblurcli deblur``'s.
    """
    import torch

    from deblurcli.modelfolder import gamma_ignored, load_model_folder, model_held_gamma, \
        ready_model

    start = time.perf_counter()
    base = load_model_folder(mc.weights, device="cpu", dtype=torch.float32, gamma=mc.gammas[0],
                             fuse=False)  # a fused model's γ note comes below, if it runs
    base_seconds = time.perf_counter() - start
    gammas = mc.gammas
    if base.fused_gamma is not None or not base.has_dual_adapters:
        held = model_held_gamma(base)  # fused, or one adapter: the γ it runs as
        check_sweep(mc.weights, gammas, base.fused_gamma, dual=False,
                    adapters=tuple(base.lora_specs))
        note = gamma_ignored(held, gammas[0]) if held is not None and mc.gamma_given else None
        if note and warn is not None:
            warn(note)
        gammas = (held[0] if held is not None else gammas[0],)
    for index, gamma in enumerate(gammas):
        start = time.perf_counter()
        last = index == len(gammas) - 1
        model = base if last else copy.deepcopy(base)  # the last γ may consume the base model
        ready_model(model, gamma=gamma, fuse=True, device=device, dtype=dtype,
                    vae_dtype=vae_dtype)
        seconds = time.perf_counter() - start + (base_seconds if index == 0 else 0.0)
        yield gamma, model, seconds
        del model


def check_sweep(weights, gammas: Sequence[float], fused_gamma: float | None, *,
                dual: bool, adapters: Sequence[str] = ()) -> None:
    """Refuse a sweep of several γ over a model without two live adapters to blend."""
    if len(gammas) > 1 and (fused_gamma is not None or not dual):
        state = f"they are fused at gamma={fused_gamma:g}" if fused_gamma is not None else \
            f"it has only its {adapters[0]} adapter" if len(adapters) == 1 else "it has none"
        raise WeightsError(f"{weights} has no real and synthetic adapters to blend ({state}); "
                           "a gamma sweep needs a model folder with both, unfused")


def as_deblur_writes(output: np.ndarray, image, path: Path) -> np.ndarray:
    """``output``, the model's result for ``image`` (:class:`~deblurcli.images.ImageData`, read
    from ``path``), as ``deblurcli deblur`` writes it and a scorer reads it back: in the format
    the file's suffix names (deblur's ``--ext auto``) at deblur's default quality, grey for a
    grey input, at its bit depth where the format keeps it, with its alpha. A lossless format
    gives the quantised pixels without a round trip through an encoder (the same values)."""
    import tempfile

    from deblurcli.images import as_stored, encode_image, format_of, read_image

    fmt = format_of(path) or image.format
    if fmt in ("png", "tiff", "bmp"):
        return as_stored(fmt, output, grayscale=image.grayscale, bit_depth=image.bit_depth)
    data = encode_image(fmt, output, alpha=image.alpha, grayscale=image.grayscale,
                        bit_depth=image.bit_depth, quality=DEBLUR_QUALITY,
                        lossless=image.lossless)
    with tempfile.TemporaryDirectory(prefix="deblurcli-eval-") as folder:
        written = Path(folder) / "output"
        written.write_bytes(data)
        return read_image(written).pixels


def _model_rows(rows: list[RowResult], eval_set: EvalSet, metrics: Sequence[Metric],
                config: EvalConfig, device, progress: ProgressFn | None,
                warn: WarnFn | None) -> None:
    """Run the model at each γ and score its outputs, a row each appended to ``rows``. An
    interrupt finishes the row at work with the images scored so far and is raised again."""
    from deblurcli.device import resolve_dtype, vae_dtype_for
    from deblurcli.images import fill_transparent, read_image
    from deblurcli.pipeline import DeblurPipeline, default_batch_size, prepare_model

    mc = config.model
    assert mc is not None
    dtype = resolve_dtype(mc.dtype, device, warn=warn)
    vae_dtype = vae_dtype_for(dtype, mc.vae_fp32)  # as deblur's: fp32 under an fp16 UNet
    precision = str(dtype).removeprefix("torch.") + \
        (f", eVAE {str(vae_dtype).removeprefix('torch.')}" if vae_dtype is not None else "")
    for gamma, model, load_seconds in _model_for_gammas(mc, device, dtype, warn, vae_dtype):
        label = f"gamma={gamma:g}"
        pipe = DeblurPipeline(prepare_model(model), device=device, dtype=vae_dtype or dtype,
                              tile=mc.tile,
                              overlap=mc.overlap,
                              batch_size=mc.batch_size or default_batch_size(device),
                              color_fix=mc.color_fix)
        row = RowResult(label=label, gamma=gamma, load_seconds=load_seconds, precision=precision)
        rows.append(row)
        failures: dict[str, list[tuple[str, str]]] = {}
        _reset_cuda_peak(device)
        total = len(eval_set.pairs)
        report(progress, label, 0, total)
        scoring = 0.0
        try:
            for i, pair in enumerate(eval_set.pairs):
                image = read_image(pair.blur)
                blurry = fill_transparent(image.pixels, image.alpha)  # as deblur does
                _sync(device)
                t0 = time.perf_counter()
                output = pipe(blurry)
                _sync(device)
                model_seconds = time.perf_counter() - t0
                output = as_deblur_writes(np.asarray(output, dtype=np.float32), image, pair.blur)
                ref = _read(pair.sharp) if pair.sharp is not None else None
                t1 = time.perf_counter()
                score = score_image(metrics, output, ref,
                                    align=config.align, max_shift=config.max_shift,
                                    key=pair.key, failures=failures)
                scoring += time.perf_counter() - t1
                score.model_seconds = model_seconds
                row.images.append(score)
                report(progress, label, i + 1, total)
        except (KeyboardInterrupt, DeblurcliError):
            _finish_row(row, [m.name for m in metrics], scoring, device, failures, warn,
                        max_shift=config.max_shift)
            raise
        _finish_row(row, [m.name for m in metrics], scoring, device, failures, warn,
                    max_shift=config.max_shift)
        del pipe, model


def check_sizes(eval_set: EvalSet, pred_files: Sequence[Path] | None = None, *,
                blurry: bool = True) -> None:
    """Refuse a pair whose images to be scored (the ``blurry`` ones, as they are or through the
    model; ``pred_files``) differ in size from its ground truth, or cannot be read, from the
    files' headers: found at the start, not after an hour of scoring."""
    from deblurcli.images import image_size

    for i, pair in enumerate(eval_set.pairs):
        sizes = {"blurry image": image_size(pair.blur)} if blurry else {}
        if pair.sharp is not None:
            sizes["ground truth"] = image_size(pair.sharp)
        if pred_files is not None:
            sizes["prediction"] = image_size(pred_files[i])
        # without a ground truth each image is scored alone (no-reference metrics): any size
        if pair.sharp is not None and len(set(sizes.values())) > 1:
            said = ", ".join(f"its {name} {w}x{h}" for name, (h, w) in sizes.items())
            raise DatasetError(f"{pair.key}: the images of this pair differ in size ({said})")


def run_evaluation(eval_set: EvalSet, config: EvalConfig, *,
                   progress: ProgressFn | None = None,
                   warn: WarnFn | None = None, note: WarnFn | None = None,
                   keep_partial: bool = False) -> EvalResult:
    """Score the input, ``config.pred`` and/or the model over ``config.model.gammas``.

    Metric weights missing from the caches are fetched once (:mod:`.fetch`) unless
    ``config.offline``; a metric that still lacks them is skipped with one ``warn`` line, and
    ``note`` hears of each fetch.

    With ``keep_partial``, a Ctrl-C or SIGTERM (``KeyboardInterrupt``) or a
    :class:`~deblurcli.errors.DeblurcliError` (an image that cannot be read, found partway)
    after the first image of an asked-for row (``pred``, a γ; ``input`` when it is the only one)
    was scored returns what was scored (:func:`_partial`), with the interrupt or error in
    :attr:`EvalResult.stopped` for the caller to raise once it has reported it; without it, or
    before such a score (the baseline alone says nothing of the model), it propagates.
    """
    from deblurcli.device import resolve_device

    if config.pred is not None and config.model is not None:
        raise DeblurcliError("give either --pred DIR (score existing outputs) or --weights DIR "
                             "(run the model), not both")
    if config.limit is not None:
        eval_set = EvalSet(eval_set.name, eval_set.pairs[: max(config.limit, 0)])
    if not eval_set.pairs:
        raise DatasetError("no images to evaluate")
    names = choose_metrics(config.metrics, eval_set.has_reference)
    device = resolve_device(config.device)
    pred_files = None
    if config.pred is not None:  # pair before any slow work, so mistakes surface at once
        pred_files = match_predictions(
            eval_set, config.pred,
            on_extra=(lambda extra: warn(f"{len(extra)} file(s) in {config.pred} match no test "
                                         f"image and are ignored (e.g. {extra[0]})"))
            if warn is not None and config.limit is None else None)
    if config.model is not None:  # fail on a bad model folder before scoring anything
        from deblurcli.modelfolder import read_model_index, resolve_model
        from deblurcli.modelindex import RECORD_KEY

        record = read_model_index(resolve_model(config.model.weights,
                                                offline=config.offline))[RECORD_KEY]
        check_sweep(config.model.weights, config.model.gammas, record.get("fused_gamma"),
                    dual=all(name in (record.get("adapters") or {})
                             for name in ("real", "synthetic")),
                    adapters=tuple(record.get("adapters") or {}))
    scores_blurry = config.include_input or config.model is not None or pred_files is None
    check_sizes(eval_set, pred_files, blurry=scores_blurry)  # before any slow work
    from deblurcli.evaluation import fetch

    skipped: dict[str, str] = {}
    metrics = create_metrics(names, device=device, y_channel=config.y_channel,
                             weights_dir=config.metric_weights,
                             fetcher=None if config.offline else fetch.fetch_file,
                             warn=warn, note=note, skipped_reasons=skipped)
    rows: list[RowResult] = []
    result = EvalResult(dataset=eval_set.name, n_images=len(eval_set.pairs),
                        metrics=[m.name for m in metrics], device=str(device), rows=rows,
                        aligned=config.align, y_channel=config.y_channel,
                        skipped_metrics=skipped)
    try:
        if config.include_input or (pred_files is None and config.model is None):
            _score_files(rows, "input", eval_set, [p.blur for p in eval_set.pairs], metrics,
                         config, device, progress, warn)
        if pred_files is not None:
            _score_files(rows, "pred", eval_set, pred_files, metrics, config, device, progress,
                         warn)
        if config.model is not None:
            _model_rows(rows, eval_set, metrics, config, device, progress, warn)
    except (KeyboardInterrupt, DeblurcliError) as exc:
        baseline_only = pred_files is None and config.model is None
        asked = [row for row in rows if baseline_only or row.label != "input"]
        if not keep_partial or not any(row.images for row in asked):
            raise
        ran = sum(row.gamma is not None for row in rows if row.images)  # γ rows run in order
        result.unreached = \
            (["pred"] if pred_files is not None and not any(r.label == "pred" and r.images
                                                               for r in rows)
             else []) + \
            ([f"gamma={g:g}" for g in config.model.gammas[ran:]] if config.model else [])
        _partial(result, exc)
    return result


def _partial(result: EvalResult, stopped: KeyboardInterrupt | DeblurcliError) -> None:
    """Make ``result`` the report of an evaluation that ``stopped`` interrupted.

    Rows without a score are dropped; the others are compared over the first ``k`` images,
    ``k`` the fewest any of them scored (every row scores the pairs in the same order), so that
    each mean is of the same images. A row's scores past ``k`` move to ``unmatched``."""
    result.rows[:] = [row for row in result.rows if row.images]
    k = min(len(row.images) for row in result.rows)
    for row in result.rows:
        row.images, row.unmatched = row.images[:k], row.images[k:]
        row.summary = {n: summarise([im.scores[n] for im in row.images])
                       for n in result.metrics}
        times = [im.model_seconds for im in row.images if im.model_seconds is not None]
        row.model_seconds_per_image = float(np.mean(times)) if times else None
    result.n_planned, result.n_images, result.stopped = result.n_images, k, stopped
