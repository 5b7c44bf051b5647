"""The training engine shared by both stages: accelerate set-up, data loading, the step loop,
checkpoints / resume / Ctrl-C, validation (PSNR, SSIM, comparison PNG) and CSV/TensorBoard logs.

A stage (``train.vae``, ``train.diffusion``) provides a :class:`Stage`: the modules whose trainable
tensors are checkpointed, the optimizers and LR schedulers, a ``train_step`` for one micro-batch,
a ``predict`` for validation and a ``save_output`` that writes the final model folder.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deblurcli.errors import DeblurcliError
from deblurcli.images import atomic_folder, atomic_write
from deblurcli.progress import ProgressFn, report
from deblurcli.train import checkpoint as ckpt
from deblurcli.train import data as dt
from deblurcli.train.config import (CommonConfig, DiffusionTrainConfig, VaeTrainConfig,
                                    config_to_dict, validate_common, with_absolute_paths)


# ----------------------------------------------------------------------------- accelerate
def make_accelerator(config: CommonConfig, *, find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator`` for ``config`` (mixed precision, gradient accumulation).

    Started with ``accelerate launch`` it spans every GPU / node it was given; started directly it
    uses one device (the CPU with ``config.cpu`` or when no GPU exists).
    ``find_unused_parameters`` is passed to DDP (stage 1 needs it: E1's latent head gets no
    gradient when only its skips are used).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    mixed = effective_mixed_precision(config)
    _forget_other_mixed_precision(mixed)

    def accelerator(cpu: bool):
        return Accelerator(
            mixed_precision=mixed,
            gradient_accumulation_steps=config.grad_accum,
            cpu=cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(
                find_unused_parameters=find_unused_parameters)],
        )

    made = accelerator(config.cpu)
    if _launched_together() and made.num_processes == 1 and made.device.type == "cpu":
        # launched as several processes with no GPU: accelerate joins them only when told
        # the CPU; each trained alone on the whole stream, all writing the same folder
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        made = accelerator(True)
    return made


def _launched_together() -> bool:
    """Whether torchrun (``accelerate launch --multi_gpu``, ``torchrun``) started this process
    as one of several: its world size, rank and rendezvous address all set (a ``WORLD_SIZE``
    alone, left over in a shell, is not a launch)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    return world > 1 and "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ


def _forget_other_mixed_precision(mixed: str) -> None:
    """accelerate keeps one process-wide ``AcceleratorState`` whose mixed precision cannot change
    once set, so a second run in the same process (a notebook, a script training the eVAE in
    fp32 and then the UNet in bf16) would fail. Drop that part of the state when it differs; the
    device / process-group part (``PartialState``) is kept."""
    from accelerate.state import AcceleratorState, is_initialized

    if is_initialized() and AcceleratorState().mixed_precision != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def effective_mixed_precision(config: CommonConfig) -> str:
    """The mixed precision a run really uses: ``config.mixed_precision`` on a GPU; on the CPU
    only ``bf16`` and only where the CPU has bfloat16 matrix units (fp16, and bf16 elsewhere, are
    slow and poorly supported there), else ``no``."""
    from deblurcli.device import cpu_has_fast_bf16

    mixed = config.mixed_precision
    if mixed == "no" or (not config.cpu and torch.cuda.is_available()):
        return mixed
    return "bf16" if mixed == "bf16" and cpu_has_fast_bf16() else "no"


