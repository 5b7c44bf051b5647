"""``deblurcli deblur``: deblur one photo or a folder of photos into an output folder."""

from __future__ import annotations

import os

from pathlib import Path
from typing import Annotated, Optional

import typer

from deblurcli.cli.options import (BatchSize, ColorFix, Tile, TileOverlap, VaeFp32,
                                   check_color_fix, check_device, check_tiling, dtype_option)
from deblurcli.images import DEFAULT_MAX_PIXELS
from deblurcli.tiles import DEFAULT_TILE

DEFAULT_GAMMA = 0.7  # the paper's γ between fidelity (1) and perceptual detail (0)

HELP = """Remove motion blur from a photo, a video or a folder of both.

INPUT is an image or video file or a folder; OUTPUT is always a folder
(created if missing). Outputs keep the input's relative path, name, alpha,
grey-ness and 16-bit depth (PNG/TIFF). Videos (.mp4 .mov .mkv .webm .avi
.m4v; needs pip install 'deblurcli[video]') are deblurred frame by frame
and keep their container, frame timing, size, rotation and audio (copied).
Existing outputs are skipped unless --overwrite; inputs are never
overwritten. Large frames are processed in overlapping, smoothly blended
tiles (--tile).

No model ships with deblurcli yet: give --weights MODEL_DIR, a model
folder written by train-diffusion (or blend --fuse); see docs/training.md.

\b
Examples:
  deblurcli deblur photo.jpg out/ --weights MODEL_DIR
  deblurcli deblur photos/ out/ --weights MODEL_DIR --gamma 1.0 --recursive
  deblurcli deblur clip.mp4 out/ --weights MODEL_DIR --crf 18
  deblurcli deblur photos/ out/ --weights MODEL_DIR --tile 768 --dtype fp16
  deblurcli deblur photos/ out/ -w MODEL_DIR --device cuda:1 --shard 1/2
"""

# --ext spellings accepted besides batch.EXT_CHOICES, and the format each one means
EXT_ALIASES = {"jpeg": "jpg", "tiff": "tif", "heif": "heic"}



