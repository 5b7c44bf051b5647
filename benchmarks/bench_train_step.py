"""Time one stage-2 training step (``train-diffusion --full``) in float32 and in bf16 autocast.

The step is the one ``deblurcli train-diffusion`` runs: ``GeneratorStep`` (E1 → one UNet
evaluation → decoder) under autocast, the L2 loss (+ the latent term when ``--latent-weight``),
backward, AdamW. The trainable set comes from ``train.diffusion.set_trainable`` (``--full``, and
E1 with ``--train-encoder``). The precisions are timed **alternately in one process** (round
robin after ``--warmup`` untimed steps each), so a busy machine slows them alike and the ratio
stays meaningful; medians are reported with the fp32/bf16 ratio.

On the CPU, bf16 only helps where the CPU has bfloat16 matrix units (Intel AMX, AVX512-BF16);
``train-diffusion --mixed-precision bf16`` uses it only there (``device.cpu_has_fast_bf16``).
This script times whatever it is asked to, so it also shows the loss elsewhere.

Usage: python benchmarks/bench_train_step.py [--preset compact] [--batch-size 8] [--crop 128]
       [--repeats 5] [--warmup 1] [--threads 0] [--device cpu] [--train-encoder]
       [--latent-weight 0.01] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import TimeStats, environment, markdown_table, write_json  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def build(preset: str, *, train_encoder: bool, seed: int = 0):
    """A stage-2 model of ``preset`` (random weights, E2 kept) and its trainable parameters."""
    import torch

    from deblurcli.models.osdd import build_osdd
    from deblurcli.train.config import DiffusionTrainConfig
    from deblurcli.train.diffusion import preset_osdd_config, set_trainable

    model = build_osdd(preset_osdd_config(preset, None), seed=seed)
    model.train()
    params = set_trainable(model, DiffusionTrainConfig(full=True, train_encoder=train_encoder,
                                                       preset=preset))
    return model, params, torch.optim.AdamW(params, lr=1e-5)


def make_step(model, optimizer, device, *, latent_weight: float):
    """``step(blur, sharp, precision) -> seconds`` for one optimiser step."""
    import torch
    import torch.nn.functional as F

    from deblurcli.train.diffusion import GeneratorStep, sharp_latent

    gen = GeneratorStep(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(blur, sharp, precision: str) -> float:
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred, z_hat = gen(blur)
        loss = F.mse_loss(pred.float(), sharp)
        if latent_weight > 0:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=precision == "bf16"):
                z_real = sharp_latent(model.evae, sharp)
            loss = loss + latent_weight * F.mse_loss(z_hat.float(), z_real.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    return step


def run(args: argparse.Namespace) -> dict:
    """Time both precisions; returns the JSON-ready result."""
    import torch

    from deblurcli.device import cpu_has_fast_bf16, resolve_device, set_cpu_threads

    device = resolve_device(args.device)
    threads = set_cpu_threads(args.threads)
    model, params, optimizer = build(args.preset, train_encoder=args.train_encoder)
    model.to(device)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.crop, args.crop)
    blur = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    sharp = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    step = make_step(model, optimizer, device, latent_weight=args.latent_weight)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(args.warmup):
        for precision in PRECISIONS:
            step(blur, sharp, precision)
    for _ in range(args.repeats):
        for precision in PRECISIONS:
            times[precision].append(step(blur, sharp, precision))
    stats = {p: TimeStats.of(t) for p, t in times.items()}
    rows = [{"precision": p, "median s/step": f"{stats[p].median:.3f}",
             "min": f"{stats[p].minimum:.3f}", "max": f"{stats[p].maximum:.3f}",
             "runs": stats[p].runs} for p in PRECISIONS]
    return {
        "command": "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:]),
        "environment": environment(device), "threads": threads,
        "cpu_has_fast_bf16": cpu_has_fast_bf16() if device.type == "cpu" else None,
        "preset": args.preset, "batch_size": args.batch_size, "crop": args.crop,
        "train_encoder": args.train_encoder, "latent_weight": args.latent_weight,
        "trainable_parameters": sum(p.numel() for p in params),
        "times_s": times, "stats": {p: s.as_dict() for p, s in stats.items()},
        "ratio_fp32_over_bf16": stats["fp32"].median / stats["bf16"].median,
        "table": markdown_table(rows, ["precision", "median s/step", "min", "max", "runs"]),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="compact", help="compact (default), sd21 or tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128, help="square crop side (multiple of 8)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per precision")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per precision")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all usable cores)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    ap.add_argument("--train-encoder", action="store_true", help="also train E1 (as the recipe)")
    ap.add_argument("--latent-weight", type=float, default=0.01)
    ap.add_argument("--json", type=Path, help="also write the result as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.crop % 8:
        ap.error("--repeats must be >= 1, --warmup >= 0, --crop a multiple of 8")
    result = run(args)
    env = result["environment"]
    print(f"command: {result['command']}")
    print(f"device: {env['device']} ({env['cpu']}, {env['usable_cores']} usable cores, "
          f"{result['threads']} threads, load {env['loadavg_1min']}); torch {env['torch']}; "
          f"bf16 units: {result['cpu_has_fast_bf16']}")
    print(f"{result['preset']}: batch {result['batch_size']} x {result['crop']}², "
          f"{result['trainable_parameters'] / 1e6:.1f} M trainable parameters")
    print(result["table"])
    print(f"fp32 / bf16 (median): {result['ratio_fp32_over_bf16']:.2f}x")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
