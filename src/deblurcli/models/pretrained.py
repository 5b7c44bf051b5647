"""Load one part (``unet``, ``vae``) of a pretrained diffusers model, offline.

``--base-model`` names either a folder or a Hugging Face hub id:

* a Stable Diffusion folder (``SD/unet/config.json``, ``SD/vae/config.json``), or the part's
  own folder (``SD/unet`` itself);
* a hub id such as ``stabilityai/stable-diffusion-2-1-base`` (the part in its ``subfolder``, or
  at the top of a repository that holds only that part), read from the local Hugging Face cache
  (``HF_HOME`` / ``HF_HUB_CACHE``). Nothing is downloaded: fetch it once with
  ``hf download ID`` (``huggingface-cli download ID`` with huggingface_hub < 0.34).

Only safetensors weights are read (``use_safetensors=True``): a part that has only a pickled
``.bin`` file is refused, never unpickled. Every failure is a
:class:`~deblurcli.errors.WeightsError` of one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from deblurcli.errors import WeightsError

if TYPE_CHECKING:
    from torch import nn


def load_part(cls: type, source: str | Path, subfolder: str, what: str) -> nn.Module:
    """``cls.from_pretrained`` for part ``subfolder`` of ``source`` (folder or cached hub id).

    Args:
        cls: a diffusers model class (``UNet2DConditionModel``, ``AutoencoderKL``).
        source: a model folder, the part's folder, or a hub id in the local cache.
        subfolder: the part's folder name inside a full model (``"unet"``, ``"vae"``).
        what: the part's name in error messages (``"UNet"``, ``"VAE"``).
    """
    path = Path(source)
    if path.exists():
        folder = path / subfolder if (path / subfolder / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise WeightsError(f"no diffusers {what} found in {path} "
                               f"(expected {subfolder}/config.json or config.json)")
        return _load(cls, str(folder), {}, what, str(folder))
    if not looks_like_hub_id(str(source)):
        raise WeightsError(f"{what} source not found: {source} (give a diffusers folder or a "
                           "Hugging Face hub id that is in the local cache)")
    where = (f"{source} (hub id, local cache only; fetch it once with "
             f"`{hf_download_command(str(source))}`)")
    try:
        return _load(cls, str(source), {"subfolder": subfolder}, what, where)
    except WeightsError as first:
        try:  # a repository that holds only this part (e.g. a VAE repository)
            return _load(cls, str(source), {}, what, where)
        except WeightsError:
            raise first from None


def scheduler_config(source: str | Path) -> dict | None:
    """The ``scheduler/scheduler_config.json`` of an SD folder or cached hub id (beside the
    ``unet/`` folder given as the source too), or None where there is none to read."""
    import json

    path = Path(source)
    if path.exists():
        for folder in (path, path.parent):
            candidate = folder / "scheduler" / "scheduler_config.json"
            if candidate.is_file():
                try:
                    return json.loads(candidate.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return None
        return None
    if not looks_like_hub_id(str(source)):
        return None
    try:
        from huggingface_hub import hf_hub_download

        found = hf_hub_download(str(source), "scheduler/scheduler_config.json",
                                local_files_only=True)
        return json.loads(Path(found).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - not cached, or not a full SD repository: nothing to check
        return None


def check_noise_schedule(source: str | Path, *, beta_start: float, beta_end: float,
                         steps: int) -> None:
    """Refuse a base model whose UNet was not trained to predict the noise ε under Stable
    Diffusion's scaled-linear schedule, which the one-step formula assumes (WeightsError): an
    SD 2.x 768 model predicts v, and its UNet's output would be taken for ε."""
    config = scheduler_config(source)
    if config is None:
        return
    kind = config.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise WeightsError(f"{source} predicts {kind!r} (its scheduler config), not the noise "
                           "ε that the one-step step (z_l − √(1−ᾱ_t)·ε̂)/√ᾱ_t takes; use an "
                           "ε-prediction model such as stabilityai/stable-diffusion-2-1-base")
    try:
        schedule = (config.get("beta_schedule", "scaled_linear"),
                    float(config.get("beta_start", beta_start)),
                    float(config.get("beta_end", beta_end)),
                    int(config.get("num_train_timesteps", steps)))
    except (TypeError, ValueError):
        raise WeightsError(f"{source}: its scheduler config does not say its noise schedule "
                           "(beta_start, beta_end, num_train_timesteps)") from None
    if config.get("trained_betas") or config.get("rescale_betas_zero_snr"):
        schedule = ("custom betas" if config.get("trained_betas") else "zero-SNR rescaled",
                    *schedule[1:])
    if schedule[0] != "scaled_linear" or abs(schedule[1] - beta_start) > 1e-9 or \
            abs(schedule[2] - beta_end) > 1e-9 or schedule[3] != steps:
        raise WeightsError(f"{source} was trained with another noise schedule ({schedule[0]}, "
                           f"betas {schedule[1]:g}..{schedule[2]:g}, {schedule[3]} steps) than "
                           f"Stable Diffusion's scaled_linear {beta_start:g}..{beta_end:g} in "
                           f"{steps} steps, whose ᾱ_t the one-step step uses")


def hf_download_command(repo_id: str, *filenames: str) -> str:
    """The command that fetches ``repo_id`` (or some of its files) into the Hugging Face cache,
    spelt for the installed huggingface_hub: ``hf download`` (0.34 and later; the old
    ``huggingface-cli`` is gone from 1.0) or ``huggingface-cli download`` (earlier)."""
    import shlex
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(part) for part in version("huggingface_hub").split(".")[:2])
        tool = "hf" if (major, minor) >= (0, 34) else "huggingface-cli"
    except (PackageNotFoundError, ValueError):
        tool = "hf"
    return shlex.join([tool, "download", repo_id, *filenames])


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _load(cls: type, name: str, kwargs: dict, what: str, where: str) -> nn.Module:
    import warnings

    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument it has deprecated: its warning,
            # printed before this function's own error line, says nothing to the user
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks",
                                    category=UserWarning)
            return cls.from_pretrained(name, local_files_only=True, use_safetensors=True,
                                       **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        if len(reason) > 300:
            reason = reason[:300] + "…"
        raise WeightsError(f"cannot load the {what} from {where}: {reason}") from None
