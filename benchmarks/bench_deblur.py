#!/usr/bin/env python
"""Speed and memory of one-step deblurring (DeblurPipeline: numpy image in -> numpy image out).

Every configuration is loaded from a *model folder* (by default one written to a temporary
directory from a randomly initialised preset -- cost does not depend on the weight values), so
loading, adapter fusing and dtype casting follow the real ``load_model_folder`` path. Each
configuration runs in a fresh subprocess so its peak RSS is its own.

Examples::

    # default model on the CPU, 1280x720 and 4000x3000
    python benchmarks/bench_deblur.py --preset compact --device cpu --size 1280x720 --size 4000x3000
    # paper scale on a GPU
    python benchmarks/bench_deblur.py --preset sd21 --device cuda --dtype bf16 --size 1280x720 \\
        --repeats 10
    # the effect of each optimisation, as ratios measured in the same process
    python benchmarks/bench_deblur.py --preset compact --device cpu --ablations

Results: a Markdown table on stdout (plus ``--json`` / ``--markdown`` files). See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

from deblurcli.tiles import DEFAULT_OVERLAP, DEFAULT_TILE  # noqa: E402  (numpy only)

RESULT_PREFIX = "BENCH_RESULT "
SCRIPT = Path(__file__).resolve()

TABLE_COLUMNS = ("config", "device", "dtype", "size", "tiles", "s/image median", "min", "max",
                 "runs", "CPU s/image", "GFLOP/image", "peak RSS", "peak RSS deblur", "CUDA peak",
                 "threads")
ABLATION_COLUMNS = ("ablation", "baseline", "variant", "baseline s/image", "variant s/image",
                    "speed-up (baseline/variant)", "runs", "max abs diff")


@dataclass
class BenchConfig:
    """One benchmark configuration (all of it reproducible from the command line).

    Attributes:
        preset: model architecture (``compact`` = default model, ``sd21`` = paper scale, ``tiny``;
            ``identity`` = no network: the pipeline's own cost, i.e. tiling, copies, blending).
        device, dtype: ``--device`` / ``--dtype`` values as the ``deblur`` command takes them.
        vae_dtype: dtype of the eVAE (``fp32`` keeps it in float32 under a bf16/fp16 UNet);
            ``None`` = same as ``dtype``.
        size: image (width, height).
        tile, overlap, batch_size: DeblurPipeline tiling.
        threads: CPU intra-op threads (0 = every usable core).
        fused: merge the gamma-blend into the UNet (``False``: live LoRA layers).
        channels_last: NHWC memory format for the model and its input (the ``deblur`` default).
        compile: wrap the model in ``torch.compile``.
        unet_head_dim: random presets only: give the UNet attention heads of this many channels
            (diffusers' ``attention_head_dim`` is the number of heads; 0 = the preset's).
        cudnn_benchmark: let cuDNN time its convolution algorithms per shape (CUDA only; a
            process-wide torch flag, set before every run).
        gamma: dual-adapter blend weight.
        warmup, repeats: untimed and timed runs.
        label: name shown in tables.
    """

    preset: str = "compact"
    device: str = "cpu"
    dtype: str = "fp32"
    vae_dtype: str | None = None
    size: tuple[int, int] = (1280, 720)
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    batch_size: int = 4
    threads: int = 0
    fused: bool = True
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = False
    unet_head_dim: int = 0
    gamma: float = 0.7
    warmup: int = 1
    repeats: int = 5
    label: str = ""

    @property
    def size_text(self) -> str:
        """``"WIDTHxHEIGHT"``."""
        return f"{self.size[0]}x{self.size[1]}"

    def short(self) -> str:
        """A compact human-readable description (used when ``label`` is empty)."""
        parts = [self.preset, self.dtype + (f"/vae-{self.vae_dtype}" if self.vae_dtype else ""),
                 f"tile {self.tile}/{self.overlap}" if self.tile else "whole image",
                 f"batch {self.batch_size}"]
        if self.threads:
            parts.append(f"{self.threads} thread(s)")
        parts += [name for name, on in (("unfused", not self.fused),
                                        ("NCHW", not self.channels_last),
                                        ("compile", self.compile),
                                        ("cudnn.benchmark", self.cudnn_benchmark)) if on]
        if self.unet_head_dim:
            parts.append(f"UNet heads of {self.unet_head_dim} ch")
        return " ".join(parts)

    def argv(self) -> list[str]:
        """Command-line flags of this script that reproduce this configuration alone."""
        args = ["--preset", self.preset, "--device", self.device, "--dtype", self.dtype,
                "--size", self.size_text, "--tile", str(self.tile), "--overlap", str(self.overlap),
                "--batch-size", str(self.batch_size), "--threads", str(self.threads),
                "--gamma", f"{self.gamma:g}", "--warmup", str(self.warmup),
                "--repeats", str(self.repeats)]
        if self.vae_dtype:
            args += ["--vae-dtype", self.vae_dtype]
        if not self.fused:
            args.append("--unfused")
        if not self.channels_last:
            args.append("--no-channels-last")
        if self.compile:
            args.append("--compile")
        if self.cudnn_benchmark:
            args.append("--cudnn-benchmark")
        if self.unet_head_dim:
            args += ["--unet-head-dim", str(self.unet_head_dim)]
        return args


# ----------------------------------------------------------------------------- model + image
def make_model_folder(preset: str, folder: str | Path, *, seed: int = 0,
                      storage: str = "fp16", unet_head_dim: int = 0) -> Path:
    """Write a randomly initialised ``preset`` model (random, non-zero adapters) as a model
    folder, the way trained models are shipped (E2 left out, ``storage`` dtype on disk).

    ``unet_head_dim`` > 0 changes the UNet's attention heads to that many channels each (same
    parameters, different attention split; for measuring a preset change)."""
    import torch

    from deblurcli.modelfolder import save_model_folder
    from deblurcli.models.osdd import build_osdd
    from deblurcli.models.presets import preset_config

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    config = preset_config(preset)
    if unet_head_dim:
        channels = config.unet["block_out_channels"]
        if any(c % unet_head_dim for c in channels):
            raise ValueError(f"--unet-head-dim {unet_head_dim} does not divide {channels}")
        config.unet = dict(config.unet, attention_head_dim=tuple(c // unet_head_dim
                                                                 for c in channels))
    model = build_osdd(config, seed=seed, randomize_adapters=True)
    folder = Path(folder)
    save_model_folder(folder, model, storage_dtype=dtypes[storage], include_sharp_encoder=False,
                      extra={"note": f"random {preset} weights for benchmarks (seed {seed})"})
    return folder


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A float32 ``(H, W, 3)`` image in ``[0, 1]``: smooth gradients plus noise (the cost of
    deblurring does not depend on the content)."""
    rng = np.random.default_rng(seed)
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base = 0.5 * (yy + xx) * np.array([1.0, 0.8, 0.6], dtype=np.float32)
    noise = rng.random((height, width, 3), dtype=np.float32)
    out = 0.8 * base + 0.2 * noise
    return out.astype(np.float32, copy=False)