def deblur(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT",
                                               help="An image or video file, or a folder.")],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT",
                                           help="Output folder (created if missing).")],
    gamma: Annotated[Optional[float], typer.Option(
        "--gamma", show_default=str(DEFAULT_GAMMA),
        help="Dual-adapter blend in [0, 1]: 1 = the 'real' adapter only, "
        "0 = the 'synthetic' adapter only (a fused model keeps its own).")] = None,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", metavar="MODEL", help="Model folder (model_index.json + safetensors) "
        "from train-diffusion, export or blend --fuse, or a Hugging Face hub id (cached; fetched "
        "once unless HF_HUB_OFFLINE=1). Needed: no default model ships yet.")]
    = None,
    lora: Annotated[Optional[Path], typer.Option(
        "--lora", metavar="FILE", help="Adapter file written by 'deblurcli blend' (e.g. "
        "blend.safetensors): run it instead of the --weights folder's own adapters (its gamma "
        "is fixed).")] = None,
    color_fix: ColorFix = 0.0,
    no_fuse: Annotated[bool, typer.Option(
        "--no-fuse", help="Keep the LoRA adapters unfused (slower; for debugging).")] = False,
    tile: Tile = DEFAULT_TILE,
    tile_overlap: TileOverlap = None,
    batch_size: BatchSize = None,
    device: Annotated[str, typer.Option(
        "--device", help="auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, then CPU).")]
    = "auto",
    dtype: Annotated[str, typer.Option(
        "--dtype", help="auto | fp32 | fp16 | bf16 (auto: bf16/fp16 on GPU, fp32 on CPU).")]
    = "auto",
    fp32: Annotated[bool, typer.Option("--fp32", help="Same as --dtype fp32.")] = False,
    vae_fp32: VaeFp32 = None,
    threads: Annotated[int, typer.Option(
        "--threads", min=0, help="CPU threads (0 = $OMP_NUM_THREADS if set, else all usable "
        "cores).")] = 0,
    backend: Annotated[str, typer.Option(
        "--backend", help="auto | torch | onnx. onnx: ONNX Runtime on the CPU (the onnx extra; "
        "float32, fused, tiles up to 512 px; the model is exported once and cached beside it). "
        "auto: onnx where it can run, else torch.")] = "auto",
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="Compile the network with torch.compile (slow first image; may "
        "speed up large batches on a GPU; needs a C++ compiler on the CPU).")] = False,
    suffix: Annotated[str, typer.Option(
        "--suffix", help="Added to output file names (photo.jpg -> photo{suffix}.jpg).")] = "",
    ext: Annotated[str, typer.Option(
        "--ext", help="Photo output format: auto (same as input) | png | jpg (jpeg) | webp | "
        "tif (tiff) | avif | heic (heif). Videos keep their container (see --codec).")] = "auto",
    quality: Annotated[int, typer.Option(
        "--quality", min=1, max=100, help="JPEG/WebP/AVIF/HEIC photo quality (videos: "
        "--crf).")] = 95,
    strip_metadata: Annotated[bool, typer.Option(
        "--strip-metadata", help="Write outputs without the input's metadata (kept by "
        "default: a photo's EXIF with date, camera and GPS, XMP, print resolution; a video's "
        "tags: title, creation time, location, ...). Colour profiles and tags stay.")] = False,
    crf: Annotated[int, typer.Option(
        "--crf", help="Video quality: constant rate factor, lower is better (0-51 for "
        "x264/x265, 0-63 for VP9/AV1, 4-63 for VP8; MPEG-4 and MJPEG take crf/6 as their quantiser).")] = 18,
    codec: Annotated[str, typer.Option(
        "--codec", help="Video encoder: auto (libx264 if PyAV has it; VP9 for .webm) or an "
        "FFmpeg encoder name such as libx265, libvpx-vp9, mpeg4.")] = "auto",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace existing outputs (inputs are never replaced).")] = False,
    recursive: Annotated[bool, typer.Option(
        "--recursive", "-r", help="Include sub-folders and mirror them in OUTPUT.")] = False,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="Process only part i/n of the files (0-based: 0/2 and 1/2 split a "
        "folder between two GPUs or machines; a file's part comes from its path, so added "
        "files do not move the others).")] = None,
    max_pixels: Annotated[int, typer.Option(
        "--max-pixels", metavar="N", min=1, help="Largest input image (width x height) to decode; "
        "larger files fail with a message (a guard against decompression bombs).")]
    = DEFAULT_MAX_PIXELS,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", "-n", help="List what would be written, skipped or fail, and stop: no "
        "model is loaded, nothing is written.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No progress bars (notes, warnings and the summary stay).")]
    = False,
) -> None:
    """Remove motion blur from a photo or a folder of photos."""
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise typer.BadParameter(f"must be in [0, 1], got {gamma}", param_hint="--gamma")
    if gamma is not None:
        gamma += 0.0  # -0 is 0: printed and keyed as 0
    from deblurcli.onnx_backend import BACKENDS

    if backend not in BACKENDS:
        raise typer.BadParameter(f"use one of {', '.join(BACKENDS)}; got {backend!r}",
                                 param_hint="--backend")
    check_color_fix(color_fix)
    tile_overlap = check_tiling(tile, tile_overlap)
    _check_video_options(codec, crf)
    from deblurcli.batch import EXT_CHOICES

    given, ext = ext, ext.lower().removeprefix(".")  # '.png' as users often write it
    ext = EXT_ALIASES.get(ext, ext)
    if ext not in EXT_CHOICES:
        raise typer.BadParameter(f"use one of {', '.join(EXT_CHOICES)} (or jpeg, tiff, heif); "
                                 f"got {given!r}", param_hint="--ext")
    if ext in ("avif", "heic"):  # before the model runs, not at each photo's write
        from deblurcli.images import pillow_plugin

        missing = pillow_plugin("heif" if ext == "heic" else "avif", write=True)
        if missing:
            raise typer.BadParameter(f"cannot write {ext}: {missing}", param_hint="--ext")
    if "/" in suffix or "\\" in suffix:
        raise typer.BadParameter("must not contain a path separator", param_hint="--suffix")
    dtype_name = dtype_option(dtype, fp32)

    from deblurcli.batch import BatchOptions, parse_shard

    shard_spec = None
    if shard is not None:
        try:
            shard_spec = parse_shard(shard)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--shard") from None
    check_device(device)

    options = BatchOptions(suffix=suffix, ext=ext, overwrite=overwrite,
                           recursive=recursive, shard=shard_spec, quality=quality,
                           max_pixels=max_pixels, codec=codec, crf=crf,
                           metadata=not strip_metadata)
    if lora is not None and not lora.is_file():  # a bad path: exit 1, as a missing --weights
        from deblurcli.errors import DeblurcliError

        raise DeblurcliError(f"--lora {lora}: no such adapter file")
    from deblurcli.batch import INPUT_SUFFIXES

    if output.suffix.lower() in INPUT_SUFFIXES and not output.exists() and \
            os.environ.get("RANK", "0") == "0":  # (one note under a launcher)
        from rich.markup import escape

        from deblurcli.cli.console import stderr_console, warn

        warn(stderr_console(), escape(f"{output} will be a folder (OUTPUT always is one); the "
                                      "outputs keep their inputs' names inside it"))
    if dry_run:
        return _dry_run(input_path, output, options, weights)
    _run(input_path, output, options, gamma=gamma, weights=weights, lora=lora,
         fuse=not no_fuse, tile=tile, overlap=tile_overlap, batch_size=batch_size,
         device_name=device, dtype_name=dtype_name, vae_fp32=vae_fp32, threads=threads,
         compile_model=compile_model, color_fix=color_fix, backend=backend, quiet=quiet)


