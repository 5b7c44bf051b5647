"""Flicker and speed of ``deblur`` on a video: frame-to-frame change of the output against the input.

A per-frame restorer can flicker: two nearly equal input frames may get visibly different
outputs. This script measures that on a real clip instead of assuming it away:

1. the first ``--count`` JPEG frames of ``--frames DIR`` (e.g. the GoPro sequence
   ``../shared/data/frames/GOPR0477_11_00``), resized to ``--size``, are encoded into an H.264
   clip at ``--fps`` (crf ``--input-crf``) -- the input video;
2. the clip goes through :func:`deblurcli.video.deblur_video` three ways: an **identity**
   "model" (decode + encode only: what the codec alone does), and the **model** -- by default a
   randomly initialised ``compact`` model (the default model's architecture; no trained model
   exists yet) whose zero-initialised output layers (the eVAE decoder's ``conv_out`` and the
   skip blocks' last convs, which make a fresh eVAE the identity) are given random weights so
   that it is *not* the identity; ``--weights DIR`` uses a real model folder instead;
3. every clip is decoded and reported: the **mean absolute frame-to-frame change**
   ``mean |f_t - f_(t-1)|`` (0-255 scale) of the input, identity and model outputs, their
   ratio to the input's, the **added temporal change** ``mean |(o_t - o_(t-1)) - (i_t -
   i_(t-1))|`` (what the processing adds to the change between frames: 0 for a perfectly
   stable restorer that changes every frame the same way), the mean change of each frame
   ``mean |o_t - i_t|``, and seconds per frame (wall clock of ``deblur_video``, decoding and
   encoding included, model loading and one warm-up frame not). It also checks that the same
   frame deblurred twice gives the same output bit for bit (``deterministic``).

Not a test (it reads data outside the repository and takes minutes). Example (2-core CPU):

    python benchmarks/bench_video.py --frames ../shared/data/frames/GOPR0477_11_00 \\
        --count 60 --size 640x360 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


def encode_frames(files: list[Path], clip: Path, size: tuple[int, int], fps: int,
                  crf: int) -> None:
    """Encode JPEG frames (resized to ``size``) into an H.264 clip."""
    import av
    from PIL import Image

    with av.open(str(clip), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i, path in enumerate(files):
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS))
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def decode(clip: Path) -> np.ndarray:
    """All frames of a clip as one int16 ``(T, H, W, 3)`` array."""
    import av

    with av.open(str(clip)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def flicker(frames: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Frame-to-frame change of ``frames``, and what it adds to ``reference``'s (both int16)."""
    change = np.diff(frames, axis=0)
    ref_change = np.diff(reference, axis=0)
    return {"frame_to_frame": float(np.abs(change).mean()),
            "added_temporal_change": float(np.abs(change - ref_change).mean()),
            "change_per_frame": float(np.abs(frames - reference).mean())}


def random_compact_folder(folder: Path, seed: int, conv_out_std: float) -> Path:
    """A random ``compact`` model whose eVAE is not the identity (see the module docstring)."""
    import torch

    from deblurcli.modelfolder import save_model_folder
    from deblurcli.models.osdd import build_osdd
    from deblurcli.models.presets import preset_config

    model = build_osdd(preset_config("compact"), seed=seed, randomize_adapters=True)
    gen = torch.Generator().manual_seed(seed + 1)
    evae = model.evae
    with torch.no_grad():
        evae.init_skip_weights(gen, live=True)  # skip blocks' last convs: random, not zero
        conv = evae.decoder.conv_out
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * conv_out_std)
    save_model_folder(folder, model, include_sharp_encoder=False,
                      extra={"note": f"random compact weights, output layers perturbed "
                                     f"(seed {seed}, conv_out std {conv_out_std}); benchmark only"})
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=Path, required=True, help="folder of JPEG/PNG frames")
    parser.add_argument("--count", type=int, default=60, help="frames to use (from the first)")
    parser.add_argument("--size", default="640x360", help="WIDTHxHEIGHT of the clip")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--input-crf", type=int, default=18, help="crf of the input clip")
    parser.add_argument("--crf", type=int, default=18, help="crf of the outputs")
    parser.add_argument("--weights", type=Path, help="a model folder (default: random compact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conv-out-std", type=float, default=0.02,
                        help="std of the random eVAE output conv of the random model")
    parser.add_argument("--tile", type=int, default=448)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all usable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from deblurcli.device import set_cpu_threads
    from deblurcli.modelfolder import load_model_folder
    from deblurcli.pipeline import DeblurPipeline, prepare_model
    from deblurcli.video import deblur_video

    width, height = (int(v) for v in args.size.lower().split("x"))
    files = sorted(p for p in args.frames.iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.count]
    if len(files) < 2:
        parser.error(f"need at least 2 frames in {args.frames}")
    set_cpu_threads(args.threads)
    print("command: python " + " ".join(sys.argv), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp_name:
        tmp = Path(tmp_name)
        clip = tmp / "input.mp4"
        encode_frames(files, clip, (width, height), args.fps, args.input_crf)
        weights = args.weights or random_compact_folder(tmp / "model", args.seed,
                                                        args.conv_out_std)
        model = load_model_folder(weights, device=torch.device("cpu"), dtype=torch.float32,
                                  gamma=0.7, fuse=True)
        pipeline = DeblurPipeline(prepare_model(model), device="cpu", tile=args.tile,
                                  overlap=args.overlap, batch_size=1)
        results = {"frames": len(files), "size": f"{width}x{height}", "fps": args.fps,
                   "weights": str(args.weights) if args.weights else
                   f"random compact, output layers perturbed (std {args.conv_out_std})",
                   "threads": torch.get_num_threads()}
        source = decode(clip)
        first = source[0].astype(np.float32) / 255.0
        # warm-up (first-call allocations), and the one-step model's determinism: same frame in,
        # same output out, bit for bit
        results["deterministic"] = bool(np.array_equal(pipeline(first), pipeline(first)))
        results["input"] = {"frame_to_frame": float(np.abs(np.diff(source, axis=0)).mean())}
        for name, fn in (("identity", lambda x, progress=None: x), ("model", pipeline)):
            start = time.perf_counter()
            written = deblur_video(clip, tmp / f"{name}.mp4", fn, crf=args.crf)
            seconds = time.perf_counter() - start
            out = decode(tmp / f"{name}.mp4")
            assert written == len(out) == len(source), (written, len(out), len(source))
            row = flicker(out, source)
            row["ratio_to_input"] = row["frame_to_frame"] / results["input"]["frame_to_frame"]
            row["s_per_frame"] = seconds / written
            results[name] = row
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
    print(f"input: frame_to_frame={results['input']['frame_to_frame']:.4g}")
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