@dataclass
class Loaded:
    """A model loaded for one configuration and the pipeline around it."""

    config: BenchConfig
    pipeline: Any
    device: Any
    dtype: Any
    load_s: float
    info: dict[str, Any] = field(default_factory=dict)


IDENTITY = "identity"


def _identity(x: Any) -> Any:
    """The ``identity`` preset's "network": a copy of its input."""
    return x.clone()


def variant_folder(cfg: BenchConfig, model_dir: str | Path) -> Path:
    """The model folder ``cfg`` runs: ``model_dir``, or for ``unet_head_dim`` the folder
    ``<preset>-head<N>`` beside it (written by :func:`ensure_model_folders`)."""
    model_dir = Path(model_dir)
    if not cfg.unet_head_dim:
        return model_dir
    return model_dir.parent / f"{cfg.preset}-head{cfg.unet_head_dim}"


def ensure_model_folders(configs: list[BenchConfig], model_dir: Path, *, storage: str,
                         random: bool) -> None:
    """Write the random model folders ``configs`` need (``random=False``: ``model_dir`` is a
    real model folder, where head variants cannot be made)."""
    for cfg in configs:
        folder = variant_folder(cfg, model_dir)
        if folder.exists() or cfg.preset == IDENTITY:
            continue
        if not random:
            raise SystemExit("--unet-head-dim needs a random preset (not --weights)")
        make_model_folder(cfg.preset, folder, storage=storage, unet_head_dim=cfg.unet_head_dim)


