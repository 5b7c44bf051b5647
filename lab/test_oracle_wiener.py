"""lab/oracle_wiener.py: the issue-6 reference ceilings (non-blind Wiener, one global filter)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deblurcli.images import write_image
from deblurcli.synth.blur import blur_image

pytestmark = pytest.mark.lab

SCRIPT = Path(__file__).resolve().parent / "oracle_wiener.py"


@pytest.fixture(scope="module")
def oracle():
    spec = importlib.util.spec_from_file_location("oracle_wiener", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel(length: int, vertical: bool) -> np.ndarray:
    k = np.zeros((length, length), np.float32)
    if vertical:
        k[:, length // 2] = 1.0
    else:
        k[length // 2, :] = 1.0
    return k / k.sum()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """Four 96x96 crops of scikit-image photos, blurred without noise by known line kernels, in
    the layout `deblurcli synth` writes."""
    import skimage.data

    root = tmp_path_factory.mktemp("oracle")
    photos = [skimage.data.astronaut(), skimage.data.chelsea()]
    for i in range(4):
        sharp = photos[i % 2][40 + 30 * i: 136 + 30 * i, 100:196].astype(np.float32) / 255
        kernel = _kernel(9, vertical=bool(i % 2))
        write_image(root / "blur" / f"p{i}.png", blur_image(sharp, kernel))
        write_image(root / "sharp" / f"p{i}.png", sharp)
        (root / "kernels").mkdir(exist_ok=True)
        np.save(root / "kernels" / f"p{i}.npy", kernel)
    return root


def test_wiener_with_the_true_kernel_inverts_a_noise_free_blur(oracle, synth_dir) -> None:
    from deblurcli.images import read_image
    from deblurcli.synth.blur import linear_to_srgb, srgb_to_linear

    blur = read_image(synth_dir / "blur" / "p0.png").pixels
    sharp = read_image(synth_dir / "sharp" / "p0.png").pixels
    kernel = np.load(synth_dir / "kernels" / "p0.npy")
    restored = linear_to_srgb(np.clip(oracle.wiener(srgb_to_linear(blur), kernel, 1e-2), 0, 1))
    before, after = oracle.psnr(blur, sharp), oracle.psnr(restored, sharp)
    assert after > before + 3.0, (before, after)
    wrong = linear_to_srgb(np.clip(oracle.wiener(srgb_to_linear(blur), kernel.T, 1e-2), 0, 1))
    assert oracle.psnr(wrong, sharp) < before  # the oracle's gain comes from knowing the kernel


def test_global_filter_fits_a_shared_blur(oracle, synth_dir) -> None:
    """One least-squares filter recovers much of a blur that every image shares."""
    from deblurcli.images import read_image

    pairs = [(read_image(synth_dir / "blur" / f"p{i}.png").pixels,
              read_image(synth_dir / "sharp" / f"p{i}.png").pixels) for i in (0, 2)]
    filt = oracle.fit_linear_filter(pairs, radius=4, samples=3000)
    gain = np.mean([oracle.psnr(oracle.apply_linear_filter(b, filt), s) - oracle.psnr(b, s)
                    for b, s in pairs])
    assert gain > 1.0


def test_cli_prints_every_ceiling(synth_dir) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), str(synth_dir), "--nsr", "1e-4,1e-2",
                           "--radius", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for text in ("pairs: 4", "blurry input:", "Wiener, true kernel, nsr=",
                 "best nsr per image", "one global 7x7 filter"):
        assert text in done.stdout, done.stdout


def test_cli_rejects_a_folder_without_kernels(tmp_path, synth_dir) -> None:
    import shutil

    bad = tmp_path / "nokernels"
    shutil.copytree(synth_dir / "blur", bad / "blur")
    shutil.copytree(synth_dir / "sharp", bad / "sharp")
    done = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "missing" in done.stderr
