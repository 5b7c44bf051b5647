"""The Dynamic Dual-Adapter: two named peft LoRA adapters on the UNet, blended by gamma.

Every adapted layer computes exactly

    y = W x + gamma * Delta_real x + (1 - gamma) * Delta_synthetic x,

with ``Delta_a = (alpha_a / r_a) * B_a A_a``. The blend is diffusers' own
``unet.set_adapters(["real", "synthetic"], [gamma, 1 - gamma])`` (peft multiplies each adapter's
LoRA scaling by its weight, so no cross terms appear) and :func:`fuse_adapters` is diffusers'
``fuse_lora`` + ``unload_lora``.

Adapter files are diffusers' LoRA files (``unet.save_lora_adapter`` /
``unet.load_lora_adapter(..., prefix=None)``): peft state-dict keys (``<module>.lora_A.weight``,
``<module>.lora_B.weight``) and the ``LoraConfig`` as JSON under ``lora_adapter_metadata``.
:func:`blend_adapter_states` writes the gamma-blend as one exact adapter of rank
``r_real + r_synthetic`` (concatenated, pre-scaled factors); :func:`merge_adapters_into` merges
adapter files into a UNet without peft, with peft's arithmetic, for a fast start-up.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from deblurcli.errors import WeightsError
from deblurcli.images import atomic_save_safetensors

REAL = "real"
SYNTHETIC = "synthetic"
ADAPTER_NAMES = (REAL, SYNTHETIC)
#: Layers adapted by default: attention projections, ResNet convs, transformer in/out projections
#: and feed-forward layers of the SD UNet.
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2",
)
#: Safetensors metadata key of diffusers LoRA files holding the ``LoraConfig`` (diffusers'
#: ``loaders.lora_base.LORA_ADAPTER_METADATA_KEY``).
LORA_METADATA_KEY = "lora_adapter_metadata"
#: Metadata key of a ``deblurcli blend`` output recording its gamma and sources.
BLEND_METADATA_KEY = "deblurcli_blend"


@dataclass
class LoraSpec:
    """Rank, alpha and target layers of one LoRA adapter (peft ``LoraConfig`` fields).

    ``target_modules`` are layer-name suffixes (peft semantics); ``rank_pattern`` /
    ``alpha_pattern`` override rank / alpha for layers whose name matches a regex key.
    """

    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    def lora_config(self):
        """The equivalent ``peft.LoraConfig`` (B initialised to zero: a new adapter is a no-op)."""
        from peft import LoraConfig

        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha),
                          target_modules=list(self.target_modules), lora_dropout=0.0,
                          rank_pattern=dict(self.rank_pattern),
                          alpha_pattern=dict(self.alpha_pattern), init_lora_weights=True)

    def alpha_for(self, module_name: str) -> float:
        """The alpha peft uses for ``module_name`` (pattern overrides included)."""
        return float(_pattern_value(self.alpha_pattern, module_name, self.alpha))


def dual_lora(rank: int, alpha: float | None = None) -> dict[str, LoraSpec]:
    """Equal specs for the ``real`` and ``synthetic`` adapters (``alpha`` defaults to ``rank``)."""
    alpha = float(rank if alpha is None else alpha)
    return {name: LoraSpec(rank=rank, alpha=alpha) for name in ADAPTER_NAMES}


def _pattern_value(pattern: Mapping[str, float], key: str, default: float) -> float:
    for pat, value in pattern.items():  # same rule as peft: regex on a dotted suffix of the name
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


# ---------------------------------------------------------------------------- adapters on a UNet
def lora_layers(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every peft LoRA layer inside ``unet``."""
    from peft.tuners.lora import LoraLayer

    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(unet: nn.Module) -> list[str]:
    """Names of the LoRA adapters present in ``unet`` (sorted)."""
    names: set[str] = set()
    for _, layer in lora_layers(unet):
        names.update(layer.lora_A.keys())
    return sorted(names)