def load_config(cfg: BenchConfig, model_dir: str | Path) -> Loaded:
    """Load ``model_dir`` as ``cfg`` asks (device, dtypes, fused or not, channels_last,
    compile) and wrap it in a :class:`DeblurPipeline`."""
    from deblurcli.device import resolve_device, resolve_dtype
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.pipeline import DeblurPipeline, prepare_model

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    vae_dtype = resolve_dtype(cfg.vae_dtype, device) if cfg.vae_dtype else dtype
    if cfg.preset == IDENTITY:
        pipeline = DeblurPipeline(_identity, device=device, dtype=vae_dtype, tile=cfg.tile,
                                  overlap=cfg.overlap, batch_size=cfg.batch_size,
                                  channels_last=cfg.channels_last)
        return Loaded(cfg, pipeline, device, dtype, 0.0, {"attention_processors": {}})
    start = time.perf_counter()
    model = load_model_folder(variant_folder(cfg, model_dir), device=device, dtype=dtype,
                              vae_dtype=vae_dtype, gamma=cfg.gamma, fuse=cfg.fused)
    runner: Callable = prepare_model(model, channels_last=cfg.channels_last,
                                     compile=cfg.compile)
    load_s = time.perf_counter() - start
    info = {
        "params_unet_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 2),
        "params_evae_m": round(sum(p.numel() for p in model.evae.parameters()) / 1e6, 2),
        "attention_processors": bc.attention_processors(model),
        "unet_dtype": str(model.unet_dtype).replace("torch.", ""),
        "vae_dtype": str(model.vae_dtype).replace("torch.", ""),
        "fused_gamma": model.fused_gamma,
    }
    pipeline = DeblurPipeline(runner, device=device, dtype=model.vae_dtype, tile=cfg.tile,
                              overlap=cfg.overlap, batch_size=cfg.batch_size,
                              channels_last=cfg.channels_last)
    return Loaded(cfg, pipeline, device, dtype, load_s, info)


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)


def apply_process_settings(cfg: BenchConfig) -> int:
    """Set the process-wide knobs of ``cfg`` (CPU threads, cuDNN autotuning); returns the
    thread count."""
    import torch

    from deblurcli.device import set_cpu_threads

    torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    return set_cpu_threads(cfg.threads)


def time_once(loaded: Loaded, image: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Wall-clock seconds of one pipeline call (device synchronised), its output, and the CPU
    seconds this process used meanwhile (all threads; on a busy machine wall time grows, CPU
    time much less)."""
    _sync(loaded.device)
    cpu0 = time.process_time()
    start = time.perf_counter()
    out = loaded.pipeline(image)
    _sync(loaded.device)
    return time.perf_counter() - start, out, time.process_time() - cpu0


def count_flops(loaded: Loaded, image: np.ndarray) -> int | None:
    """Floating-point operations of one pipeline call (``torch.utils.flop_counter``: matmuls,
    convolutions and attention; element-wise ops are not counted), or ``None`` if unavailable."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - old torch
        return None
    with FlopCounterMode(display=False) as counter:
        loaded.pipeline(image)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- one configuration
def run_config(cfg: BenchConfig, model_dir: str | Path, *, count: bool = True
               ) -> dict[str, Any]:
    """Benchmark one configuration in this process and return a JSON-ready result dict.

    Peak RSS covers the whole process (model loading included) and, separately, the deblurring
    phase only (the kernel's peak counter is reset after loading, on Linux). On CUDA the peak
    of ``torch.cuda.max_memory_allocated`` during deblurring is reported too. ``count`` adds
    one untimed run under torch's FLOP counter (skipped for compiled models).
    """
    import torch

    import deblurcli.modelfolder  # noqa: F401  (imports diffusers: part of the baseline RSS)
    import deblurcli.pipeline  # noqa: F401

    rss_imports = bc.current_rss_bytes()
    threads = apply_process_settings(cfg)
    width, height = cfg.size
    loaded = load_config(cfg, model_dir)
    image = synthetic_image(width, height)
    rss_loaded = bc.current_rss_bytes()
    peak_loading = bc.peak_rss_bytes()  # before the reset: covers loading the model
    reset_ok = bc.reset_peak_rss()
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(loaded.device)
    warm = [time_once(loaded, image)[0] for _ in range(cfg.warmup)]
    times, cpu_times = [], []
    for _ in range(cfg.repeats):
        seconds, out, cpu_seconds = time_once(loaded, image)
        times.append(seconds)
        cpu_times.append(cpu_seconds)
        if out.shape != image.shape or out.dtype != np.float32 or not np.isfinite(out).all():
            raise RuntimeError(f"bad pipeline output: shape {out.shape}, dtype {out.dtype}")
        del out  # like the CLI: one result alive at a time
    peak_deblur = bc.peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated(loaded.device) if cuda else None
    flops = count_flops(loaded, image) if count and not cfg.compile else None
    return {
        "config": dataclasses.asdict(cfg),
        "label": cfg.label or cfg.short(),
        "command": shlex.join([sys.executable, str(SCRIPT), *cfg.argv()]),
        "environment": bc.environment(loaded.device),
        "threads": threads,
        "model": loaded.info,
        "tiles": len(loaded.pipeline.plan(height, width).tiles),
        "load_s": loaded.load_s,
        "warmup_s": warm,
        "times_s": times,
        **bc.TimeStats.of(times).as_dict(),
        "cpu_times_s": cpu_times,
        "cpu_median_s": bc.TimeStats.of(cpu_times).median,
        "gflop_per_image": None if flops is None else flops / 1e9,
        "rss_after_imports_bytes": rss_imports,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": max(peak_loading, peak_deblur),  # whole process
        "peak_rss_deblur_bytes": peak_deblur if reset_ok else None,
        "cuda_peak_bytes": cuda_peak,
    }


def run_isolated(cfg: BenchConfig, model_dir: str | Path, *, timeout: float | None = None
                 ) -> dict[str, Any]:
    """Run :func:`run_config` in a fresh Python subprocess (so peak RSS is this config's own)."""
    payload = json.dumps(dataclasses.asdict(cfg))
    cmd = [sys.executable, str(SCRIPT), "--worker", payload, "--model-dir", str(model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}) for "
                       f"{cfg.short()}:\n" + "\n".join(tail))