def _dry_run(input_path: Path, output: Path, options, weights: Optional[Path] = None) -> None:
    """``--dry-run``: the plan of a run, a line per file on stdout, checked as a run checks it
    (the input guard, the codecs, the model named), then a count; nothing is loaded or
    written."""
    from deblurcli.batch import check_output_folder, needs_processing, plan_jobs
    from deblurcli.cli.console import stderr_console, stdout_console, warn

    err, out = stderr_console(), stdout_console()
    if os.environ.get("RANK", "0") != "0":  # under a launcher: one plan, the first process's
        err, out = _quiet_console(), _quiet_console()
    jobs = plan_jobs(input_path, output, options,
                     on_unread=lambda paths: warn(err, unread_line(paths)))
    _check_auto_codec_crf(jobs, options)
    if any(needs_processing(job, options) for job in jobs):
        check_output_folder(output)  # a read-only OUTPUT would stop the run: it stops this too
        fetch = _check_model_named(weights)  # as would a missing or foreign model folder
        if fetch:
            warn(err, fetch)
    counts = {"write": 0, "skip": 0, "fail": 0}
    for job in jobs:
        if job.problem:
            kind, line = "fail", f"fail   {job.source}: {job.problem}"
        elif needs_processing(job, options):
            kind, line = "write", f"write  {job.target}  (from {job.source})"
        else:
            kind, line = "skip", f"skip   {job.target}  (exists; --overwrite replaces it)"
        counts[kind] += 1
        out.print(_one_line(line), highlight=False, markup=False, soft_wrap=True)
    out.print(f"dry run: would process {counts['write']}, skip {counts['skip']}, fail "
              f"{counts['fail']}; nothing was written", highlight=False, markup=False)
    if counts["fail"]:
        raise typer.Exit(1)  # as the run would end


def _one_line(text: str) -> str:
    """``text`` on one line, as the dry run prints each file: the line breaks and other control
    characters of a name, and bytes that are no UTF-8, written as escapes (``\\n``,
    ``\\udce9``); any other character, a space or an emoji's joiner, as it is."""
    import unicodedata

    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") else c
                   for c in text)