def specs_in(unet: nn.Module) -> dict[str, LoraSpec]:
    """The :class:`LoraSpec` of each adapter inside ``unet``, read from its peft configs."""
    configs = getattr(unet, "peft_config", None) or {}
    specs = {}
    for name in adapter_names(unet):
        config = configs.get(name)
        if config is None:
            raise WeightsError(f"the UNet's adapter {name!r} has no peft config")
        targets = config.target_modules
        specs[name] = LoraSpec(
            rank=int(config.r), alpha=float(config.lora_alpha),
            target_modules=tuple(sorted(targets)) if not isinstance(targets, str)
            else (targets,),
            rank_pattern=dict(config.rank_pattern or {}),
            alpha_pattern=dict(config.alpha_pattern or {}))
    return specs


def add_adapter(unet: nn.Module, name: str, spec: LoraSpec) -> None:
    """Add one LoRA adapter called ``name`` (B = 0, so it changes nothing until trained/loaded).

    Adding freezes the UNet's base weights (peft); the new adapter's parameters are trainable.
    """
    import warnings

    with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        unet.add_adapter(spec.lora_config(), adapter_name=name)


def _lora_params(layer: nn.Module, name: str) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if name in container:
            item = container[name]
            params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return params


def set_adapter_weights(unet: nn.Module, weights: Mapping[str, float]) -> None:
    """Activate exactly the adapters in ``weights``, each with its LoRA scaling times its weight
    (diffusers' ``unet.set_adapters``), keeping every parameter's ``requires_grad`` as it was
    (``set_adapters`` makes the active adapters trainable; training decides that itself).
    """
    layers = list(lora_layers(unet))
    if not layers:
        raise WeightsError("the UNet has no LoRA adapters to blend")
    known = set(adapter_names(unet))
    for name in weights:
        if name not in known:
            raise WeightsError(f"the UNet has no adapter named {name!r} (it has {sorted(known)})")
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.set_adapters(list(weights), [float(w) for w in weights.values()])
    for p, flag in flags:
        p.requires_grad_(flag)


def check_gamma(gamma: float) -> float:
    """``gamma`` as a float; ValueError unless it is finite and in [0, 1]."""
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"gamma must be a number between 0 and 1, got {gamma!r}") from None
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"gamma must be between 0 and 1, got {gamma}")
    return g


def set_gamma(unet: nn.Module, gamma: float) -> None:
    """Unfused dual-adapter blend: ``gamma`` on ``real``, ``1 - gamma`` on ``synthetic``."""
    g = check_gamma(gamma)
    set_adapter_weights(unet, {REAL: g, SYNTHETIC: 1.0 - g})


def set_trainable_adapter(unet: nn.Module, name: str | None) -> None:
    """Make only adapter ``name``'s LoRA parameters trainable (``None``: freeze all LoRA params).

    Base weights are not touched. Call it after :func:`set_gamma` / adapter activation changes
    when training; :func:`set_adapter_weights` preserves the flags it sets.
    """
    layers = list(lora_layers(unet))
    if name is not None and name not in adapter_names(unet):
        raise WeightsError(f"the UNet has no adapter named {name!r}")
    for _, layer in layers:
        for adapter in list(layer.lora_A.keys()):
            for p in _lora_params(layer, adapter):
                p.requires_grad_(adapter == name)


@torch.no_grad()
def merge_and_unload(unet: nn.Module, weights: Mapping[str, float]) -> None:
    """Merge ``sum_a weights[a] * Delta_a`` into the base weights and remove every LoRA layer:
    diffusers' ``set_adapters`` + ``fuse_lora`` + ``unload_lora`` (merged in the weights' dtype:
    call it on a float32 UNet, before any cast to half precision)."""
    set_adapter_weights(unet, weights)
    unet.fuse_lora(adapter_names=list(weights))
    unet.unload_lora()


def fuse_adapters(unet: nn.Module, gamma: float) -> None:
    """Merge the gamma-blend of ``real`` and ``synthetic`` into the UNet; unload LoRA."""
    g = check_gamma(gamma)
    merge_and_unload(unet, {REAL: g, SYNTHETIC: 1.0 - g})