# ----------------------------------------------------------------------------- FLOP estimates
#: (tile, overlap) settings compared by ``--estimate`` (0 = the whole image as one tile).
ESTIMATE_TILINGS = ((512, 64), (512, 32), (448, 32), (384, 32), (640, 64), (768, 64), (0, 0))
ESTIMATE_COLUMNS = ("preset", "size", "tile/overlap", "tiles", "pixels run / image pixels",
                    "GFLOP/image")


def meta_model(preset: str) -> Any:
    """The ``preset`` architecture with fused adapters on torch's ``meta`` device (no memory,
    no weights): enough to count FLOPs for any input shape in milliseconds."""
    import torch
    from diffusers import UNet2DConditionModel

    from deblurcli.models.evae import EVAE
    from deblurcli.models.onestep import OneStepDenoiser
    from deblurcli.models.osdd import OSDDModel
    from deblurcli.models.presets import preset_config

    cfg = preset_config(preset)
    with torch.device("meta"):
        evae = EVAE(**cfg.evae)
        unet = UNet2DConditionModel.from_config(dict(cfg.unet))
    denoiser = OneStepDenoiser(unet, timestep=cfg.timestep, prompt_tokens=cfg.prompt_tokens)
    return OSDDModel(evae, denoiser).to("meta").eval().requires_grad_(False)


