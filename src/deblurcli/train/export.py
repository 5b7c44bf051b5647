"""A model folder from a ``train-diffusion`` run: its final ``RUN/model`` or one of its checkpoints.

``deblurcli export RUN -o MODEL`` runs :func:`export_run`. A run writes ``RUN/model`` only when it
ends; until then its state is in ``RUN/checkpoints/step-*``, which hold only the tensors that
train. :func:`checkpoint_model` turns one into a model: it rebuilds the model the run started
from, with the settings the checkpoint saved (the preset and seed, ``--init``, ``--evae`` or
``--base-model``, which must still be where they were), and copies the trained tensors in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from deblurcli.errors import DeblurcliError
from deblurcli.train import checkpoint as ckpt
from deblurcli.train import sources

DIFFUSION_KIND = "DiffusionTrainConfig"


@dataclass(frozen=True)
class RunState:
    """One exportable state of a run: ``RUN/model`` or a checkpoint folder, at ``step`` (``-1``:
    not known before the folder is read)."""

    path: Path
    step: int
    is_checkpoint: bool


class CheckpointModel(NamedTuple):
    """A checkpoint read as a model (see :func:`checkpoint_model`)."""

    model: Any
    discriminator: dict[str, torch.Tensor] | None
    config: dict[str, Any]
    step: int


def _run_kind(run: Path) -> None:
    """Refuse anything but a ``train-diffusion`` output folder (DeblurcliError)."""
    if not run.exists():
        raise DeblurcliError(f"{run}: no such folder")
    if not run.is_dir():
        raise DeblurcliError(f"{run} is a file; give a train-diffusion output folder")
    try:
        kind = json.loads((run / "config.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError):
        raise DeblurcliError(f"{run} is not a train-diffusion output folder (no readable "
                             "config.json)") from None
    if kind == "VaeTrainConfig":
        raise DeblurcliError(f"{run} is a train-vae run: its model/ folder is already the eVAE "
                             "that train-diffusion --evae reads")
    if kind != DIFFUSION_KIND:
        raise DeblurcliError(f"{run} is not a train-diffusion output folder (config kind {kind!r})")


def choose_state(run: str | Path, checkpoint: str | None = None) -> RunState:
    """The state of ``run`` to export.

    ``checkpoint``: ``"latest"`` (the newest checkpoint), a step number or a checkpoint folder;
    by default the newer of ``RUN/model`` and the newest checkpoint (``RUN/model`` when both
    hold the same step: a finished run, or one that resumes and has not checkpointed since).

    Raises:
        DeblurcliError: not a train-diffusion run, or no such state.
    """
    run = Path(run)
    _run_kind(run)
    found = ckpt.list_checkpoints(run)
    if checkpoint is not None:
        if checkpoint == "latest":
            if not found:
                raise DeblurcliError(f"no checkpoint in {ckpt.checkpoint_root(run)}")
            return RunState(found[-1][1], found[-1][0], True)
        if checkpoint.isdigit():
            for step, path in found:
                if step == int(checkpoint):
                    return RunState(path, step, True)
            have = ", ".join(str(step) for step, _ in found) or "none"
            raise DeblurcliError(f"no checkpoint of step {checkpoint} in {run} (steps: {have})")
        path = Path(checkpoint)
        if not (path / "state.json").is_file() and \
                (ckpt.checkpoint_root(run) / checkpoint / "state.json").is_file():
            path = ckpt.checkpoint_root(run) / checkpoint  # a name: RUN/checkpoints/step-N
        if not (path / "state.json").is_file():
            raise DeblurcliError(f"--checkpoint {checkpoint}: not 'latest', a step number or a "
                                 "checkpoint folder")
        folder = path.resolve().parent
        own = [ckpt.checkpoint_root(run).resolve(), (run / ckpt.SUPERSEDED_DIR).resolve()]
        if folder.name == ckpt.CHECKPOINT_DIR and not any(
                folder == root or root in folder.parents for root in own):
            owner = folder.parent  # another run's checkpoint (or one it set aside)
            if owner.parent.name == ckpt.SUPERSEDED_DIR:
                owner = owner.parent.parent
            raise DeblurcliError(f"--checkpoint {checkpoint} is not a checkpoint of {run} (the "
                                 "model folder would name the wrong run); export it from its "
                                 f"own run: deblurcli export {owner} --checkpoint {path}")
        return RunState(path, -1, True)
    model = run / "model"
    newest = found[-1] if found else None
    if model.is_dir() and (newest is None or ckpt.model_step(model) >= newest[0]):
        return RunState(model, ckpt.model_step(model), False)
    if newest is None:
        raise DeblurcliError(f"{run} has neither a model/ folder nor a checkpoint yet")
    return RunState(newest[1], newest[0], True)


def checkpoint_model(path: str | Path) -> CheckpointModel:
    """The model of a train-diffusion checkpoint: the :class:`OSDDModel` as the run held it at
    that step (adapters unfused, float32, on the CPU, eval mode), the latent discriminator's
    tensors (or ``None``), the run's settings and the step.

    Raises:
        DeblurcliError: not a complete checkpoint, or the model it started from is gone.
    """
    from deblurcli.train.config import DiffusionTrainConfig, config_from_dict
    from deblurcli.train.diffusion import GeneratorStep, build_model, set_trainable

    state = ckpt.load_checkpoint(path)
    if state.config.get("kind") != DIFFUSION_KIND:
        raise DeblurcliError(f"{path} is not a train-diffusion checkpoint")
    config = config_from_dict(DiffusionTrainConfig, state.config)
    try:
        model = build_model(config)
    except DeblurcliError as exc:
        raise DeblurcliError(f"cannot rebuild the model of checkpoint {Path(path).name}: {exc}") \
            from None
    set_trainable(model, config)  # the trained tensors are named as the run saved them
    sources.check(state.config, model, doing="export")
    ckpt.load_trainable_state(GeneratorStep(model), state.weights["unet"])
    model.requires_grad_(False)
    return CheckpointModel(model.eval(), state.weights.get("disc"), state.config, state.step)


def _training_extra(config: dict) -> dict:
    """What ``train-diffusion`` records in its model folder's ``extra``."""
    return {"trained_by": "deblurcli train-diffusion",
            "trained": "full" if config.get("full") else f"adapter:{config.get('adapter')}",
            **{key: config.get(key) for key in ("init", "evae", "base_model")}}