def adapter_state_dict(unet: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s weights as peft state-dict keys (``<module>.lora_A.weight``, ...)."""
    from peft.utils import get_peft_model_state_dict

    if name not in adapter_names(unet):
        raise WeightsError(f"the UNet has no adapter named {name!r}")
    return get_peft_model_state_dict(unet, adapter_name=name)


def _check_adapter_keys(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Tensor],
                        source: str) -> None:
    """WeightsError naming ``source`` unless ``state`` has exactly the ``expected`` keys/shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise WeightsError(f"{source} does not fit the UNet ({what}; "
                           f"{len(missing)} missing, {len(unexpected)} unexpected keys)")
    for key, shape in expected.items():
        value = state[key]
        if tuple(value.shape) != shape:
            raise WeightsError(f"{source}: {key} has shape {tuple(value.shape)}, "
                               f"the model expects {shape}")


# ---------------------------------------------------------------------------- merging without peft
def lora_targets(unet: nn.Module, spec: LoraSpec) -> dict[str, nn.Module] | None:
    """The layers peft's LoRA would adapt for ``spec`` (name -> ``nn.Linear``/``nn.Conv2d``),
    by peft's rule for a list of targets (the name equals a target or ends with ``.target``).

    ``None`` when a matched layer is of another kind (or a grouped convolution) or nothing
    matches: :func:`merge_adapter_states` does not handle those; peft does (or reports them).
    """
    targets = tuple(spec.target_modules)
    out: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if not name or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            out[name] = module
        elif isinstance(module, nn.Linear):
            out[name] = module
        else:
            return None
    return out or None


def _expected_adapter_shapes(targets: Mapping[str, nn.Module],
                             spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in targets.items():
        r = int(_pattern_value(spec.rank_pattern, name, spec.rank))
        if isinstance(module, nn.Conv2d):
            a = (r, module.in_channels, *module.kernel_size)
            b = (module.out_channels, r, 1, 1)
        else:
            a, b = (r, module.in_features), (module.out_features, r)
        shapes[f"{name}.lora_A.weight"] = a
        shapes[f"{name}.lora_B.weight"] = b
    return shapes


def _delta_weight(a: Tensor, b: Tensor, kernel: tuple[int, ...], scaling: float) -> Tensor:
    """peft's ``get_delta_weight`` for a Linear or an ungrouped Conv2d layer (same operations,
    same order, so the merged weights are the same)."""
    if len(kernel) == 0:
        return (b @ a) * scaling
    if tuple(kernel) == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) \
            * scaling
    return torch.nn.functional.conv2d(a.transpose(0, 1), b).transpose(0, 1) * scaling


def check_lora_state(unet: nn.Module, spec: LoraSpec, state: Mapping[str, Tensor],
                     source: str) -> dict[str, nn.Module] | None:
    """WeightsError naming ``source`` unless ``state`` has exactly the keys and shapes adapter
    ``spec`` gives ``unet``; returns the adapted layers (``None``: kinds only peft handles,
    nothing checked)."""
    targets = lora_targets(unet, spec)
    if targets is not None:
        _check_adapter_keys(_expected_adapter_shapes(targets, spec), state, source)
    return targets


@torch.no_grad()
def merge_adapters_into(unet: nn.Module,
                        adapters: list[tuple[LoraSpec, Mapping[str, Tensor], float | None, str]]
                        ) -> bool:
    """Merge ``sum_a weight_a * Delta_a`` into the UNet's own weights without peft, one adapter
    after the other in the weights' dtype: the result of diffusers' ``load_lora_adapter`` +
    :func:`merge_and_unload`, for a run that never needs live adapters (and so never imports
    peft).

    ``adapters`` are ``(spec, state, weight, source)``, ``state`` keyed as in
    :func:`adapter_state_dict`. Every adapter is first checked against the UNet
    (:func:`check_lora_state`: WeightsError naming ``source``); one whose weight is ``None`` is
    only checked. Returns ``False``, changing nothing, when an adapter targets a layer kind this
    merge does not handle (the caller then goes through peft).
    """
    plans = []
    for spec, state, weight, source in adapters:
        targets = check_lora_state(unet, spec, state, source)
        if targets is None:
            return False
        if weight is not None:
            plans.append((spec, state, float(weight), targets))
    for spec, state, weight, targets in plans:  # one adapter after the other, as peft merges
        for name in targets:
            base = unet.get_submodule(name)
            a = state[f"{name}.lora_A.weight"].to(base.weight.dtype)
            b = state[f"{name}.lora_B.weight"].to(base.weight.dtype)
            r = int(_pattern_value(spec.rank_pattern, name, spec.rank))
            scaling = weight * spec.alpha_for(name) / r  # peft's set_scale
            base.weight.add_(_delta_weight(a, b, tuple(a.shape[2:]), scaling))
    return True


# ---------------------------------------------------------------------------- adapter files
def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; WeightsError if missing or unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"missing weights file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # safe_open is not iterable
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise WeightsError(f"{path.name} is not a readable safetensors file "
                           f"({' '.join(str(exc).split())[:120]})") from None
    return tensors, metadata


#: LoraConfig settings whose non-default values :func:`merge_adapters_into` does not reproduce.
_PLAIN_LORA = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
               "lora_bias": False}


