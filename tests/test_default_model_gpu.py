"""Rehearsal of the one-command GPU recipe (``scripts/default_model_gpu.py``) on the CPU at toy
scale: pack under a size limit, the whole run with per-stage time budgets (one stage given no
time), export in parts, rejoin, then the model loads and deblurs."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "default_model_gpu.py"
MIB = 1 << 20


def _script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _rejoin(*args: str) -> None:
    """``default_model_gpu.py rejoin ARGS`` in this process (raises SystemExit on refusal)."""
    import runpy

    runpy.run_path(str(SCRIPT))["main"](["rejoin", *args])


def _fake_wheel(folder: Path) -> Path:
    """A stand-in for stlpips-pytorch's wheel: the VGG weights it carries are dropped."""
    path = folder / "stlpips_pytorch-0.0.2-py3-none-any.whl"
    files = {"stlpips_pytorch/__init__.py": b"",
             "stlpips_pytorch/weights/vST0.0/alex_shift_tolerant.pth": b"a" * 1000,
             "stlpips_pytorch/weights/vST0.0/vgg_shift_tolerant.pth": b"v" * 200_000}
    record = "".join(f"{name},,\n" for name in files) + "stlpips_pytorch-0.0.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("stlpips_pytorch-0.0.2.dist-info/RECORD", record)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small stand-in for ``shared/data``: photos (kodak24 held out), one clip, one val pair."""
    import skimage.data

    from deblurcli.images import write_image

    root = tmp_path_factory.mktemp("data")
    astronaut = skimage.data.astronaut().astype(np.float32) / 255
    coffee = skimage.data.coffee().astype(np.float32) / 255
    for i in range(2):
        write_image(root / "sharp" / "kodak24" / f"kodim{i:02d}.png",
                    astronaut[i * 60:i * 60 + 72, :96])
        write_image(root / "sharp" / "setA" / f"a{i}.png", coffee[i * 60:i * 60 + 96, :128])
    write_image(root / "sharp" / "setB" / "deep" / "b0.jpg", astronaut[200:290, 200:320])
    for t in range(9):  # a pan: consecutive frames
        write_image(root / "frames" / "CLIP" / f"{t:06d}.jpg",
                    np.roll(coffee, 3 * t, axis=1)[100:164, 100:196])
    # a real pair differs: identical ones would score an infinite input PSNR
    write_image(root / "val" / "gopro_avg" / "sharp" / "p0.png", coffee[:64, :96])
    write_image(root / "val" / "gopro_avg" / "blur" / "p0.png",
                (coffee[:64, :96] + coffee[:64, 3:99]) / 2)
    return root


def _tree_mib() -> float:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names
               if n and (ROOT / n.decode()).is_file()) / MIB


@pytest.fixture(scope="module")
def pack(data: Path, tmp_path_factory) -> Path:
    wheels = tmp_path_factory.mktemp("wheels")
    _fake_wheel(wheels)
    out = tmp_path_factory.mktemp("pack") / ".gpu-pack"  # hidden, like the default
    limit = _tree_mib() + 0.04  # forces the frames (at least) to shrink
    args = ["pack", "--data", str(data), "--out", str(out), "--wheels", str(wheels),
            "--max-pack-mib", f"{limit:.4f}", "--min-side", "48", "--frames-share", "0.5"]
    refused = _script(*args)  # only stlpips' wheel: the GPU machine would lack diffusers
    assert refused.returncode != 0 and "no wheel for diffusers" in refused.stderr
    done = _script(*args, "--allow-missing-wheels")  # this machine has it
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total_bytes"] <= limit * MIB
    return out


def test_pack_fits_the_limit_and_holds_out_kodak24(pack: Path) -> None:
    manifest = json.loads((pack / "manifest.json").read_text())
    assert manifest["sharp"]["scale"] < 1.0 or manifest["frames"]["crop"] < 1.0
    names = sorted(p.name for p in (pack / "sharp").iterdir())
    assert names == ["setA_a0.jpg", "setA_a1.jpg", "setB_deep_b0.jpg"]
    assert len(list((pack / "heldout" / "kodak24").iterdir())) == 2
    assert len(list((pack / "frames" / "CLIP").iterdir())) == 9
    with zipfile.ZipFile(next((pack / "wheels").glob("stlpips*.whl"))) as zf:
        assert not [n for n in zf.namelist() if "vgg" in n]
        assert "vgg" not in zf.read("stlpips_pytorch-0.0.2.dist-info/RECORD").decode()
    for rel, digest in manifest["sha256"].items():
        import hashlib

        assert hashlib.sha256((pack / rel).read_bytes()).hexdigest() == digest