def _check_model_named(weights: Optional[Path]) -> Optional[str]:
    """For ``--dry-run``: that the model a run would load is there and a deblurcli model
    (its index read, nothing loaded; WeightsError as the run would stop), or, for a hub id
    not in the local cache, a note that the run would fetch it."""
    from deblurcli.errors import WeightsError
    from deblurcli.modelindex import (default_weights_dir, is_hub_id, offline_requested,
                                      read_model_index, resolve_model)

    try:
        folder = resolve_model(weights if weights is not None else default_weights_dir(),
                               offline=True)
    except WeightsError:
        if weights is None or not is_hub_id(weights) or offline_requested():
            raise
        return f"the run would fetch {weights} from the Hugging Face hub"
    read_model_index(folder)
    return None


def _run(input_path: Path, output: Path, options, *, gamma: Optional[float],
         weights: Optional[Path],
         fuse: bool, tile: int, overlap: int,
         lora: Optional[Path] = None,
         batch_size: Optional[int],
         device_name: str, dtype_name: str, vae_fp32: Optional[bool], threads: int,
         compile_model: bool = False, color_fix: float = 0.0, backend: str = "auto",
         quiet: bool = False) -> None:
    from rich.markup import escape

    from deblurcli.batch import check_output_folder, needs_processing, plan_jobs, run_jobs
    from deblurcli.cli.console import rich_progress, stderr_console, stdout_console, warn

    err, out = stderr_console(), stdout_console()
    # under `accelerate launch` / torchrun: this process's share of the files (deblurcli.distributed)
    group = _process_group(device_name)
    if group is not None and not group.is_main:
        out = _quiet_console()  # one summary, the main process's

    def unread(paths) -> None:
        if group is None or group.is_main:
            warn(err, escape(unread_line(paths)))

    # input problems surface before model loading
    jobs = plan_jobs(input_path, output, options, on_unread=unread)
    _check_auto_codec_crf(jobs, options)
    # what is left to do, decided by every process before any of them writes (one that
    # decided late saw the others' outputs and ended, while they waited for it forever)
    pending = any(needs_processing(job, options) for job in jobs)
    if group is not None:
        group.wait()
    if not jobs:  # a shard of a short list
        where = f"shard {options.shard[0]}/{options.shard[1]}" if options.shard else "it"
        out.print(f"processed 0, skipped 0, failed 0: {where} holds no file of {input_path}",
                  highlight=False, markup=False)
        return
    if not pending:
        if any(job.problem for job in jobs):  # unreadable entries to report; no model needed
            if group is not None and not group.is_main:
                group.wait()  # exit after the main process reported (a launcher stops the rest)
                raise typer.Exit(1)  # it reports them, once
            try:
                return _report(out, run_jobs(jobs, _no_model, options), len(jobs), output)
            finally:
                if group is not None:
                    group.wait()
        out.print(f"processed 0, skipped {len(jobs)}, failed 0: every output already exists in "
                  f"{output} (use --overwrite to redo them)", highlight=False, markup=False)
        return
    check_output_folder(output)  # a read-only OUTPUT stops the run here, before the model loads
    from deblurcli.device import default_cpu_threads
    from deblurcli.distributed import cpu_threads_share, deblur_video_split, split_jobs
    from deblurcli.modelindex import default_weights_dir, resolve_model
    from deblurcli.pipeline import DeblurPipeline, default_batch_size

    if gamma is None:  # not given: a fused model runs at its own γ, without a note
        gamma = _unasked_gamma(weights, lora)
    cached = _cached_onnx_runner(
        weights, group=group, backend=backend, device_name=device_name, dtype_name=dtype_name,
        gamma=gamma, fuse=fuse, lora=lora, tile=tile, compile_model=compile_model,
        threads=threads or cpu_threads_share(group) or default_cpu_threads(),
        warn=lambda m: warn(err, escape(m)))
    if cached is not None:  # no torch in this process
        (runner, held), backend_name, device, dtype, vae_dtype = cached, "onnx", "cpu", None, None
        dtype_text = "float32"
    else:
        from deblurcli.device import resolve_device, resolve_dtype, set_cpu_threads, vae_dtype_for

        device = (group.device if group is not None and device_name in ("auto", "cuda")
                  else resolve_device(device_name))
        dtype = resolve_dtype(dtype_name, device, warn=lambda m: warn(err, escape(m)))
        vae_dtype = vae_dtype_for(dtype, vae_fp32)
        dtype_text = str(dtype).replace("torch.", "")
        if device.type == "cpu" or threads:
            # 0: every core this process may use (sched_getaffinity), shared among launched
            # processes
            set_cpu_threads(threads or cpu_threads_share(group))
        folder = resolve_model(weights if weights is not None else default_weights_dir())
        runner, held, backend_name = _load_runner(
            folder, backend=backend, device=device, dtype=dtype, vae_dtype=vae_dtype,
            gamma=gamma, fuse=fuse, lora=lora, tile=tile, compile_model=compile_model,
            group=group, warn=lambda m: warn(err, escape(m)),
            note=lambda m: err.print(m, highlight=False, markup=False))
    # a fused model keeps its own γ (a note said so if --gamma differs): report that one
    # (a blend file is fused into the UNet too; a one-adapter model says "real adapter only")
    gamma_text = f"gamma={gamma:g}" if held is None else \
        f"gamma={held[0]:g} ({held[1] if held[1].endswith(' only') else 'fused'})"
    pipeline = DeblurPipeline(runner, device=device, dtype=vae_dtype or dtype, tile=tile,
                              overlap=overlap, channels_last=backend_name == "torch",
                              batch_size=batch_size or default_batch_size(device),
                              color_fix=color_fix)
    # under a launcher every process takes a part of each video, and a share of the other files
    all_jobs, (videos, jobs) = jobs, split_jobs(jobs, options, group)
    share = f" (process {group.index + 1}/{group.count})" if group is not None else ""
    unreadable = sum(bool(job.problem) for job in jobs)  # fail at once, each with its reason
    done = sum(not needs_processing(job, options) for job in jobs) - unreadable  # outputs exist
    aside = [f"{done} already done"] * bool(done) + \
        [f"{unreadable} failing, see below"] * bool(unreadable)  # unreadable, or in the way
    what = f"{len(jobs) - done - unreadable} file(s)" + (f" ({', '.join(aside)})" if aside else "")
    if videos:
        what = f"{len(videos)} video(s) split by frames among {group.count} processes" + \
            (f" and {what}" if jobs else "")
    err.print(f"deblurring {what}{share} on {device} ({dtype_text}"
              f"{', VAE float32' if vae_dtype is not None else ''}"
              f"{', ONNX Runtime' if backend_name == 'onnx' else ''}), {gamma_text}, "
              f"tile={tile or 'whole image'}"
              f"{f', colour fix sigma={color_fix:g}' if color_fix else ''}", highlight=False)
    if (group is None or group.is_main) and options.ext.lower() in ("jpg", "jpeg") and any(
            job.source.suffix.lower() in _ALPHA_SUFFIXES and needs_processing(job, options)
            for job in jobs):  # once, before the files: JPEG has no alpha channel
        warn(err, "--ext jpg: JPEG cannot store transparency; photos with an alpha channel "
                  "lose it (their transparent areas show the colour under them)")

    def on_result(result) -> None:
        if result.status == "failed":
            warn(err, escape(failure_line(result)))

    # without a terminal (a log, CI) rich_progress prints a plain line every ~10 s instead
    with rich_progress(err, labels={"images": "images", "frames": "frames", "tiles": "tiles"},
                       unit={"images": "img", "frames": "frame", "tiles": "tile"},
                       enabled=not quiet and (group is None or group.is_main)) as progress:
        split = []
        for job in videos:  # the same result on every process: the main one prints it
            split.append(deblur_video_split(group, job, pipeline, options, progress=progress))
            if group.is_main:
                on_result(split[-1])
        summary = run_jobs(jobs, pipeline, options, progress=progress, on_result=on_result) \
            if jobs or not videos else None
    if group is not None:  # every process's results, for one summary; the same exit status
        from deblurcli.batch import BatchSummary
        from deblurcli.distributed import gather_results

        mine = summary.results if summary is not None else []
        summary = BatchSummary(gather_results(group, mine, all_jobs, shared=tuple(split)))
        if not group.is_main:
            group.wait()  # exit only after the main process reported (a launcher stops the rest)
            if summary.failed:
                raise typer.Exit(1)
            return
        try:
            _report(out, summary, len(all_jobs), output)
        finally:
            group.wait()
        return
    _report(out, summary, len(all_jobs), output)


