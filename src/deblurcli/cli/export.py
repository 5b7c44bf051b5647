"""``deblurcli export``: a model folder from a train-diffusion run, finished or still training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

HELP = (
    "Write a model folder from a train-diffusion run (RUN is its --output folder).\n\n"
    "By default the run's newest state: the newer of RUN/model and its newest checkpoint "
    "(RUN/model when both hold the same step), so a run can be evaluated while it trains. A "
    "checkpoint holds only the trained tensors; the rest is rebuilt from what the run started "
    "from: its --init, --evae or --base-model must still be where they were, and weights "
    "changed there since the run started are refused.\n\n"
    "The folder is for inference (no sharp encoder E2, no discriminator; float16) unless "
    "--keep-training-state keeps both, in float32, for train-diffusion --init to continue. "
    "MODEL appears whole or not at all; an existing model folder MODEL is replaced only with "
    "--force (any other non-empty folder never is). MODEL may not be, hold or lie inside RUN "
    "(nor the checkpoint, or the model a checkpoint is rebuilt from).\n\n"
    "\b\n"
    "Examples:\n"
    "  deblurcli export runs/lora_s -o models/lora_s\n"
    "  deblurcli export runs/lora_s -o models/lora_s-2000 --checkpoint 2000\n"
    "  deblurcli export runs/lora_s -o runs/lora_s-init --keep-training-state"
)


def export(
    run: Annotated[Path, typer.Argument(
        metavar="RUN", help="A train-diffusion output folder (its -o).", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The model folder to write.", show_default=False)],
    checkpoint: Annotated[Optional[str], typer.Option(
        "--checkpoint",
        help="'latest', a step number or a checkpoint folder (default: the newer of RUN/model "
             "and the newest checkpoint).", show_default=False)] = None,
    fp16: Annotated[Optional[bool], typer.Option(
        "--fp16/--fp32",
        help="Storage precision of the weights (default: fp16; fp32 with "
             "--keep-training-state).", show_default=False)] = None,
    keep_training_state: Annotated[bool, typer.Option(
        "--keep-training-state",
        help="Keep E2 and the latent discriminator (for train-diffusion --init).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing model folder at MODEL.")] = False,
) -> None:
    import torch

    from deblurcli.cli.console import stdout_console
    from deblurcli.train.export import export_run

    dtype = None if fp16 is None else (torch.float16 if fp16 else torch.float32)
    state = export_run(run, output, checkpoint=checkpoint, storage_dtype=dtype,
                       keep_training_state=keep_training_state, force=force)
    what = "with training state" if keep_training_state else "for inference"
    stdout_console().print(f"wrote {output} ({what}) from {state.path} (step {state.step})",
                           highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""
    app.command("export", help=HELP, no_args_is_help=True,
                short_help="Write a model folder from a training run.")(export)
