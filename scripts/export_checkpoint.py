"""Write a model folder from a train-diffusion run's newest checkpoint, to evaluate it mid-run.

A run writes RUN_DIR/model only when it finishes; this turns its newest checkpoint into a model
folder (float32, E2 kept, adapters as the run holds them) that `deblurcli eval --weights` and
`deblurcli deblur --weights` read, while the run goes on.

Usage: python scripts/export_checkpoint.py RUN_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    run, out = Path(argv[0]), Path(argv[1])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from probe_stage2 import load

    from deblurcli.modelfolder import save_model_folder
    from deblurcli.train import checkpoint as ckpt

    step = load(run)
    newest = ckpt.list_checkpoints(run)[-1][1].name
    save_model_folder(out, step.model, extra={"trained_by": "deblurcli train-diffusion",
                                              "exported_from": f"{run.name}/{newest}"})
    print(f"wrote {out} from {run / 'checkpoints' / newest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