def read_lora_file(path: str | Path) -> tuple[LoraSpec | None, dict[str, Tensor], dict[str, str]]:
    """``(spec, state, metadata)`` of a diffusers LoRA file (``save_lora_adapter``'s output).

    ``spec`` is ``None`` when the file records no ``LoraConfig`` or uses settings beyond a plain
    LoRA (DoRA, rsLoRA, ...): diffusers' ``load_lora_adapter`` reads such files, the
    peft-free merge does not. WeightsError for a file that is not a LoRA state dict.
    """
    path = Path(path)
    state, metadata = read_safetensors(path)
    if not any(key.endswith(".lora_A.weight") for key in state):
        raise WeightsError(f"{path.name} is not a LoRA file (no lora_A weights)")
    try:
        config = json.loads(metadata[LORA_METADATA_KEY])
        plain = all(config.get(key, value) in (value, None) for key, value in _PLAIN_LORA.items())
        spec = LoraSpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                        target_modules=tuple(config["target_modules"]),
                        rank_pattern={k: int(v) for k, v in
                                      (config.get("rank_pattern") or {}).items()},
                        alpha_pattern={k: float(v) for k, v in
                                       (config.get("alpha_pattern") or {}).items()})
    except (KeyError, ValueError, TypeError, AttributeError):
        return None, state, metadata
    return (spec if plain else None), state, metadata


def lora_metadata(config: LoraSpec | Mapping) -> str:
    """A ``LoraConfig`` (as :class:`LoraSpec` or ``LoraConfig.to_dict()``) as the JSON diffusers
    stores under :data:`LORA_METADATA_KEY` (``save_lora_adapter``)."""
    if isinstance(config, LoraSpec):
        config = config.lora_config().to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in dict(config).items()}
    return json.dumps(config, indent=2, sort_keys=True)


def write_lora_file(path: str | Path, state: Mapping[str, Tensor], config: LoraSpec | Mapping, *,
                    dtype: torch.dtype | None = None, blend: dict | None = None) -> None:
    """Write a LoRA state dict as a diffusers LoRA file, atomically: what
    ``unet.save_lora_adapter`` writes, in ``dtype``; ``blend`` is recorded under
    :data:`BLEND_METADATA_KEY` (stock diffusers ignores it)."""
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    metadata = {"format": "pt", LORA_METADATA_KEY: lora_metadata(config)}
    if blend is not None:
        metadata[BLEND_METADATA_KEY] = json.dumps(blend, sort_keys=True)
    atomic_save_safetensors(path, state, metadata)


def blend_gamma(metadata: Mapping[str, str], path: str | Path) -> float:
    """The γ recorded by ``deblurcli blend`` in an adapter file's metadata.

    Raises:
        WeightsError: the file records none (a model folder's own adapter file, say): run with
            no γ known would merge it at full strength and report the wrong blend.
    """
    try:
        value = json.loads(metadata.get(BLEND_METADATA_KEY, "{}")).get("gamma")
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, (int, float)):
        raise WeightsError(f"{Path(path).name} is not a 'deblurcli blend' file (it records no "
                           "gamma); for a model folder's own adapters use --gamma instead")
    return float(value)


