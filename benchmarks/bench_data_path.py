"""Crops per second the device data path delivers vs crops per second a training step consumes.

The data path is ``train-diffusion --device-data``: photos and frames held in device memory,
every micro-batch cut, blurred by FFT with fresh camera-shake kernels, noised (and real samples
averaged from frames) on the device, with ``--workers`` processes drawing the kernels ahead
(:mod:`deblurcli.train.ondevice`). The step is a stage-2 ``--full --train-encoder`` step of the
same batch (``bench_train_step.make_step``; bf16 autocast on CUDA). Each is timed on its own,
medians over ``--batches`` / ``--steps`` after warm-up. A ratio above 1 means the loader is
not the bottleneck.

Usage: python benchmarks/bench_data_path.py [--device cpu] [--batch-size 8] [--crop 128]
       [--workers 1] [--photos DIR] [--frames DIR] [--batches 10] [--steps 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import TimeStats, environment, write_json  # noqa: E402


def _sources(args, device):
    """Device tensors of the photos and clips (random ones when no folder is given)."""
    import torch

    from deblurcli.images import list_images
    from deblurcli.train import ondevice as od
    from deblurcli.train.data import frame_clips

    gen = torch.Generator().manual_seed(0)
    if args.photos:
        photos = od.load_photos(list_images(args.photos, recursive=True), device)
    else:
        photos = [torch.randint(0, 256, (3, 480, 640), generator=gen, dtype=torch.uint8)
                  .to(device) for _ in range(16)]
    if args.frames:
        clips = [od.load_clip(frames, device) for frames in frame_clips(args.frames)]
    else:
        clips = [torch.randint(0, 256, (30, 3, 360, 640), generator=gen, dtype=torch.uint8)
                 .to(device)]
    return photos, clips


def run(args: argparse.Namespace) -> dict:
    """Time the data path and the training step; returns the JSON-ready result."""
    import torch

    from bench_train_step import build, make_step
    from deblurcli.device import resolve_device, set_cpu_threads
    from deblurcli.train.batchplan import PlanSettings
    from deblurcli.train.ondevice import DeviceBatchSource

    device = resolve_device(args.device)
    threads = set_cpu_threads(args.threads)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    photos, clips = _sources(args, device)
    settings = PlanSettings(batch_size=args.batch_size, crop=args.crop,
                            real_fraction=args.real_fraction)
    source = DeviceBatchSource(photos, clips, settings=settings, seed=0, workers=args.workers)
    stream = source.stream()
    for _ in range(args.warmup):
        next(stream)
    sync()
    data_times = []
    for _ in range(args.batches):
        start = time.perf_counter()
        batch = next(stream)
        sync()
        data_times.append(time.perf_counter() - start)
    stream.close()

    model, _, optimizer = build(args.preset, train_encoder=True)
    model.to(device)
    step = make_step(model, optimizer, device, latent_weight=0.01)
    precision = "bf16" if device.type == "cuda" else args.cpu_precision
    blur, sharp = batch["blur"], batch["sharp"]
    for _ in range(args.warmup):
        step(blur, sharp, precision)
    step_times = [step(blur, sharp, precision) for _ in range(args.steps)]

    data, train = TimeStats.of(data_times), TimeStats.of(step_times)
    delivered = args.batch_size / data.median
    consumed = args.batch_size / train.median
    return {
        "command": "python benchmarks/bench_data_path.py " + " ".join(sys.argv[1:]),
        "environment": environment(device), "threads": threads, "workers": args.workers,
        "batch_size": args.batch_size, "crop": args.crop, "preset": args.preset,
        "precision": precision, "data_s_per_batch": data.as_dict(),
        "step_s": train.as_dict(), "crops_per_s_delivered": delivered,
        "crops_per_s_consumed": consumed, "ratio_delivered_over_consumed": delivered / consumed,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--preset", default="compact")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--real-fraction", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=1, help="kernel-drawing processes")
    ap.add_argument("--photos", type=Path, help="folder of sharp photos (default: random)")
    ap.add_argument("--frames", type=Path, help="folder of frame clips (default: random)")
    ap.add_argument("--batches", type=int, default=10, help="timed batches")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all usable cores)")
    ap.add_argument("--cpu-precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--json", type=Path, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if args.batches < 1 or args.steps < 1 or args.crop % 8:
        ap.error("--batches and --steps must be >= 1, --crop a multiple of 8")
    result = run(args)
    env = result["environment"]
    print(f"command: {result['command']}")
    print(f"device: {env['device']} ({env['cpu']}, {result['threads']} threads, load "
          f"{env['loadavg_1min']}); workers {result['workers']}; batch {result['batch_size']} x "
          f"{result['crop']}^2, {result['preset']} {result['precision']}")
    print(f"data path:     {result['data_s_per_batch']['median_s']:.3f} s/batch -> "
          f"{result['crops_per_s_delivered']:.1f} crops/s delivered")
    print(f"training step: {result['step_s']['median_s']:.3f} s/step  -> "
          f"{result['crops_per_s_consumed']:.1f} crops/s consumed")
    print(f"ratio delivered/consumed: {result['ratio_delivered_over_consumed']:.1f}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