def _unasked_gamma(weights: Optional[Path], lora: Optional[Path]) -> float:
    """The γ of a run that names none: the model's fused γ (or its blend file's), else
    :data:`DEFAULT_GAMMA`. Reads only ``model_index.json``; a bad folder is reported later."""
    from deblurcli.modelindex import default_weights_dir, fixed_gamma, resolve_model

    try:
        # (a hub id is fetched here, once, as the loader would: its γ is known from the start)
        folder = resolve_model(weights if weights is not None else default_weights_dir())
        fixed = fixed_gamma(folder, lora)
    except Exception:  # noqa: BLE001 - the model loader says what is wrong, once
        return DEFAULT_GAMMA
    return DEFAULT_GAMMA if fixed is None else fixed


def _cached_onnx_runner(weights: Optional[Path], *, group, backend: str, device_name: str,
                        dtype_name: str, gamma: float, fuse: bool, lora: Optional[Path],
                        tile: int, compile_model: bool, threads: int, warn):
    """``(model, held γ (see held_gamma) or None)`` when this run can take an already exported ONNX model
    without importing torch (2 s of a one-photo run): one process, surely the CPU
    (:func:`deblurcli.device.surely_cpu`), float32, fused adapters of the folder itself and an
    export in the cache. None otherwise: :func:`_load_runner` then decides with torch.
    """
    from deblurcli import onnx_backend
    from deblurcli.device import surely_cpu
    from deblurcli.modelindex import default_weights_dir, gamma_ignored, held_gamma, resolve_model

    if group is not None or backend == "torch" or lora is not None or \
            dtype_name.strip().lower() not in ("auto", "fp32") or not surely_cpu(device_name) or \
            onnx_backend.unsupported(device_type="cpu", fp32=True, fuse=fuse,
                                     compile=compile_model, tile=tile) is not None:
        return None
    folder = resolve_model(weights if weights is not None else default_weights_dir())
    try:
        model = onnx_backend.cached(folder, gamma=gamma, threads=threads)
    except Exception:  # noqa: BLE001 - e.g. a damaged folder: the torch path reports it
        return None
    if model is None:
        return None
    held = held_gamma(folder)
    if held is not None and gamma_ignored(held, gamma):
        warn(gamma_ignored(held, gamma))
    return model, held


