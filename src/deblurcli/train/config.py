"""Training configuration: dataclasses, config files (TOML / YAML / JSON) and flag overrides.

A run's settings come from three layers, later ones winning: the dataclass defaults, an optional
``--config FILE`` and the command-line flags the user actually gave. The resolved configuration
is saved (as JSON) next to every checkpoint and in the output model folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deblurcli.errors import DeblurcliError

# Choice lists, defined once here (this module imports no torch, so the CLI can use them).
LAYOUT_CHOICES = ("auto", "gopro", "realblur", "synth", "folders")
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
LR_SCHEDULE_CHOICES = ("constant", "cosine")
PERCEPTUAL_CHOICES = ("dists", "lpips", "stlpips", "none")
PIXEL_LOSS_CHOICES = ("l1", "l2")
ADAPTER_CHOICES = ("real", "synthetic")
VAE_MODES = ("joint", "freeze-e2", "no-skips")
PRESET_CHOICES = ("compact", "sd21", "tiny")  # models.presets.PRESETS (which imports torch)

PAPER_PROGRESSIVE_SIZES: tuple[int, ...] = (160, 192, 256, 320, 384, 448, 512)
PAPER_PROGRESSIVE_STEPS = 10_000


@dataclass
class DataConfig:
    """Where training pairs come from and how they are cropped.

    One main source: ``data`` (a GoPro root, a RealBlur list file, a ``synth`` output folder;
    ``layout`` says which or ``auto``), ``blur`` + ``sharp`` folders, or ``sharp_photos`` (pairs
    synthesised on the fly with trajectory kernels); and/or ``frames`` (folders of video frames,
    averaged on the fly: real blur). With both, a sample comes from the frames with probability
    ``real_fraction``. ``device_data`` keeps ``sharp_photos`` and ``frames`` in the accelerator's
    memory and makes every pair there (:mod:`deblurcli.train.ondevice`); ``workers`` then draws
    the kernels of future batches in that many processes.
    """

    data: str | None = None
    layout: str = "auto"
    split: str = "train"
    data_root: str | None = None
    blur: str | None = None
    sharp: str | None = None
    sharp_photos: str | None = None
    frames: str | None = None
    frames_per_blur: int = 7
    real_fraction: float = 0.25
    device_data: bool = False
    crop: int = 256
    augment: bool = True
    val_data: str | None = None
    val_count: int = 0
    val_size: int = 256
    workers: int = 0


@dataclass
class CommonConfig(DataConfig):
    """Settings shared by both stages (see ``docs/training.md``).

    ``time_budget`` (seconds, 0 = none) bounds a run's wall clock: once the step rate is known
    the run plans the steps that fit (a cosine schedule then ends at that step), and in any case
    it stops, checkpoints and writes its model when the time is up.
    """

    output: str = "runs/train"
    max_steps: int = 1000
    batch_size: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    seed: int = 0
    grad_accum: int = 1
    mixed_precision: str = "no"
    grad_checkpointing: bool = False
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 500
    log_every: int = 10
    perceptual: str = "stlpips"
    perceptual_fallback: str | None = None
    resume: str | None = None
    cpu: bool = False
    time_budget: float = 0.0


@dataclass
class VaeTrainConfig(CommonConfig):
    """Stage 1 (eVAE, paper Sec. 3.1.3).

    ``mode``: ``joint`` (eVAE₃: E1, E2 and the decoder train), ``freeze-e2`` (eVAE₂: E2 frozen),
    ``no-skips`` (plain VAE fine-tuning: E2(sharp) → decoder without skips, the ablation baseline).
    ``alpha`` weighs the perceptual term of ``L1 + α·perceptual`` (``pixel_loss="l2"`` puts the
    mean squared error in place of L1); ``latent_weight`` (β) weighs
    ``‖E1(blurry) − sg(E2(sharp))‖²``, for eVAEs trained from scratch (see ``train/vae.py``);
    ``blurry_decode_weight`` (δ) weighs the pixel loss of the decoder on E1's own latent.
    """

    mode: str = "joint"
    alpha: float = 1.0
    latent_weight: float = 0.0
    blurry_decode_weight: float = 0.0
    pixel_loss: str = "l1"
    base_model: str | None = None
    preset: str | None = None
    evae_config: str | None = None


@dataclass
class DiffusionTrainConfig(CommonConfig):
    """Stage 2 (one-step UNet + LoRA adapters, paper Sec. 3.2).

    ``adapter`` is ``real`` or ``synthetic`` (the LoRA that trains) unless ``full`` trains every
    UNet weight. ``lambda1``/``lambda2`` weigh the edge-aware perceptual and GAN terms;
    ``latent_weight`` adds ``‖ẑ_h − sg(E2(sharp))‖²`` (default 0; for from-scratch models).
    ``train_encoder`` (only with ``full``) also trains the eVAE's blurry encoder E1 and its skip
    blocks, so that the latent the UNet starts from can change too (for from-scratch models).
    """

    evae: str | None = None
    base_model: str | None = None
    preset: str | None = None
    init: str | None = None
    full: bool = False
    train_encoder: bool = False
    adapter: str = "synthetic"
    lora_rank: int | None = None
    lambda1: float = 1.0
    lambda2: float = 1.0
    latent_weight: float = 0.0
    disc_lr: float | None = None
    gan_start: int = 0
    progressive: bool = False
    progressive_steps: int = PAPER_PROGRESSIVE_STEPS
    progressive_sizes: list[int] = field(default_factory=lambda: list(PAPER_PROGRESSIVE_SIZES))


C = TypeVar("C", bound=CommonConfig)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML (needs PyYAML) or JSON config file into a flat dictionary.

    Keys may use dashes or underscores; a ``[train]`` / ``[data]`` table is flattened.

    Raises:
        DeblurcliError: the file is missing, unparsable or of an unknown kind.
    """
    path = Path(path)
    if not path.is_file():
        raise DeblurcliError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise DeblurcliError(f"{path}: TOML config files need Python 3.11+ or the "
                                         "tomli package; or use YAML / JSON") from None
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise DeblurcliError(f"{path}: YAML config files need PyYAML "
                                     "(pip install pyyaml), or use TOML") from None
            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise DeblurcliError(f"{path}: unknown config kind {suffix!r}; "
                                 "use .toml, .yaml or .json")
    except DeblurcliError:
        raise
    except Exception as exc:  # noqa: BLE001 - parser errors of three libraries
        raise DeblurcliError(f"cannot parse config file {path}: {' '.join(str(exc).split())}") \
            from None
    if not isinstance(raw, dict):
        raise DeblurcliError(f"{path}: the config must be a table of settings")
    flat: dict[str, Any] = {}

    def put(key: Any, value: Any) -> None:
        name = str(key).replace("-", "_")
        if name in flat:  # max-steps and max_steps, or a key in two tables: which one wins?
            raise DeblurcliError(f"{path}: the setting {name.replace('_', '-')} is given twice")
        flat[name] = value

    for key, value in raw.items():
        if key == "frozen_digests" and "kind" in raw:
            continue  # a run's config.json: a record of its sources, not a table of settings
        if isinstance(value, dict):
            for sub_key, sub_value in value.items():
                put(sub_key, sub_value)
        else:
            put(key, value)
    return flat


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def _typed(key: str, value: Any, kind: Any) -> Any:
    """A config file's ``value`` for the setting ``key`` of type ``kind`` (``int``, ``float``,
    ``bool``, ``str``, ``X | None``, ``list[int]``); a whole number is taken as a float.

    Raises:
        DeblurcliError: a value of another type (``"false"`` for a switch, ``"2"`` for a
            number), which would otherwise run silently wrong or fail deep inside training.
    """
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if value is None:
            return None
        kind = next(arg for arg in args if arg is not type(None))
    what = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if typing.get_origin(kind) is list:
        if isinstance(value, (list, tuple)):
            return [_typed(key, item, typing.get_args(kind)[0]) for item in value]
        expected = "a list of " + {int: "whole numbers", float: "numbers", str: "strings"}.get(
            typing.get_args(kind)[0], "values")
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is float and isinstance(value, str) and _is_number(value):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-4, without a dot, as a string
    elif kind is str and isinstance(value, str):
        return value
    else:
        expected = what.get(kind, getattr(kind, "__name__", str(kind)))
    raise DeblurcliError(f"invalid setting in the config file: {key.replace('_', '-')} must be "
                         f"{expected}, got {value!r}")


