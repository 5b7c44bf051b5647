"""A model folder's record, read without torch: its files, ``model_index.json`` and checksums.

What a run needs to know about a model folder before (or instead of) loading any weights: where
the folder is (a path, the packaged ``weights/`` folder or a Hugging Face hub id), whether it is
one (``model_index.json`` with deblurcli's record), whether its files are intact
(``checksums.sha256``) and the γ a fused folder holds. The ONNX Runtime back-end starts from here
without importing torch; :mod:`deblurcli.modelfolder` (the weights) builds on it. The layout is
described in :mod:`deblurcli.modelfolder`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from deblurcli.errors import WeightsError

INDEX_FILE = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' SAFETENSORS_WEIGHTS_NAME
DISCRIMINATOR_FILE = "training/discriminator.safetensors"
CHECKSUM_FILE = "checksums.sha256"
CONFIG_FILE = "config.json"  # a component's settings (diffusers' CONFIG_NAME)
PIPELINE_CLASS = "OSDDPipeline"
RECORD_KEY = "_deblurcli"  # diffusers ignores model_index keys that start with "_"
FORMAT_VERSION = 2
#: component -> (library, class) as diffusers' ``register_modules`` writes them.
COMPONENTS = {
    "evae": ("deblurcli.models.evae", "EVAE"),
    "prompt": ("deblurcli.models.onestep", "OneStepPrompt"),
    "unet": ("diffusers", "UNet2DConditionModel"),
}
NO_DEFAULT_MODEL = ("no default model is installed yet; pass --weights MODEL_DIR, a model folder "
                    "written by deblurcli train-diffusion (see docs/training.md)")

PathLike = str | Path


def default_weights_dir() -> Path:
    """The packaged weights folder (``deblurcli/weights``); it may not exist yet."""
    return Path(__file__).resolve().parent / "weights"


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def offline_requested(flag: bool = False) -> bool:
    """True with ``--offline`` (``flag``) or when ``HF_HUB_OFFLINE`` (else
    ``TRANSFORMERS_OFFLINE``) is set to a true value as huggingface_hub reads it (1, true, yes,
    on, in any case)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag or env.upper() in ("1", "TRUE", "YES", "ON")


def is_hub_id(source: PathLike) -> bool:
    """Whether :func:`resolve_model` takes ``source`` for a Hugging Face hub id: no such path,
    ``owner/name``, and no folder ``owner`` here (``runs/model`` with a ``runs/`` folder is a
    mistyped path, not a hub id)."""
    from deblurcli.models.pretrained import looks_like_hub_id

    path = Path(source)
    return not path.exists() and path.resolve() != default_weights_dir() and \
        looks_like_hub_id(str(source)) and not path.parent.is_dir()


