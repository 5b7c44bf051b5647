"""Smoke test of benchmarks/bench_deblur.py: its core functions on the tiny preset, 64x64, 1 run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script imported as a module (it is not part of the package)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location("bench_deblur", BENCH_DIR / "bench_deblur.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_deblur"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_deblur", None)
        sys.path.remove(str(BENCH_DIR))


@pytest.fixture
def keep_threads():
    """The benchmark sets torch's thread count; restore it afterwards."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_run_config_tiny(bench, tiny_model_folder, keep_threads):
    cfg = bench.BenchConfig(preset="tiny", size=(64, 48), tile=32, overlap=8, batch_size=4,
                            threads=1, warmup=1, repeats=1)
    res = bench.run_config(cfg, tiny_model_folder)
    assert res["runs"] == 1 and res["median_s"] > 0 and len(res["times_s"]) == 1
    assert res["min_s"] <= res["median_s"] <= res["max_s"]
    assert res["tiles"] == 6  # 64x48 with 32-px tiles, 8 px overlap: 3 x 2
    assert res["threads"] == 1
    assert res["gflop_per_image"] > 0
    assert res["peak_rss_bytes"] >= res["rss_after_load_bytes"] > 0
    assert res["cuda_peak_bytes"] is None
    # diffusers' SDPA processor (PyTorch scaled_dot_product_attention) in every attention layer
    assert set(res["model"]["attention_processors"]) == {"AttnProcessor2_0"}
    assert res["model"]["fused_gamma"] == pytest.approx(0.7)
    assert "--preset tiny" in res["command"] and "--size 64x48" in res["command"]
    row = bench.table_row(res)
    assert row["size"] == "64x48" and row["runs"] == 1


def test_fused_and_unfused_agree(bench, tiny_model_folder, keep_threads):
    base = bench.BenchConfig(preset="tiny", size=(32, 32), tile=0, threads=1, warmup=0,
                             repeats=1, fused=False)
    res = bench.run_ablation("fused", base, bench.BenchConfig(**{**base.__dict__, "fused": True}),
                             tiny_model_folder)
    assert res["runs"] == 1 and res["speedup"] > 0
    assert res["max_abs_diff"] < 1e-4  # fusing the gamma-blend does not change the output


def test_channels_last_and_nchw_agree(bench, tiny_model_folder, keep_threads):
    base = bench.BenchConfig(preset="tiny", size=(40, 24), tile=0, threads=1, warmup=0,
                             repeats=1, channels_last=False)
    variant = bench.BenchConfig(**{**base.__dict__, "channels_last": True})
    res = bench.run_ablation("channels_last", base, variant, tiny_model_folder)
    assert res["max_abs_diff"] < 1e-5


def test_flop_estimate_on_meta_device(bench):
    model = bench.meta_model("tiny")
    tiled = bench.estimate("tiny", (64, 48), 32, 8, model)
    whole = bench.estimate("tiny", (64, 48), 0, 0, model)
    assert tiled["tiles"] == 6 and whole["tiles"] == 1
    assert whole["pixel_ratio"] == 1.0 and tiled["pixel_ratio"] == 6 * 32 * 32 / (64 * 48)
    assert tiled["gflop_per_image"] > whole["gflop_per_image"] > 0  # overlap costs work


def test_cli_command_matches_config(bench, tmp_path):
    cfg = bench.BenchConfig(device="cuda", dtype="bf16", vae_dtype="fp32", tile=768, overlap=32,
                            batch_size=2, fused=False, compile=True)
    argv = bench.cli_argv(cfg, tmp_path / "model", tmp_path / "in", tmp_path / "out")
    text = " ".join(argv)
    for part in ("deblur", "--device cuda", "--dtype bf16", "--vae-fp32", "--tile 768",
                 "--tile-overlap 32", "--batch-size 2", "--no-fuse", "--compile"):
        assert part in text
    with pytest.raises(ValueError):
        bench.cli_argv(bench.BenchConfig(vae_dtype="bf16"), tmp_path, tmp_path, tmp_path)


def test_ablation_pairs_and_helpers(bench):
    import bench_common as bc

    cpu = bench.ablation_pairs(bench.BenchConfig(device="cpu"))
    names = [name for name, _, _ in cpu]
    assert "fused LoRA blend" in names and not any("fp32" in n for n in names)
    for _, base, variant in cpu:
        assert base != variant
    gpu = bench.ablation_pairs(bench.BenchConfig(device="cuda", dtype="bf16"), ["dtype"])
    assert [(b.dtype, v.dtype) for _, b, v in gpu] == [("fp32", "bf16")]
    with pytest.raises(ValueError):
        bench.ablation_pairs(bench.BenchConfig(), ["nonsense"])
    assert bc.parse_size("4000x3000") == (4000, 3000)
    with pytest.raises(ValueError):
        bc.parse_size("4000")
    table = bc.markdown_table([{"a": 1, "b": "x|y"}], ["a", "b"])
    assert table.splitlines()[2] == "| 1 | x\\|y |"
    assert bc.TimeStats.of([3.0, 1.0, 2.0]).median == 2.0


def test_prepare_model_makes_an_inference_ready_channels_last_model(tiny_osdd):
    import torch

    from deblurcli.pipeline import prepare_model

    model = tiny_osdd()
    runner = prepare_model(model, channels_last=True, compile=False)
    assert runner is model
    assert not any(p.requires_grad for p in model.parameters())
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_deblur_command_offers_compile():
    from typer.testing import CliRunner

    from deblurcli.cli.app import app

    result = CliRunner().invoke(app, ["deblur", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--compile" in result.output


def test_tile_quality_script(tiny_model_folder, tmp_path, capsys, keep_threads):
    """benchmarks/tile_quality.py on the tiny model: whole image vs one tile setting, with GT."""
    from deblurcli.images import write_image

    spec = importlib.util.spec_from_file_location("tile_quality", BENCH_DIR / "tile_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    for sub in ("blur", "sharp"):
        (tmp_path / sub).mkdir()
    for name in ("a", "b"):
        write_image(tmp_path / "blur" / f"{name}.png", rng.random((48, 64, 3)))
        write_image(tmp_path / "sharp" / f"{name}.png", rng.random((48, 64, 3)))
    code = module.main([str(tiny_model_folder), str(tmp_path / "blur"), "--sharp",
                        str(tmp_path / "sharp"), "--tiles", "32/8,0/0", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 images" in out and "tile 32/8: vs whole-image output" in out
    # the whole image "tiled" as one tile is the whole-image output itself
    assert "tile 0/0: vs whole-image output median inf dB" in out
    assert out.count("vs ground truth") == 4
    assert module.parse_tiles("512/64, 448/32") == [(512, 64), (448, 32)]
    a = np.zeros((4, 6, 3))
    b = a.copy()
    b[:, 2] = 1.0  # one bright column
    ratio, where = module.diff_profile_peak(b, a)
    assert where == "column 2" and ratio > 1e6


def test_train_step_benchmark_times_both_precisions(tmp_path, capsys, keep_threads):
    """benchmarks/bench_train_step.py on the tiny preset: both precisions timed, JSON written
    (in this process: a subprocess spent most of its time importing)."""
    import json

    spec = importlib.util.spec_from_file_location("bench_train_step",
                                                  BENCH_DIR / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "step.json"
    module.main(["--preset", "tiny", "--batch-size", "1", "--crop", "32", "--repeats", "2",
                 "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert "fp32 / bf16 (median):" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [len(result["times_s"][p]) for p in ("fp32", "bf16")] == [2, 2]
    assert result["trainable_parameters"] > 0 and result["ratio_fp32_over_bf16"] > 0
