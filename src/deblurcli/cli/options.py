"""Checks of the run options that ``deblur`` and ``eval`` share (device, precision, tiling).

One home for the rules, so both commands accept and reject the same values with the same words.
Each check raises ``typer.BadParameter`` (exit status 2) naming the flag.
"""

from __future__ import annotations

import typer


def check_tiling(tile: int, overlap: int) -> None:
    """``--tile``: 0 (whole image) or a positive multiple of 8; ``--tile-overlap``: 0 .. tile - 8."""
    if tile < 0 or tile % 8:
        raise typer.BadParameter(f"must be 0 or a positive multiple of 8, got {tile}",
                                 param_hint="--tile")
    if overlap < 0 or (tile and overlap > tile - 8):
        raise typer.BadParameter(f"must be >= 0 and at most --tile minus 8, got {overlap}",
                                 param_hint="--tile-overlap")


def check_device(device: str) -> None:
    """``--device``: auto, cpu, cuda, cuda:N or mps."""
    from deblurcli.device import check_device_name

    try:
        check_device_name(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None


def dtype_option(dtype: str, fp32: bool = False) -> str:
    """The normalised ``--dtype`` name (``--fp32`` is a synonym of ``--dtype fp32``)."""
    from deblurcli.device import DTYPE_CHOICES

    if fp32 and dtype.lower() not in ("auto", "fp32"):
        raise typer.BadParameter(f"--fp32 contradicts --dtype {dtype}", param_hint="--fp32")
    name = "fp32" if fp32 else dtype.lower()
    if name not in DTYPE_CHOICES:
        raise typer.BadParameter(f"use {', '.join(DTYPE_CHOICES)}; got {dtype!r}",
                                 param_hint="--dtype")
    return name


def check_color_fix(sigma: float) -> None:
    """``--color-fix``: 0 (off) or a positive, finite Gaussian sigma in pixels."""
    import math

    if not (math.isfinite(sigma) and sigma >= 0):
        raise typer.BadParameter(f"must be 0 (off) or a positive number of pixels, got {sigma}",
                                 param_hint="--color-fix")