# ---------------------------------------------------------------------------- exact blend
def _modules_of(state: Mapping[str, Tensor]) -> set[str]:
    return {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}


def blend_adapter_states(real: Mapping[str, Tensor], real_spec: LoraSpec,
                         synthetic: Mapping[str, Tensor], synthetic_spec: LoraSpec,
                         gamma: float) -> tuple[LoraSpec, dict[str, Tensor]]:
    """One adapter equal to ``gamma * Delta_real + (1 - gamma) * Delta_synthetic`` (exact).

    Per layer: ``A = cat[A_real; A_synth]`` (rank ``r_real + r_synth``) and
    ``B = cat[gamma * s_real * B_real, (1 - gamma) * s_synth * B_synth]`` with ``s = alpha / r``;
    the blend's own scaling is 1 (alpha = rank). Layers adapted by only one adapter keep only its
    factors (their rank goes into ``rank_pattern``). Computed in float32.
    """
    g = check_gamma(gamma)
    parts = ((real, real_spec, g), (synthetic, synthetic_spec, 1.0 - g))
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for module in sorted(_modules_of(real) | _modules_of(synthetic)):
        a_list, b_list = [], []
        for state, spec, weight in parts:
            if f"{module}.lora_A.weight" not in state:
                continue
            a = state[f"{module}.lora_A.weight"].float()
            b = state[f"{module}.lora_B.weight"].float()
            scale = spec.alpha_for(module) / a.shape[0]
            a_list.append(a)
            b_list.append(b * (weight * scale))
        out[f"{module}.lora_A.weight"] = torch.cat(a_list, dim=0)
        out[f"{module}.lora_B.weight"] = torch.cat(b_list, dim=1)
        ranks[module] = int(out[f"{module}.lora_A.weight"].shape[0])
    if not ranks:
        raise WeightsError("the adapters to blend are empty")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(m): r for m, r in ranks.items() if r != rank}
    spec = LoraSpec(rank=rank, alpha=float(rank), target_modules=tuple(sorted(ranks)),
                    rank_pattern=odd, alpha_pattern={k: float(v) for k, v in odd.items()})
    return spec, out


def check_not_a_source(out_path: str | Path, *sources: str | Path) -> None:
    """WeightsError when ``out_path`` is one of the adapter files ``sources`` (also through a
    link): the blend would replace an adapter it is made from."""
    for source in sources:
        try:
            same = os.path.samefile(out_path, source)
        except OSError:  # one of them is missing: not the same file
            same = False
        if same:
            raise WeightsError(f"{out_path} is one of the adapters being blended; give another "
                               "file name")


def blend_adapter_files(real_path: str | Path, synthetic_path: str | Path,
                        gamma: float, out_path: str | Path, *,
                        fp16: bool = False) -> LoraSpec:
    """Read two adapter files, write their exact gamma-blend to ``out_path``; return its spec.

    The output is a diffusers LoRA file stored in the real adapter's dtype (``fp16=True``:
    float16), with the blend's γ and sources in its metadata. ``out_path`` is never one of the
    two files (WeightsError).
    """
    check_not_a_source(out_path, real_path, synthetic_path)
    parts = []
    for path in (real_path, synthetic_path):
        spec, state, metadata = read_lora_file(path)
        if spec is None:
            raise WeightsError(f"{Path(path).name} records no plain LoRA config to blend with")
        if BLEND_METADATA_KEY in metadata:  # its γ would be lost: the result runs at another
            raise WeightsError(f"{Path(path).name} is already a blend (of deblurcli blend); "
                               "blend the model folder's own two adapters")
        parts.append((spec, state))
    (real_spec, real), (synth_spec, synth) = parts
    spec, state = blend_adapter_states(real, real_spec, synth, synth_spec, gamma)
    dtype = torch.float16 if fp16 else next(iter(real.values())).dtype
    write_lora_file(out_path, state, spec, dtype=dtype,
                    blend={"gamma": float(gamma), "real": Path(real_path).name,
                           "synthetic": Path(synthetic_path).name})
    return spec
