"""Fetching a metric's weight files once, into the caches pyiqa reads, checked by SHA-256.

This is the only module of deblurcli that opens a network connection, and only
``deblurcli eval`` calls it (never with ``--offline`` or ``HF_HUB_OFFLINE=1``). Each file comes
from where pyiqa itself downloads it and lands where pyiqa, torchvision and CLIP look for it:

* ``pyiqa/<file>``       -- pyiqa's weight repository on the Hugging Face Hub
  (``chaofengc/IQA-PyTorch-Weights``, pyiqa's ``get_url_from_name``) into
  ``$TORCH_HOME/hub/pyiqa/``; expected SHA-256: the Hub's LFS hash of the file (and the hash
  prefix in the file name, where it has one, must agree with it);
* ``checkpoints/<file>`` -- torchvision's ImageNet backbones from ``download.pytorch.org`` into
  ``$TORCH_HOME/hub/checkpoints/``; expected SHA-256 prefix: the one in the file name (torch
  hub's convention, e.g. ``alexnet-owt-7be5be79.pth``);
* ``clip/RN50.pt``       -- OpenAI's CLIP weights (the URL pyiqa's CLIP loader uses, whose path
  holds the full SHA-256) into ``$TORCH_HOME/hub/clip/``;
* Hugging Face files     -- ``hf_hub_download`` into the Hugging Face cache (where timm looks),
  then checked against the Hub's LFS hash.

A file whose hash does not match is deleted and the fetch fails; nothing unverified is kept.
Tests replace :func:`fetch_file` and never reach this code's network calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

from deblurcli.errors import WeightsError
from deblurcli.evaluation.metrics import HFFile, WeightFile, torch_hub_dir

PYIQA_REPO = "chaofengc/IQA-PyTorch-Weights"
TORCHVISION_URL = "https://download.pytorch.org/models/"
CLIP_URLS = {
    "RN50.pt": "https://openaipublic.azureedge.net/clip/models/"
               "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
}
TIMEOUT_S = 60.0  # per network read: a blocked network fails instead of hanging

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.")  # torch hub: NAME-<sha256 prefix>.EXT


def name_hash(name: str) -> str | None:
    """The SHA-256 prefix a torch-hub style file name carries (``x-7be5be79.pth`` -> ``7be5be79``)."""
    found = _NAME_HASH.search(name)
    return found.group(1) if found else None


def describe(item: WeightFile | HFFile) -> str:
    """``LPIPS_v0.1_alex-df73285e.pth`` or ``model.safetensors of timm/...`` for messages."""
    if isinstance(item, HFFile):
        return f"{item.filenames[0]} of {item.repo_id}"
    return item.name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _hub_sha256(repo_id: str, filename: str) -> str:
    """The SHA-256 the Hugging Face Hub records for an LFS file (its ETag)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(hf_hub_url(repo_id, filename))
    etag = (meta.etag or "").strip('"').lower()
    if not _SHA256.match(etag):
        raise WeightsError(f"the Hub gives no SHA-256 for {filename} of {repo_id}; not fetched")
    return etag


def _download(url: str, dest: Path, sha256: str) -> Path:
    """``torch.hub.download_url_to_file`` (temporary file, renamed only when the hash matches)."""
    from torch.hub import download_url_to_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(dest), hash_prefix=sha256, progress=False)
    except RuntimeError as exc:  # torch: 'invalid hash value (expected ..., got ...)'
        raise WeightsError(f"{dest.name}: checksum mismatch, file discarded ({exc})") from None
    return dest


def source(item: WeightFile) -> tuple[str, str]:
    """``(url, expected sha256 or prefix)`` of a torch-hub weight file (may ask the Hub)."""
    if item.folder == "pyiqa":
        from huggingface_hub import hf_hub_url

        sha = _hub_sha256(PYIQA_REPO, item.name)
        prefix = name_hash(item.name)
        if prefix is not None and not sha.startswith(prefix):
            raise WeightsError(f"{item.name}: the Hub's SHA-256 {sha[:12]}... does not match the "
                               f"name's {prefix}; not fetched")
        return hf_hub_url(PYIQA_REPO, item.name), sha
    if item.folder == "checkpoints":
        prefix = name_hash(item.name)
        if prefix is None:
            raise WeightsError(f"no checksum known for {item.name}; not fetched")
        return TORCHVISION_URL + item.name, prefix
    if item.folder == "clip" and item.name in CLIP_URLS:
        url = CLIP_URLS[item.name]
        return url, url.rsplit("/", 2)[-2]
    raise WeightsError(f"no known source for {item.folder}/{item.name}")


def fetch_file(item: WeightFile | HFFile) -> Path:
    """Download one missing file into its standard cache, verified; return its path.

    Raises :class:`WeightsError` (or the network library's error) when it cannot.
    """
    with _timeout(TIMEOUT_S):
        if isinstance(item, HFFile):
            from huggingface_hub import hf_hub_download

            filename = item.filenames[0]
            sha = _hub_sha256(item.repo_id, filename)
            path = Path(hf_hub_download(item.repo_id, filename))
            if sha256_of(path) != sha:
                blob = path.resolve()
                path.unlink(missing_ok=True)
                blob.unlink(missing_ok=True)
                raise WeightsError(f"{filename} of {item.repo_id}: checksum mismatch, file "
                                   "discarded")
            return path
        url, sha = source(item)
        return _download(url, torch_hub_dir() / item.folder / item.name, sha)
