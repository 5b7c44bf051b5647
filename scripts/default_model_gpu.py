#!/usr/bin/env python3
"""Train the default model on one GPU in one command, and bring it back.

    python scripts/default_model_gpu.py pack --data ../shared/data --out .gpu-pack
    python scripts/default_model_gpu.py run --pack .gpu-pack --out OUT        # on the GPU machine
    python scripts/default_model_gpu.py rejoin OUT -o MODEL_DIR

``pack`` gathers what the run reads into one folder under a size limit: the sharp training photos
(every folder of ``DATA/sharp`` except the held-out ``kodak24``), the high-frame-rate clips of
``DATA/frames`` (real blur), the held-out evaluation sets (kodak24, ``val/gopro_avg``) and the
wheels a bare PyTorch machine lacks. Photos are JPEG re-encoded and, if needed, scaled down;
frames are re-encoded and, if needed, centre-cropped (never scaled: that would change the size of
their real motion blur) until each group fits its share of ``--max-pack-mib``.

``run`` is the whole recipe in one process, each stage with a wall-clock budget (seconds):

    preflight -> eVAE -> base UNet (--full, E1 trainable) -> LoRA_r (real) -> LoRA_s (synthetic)
    -> export (fp16, E2 kept) -> evaluation (PSNR/SSIM at gamma 1 and 0.7) -> speed benchmark

The preflight runs two real steps of every kind of stage, the export and the split, so anything
but the GPU itself fails within a minute; then the data path's crops per second are measured.
Training data is made on the device (``--device-data``). A stage that reaches its budget
checkpoints and hands its model to the next. Every full model (after the base stage, then after
each adapter) is exported into ``OUT`` at once, replacing the one before, and an adapter stage
or an export that fails is logged and skipped (a failed eVAE or base stage ends the run), so a run
cut short or partly failed still returns its best model. ``OUT``
receives ``run.log`` and ``results.json`` as the stages finish, ``model-STAGE.tar.NN`` parts (each
under ``--part-mib``) with ``model-STAGE.sha256``, and ``bench.txt``.

``pack --init MODEL_DIR`` makes a later window continue a model (one exported with its
training state, as the recipe exports it; the shipped ``src/deblurcli/weights`` is one) instead
of starting from scratch: ``run`` then skips the eVAE stage, gives its time to the base UNet and
scales every stage's rate by ``continue_lr_scale``. The model travels in the pack (or, when git
tracks it, with the source tree); the photos then left out for room are a random subset drawn
with ``--subset-seed``.

``rejoin`` concatenates the parts, checks them, unpacks the model folder and verifies its
checksums.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a source checkout without installing

MIB = 1 << 20
HELD_OUT = "kodak24"
WHEELS = ("diffusers", "stlpips_pytorch")
# the versions tested with this recipe (their dependencies are on the GPU machine's image)
WHEEL_PINS = ("diffusers==0.42.1", "stlpips-pytorch==0.0.2")

# Stage settings of the GPU recipe. The compact preset keeps the shipped model fast on a CPU.
# Budgets are shares of the time left after the preflight; the rest goes to export,
# evaluation and the speed benchmark.
RECIPE = {
    "preset": "compact",
    "crop": 256,
    "vae": dict(batch_size=32, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                pixel_loss="l2", perceptual="none", latent_weight=0.1, real_fraction=0.25),
    "base": dict(batch_size=32, lr=5e-4, warmup_steps=100, lr_schedule="cosine", full=True,
                 train_encoder=True, perceptual="stlpips", lambda1=0.05, lambda2=0.005,
                 latent_weight=0.01, real_fraction=0.25),
    "lora_r": dict(batch_size=32, lr=5e-4, warmup_steps=20, lr_schedule="cosine",
                   adapter="real", perceptual="none", lambda1=0.0, lambda2=0.0),
    "lora_s": dict(batch_size=32, lr=5e-4, warmup_steps=20, lr_schedule="cosine",
                   adapter="synthetic", perceptual="stlpips", lambda1=0.2, lambda2=0.005),
    "shares": {"vae": 0.17, "base": 0.55, "lora_r": 0.10, "lora_s": 0.10},
    # continuing a model (pack --init): no eVAE stage, its time goes to the base UNet, and every
    # stage's peak rate is scaled (a guess: no continued run has been measured yet)
    "continue_shares": {"vae": 0.0, "base": 0.72, "lora_r": 0.10, "lora_s": 0.10},
    "continue_lr_scale": 0.5,
}


# ----------------------------------------------------------------------------- pack
def _load(path: Path):
    from PIL import Image

    from deblurcli.images import read_image

    return Image.fromarray((read_image(path).pixels * 255.0 + 0.5).astype("uint8"))


def _encode(image, quality: int, scale: float = 1.0, crop: float = 1.0,
            min_side: int = 0) -> bytes:
    """JPEG bytes of a PIL image scaled (or centre-cropped) by a factor, never below
    ``min_side`` pixels on its short side (nor above its own size)."""
    from PIL import Image

    short = min(image.size)
    crop = min(1.0, max(crop, min_side / short))
    scale = min(1.0, max(scale, min_side / short))
    if crop < 1.0:
        w, h = image.size
        cw, ch = max(8, int(w * crop) // 8 * 8), max(8, int(h * crop) // 8 * 8)
        image = image.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    if scale < 1.0:
        size = (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 95 else 2)
    return buf.getvalue()


def _fit(sources: list[tuple[Path, str]], budget: int, quality: int, shrink: str,
         min_side: int = 0, subset_seed: int | None = None) -> dict:
    """Encode ``(source, name)`` pairs; shrink every image alike (``scale`` or ``crop``, by the
    square root of the overshoot, never below ``min_side``) and, once shrinking no longer
    helps, lower the JPEG quality (down to 70) until the total fits ``budget`` bytes. Then,
    with a ``subset_seed``, keep the largest random subset (drawn with that seed) that fits."""
    images = [(_load(src), name) for src, name in sources]
    factor, previous, pinned = 1.0, None, False
    for _ in range(24):
        encoded = {name: _encode(image, quality, min_side=min_side, **{shrink: factor})
                   for image, name in images}
        total = sum(len(b) for b in encoded.values())
        if total <= budget or not sources:
            return {"files": encoded, "bytes": total, shrink: round(factor, 4),
                    "quality": quality, "kept": len(encoded)}
        pinned = pinned or (previous is not None and total > 0.98 * previous)
        if not pinned:  # shrinking still pays
            factor *= 0.98 * (budget / total) ** 0.5
        elif quality > 70:  # the images are at min_side: lower the quality instead
            quality -= 5
        else:
            break
        previous = total
    if subset_seed is not None:
        import random

        order = sorted(encoded)
        random.Random(subset_seed).shuffle(order)
        kept, size = {}, 0
        for name in order:
            if size + len(encoded[name]) <= budget:
                kept[name], size = encoded[name], size + len(encoded[name])
        if kept:
            return {"files": dict(sorted(kept.items())), "bytes": size, shrink: round(factor, 4),
                    "quality": quality, "kept": len(kept)}
    raise SystemExit(f"cannot fit {len(sources)} images in {budget / MIB:.1f} MiB")


def _tree_bytes() -> int:
    """Bytes of the working tree that travels with every call (git-tracked files)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names
               if n and (ROOT / n.decode()).is_file())