def optimizer_step(accelerator, loss: torch.Tensor, optimizer, scheduler, *,
                   params=None, max_grad_norm: float = 0.0) -> None:
    """Backward ``loss``, then (clip and) step ``optimizer``; the scheduler moves once per
    optimizer update, not per micro-batch. Call inside ``accelerator.accumulate``."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def lr_factor(step: int, *, warmup_steps: int = 0, schedule: str = "constant",
              max_steps: int = 1) -> float:
    """Learning-rate multiplier after ``step`` optimiser updates (a pure function).

    A linear warm-up over ``warmup_steps``, then ``constant`` (1.0, independent of
    ``max_steps``, so a run can be extended) or ``cosine`` (half a cosine from 1 down to 0 at
    ``max_steps``; resuming with a larger ``max_steps`` puts the rate where the longer schedule
    would be at that step).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 0,
                 schedule: str = "constant", max_steps: int = 1):
    """``LambdaLR`` over :func:`lr_factor` (its step count is saved in checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warmup_steps=warmup_steps, schedule=schedule, max_steps=max_steps))


def retarget_lr(scheduler, max_steps: int) -> None:
    """Make a :func:`lr_scheduler` end at ``max_steps`` instead (a time-boxed run that found
    it has time for fewer or more steps), from the next update on: its rate is set now."""
    scheduler.lr_lambdas = [functools.partial(f.func, **{**f.keywords, "max_steps": max_steps})
                            for f in scheduler.lr_lambdas]
    rates = [base * f(scheduler.last_epoch)
             for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates


# ----------------------------------------------------------------------------- data
@dataclass
class DataBundle:
    """Training and validation data of a run (``train``: a dataset read by a ``DataLoader``, or a
    :class:`~deblurcli.train.ondevice.DeviceBatchSource` that makes batches on the device)."""

    train: Any
    val: dt.ValidationDataset | None


def _outside_runs(items: list, roots, output: str | Path) -> list:
    """``items`` without those inside this run's folder or another training run's found below a
    data folder (``-o photos/run``): its validation sheets were trained on as photos by the
    next run, and a resumed run saw other data than it started with."""
    output = Path(os.path.abspath(output))
    roots = [Path(os.path.abspath(root)) for root in roots if root]
    runs: dict[Path, bool] = {}

    def is_run(folder: Path) -> bool:
        if folder not in runs:
            runs[folder] = (folder / "train_log.csv").is_file() or (
                (folder / ckpt.CHECKPOINT_DIR).is_dir() and (folder / "config.json").is_file())
        return runs[folder]

    def inside_a_run(item) -> bool:
        first = item.frames[0] if isinstance(item, dt.FramesItem) else \
            item.blur if isinstance(item, dt.PairItem) else item.sharp
        path = Path(os.path.abspath(first))
        root = next((r for r in roots if path.is_relative_to(r) and path != r), None)
        if path.is_relative_to(output) and not (root is not None and root.is_relative_to(output)):
            return True  # (data kept inside the run's folder is data)
        folder = path.parent
        while root is not None and folder != root and folder.is_relative_to(root):
            if is_run(folder):
                return True
            folder = folder.parent
        return False

    return [item for item in items if not inside_a_run(item)]


def build_data(config: CommonConfig, *, world: int = 1,
               progressive: tuple[tuple[int, ...], int] | None = None,
               device: torch.device | None = None) -> DataBundle:
    """Discover, validate and wrap the data of ``config`` (raises ``DatasetError`` early).

    Frame windows (real blur) are mixed with the main source at ``config.real_fraction``. The
    validation items are held out from the main source when there is one, else from the frame
    windows (whose frames the device data path then cuts out of its clips).
    """
    items, problems = dt.discover(
        data=config.data, layout=config.layout, split=config.split, data_root=config.data_root,
        blur=config.blur, sharp=config.sharp, sharp_photos=config.sharp_photos,
        frames=config.frames, frames_per_blur=config.frames_per_blur)
    items = _outside_runs(items, (config.data, config.data_root, config.blur, config.sharp,
                                  config.sharp_photos, config.frames), config.output)
    source = config.data or config.blur or config.sharp_photos or config.frames or "dataset"
    dt.validate_items(items, problems, min_size=8, source=f"dataset {source}")
    real = [it for it in items if isinstance(it, dt.FramesItem)]
    main = [it for it in items if not isinstance(it, dt.FramesItem)]
    if config.val_data:
        # a GoPro root given as --val-data is read from its test split
        try:
            val_items, val_problems = dt.discover(data=config.val_data, layout="auto",
                                                  split="test", data_root=config.data_root)
        except dt.DatasetError as exc:
            raise dt.DatasetError(f"--val-data: {exc}") from None
        dt.validate_items(val_items, val_problems, source=f"validation set {config.val_data}")
    elif main:
        main, val_items = dt.split_validation(main, config.val_count, config.seed)
    else:
        real, val_items = dt.split_validation(real, config.val_count, config.seed)
    schedule = None
    if progressive is not None:
        sizes, steps_each = progressive
        schedule = dt.CropSchedule(tuple(sizes), steps_each,
                                   config.batch_size * world * config.grad_accum)
    val = dt.ValidationDataset(val_items, size=config.val_size, seed=config.seed) \
        if val_items else None
    if config.device_data:
        from deblurcli.train import ondevice

        train = ondevice.source_from_items(main, config, device=device or torch.device("cpu"),
                                           schedule=schedule, held_out=val_items)
        return DataBundle(train=train, val=val)
    streams = [dt.PairedDataset(part, crop=config.crop, seed=config.seed,
                                augment=config.augment, schedule=schedule)
               for part in (main, real) if part]
    train = streams[0] if len(streams) == 1 else \
        dt.MixedDataset(streams[0], streams[1], config.real_fraction, config.seed)
    return DataBundle(train=train, val=val)


def batch_stream(data: DataBundle, config: CommonConfig, *, rank: int, world: int,
                 start_step: int):
    """Endless batches starting at micro-batch ``start_step × grad_accum`` of this process."""
    start_batch = start_step * config.grad_accum
    if hasattr(data.train, "stream"):  # made on the device
        return data.train.stream(start_batch=start_batch, rank=rank, world=world)
    sampler = dt.StreamBatchSampler(config.batch_size, rank=rank, world=world,
                                    start_batch=start_batch)
    return iter(torch.utils.data.DataLoader(data.train, batch_sampler=sampler,
                                            num_workers=config.workers,
                                            persistent_workers=config.workers > 0,
                                            worker_init_fn=_outlive_sigterm
                                            if config.workers > 0 else None))


def _original_message(exc: BaseException) -> str:
    """``exc``'s message; for one a DataLoader worker raised (torch passes on the worker's
    traceback as the message), the original one, from its last line."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.replace(".", "").replace("_", "").isalnum() else last