def export_run(run: str | Path, out: str | Path, *, checkpoint: str | None = None,
               storage_dtype: torch.dtype | None = None, keep_training_state: bool = False,
               force: bool = False) -> RunState:
    """Write a model folder ``out`` from a train-diffusion run (see :func:`choose_state`).

    The folder is for inference unless ``keep_training_state``: then it keeps the sharp encoder
    E2 and the latent discriminator, which ``train-diffusion --init`` needs to continue the
    latent and GAN terms. ``storage_dtype`` defaults to float16 for inference (half the size; the
    model loads in any dtype) and to float32 with ``keep_training_state`` (training continues
    from the exact weights). ``out`` appears whole or not at all; an existing non-empty ``out``
    is replaced only with ``force``. A state that a run still training removes while it is
    read (a pruned checkpoint, a replaced ``RUN/model``) is chosen again, unless ``checkpoint``
    named it. Returns the state that was exported.

    Raises:
        DeblurcliError: see :func:`choose_state` and :func:`checkpoint_model`; ``out`` exists,
            or is, holds or lies inside a folder the export reads (:func:`_check_apart`).
    """
    run, out = Path(run), Path(out)
    if storage_dtype is None:
        storage_dtype = torch.float32 if keep_training_state else torch.float16
    for attempt in range(_ATTEMPTS):
        state = choose_state(run, checkpoint)
        chosen = _identity(state.path)
        try:
            return _export_state(run, out, state, storage_dtype=storage_dtype,
                                 keep_training_state=keep_training_state, force=force)
        except (DeblurcliError, OSError):
            if chosen is None or _identity(state.path) == chosen:
                raise  # the state itself is bad, not gone or replaced
            if checkpoint not in (None, "latest") or attempt == _ATTEMPTS - 1:
                raise DeblurcliError(
                    f"{state.path} was removed while export read it (a run still training "
                    "keeps only its newest --keep-checkpoints and replaces RUN/model when it "
                    "ends); export another state, or 'latest'") from None
    raise AssertionError("unreachable")