def resolve_model(source: PathLike, *, offline: bool = False) -> Path:
    """The local folder of ``source``: a folder, or a Hugging Face hub id (read from the local
    cache; fetched once -- model files only -- unless ``offline`` or ``HF_HUB_OFFLINE=1``)."""
    path = Path(source)
    if path.exists() or path.resolve() == default_weights_dir():
        return path
    from deblurcli.models.pretrained import hf_download_command

    if not is_hub_id(source):
        raise WeightsError(f"model folder not found: {source}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = offline_requested(offline)
    try:
        cached = Path(snapshot_download(str(source), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached, missing = None, "is not in the Hugging Face cache"
    else:
        lacking = _lacking(cached)  # a first fetch that was cut short
        if lacking is None:
            return cached
        missing = f"lacks {lacking} in the Hugging Face cache"
    if offline:
        raise WeightsError(f"{source} {missing} and the run is offline; fetch it once with "
                           f"`{hf_download_command(str(source))}`")
    try:
        return Path(snapshot_download(str(source), allow_patterns=[
            "*.json", "*.safetensors", CHECKSUM_FILE, "*.md"]))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise WeightsError(_fetch_failed(str(source), exc)) from None


def _fetch_failed(source: str, exc: Exception) -> str:
    """The line for a hub id that could not be fetched: a mistyped folder (``./mdl/typo``
    reaches here as ``mdl/typo``) must not read as a network fault only."""
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    folder = "if it is meant to be a model folder, check its path"
    if isinstance(exc, RepositoryNotFoundError) and not isinstance(exc, GatedRepoError):
        return (f"{source} is no model folder here, nor a model on the Hugging Face hub that "
                f"this machine may read (a private one needs `hf auth login`; {folder})")
    if isinstance(exc, LocalEntryNotFoundError):  # no network, or the hub did not answer
        return (f"{source} is no model folder here, nor in the Hugging Face cache, and it "
                f"cannot be fetched from the hub now (no network, or the hub did not answer; "
                f"{folder})")
    text = " ".join(str(exc).split())  # a gated model: the hub's words on access
    if len(text) > 160:  # at a word, not in the middle of one
        text = text[:160].rsplit(" ", 1)[0] + " …"
    return f"cannot fetch model {source}: {text}"


def _lacking(folder: Path) -> str | None:
    """The first file a fetched model folder lacks (its checksums, a file they list), or None
    (a checksum file that cannot be read is the loader's to report: fetching does not mend it)."""
    if not (folder / CHECKSUM_FILE).is_file():
        return CHECKSUM_FILE
    try:
        names = [name for _, name in _checksum_lines(folder)]
    except WeightsError:
        return None
    return next((name for name in names if not (folder / name).is_file()), None)


def read_model_index(folder: PathLike) -> dict[str, Any]:
    """``model_index.json`` of a model folder with its record, checked (WeightsError)."""
    folder = Path(folder)
    if folder.resolve() == default_weights_dir() and not (folder / INDEX_FILE).is_file():
        raise WeightsError(NO_DEFAULT_MODEL)
    if folder.is_file():
        hint = " (an adapter file goes to --lora)" if folder.suffix == ".safetensors" else ""
        raise WeightsError(f"{folder} is a file, not a model folder{hint}")
    if not folder.is_dir():
        raise WeightsError(f"model folder not found: {folder}")
    path = folder / INDEX_FILE
    if not path.is_file():
        if (folder / "config.json").is_file() and (folder / "evae.safetensors").is_file():
            raise WeightsError(f"{folder} is a model folder of an early development version "
                               "of deblurcli, before the diffusers format; retrain or re-export "
                               "it with this version")
        if (folder / "model" / INDEX_FILE).is_file():  # train-diffusion's -o, the run
            raise WeightsError(f"{folder} is a training run, not a model folder: its model is "
                               f"{folder / 'model'}")
        raise WeightsError(f"{folder} is not a deblurcli model folder (missing {INDEX_FILE})")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{INDEX_FILE} in {folder} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
        raise WeightsError(f"{path} is not an {PIPELINE_CLASS} (its _class_name is "
                           f"{index.get('_class_name') if isinstance(index, dict) else None})")
    record = index.get(RECORD_KEY)
    if not isinstance(record, dict) or not isinstance(record.get("format_version"), int):
        raise WeightsError(f"{path} lacks its '{RECORD_KEY}' record")
    if record["format_version"] > FORMAT_VERSION:
        raise WeightsError(f"{folder} uses model format version {record['format_version']}; "
                           f"this deblurcli reads up to {FORMAT_VERSION} (upgrade deblurcli)")
    for name in COMPONENTS:
        if not (folder / name / "config.json").is_file():
            raise WeightsError(f"missing file {name}/config.json in {folder}")
    return index


def verify_checksums(folder: PathLike) -> list[str]:
    """Check every file listed in ``checksums.sha256``; return the listed names (WeightsError)."""
    folder = Path(folder)
    names = []
    for digest, name in _checksum_lines(folder):
        if not (folder / name).is_file():
            raise WeightsError(f"missing file {name} in {folder}")
        if sha256_file(folder / name) != digest:
            raise WeightsError(f"{name} in {folder} is corrupt (sha256 checksum mismatch)")
        names.append(name)
    # every file a run reads (the ONNX export's cache key holds this list, not the files), and
    # every other one diffusers could read in their place (a sharded weights index, a .bin)
    required = []
    if (folder / INDEX_FILE).is_file():
        adapters = read_model_index(folder)[RECORD_KEY].get("adapters") or {}
        required = [INDEX_FILE, *(f"{c}/{f}" for c in COMPONENTS for f in (CONFIG_FILE,
                                                                           WEIGHTS_FILE)),
                    *(str(file) for file in adapters.values())]
        for c in COMPONENTS:  # diffusers prefers a sharded index to the weights file
            index = folder / c / f"{WEIGHTS_FILE}.index.json"
            if index.is_file():
                required.append(f"{c}/{index.name}")
                required += sorted({f"{c}/{shard}" for shard in _shards(index)})
    unlisted = [name for name in required if name not in names]
    if unlisted:
        raise WeightsError(f"{CHECKSUM_FILE} in {folder} does not list {unlisted[0]}")
    return names


def _shards(index: Path) -> list[str]:
    """The shard files a sharded weights index names (none when it cannot be read: then it is
    the index itself that must be listed, and is checked)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return [str(name) for name in weight_map.values()]
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return []


#: a line of ``sha256sum`` (text mode: two spaces; binary mode, ``-b``: a space and a star)
_CHECKSUM_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


def _checksum_lines(folder: Path) -> list[tuple[str, str]]:
    """``(sha256, name)`` of each line of ``folder``'s ``checksums.sha256`` (WeightsError)."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        raise WeightsError(f"missing file {CHECKSUM_FILE} in {folder}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WeightsError(f"{CHECKSUM_FILE} in {folder} is not a text file of checksums") \
            from None
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        found = _CHECKSUM_LINE.fullmatch(line.rstrip("\r"))
        name = found.group(2).strip() if found else ""
        if not name or name.startswith("/") or \
                any(part in ("", ".", "..") for part in name.split("/")):
            raise WeightsError(f"{CHECKSUM_FILE} in {folder} is malformed at line {number}")
        lines.append((found.group(1).lower(), name))
    return lines


#: the γ a model with one adapter runs as (W + Δ·x: γ = 1 is the real adapter alone)
ONE_ADAPTER_GAMMA = {"real": 1.0, "synthetic": 0.0}


def held_gamma(folder: PathLike, lora: PathLike | None = None) -> tuple[float, str] | None:
    """``(γ, what holds it)`` for a run of ``folder`` whose γ is fixed whatever ``--gamma``
    says, or ``None`` when γ is free: the folder's fused γ (``"fused"``), that recorded in the
    blend file ``lora`` (``"blend NAME"``), or that of a folder with one adapter, which runs
    whole (1 for ``"real adapter only"``, 0 for ``"synthetic adapter only"``)."""
    record = read_model_index(folder)[RECORD_KEY]
    fused = record.get("fused_gamma")
    if lora is not None:
        if fused is not None:  # as OSDDModel.fuse_adapter_file says it
            raise WeightsError(f"this model's adapters are already fused (gamma={fused:g}); an "
                               "adapter file needs an unfused model folder")
        from deblurcli.models import adapters as ad

        _, _, metadata = ad.read_lora_file(lora)
        return ad.blend_gamma(metadata, lora), f"blend {Path(lora).name}"
    if fused is not None:
        return float(fused), "fused"
    adapters = list(record.get("adapters") or {})
    if len(adapters) == 1 and adapters[0] in ONE_ADAPTER_GAMMA:
        return ONE_ADAPTER_GAMMA[adapters[0]], f"{adapters[0]} adapter only"
    return None


def fixed_gamma(folder: PathLike, lora: PathLike | None = None) -> float | None:
    """The γ of :func:`held_gamma`, or ``None`` when γ is free."""
    held = held_gamma(folder, lora)
    return None if held is None else held[0]


def gamma_ignored(held: tuple[float, str], gamma: float) -> str | None:
    """The note for a requested ``gamma`` that a run ignores, its γ being ``held`` (see
    :func:`held_gamma`), or None when they are equal."""
    fixed, how = held
    if abs(float(gamma) - fixed) <= 1e-9:
        return None
    if how.startswith("blend "):
        said = f"the {how} holds gamma={fixed:g}"
    elif how == "fused":
        said = f"this model's adapters are fused at gamma={fixed:g}"
    else:  # one adapter
        said = f"this model has only its {how.split()[0]} adapter (it runs as gamma={fixed:g})"
    return f"{said}; gamma={float(gamma):g} is ignored"