def _quit_on_sigterm(signum, frame) -> None:
    os._exit(0)


def _outlive_sigterm(worker_id: int) -> None:
    """A DataLoader worker ends quietly (status 0) on SIGTERM: a job's SIGTERM to the whole
    process group (Slurm, systemd, ``timeout``) killed it, and torch's SIGCHLD handler raised
    that death (a signal) in the middle of the main process's step, which ended without a
    checkpoint. A worker gone with status 0 raises nothing there; the next batch then fails,
    and the main process, which has the signal too, stops with a checkpoint."""
    signal.signal(signal.SIGTERM, _quit_on_sigterm)


# ----------------------------------------------------------------------------- logging
class RunLog:
    """CSV log (``OUTPUT/train_log.csv``) plus TensorBoard when it is installed."""

    def __init__(self, output: Path, resume_step: int, enabled: bool) -> None:
        self.path = output / "train_log.csv"
        self.enabled = enabled
        self.writer = None
        self.fields: list[str] | None = None
        if not enabled:
            return
        if self.path.is_file():
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run's later steps replace the abandoned ones, as in the CSV
            self.writer = SummaryWriter(str(output / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self.writer = None

    def _truncate_after(self, step: int) -> None:
        with self.path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        self.fields = list(rows[0].keys()) if rows else None
        self._rewrite([r for r in rows if int(float(r.get("step", 0) or 0)) <= step])

    def _rewrite(self, rows: list[dict]) -> None:
        """Replace the file (atomically) by ``rows`` under the header ``self.fields``."""
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as fh:
                if self.fields:
                    writer = csv.DictWriter(fh, fieldnames=self.fields)
                    writer.writeheader()
                    writer.writerows(rows)

        atomic_write(self.path, write)

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one row; a value with a new name rewrites the file with a wider header."""
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        if self.fields is None:
            self.fields = list(row)
        new_keys = [k for k in row if k not in self.fields]
        if new_keys and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            self.fields = self.fields + new_keys
            self._rewrite(rows)
        elif new_keys:
            self.fields = self.fields + new_keys
        new_file = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- stage protocol
@dataclass
class Stage:
    """What a training stage gives the engine.

    Attributes:
        modules: name -> module whose ``requires_grad`` parameters are checkpointed.
        optimizers / schedulers: by name (schedulers step once per optimiser step).
        train_step: ``(batch, step) -> {loss name: value}`` for one micro-batch, including
            backward and the (accumulation-aware) optimizer steps.
        predict: ``(blurry, sharp)`` ``(B,3,H,W)`` in ``[-1,1]`` -> restored image, for
            validation (stage 2 ignores ``sharp``; stage 1 needs it for E2).
        save_output: write the final model folder into the given path.
        trained: modules set to ``train()`` during the loop (others stay in ``eval()``).
        saved: more settings saved with the run's configuration and each checkpoint's.
        schedule_starts: scheduler name -> the step its count starts at (0 when absent).
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    train_step: Callable[[dict, int], dict[str, float]]
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    save_output: Callable[[Path], None]
    trained: list[nn.Module] = field(default_factory=list)
    saved: dict[str, Any] = field(default_factory=dict)
    # scheduler name -> the step its count starts at (one that steps only from a later step on,
    # like the discriminator's from --gan-start); a time budget retargets it by that much less
    schedule_starts: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Outcome of a run."""

    step: int
    output: Path
    model_folder: Path | None
    checkpoint: Path | None
    interrupted: bool = False
    terminated: bool = False  # interrupted by SIGTERM (kill, a scheduler), not Ctrl-C
    torn: bool = False  # stopped at once by a second signal: no checkpoint written at the stop
    out_of_time: bool = False
    last_losses: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    main_process: bool = True
    start_step: int = 0


# what a run writes into its folder before its first checkpoint or log line
_RUN_START = ("config.json", "tensorboard", "validation", ckpt.SUPERSEDED_DIR)
_RUN_KINDS = (VaeTrainConfig.__name__, DiffusionTrainConfig.__name__)  # config.json's "kind"


def _check_own_folder(output: Path) -> None:
    """Refuse an existing folder that is not a run's: a run writes ``config.json``, ``model/``,
    ``validation/`` ... into it, and would replace a user's files of those names (or fill a model
    folder given to ``--init``)."""
    if not output.is_dir() or any((output / name).exists() for name in
                                  (ckpt.CHECKPOINT_DIR, "model", "train_log.csv")):
        return
    foreign = sorted(p.name for p in output.iterdir() if not p.name.startswith(".")
                     and p.name != "lost+found" and not _run_start_entry(p))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DeblurcliError(f"{output} holds files that are not a training run's ({shown}); "
                             "give a new or empty folder as --output")


def _run_start_entry(path: Path) -> bool:
    if path.name not in _RUN_START:
        return False
    if path.name != "config.json":
        return path.is_dir()
    try:  # a run's resolved settings (with the kind every run records), not a settings file
        return json.loads(path.read_text(encoding="utf-8")).get("kind") in _RUN_KINDS
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def prepare_output(config: CommonConfig) -> tuple[Path, ckpt.Checkpoint | None]:
    """Check the output folder and load the checkpoint to resume from (if any).

    The folder itself is made by :func:`run`, once the model is built: a run that fails on its
    settings (an unknown preset, a missing eVAE) leaves no empty folder behind.
    """
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise DeblurcliError(f"--output must be a folder, but {output} is a file")
    resume_path = ckpt.resolve_resume(config.resume, output)
    state = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    _check_own_folder(output)
    if state is None and ckpt.list_checkpoints(output):
        raise DeblurcliError(f"{output} already holds checkpoints; continue with --resume latest "
                             "or choose another --output")
    earlier = [name for name in ("model", "train_log.csv") if (output / name).exists()]
    # (the main process only: under a launcher it may have begun writing the log already)
    if state is None and earlier and os.environ.get("RANK", "0") == "0":
        # its model and log would be replaced, its validation images mixed in
        raise DeblurcliError(f"{output} already holds a run ({', '.join(earlier)}); choose "
                             "another --output, or delete that one first")
    return output, state


def _in_any_process(accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds in any process (each passes its own), so that all take the same
    branch: processes that parted ways (one stopping, the others going on into a collective)
    waited for each other until the launcher tore them all down."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor(float(flag), device=accelerator.device)
    return accelerator.reduce(value, reduction="sum").item() > 0


def _validate_on_main(stage: Stage, val: dt.ValidationDataset, output: Path, step: int,
                      accelerator) -> tuple[dict[str, float], DeblurcliError | None]:
    """The main process's validation scores, or the error of a damaged validation image
    (the other processes: no scores, no error)."""
    if not accelerator.is_main_process:
        return {}, None
    try:
        return _validate(stage, val, output, step, accelerator.device,
                         accelerator.autocast), None
    except DeblurcliError as exc:
        return {}, exc


def _stopped(failed: BaseException | None, elsewhere: str, saved: str = "") -> BaseException:
    """The error each process stops with when one of them failed: its own (a user's error
    with ``saved``, what was kept, added), or ``elsewhere`` where another process failed."""
    if failed is None:
        return DeblurcliError(elsewhere + saved)
    if isinstance(failed, DeblurcliError):
        return type(failed)(_original_message(failed) + saved)
    return failed


def _saved(step: int, output: Path) -> str:
    return (f"; the run's {step} step(s) are saved: fix it, then continue with --resume latest "
            f"-o {output}")


_BATCH_ELSEWHERE = "another process could not load its next batch (its error line says why)"
_VALIDATION_ELSEWHERE = ("the main process could not read a validation image (its error line "
                         "names it)")


def _stop_if_diverged(losses: dict[str, float], step: int, accelerator, log: RunLog, lr: float,
                      output: Path) -> None:
    """Stop a run whose loss is no longer a number (in any process), before its weights are
    saved: it ended with exit 0 and a model that draws NaN, its good checkpoints pruned."""
    bad = next((f"{name}={value}" for name, value in losses.items()
                if not math.isfinite(value)), None)
    if _in_any_process(accelerator, bad is not None) and bad is None:
        bad = "a loss of another process"
    if bad is None:
        return
    log.log(step, {**losses, "lr": lr})
    log.close()
    kept = ckpt.list_checkpoints(output)
    again = f"start it again with a lower --lr, in a new -o folder (or delete {output})"
    if len(kept) > 1:  # (not the newest: its weights gave this loss, and would again)
        again = (f"its newest checkpoint holds the weights that led there: resume from an "
                 f"earlier one with a lower --lr (--resume {kept[0][1]} --lr ...), or {again}")
    raise DeblurcliError(f"the run diverged at step {step} ({bad}); nothing of this step is "
                         f"saved; {again}")


def _set_base_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """Give a restored warm-up scheduler new base rates (its position is kept)."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, factor in zip(scheduler.optimizer.param_groups, base_lrs,
                                   scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)