REHEARSAL = ("--device", "cpu", "--preset", "tiny", "--crop", "32", "--batch-size", "2",
             "--workers", "0", "--budget", "12", "--reserve", "2", "--eval-seconds", "8",
             "--stage-budget", "lora_r=0", "--gan-start", "0", "--part-mib", "0.25",
             "--data-batches", "2")


def _rehearse(pack: Path, out: Path, work: Path) -> None:
    """The run in this process (its imports are done once: a subprocess spent ~12 s on them;
    the script as a process is run by the damaged-pack check)."""
    import runpy

    runpy.run_path(str(SCRIPT))["main"](["run", "--pack", str(pack), "--out", str(out),
                                         "--work", str(work), *REHEARSAL])


def _rehearse_with_failures(pack: Path, out: Path, work: Path) -> None:
    """The run in this process, its lora_r stage made to fail as a diverged one does and the
    export of lora_s (trained from the base model then) made to fail as a full disk does."""
    import runpy

    import os

    script = runpy.run_path(str(SCRIPT))["main"].__globals__  # what its functions look up
    train = script["_train"]

    def diverging(kind, config, log, stage):
        folder = train(kind, config, log, stage)
        if stage == "lora_r":
            raise RuntimeError("stage lora_r diverged: {'loss': nan}")
        return folder

    class DiskFullAtLoraS:  # the os module, but the lora_s checksum finds the disk full
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            if "model-lora_s" in str(dst):
                raise OSError(28, "No space left on device")
            return os.replace(src, dst)

    script["_train"], script["os"] = diverging, DiskFullAtLoraS()
    script["main"](["run", "--pack", str(pack), "--out", str(out), "--work", str(work),
                    *REHEARSAL])