def _trimmed_wheel(wheel: Path, out: Path) -> None:
    """Copy a wheel without the files the run never reads (ST-LPIPS's 59 MB VGG weights; the run
    uses the AlexNet variant), its RECORD rewritten to match."""
    import zipfile

    drop = ("vgg_shift_tolerant.pth", ".DS_Store")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith(drop):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines()
                         if not ln.split(",")[0].endswith(drop)]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)


def pack(args: argparse.Namespace) -> None:
    from deblurcli.images import list_images

    data, out = Path(args.data), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    limit = int(args.max_pack_mib * MIB)
    used = _tree_bytes()
    report = {"tree_bytes": used}

    wheels = sorted(Path(args.wheels).glob("*.whl")) if args.wheels else []
    (out / "wheels").mkdir()
    for wheel in wheels:
        target = out / "wheels" / wheel.name
        if wheel.name.startswith("stlpips"):
            _trimmed_wheel(wheel, target)
        else:
            shutil.copyfile(wheel, target)
    report["wheel_bytes"] = sum(p.stat().st_size for p in (out / "wheels").iterdir())
    missing = [n for n in WHEELS if not any(w.name.lower().startswith(n.lower() + "-")
                                            for w in wheels)]
    if missing and not args.allow_missing_wheels:
        raise SystemExit(f"no wheel for {', '.join(missing)} in {args.wheels}: the run would "
                         "fail on the GPU machine, which lacks them (pip download --no-deps "
                         "--only-binary=:all: --python-version 3.12 " + " ".join(WHEEL_PINS) +
                         "); --allow-missing-wheels for a rehearsal where they are installed")
    used += report["wheel_bytes"]

    if args.init:
        report["init"] = _pack_init(Path(args.init), out)
        used += report["init"]["bytes"]

    def group(name: str, sources: list[tuple[Path, str]], budget: int, quality: int,
              shrink: str, min_side: int = 0, subset_seed: int | None = None) -> None:
        nonlocal used
        fitted = _fit(sources, budget, quality, shrink, min_side, subset_seed)
        for rel, blob in fitted["files"].items():
            (out / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / name / rel).write_bytes(blob)
        used += fitted["bytes"]
        report[name] = {"images": fitted["kept"], "of": len(sources), "bytes": fitted["bytes"],
                        "quality": fitted["quality"], shrink: fitted[shrink],
                        "min_side": min_side}

    held = list_images(data / "sharp" / HELD_OUT) if (data / "sharp" / HELD_OUT).is_dir() else []
    pairs = data / "val" / "gopro_avg"
    evaluation = [(p, f"kodak24/{p.stem}.jpg") for p in held]
    for side in ("blur", "sharp"):
        if (pairs / side).is_dir():
            evaluation += [(p, f"gopro_avg/{side}/{p.stem}.jpg") for p in list_images(pairs / side)]
    group("heldout", evaluation, limit, args.quality, "scale")
    if report["heldout"]["scale"] < 1.0 or report["heldout"]["quality"] < args.quality:
        raise SystemExit("the held-out sets alone exceed --max-pack-mib")

    photos = [(p, f"{p.parent.relative_to(data / 'sharp').as_posix().replace('/', '_')}_"
                  f"{p.stem}.jpg")
              for p in list_images(data / "sharp", recursive=True)
              if p.relative_to(data / "sharp").parts[0] != HELD_OUT]
    clips = [c for c in sorted((data / "frames").iterdir()) if c.is_dir()] \
        if (data / "frames").is_dir() else []
    frames = [(p, f"{c.name}/{p.stem}.jpg") for c in clips for p in list_images(c)]
    left = limit - used
    if left <= 0:
        raise SystemExit(f"the tree, wheels and held-out sets already take {used / MIB:.1f} MiB")
    frame_share = int(left * args.frames_share) if photos else left
    group("frames", frames, frame_share, args.quality, "crop", args.min_side)
    group("sharp", photos, limit - used, args.quality, "scale", args.min_side, args.subset_seed)
    report["total_bytes"] = used
    report["max_pack_bytes"] = limit
    files = sorted(p for p in out.rglob("*") if p.is_file())
    report["sha256"] = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in files}
    (out / "manifest.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    summary = {k: v for k, v in report.items() if k != "sha256"}
    print(json.dumps(summary, indent=1))
    print(f"pack {out}: {used / MIB:.1f} MiB with the working tree, limit "
          f"{args.max_pack_mib:g} MiB")


def _pack_init(model: Path, out: Path) -> dict:
    """Make the model folder ``model`` the run's starting point: checked (checksums, training
    state kept), then named by its path in the source tree when git tracks it (the tree travels
    anyway: the shipped ``src/deblurcli/weights``) or else copied into ``out/init``. Returns its
    manifest entry, ``bytes`` being what it adds to the pack."""
    from deblurcli.modelfolder import DISCRIMINATOR_FILE, verify_checksums

    names = verify_checksums(model)
    evae = json.loads((model / "evae" / "config.json").read_text(encoding="utf-8"))
    if not evae.get("sharp_encoder") or not (model / DISCRIMINATOR_FILE).is_file():
        raise SystemExit(f"--init {model}: no training state (E2 and the latent discriminator); "
                         "export it with --keep-training-state, as the recipe does")
    listed = subprocess.run(["git", "ls-files", "--error-unmatch", "--", *names],
                            cwd=model.resolve(), capture_output=True)
    status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=model.resolve(),
                            capture_output=True, text=True)
    if model.resolve().is_relative_to(ROOT) and listed.returncode == 0 and \
            status.returncode == 0 and not status.stdout.strip():
        return {"tree": model.resolve().relative_to(ROOT).as_posix(), "bytes": 0}
    for name in names + ["checksums.sha256"]:
        (out / "init" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model / name, out / "init" / name)
    return {"pack": "init",
            "bytes": sum(p.stat().st_size for p in (out / "init").rglob("*") if p.is_file())}


