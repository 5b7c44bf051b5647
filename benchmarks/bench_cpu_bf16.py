"""fp32 against bfloat16 and against ONNX Runtime on the CPU, in one process: speed (alternating
runs, medians) and how far each output is from the PyTorch fp32 one (issue 24).

A freshly built model is nearly the identity (the eVAE skips' last convolutions and the LoRA B
factors start at zero), which would hide precision loss; so every all-zero weight tensor is
given PyTorch's default initialisation for its layer (kaiming-uniform, a = sqrt(5)): every layer
then carries signal at a realistic scale. The model is written to a temporary model folder
(float32) and loaded like ``deblurcli deblur`` loads it (fused γ = 0.7), once per variant:

* ``fp32``: everything float32 (today's CPU default);
* ``bf16``: eVAE and UNet bfloat16;
* ``bf16-unet``: UNet bfloat16, eVAE float32 (``--vae-fp32``);
* ``autocast``: float32 weights, run under ``torch.autocast("cpu", torch.bfloat16)`` (matrix
  products and convolutions in bf16, normalisations and softmax in float32; how training uses
  bf16 on the CPU);
* ``onnx``: the fused float32 model exported to ONNX and run by ONNX Runtime
  (``deblur --backend onnx``; needs the ``onnx`` extra).

The pipeline blends tiles, applies the colour fix and converts the output in float32 in every
variant. Differences are measured on the pipeline outputs in [0, 1] (max, mean and PSNR against
the fp32 output) for one image: ``--image FILE`` (resized to ``--size``) or a synthetic one.

    python benchmarks/bench_cpu_bf16.py --size 1280x720 --repeats 5 --variants fp32,bf16,onnx
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, environment, parse_size  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16-unet", "autocast", "onnx")


def cpu_flags() -> list[str]:
    """The CPU's matrix/vector flags that matter here (from /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def perturb_zero_weights(model, seed: int = 0) -> int:
    """Give every all-zero weight (ndim >= 2) PyTorch's default layer initialisation."""
    import torch
    from torch import nn

    count = 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                count += 1
    return count


def test_image(size: tuple[int, int], path: str | None) -> np.ndarray:
    from PIL import Image

    width, height = size
    if path:
        im = Image.open(path).convert("RGB").resize((width, height), Image.BICUBIC)
        return np.asarray(im, dtype=np.float32) / 255.0
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(0)
    img = np.stack([0.5 + 0.4 * np.sin(x / 37.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], -1)
    return np.clip(img + 0.05 * rng.standard_normal(img.shape, dtype=np.float32), 0, 1)


def _autocast(model):
    import torch

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT (default 1280x720)")
    parser.add_argument("--image", help="a photo to use (resized to --size); default synthetic")
    parser.add_argument("--preset", default="compact")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    from deblurcli import onnx_backend

    defaults = [v for v in VARIANTS if v != "onnx" or onnx_backend.available()]
    parser.add_argument("--variants", default=",".join(defaults))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in variants) or "fp32" not in variants:
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}, fp32 included")

    import torch

    from deblurcli.device import cpu_has_fast_bf16, set_cpu_threads
    from deblurcli.evaluation.metrics import psnr
    from deblurcli.modelfolder import load_model_folder, save_model_folder
    from deblurcli.models.osdd import build_osdd
    from deblurcli.models.presets import preset_config
    from deblurcli.pipeline import DeblurPipeline, prepare_model

    threads = set_cpu_threads(args.threads)
    print("command: python " + shlex.join(["benchmarks/bench_cpu_bf16.py", *sys.argv[1:]]))
    env = environment(torch.device("cpu"))
    print(f"cpu: {cpu_model()}; flags: {' '.join(cpu_flags()) or '-'}; "
          f"cpu_has_fast_bf16: {cpu_has_fast_bf16()}; threads: {threads}; "
          f"torch {env['torch']}, diffusers {env['diffusers']}; "
          f"load average before: {os.getloadavg()[0]:.2f}")

    image = test_image(parse_size(args.size), args.image)
    model = build_osdd(preset_config(args.preset), seed=0, randomize_adapters=True)
    print(f"zero weight tensors given a default init: {perturb_zero_weights(model)}")
    pipes = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_model_folder(Path(tmp) / "m", model, include_sharp_encoder=False)
        del model
        for name in variants:
            dtype = torch.bfloat16 if name in ("bf16", "bf16-unet") else torch.float32
            vae = torch.bfloat16 if name == "bf16" else torch.float32
            loaded = load_model_folder(Path(tmp) / "m", dtype=dtype, vae_dtype=vae, gamma=0.7)
            if name == "onnx":
                from deblurcli import onnx_backend

                onnx_backend.export(loaded, Path(tmp) / "onnx")
                runner = onnx_backend.OnnxModel(Path(tmp) / "onnx" / "model.onnx", threads)
                pipes[name] = DeblurPipeline(runner, batch_size=1, channels_last=False)
                continue
            runner = prepare_model(loaded)
            if name == "autocast":
                runner = _autocast(runner)
            pipes[name] = DeblurPipeline(runner, device="cpu", dtype=vae, batch_size=1)
    outputs = {name: pipe(image) for name, pipe in pipes.items()}  # warm-up, and the outputs
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:  # alternating: background load hits every variant alike
            start = time.perf_counter()
            pipes[name](image)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    ref = outputs["fp32"]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print()
    print("| variant | s/image, median (min-max), n | speed-up vs fp32 | max abs diff vs fp32 "
          "| mean abs diff | PSNR vs fp32 |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        med = statistics.median(times[name])
        diff = np.abs(outputs[name] - ref)
        print(f"| {name} | {med:.3f} ({min(times[name]):.3f}-{max(times[name]):.3f}), "
              f"{len(times[name])} | {base / med:.2f}x | {diff.max():.2e} | {diff.mean():.2e} "
              f"| {psnr(outputs[name], ref):.1f} dB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