def estimate(preset: str, size: tuple[int, int], tile: int, overlap: int,
             model: Any = None) -> dict[str, Any]:
    """FLOPs of deblurring a ``size`` image with this tiling (counted on the meta device: one
    tile's FLOPs times the number of tiles; every tile has the same shape)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deblurcli.pipeline import DeblurPipeline

    model = model if model is not None else meta_model(preset)
    width, height = size
    plan = DeblurPipeline(model, tile=tile, overlap=overlap).plan(height, width)
    x = torch.empty(1, 3, plan.tile_h, plan.tile_w, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    n = len(plan.tiles)
    return {"preset": preset, "size": f"{width}x{height}", "tile": tile, "overlap": overlap,
            "tiles": n, "tile_shape": [plan.tile_h, plan.tile_w],
            "pixel_ratio": n * plan.tile_h * plan.tile_w / (width * height),
            "gflop_per_image": n * counter.get_total_flops() / 1e9}


def estimate_row(res: dict[str, Any]) -> dict[str, Any]:
    """One Markdown-table row of an :func:`estimate` result."""
    return {"preset": res["preset"], "size": res["size"],
            "tile/overlap": "whole image" if res["tile"] == 0 else
            f"{res['tile']}/{res['overlap']}",
            "tiles": f"{res['tiles']} x {res['tile_shape'][0]}x{res['tile_shape'][1]}",
            "pixels run / image pixels": f"{res['pixel_ratio']:.2f}",
            "GFLOP/image": f"{res['gflop_per_image']:.0f}"}


# ----------------------------------------------------------------------------- file-to-file CLI
def cli_argv(cfg: BenchConfig, model_dir: str | Path, src: Path, dst: Path) -> list[str]:
    """The ``deblurcli deblur`` command equivalent to ``cfg`` (file-to-file)."""
    args = [sys.executable, "-m", "deblurcli", "deblur", str(src), str(dst), "--weights",
            str(model_dir), "--device", cfg.device, "--dtype", cfg.dtype, "--tile", str(cfg.tile),
            "--tile-overlap", str(cfg.overlap), "--batch-size", str(cfg.batch_size),
            "--threads", str(cfg.threads), "--gamma", f"{cfg.gamma:g}"]
    if cfg.vae_dtype == "fp32":
        args.append("--vae-fp32")
    elif cfg.vae_dtype:
        raise ValueError("the deblur command only offers --vae-fp32")
    if not cfg.fused:
        args.append("--no-fuse")
    if cfg.compile:
        args.append("--compile")
    if not cfg.channels_last:
        raise ValueError("the deblur command always uses channels_last")
    return args


_RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                "print('CHILD_MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
                "; sys.exit(code)")


def run_cli(cfg: BenchConfig, model_dir: str | Path, *, image_format: str = "jpg"
            ) -> dict[str, Any]:
    """Time ``deblurcli deblur`` on a folder of ``warmup + repeats`` copies of the test image.

    Reports the command's total wall time (Python start, imports, model loading, reading,
    deblurring, writing) and the mean seconds per image it prints itself, plus its peak RSS.
    """
    import re

    from deblurcli.images import write_image

    count = cfg.warmup + cfg.repeats
    image = synthetic_image(*cfg.size)
    with tempfile.TemporaryDirectory(prefix="deblurcli-bench-cli-") as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        src.mkdir()
        for i in range(count):
            write_image(src / f"photo{i:03d}.{image_format}", image)
        argv = cli_argv(cfg, variant_folder(cfg, model_dir), src, dst)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *argv], capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
        produced = len(list(dst.glob("*"))) if dst.is_dir() else 0
    if proc.returncode != 0 or produced != count:
        raise RuntimeError(f"deblurcli deblur failed (exit {proc.returncode}, {produced}/{count} "
                           f"outputs): {proc.stderr.strip()[-800:]}")
    mean = re.search(r"mean ([0-9.]+) s/image", proc.stdout)
    rss = re.search(r"CHILD_MAXRSS_KIB (\d+)", proc.stdout)
    return {
        "label": (cfg.label or cfg.short()) + " (CLI)", "config": dataclasses.asdict(cfg),
        "command": shlex.join(["deblurcli", "deblur", "IN_DIR", "OUT_DIR", *argv[6:]]),
        "images": count, "total_wall_s": wall, "wall_per_image_s": wall / count,
        "cli_mean_s_per_image": float(mean.group(1)) if mean else None,
        "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
    }


# ----------------------------------------------------------------------------- ablations
def ablation_pairs(base: BenchConfig, names: list[str] | None = None
                   ) -> list[tuple[str, BenchConfig, BenchConfig]]:
    """(name, baseline, variant) pairs isolating one optimisation each.

    The variant is the optimised setting; the speed-up is ``time(baseline) / time(variant)``.
    GPU-only pairs (half precision, fp32 eVAE) are left out on the CPU.
    """
    gpu = base.device != "cpu"
    half = base.dtype if base.dtype in ("bf16", "fp16") else "bf16"
    rep = dataclasses.replace
    pairs = [
        ("fused LoRA blend", rep(base, fused=False), rep(base, fused=True)),
        ("channels_last", rep(base, channels_last=False), rep(base, channels_last=True)),
        ("batched tiles (1 -> 4)", rep(base, batch_size=1), rep(base, batch_size=4)),
        ("torch.compile", rep(base, compile=False), rep(base, compile=True)),
        ("tile 512/64 -> 448/32", rep(base, tile=512, overlap=64),
         rep(base, tile=448, overlap=32)),
        ("tile 512/64 -> whole image", rep(base, tile=512, overlap=64),
         rep(base, tile=0, overlap=0)),
    ]
    if gpu:
        pairs += [
            (f"{half} vs fp32", rep(base, dtype="fp32", vae_dtype=None),
             rep(base, dtype=half, vae_dtype=None)),
            (f"{half} eVAE vs fp32 eVAE", rep(base, dtype=half, vae_dtype="fp32"),
             rep(base, dtype=half, vae_dtype=None)),
            ("cudnn.benchmark", rep(base, cudnn_benchmark=False),
             rep(base, cudnn_benchmark=True)),
        ]
    else:
        pairs.append(("threads 1 -> all", rep(base, threads=1), rep(base, threads=0)))
    if base.preset == "compact" or (names and "heads" in names):
        pairs.append(("UNet heads of 32 channels (preset change)", rep(base, unet_head_dim=0),
                      rep(base, unet_head_dim=32)))
    keys = {"fused": "fused LoRA blend", "channels_last": "channels_last",
            "batch": "batched tiles (1 -> 4)", "compile": "torch.compile",
            "tile": "tile 512/64 -> 448/32", "whole": "tile 512/64 -> whole image",
            "dtype": f"{half} vs fp32", "vae_dtype": f"{half} eVAE vs fp32 eVAE",
            "threads": "threads 1 -> all", "cudnn": "cudnn.benchmark",
            "heads": "UNet heads of 32 channels (preset change)"}
    if names:
        unknown = [n for n in names if n not in keys]
        if unknown:
            raise ValueError(f"unknown ablation(s) {unknown}; choose from {', '.join(keys)}")
        wanted = {keys[n] for n in names}
        pairs = [p for p in pairs if p[0] in wanted]
    return [(name, rep(a, label=a.short()), rep(b, label=b.short())) for name, a, b in pairs]


def run_ablation(name: str, base: BenchConfig, variant: BenchConfig,
                 model_dir: str | Path) -> dict[str, Any]:
    """Time ``base`` and ``variant`` in the same process, alternating runs (so background load
    affects both alike); returns medians, the speed-up and the outputs' max difference."""
    width, height = base.size
    image = synthetic_image(width, height)
    loaded = [load_config(c, model_dir) for c in (base, variant)]
    times: list[list[float]] = [[], []]
    outputs: list[np.ndarray | None] = [None, None]
    for i, item in enumerate(loaded):  # warm-up (compilation happens here)
        apply_process_settings(item.config)
        for _ in range(item.config.warmup):
            outputs[i] = time_once(item, image)[1]
    for _ in range(base.repeats):
        for i, item in enumerate(loaded):
            apply_process_settings(item.config)
            seconds, outputs[i], _ = time_once(item, image)
            times[i].append(seconds)
    a, b = (bc.TimeStats.of(t) for t in times)
    diff = float(np.abs(outputs[0] - outputs[1]).max())
    return {
        "ablation": name,
        "baseline": base.label or base.short(),
        "variant": variant.label or variant.short(),
        "baseline_times_s": times[0],
        "variant_times_s": times[1],
        "baseline_median_s": a.median,
        "variant_median_s": b.median,
        "speedup": a.median / b.median,
        "runs": a.runs,
        "max_abs_diff": diff,
        "environment": bc.environment(loaded[0].device),
        "command": shlex.join([sys.executable, str(SCRIPT), *base.argv(), "--ablations"]),
    }


