#!/usr/bin/env python3
"""Decide whether a default model may ship, from the reports ``scripts/eval_default.sh`` wrote.

    python scripts/ship_gate.py runs/eval-default [--baseline runs/eval-shipped]

Reads ``synthetic_kodak24``, ``gopro_avg`` and ``real_blurry`` (each ``summary.json``) in the
folder, prints the README's table (Markdown) and the verdict of docs/default-model.md's bar:

* it does no harm: PSNR at least the blurry input's on both sets at gamma 1 and 0.7, and NIQE
  at gamma 0.7 no worse (no higher) than the input's;
* the targets: +1.5 dB over the input on the held-out synthetic set and +1.0 dB on the GoPro
  pairs at gamma 1 (reported; the model may ship below them);
* with ``--baseline`` (the reports of the model shipped now): it replaces that model only when
  its gamma-1 PSNR is higher on both sets.

Exit status 0: ship it; 1: do not; 2: a report is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETS = {"synthetic_kodak24": "held-out synthetic (kodak24)", "gopro_avg": "real GoPro pairs"}
NO_REFERENCE = "real_blurry"
GAMMAS = ("gamma=1", "gamma=0.7")
TARGETS_DB = {"synthetic_kodak24": 1.5, "gopro_avg": 1.0}


def read_reports(folder: Path) -> dict[str, dict]:
    """``{set: summary}`` of the three reports in ``folder`` (SystemExit 2 when one is missing)."""
    reports = {}
    for name in (*SETS, NO_REFERENCE):
        path = folder / name / "summary.json"
        try:
            reports[name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        missing = [row for row in ("input", *GAMMAS) if row not in reports[name]]
        if missing:
            print(f"error: {path} has no row {missing[0]!r} (run eval with --gamma 1,0.7)",
                  file=sys.stderr)
            raise SystemExit(2)
    return reports


def table(reports: dict[str, dict]) -> str:
    """The Markdown table of PSNR/SSIM per set and NIQE, input and both gammas."""
    lines = ["| | input | γ = 1 | γ = 0.7 |", "| --- | --- | --- | --- |"]
    for name, title in SETS.items():
        rows = [reports[name][row] for row in ("input", *GAMMAS)]
        lines.append(f"| {title}: PSNR / SSIM | " + " | ".join(
            f"{r['psnr']:.2f} dB / {r['ssim']:.4f}" for r in rows) + " |")
    rows = [reports[NO_REFERENCE][row] for row in ("input", *GAMMAS)]
    lines.append("| real blurry photos: NIQE (lower is better) | " +
                 " | ".join(f"{r['niqe']:.3f}" for r in rows) + " |")
    return "\n".join(lines)


def verdict(reports: dict[str, dict], baseline: dict[str, dict] | None = None
            ) -> tuple[bool, list[str]]:
    """``(ship, reasons)``: whether the bar is met, and one line per check."""
    lines, ok = [], True
    for name in SETS:
        base = reports[name]["input"]["psnr"]
        for row in GAMMAS:
            gain = reports[name][row]["psnr"] - base
            passed = gain >= 0
            ok &= passed
            lines.append(f"{'pass' if passed else 'FAIL'}: {name} {row} PSNR {gain:+.2f} dB over "
                         "the input")
    niqe_in, niqe = (reports[NO_REFERENCE][row]["niqe"] for row in ("input", "gamma=0.7"))
    passed = niqe <= niqe_in
    ok &= passed
    lines.append(f"{'pass' if passed else 'FAIL'}: real_blurry gamma=0.7 NIQE {niqe:.3f} "
                 f"(input {niqe_in:.3f})")
    for name, target in TARGETS_DB.items():
        gain = reports[name]["gamma=1"]["psnr"] - reports[name]["input"]["psnr"]
        lines.append(f"target {'met' if gain >= target else 'not met'}: {name} gamma=1 "
                     f"{gain:+.2f} dB (target +{target:g})")
    if baseline is not None:
        for name in SETS:
            new, old = (r[name]["gamma=1"]["psnr"] for r in (reports, baseline))
            passed = new > old
            ok &= passed
            lines.append(f"{'pass' if passed else 'FAIL'}: {name} gamma=1 PSNR {new:.2f} dB "
                         f"against the shipped model's {old:.2f} dB")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, help="the OUT folder of scripts/eval_default.sh")
    parser.add_argument("--baseline", type=Path,
                        help="the reports of the model shipped now: replace it only if better")
    args = parser.parse_args(argv)
    reports = read_reports(args.reports)
    baseline = read_reports(args.baseline) if args.baseline else None
    ship, lines = verdict(reports, baseline)
    print(table(reports))
    print()
    print("\n".join(lines))
    print(f"verdict: {'ship it' if ship else 'do not ship'}")
    return 0 if ship else 1


if __name__ == "__main__":
    sys.exit(main())
