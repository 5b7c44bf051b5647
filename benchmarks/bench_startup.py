"""Whole-process time of ``deblurcli deblur photo.png out/`` for one photo (issue 24: time to
first image), and where it goes: import, model loading, deblurring.

Every measurement is a fresh Python process, and the variants alternate (A, B, A, B, ...) so
that background load hits them alike; medians over ``--repeats`` rounds. Variants:

* ``cli``: ``python -m deblurcli deblur PHOTO OUT --weights MODEL --overwrite``, the command
  itself with its defaults (wall clock of the whole process; with the ``onnx`` extra installed
  that is ONNX Runtime, its export cached by an uncounted first run);
* ``cli-torch``: the same with ``--backend torch``;
* ``cli-full-import``: the same command through the app without ``deblurcli``'s ``main()``, so
  diffusers is imported whole, peft and transformers included (the import before issue 24);
* ``split`` / ``split-full-import``: a process that times its phases: *import* (deblurcli's
  model, pipeline and image code, torch and diffusers), *load* (``load_model_folder`` with the
  γ-blend fused + ``prepare_model``), *compute* (read the photo, ``DeblurPipeline``, write it);
  *total* is the wall clock of the process, interpreter start-up included;
* ``split-onnx``: the same phases with ONNX Runtime (*load*: the cached export's session), as
  ``deblur`` runs it: without torch.

The model is the ``compact`` preset with random weights (speed does not depend on their
values), stored in float16 like an exported model, unless ``--weights DIR``; the photo is a
synthetic 1280x720 PNG unless ``--image FILE``.

    python benchmarks/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model  # noqa: E402
from bench_cpu_bf16 import cpu_flags, test_image  # noqa: E402

VARIANTS = ("cli", "cli-torch", "cli-full-import", "split", "split-full-import", "split-onnx")

# both timed children end alike: read, deblur and write the photo, print the phases
_CHILD_END = r"""
image = read_image(photo)
write_image(out, pipe(image.pixels))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "compute": t3 - t2,
                  "peft": "peft" in sys.modules, "transformers": "transformers" in sys.modules,
                  "torch": "torch" in sys.modules}))
"""

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
lean, weights, photo, out, dtype = sys.argv[1] == "lean", sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
if lean:
    from deblurcli.models.runtime_imports import import_diffusers_for_inference
    import_diffusers_for_inference()
import torch
from deblurcli.device import resolve_device, resolve_dtype, set_cpu_threads
from deblurcli.images import read_image, write_image
from deblurcli.modelfolder import load_model_folder
from deblurcli.pipeline import DeblurPipeline, default_batch_size, prepare_model
t1 = time.perf_counter()
device = resolve_device("auto")
dt = resolve_dtype(dtype, device)
set_cpu_threads(0)
model = load_model_folder(weights, device=device, dtype=dt, gamma=0.7)
pipe = DeblurPipeline(prepare_model(model), device=device, dtype=dt,
                      batch_size=default_batch_size(device))
t2 = time.perf_counter()
""" + _CHILD_END


CHILD_ONNX = r"""
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
weights, photo, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
from deblurcli import onnx_backend
from deblurcli.device import usable_cpu_count
from deblurcli.images import read_image, write_image
from deblurcli.pipeline import DeblurPipeline
t1 = time.perf_counter()
threads = usable_cpu_count()
key = onnx_backend.model_key(weights, gamma=0.7, lora=None)
path = onnx_backend.cache_dir(weights, key) / onnx_backend.MODEL_FILE
pipe = DeblurPipeline(onnx_backend.OnnxModel(path, threads), batch_size=1, channels_last=False)
t2 = time.perf_counter()
""" + _CHILD_END


def _run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (fresh processes each)")
    parser.add_argument("--weights", help="a model folder (default: random compact preset)")
    parser.add_argument("--image", help="a photo, resized to 1280x720 (default: synthetic)")
    parser.add_argument("--dtype", default="auto", help="--dtype of deblur (default auto)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")

    print("command: python " + shlex.join(["benchmarks/bench_startup.py", *sys.argv[1:]]))
    print(f"cpu: {cpu_model()}; flags: {' '.join(cpu_flags()) or '-'}; "
          f"usable cores: {len(os.sched_getaffinity(0))}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = args.weights
        if weights is None:
            import torch

            from deblurcli.modelfolder import save_model_folder
            from deblurcli.models.osdd import build_osdd
            from deblurcli.models.presets import preset_config

            weights = str(tmp / "model")
            save_model_folder(weights, build_osdd(preset_config("compact"), seed=0,
                                                  randomize_adapters=True),
                              storage_dtype=torch.float16, include_sharp_encoder=False)
        from PIL import Image

        photo = tmp / "photo.png"
        pixels = test_image((1280, 720), args.image)
        Image.fromarray((pixels * 255 + 0.5).astype("uint8")).save(photo)
        deblur = ["deblur", str(photo), str(tmp / "out"), "--weights", weights,
                  "--overwrite", "--dtype", args.dtype]
        commands = {
            "cli": [py, "-m", "deblurcli", *deblur],
            "cli-torch": [py, "-m", "deblurcli", *deblur, "--backend", "torch"],
            "cli-full-import": [py, "-c", "import sys; from deblurcli.cli.app import app; "
                                "app(sys.argv[1:], prog_name='deblurcli')", *deblur],
            "split": [py, "-c", CHILD, "lean", weights, str(photo), str(tmp / "s.png"),
                      args.dtype],
            "split-full-import": [py, "-c", CHILD, "full", weights, str(photo),
                                  str(tmp / "s.png"), args.dtype],
            "split-onnx": [py, "-c", CHILD_ONNX, weights, str(photo), str(tmp / "s.png")],
        }
        _run(commands["cli"])  # warm the file cache (and make the ONNX export) once: not counted
        if "split-onnx" in variants:
            _run([*commands["cli"], "--backend", "onnx"])
        walls: dict[str, list[float]] = {v: [] for v in variants}
        phases: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
        flags: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name in variants:
                wall, stdout = _run(commands[name])
                walls[name].append(wall)
                if name.startswith("split"):
                    info = json.loads(stdout.strip().splitlines()[-1])
                    for key in ("import", "load", "compute"):
                        phases[name].setdefault(key, []).append(info[key])
                    flags[name] = {k: info[k] for k in ("torch", "peft", "transformers")}
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print()
    print("| variant | total s, median (min-max) | import s | load s | compute s | torch / peft "
          "/ transformers imported |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        w = walls[name]
        med = {k: f"{statistics.median(v):.2f}" for k, v in phases[name].items()}
        imported = flags.get(name)
        imported = "-" if imported is None else \
            f"{imported['torch']} / {imported['peft']} / {imported['transformers']}"
        print(f"| {name} | {statistics.median(w):.2f} ({min(w):.2f}-{max(w):.2f}) | "
              f"{med.get('import', '-')} | {med.get('load', '-')} | {med.get('compute', '-')} "
              f"| {imported} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