_ATTEMPTS = 3  # a run that is still training may remove the state being read: choose again


def _identity(path: Path) -> tuple[int, int] | None:
    """The folder at ``path`` (device, inode), or None when there is none: a folder removed, or
    replaced by another of its name (``RUN/model`` at a run's end), is told from the one read."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _export_state(run: Path, out: Path, state: RunState, *, storage_dtype: torch.dtype,
                  keep_training_state: bool, force: bool) -> RunState:
    from deblurcli.images import atomic_folder
    from deblurcli.modelfolder import check_replaceable, export_model_folder, save_model_folder

    # (the run's --init, even for its model/: replaced, its checkpoints could not be rebuilt)
    _check_apart(out, [("the run", run), ("the exported state", state.path), *_rebuilt_from(run),
                       *(_rebuilt_from(state.path) if state.is_checkpoint else [])])
    if out.exists() and not out.is_dir():
        raise DeblurcliError(f"{out} exists and is not a folder")
    check_replaceable(out)  # --force replaces a model folder, never a user's own folder
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DeblurcliError(f"{out} exists and is not empty; pass --force to replace it")
    with atomic_folder(out, replace=True) as tmp:
        if not state.is_checkpoint:
            export_model_folder(state.path, tmp, storage_dtype=storage_dtype,
                                extra={"run": run.resolve().name, "step": state.step},
                                include_sharp_encoder=keep_training_state)
            return state
        loaded = checkpoint_model(state.path)
        extra = {**_training_extra(loaded.config), "run": run.resolve().name,
                 "step": loaded.step, "exported_from": f"{ckpt.CHECKPOINT_DIR}/{state.path.name}"}
        save_model_folder(tmp, loaded.model, extra=extra, storage_dtype=storage_dtype,
                          include_sharp_encoder=keep_training_state,
                          discriminator=loaded.discriminator if keep_training_state else None)
    return replace(state, step=loaded.step)


def _rebuilt_from(checkpoint: Path) -> list[tuple[str, Path]]:
    """The local folders a checkpoint's model is rebuilt from (its run's ``--init``, ``--evae``,
    ``--base-model``), as ``(what, folder)``; none when its settings cannot be read (then
    :func:`checkpoint_model` says why)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [(f"the run's --{key.replace('_', '-')}", Path(config[key]))
            for key in ("init", "evae", "base_model")
            if isinstance(config.get(key), str) and Path(config[key]).is_dir()]


def _check_apart(out: Path, sources: list[tuple[str, Path]]) -> None:
    """Refuse an ``out`` that is, holds or lies inside a folder the export reads: replacing it
    would destroy what the model comes from (``RUN/model`` with the ``training/`` state that
    ``train-diffusion --init`` needs, the checkpoints, the model a checkpoint is rebuilt from)."""
    target = out.resolve()
    for what, source in sources:
        folder = source.resolve()
        if target == folder or target.is_relative_to(folder) or folder.is_relative_to(target):
            how = "is" if target == folder else "is inside" if target.is_relative_to(folder) \
                else "holds"
            why = "which export reads" if what in ("the run", "the exported state") else \
                "which the run's model is rebuilt from"
            raise DeblurcliError(f"-o {out} {how} {what} ({source}), {why}; write the model "
                                 "elsewhere")