#: the formats that can hold an alpha channel (a --ext jpg run warns before such inputs)
_ALPHA_SUFFIXES = frozenset({".png", ".webp", ".tif", ".tiff", ".avif", ".heic", ".heif"})


def _load_runner(folder: Path, *, backend: str, device, dtype, vae_dtype, gamma: float,
                 fuse: bool, lora: Optional[Path], tile: int, compile_model: bool, warn, note,
                 group=None):
    """``(model callable, held γ (see held_gamma) or None, "torch" | "onnx")`` for this run.

    ``--backend auto`` takes ONNX Runtime where it can run (docs/performance.md), else torch;
    an explicit ``onnx`` that cannot run is an error of one line. Under a launcher (``group``)
    the main process exports first and the others then open its export, or see that it failed
    and run torch, so that the model is never exported by every process at once.
    """
    import torch

    from deblurcli import onnx_backend
    from deblurcli.cli.app import running_as_command
    from deblurcli.errors import DeblurcliError
    from deblurcli.modelfolder import gamma_ignored, held_gamma, load_model_folder
    from deblurcli.pipeline import prepare_model

    fp32 = dtype == torch.float32 and vae_dtype in (None, torch.float32)
    reason = onnx_backend.unsupported(device_type=device.type, fp32=fp32, fuse=fuse,
                                      compile=compile_model, tile=tile) \
        if backend != "torch" else "not asked for"
    if backend == "onnx" and reason is not None:
        raise DeblurcliError(f"--backend onnx cannot run here: {reason}")
    if backend == "auto" and reason is not None and device.type == "cpu" and \
            onnx_backend.available() and (group is None or group.is_main):
        note(f"running with PyTorch, not ONNX Runtime: {reason}")  # why the faster one is not

    def torch_model(run_dtype=dtype, run_vae_dtype=vae_dtype, warn=warn):
        if (fuse or lora is not None) and running_as_command():
            # no live adapters in this process: import only the diffusers modules it runs
            from deblurcli.models.runtime_imports import import_diffusers_for_inference

            import_diffusers_for_inference()
        return load_model_folder(folder, device=device, dtype=run_dtype, gamma=gamma, fuse=fuse,
                                 vae_dtype=run_vae_dtype, lora=lora, warn=warn)

    if reason is None:
        held = held_gamma(folder, lora)  # a bad folder or blend file fails here, as with torch
        if held is not None and gamma_ignored(held, gamma):
            warn(gamma_ignored(held, gamma))
        def load_onnx():
            return onnx_backend.load(folder, gamma=gamma, lora=lora,
                                     threads=torch.get_num_threads(),
                                     load_model=lambda: torch_model(torch.float32, None,
                                                                    warn=None),
                                     note=note, retry=backend == "onnx" and (
                                         group is None or group.is_main))

        try:
            if group is None:
                runner = load_onnx()
            elif group.is_main:
                try:
                    runner = load_onnx()
                finally:
                    group.wait()  # the export is in the cache (or its failure noted)
            else:
                group.wait()
                runner = load_onnx()
            return runner, held, "onnx"
        except DeblurcliError:
            raise
        except Exception as exc:  # noqa: BLE001 - the exporter's and ONNX Runtime's many kinds
            why = f"the ONNX export failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})" \
                if not isinstance(exc, onnx_backend.ExportFailedBefore) else \
                f"not using ONNX Runtime for this model: {exc}"
            if backend == "onnx":
                raise DeblurcliError(f"--backend onnx: {why}") from None
            note(f"{why}; running with PyTorch")
            model = torch_model(warn=None)  # the γ note, if any, is out already
            return prepare_model(model, channels_last=True, compile=compile_model), held, "torch"
    model = torch_model()
    return prepare_model(model, channels_last=True, compile=compile_model), \
        held_gamma(folder, lora), "torch"


