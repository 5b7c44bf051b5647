"""Smoke test of benchmarks/bench_cpu_bf16.py on the tiny preset: it runs, perturbs the zero
weights, prints one row per variant, and the fp32 row compares equal to itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(BENCH_DIR))
    before = torch.get_num_threads()
    import bench_cpu_bf16

    yield bench_cpu_bf16
    torch.set_num_threads(before)
    sys.modules.pop("bench_cpu_bf16", None)


def test_perturb_fills_every_zero_weight(bench, tiny_osdd):
    model = tiny_osdd(seed=0)
    assert bench.perturb_zero_weights(model) > 0  # the eVAE skips' last convs start at zero
    assert all(p.any() for p in model.parameters() if p.ndim >= 2)
    assert bench.perturb_zero_weights(model) == 0


def test_runs_on_the_tiny_preset(bench, capsys):
    assert bench.main(["--preset", "tiny", "--size", "64x48", "--repeats", "1", "--threads",
                       "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "dB" in line]
    from deblurcli import onnx_backend

    expected = ["| fp32", "| bf16", "| bf16-unet", "| autocast"]
    assert [row.split(" | ")[0] for row in rows] == \
        expected + (["| onnx"] if onnx_backend.available() else [])
    assert rows[0].endswith("| 0.00e+00 | 0.00e+00 | inf dB |")
