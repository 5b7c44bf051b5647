"""The model folder: a trained OSDD model as JSON + safetensors files with checksums.

Layout (format version 1)::

    config.json                 format, configs, timestep, prompt length, LoRA specs, versions
    evae.safetensors            the eVAE (E2 optional)
    unet.safetensors            the base UNet without LoRA (absent when it comes from --base-model)
    prompt.safetensors          the learned prompt embedding, key "prompt_embeds" (1, N, D)
    lora_real.safetensors       the 'real' adapter (LoRA spec in the safetensors metadata)
    lora_synthetic.safetensors  the 'synthetic' adapter
    checksums.sha256            "sha256  filename" lines (sha256sum format) for every file above

A *fused* folder (``deblurcli blend --fuse``) has no LoRA files: its UNet already contains the
gamma-blend, recorded as ``"fused": {"gamma": g}`` in config.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deblurcli.errors import WeightsError
from deblurcli.images import atomic_write_bytes
from deblurcli.models import adapters as ad
from deblurcli.models.evae import EVAE
from deblurcli.models.onestep import OneStepDenoiser
from deblurcli.models.osdd import OSDDModel, load_base_unet

FORMAT_NAME = "deblurcli-osdd"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
EVAE_FILE = "evae.safetensors"
UNET_FILE = "unet.safetensors"
PROMPT_FILE = "prompt.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
CHECKSUM_FILE = "checksums.sha256"
PROMPT_KEY = "prompt_embeds"
NO_DEFAULT_MODEL = ("no default model is installed yet; pass --weights MODEL_DIR, a model folder "
                    "written by deblurcli train-diffusion (see docs/training.md)")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PathLike = str | Path


def lora_file(name: str) -> str:
    """File name of adapter ``name`` inside a model folder."""
    return f"lora_{name}.safetensors"


def default_weights_dir() -> Path:
    """The packaged weights folder (``deblurcli/weights``); it may not exist yet."""
    return Path(__file__).resolve().parent / "weights"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported storage dtype {dtype}")


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("deblurcli", "torch", "diffusers", "peft", "safetensors"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _json_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config (FrozenDict) as plain JSON values, private ``_`` keys dropped."""
    out = {}
    for key, value in dict(config).items():
        if key.startswith("_"):
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _base_unet_state(unet: nn.Module) -> dict[str, Tensor]:
    """The UNet's own weights without LoRA factors, under the plain diffusers names."""
    out = {}
    for key, value in unet.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out


def _cast(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


# ----------------------------------------------------------------------------- saving
def save_model_folder(folder: PathLike, model: OSDDModel, *, extra: dict | None = None,
                      storage_dtype: torch.dtype = torch.float32,
                      include_sharp_encoder: bool = True, include_unet: bool = True,
                      discriminator: Mapping[str, Tensor] | None = None) -> None:
    """Write ``model`` as a model folder (files written atomically, checksums last).

    Args:
        folder: destination (created; known model files from an earlier save are replaced).
        model: the :class:`OSDDModel` (adapters unfused, or fused via :meth:`OSDDModel.fuse`).
        extra: free-form JSON-serialisable info stored under ``"extra"`` (training run, ...).
        storage_dtype: ``torch.float32`` / ``float16`` / ``bfloat16`` on disk (loads in any dtype).
        include_sharp_encoder: keep E2 (needed to resume training; not needed for inference).
        include_unet: write ``unet.safetensors``; without it, loading needs ``base_model``.
        discriminator: the latent discriminator's weights, kept (float32) so that
            ``train-diffusion --init`` continues its GAN term instead of restarting it.
    """

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype_name = _dtype_name(storage_dtype)
    if not include_unet and model.fused_gamma is not None:
        raise ValueError("a fused model must include its UNet (the blend lives in its weights)")

    def write(name: str, state: Mapping[str, Tensor], meta: dict | None = None) -> None:
        ad.save_safetensors_atomic(folder / name, _cast(state, storage_dtype),
                                   meta or {"format": FORMAT_NAME})

    evae_config = _json_config(model.evae.config)
    evae_state = model.evae.state_dict()
    has_e2 = model.evae.encoder_sharp is not None and include_sharp_encoder
    if not has_e2:
        evae_state = {k: v for k, v in evae_state.items()
                      if not k.startswith(("encoder_sharp.", "quant_conv_sharp."))}
    evae_config["sharp_encoder"] = has_e2
    files = [EVAE_FILE, PROMPT_FILE]
    write(EVAE_FILE, evae_state)
    if include_unet:
        write(UNET_FILE, _base_unet_state(model.unet))
        files.append(UNET_FILE)
    write(PROMPT_FILE, {PROMPT_KEY: model.denoiser.prompt_embeds.detach()})
    for name, spec in model.lora_specs.items():
        ad.save_adapter_file(folder / lora_file(name), ad.adapter_state_dict(model.unet, name),
                             spec, dtype=storage_dtype)
        files.append(lora_file(name))
    if discriminator is not None:
        ad.save_safetensors_atomic(folder / DISCRIMINATOR_FILE,
                                   {k: v.detach().float().contiguous()
                                    for k, v in discriminator.items()}, {"format": FORMAT_NAME})
        files.append(DISCRIMINATOR_FILE)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "evae": evae_config,
        "unet": _json_config(model.unet.config),
        "timestep": int(model.denoiser.timestep),
        "prompt_tokens": int(model.denoiser.prompt_tokens),
        "lora": {name: spec.to_dict() for name, spec in model.lora_specs.items()},
        "fused": None if model.fused_gamma is None else {"gamma": float(model.fused_gamma)},
        "storage_dtype": dtype_name,
        "unet_weights": "included" if include_unet else "base_model",
        "files": files,
        "versions": _versions(),
        "extra": extra or {},
    }
    atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    files.append(CONFIG_FILE)
    stale = {EVAE_FILE, UNET_FILE, PROMPT_FILE, DISCRIMINATOR_FILE} | \
        {lora_file(n) for n in ad.ADAPTER_NAMES}
    for name in stale - set(files):
        (folder / name).unlink(missing_ok=True)
    lines = "".join(f"{sha256_file(folder / name)}  {name}\n" for name in sorted(files))
    atomic_write_bytes(folder / CHECKSUM_FILE, lines.encode())


