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
