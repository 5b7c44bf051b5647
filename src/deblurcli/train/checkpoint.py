"""Training checkpoints: weights, optimizer, scheduler and RNG state as safetensors + JSON.

A checkpoint is a folder ``OUTPUT/checkpoints/step-000000100/`` holding

* ``weights-<name>.safetensors``: the trainable tensors of each trained module,
* ``optim-<name>.safetensors`` + the optimizer's non-tensor state in ``state.json``,
* ``rng.safetensors``: torch (CPU and CUDA) and numpy generator states; Python's in ``state.json``,
* ``state.json``: step, scheduler states, run metadata; ``config.json``: the resolved config.

Data order and augmentations are a pure function of (seed, sample position), so restoring the
step restores them too. Folders are written under a temporary name and renamed when complete, so
a crash never leaves a half-written checkpoint that ``--resume`` would pick up. No pickles.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from deblurcli.errors import DeblurcliError
from deblurcli.images import atomic_save_safetensors, atomic_write_bytes, fsync_folder

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")
STATE_VERSION = 1


# ----------------------------------------------------------------------------- small helpers
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically and durably (:func:`deblurcli.images.atomic_write`)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------- optimizer state
def optimizer_state_to_tensors(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a torch optimizer ``state_dict`` into tensors (``state.<pid>.<key>``) and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    return tensors, json.loads(json.dumps(meta, default=_json_default))


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) \
        -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- RNG state
def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, numpy (legacy global) and torch CPU/CUDA generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = value
    np_state = np.random.get_state(legacy=False)
    tensors["numpy_key"] = torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    meta = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {"pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only where GPUs exist)."""
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        for index, value in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value.to(torch.uint8), index)
    key = tensors["numpy_key"].numpy().astype(np.uint32)
    np_meta = meta["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": key, "pos": np_meta["pos"]},
                         "has_gauss": np_meta["has_gauss"], "gauss": np_meta["gauss"]})
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- checkpoints
@dataclass
class Checkpoint:
    """A loaded training checkpoint."""

    path: Path
    step: int
    weights: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict[str, Any]]
    schedulers: dict[str, dict[str, Any]]
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict[str, Any]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_root(output: str | Path) -> Path:
    """``OUTPUT/checkpoints``."""
    return Path(output) / CHECKPOINT_DIR


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output`` as ``(step, path)``, oldest first."""
    root = checkpoint_root(output)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_RE.match(child.name)
            if match and (child / "state.json").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def save_checkpoint(output: str | Path, step: int, *,
                    weights: Mapping[str, Mapping[str, torch.Tensor]],
                    optimizers: Mapping[str, torch.optim.Optimizer],
                    schedulers: Mapping[str, Any],
                    config: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None,
                    keep: int = 0) -> Path:
    """Write a checkpoint for ``step``; keep only the newest ``keep`` ones (0 keeps all)."""
    root = checkpoint_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in weights.items():
        atomic_save_safetensors(tmp / f"weights-{name}.safetensors", tensors)
    optim_meta = {}
    for name, optimizer in optimizers.items():
        tensors, meta = optimizer_state_to_tensors(optimizer.state_dict())
        atomic_save_safetensors(tmp / f"optim-{name}.safetensors", tensors)
        optim_meta[name] = meta
    rng_tensors, rng_meta = capture_rng_state()
    atomic_save_safetensors(tmp / "rng.safetensors", rng_tensors)
    state = {
        "version": STATE_VERSION,
        "step": int(step),
        "weights": sorted(weights),
        "optimizers": optim_meta,
        "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
        "rng": rng_meta,
        "extra": dict(extra or {}),
    }
    write_json_atomic(tmp / "state.json", state)
    write_json_atomic(tmp / "config.json", dict(config))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_folder(root)  # the checkpoint's new name survives a crash (its files are flushed)
    if keep > 0:
        for _, old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


SUPERSEDED_DIR = "superseded"


def model_step(model: Path) -> int:
    """The step a run's ``model`` folder was written at (its ``training.json``; -1 if unknown)."""
    try:
        return int(json.loads((model / "training.json").read_text(encoding="utf-8"))["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def later_states(output: str | Path, step: int) -> list[Path]:
    """What ``output`` holds from beyond ``step``: checkpoints, its ``model`` folder and the
    validation sheets of later steps, left by a run that went on from there. A run resumed at
    ``step`` replaces that future, so these would be taken for its own."""
    output = Path(output)
    found = [path for at, path in list_checkpoints(output) if at > step]
    if (output / "model").is_dir() and model_step(output / "model") > step:
        found.append(output / "model")
    sheets = output / "validation"
    if sheets.is_dir():
        for sheet in sorted(sheets.glob("step-*.png")):
            match = _STEP_RE.match(sheet.stem)
            if match and int(match.group(1)) > step:
                found.append(sheet)
    return found


def superseded_note(output: str | Path, resume: str | Path) -> str | None:
    """One line for a run about to resume from the checkpoint ``resume`` into ``output`` when
    that sets :func:`later_states` aside (``None`` when nothing would move)."""
    try:
        step = int(json.loads((Path(resume) / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    found = later_states(output, step)
    if not found:
        return None
    kinds = {"checkpoint(s)": sum(p.parent.name == CHECKPOINT_DIR for p in found),
             "model/": sum(p.name == "model" and p.parent == Path(output) for p in found),
             "validation sheet(s)": sum(p.suffix == ".png" for p in found)}
    what = ", ".join(f"{n} {k}" if k != "model/" else k for k, n in kinds.items() if n)
    return (f"resuming at step {step} replaces what {output} went on to after it: {what} of "
            f"later steps move to {Path(output) / SUPERSEDED_DIR}")


def set_aside_later_states(output: str | Path, step: int) -> Path | None:
    """Move :func:`later_states` into ``OUTPUT/superseded/resumed-at-STEP[-N]/`` (kept, where
    ``--resume latest`` and ``export`` no longer see them); return that folder, or ``None`` when
    there was nothing to move."""
    output = Path(output)
    found = later_states(output, step)
    if not found:
        return None
    base = output / SUPERSEDED_DIR / f"resumed-at-{step:09d}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    for path in found:
        kept = target / path.relative_to(output)
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, kept)
    fsync_folder(output)
    return target


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Raises:
        DeblurcliError: the folder is not a complete checkpoint.
    """
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DeblurcliError(f"{path} is not a training checkpoint (no state.json)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        weights = {name: load_file(str(path / f"weights-{name}.safetensors"))
                   for name in state["weights"]}
        optimizers = {
            name: optimizer_state_from_tensors(load_file(str(path / f"optim-{name}.safetensors")),
                                               meta)
            for name, meta in state["optimizers"].items()
        }
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, KeyError) as exc:
        raise DeblurcliError(f"checkpoint {path} is incomplete or corrupt: "
                             f"{' '.join(str(exc).split())}") from None
    return Checkpoint(path=path, step=int(state["step"]), weights=weights, optimizers=optimizers,
                      schedulers=state["schedulers"], rng_tensors=rng_tensors,
                      rng_meta=state["rng"], config=config, extra=state.get("extra", {}))


def resolve_resume(resume: str | None, output: str | Path) -> Path | None:
    """Turn ``--resume`` into a checkpoint folder.

    ``latest`` (or ``auto``) picks the newest checkpoint under ``output`` (``auto`` starts fresh
    when there is none); anything else is a checkpoint folder or a run folder.

    Raises:
        DeblurcliError: nothing to resume from.
    """
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        found = list_checkpoints(output)
        if not found:
            if resume == "auto":
                return None
            raise DeblurcliError(f"--resume latest: no checkpoint under {checkpoint_root(output)}")
        return found[-1][1]
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1][1]
    raise DeblurcliError(f"--resume {resume}: not a checkpoint folder and no checkpoints inside")


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``module`` that require gradients, by name (detached)."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors saved by :func:`trainable_state` back into ``module``.

    Raises:
        DeblurcliError: the checkpoint does not match the model being trained.
    """
    params = dict(module.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in tensors]
    unknown = [name for name in tensors if name not in params]
    if missing or unknown:
        bad = (missing or unknown)[0]
        raise DeblurcliError(f"the checkpoint does not match this model ({len(missing)} missing, "
                             f"{len(unknown)} unexpected tensors, e.g. {bad!r}); resume with the "
                             "same settings it was written with")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