def restore(stage: Stage, state: ckpt.Checkpoint, unwrap: Callable[[nn.Module], nn.Module]) \
        -> None:
    """Load weights, optimizer and scheduler states and RNG from a checkpoint.

    ``unwrap`` removes distributed wrappers (``accelerator.unwrap_model``), so parameter names
    match the ones saved. The learning rates and the other optimiser settings (weight decay,
    betas) are the ones this run was configured with (given on resume, they win over the
    checkpoint's); Adam's moments and the warm-up position are the checkpoint's.
    """
    configured = {name: [group["initial_lr"] for group in scheduler.optimizer.param_groups]
                  for name, scheduler in stage.schedulers.items()}
    settings = {name: [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
                       for group in optimizer.param_groups]
                for name, optimizer in stage.optimizers.items()}
    for name, module in stage.modules.items():
        module = unwrap(module)
        if name not in state.weights:
            raise DeblurcliError(f"checkpoint {state.path} has no weights for {name!r}; resume "
                                 "with the same stage and settings it was written with")
        ckpt.load_trainable_state(module, state.weights[name])
    for name, optimizer in stage.optimizers.items():
        optimizer.load_state_dict(state.optimizers[name])
        for group, configured_group in zip(optimizer.param_groups, settings[name], strict=True):
            group.update(configured_group)  # weight decay, betas: this run's (Adam's moments kept)
    for name, scheduler in stage.schedulers.items():
        scheduler.load_state_dict(state.schedulers[name])
        _set_base_lrs(scheduler, configured[name])
    ckpt.restore_rng_state(state.rng_tensors, state.rng_meta)


