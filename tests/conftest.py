"""Shared fixtures: tiny random OSDD models and model folders (CPU, no downloads).

* ``tiny_osdd`` -- a factory ``tiny_osdd(seed=0, **config_kwargs) -> OSDDModel``: a tiny random
  model (4-level eVAE with skips, cross-attention UNet, random 'real'/'synthetic' adapters so that
  gamma changes the output), eval mode, gamma 0.5, unfused.
* ``pairs`` -- a folder of four 48x48 blurry/sharp training pairs (``blur/``, ``sharp/``).
* ``unlistable`` -- makes every folder named ``locked`` refuse to be listed (as ``chmod 000``
  would for a user other than root).
* ``tiny_model_folder`` -- a fresh copy (in ``tmp_path``) of a model folder holding that model
  (seed 0, float32, E2 included), written by ``save_model_folder``. Images of 32-64 px.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def _share_the_cores_between_workers() -> None:
    """Under ``pytest -n N`` each worker (and what it spawns) gets its share of the cores.

    Left alone, every worker's torch and OpenMP take all the cores, and N workers on N cores
    oversubscribe them: the training tests then ran three to five times slower on two cores.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    share = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    if "torch" in sys.modules:  # imported before this file: set it directly too
        sys.modules["torch"].set_num_threads(share)


_share_the_cores_between_workers()


def _make_tiny(seed: int = 0, **config_kwargs):
    from deblurcli.models.osdd import build_osdd, tiny_osdd_config

    return build_osdd(tiny_osdd_config(**config_kwargs), seed=seed, randomize_adapters=True)


@pytest.fixture
def tiny_osdd():
    """Factory for tiny random :class:`OSDDModel` objects (see the module docstring)."""
    return _make_tiny


@pytest.fixture(scope="session")
def _tiny_model_folder_template(tmp_path_factory) -> Path:
    from deblurcli.modelfolder import save_model_folder

    folder = tmp_path_factory.mktemp("tiny-osdd") / "model"
    save_model_folder(folder, _make_tiny(seed=0), extra={"note": "tiny random test model"})
    return folder


@pytest.fixture
def tiny_model_folder(_tiny_model_folder_template: Path, tmp_path: Path) -> Path:
    """A model folder with a tiny random OSDD model (a private copy: tests may modify it)."""
    dest = tmp_path / "tiny-model"
    shutil.copytree(_tiny_model_folder_template, dest)
    return dest


@pytest.fixture()
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME without any metric weights (so nothing is found in the user's cache)."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _no_metric_downloads(monkeypatch):
    """Tests never download: the metric-weight fetcher fails unless a test replaces it."""
    from deblurcli.evaluation import fetch

    def refuse(item):
        raise ConnectionError("tests never download (replace fetch.fetch_file with a fake)")

    monkeypatch.setattr(fetch, "fetch_file", refuse)


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> Path:
    """Four 48x48 crops of skimage's astronaut with a horizontal box blur."""
    import numpy as np
    import skimage.data
    from scipy.ndimage import uniform_filter

    from deblurcli.images import write_image

    root = tmp_path_factory.mktemp("pairs")
    photo = skimage.data.astronaut().astype(np.float32) / 255
    for i in range(4):
        sharp = photo[60 + 90 * i: 108 + 90 * i, 160:208]
        write_image(root / "blur" / f"p{i}.png", uniform_filter(sharp, size=(1, 5, 1)))
        write_image(root / "sharp" / f"p{i}.png", sharp)
    return root


@pytest.fixture
def unlistable(monkeypatch) -> None:
    """Folders named ``locked`` refuse to be listed (chmod 000 does not stop root)."""
    import os

    real_scandir = os.scandir

    def scandir(path):
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