def build_config(cls: type[C], file_values: Mapping[str, Any] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> C:
    """Defaults ← ``file_values`` ← ``overrides`` (``None`` overrides are ignored).

    Raises:
        DeblurcliError: an unknown key in the config file.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    types = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        if key not in names:
            raise DeblurcliError(f"unknown setting {key!r} in the config file; "
                                 f"known: {', '.join(sorted(names))}")
        values[key] = _typed(key, value, types[key])
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return cls(**values)


def config_to_dict(config: CommonConfig) -> dict[str, Any]:
    """JSON-ready dictionary of a configuration (with its kind)."""
    data = dataclasses.asdict(config)
    data["kind"] = type(config).__name__
    return data


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Inverse of :func:`config_to_dict` (ignores the ``kind`` key)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def validate_common(config: CommonConfig) -> None:
    """Check values that would otherwise fail deep inside training.

    Raises:
        DeblurcliError: one line naming the bad setting.
    """
    def bad(msg: str) -> DeblurcliError:
        return DeblurcliError(f"invalid setting: {msg}")

    if config.max_steps < 1:
        raise bad("max_steps must be >= 1")
    if config.batch_size < 1:
        raise bad("batch_size must be >= 1")
    if config.grad_accum < 1:
        raise bad("grad_accum must be >= 1")
    if config.lr <= 0:
        raise bad("lr must be > 0")
    if config.crop < 8 or config.crop % 8:
        raise bad(f"crop must be a positive multiple of 8 (got {config.crop})")
    if config.val_size < 8 or config.val_size % 8:
        raise bad(f"val_size must be a positive multiple of 8 (got {config.val_size})")
    if config.lr_schedule not in LR_SCHEDULE_CHOICES:
        raise bad("lr_schedule must be constant or cosine")
    if config.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise bad("mixed_precision must be no, fp16 or bf16")
    if config.checkpoint_every < 1 or config.validate_every < 1 or config.log_every < 1:
        raise bad("checkpoint_every, validate_every and log_every must be >= 1")
    if config.layout not in LAYOUT_CHOICES:
        raise bad("layout must be auto, gopro, realblur, synth or folders")
    if not 0.0 <= config.real_fraction <= 1.0:
        raise bad(f"real_fraction must be in [0, 1] (got {config.real_fraction})")
    if config.seed < 0:
        raise bad(f"seed must be >= 0 (got {config.seed})")
    if config.time_budget < 0:
        raise bad(f"time_budget must be >= 0 seconds (got {config.time_budget})")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise bad(f"weight_decay must be >= 0 (got {config.weight_decay})")
    for item in dataclasses.fields(config):  # (lr = inf trained to NaN and ended with exit 0)
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(f"{item.name} must be a finite number (got {value})")
    for name in ("alpha", "lambda1", "lambda2", "latent_weight", "max_grad_norm",
                 "blurry_decode_weight"):
        value = getattr(config, name, None)
        if value is not None and value < 0:
            raise bad(f"{name} must be >= 0 (got {value})")
    if getattr(config, "disc_lr", None) is not None and config.disc_lr <= 0:
        raise bad(f"disc_lr must be > 0 (got {config.disc_lr})")
    if config.val_data and config.val_count:  # one validation set: the count would be ignored
        raise bad("give --val-data or --val-count, not both")


#: Settings that name local files or folders (``base_model`` may also be a hub id).
LOCAL_PATH_KEYS = ("data", "data_root", "blur", "sharp", "sharp_photos", "frames", "val_data",
                   "evae", "evae_config", "init", "base_model", "output", "resume")


def with_absolute_paths(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every existing local path of :data:`LOCAL_PATH_KEYS` made absolute.

    A run saves its settings this way, so ``--resume latest -o RUN`` (and the probe scripts)
    work from any directory. Paths that do not exist here -- a hub id -- are kept as given.
    """
    out = dict(values)
    for key in LOCAL_PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and Path(value).exists():
            out[key] = os.path.abspath(value)
    return out


#: Settings that shape the model or what is trained: a resumed run keeps the checkpoint's.
FIXED_ON_RESUME = ("preset", "lora_rank", "full", "adapter", "train_encoder", "mode")
# the two flags of those that are switches: (on, off)
_SWITCHES = {"full": ("full", "lora"), "train_encoder": ("train-encoder", "frozen-encoder")}


# what a run's config.json records besides its settings: how it was started (a new run from
# those settings starts anew) and the frozen sources' digests (checked on resume)
RUN_RECORD_KEYS = ("kind", "frozen_digests", "resume")


def _check_kind(cls: type, kind: Any, what: str) -> None:
    """Refuse the saved configuration of the other stage (``kind`` its class name)."""
    if kind in (None, cls.__name__):
        return
    commands = {"VaeTrainConfig": "train-vae", "DiffusionTrainConfig": "train-diffusion"}
    raise DeblurcliError(f"{what} a {commands.get(str(kind), str(kind))} run, not a "
                         f"{commands.get(cls.__name__, cls.__name__)} one")


def resolve_config(cls: type[C], config_file: str | None = None,
                   overrides: Mapping[str, Any] | None = None) -> C:
    """Defaults ← (the resumed checkpoint's config) ← ``config_file`` ← ``overrides``.

    With ``resume`` set (in the file or the flags), the checkpoint's saved configuration is the
    base, so ``--resume latest -o RUN`` alone continues a run with its original settings.

    Raises:
        DeblurcliError: unreadable config file, unknown keys, or nothing to resume from.
    """
    from deblurcli.train.checkpoint import resolve_resume

    file_values = read_config_file(config_file) if config_file else {}
    if config_file and "kind" in file_values:  # a run's config.json: its settings, reused
        _check_kind(cls, file_values["kind"], f"config file {config_file} holds the settings of")
        file_values = {k: v for k, v in file_values.items() if k not in RUN_RECORD_KEYS}
    config = build_config(cls, file_values, overrides)
    path = resolve_resume(config.resume, config.output)
    if path is None:
        return config
    try:
        saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DeblurcliError(f"cannot read the configuration of checkpoint {path}: {exc}") \
            from None
    _check_kind(cls, saved.get("kind"), f"checkpoint {path} was written by")
    base = config_from_dict(cls, saved)
    merged = dataclasses.asdict(base)
    given = {**file_values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    for key in FIXED_ON_RESUME:
        if key in given and key in merged and given[key] != merged[key]:
            flag = key.replace("_", "-")
            was = "not given" if merged[key] is None else repr(merged[key])
            if key in _SWITCHES and isinstance(given[key], bool):  # as typed: --lora, not --full
                flag = _SWITCHES[key][not given[key]]
                was = ("not given" if merged[key] is None
                       else "--" + _SWITCHES[key][not merged[key]])
            if key == "lora_rank" and merged.get("init"):  # --init brings its adapters' rank
                raise DeblurcliError("--lora-rank cannot change when a run resumes: its adapters "
                                     f"come from --init {merged['init']}; leave --lora-rank out")
            anew = "with --init" if "init" in merged else "in a new folder"  # (train-vae: no --init)
            raise DeblurcliError(f"--{flag} cannot change when a run resumes (it was {was}, the "
                                 "checkpoint's model is built that way); leave --"
                                 f"{flag} out, or start a new run {anew}")
    merged.update(given)
    merged["resume"] = str(path)
    if "output" not in given:  # the run that holds the checkpoint, not where it was first written
        merged["output"] = str(_run_of(path))
    return cls(**merged)


def _run_of(checkpoint: Path) -> Path:
    """The run folder that holds ``checkpoint`` (``RUN/checkpoints/step-N``); a checkpoint
    elsewhere (set aside under ``superseded/``, copied out) names none: -o must say where.

    Raises:
        DeblurcliError: ``checkpoint`` lies in no run folder.
    """
    from deblurcli.train.checkpoint import CHECKPOINT_DIR

    run = checkpoint.parent.parent
    if checkpoint.parent.name == CHECKPOINT_DIR and (run / "config.json").is_file():
        return run
    raise DeblurcliError(f"--resume {checkpoint}: it is not inside a run folder; give -o RUN, "
                         "the folder the resumed run writes to")