def _process_group(device_name: str):
    """The launched process group (``accelerate launch``, torchrun), or None for one process."""
    from deblurcli.distributed import launched_processes, process_group

    if launched_processes() <= 1:
        return None
    import torch

    return process_group(cpu=device_name == "cpu" or (device_name == "auto"
                                                     and not torch.cuda.is_available()))


def failure_line(result) -> str:
    """``failed: PATH: reason``, without the path a second time where the reason starts with
    it (``cannot read PATH: ...``)."""
    source, error = str(result.job.source), str(result.error)
    prefix = f"cannot read {source}: "
    if error.startswith(prefix):
        error = "cannot read it: " + error[len(prefix):]
    return f"failed: {source}: {error}"


def unread_line(paths) -> str:
    """One line on the files of an input folder in formats deblur does not read."""
    from collections import Counter

    from deblurcli.batch import convert_advice

    counts = Counter(path.suffix.lower() for path in paths)
    kinds = ", ".join(f"{suffix} ({n})" for suffix, n in sorted(counts.items()))
    return (f"passing over {len(paths)} file(s) in formats deblurcli does not read: {kinds}; "
            f"{convert_advice(counts)} to deblur them")


def _quiet_console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def _check_video_options(codec: str, crf: int) -> None:
    """``--crf`` in 0..63 (0..51 for the x264/x265 family); ``--codec`` an encoder PyAV has
    (checked only when one is named and PyAV is installed, so that photo runs need no PyAV)."""
    if not 0 <= crf <= 63:
        raise typer.BadParameter(f"must be in 0..63, got {crf}", param_hint="--crf")
    if codec == "auto":
        return
    from deblurcli.errors import DeblurcliError
    from deblurcli.video import available_codecs, check_crf, has_encoder

    try:
        known = has_encoder(codec)
    except DeblurcliError:  # no PyAV: the photos need none; each video fails alone, saying so
        return
    if not known:
        raise typer.BadParameter(f"this PyAV build has no video encoder {codec!r}; use auto or "
                                 f"one of {', '.join(available_codecs())}", param_hint="--codec")
    try:
        check_crf(codec, crf)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--crf "), param_hint="--crf") from None


