"""``deblurcli synth``: make blurred/sharp training pairs from photos or video frames."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deblurcli.cli.options import Quiet

HELP = """Make synthetic blurred/sharp training pairs.

Images mode (--src) blurs crops of sharp photos with random
camera-shake kernels (Boracchi & Foi); frames mode (--frames) averages
consecutive video frames in linear light (GoPro-style): a folder of
frames, a folder of sequence folders and/or video files, or one
high-frame-rate video file (videos need pip install 'deblurcli[video]').
Output:
OUT/blur/NAME.png, OUT/sharp/NAME.png, OUT/kernels/NAME.npy (images
mode) and OUT/manifest.jsonl. The same arguments give byte-identical
files whatever --workers; re-running resumes.

\b
Examples:
  deblurcli synth --src photos/ --out pairs/ --workers 2
  deblurcli synth --src DF2K --out df2k/ --per-crop 2 --limit 10000
  deblurcli synth --frames videos/ --out gopro_like/ --crop 512
  deblurcli synth --frames clip240fps.mp4 --out my_pairs/ --crop 512
"""


def synth(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output folder (blur/, sharp/, kernels/, manifest.jsonl)."
        ),
    ],
    src: Annotated[
        str | None,
        typer.Option(
            "--src",
            help="Folder of sharp photos (searched recursively); a bare name such as DF2K is "
            "looked up in the working directory, then in $DEBLURCLI_DATA.",
        ),
    ] = None,
    frames: Annotated[
        str | None,
        typer.Option(
            "--frames",
            help="Folder of consecutive video frames, a folder of sequence folders or video "
            "files, or one high-frame-rate video file (frames mode).",
        ),
    ] = None,
    crop: Annotated[
        int | None,
        typer.Option(
            "--crop",
            min=8,
            help="Crop side in pixels, a multiple of 8 (images mode default 512; "
            "frames mode default: whole frames).",
        ),
    ] = None,
    stride: Annotated[
        int, typer.Option("--stride", min=1, help="Step between crops (images mode).")
    ] = 384,
    per_crop: Annotated[
        int,
        typer.Option(
            "--per-crop", min=1, help="Differently blurred samples per crop (images mode)."
        ),
    ] = 1,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Run seed; every sample's randomness derives from it.")
    ] = 0,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", "-j", min=1, help="Worker processes (the output does not depend on it)."
        ),
    ] = 1,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            help="Make at most this many pairs (the first ones in manifest order).",
        ),
    ] = None,
    n_min: Annotated[
        int,
        typer.Option(
            "--n-min",
            min=1,
            help="Fewest frames averaged per pair (frames mode; odd counts are used).",
        ),
    ] = 7,
    n_max: Annotated[
        int, typer.Option("--n-max", help="Most frames averaged per pair (frames mode).")
    ] = 13,
    frame_step: Annotated[
        int | None,
        typer.Option(
            "--frame-step",
            min=1,
            help="Frames between the starts of consecutive windows (frames mode; default --n-max).",
        ),
    ] = None,
    max_kernel: Annotated[
        int,
        typer.Option(
            "--max-kernel", min=3, help="Largest blur-kernel side in pixels (odd; images mode)."
        ),
    ] = 65,
    noise: Annotated[
        bool,
        typer.Option(
            "--noise/--no-noise",
            help="Add random Gaussian/Poisson noise after blurring (images mode).",
        ),
    ] = True,
    jpeg_prob: Annotated[
        float,
        typer.Option(
            "--jpeg-prob",
            min=0.0,
            max=1.0,
            help="Probability of JPEG re-compression of a blurred image (images mode).",
        ),
    ] = 0.0,
    quiet: Quiet = False,
) -> None:
    """Make synthetic blurred/sharp training pairs."""
    if (src is None) == (frames is None):
        raise typer.BadParameter("give exactly one of --src (photos) or --frames (video frames)")
    if crop is not None and crop % 8:
        raise typer.BadParameter(f"must be a multiple of 8, got {crop}", param_hint="--crop")
    if n_max < n_min or not any(n % 2 for n in range(n_min, n_max + 1)):
        raise typer.BadParameter(
            f"--n-min..--n-max ({n_min}..{n_max}) must contain an odd number", param_hint="--n-max"
        )
    if max_kernel % 2 == 0:
        raise typer.BadParameter(f"must be odd, got {max_kernel}", param_hint="--max-kernel")

    from dataclasses import replace

    from deblurcli.cli.console import rich_progress, stderr_console, stdout_console, warn
    from deblurcli.synth.blur import NO_NOISE, BlurParams, NoiseRanges
    from deblurcli.synth.build import SynthConfig, resolve_source, run_synth

    err = stderr_console()
    noise_ranges = NoiseRanges() if noise else NO_NOISE
    blur = BlurParams(max_kernel=max_kernel, noise=replace(noise_ranges, jpeg_prob=jpeg_prob))
    if src is not None:
        cfg = SynthConfig(
            out=out,
            src=resolve_source(src),
            crop=crop or 512,
            stride=stride,
            per_crop=per_crop,
            seed=seed,
            workers=workers,
            limit=limit,
            blur=blur,
        )
    else:
        cfg = SynthConfig(
            out=out,
            frames=resolve_source(frames, videos=True),
            crop=crop,
            seed=seed,
            workers=workers,
            limit=limit,
            frame_range=(n_min, n_max),
            frame_step=frame_step,
        )
    try:
        with rich_progress(err, labels={"pairs": "pairs"}, unit="pairs",
                           enabled=not quiet) as progress:
            result = run_synth(cfg, progress=progress, warn=lambda msg: warn(err, msg))
    except KeyboardInterrupt:  # then "interrupted" (or "terminated") and exit 130 (143)
        kept = (Path(out) / "manifest.jsonl").is_file()  # removed when no pair was made
        err.print(f"the pairs finished so far are kept in {out}; the same command goes on "
                  "from there" if kept else
                  f"no pair was finished, so nothing is kept in {out}; the same command "
                  "starts again", highlight=False, markup=False)
        raise

    con = stdout_console()
    missing = result.planned - result.written - result.already_done
    lost = f", {missing} not written: their inputs are skipped below" if missing > 0 else ""
    con.print(
        f"synth ({result.mode} mode): wrote {result.written} pairs to {result.out} "
        f"({result.already_done} already done, {result.planned} planned{lost}) in "
        f"{result.seconds:.1f} s, {result.pairs_per_second:.2f} pairs/s",
        highlight=False,
        markup=False,
    )
    if result.unreadable:
        con.print(
            f"skipped {len(result.unreadable)} unreadable input(s):", highlight=False, markup=False
        )
        for line in result.unreadable:
            con.print(f"  {line}", highlight=False, markup=False)
    if result.too_small:
        con.print(
            f"skipped {len(result.too_small)} image(s) under 8 pixels:",
            highlight=False,
            markup=False,
        )
        for line in result.too_small:
            con.print(f"  {line}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command to the root app."""
    app.command("synth", help=HELP, no_args_is_help=True)(synth)
