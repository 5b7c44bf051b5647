"""How much do tile settings change a trained model's output? (quality side of the tile choice)

For every image in INPUT_DIR the model runs once on the whole image and once per tile setting;
the script reports, per setting:

* PSNR of the tiled output against the whole-image output (how far tiling moves the result);
* the peak-to-median ratio of the column and row profiles of |tiled - whole| (a seam shows as a
  peak at a tile boundary; the column/row of the peak is printed so it can be checked against the
  boundaries the plan lists);
* with ``--sharp DIR`` (files matched by name stem): PSNR against the ground truth, whole vs tiled.

    python benchmarks/tile_quality.py MODEL_DIR INPUT_DIR [--sharp DIR] [--tiles 512/64,448/32]

Speed is measured by ``bench_deblur.py``; this script only compares images (CPU or GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np


def diff_profile_peak(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    """Largest peak-to-median ratio of the column/row means of |a - b| and where it is."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=-1)
    best = (0.0, "")
    for axis, label in ((0, "column"), (1, "row")):
        profile = d.mean(axis=axis)
        ratio = float(profile.max() / max(np.median(profile), 1e-12))
        if ratio > best[0]:
            best = (ratio, f"{label} {int(profile.argmax())}")
    return best


def parse_tiles(text: str) -> list[tuple[int, int]]:
    """``"512/64,448/32"`` -> ``[(512, 64), (448, 32)]``."""
    out = []
    for item in text.split(","):
        tile, _, overlap = item.strip().partition("/")
        out.append((int(tile), int(overlap or 0)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="model folder")
    p.add_argument("input", type=Path, help="folder of blurry images")
    p.add_argument("--sharp", type=Path, default=None, help="ground truth (matched by stem)")
    p.add_argument("--tiles", default="512/64,448/32", help="tile/overlap settings to compare")
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all usable cores)")
    args = p.parse_args(argv)

    import torch

    from deblurcli.device import set_cpu_threads
    from deblurcli.evaluation.metrics import psnr
    from deblurcli.images import list_images, read_image
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.pipeline import DeblurPipeline, default_batch_size, prepare_model

    device = torch.device(args.device)
    if device.type == "cpu":
        set_cpu_threads(args.threads)
    model = load_model_folder(args.model, device=device, gamma=args.gamma)
    run = prepare_model(model)
    settings = parse_tiles(args.tiles)
    sharp = {f.stem: f for f in list_images(args.sharp)} if args.sharp else {}

    def pipeline(tile: int, overlap: int) -> DeblurPipeline:
        return DeblurPipeline(run, device=device, dtype=model.vae_dtype, tile=tile,
                              overlap=overlap, batch_size=default_batch_size(device))

    rows: dict[tuple[int, int], list[dict]] = {s: [] for s in settings}
    files = list_images(args.input)
    for n, path in enumerate(files, 1):
        pixels = read_image(path).pixels
        with torch.inference_mode():
            whole = pipeline(0, 0)(pixels)
            tiled = {s: pipeline(*s)(pixels) for s in settings}
        gt = read_image(sharp[path.stem]).pixels if path.stem in sharp else None
        for s, out in tiled.items():
            peak, where = diff_profile_peak(out, whole)
            rows[s].append({"name": path.name, "vs_whole": psnr(out, whole), "peak": peak,
                            "where": where, "gt_whole": None if gt is None else psnr(whole, gt),
                            "gt_tiled": None if gt is None else psnr(out, gt)})
        print(f"[{n}/{len(files)}] {path.name}", file=sys.stderr)

    print(f"model {args.model}, gamma {args.gamma:g}, {len(files)} images from {args.input}")
    for (tile, overlap), res in rows.items():
        vs = [r["vs_whole"] for r in res]
        worst = max(res, key=lambda r: r["peak"])
        print(f"tile {tile}/{overlap}: vs whole-image output median {statistics.median(vs):.2f} dB"
              f" (min {min(vs):.2f}); largest |diff| profile peak/median {worst['peak']:.1f}"
              f" at {worst['where']} of {worst['name']}")
        for r in res:
            if r["gt_whole"] is not None:
                print(f"    vs ground truth, {r['name']}: whole {r['gt_whole']:.3f} dB, "
                      f"tiled {r['gt_tiled']:.3f} dB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
