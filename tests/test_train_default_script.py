"""End-to-end run of scripts/train_default.sh on tiny data with one or two steps per stage.

The script is the recipe of the embedded default model (docs/default-model.md); this checks that
its commands and flags still fit the CLI, that every stage hands its model to the next, that the
exported folder loads and deblurs, that scripts/export_checkpoint.py rebuilds a run's model from
its checkpoint, and that a second run resumes instead of retraining. Tiny data
made here from scikit-image's public-domain photos; nothing from ../shared is used.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deblurcli.images import write_image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh"
STEPS = {"STEPS_VAE": "2", "STEPS_FULL_A": "1", "STEPS_FULL": "2", "STEPS_E1": "1",
         "STEPS_E1C": "1", "STEPS_E1D": "1", "STEPS_LORA_R": "1", "STEPS_LORA_S": "1"}


def _rgb(img: np.ndarray) -> np.ndarray:
    img = img if img.ndim == 3 else np.stack([img] * 3, axis=-1)
    return img[..., :3].astype(np.float32) / 255.0


def save_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, pixels)


def _make_data(root: Path) -> None:
    """A ../shared/data look-alike: sharp/<set>/*.png (with kodak24) and frames/<seq>/*.png."""
    from skimage import data as skdata

    astronaut, coffee = _rgb(skdata.astronaut()), _rgb(skdata.coffee())
    chelsea, camera = _rgb(skdata.chelsea()), _rgb(skdata.camera())
    # two training sets of two photos each: 416x256 gives two 256 crops at stride 160 each
    for name, imgs in {"setA": [coffee, chelsea], "setB": [astronaut, camera]}.items():
        for i, img in enumerate(imgs):
            save_image(root / "sharp" / name / f"{i}.png", img[:256, :416])
    for i, img in enumerate([astronaut, camera]):  # held-out: 512x512 each
        save_image(root / "sharp" / "kodak24" / f"kodim{i:02d}.png", img[:512, :512])
    # 24 consecutive frames of a slow pan, 96x160 (a window of 7-13 frames every 3)
    for i in range(24):
        save_image(root / "frames" / "GOPR0477_11_00" / f"{i:06d}.png",
                   coffee[100:196, 40 + 2 * i:200 + 2 * i])


def _run(data: Path, work: Path) -> subprocess.CompletedProcess:
    # one thread: pytest-xdist runs another worker beside this one on a 2-core machine
    env = dict(os.environ, CROP="64", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **STEPS)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", str(SCRIPT), str(data), str(work)], env=env,
                          capture_output=True, text=True, timeout=900)


def _newest(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.slow
def test_train_default_script_end_to_end(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    _make_data(data)

    first = _run(data, work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # 1. data: kodak24 held out of the training pairs, the union holds both kinds
    train_names = {p.name for p in (work / "sharp_train").iterdir()}
    assert train_names == {"setA", "setB"}
    n_synth = len(list((work / "synth_train" / "blur").glob("*.png")))
    n_frames = len(list((work / "frames_train" / "blur").glob("*.png")))
    assert n_synth == 16 and n_frames >= 4  # 4 photos x 2 crops x 2 kernels
    assert len(list((work / "synth_kodak24" / "blur").glob("*.png"))) == 2
    assert len(list((work / "union" / "blur").iterdir())) == n_synth + 8 * n_frames

    # 2-4. every stage trained to its step count and left a model for the next one
    expected_steps = {"evae": 2, "base": 2, "base_e1": 1, "base_e1c": 1, "base_e1d": 1,
                      "lora_r": 1, "lora_s": 1}
    for run, steps in expected_steps.items():
        assert (work / run / "model").is_dir(), run
        assert _newest(work / run) == [f"step-{steps:09d}"], run

    # 5. the exported inference folder: fp16 storage, both adapters, no E2, loads and deblurs
    import torch

    from deblurcli.modelfolder import load_model_folder, read_model_config, verify_checksums

    folder = work / "default-model"
    config = read_model_config(folder)
    assert config["storage_dtype"] == "float16"
    assert set(config["lora"]) == {"real", "synthetic"} and config["fused"] is None
    assert config["evae"]["sharp_encoder"] is False
    assert config["evae"]["latent_channels"] == 16  # the compact preset
    assert config["extra"]["recipe"] == "scripts/train_default.sh"
    assert "lora_real.safetensors" in verify_checksums(folder)
    model = load_model_folder(folder, gamma=0.7)
    assert model.evae.encoder_sharp is None
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()

    # scripts/export_checkpoint.py turns a run's newest checkpoint into the same model folder
    exported = tmp_path / "exported"
    script = SCRIPT.parent / "export_checkpoint.py"
    done = subprocess.run([sys.executable, str(script), str(work / "base_e1c"), str(exported)],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    for name in ("evae", "unet", "prompt"):
        ours, run_model = (load_file(d / f"{name}.safetensors")
                           for d in (exported, work / "base_e1c" / "model"))
        assert ours.keys() == run_model.keys()
        assert all(torch.equal(ours[k], run_model[k]) for k in ours), name

    # a second run resumes: nothing is retrained, no new checkpoint appears
    mtimes = {run: (work / run / "checkpoints").stat().st_mtime_ns for run in expected_steps}
    second = _run(data, work)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for run, steps in expected_steps.items():
        assert _newest(work / run) == [f"step-{steps:09d}"], run
    assert {run: (work / run / "checkpoints").stat().st_mtime_ns for run in expected_steps} \
        == mtimes