# ----------------------------------------------------------------------------- run
class Log:
    """Timestamped lines to stdout and ``OUT/run.log``; ``results.json`` rewritten as it grows."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.began = time.monotonic()
        self.results: dict = {"stages": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def line(self, text: str) -> None:
        text = f"[{self.elapsed():7.1f} s] {text}"
        print(text, flush=True)
        with (self.out / "run.log").open("a", encoding="utf-8") as fh:
            fh.write(text + "\n")

    def record(self, stage: str, **values) -> None:
        from deblurcli.images import atomic_write_bytes

        self.results["stages"].setdefault(stage, {}).update(values)
        atomic_write_bytes(self.out / "results.json",
                           (json.dumps(self.results, indent=1) + "\n").encode("utf-8"))


def _install_wheels(pack_dir: Path, log: Log) -> None:
    """Install the pack's wheels into a private folder when their packages are missing."""
    import importlib
    import importlib.util

    if all(importlib.util.find_spec(name) for name in WHEELS):
        return
    target = Path(os.environ.get("TMPDIR", "/tmp")) / "deblurcli-site"
    wheels = sorted(str(p) for p in (pack_dir / "wheels").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--upgrade", "--target", str(target), *wheels], check=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    missing = [name for name in WHEELS if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"missing packages {', '.join(missing)}: the pack has no wheels for them")
    log.line(f"installed {len(wheels)} wheel(s) into {target}")


def _stage_config(kind: str, args, work: Path, name: str, budget: float, **extra):
    """The training configuration of stage ``name`` (``RECIPE``, then ``extra``)."""
    from deblurcli.train.config import DiffusionTrainConfig, VaeTrainConfig

    common = dict(
        sharp_photos=str(args.pack / "sharp") if (args.pack / "sharp").is_dir() else None,
        frames=str(args.pack / "frames") if (args.pack / "frames").is_dir() else None,
        device_data=True, workers=args.workers, crop=args.crop, max_steps=10_000_000,
        time_budget=max(budget, 1e-3), checkpoint_every=10_000_000, keep_checkpoints=1,
        validate_every=10_000_000, log_every=10, seed=args.seed, output=str(work / name),
        mixed_precision="no" if args.device == "cpu" else "bf16", cpu=args.device == "cpu")
    common.update(RECIPE[name])
    if getattr(args, "init", None) is not None:
        common["lr"] = common["lr"] * RECIPE["continue_lr_scale"]
    if args.batch_size:
        common["batch_size"] = args.batch_size
    common.update(extra)
    cls = VaeTrainConfig if kind == "vae" else DiffusionTrainConfig
    names = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in common.items() if k in names})


