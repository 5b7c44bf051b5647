"""The model folder: a trained OSDD model as a standard diffusers pipeline folder.

Layout (what ``OSDDPipeline.save_pretrained`` and ``train-diffusion`` write)::

    model_index.json              the pipeline: its components, and deblurcli's record under
                                  "_deblurcli" (adapter files, fused gamma, training info)
    evae/config.json              the eVAE (ModelMixin: EVAE.from_pretrained(folder, subfolder="evae"))
    evae/diffusion_pytorch_model.safetensors
    unet/...                      the base UNet without LoRA (UNet2DConditionModel.from_pretrained)
    prompt/...                    the learned prompt and the timestep (OneStepPrompt)
    lora_real.safetensors         the adapters: diffusers LoRA files
    lora_synthetic.safetensors    (unet.load_lora_adapter(folder, weight_name=..., prefix=None))
    training/discriminator.safetensors   optional: the latent discriminator, to continue training
    checksums.sha256              "sha256  relative/path" lines (sha256sum format), written last

A *fused* folder (``deblurcli blend --fuse``) has no LoRA files: its UNet already holds the
γ-blend, recorded as ``"fused_gamma"``. Only safetensors are read or written, never pickles.
A folder is written into a temporary sibling and renamed into place, so an interrupted save
leaves the previous folder (or none), never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from deblurcli.errors import WeightsError
from deblurcli.images import atomic_save_safetensors, atomic_write_bytes, fsync_folder
from deblurcli.modelindex import (  # noqa: F401 - the folder's record, re-exported here
    CHECKSUM_FILE, COMPONENTS, DISCRIMINATOR_FILE, FORMAT_VERSION, INDEX_FILE, NO_DEFAULT_MODEL,
    ONE_ADAPTER_GAMMA, PIPELINE_CLASS, RECORD_KEY, WEIGHTS_FILE, PathLike, default_weights_dir,
    fixed_gamma, gamma_ignored, held_gamma, read_model_index, resolve_model, sha256_file,
    verify_checksums)
from deblurcli.models import adapters as ad

if TYPE_CHECKING:
    from deblurcli.models.evae import EVAE
    from deblurcli.models.onestep import OneStepPrompt
    from deblurcli.models.osdd import OSDDModel

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lora_file(name: str) -> str:
    """File name of adapter ``name`` inside a model folder."""
    return f"lora_{name}.safetensors"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("deblurcli", "torch", "diffusers", "peft", "safetensors"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported storage dtype {dtype}")


# ----------------------------------------------------------------------------- saving
def _write_component(folder: Path, module: nn.Module, state: Mapping[str, Tensor],
                     dtype: torch.dtype, **config_changes: Any) -> None:
    """What ``ModelMixin.save_pretrained`` writes (config.json + one safetensors file), for a
    state other than the module's own (LoRA layers stripped, E2 dropped, another dtype)."""
    folder.mkdir(parents=True)
    config = json.loads(module.to_json_string())
    config.update(config_changes)
    atomic_write_bytes(folder / "config.json",
                       (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save_safetensors(folder / WEIGHTS_FILE, tensors, {"format": "pt"})


def _base_unet_state(unet: nn.Module) -> dict[str, Tensor]:
    """The UNet's own weights without LoRA factors, under the plain diffusers names."""
    return {key.replace(".base_layer.", "."): value for key, value in unet.state_dict().items()
            if ".lora_" not in key}


def _is_model_folder(folder: Path) -> bool:
    """A folder deblurcli wrote: an OSDDPipeline folder, or one of an early development format."""
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        return isinstance(index, dict) and index.get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError, UnicodeDecodeError):
        return (folder / "config.json").is_file() and (folder / "evae.safetensors").is_file()


def check_replaceable(folder: Path) -> None:
    """WeightsError unless ``folder`` is absent, empty or a model folder deblurcli wrote."""
    if folder.exists() and not folder.is_dir():
        raise WeightsError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not _is_model_folder(folder):
        raise WeightsError(f"{folder} exists and is not a deblurcli model folder; choose a new "
                           "or empty folder")


def _private(folder: Path, kind: str) -> Path:
    """A hidden name beside ``folder`` of this call's own (``kind``: tmp, old): threads of one
    process that shared one saved into each other's folder, and put a broken one in place."""
    return folder.with_name(f".{folder.name}.{kind}-{os.getpid()}-{threading.get_ident()}")


def check_apart(src: PathLike, out: PathLike) -> None:
    """WeightsError when folder ``out`` is ``src``, lies inside it or holds it: a copy written
    there would replace the folder it is made from."""
    src, out = Path(src).resolve(), Path(out).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise WeightsError(f"the output folder must be outside {src} (and not hold it)")


_REPLACING = threading.Lock()  # threads that save one folder at once: each in turn, last wins


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` to ``folder``; a previous model folder there is replaced."""
    with _REPLACING:
        check_replaceable(folder)
        if folder.is_dir() and any(folder.iterdir()):
            old = _private(folder, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
        fsync_folder(folder.parent)


def save_model_folder(folder: PathLike, model: OSDDModel, *, extra: dict | None = None,
                      storage_dtype: torch.dtype = torch.float32,
                      include_sharp_encoder: bool = True,
                      discriminator: Mapping[str, Tensor] | None = None) -> None:
    """Write ``model`` as a model folder (see the module docstring).

    Args:
        folder: destination; an earlier model folder there is replaced, any other non-empty
            folder is refused (WeightsError).
        model: the :class:`OSDDModel` (adapters unfused, or fused via :meth:`OSDDModel.fuse`).
        extra: free-form JSON-serialisable info kept in the record (training run, ...).
        storage_dtype: ``torch.float32`` / ``float16`` / ``bfloat16`` on disk (loads in any
            dtype), or a name (``fp32``, ``fp16``, ``bf16``).
        include_sharp_encoder: keep E2 (needed to resume training; not needed for inference).
        discriminator: the latent discriminator's weights, kept (float32) so that
            ``train-diffusion --init`` continues its GAN term instead of restarting it.
    """
    from deblurcli.device import torch_dtype

    storage_dtype = torch_dtype(storage_dtype)
    _dtype_name(storage_dtype)  # before any work: one the folder can record
    folder = Path(folder).resolve()
    check_replaceable(folder)  # before any work: a user's own folder is never touched
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _private(folder, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(tmp, model, extra=extra, storage_dtype=storage_dtype,
                      include_sharp_encoder=include_sharp_encoder, discriminator=discriminator)
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_folder(tmp: Path, model: OSDDModel, *, extra, storage_dtype, include_sharp_encoder,
                  discriminator) -> None:
    tmp.mkdir()
    evae = model.evae
    evae_state = evae.state_dict()
    keep_e2 = evae.encoder_sharp is not None and include_sharp_encoder
    if not keep_e2:
        evae_state = {k: v for k, v in evae_state.items()
                      if not k.startswith(("encoder_sharp.", "quant_conv_sharp."))}
    _write_component(tmp / "evae", evae, evae_state, storage_dtype, sharp_encoder=keep_e2)
    _write_component(tmp / "unet", model.unet, _base_unet_state(model.unet), storage_dtype)
    prompt = model.denoiser.prompt
    _write_component(tmp / "prompt", prompt, prompt.state_dict(), storage_dtype)
    adapters = {}
    for name in model.lora_specs:
        config = model.unet.peft_config[name].to_dict()
        ad.write_lora_file(tmp / lora_file(name), ad.adapter_state_dict(model.unet, name),
                           config, dtype=storage_dtype)
        adapters[name] = lora_file(name)
    if discriminator is not None:
        (tmp / DISCRIMINATOR_FILE).parent.mkdir()
        atomic_save_safetensors(tmp / DISCRIMINATOR_FILE,
                                {k: v.detach().float() for k, v in discriminator.items()},
                                {"format": "pt"})
    from diffusers import __version__ as diffusers_version

    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers_version,
             **{name: list(entry) for name, entry in COMPONENTS.items()},
             RECORD_KEY: {"format_version": FORMAT_VERSION, "adapters": adapters,
                          "fused_gamma": model.fused_gamma,
                          "storage_dtype": _dtype_name(storage_dtype),
                          "versions": _versions(), "extra": extra or {}}}
    atomic_write_bytes(tmp / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    lines = "".join(f"{sha256_file(tmp / name)}  {name}\n" for name in files)
    atomic_write_bytes(tmp / CHECKSUM_FILE, lines.encode())


# ----------------------------------------------------------------------------- loading
def _load_component(cls: type, folder: Path, name: str) -> nn.Module:
    """One component, refused when its weights file lacks a tensor of its settings or holds one
    they do not have (diffusers only warns, and leaves a missing one unset, which failed later
    as anything; an extra one meant a config.json of another network)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its missing-weights advice: "You should TRAIN"
    try:
        module, info = cls.from_pretrained(str(folder), subfolder=name, local_files_only=True,
                                           use_safetensors=True, torch_dtype=torch.float32,
                                           output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise WeightsError(f"cannot load {name}/ of {folder}: {reason}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    # (the names as diffusers takes them: those of older layouts renamed)
    for what, keys in (("lacks", info.get("missing_keys")),
                       ("has", info.get("unexpected_keys"))):
        if keys:
            keys = sorted(keys)
            raise WeightsError(f"{name}/ of {folder} {what} {len(keys)} tensor(s) its "
                               f"config.json {'needs' if what == 'lacks' else 'has no place for'}"
                               f": {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    return module


def load_components(folder: PathLike, *, verify: bool = True
                    ) -> tuple[EVAE, nn.Module, OneStepPrompt, dict[str, Any]]:
    """``(evae, unet, prompt, record)`` of a model folder, in float32 on the CPU, without
    adapters (the record names their files). ``verify``: check ``checksums.sha256`` first."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from deblurcli.models.evae import EVAE
    from deblurcli.models.onestep import OneStepPrompt

    folder = Path(folder)
    index = read_model_index(folder)
    if verify:
        verify_checksums(folder)
    evae = _load_component(EVAE, folder, "evae")
    unet = _load_component(UNet2DConditionModel, folder, "unet")
    prompt = _load_component(OneStepPrompt, folder, "prompt")
    return evae, unet, prompt, index[RECORD_KEY]


def load_model_folder(folder: PathLike, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, gamma: float = 0.7, fuse: bool = True,
                      vae_dtype: torch.dtype | None = None,
                      warn: Callable[[str], None] | None = None,
                      verify: bool = True, lora: PathLike | None = None,
                      offline: bool = False) -> OSDDModel:
    """Load a model folder (or a hub id, see :func:`resolve_model`) as an :class:`OSDDModel`
    in eval mode with ``gamma`` applied.

    Args:
        folder: the model folder (see the module docstring) or a hub id.
        device, dtype: where and in which dtype the UNet (and by default the eVAE) runs;
            ``device`` as ``--device`` takes it (``"auto"``, ``"cpu"``, ``"cuda:1"``, ...) or a
            ``torch.device``; ``dtype`` a ``torch.dtype`` or its name (``"fp16"``, ...).
        gamma: dual-adapter blend weight in [0, 1] (ignored, with a ``warn`` note, for a folder
            whose adapters are already fused).
        fuse: merge the blend into the UNet weights (fast); ``False`` keeps LoRA layers live so
            :meth:`OSDDModel.set_gamma` can change gamma later.
        vae_dtype: dtype of the eVAE (e.g. ``torch.float32`` with an fp16 UNet); default ``dtype``.
        warn: callback for one-line notes (library code never prints).
        verify: check ``checksums.sha256`` first.
        lora: an adapter file (``deblurcli blend``'s output) that replaces the folder's own
            adapters, merged into the UNet before the cast to ``dtype``; its recorded γ is fixed.
        offline: never fetch a hub id that is not in the local cache.

    Raises:
        WeightsError: missing/corrupt files, shape mismatches, or no default model installed.
        DeblurcliError: ``device`` is unknown or not available on this machine.
        ValueError: ``gamma`` outside [0, 1].
    """
    from deblurcli.device import torch_device, torch_dtype
    from deblurcli.models.onestep import OneStepDenoiser
    from deblurcli.models.osdd import OSDDModel

    device = torch_device(device)
    dtype = torch_dtype(dtype)
    vae_dtype = None if vae_dtype is None else torch_dtype(vae_dtype)
    folder = resolve_model(folder, offline=offline)
    evae, unet, prompt, record = load_components(folder, verify=verify)
    fused_gamma = record.get("fused_gamma")
    fused_gamma = None if fused_gamma is None else float(fused_gamma)
    adapters = dict(record.get("adapters") or {})
    for file in adapters.values():
        if not (folder / file).is_file():
            raise WeightsError(f"missing file {file} in {folder}")
    if fused_gamma is None and adapters:
        ad.check_gamma(gamma)
    try:
        denoiser = OneStepDenoiser(unet, prompt)
    except ValueError as exc:
        raise WeightsError(f"{folder}: {exc}") from None
    if fused_gamma is None:
        merged = _merge_without_peft(folder, unet, adapters, gamma=gamma, fuse=fuse, lora=lora)
        if merged is not None:  # the blend is in the UNet's weights; no peft imported
            model = OSDDModel(evae, denoiser, {}, fused_gamma=merged)
            return ready_model(model, gamma=gamma, fuse=fuse, device=device, dtype=dtype,
                               vae_dtype=vae_dtype, warn=warn, lora=lora)
    specs = {name: _check_adapter(unet, folder, file) for name, file in adapters.items()}
    for name, file in adapters.items():  # checked first: a UNet with LoRA layers hides its targets
        _load_adapter(unet, folder, file, name)
    model = OSDDModel(evae, denoiser, specs, fused_gamma=fused_gamma)
    if lora is not None:
        model.fuse_adapter_file(lora)
    return ready_model(model, gamma=gamma, fuse=fuse, device=device, dtype=dtype,
                       vae_dtype=vae_dtype, warn=warn, lora=lora)


def _check_adapter(unet: nn.Module, folder: Path, file: str) -> ad.LoraSpec:
    """The spec of adapter file ``file``, checked against the UNet (the same one-line
    WeightsError as the peft-free merge gives)."""
    spec, state, _ = ad.read_lora_file(folder / file)
    if spec is not None:
        ad.check_lora_state(unet, spec, state, file)
    return spec or ad.LoraSpec()


def _load_adapter(unet: nn.Module, folder: Path, file: str, name: str) -> None:
    """diffusers' ``load_lora_adapter`` for one adapter file (WeightsError)."""
    import warnings

    try:
        with warnings.catch_warnings():  # peft: "Already found a peft_config": intended
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            unet.load_lora_adapter(str(folder), weight_name=file, adapter_name=name, prefix=None)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise WeightsError(f"{file} does not fit the UNet of {folder} "
                           f"({' '.join(str(exc).split())[:160]})") from None


def _merge_without_peft(folder: Path, unet: nn.Module, adapters: Mapping[str, str], *,
                        gamma: float, fuse: bool, lora: PathLike | None) -> float | None:
    """Fuse the folder's γ-blend (``fuse``), or an adapter file (``lora``), into ``unet``
    without peft, with peft's arithmetic (:func:`deblurcli.models.adapters.merge_adapters_into`).

    Returns the γ the UNet now holds (an adapter file must record its blend's γ), or ``None``
    when this case needs live peft adapters: ``fuse=False`` without ``lora``, adapters other
    than exactly real + synthetic, files beyond a plain LoRA, or layer kinds the merge skips.
    """
    def plan(path: Path, weight: float | None):
        spec, state, metadata = ad.read_lora_file(path)
        return None if spec is None else (spec, state, weight, path.name), metadata

    if lora is not None:  # OSDDModel.fuse_adapter_file's result: the file's blend alone
        path = Path(lora)
        entry, metadata = plan(path, 1.0)
        gamma_of_file = ad.blend_gamma(metadata, path)
        checks = [plan(folder / file, None)[0] for file in adapters.values()]
        if entry is None or None in checks or not ad.merge_adapters_into(unet, checks + [entry]):
            return None
        return gamma_of_file
    if not fuse or set(adapters) != set(ad.ADAPTER_NAMES):
        return None
    g = float(gamma)
    entries = [plan(folder / adapters[ad.REAL], g)[0],
               plan(folder / adapters[ad.SYNTHETIC], 1.0 - g)[0]]
    if None in entries or not ad.merge_adapters_into(unet, entries):
        return None
    return g


def model_held_gamma(model: OSDDModel, lora: PathLike | None = None
                     ) -> tuple[float, str] | None:
    """:func:`held_gamma` of a loaded model (``lora``: the blend file fused into it)."""
    if model.fused_gamma is not None:
        return model.fused_gamma, "fused" if lora is None else f"blend {Path(lora).name}"
    if len(model.lora_specs) == 1 and next(iter(model.lora_specs)) in ONE_ADAPTER_GAMMA:
        only = next(iter(model.lora_specs))  # it runs whole: the γ of that adapter alone
        return ONE_ADAPTER_GAMMA[only], f"{only} adapter only"
    return None


def ready_model(model: OSDDModel, *, gamma: float, fuse: bool = True,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                vae_dtype: torch.dtype | None = None,
                warn: Callable[[str], None] | None = None,
                lora: PathLike | None = None) -> OSDDModel:
    """Put a model as loaded (float32, on the CPU) into its run state, in place.

    Sets the γ-blend (or fuses it into the UNet, in float32, before any cast to half precision),
    then moves the UNet to ``device``/``dtype`` and the eVAE to ``vae_dtype`` (default ``dtype``).
    A model whose adapters were fused when saved keeps that γ (``warn`` says so if ``gamma``
    differs). ``load_model_folder`` ends with this; ``deblurcli eval`` calls it once per γ.
    """
    held = model_held_gamma(model, lora)
    if held is not None:
        model.gamma = held[0]
        note = gamma_ignored(held, gamma)
        if warn is not None and note:
            warn(note)
    elif model.has_dual_adapters:
        if fuse:
            model.fuse(gamma)
        else:
            model.set_gamma(gamma)
    nn.Module.to(model.denoiser, device=device, dtype=dtype)
    nn.Module.to(model.evae, device=device, dtype=vae_dtype or dtype)
    return model.eval()


def _storage_dtype(folder: PathLike) -> torch.dtype:
    name = read_model_index(folder)[RECORD_KEY].get("storage_dtype", "float32")
    return _DTYPES.get(name, torch.float32)


def fuse_model_folder(src: PathLike, out: PathLike, gamma: float, *,
                      storage_dtype: torch.dtype | None = None) -> None:
    """Write a copy of model folder ``src`` whose UNet contains the gamma-blend (fused).

    The output keeps the source's storage dtype (unless ``storage_dtype`` is given) and drops
    the sharp encoder E2 (inference only).
    """
    ad.check_gamma(gamma)
    check_apart(src, out)
    record = read_model_index(src)[RECORD_KEY]
    if record.get("fused_gamma") is not None:
        raise WeightsError(f"{src} is already fused (gamma={record['fused_gamma']:g})")
    if set(record.get("adapters") or {}) != set(ad.ADAPTER_NAMES):
        raise WeightsError(f"{src} has no real/synthetic adapters to fuse")
    model = load_model_folder(src, gamma=gamma, fuse=True)
    extra = dict(record.get("extra") or {})
    extra["fused_from"] = str(Path(src).name)
    save_model_folder(out, model, extra=extra, storage_dtype=storage_dtype or _storage_dtype(src),
                      include_sharp_encoder=False)


def export_model_folder(src: PathLike, out: PathLike, *,
                        storage_dtype: torch.dtype = torch.float16,
                        extra: dict | None = None,
                        include_sharp_encoder: bool = False) -> None:
    """Write an inference copy of model folder ``src``: both adapters kept (γ stays free), the
    sharp encoder E2 dropped (training only; kept with ``include_sharp_encoder``, together with
    the latent discriminator, so that ``train-diffusion --init`` can continue with the latent
    and GAN terms) and weights stored as ``storage_dtype``.

    This is how a trained run becomes a shippable folder such as the packaged ``weights/``.
    ``extra`` entries are merged into the record's ``"extra"``.
    """
    check_apart(src, out)
    record = read_model_index(src)[RECORD_KEY]
    if record.get("fused_gamma") is not None:
        raise WeightsError(f"{src} is fused; export the unfused training output instead")
    model = load_model_folder(src, gamma=0.5, fuse=False)
    merged = dict(record.get("extra") or {})
    merged.update(extra or {})
    merged["exported_from"] = str(Path(src).resolve().name)
    save_model_folder(out, model, extra=merged, storage_dtype=storage_dtype,
                      include_sharp_encoder=include_sharp_encoder,
                      discriminator=read_discriminator(src) if include_sharp_encoder else None)


def read_discriminator(folder: PathLike) -> dict[str, Tensor] | None:
    """The latent discriminator's weights saved in a model folder, or ``None``."""
    from safetensors.torch import load_file

    path = Path(folder) / DISCRIMINATOR_FILE
    return load_file(str(path)) if path.is_file() else None