# ----------------------------------------------------------------------------- checking
def read_model_config(folder: PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder, checked for format and version (WeightsError)."""
    folder = Path(folder)
    if folder.resolve() == default_weights_dir() and not (folder / CONFIG_FILE).is_file():
        raise WeightsError(NO_DEFAULT_MODEL)
    if not folder.is_dir():
        raise WeightsError(f"model folder not found: {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{folder} is not a deblurcli model folder (missing {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{CONFIG_FILE} in {folder} is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME:
        raise WeightsError(f"{path} is not a deblurcli model config (format != {FORMAT_NAME})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(f"{folder} uses model format version {version}; this deblurcli reads "
                           f"up to {FORMAT_VERSION} (upgrade deblurcli)")
    for key in ("evae", "unet", "timestep", "prompt_tokens", "lora"):
        if key not in config:
            raise WeightsError(f"{path} lacks the '{key}' entry")
    return config


def verify_checksums(folder: PathLike) -> list[str]:
    """Check every file listed in ``checksums.sha256``; return the listed names (WeightsError)."""
    folder = Path(folder)
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        raise WeightsError(f"missing file {CHECKSUM_FILE} in {folder}")
    names = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.strip().lstrip("*")
        if not sep or len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise WeightsError(f"{CHECKSUM_FILE} in {folder} is malformed at line {number}")
        if not (folder / name).is_file():
            raise WeightsError(f"missing file {name} in {folder}")
        if sha256_file(folder / name) != digest.lower():
            raise WeightsError(f"{name} in {folder} is corrupt (sha256 checksum mismatch)")
        names.append(name)
    return names


def _read_weights(folder: Path, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = folder / name
    if not path.is_file():
        raise WeightsError(f"missing file {name} in {folder}")
    return ad.read_safetensors(path)


@torch.no_grad()
def _load_into(module: nn.Module, state: Mapping[str, Tensor], name: str, *,
               partial: bool = False) -> None:
    """Copy ``state`` into ``module`` (meta or real), checking keys and shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if unexpected or (missing and not partial):
        what = f"unexpected key {unexpected[0]}" if unexpected else f"missing key {missing[0]}"
        raise WeightsError(f"{name} does not match config.json ({what}; {len(missing)} missing, "
                           f"{len(unexpected)} unexpected)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise WeightsError(f"{name}: {key} has shape {tuple(value.shape)}, config.json implies "
                               f"{tuple(expected[key].shape)}")
    loaded = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(loaded, strict=not partial, assign=True)


def _build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without allocating/initialising its parameters (they come from a file)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


# ----------------------------------------------------------------------------- loading
def load_model_folder(folder: PathLike, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, gamma: float = 0.7, fuse: bool = True,
                      vae_dtype: torch.dtype | None = None,
                      base_model: PathLike | None = None,
                      warn: Callable[[str], None] | None = None,
                      verify: bool = True, lora: PathLike | None = None) -> OSDDModel:
    """Load a model folder as an :class:`OSDDModel` in eval mode with ``gamma`` applied.

    ``lora``: an adapter file (``deblurcli blend``'s output) that replaces the folder's own
    adapters, merged into the UNet before the cast to ``dtype``; its recorded γ is then fixed.

    Args:
        folder: the model folder (see the module docstring).
        device, dtype: where and in which dtype the UNet (and by default the eVAE) runs.
        gamma: dual-adapter blend weight in [0, 1] (ignored, with a ``warn`` note, for a folder
            whose adapters are already fused).
        fuse: merge the blend into the UNet weights (fast); ``False`` keeps LoRA layers live so
            :meth:`OSDDModel.set_gamma` can change gamma later.
        vae_dtype: dtype of the eVAE (e.g. ``torch.float32`` with an fp16 UNet); default ``dtype``.
        base_model: a diffusers Stable Diffusion folder providing the base UNet and VAE
            (``PATH/unet``, ``PATH/vae``); files in ``folder`` override it.
        warn: callback for one-line notes (library code never prints).
        verify: check ``checksums.sha256`` first.

    Raises:
        WeightsError: missing/corrupt files, shape mismatches, or no default model installed.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    if verify:
        verify_checksums(folder)
    fused = config.get("fused")
    fused_gamma = None if not fused else float(fused["gamma"])
    if fused_gamma is None and config["lora"]:
        ad.check_gamma(gamma)
    has_unet_file = (folder / UNET_FILE).is_file()
    if config.get("unet_weights") == "base_model" and base_model is None and not has_unet_file:
        raise WeightsError(f"{folder} stores no base UNet; pass the Stable Diffusion folder it was "
                           "trained on with --base-model PATH")

    # eVAE
    evae_config = dict(config["evae"])
    evae_state, _ = _read_weights(folder, EVAE_FILE)
    if base_model is not None:
        evae = EVAE.from_vae(base_model, use_skips=bool(evae_config.get("use_skips", True)),
                             sharp_encoder=bool(evae_config.get("sharp_encoder", False)))
        _load_into(evae, evae_state, EVAE_FILE, partial=True)
    else:
        try:
            evae = _build_empty(lambda: EVAE(**evae_config))
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"config.json has an invalid evae config ({exc})") from None
        _load_into(evae, evae_state, EVAE_FILE)

    # UNet
    if base_model is not None:
        unet = load_base_unet(base_model)
        if has_unet_file:
            _load_into(unet, _read_weights(folder, UNET_FILE)[0], UNET_FILE)
    else:
        from diffusers import UNet2DConditionModel

        try:
            unet = _build_empty(lambda: UNet2DConditionModel.from_config(dict(config["unet"])))
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"config.json has an invalid unet config ({exc})") from None
        _load_into(unet, _read_weights(folder, UNET_FILE)[0], UNET_FILE)

    # prompt + denoiser
    prompt_state, _ = _read_weights(folder, PROMPT_FILE)
    prompt = prompt_state.get(PROMPT_KEY)
    want = (1, int(config["prompt_tokens"]), int(unet.config.cross_attention_dim))
    if prompt is None or tuple(prompt.shape) != want:
        got = None if prompt is None else tuple(prompt.shape)
        raise WeightsError(f"{PROMPT_FILE}: {PROMPT_KEY} has shape {got}, expected {want}")
    denoiser = OneStepDenoiser(unet, timestep=int(config["timestep"]), prompt_init=prompt.float())

    # adapters
    adapters: dict[str, tuple[ad.LoraSpec, dict[str, Tensor]]] = {}
    for name in config["lora"]:
        path = folder / lora_file(name)
        if not path.is_file():
            raise WeightsError(f"missing file {lora_file(name)} in {folder}")
        adapters[name] = ad.load_adapter_file(path)
    if fused_gamma is None and base_model is None:
        merged = _merge_without_peft(unet, adapters, gamma=gamma, fuse=fuse, lora=lora)
        if merged is not _NOT_MERGED:  # the blend is in the UNet's weights; no peft imported
            model = OSDDModel(evae, denoiser, {}, fused_gamma=merged)
            model.gamma = merged
            return ready_model(model, gamma=gamma, fuse=fuse, device=device, dtype=dtype,
                               vae_dtype=vae_dtype, warn=warn)
    specs: dict[str, ad.LoraSpec] = {}
    for name, (spec, state) in adapters.items():
        ad.add_adapter(unet, name, spec)
        ad.load_adapter_state_dict(unet, name, state, source=lora_file(name))
        specs[name] = spec

    model = OSDDModel(evae, denoiser, specs, fused_gamma=fused_gamma)
    if lora is not None:
        model.fuse_adapter_file(lora)
    return ready_model(model, gamma=gamma, fuse=fuse, device=device, dtype=dtype,
                       vae_dtype=vae_dtype, warn=warn)


_NOT_MERGED = object()


def _merge_without_peft(unet: nn.Module, adapters: Mapping[str, tuple], *, gamma: float,
                        fuse: bool, lora: PathLike | None):
    """Fuse a model folder's γ-blend (``fuse``), or an adapter file (``lora``), into ``unet``
    without peft, with the same arithmetic (:func:`deblurcli.models.adapters.merge_adapters_into`).

    Returns the γ the UNet now holds (an adapter file must record its blend's γ), or
    ``_NOT_MERGED`` when this case needs live peft adapters: ``fuse=False`` without ``lora``,
    adapters other than exactly real + synthetic, or layer kinds the merge does not handle.
    """
    if lora is not None:  # OSDDModel.fuse_adapter_file's result: the file's blend alone
        path = Path(lora)
        spec, state = ad.load_adapter_file(path)
        _, metadata = ad.read_safetensors(path)
        gamma_of_file = ad.blend_gamma(metadata, path)
        checks = [(s, st, None, lora_file(n)) for n, (s, st) in adapters.items()]
        if not ad.merge_adapters_into(unet, checks + [(spec, state, 1.0, path.name)]):
            return _NOT_MERGED
        return gamma_of_file
    if not fuse or set(adapters) != set(ad.ADAPTER_NAMES):
        return _NOT_MERGED
    g = float(gamma)
    (real_spec, real), (synth_spec, synth) = adapters[ad.REAL], adapters[ad.SYNTHETIC]
    if not ad.merge_adapters_into(unet, [(real_spec, real, g, lora_file(ad.REAL)),
                                         (synth_spec, synth, 1.0 - g,
                                          lora_file(ad.SYNTHETIC))]):
        return _NOT_MERGED
    return g


def ready_model(model: OSDDModel, *, gamma: float, fuse: bool = True,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                vae_dtype: torch.dtype | None = None,
                warn: Callable[[str], None] | None = None) -> OSDDModel:
    """Put a model as loaded (float32, on the CPU) into its run state, in place.

    Sets the γ-blend (or fuses it into the UNet, in float32, before any cast to half precision),
    then moves the UNet to ``device``/``dtype`` and the eVAE to ``vae_dtype`` (default ``dtype``).
    A model whose adapters were fused when saved keeps that γ (``warn`` says so if ``gamma``
    differs). ``load_model_folder`` ends with this; ``deblurcli eval`` calls it once per γ.
    """
    if model.fused_gamma is not None:
        model.gamma = model.fused_gamma
        if warn is not None and abs(float(gamma) - model.fused_gamma) > 1e-9:
            warn(f"this model's adapters are fused at gamma={model.fused_gamma:g}; "
                 f"gamma={float(gamma):g} is ignored")
    elif model.has_dual_adapters:
        if fuse:
            model.fuse(gamma)
        else:
            model.set_gamma(gamma)
    nn.Module.to(model.denoiser, device=device, dtype=dtype)
    nn.Module.to(model.evae, device=device, dtype=vae_dtype or dtype)
    return model.eval()


def fuse_model_folder(src: PathLike, out: PathLike, gamma: float, *,
                      base_model: PathLike | None = None,
                      storage_dtype: torch.dtype | None = None) -> None:
    """Write a copy of model folder ``src`` whose UNet contains the gamma-blend (fused).

    The output keeps the source's storage dtype (unless ``storage_dtype`` is given) and drops
    the sharp encoder E2 (inference only).
    """
    ad.check_gamma(gamma)
    config = read_model_config(src)
    if config.get("fused"):
        raise WeightsError(f"{src} is already fused (gamma={config['fused']['gamma']:g})")
    if not all(name in config["lora"] for name in ad.ADAPTER_NAMES):
        raise WeightsError(f"{src} has no real/synthetic adapters to fuse")
    model = load_model_folder(src, gamma=gamma, fuse=True, base_model=base_model)
    dtype = storage_dtype or _DTYPES.get(config.get("storage_dtype", "float32"), torch.float32)
    extra = dict(config.get("extra") or {})
    extra["fused_from"] = str(Path(src).name)
    save_model_folder(out, model, extra=extra, storage_dtype=dtype, include_sharp_encoder=False)


def export_model_folder(src: PathLike, out: PathLike, *,
                        storage_dtype: torch.dtype = torch.float16,
                        extra: dict | None = None,
                        include_sharp_encoder: bool = False) -> None:
    """Write an inference copy of model folder ``src``: both adapters kept (γ stays free), the
    sharp encoder E2 dropped (training only; kept with ``include_sharp_encoder``, together with
    the latent discriminator, so that ``train-diffusion --init`` can continue with the latent
    and GAN terms) and weights stored as ``storage_dtype``.

    This is how a trained run becomes a shippable folder such as the packaged ``weights/``.
    ``extra`` entries are merged into the config's ``"extra"`` record.
    """
    config = read_model_config(src)
    if config.get("fused"):
        raise WeightsError(f"{src} is fused; export the unfused training output instead")
    model = load_model_folder(src, gamma=0.5, fuse=False)
    merged = dict(config.get("extra") or {})
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