def _train(kind: str, config, log: Log, stage: str) -> Path:
    from deblurcli.train.diffusion import train_diffusion
    from deblurcli.train.vae import train_vae

    started = time.monotonic()
    result = (train_vae if kind == "vae" else train_diffusion)(config)
    seconds = time.monotonic() - started
    if result.interrupted:  # Ctrl-C: stop, keep what OUT holds (a SIGTERM, once the stage
        # has saved, ends the process itself, as it would have without the handler)
        log.record(stage, steps=result.step, status="stopped by a signal")
        raise SystemExit(f"stage {stage} was stopped by a signal")
    rate = (result.step - result.start_step) * config.batch_size / max(result.seconds, 1e-9)
    log.record(stage, steps=result.step, seconds=round(seconds, 1),
               train_seconds=round(result.seconds, 1), crops_per_s=round(rate, 1),
               out_of_time=result.out_of_time, losses=result.last_losses, status="ok")
    log.line(f"{stage}: {result.step} steps in {result.seconds:.1f} s ({rate:.0f} crops/s)"
             f"{' [budget reached]' if result.out_of_time else ''}")
    if result.model_folder is None:
        raise RuntimeError(f"stage {stage} wrote no model")
    bad = {k: v for k, v in result.last_losses.items() if not math.isfinite(float(v))}
    if bad:  # diverged: its model is no better than the last stage's
        raise RuntimeError(f"stage {stage} diverged: {bad}")
    return result.model_folder


def _measure_data_path(args, work: Path, log: Log, batches: int) -> None:
    """Crops per second the device data path delivers at the base stage's settings (its stage
    record gives the crops per second training consumed)."""
    import torch

    from deblurcli.train.engine import build_data

    config = _stage_config("diffusion", args, work, "base", 0)
    device = torch.device("cpu" if args.device == "cpu" else "cuda")
    stream = build_data(config, device=device).train.stream()
    for _ in range(2):  # the worker processes start
        next(stream)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stream.close()
    rate = batches * config.batch_size / seconds
    log.record("data_path", crops_per_s=round(rate, 1), batch_size=config.batch_size,
               crop=config.crop, workers=config.workers, status="ok")
    log.line(f"data path: {rate:.0f} crops/s ({batches} batches of {config.batch_size} x "
             f"{config.crop}^2, {config.workers} kernel workers)")


