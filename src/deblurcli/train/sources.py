"""The folders a train-diffusion run is rebuilt from, fingerprinted when it starts.

A checkpoint holds only what its run trains (one adapter, say); resuming it, or exporting it,
rebuilds the rest of the model from the run's ``--init`` model folder and ``--evae``. If that
folder has been retrained in place since (``--resume`` of the run that wrote it), the rebuilt
model would mix the new base with adapters trained on the old one, silently. So a run records
a SHA-256 of each folder in its saved settings (:data:`RECORD_KEY`), and a resume or export
refuses a folder whose fingerprint differs (:func:`check`). Runs saved before this have no
record and are not checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deblurcli.errors import DeblurcliError

#: The settings that name a folder a run is rebuilt from.
SOURCE_KEYS = ("init", "evae")
#: Where a run's saved settings (``config.json``) keep the fingerprints.
RECORD_KEY = "source_digests"


def digest(key: str, path: str | Path) -> str | None:
    """The fingerprint of the folder ``path`` given as ``--init`` or ``--evae`` (``key``), or
    None when there is nothing there to fingerprint (the loader then says what is missing).

    ``--init``: the SHA-256 of the model folder's ``checksums.sha256`` (the digest of every
    file, which loading checks). ``--evae``: the SHA-256 of the eVAE's ``config.json`` and
    weights."""
    from deblurcli.modelindex import CHECKSUM_FILE, sha256_file

    if key == "init":
        listed = Path(path) / CHECKSUM_FILE
        return sha256_file(listed) if listed.is_file() else None
    from deblurcli.train.vae import evae_folder

    folder = evae_folder(path)
    files = [folder / "config.json", folder / "diffusion_pytorch_model.safetensors"]
    if not all(file.is_file() for file in files):
        return None
    return hashlib.sha256("".join(sha256_file(file) for file in files).encode()).hexdigest()


def digests(values: Mapping[str, Any]) -> dict[str, str]:
    """The fingerprints of the source folders that the settings ``values`` name."""
    found = {}
    for key in SOURCE_KEYS:
        path = values.get(key)
        value = digest(key, path) if isinstance(path, str) and path else None
        if value is not None:
            found[key] = value
    return found


def check(saved: Mapping[str, Any], values: Mapping[str, Any], *, doing: str) -> None:
    """Refuse to rebuild a run's model (``doing``: ``"--resume"``, ``"export"``) from source
    folders that differ from those the run recorded in its saved settings ``saved``.

    Raises:
        DeblurcliError: one line naming the folder and what to do.
    """
    recorded = saved.get(RECORD_KEY)
    if not isinstance(recorded, Mapping):
        return
    for key, was in recorded.items():
        path = values.get(key)
        if key not in SOURCE_KEYS or not isinstance(path, str) or not path:
            continue
        now = digest(key, path)
        if now is not None and now != was:
            raise DeblurcliError(
                f"--{key} {path} is not the folder this run started from (its weights changed "
                f"since, retrained in place?): {doing} would rebuild the checkpoint's model "
                "around other weights than it was trained with; put the original folder back "
                "there, or start a new run")
