"""``deblurcli deblur`` imports only what it runs (issue 24): a ``deblurcli`` process that
deblurs with fused weights imports no peft, transformers, bitsandbytes, pyiqa, scipy,
training or evaluation code, and no diffusers model it does not build; its output is the
same as that of a normal import (the app called in this process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.images import read_image, write_image

# (deblurcli.train.config, the defaults of the train commands' flags, is imported with the app)
NOT_IMPORTED = ("peft", "transformers", "bitsandbytes", "pyiqa", "scipy", "deblurcli.train.engine",
                "deblurcli.train.diffusion", "deblurcli.train.losses", "deblurcli.evaluation",
                "diffusers.models.autoencoders.autoencoder_kl_wan",
                "diffusers.models.unets.unet_3d_condition")

# main() is what the console script and ``python -m deblurcli`` run
SCRIPT = """
import json, sys
from deblurcli.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _deblur_in_a_process(*args) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "deblur", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deblur_imports_only_what_it_runs(tiny_model_folder: Path, tmp_path: Path):
    photo = tmp_path / "photo.png"
    write_image(photo, np.random.default_rng(0).random((40, 56, 3), dtype=np.float32))
    result = _deblur_in_a_process(photo, tmp_path / "lean", "--weights", tiny_model_folder,
                                  "--gamma", "0.3")
    assert result["code"] in (0, None)
    modules = set(result["modules"])
    assert "diffusers.models.unets.unet_2d_condition" in modules  # it did run the model
    found = [name for name in NOT_IMPORTED if name in modules]
    assert found == [], f"the deblur path imported {found}"

    normal = CliRunner().invoke(app, ["deblur", str(photo), str(tmp_path / "normal"),
                                      "--weights", str(tiny_model_folder), "--gamma", "0.3"])
    assert normal.exit_code == 0, normal.output
    lean_pixels = read_image(tmp_path / "lean" / "photo.png").pixels
    normal_pixels = read_image(tmp_path / "normal" / "photo.png").pixels
    assert np.array_equal(lean_pixels, normal_pixels)


def test_no_fuse_still_imports_peft(tiny_model_folder: Path, tmp_path: Path):
    photo = tmp_path / "photo.png"
    write_image(photo, np.random.default_rng(1).random((32, 32, 3), dtype=np.float32))
    result = _deblur_in_a_process(photo, tmp_path / "out", "--weights", tiny_model_folder,
                                  "--no-fuse")
    assert "peft" in result["modules"]  # live adapters: the normal import, peft and all


FALLBACK = """
import sys
import numpy as np
from deblurcli.models import runtime_imports as ri
ri.RUNTIME_MODULES = ri.RUNTIME_MODULES + ("diffusers.no_such_module",)
assert ri.import_diffusers_for_inference() is False
from deblurcli.modelfolder import load_model_folder
from deblurcli.pipeline import DeblurPipeline, prepare_model
model = load_model_folder(sys.argv[1], gamma=0.3)
pixels = np.random.default_rng(0).random((40, 56, 3), dtype=np.float32)
np.save(sys.argv[2], DeblurPipeline(prepare_model(model), device="cpu")(pixels))
"""


def test_a_failed_lean_import_falls_back_to_the_normal_one(tiny_model_folder, tmp_path):
    """Another diffusers may not have what the lean import expects: deblurring still works,
    with the same result."""
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.pipeline import DeblurPipeline, prepare_model

    proc = subprocess.run([sys.executable, "-c", FALLBACK, str(tiny_model_folder),
                           str(tmp_path / "out.npy")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    model = load_model_folder(tiny_model_folder, gamma=0.3)
    pixels = np.random.default_rng(0).random((40, 56, 3), dtype=np.float32)
    expected = DeblurPipeline(prepare_model(model), device="cpu")(pixels)
    # (thread counts may differ between the two processes: not bit for bit)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-5)