#: the stages whose models are exported, in order: rejoin takes the latest complete one
EXPORTED_STAGES = ("preflight", "base", "lora_r", "lora_s")


def _export_and_split(src: Path, out: Path, part_bytes: int, work: Path,
                      stage: str = "lora_s") -> dict:
    """Export ``src`` (fp16, E2 kept) to ``work/export-STAGE``, tar it and split it into
    ``out/model-STAGE.tar.NN`` parts with ``out/model-STAGE.sha256`` (written last), then remove
    the earlier stages' parts and checksums: at every moment OUT holds one complete model at
    least (two, 6 files, for a moment), and a set cut short has no checksum file to pass."""
    from deblurcli.modelfolder import export_model_folder, verify_checksums

    model = work / f"export-{stage}"
    if model.exists():
        shutil.rmtree(model)
    export_model_folder(src, model, include_sharp_encoder=True,
                        extra={"recipe": "scripts/default_model_gpu.py", "stage": stage})
    verify_checksums(model)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            tar.add(path, arcname=f"model/{path.relative_to(model).as_posix()}")
    blob = buf.getvalue()
    parts = [blob[i:i + part_bytes] for i in range(0, len(blob), part_bytes)]
    digest = hashlib.sha256(blob).hexdigest()
    prefix = f"model-{stage}"
    try:
        for number, part in enumerate(parts):
            (out / f"{prefix}.tar.{number:02d}").write_bytes(part)
        checksum = out / f".{prefix}.sha256.part"
        checksum.write_text(f"{digest}  {prefix}.tar\n", encoding="utf-8")
        os.replace(checksum, out / f"{prefix}.sha256")
    except BaseException:
        for leftover in out.glob(f"{prefix}.tar.*"):  # an incomplete set: not worth a file
            leftover.unlink()
        (out / f".{prefix}.sha256.part").unlink(missing_ok=True)
        raise
    for old in out.glob("model-*"):  # the earlier stages' sets, now that this one is whole
        if not old.name.startswith(prefix + "."):
            old.unlink()
    return {"folder": str(model), "bytes": len(blob), "parts": len(parts), "sha256": digest,
            "files": f"{prefix}.tar.NN, {prefix}.sha256"}


def _evaluate(model_dir: Path, pack_dir: Path, work: Path, device: str, seconds: float) -> dict:
    """PSNR/SSIM of the exported model at gamma 1 and 0.7 against the blurry input, on the
    held-out synthetic kodak24 pairs (made here as ``scripts/eval_default.sh`` makes them) and
    on the real ``gopro_avg`` pairs."""
    import numpy as np
    import torch

    from deblurcli.evaluation.metrics import psnr, ssim
    from deblurcli.images import list_images, read_image
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.pipeline import DeblurPipeline
    from deblurcli.synth.build import SynthConfig, run_synth

    deadline = time.monotonic() + seconds
    sets = {}
    if (pack_dir / "heldout" / "gopro_avg" / "blur").is_dir():
        sets["gopro_avg"] = pack_dir / "heldout" / "gopro_avg"
    kodak = pack_dir / "heldout" / "kodak24"
    if kodak.is_dir():
        synth = work / "synth_kodak24"
        run_synth(SynthConfig(out=synth, src=kodak, crop=512, stride=1024, seed=2026,
                              workers=min(8, os.cpu_count() or 1)))
        sets["synthetic_kodak24"] = synth
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gammas = (1.0, 0.7)
    pipes = {g: DeblurPipeline(load_model_folder(model_dir, device=device, dtype=dtype, gamma=g,
                                                 vae_dtype=torch.float32),
                               device=device, dtype=torch.float32, tile=448, overlap=32,
                               batch_size=4 if device != "cpu" else 1) for g in gammas}

    results: dict = {}
    for name, folder in sets.items():  # every image at both gammas, until the time is up
        scores: dict[str, list[float]] = {}
        for blur_path in list_images(folder / "blur"):
            if scores and time.monotonic() > deadline:  # but at least one image per set
                break
            sharp_path = next((folder / "sharp").glob(blur_path.stem + ".*"))
            blur, sharp = read_image(blur_path).pixels, read_image(sharp_path).pixels
            outputs = {"input": blur}
            with torch.no_grad():
                outputs.update({f"gamma_{g:g}": pipes[g](blur) for g in gammas})
            for key, image in outputs.items():
                scores.setdefault(f"{key}_psnr", []).append(psnr(image, sharp))
                scores.setdefault(f"{key}_ssim", []).append(ssim(image, sharp))
        results[name] = {"images": len(scores.get("input_psnr", [])),
                         **{k: round(float(np.mean(v)), 4) for k, v in scores.items()}}
    return results


