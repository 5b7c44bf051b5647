"""What a train-diffusion checkpoint is rebuilt around, fingerprinted when its run starts.

A checkpoint holds only the tensors its run trains (one adapter, say); resuming it, or
exporting it, rebuilds everything else from the run's sources: its ``--init`` model folder (or
``--base-model``, ``--preset``) and its ``--evae``. If one of them has been retrained in place
since (``--resume`` of the run that wrote it, say), the rebuilt model would put adapters
trained on the old weights around the new ones, silently. So a run records a SHA-256 of the
tensors it does *not* train, the eVAE's apart from the rest, in its saved settings
(:data:`RECORD_KEY`), and a resume or an export that rebuilds other values refuses
(:func:`check`). Only values count: a folder written again with the same weights (another
deblurcli or diffusers version, its own run's adapter replaced) passes. Runs saved before
this have no record and are not checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deblurcli.errors import DeblurcliError

#: Where a run's saved settings (``config.json``) keep the fingerprints.
RECORD_KEY = "frozen_digests"


def _digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprints(model: nn.Module) -> dict[str, str]:
    """SHA-256s of the tensors of ``model`` (an ``OSDDModel`` after ``set_trainable``) that do
    not train: ``"evae"`` for the eVAE's, ``"rest"`` for the UNet's, the prompt's and the
    adapters'."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = sorted((name, t) for name, t in model.state_dict().items() if name not in trained)
    return {"evae": _digest([(n, t) for n, t in frozen if n.startswith("evae.")]),
            "rest": _digest([(n, t) for n, t in frozen if not n.startswith("evae.")])}


def check(saved: Mapping[str, Any], model: nn.Module, *, doing: str) -> None:
    """Refuse to go on (``doing``: ``"--resume"``, ``"export"``) with a model rebuilt from the
    settings ``saved`` with a checkpoint whose frozen tensors differ from those recorded.

    Raises:
        DeblurcliError: one line naming the folder that changed and what to do.
    """
    recorded = saved.get(RECORD_KEY)
    if not isinstance(recorded, Mapping):
        return
    now = fingerprints(model)
    for part in ("rest", "evae"):
        if part not in recorded or recorded[part] == now[part]:
            continue
        keys = ("evae", "init", "base_model") if part == "evae" else ("init", "base_model")
        key = next((key for key in keys if saved.get(key)), None)
        if key is None:
            raise DeblurcliError(
                f"--preset {saved.get('preset')} now builds other weights than this run was "
                f"trained with (another version of deblurcli?): {doing} would rebuild the "
                "checkpoint's model around them; use the version that started the run")
        raise DeblurcliError(
            f"--{key.replace('_', '-')} {saved[key]} no longer holds the weights this run was "
            f"trained with (retrained in place since?): {doing} would rebuild the checkpoint's "
            "model around other weights; put the original folder back there, or start a new "
            "run")