def _validate(stage: Stage, val: dt.ValidationDataset, output: Path, step: int,
              device: torch.device, autocast) -> dict[str, float]:
    from deblurcli.evaluation.metrics import psnr, ssim
    from deblurcli.images import write_image

    for module in stage.trained:
        module.eval()
    psnrs, ssims, input_psnrs, rows = [], [], [], []
    with torch.no_grad():
        for index in range(len(val)):
            sample = val[index]
            blur = sample["blur"][None].to(device)
            sharp = sample["sharp"][None].to(device)
            with autocast():  # the model only: SSIM's variances in bf16 lost 0.07 of its value
                pred = stage.predict(blur, sharp)
            pred = pred.float().clamp(-1, 1)
            blur, pred, sharp = ((t.float() + 1) * 0.5 for t in (blur, pred, sharp))  # [0, 1]
            psnrs.append(psnr(pred, sharp))
            ssims.append(ssim(pred, sharp))
            input_psnrs.append(psnr(blur, sharp))  # the baseline to beat
            if index < 4:  # NaN (a diverged model) drawn black: the scores say nan
                row = torch.cat([blur[0], pred[0], sharp[0]], dim=2)
                row = torch.nan_to_num(row, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
                rows.append(row.permute(1, 2, 0).cpu().numpy())
    for module in stage.trained:
        module.train()
    if rows:
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        folder = output / "validation"
        folder.mkdir(exist_ok=True)
        sheet = np.concatenate(rows, axis=0).astype(np.float32)
        write_image(folder / f"step-{step:09d}.png", sheet)
    return {"val_psnr": float(np.mean(psnrs)), "val_input_psnr": float(np.mean(input_psnrs)),
            "val_ssim": float(np.mean(ssims))}


class _InterruptFlag:
    """Turns SIGINT (Ctrl-C) and SIGTERM (``kill``, a batch scheduler's pre-emption) into a flag
    checked between steps; a second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.hit = False
        self.signum: int | None = None  # the first signal received
        self.previous: dict[int, object] = {}

    def __enter__(self) -> _InterruptFlag:  # noqa: PYI034
        try:
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # (nohup, `cmd &` in a script)
                    self.previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave the default handlers
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit, self.signum = True, signum

    def pass_on_sigterm(self) -> None:
        """After the run has saved: a SIGTERM that would have ended a process without a handler
        of its own (a library caller's) ends it now, as it would have without us."""
        if self.signum == signal.SIGTERM and \
                self.previous.get(signal.SIGTERM) in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


class StepBudget:
    """How many steps fit in ``seconds`` of wall clock, measured as the run goes.

    The first ``skip`` steps (start-up, kernel autotuning) are not timed; once ``calibrate``
    steps are timed and a twentieth of the budget has passed (or a tenth, however few steps),
    :meth:`plan` gives the step at which the run should end, keeping ``reserve`` of the budget
    for checkpoints and the model folder. The plan is made again when each of ``replan_at``
    (fractions of the budget) has passed, from the speed of the steps since the last plan:
    steps that got slower (crops that grow, a busier machine) move the end earlier, faster ones
    later, so that a schedule retargeted to the plan ends near the budget. A new plan that
    moves the end by less than ``tolerance`` of the steps left is not given.

    ``per_step`` (seconds, e.g. the speed a resumed run measured before) gives a first plan at
    once; the first count replaces it, and is made early when the run reaches that first plan
    before its time (steps faster than the guess), so that a guess never ends a run.
    :attr:`per_step` is the speed of the latest count.
    """

    def __init__(self, seconds: float, start_step: int, *, skip: int = 2, calibrate: int = 10,
                 reserve: float = 0.05, replan_at: tuple[float, ...] = (0.25, 0.5, 0.75),
                 tolerance: float = 0.02, per_step: float | None = None) -> None:
        self.began = time.perf_counter()
        self.deadline = self.began + seconds
        self.seconds = seconds
        self.skip, self.calibrate, self.reserve = skip, calibrate, reserve
        self.replan_at, self.tolerance = sorted(replan_at), tolerance
        self.start_step = start_step
        self.mark: tuple[int, float] | None = None
        self.planned: int | None = None
        self.counted = False
        self.per_step: float | None = None
        if per_step is not None and math.isfinite(per_step) and per_step > 0:
            self.per_step = per_step
            steps = min((1 - reserve) * seconds / per_step, 1e12)
            # beyond the untimed steps, so that reaching it leaves a step to count
            self.planned = start_step + max(skip + 1, int(steps))

    def expired(self) -> bool:
        """The time is up."""
        return time.perf_counter() >= self.deadline

    def _end(self, step: int, now: float) -> int:
        mark_step, mark_time = self.mark
        per_step = (now - mark_time) / max(step - mark_step, 1)
        self.per_step = per_step
        left = self.deadline - now - self.reserve * self.seconds
        return step + max(0, int(left / per_step))

    def plan(self, step: int) -> int | None:
        """The planned last step when it is first known or changes, else ``None``."""
        now = time.perf_counter()
        if self.mark is None:
            if step - self.start_step >= self.skip:
                self.mark = (step, now)
            return None
        timed = step - self.mark[0]
        elapsed = now - self.began
        if not self.counted:
            ready = (timed >= self.calibrate and elapsed >= 0.05 * self.seconds) or \
                (timed >= 1 and elapsed >= 0.1 * self.seconds) or \
                (timed >= 1 and self.planned is not None and step >= self.planned)  # a guess
            if not ready:
                return None
            self.counted = True
            self.planned = self._end(step, now)
            self.mark = (step, now)
            return self.planned
        if not self.replan_at or elapsed < self.replan_at[0] * self.seconds or timed < 1:
            return None
        while self.replan_at and elapsed >= self.replan_at[0] * self.seconds:
            self.replan_at.pop(0)
        end = self._end(step, now)
        self.mark = (step, now)
        if abs(end - self.planned) <= self.tolerance * max(self.planned - step, 0):
            return None
        self.planned = end
        return end


def run(config: CommonConfig, accelerator, stage: Stage, data: DataBundle, output: Path,
        state: ckpt.Checkpoint | None, progress: ProgressFn | None = None) -> TrainResult:
    """The step loop: train until ``max_steps``, checkpoint, validate, log; Ctrl-C saves and stops.

    The first SIGINT (Ctrl-C) or SIGTERM stops after the step in progress, saves a checkpoint
    and returns with ``interrupted=True``. A second one, or a ``KeyboardInterrupt`` raised inside a step,
    stops at once *without* saving: the weights may hold part of an unfinished step, so
    ``--resume`` goes back to the last checkpoint written before it.

    With ``config.time_budget`` the run ends at the step that fits the budget (a cosine
    schedule is retargeted to end there), or when the time is up: either way it checkpoints and
    writes its model folder like a finished run (``out_of_time`` tells which).
    """
    validate_common(config)
    start = state.step if state is not None else 0
    if start > config.max_steps:  # it would write its model again and record the lower number
        raise DeblurcliError(f"the run is at step {start}, past --max-steps {config.max_steps}: "
                             "give a larger --max-steps to train on (export takes the model "
                             "as it is)")
    if state is not None:
        restore(stage, state, accelerator.unwrap_model)
    main = accelerator.is_main_process
    output.mkdir(parents=True, exist_ok=True)
    if main and state is not None:  # what a run went on to from here is replaced: kept aside
        ckpt.set_aside_later_states(output, start)
    log = RunLog(output, start, enabled=main)
    resolved = {**with_absolute_paths(config_to_dict(config)), **stage.saved}
    if main:
        ckpt.write_json_atomic(output / "config.json", resolved)

    def save(step_now: int) -> Path | None:
        accelerator.wait_for_everyone()
        path = None
        if main:
            path = ckpt.save_checkpoint(
                output, step_now,
                weights={n: ckpt.trainable_state(accelerator.unwrap_model(m))
                         for n, m in stage.modules.items()},
                optimizers=stage.optimizers, schedulers=stage.schedulers, config=resolved,
                extra={"seconds_per_step": budget.per_step}
                if budget is not None and budget.per_step else None,
                keep=config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    step = start
    target = config.max_steps
    budget = None
    if config.time_budget > 0:  # a resumed run plans from the speed its checkpoint recorded
        per_step = (state.extra.get("seconds_per_step") if state is not None else None)
        budget = StepBudget(config.time_budget, start,
                            per_step=per_step if isinstance(per_step, (int, float))
                            and not isinstance(per_step, bool) else None)
        if budget.planned is not None:
            target = min(config.max_steps, max(budget.planned, start + 1))
            for name, scheduler in stage.schedulers.items():
                retarget_lr(scheduler, target - stage.schedule_starts.get(name, 0))
    out_of_time = False
    losses: dict[str, float] = {}
    sums: dict[str, float] = {}
    count = 0
    validation: dict[str, float] = {}
    last_ckpt: Path | None = state.path if state is not None else None
    interrupted = torn = False
    began = time.perf_counter()
    batches = batch_stream(data, config, rank=accelerator.process_index,
                           world=accelerator.num_processes, start_step=start)
    for module in stage.trained:
        module.train()
    report(progress, "steps", step, target)
    with _InterruptFlag() as flag:
        try:
            while step < target and not flag.hit:
                try:
                    batch, failed = next(batches), None
                except Exception as exc:  # noqa: BLE001
                    batch, failed = None, exc
                if _in_any_process(accelerator, failed is not None):  # every process stops
                    if flag.hit:
                        break  # a signal to the process group ended the data workers too
                    # between steps the state is whole: keep the steps done
                    saved = ""
                    if step > start:
                        last_ckpt = save(step)
                        saved = _saved(step, output)
                    raise _stopped(failed, _BATCH_ELSEWHERE, saved)
                batch = {k: (v.to(accelerator.device) if isinstance(v, torch.Tensor) else v)
                         for k, v in batch.items()}
                lr = next(iter(stage.optimizers.values())).param_groups[0]["lr"]  # this update's
                values = stage.train_step(batch, step)
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                count += 1
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if budget is not None:
                    budget.plan(step)
                    wanted = target if budget.planned is None else \
                        min(config.max_steps, max(budget.planned, step))
                    if budget.expired():
                        wanted = step
                    if accelerator.num_processes > 1:
                        # one end for all: each process plans by its own clock, and replicas
                        # whose schedules differed would drift apart while their steps agree
                        agreed = torch.tensor(-float(wanted), device=accelerator.device)
                        wanted = -int(accelerator.reduce(agreed, reduction="max").item())
                    if wanted <= step < target:  # no time for another step
                        target, out_of_time = step, True
                    elif wanted != target:
                        target = wanted
                        for name, scheduler in stage.schedulers.items():
                            retarget_lr(scheduler, target - stage.schedule_starts.get(name, 0))
                final = step >= target
                losses = {k: v / count for k, v in sums.items()}
                sums, count = {}, 0
                _stop_if_diverged(losses, step, accelerator, log, lr, output)
                if step % config.log_every == 0 or final:
                    log.log(step, {**losses, "lr": lr})
                if data.val is not None and (step % config.validate_every == 0 or final):
                    scores, failed = _validate_on_main(stage, data.val, output, step,
                                                       accelerator)
                    if _in_any_process(accelerator, failed is not None):
                        # a damaged validation image: as for a training image
                        last_ckpt = save(step)
                        raise _stopped(failed, _VALIDATION_ELSEWHERE, _saved(step, output))
                    if main:
                        validation = scores
                        log.log(step, validation)
                        report(progress, "validation", step, None, **validation)
                    accelerator.wait_for_everyone()
                if step % config.checkpoint_every == 0 or final:
                    last_ckpt = save(step)
                report(progress, "steps", step, target, **losses, **validation)
                if accelerator.num_processes > 1:  # every process stops at the same step
                    hit = torch.tensor(float(flag.hit), device=accelerator.device)
                    flag.hit = bool(accelerator.reduce(hit, reduction="sum").item() > 0)
        except KeyboardInterrupt:  # a second Ctrl-C: the step in progress may be half applied
            flag.hit = torn = True
        if flag.hit and step < target:
            interrupted = True
            if not torn:  # a torn state would be saved under the previous step's number
                last_ckpt = save(step)
    if state is not None and step == start >= target and data.val is not None and \
            not (output / "model").is_dir():
        # resumed at its last step, whose validation failed (a damaged image, mended since):
        # the model is validated before it is written, as a run that ends there is (a run
        # that finished, its model written, is not validated again)
        scores, failed = _validate_on_main(stage, data.val, output, step, accelerator)
        if _in_any_process(accelerator, failed is not None):
            raise _stopped(failed, _VALIDATION_ELSEWHERE)
        if main:
            validation = scores
            log.log(step, validation)
            report(progress, "validation", step, None, **validation)
        accelerator.wait_for_everyone()
    log.close()
    if hasattr(batches, "close"):  # a device stream's worker processes end here, not at GC
        try:
            batches.close()
        except Exception:  # noqa: BLE001 - workers a signal already ended
            if not flag.hit:
                raise
    flag.pass_on_sigterm()
    model_folder = None
    if not interrupted:
        accelerator.wait_for_everyone()
        if main:
            model_folder = output / "model"
            with atomic_folder(model_folder, replace=True) as tmp:
                stage.save_output(tmp)
                ckpt.write_json_atomic(tmp / "training.json", {**resolved, "steps": step})
        accelerator.wait_for_everyone()
    return TrainResult(step=step, output=output, model_folder=model_folder, checkpoint=last_ckpt,
                       interrupted=interrupted, out_of_time=out_of_time,
                       terminated=interrupted and flag.signum == signal.SIGTERM, torn=torn,
                       last_losses=losses, validation=validation,
                       seconds=time.perf_counter() - began, main_process=main,
                       start_step=start)