def _benchmark(out: Path, seconds: float, log: Log) -> None:
    """The paper-scale speed (sd21, random weights, bf16) while time remains."""
    if seconds < 30:
        log.line("speed benchmark skipped: not enough time left")
        return
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_deblur.py"), "--preset", "sd21",
               "--device", "cuda", "--dtype", "bf16", "--size", "1280x720", "--size",
               "4000x3000", "--repeats", "3"]
    log.line("speed benchmark: " + " ".join(command[1:]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds, env=env)
        text = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        def text_of(data) -> str:  # bytes here, even with text=True
            return data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")

        text = f"{text_of(exc.stdout)}{text_of(exc.stderr)}\n(stopped after {seconds:.0f} s)"
    (out / "bench.txt").write_text(str(text), encoding="utf-8")
    log.line("speed benchmark written to bench.txt")


def run(args: argparse.Namespace) -> None:
    args.pack = Path(args.pack).resolve()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = Log(out)
    deadline = log.began + args.budget
    log.results["settings"] = {k: str(v) for k, v in vars(args).items()}
    log.line(f"run: budget {args.budget:g} s, device {args.device}, pack {args.pack}")
    log.line(f"pack checked: {_check_pack(args.pack)} files as packed")
    _install_wheels(args.pack, log)
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (use --device cpu for a rehearsal)")
    log.record("environment", torch=torch.__version__, cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    part_bytes = int(args.part_mib * MIB)

    args.init = _init_folder(args.pack)
    if args.init is not None:
        log.record("init", folder=str(args.init), checksums=hashlib.sha256(
            (args.init / "checksums.sha256").read_bytes()).hexdigest(), status="ok")
        log.line(f"continuing from {args.init} (no eVAE stage)")

    # 1. preflight: two real steps of each kind of stage, then export and split
    t0 = log.elapsed()
    pre = work / "preflight"
    tiny = dict(max_steps=2, time_budget=0.0, batch_size=min(args.batch_size or 4, 4))
    if args.init is None:
        vae = _train("vae", _stage_config("vae", args, pre, "vae", 0, preset=args.preset,
                                          **tiny), log, "preflight_vae")
        start = dict(preset=args.preset, evae=str(vae))
    else:
        start = dict(init=str(args.init))
    base = _train("diffusion", _stage_config("diffusion", args, pre, "base", 0, gan_start=0,
                                             **start, **tiny), log, "preflight_base")
    lora = _train("diffusion", _stage_config("diffusion", args, pre, "lora_r", 0,
                                             init=str(base), sharp_photos=None, **tiny),
                  log, "preflight_lora")
    _export_and_split(lora, work / "preflight", part_bytes, pre, "preflight")
    log.record("preflight", seconds=round(log.elapsed() - t0, 1), status="ok")
    log.line(f"preflight passed in {log.elapsed() - t0:.1f} s")
    _measure_data_path(args, work, log, batches=args.data_batches)

    # 2.-5. the stages, each with its share of the time left (at least a step each)
    reserve = args.reserve  # export, evaluation
    left = deadline - time.monotonic() - reserve
    shares = RECIPE["shares" if args.init is None else "continue_shares"]
    budgets = {name: max(0.0, left * share) for name, share in shares.items()}
    for name, seconds in (args.stage_budget or []):
        budgets[name] = seconds
    log.record("budgets", **{k: round(v, 1) for k, v in budgets.items()})
    # each stage that fails (an error, a diverged loss) is logged and the run goes on from the
    # last good model; every full model is exported into OUT as soon as it exists, so that a
    # run cut short (the command's time limit, a signal) still returns the best model so far
    if args.init is None:
        vae = _guarded(log, "vae", lambda: _train("vae", _stage_config(
            "vae", args, work, "vae", budgets["vae"], preset=args.preset), log, "vae"))
        if vae is None:
            raise SystemExit("the eVAE stage failed: no model (see run.log)")
        start = dict(preset=args.preset, evae=str(vae))
    model = _guarded(log, "base", lambda: _train("diffusion", _stage_config(
        "diffusion", args, work, "base", budgets["base"], gan_start=args.gan_start, **start),
        log, "base"))
    if model is None:
        raise SystemExit("the base stage failed: no model (see run.log)")
    exported = _export(model, "base", out, part_bytes, work, log)
    for name, extra in (("lora_r", dict(sharp_photos=None)), ("lora_s", dict(frames=None))):
        trained = _guarded(log, name, lambda name=name, extra=extra, model=model: _train(
            "diffusion", _stage_config("diffusion", args, work, name, budgets[name],
                                       init=str(model), **extra), log, name))
        if trained is not None:
            model = trained
            exported = _export(model, name, out, part_bytes, work, log) or exported
    if exported is None:
        raise SystemExit("no model could be exported (see run.log)")

    # evaluation of the model that came back, then the speed benchmark
    eval_seconds = max(10.0, min(args.eval_seconds, deadline - time.monotonic()))
    scores = _guarded(log, "evaluation", lambda: _evaluate(
        Path(exported["folder"]), args.pack, work, args.device, eval_seconds))
    if scores is not None:
        log.record("evaluation", **scores, status="ok")
        log.line("evaluation: " + json.dumps(scores))
    if args.device != "cpu" and not args.no_bench:
        _guarded(log, "benchmark", lambda: _benchmark(
            out, min(args.bench_seconds, deadline - time.monotonic() - 5), log))
    log.line(f"done in {log.elapsed():.1f} s")


def _guarded(log: Log, stage: str, work):
    """``work()``, or None when it raises: the error and its traceback go to run.log and
    ``results.json`` (a signal or Ctrl-C is not caught: what OUT holds by then comes back)."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - any failure of one stage
        log.record(stage, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        log.line(f"{stage} FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return None


def _export(model: Path, stage: str, out: Path, part_bytes: int, work: Path,
            log: Log) -> dict | None:
    """Export the model of ``stage`` into OUT (replacing an earlier stage's), or None when
    that fails (logged as ``export_STAGE``; ``export`` keeps describing what OUT holds)."""
    started = time.monotonic()
    exported = _guarded(log, f"export_{stage}",
                        lambda: _export_and_split(model, out, part_bytes, work, stage))
    if exported is not None:
        log.results["stages"].pop("export", None)  # a record of this model only
        log.record("export", **exported, model_of=stage,
                   seconds=round(time.monotonic() - started, 1),
                   status="ok")
        log.line(f"{stage} model exported: {exported['bytes'] / MIB:.1f} MiB in "
                 f"{exported['parts']} part(s), {time.monotonic() - started:.1f} s")
    return exported


def _check_pack(pack_dir: Path) -> int:
    """The pack as ``pack`` wrote it (every file's SHA-256 in its manifest); its file count.
    A transfer that lost or cut a file stops the run here, not half-way through a stage."""
    manifest = json.loads((pack_dir / "manifest.json").read_text(encoding="utf-8"))
    bad = [rel for rel, digest in manifest.get("sha256", {}).items()
           if not (pack_dir / rel).is_file()
           or hashlib.sha256((pack_dir / rel).read_bytes()).hexdigest() != digest]
    if bad:
        raise SystemExit(f"the pack differs from its manifest in {len(bad)} file(s), e.g. "
                         f"{', '.join(bad[:3])}: copy it again")
    return len(manifest.get("sha256", {}))


def _init_folder(pack_dir: Path) -> Path | None:
    """The model folder the pack continues from (``pack --init``), or None: from scratch."""
    manifest = json.loads((pack_dir / "manifest.json").read_text(encoding="utf-8"))
    init = manifest.get("init")
    if not init:
        return None
    folder = ROOT / init["tree"] if "tree" in init else pack_dir / init["pack"]
    from deblurcli.modelfolder import verify_checksums

    verify_checksums(folder)
    return folder


# ----------------------------------------------------------------------------- rejoin
def rejoin(args: argparse.Namespace) -> None:
    from deblurcli.images import atomic_folder
    from deblurcli.modelfolder import verify_checksums

    src, dest = Path(args.results), Path(args.output)
    blob, parts, stage, skipped = None, [], None, []
    for stage in reversed(EXPORTED_STAGES):  # the latest stage's complete set
        parts = sorted(src.glob(f"model-{stage}.tar.[0-9][0-9]"))
        checksum = src / f"model-{stage}.sha256"
        if not parts and not checksum.exists():
            continue
        data = b"".join(p.read_bytes() for p in parts)
        if parts and checksum.is_file() and \
                hashlib.sha256(data).hexdigest() == checksum.read_text(encoding="utf-8").split()[0]:
            blob = data
            break
        skipped.append(f"model-{stage}: {len(parts)} part(s) "
                       + ("that do not match its checksum" if checksum.is_file()
                          else "without a checksum (cut short)"))
    if blob is None:
        raise SystemExit(f"no complete model in {src}"
                         + (f" ({'; '.join(skipped)})" if skipped else
                            " (no model-STAGE.tar.NN parts with their model-STAGE.sha256)"))
    if skipped:
        print(f"skipped {'; '.join(skipped)}", file=sys.stderr)
    if dest.exists() and not args.force:
        raise SystemExit(f"{dest} exists (use --force to replace it)")
    with atomic_folder(dest, replace=True) as tmp, tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
        if any(not m.isfile() or not m.name.startswith("model/") or ".." in m.name
               for m in members):
            raise SystemExit("unexpected entries in the model archive")
        for member in members:  # model/NAME -> NAME: the archive's folder is dest itself
            member.name = member.name.removeprefix("model/")
        tar.extractall(tmp, members=members, filter="data")
        verify_checksums(tmp)
    print(f"model folder {dest}: the {stage} stage's model, {len(parts)} part(s), checksums "
          "verified")


# ----------------------------------------------------------------------------- cli
def _stage_budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in RECIPE["shares"]:
        raise argparse.ArgumentTypeError(f"unknown stage {name!r}")
    return name, float(seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="build the data pack")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / ".gpu-pack"))
    p.add_argument("--wheels", default=str(ROOT / ".whl"),
                   help="folder of wheels to carry (diffusers, stlpips-pytorch for Python "
                        "3.12: " + " ".join(WHEEL_PINS) + ")")
    p.add_argument("--allow-missing-wheels", action="store_true",
                   help="pack without them (a rehearsal on a machine that has the packages)")
    p.add_argument("--max-pack-mib", type=float, default=62.0,
                   help="limit for the pack plus the git-tracked working tree")
    p.add_argument("--frames-share", type=float, default=0.3,
                   help="share of the data budget for the frames")
    p.add_argument("--quality", type=int, default=90,
                   help="JPEG quality (lowered, down to 70, only if shrinking is not enough)")
    p.add_argument("--min-side", type=int, default=320,
                   help="photos and frames keep at least this short side (the run's crop plus "
                        "its kernel margin)")
    p.add_argument("--init", metavar="MODEL_DIR",
                   help="continue from this model folder (kept training state, e.g. the shipped "
                        "src/deblurcli/weights) instead of training from scratch")
    p.add_argument("--subset-seed", type=int, default=0,
                   help="when the photos do not fit even at quality 70, the seed of the random "
                        "subset that is packed (another seed, another subset)")
    p.set_defaults(func=pack)

    r = sub.add_parser("run", help="the whole recipe (on the GPU machine)")
    r.add_argument("--pack", default=str(ROOT / ".gpu-pack"))
    r.add_argument("--out", required=True)
    r.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                  "deblurcli-gpu-run"))
    r.add_argument("--budget", type=float, default=530.0, help="seconds for the whole run")
    r.add_argument("--stage-budget", type=_stage_budget, action="append",
                   help="STAGE=SECONDS, overriding a stage's share (vae, base, lora_r, lora_s)")
    r.add_argument("--reserve", type=float, default=70.0,
                   help="seconds kept for export and evaluation")
    r.add_argument("--eval-seconds", type=float, default=40.0)
    r.add_argument("--device", default="cuda")
    r.add_argument("--preset", default=RECIPE["preset"])
    r.add_argument("--crop", type=int, default=RECIPE["crop"])
    r.add_argument("--batch-size", type=int, default=0, help="0: the recipe's")
    r.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                   help="processes drawing kernels ahead of the GPU")
    r.add_argument("--gan-start", type=int, default=300)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--data-batches", type=int, default=20,
                   help="batches timed to measure the data path after the preflight")
    r.add_argument("--part-mib", type=float, default=15.0)
    r.add_argument("--no-bench", action="store_true")
    r.add_argument("--bench-seconds", type=float, default=60.0,
                   help="at most this long for the speed benchmark (what time is left otherwise)")
    r.set_defaults(func=run)

    j = sub.add_parser("rejoin", help="reassemble and verify the model folder")
    j.add_argument("results", help="the run's OUT folder (model-STAGE.tar.NN + "
                   "model-STAGE.sha256: the latest complete stage's is taken)")
    j.add_argument("-o", "--output", required=True)
    j.add_argument("--force", action="store_true")
    j.set_defaults(func=rejoin)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
