"""The probes read a running run (its newest checkpoint) or a model folder; the pixel-CNN
calibration trains and reports end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deblurcli.train.config import DiffusionTrainConfig, VaeTrainConfig
from deblurcli.train.diffusion import train_diffusion
from deblurcli.train.vae import train_vae

pytestmark = pytest.mark.lab

LAB = Path(__file__).resolve().parent
FAST = {"preset": "tiny", "crop": 32, "batch_size": 2, "val_size": 32, "cpu": True,
        "perceptual": "none", "checkpoint_every": 1, "validate_every": 100, "log_every": 1}


def _run(script: str, *args: object) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(LAB / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_probes_read_running_runs_and_model_folders(pairs: Path, tmp_path: Path) -> None:
    evae_run = tmp_path / "evae"
    train_vae(VaeTrainConfig(data=str(pairs), output=str(evae_run), max_steps=2, **FAST))
    run = tmp_path / "full"
    train_diffusion(DiffusionTrainConfig(data=str(pairs), output=str(run), max_steps=2,
                                         full=True, lambda2=0.0, evae=str(evae_run / "model"),
                                         **FAST))
    crops = (pairs / "blur", pairs / "sharp", "--every", "1", "--crop", "32")
    for script, folder, expect in (("probe_evae.py", evae_run, "D(E1 blurry latent)"),
                                   ("probe_stage2.py", run, "% closed")):
        out = _run(script, folder, *crops).stdout
        assert "4 pairs: input" in out and expect in out, out
    out = _run("probe_color_fix.py", run / "model", pairs / "blur", pairs / "sharp",
               "--sigmas", "2,4").stdout
    assert "4 pairs at gamma 1" in out and "sigma 4:" in out, out


def test_calibrate_pixel_cnn_trains_and_reports(pairs: Path) -> None:
    out = _run("calibrate_pixel_cnn.py", pairs, pairs, "--crop", "32", "--batch", "2",
               "--width", "4", "--every-steps", "2", "--cosine", "--max-steps", "4").stdout
    assert "4 training pairs, 4 test pairs" in out, out
    assert "step 4 " in out and "probe: input" in out, out
    assert "end, step 4: whole test set (4 pairs)" in out, out