def _check_auto_codec_crf(jobs, options) -> None:
    """Each video's encoder checked before the model loads (exit 2, as for a bad ``--codec``):
    a named one against each video's container (no x264 in WebM), the one ``--codec auto``
    picks against ``--crf``. Without PyAV nothing is checked here: each video then fails alone,
    saying how to install it."""
    from deblurcli.video import is_video

    suffixes = {job.target.suffix.lower() for job in jobs
                if not job.problem and is_video(job.source)}
    if not suffixes:
        return
    from deblurcli.errors import DeblurcliError
    from deblurcli.video import check_container, check_crf, choose_codec

    for suffix in sorted(suffixes):
        try:
            codec = choose_codec(options.codec, suffix)
        except DeblurcliError:
            return
        try:
            check_container(codec, suffix)
        except DeblurcliError as exc:
            raise typer.BadParameter(str(exc), param_hint="--codec") from None
        if options.codec != "auto":
            continue
        try:
            check_crf(codec, options.crf)
        except ValueError as exc:
            raise typer.BadParameter(f"{str(exc).removeprefix('--crf ')} (the encoder --codec "
                                     f"auto picks for {suffix})", param_hint="--crf") from None


def _no_model(pixels, progress=None):
    raise RuntimeError("no job was meant to be processed")  # pragma: no cover - a planning bug


def _report(out, summary, total: int, output: Path) -> None:
    """Print the run's summary and every failure; raise (exit 1) if any job failed."""
    from deblurcli.errors import DeblurcliError

    from deblurcli.video import is_video

    videos = sum(r.status == "done" and r.frames > 0 for r in summary.results)
    rates = [f"mean {summary.mean_seconds:.2f} s/image"] \
        if summary.count("done") > videos else []  # photos were deblurred
    if summary.frames:
        rates.append(f"{summary.frames} video frame(s), {summary.seconds_per_frame:.2f} s/frame")
    where = f"output in {output}" if output.is_dir() else \
        f"nothing written ({output} was not created)"  # every file failed before its output
    out.print(f"processed {summary.count('done')}, skipped {summary.count('skipped')}, "
              f"failed {summary.count('failed')}; {''.join(r + '; ' for r in rates)}"
              f"{where}", highlight=False, markup=False)
    if summary.failed:
        for result in summary.failed:
            out.print(failure_line(result), highlight=False,
                      markup=False)
        kinds = {is_video(r.job.source) for r in summary.results} or {False}
        noun = "file(s)" if len(kinds) > 1 else "video(s)" if kinds == {True} else "image(s)"
        raise DeblurcliError(f"{len(summary.failed)} of {total} {noun} failed")


def register(app: typer.Typer) -> None:
    """Add the ``deblur`` command to ``app``."""
    app.command("deblur", help=HELP,
                short_help="Remove motion blur from photos, videos, folders.")(deblur)
