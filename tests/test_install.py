"""What a plain ``pip install deblurcli`` brings: no metric stack, and no third-party noise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_metrics_are_an_extra_that_dev_includes():
    project = _project()
    runtime = _names(project["dependencies"])
    assert not runtime & {"pyiqa", "matplotlib", "pytest", "ruff", "opencv-python"}
    assert "opencv-python-headless" in runtime  # images.py: 16-bit PNG
    assert "stlpips-pytorch" in runtime         # training's default perceptual loss
    extras = project["optional-dependencies"]
    assert {"pyiqa", "matplotlib"} <= _names(extras["eval"])
    assert "deblurcli[eval]" in extras["dev"]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_deblur_synth_and_training_never_import_the_eval_stack():
    code = ("import sys\n"
            "import deblurcli.cli.app, deblurcli.modelfolder, deblurcli.pipeline, deblurcli.batch\n"
            "import deblurcli.synth.build, deblurcli.train.diffusion, deblurcli.train.vae\n"
            "print(sorted(m for m in ('pyiqa', 'matplotlib') if m in sys.modules))\n")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_the_python_api_prints_no_third_party_warning():
    """Importing the library (models, pipeline, training) writes nothing to stderr, even with the
    eval extra's bitsandbytes installed (its 'kernels' hint is dropped)."""
    code = ("import deblurcli.modelfolder, deblurcli.pipeline, deblurcli.models.osdd\n"
            "import deblurcli.train.diffusion, deblurcli.evaluation.runner, deblurcli.images\n")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""


def test_the_package_says_it_is_typed():
    """pyproject ships py.typed, but the file was missing: type checkers saw every deblurcli
    name as Any."""
    import deblurcli

    assert (Path(deblurcli.__file__).parent / "py.typed").is_file()


def test_a_built_wheel_carries_the_whole_shipped_model_folder(tmp_path):
    """package-data "weights/*" took the files at the folder's top only: a wheel would have
    shipped model_index.json without unet/, evae/ and prompt/."""
    import shutil
    import zipfile

    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "weights"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    weights = tree / "src" / "deblurcli" / "weights"
    files = ["model_index.json", "checksums.sha256", "lora_real.safetensors",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "evae/config.json", "prompt/config.json", "training/discriminator.safetensors"]
    for rel in files:
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        (weights / rel).write_text(rel)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                           "--no-build-isolation", str(tree), "-w", str(tmp_path / "dist")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(next((tmp_path / "dist").glob("deblurcli-*.whl"))) as wheel:
        packed = {n.removeprefix("deblurcli/weights/") for n in wheel.namelist()
                  if n.startswith("deblurcli/weights/")}
    assert packed == set(files)