def run_ablation_isolated(name: str, base: BenchConfig, variant: BenchConfig,
                          model_dir: str | Path) -> dict[str, Any]:
    """:func:`run_ablation` in a fresh subprocess."""
    payload = json.dumps({"name": name, "base": dataclasses.asdict(base),
                          "variant": dataclasses.asdict(variant)})
    cmd = [sys.executable, str(SCRIPT), "--ablation-worker", payload, "--model-dir",
           str(model_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    raise RuntimeError(f"ablation worker failed (exit {proc.returncode}) for {name}:\n"
                       + "\n".join(tail))


# ----------------------------------------------------------------------------- rows
def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """One Markdown-table row of a :func:`run_config` result."""
    cfg = result["config"]
    dtype = cfg["dtype"] + (f" (eVAE {cfg['vae_dtype']})" if cfg.get("vae_dtype") else "")
    device = result["environment"].get("gpu") or f"cpu ({result['environment']['cpu']})"
    return {
        "config": result["label"], "device": device, "dtype": dtype,
        "size": f"{cfg['size'][0]}x{cfg['size'][1]}", "tiles": result["tiles"],
        "s/image median": f"{result['median_s']:.3f}", "min": f"{result['min_s']:.3f}",
        "max": f"{result['max_s']:.3f}", "runs": result["runs"],
        "CPU s/image": f"{result['cpu_median_s']:.2f}",
        "GFLOP/image": "-" if result["gflop_per_image"] is None
        else f"{result['gflop_per_image']:.0f}",
        "peak RSS": bc.gib(result["peak_rss_bytes"]),
        "peak RSS deblur": bc.gib(result["peak_rss_deblur_bytes"]),
        "CUDA peak": bc.gib(result["cuda_peak_bytes"]), "threads": result["threads"],
    }


def ablation_row(result: dict[str, Any]) -> dict[str, Any]:
    """One Markdown-table row of a :func:`run_ablation` result."""
    return {
        "ablation": result["ablation"], "baseline": result["baseline"],
        "variant": result["variant"],
        "baseline s/image": f"{result['baseline_median_s']:.3f}",
        "variant s/image": f"{result['variant_median_s']:.3f}",
        "speed-up (baseline/variant)": f"{result['speedup']:.2f}x", "runs": result["runs"],
        "max abs diff": f"{result['max_abs_diff']:.2e}",
    }


CLI_COLUMNS = ("config", "size", "images", "total wall s", "wall s/image", "CLI mean s/image",
               "peak RSS", "command")


def cli_row(result: dict[str, Any]) -> dict[str, Any]:
    """One Markdown-table row of a :func:`run_cli` result."""
    cfg = result["config"]
    mean = result["cli_mean_s_per_image"]
    return {"config": result["label"], "size": f"{cfg['size'][0]}x{cfg['size'][1]}",
            "images": result["images"], "total wall s": f"{result['total_wall_s']:.2f}",
            "wall s/image": f"{result['wall_per_image_s']:.2f}",
            "CLI mean s/image": "-" if mean is None else f"{mean:.2f}",
            "peak RSS": bc.gib(result["peak_rss_bytes"]), "command": f"`{result['command']}`"}


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    p = argparse.ArgumentParser(
        description="Time DeblurPipeline (numpy in -> numpy out) and measure peak memory.",
        epilog="example: python benchmarks/bench_deblur.py --preset compact --device cpu "
               "--size 1280x720 --size 4000x3000")
    p.add_argument("--preset", default="compact", choices=("compact", "sd21", "tiny", IDENTITY),
                   help="model architecture (random weights) when --weights is not given; "
                        "'identity' times the pipeline alone (no network)")
    p.add_argument("--weights", type=Path, default=None,
                   help="benchmark this model folder instead of a random preset")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps | auto")
    p.add_argument("--dtype", default="fp32", choices=("auto", "fp32", "fp16", "bf16"))
    p.add_argument("--vae-dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="dtype of the eVAE (default: --dtype); fp32 = keep the eVAE in float32")
    p.add_argument("--size", action="append", default=None, metavar="WxH",
                   help="image size, repeatable (default 1280x720)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help="tile side in pixels (0 = whole image; default as deblur)")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    p.add_argument("--batch-size", type=int, default=None,
                   help="tiles per call (default: as 'deblurcli deblur': 1 on the CPU, 4 else)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all usable cores)")
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--unet-head-dim", type=int, default=0,
                   help="random presets: UNet attention heads of this many channels "
                        "(0 = the preset's own heads)")
    p.add_argument("--unfused", action="store_true", help="keep the LoRA adapters unfused")
    p.add_argument("--no-channels-last", action="store_true",
                   help="contiguous NCHW tensors instead of channels_last (the deblur default)")
    p.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="set torch.backends.cudnn.benchmark (CUDA: autotune convolutions)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (>= 1 advised)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median of these)")
    p.add_argument("--ablations", nargs="?", const="all", default=None, metavar="LIST",
                   help="time each optimisation against its baseline in one process; 'all' or "
                        "a comma list of: fused, channels_last, batch, compile, tile, whole, "
                        "dtype, vae_dtype, cudnn (GPU), threads (CPU), heads (random compact "
                        "UNet with 32-channel attention heads)")
    p.add_argument("--estimate", action="store_true",
                   help="only count FLOPs per image (meta device: no weights, no timing) for "
                        "several tile/overlap settings")
    p.add_argument("--cli", action="store_true",
                   help="also time the file-to-file 'deblurcli deblur' command (JPEG in/out)")
    p.add_argument("--storage", default="fp16", choices=("fp32", "fp16", "bf16"),
                   help="on-disk dtype of the temporary random model folder")
    p.add_argument("--in-process", action="store_true",
                   help="run configurations in this process (peak RSS is then cumulative)")
    p.add_argument("--json", type=Path, default=None, help="also write all results as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table(s) here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ablation-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _config_from_json(data: dict[str, Any]) -> BenchConfig:
    data = dict(data)
    data["size"] = tuple(data["size"])
    return BenchConfig(**data)


def configs_from_args(args: argparse.Namespace) -> list[BenchConfig]:
    """One :class:`BenchConfig` per ``--size``."""
    sizes = [bc.parse_size(s) for s in (args.size or ["1280x720"])]
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    return [BenchConfig(preset=args.preset, device=args.device, dtype=args.dtype,
                        vae_dtype=args.vae_dtype, size=size, tile=args.tile,
                        overlap=args.overlap, threads=args.threads,
                        batch_size=args.batch_size or (1 if args.device == "cpu" else 4),
                        fused=not args.unfused, channels_last=not args.no_channels_last,
                        compile=args.compile, cudnn_benchmark=args.cudnn_benchmark,
                        unet_head_dim=args.unet_head_dim, gamma=args.gamma, warmup=args.warmup,
                        repeats=args.repeats) for size in sizes]


def _header(args_line: str, configs: list[BenchConfig]) -> str:
    import torch

    from deblurcli.device import resolve_device

    env = bc.environment(resolve_device(configs[0].device))
    first = configs[0]
    lines = [
        f"command: {args_line}",
        f"device: {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else
                                      f" ({env['cpu']}, {env['usable_cores']} usable cores)"),
        f"dtype: {first.dtype}" + (f", eVAE {first.vae_dtype}" if first.vae_dtype else ""),
        f"tiles: tile {first.tile}, overlap {first.overlap}, batch {first.batch_size}",
        f"torch {torch.__version__}, diffusers {env['diffusers']}, threads "
        f"{first.threads or env['usable_cores']} requested, load average {env['loadavg_1min']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        result = run_config(_config_from_json(json.loads(args.worker)), args.model_dir)
        print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
        return 0
    if args.ablation_worker is not None:
        job = json.loads(args.ablation_worker)
        result = run_ablation(job["name"], _config_from_json(job["base"]),
                              _config_from_json(job["variant"]), args.model_dir)
        print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
        return 0

    configs = configs_from_args(args)
    if args.preset == IDENTITY and (args.estimate or args.cli or args.weights):
        raise SystemExit("--preset identity has no network: no --estimate, --cli or --weights")
    args_line = shlex.join([sys.executable, str(SCRIPT), *(sys.argv[1:] if argv is None
                                                           else argv)])
    if args.estimate:
        model = meta_model(args.preset)
        tilings = list(dict.fromkeys([(args.tile, args.overlap), *ESTIMATE_TILINGS]))
        rows = [estimate(args.preset, c.size, t, o, model) for c in configs for t, o in tilings]
        text = bc.markdown_table([estimate_row(r) for r in rows], ESTIMATE_COLUMNS)
        print(f"command: {args_line}\n\n{text}")
        if args.json:
            bc.write_json(args.json, {"command": args_line, "estimates": rows})
        if args.markdown:
            bc.write_text_atomic(args.markdown, f"command: `{args_line}`\n\n{text}\n")
        return 0
    print(_header(args_line, configs), flush=True)
    output: dict[str, Any] = {"command": args_line, "results": [], "ablations": [], "cli": []}
    markdown: list[str] = []
    with tempfile.TemporaryDirectory(prefix="deblurcli-bench-") as tmp:
        if args.weights is not None:
            model_dir = args.weights
        else:
            model_dir = Path(tmp) / args.preset
        names = None if args.ablations in (None, "all") else args.ablations.split(",")
        pairs = [(size_cfg, pair) for size_cfg in configs
                 for pair in ablation_pairs(size_cfg, names)] if args.ablations else []
        start = time.perf_counter()
        ensure_model_folders([c for _, (_, a, b) in pairs for c in (a, b)] + configs, model_dir,
                             storage=args.storage, random=args.weights is None)
        if args.weights is None and args.preset != IDENTITY:
            print(f"wrote random {args.preset} model folder(s) in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if args.ablations:
            runner = run_ablation if args.in_process else run_ablation_isolated
            for size_cfg, (name, base, variant) in pairs:
                res = runner(name, base, variant, model_dir)
                output["ablations"].append(res)
                print(f"{name} @ {size_cfg.size_text}: {res['speedup']:.2f}x "
                      f"({res['baseline_median_s']:.3f} s -> {res['variant_median_s']:.3f} s)",
                      file=sys.stderr, flush=True)
            markdown.append(bc.markdown_table([ablation_row(r) for r in output["ablations"]],
                                              ABLATION_COLUMNS))
        else:
            for cfg in configs:
                res = run_config(cfg, model_dir) if args.in_process else \
                    run_isolated(cfg, model_dir)
                output["results"].append(res)
                print(f"{res['label']} @ {cfg.size_text}: median {res['median_s']:.3f} s, "
                      f"peak RSS {bc.gib(res['peak_rss_bytes'])}", file=sys.stderr, flush=True)
            markdown.append(bc.markdown_table([table_row(r) for r in output["results"]],
                                              TABLE_COLUMNS))
            procs = output["results"][0]["model"]["attention_processors"]
            markdown.append(f"attention processors: {procs}")
        if args.cli:
            for cfg in configs:
                res = run_cli(cfg, model_dir)
                output["cli"].append(res)
            markdown.append(bc.markdown_table([cli_row(r) for r in output["cli"]], CLI_COLUMNS))
    text = "\n\n".join(markdown)
    print(text)
    if args.json:
        bc.write_json(args.json, output)
    if args.markdown:
        bc.write_text_atomic(args.markdown, "```\n" + _header(args_line, configs) + "\n```\n\n"
                             + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
