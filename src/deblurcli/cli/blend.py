"""``deblurcli blend``: bake a gamma-blend of the two adapters into one file or one model folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from deblurcli.errors import DeblurcliError

HELP = """Blend the 'real' and 'synthetic' LoRA adapters with weight GAMMA, exactly.

The result equals running the model with --gamma G; every adapted layer computes
W x + G * Delta_real x + (1 - G) * Delta_synthetic x.

\b
Without --fuse: write ONE diffusers LoRA file (rank r_real + r_synthetic).
With --fuse: write a model folder whose UNet already contains the blend
(no LoRA layers, fastest inference; its gamma is fixed).
An existing output is replaced only with --force; an input never is.

\b
Examples:
  deblurcli blend lora_real.safetensors lora_synthetic.safetensors \\
      --gamma 0.7 -o blend.safetensors
  deblurcli blend --weights model/ --gamma 0.7 -o blend.safetensors
  deblurcli blend --fuse --weights model/ --gamma 0.7 -o model-g0.7/
"""


def register(app: typer.Typer) -> None:
    """Add the ``blend`` command to ``app``."""

    @app.command("blend", help=HELP, no_args_is_help=True,
                 short_help="Blend the two LoRA adapters with weight GAMMA.")
    def blend(
        gamma: Annotated[float, typer.Option(
            "--gamma", help="Weight of the real adapter, in [0, 1].")],
        output: Annotated[Path, typer.Option(
            "--output", "-o", help="Output adapter file, or output model folder with --fuse.")],
        lora_real: Annotated[Path | None, typer.Argument(
            metavar="LORA_REAL", help="The 'real' adapter file (lora_real.safetensors).",
            show_default=False)] = None,
        lora_synthetic: Annotated[Path | None, typer.Argument(
            metavar="LORA_SYNTH", help="The 'synthetic' adapter file (lora_synthetic.safetensors).",
            show_default=False)] = None,
        fuse: Annotated[bool, typer.Option(
            "--fuse", help="Write a model folder with the blend merged into the UNet.")] = False,
        weights: Annotated[Path | None, typer.Option(
            "--weights", "-w", help="Model folder to take the adapters (or model) from.")] = None,
        fp16: Annotated[bool, typer.Option("--fp16", help="Store the output in float16.")] = False,
        force: Annotated[bool, typer.Option(
            "--force", help="Replace an existing output file or model folder.")] = False,
    ) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise typer.BadParameter(f"must be between 0 and 1, got {gamma}", param_hint="--gamma")
        gamma += 0.0  # -0 is 0
        if fuse:
            _fuse(lora_real, lora_synthetic, gamma, output, weights, fp16, force)
        else:
            _blend_files(lora_real, lora_synthetic, gamma, output, weights, fp16, force)


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also through links
    except OSError:
        return False


def _fuse(lora_real: Path | None, lora_synthetic: Path | None, gamma: float, output: Path,
          weights: Path | None, fp16: bool, force: bool) -> None:
    if lora_real is not None or lora_synthetic is not None:
        raise typer.BadParameter("--fuse takes a model folder (--weights DIR), not adapter files")
    if output.exists() and not output.is_dir():
        raise DeblurcliError(f"{output} exists and is not a folder")

    import torch

    from deblurcli.cli.console import stdout_console
    from deblurcli.modelfolder import check_apart, default_weights_dir, fuse_model_folder

    src = weights if weights is not None else default_weights_dir()
    check_apart(src, output)  # before the --force question: never a choice
    if output.is_dir() and any(output.iterdir()) and not force:
        raise DeblurcliError(f"{output} exists and is not empty; pass --force to replace it")
    fuse_model_folder(src, output, gamma, storage_dtype=torch.float16 if fp16 else None)
    stdout_console().print(f"wrote fused model folder {output} (gamma={gamma:g})", highlight=False)


def _folder_adapters(weights: Path) -> tuple[Path, Path]:
    """The real and synthetic adapter files of model folder ``weights``, checked as a run
    checks them (its checksums; one line for a training run or a fused folder), or of a folder
    that holds just the two files."""
    from deblurcli.errors import WeightsError
    from deblurcli.modelindex import INDEX_FILE, RECORD_KEY, read_model_index, verify_checksums
    from deblurcli.modelfolder import lora_file

    alone = weights / lora_file("real"), weights / lora_file("synthetic")
    if not (weights / INDEX_FILE).is_file() and all(path.is_file() for path in alone):
        return alone
    record = read_model_index(weights)[RECORD_KEY]
    if record.get("fused_gamma") is not None:
        raise WeightsError(f"{weights} has its adapters fused already "
                           f"(gamma={float(record['fused_gamma']):g}); blend an unfused folder")
    adapters = record.get("adapters") or {}
    missing = [name for name in ("real", "synthetic") if name not in adapters]
    if missing:
        raise WeightsError(f"{weights} has no {missing[0]} adapter to blend")
    verify_checksums(weights)
    return weights / adapters["real"], weights / adapters["synthetic"]


def _is_blend_file(path: Path) -> bool:
    """Whether ``path`` is an adapter file written by ``blend`` (its header read, nothing
    else)."""
    from safetensors import safe_open

    from deblurcli.models.adapters import BLEND_METADATA_KEY

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return BLEND_METADATA_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        return False


def _blend_files(lora_real: Path | None, lora_synthetic: Path | None, gamma: float,
                 output: Path, weights: Path | None, fp16: bool, force: bool) -> None:
    if lora_real is None and weights is not None:
        lora_real, lora_synthetic = _folder_adapters(weights)
    elif lora_real is None or lora_synthetic is None:
        raise typer.BadParameter("give two adapter files (LORA_REAL LORA_SYNTH) or --weights DIR")
    elif weights is not None:
        raise typer.BadParameter("give either adapter files or --weights DIR, not both")
    elif _same_file(lora_real, lora_synthetic):
        raise typer.BadParameter(f"{lora_real} is given as both adapters; give the real one, "
                                 "then the synthetic one")
    if output.is_dir():
        raise DeblurcliError(f"{output} is a folder; give a .safetensors file name "
                             "(or use --fuse to write a model folder)")
    if weights is not None and output.exists() and _is_within(output, weights):
        raise DeblurcliError(f"{output} is a file of {weights}, which is blended; give another "
                             "file name")
    if output.exists():
        from deblurcli.models.adapters import check_not_a_source

        check_not_a_source(output, lora_real, lora_synthetic)  # before the --force question
        if not force:
            raise DeblurcliError(f"{output} exists; pass --force to replace it")
        if not _is_blend_file(output):  # a model's adapter, a checkpoint, a photo: never
            raise DeblurcliError(f"{output} exists and is not a blend file (of deblurcli "
                                 "blend), which is all --force replaces; give another file name")

    from deblurcli.cli.console import stdout_console
    from deblurcli.models.adapters import blend_adapter_files

    spec = blend_adapter_files(lora_real, lora_synthetic, gamma, output, fp16=fp16)
    stdout_console().print(f"wrote {output} (gamma={gamma:g}, rank {spec.rank}, "
                           f"{len(spec.target_modules)} layers)", highlight=False)