def test_photos_that_do_not_fit_at_the_lowest_quality_are_subsampled(data: Path) -> None:
    import runpy

    fit = runpy.run_path(str(SCRIPT))["_fit"]
    sources = [(p, p.name) for p in sorted((data / "sharp").rglob("*.*"))]
    whole = fit(sources, 1 << 30, 70, "scale", 48)["bytes"]
    with pytest.raises(SystemExit, match="cannot fit"):
        fit(sources, whole // 2, 90, "scale", 9999)  # min_side pins the size: only quality
    kept = fit(sources, whole // 2, 90, "scale", 9999, subset_seed=3)
    assert 0 < kept["kept"] < len(sources) and kept["bytes"] <= whole // 2
    assert kept["quality"] == 70
    assert fit(sources, whole // 2, 90, "scale", 9999, subset_seed=3)["files"] == kept["files"]


@pytest.mark.slow
def test_the_gpu_recipe_rehearsed_on_the_cpu(pack: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    photo = pack / "sharp" / "setA_a0.jpg"
    whole = photo.read_bytes()
    photo.write_bytes(whole[:100])  # a transfer that lost bytes: stops before any work
    damaged = _script("run", "--pack", str(pack), "--out", str(tmp_path / "x"), "--work",
                      str(tmp_path / "wx"), *REHEARSAL)
    photo.write_bytes(whole)
    assert damaged.returncode != 0 and "differs from its manifest in 1 file" in damaged.stderr
    _rehearse_with_failures(pack, out, tmp_path / "w")
    results = json.loads((out / "results.json").read_text())["stages"]
    for stage in ("preflight", "data_path", "vae", "base", "lora_s", "export", "evaluation"):
        assert results[stage]["status"] == "ok", stage
    # failures are logged; the base model, the last one exported whole, came back and is the
    # one scored
    assert results["lora_r"]["status"] == "failed" and "diverged" in results["lora_r"]["error"]
    assert results["export_lora_s"]["status"] == "failed"
    assert "No space left" in results["export_lora_s"]["error"]
    assert results["export"]["model_of"] == "base" and "error" not in results["export"]
    assert results["export"]["folder"].endswith("export-base")
    log = (out / "run.log").read_text()
    assert "lora_r FAILED" in log and "export_lora_s FAILED" in log
    # a stage with no time left still trains one step and hands its model on
    assert results["lora_r"]["steps"] == 1 and results["lora_r"]["out_of_time"]
    for name in ("synthetic_kodak24", "gopro_avg"):
        scores = results["evaluation"][name]
        assert scores["images"] >= 1
        for key in ("input", "gamma_1", "gamma_0.7"):
            assert np.isfinite(scores[f"{key}_psnr"]) and 0 < scores[f"{key}_ssim"] <= 1
    parts = sorted(out.glob("model-base.tar.*"))
    assert len(parts) == results["export"]["parts"] > 1
    # the cut-short lora_s set was removed; nothing else is left beside the base model's
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [p.name for p in parts] + ["model-base.sha256", "results.json", "run.log"])
    assert all(p.stat().st_size <= 0.25 * MIB for p in parts)
    assert (out / "run.log").read_text().count("\n") >= 8

    # rejoin: parts -> verified model folder that loads and deblurs; refuses to overwrite
    model_dir = tmp_path / "model"
    _rejoin(str(out), "-o", str(model_dir))
    from deblurcli.modelfolder import DISCRIMINATOR_FILE, load_model_folder
    from deblurcli.pipeline import DeblurPipeline

    evae_config = json.loads((model_dir / "evae" / "config.json").read_text())
    assert evae_config["sharp_encoder"]  # trainable further
    assert (model_dir / DISCRIMINATOR_FILE).is_file()
    model = load_model_folder(model_dir, gamma=0.7)
    image = np.random.default_rng(0).random((40, 56, 3)).astype(np.float32)
    assert DeblurPipeline(model, tile=0, batch_size=1)(image).shape == image.shape
    with pytest.raises(SystemExit, match="exists"):
        _rejoin(str(out), "-o", str(model_dir))
    # a later stage's set cut short (no checksum yet) is passed over for the complete one
    (out / "model-lora_s.tar.00").write_bytes(b"half")
    _rejoin(str(out), "-o", str(tmp_path / "again"))
    assert load_model_folder(tmp_path / "again", gamma=0.7) is not None
    parts[0].write_bytes(parts[0].read_bytes()[:-1] + b"x")
    with pytest.raises(SystemExit, match="no complete model .*model-base: [0-9]+ part\\(s\\) that "
                                         "do not match its checksum"):
        _rejoin(str(out), "-o", str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()

    # a later window continues from that model: no eVAE stage, the model packed along
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels)
    pack2 = tmp_path / "pack2"
    done = _script("pack", "--data", str(data), "--out", str(pack2), "--wheels", str(wheels),
                   "--min-side", "48", "--init", str(model_dir), "--allow-missing-wheels")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((pack2 / "manifest.json").read_text())
    assert manifest["init"]["pack"] == "init" and manifest["init"]["bytes"] > 0
    out2 = tmp_path / "out2"
    _rehearse(pack2, out2, tmp_path / "w2")
    results = json.loads((out2 / "results.json").read_text())["stages"]
    assert results["init"]["status"] == "ok" and "vae" not in results
    assert "preflight_vae" not in results and results["budgets"]["vae"] == 0
    for stage in ("preflight", "base", "lora_r", "lora_s", "export", "evaluation"):
        assert results[stage]["status"] == "ok", stage
    _rejoin(str(out2), "-o", str(tmp_path / "model2"))
    continued = load_model_folder(tmp_path / "model2", gamma=0.7)
    import torch

    assert torch.equal(continued.evae.decoder.conv_out.weight, model.evae.decoder.conv_out.weight)
    assert not torch.equal(continued.unet.conv_in.weight, model.unet.conv_in.weight)

    # a folder without training state cannot be continued
    from deblurcli.modelfolder import export_model_folder

    export_model_folder(model_dir, tmp_path / "inference")
    done = _script("pack", "--data", str(data), "--out", str(tmp_path / "pack3"), "--wheels",
                   str(wheels), "--min-side", "48", "--init", str(tmp_path / "inference"),
                   "--allow-missing-wheels")
    assert done.returncode != 0 and "--keep-training-state" in done.stderr
