"""The ONNX Runtime back-end (``--backend onnx``): the same outputs as PyTorch, exported once
per model and γ and cached beside the model (or in the user's cache), rebuilt when unreadable,
and one clear line where it cannot run."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deblurcli import onnx_backend
from deblurcli.cli.app import app
from deblurcli.images import read_image, write_image
from deblurcli.modelfolder import load_model_folder
from deblurcli.pipeline import DeblurPipeline

pytestmark = pytest.mark.skipif(not onnx_backend.available(),
                                reason="the onnx extra is not installed")
runner = CliRunner()


def photo(tmp_path: Path, size=(40, 56)) -> Path:
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir(exist_ok=True)
    write_image(path, np.random.default_rng(0).random((*size, 3), dtype=np.float32))
    return path


def deblur(*args):
    return runner.invoke(app, ["deblur", *map(str, args)])


def _export_copy(export: Path, name: str, **key) -> Path:
    """A copy of export folder ``export`` beside it, its ``key.json`` changed by ``key``."""
    copy = shutil.copytree(export, export.parent / name)
    parts = json.loads((export / "key.json").read_text())
    (copy / "key.json").write_text(json.dumps({**parts, **key}))
    return copy


def test_outputs_match_pytorch_within_1e3(tiny_model_folder, tmp_path):
    model = load_model_folder(tiny_model_folder, gamma=0.3)
    onnx_backend.export(model, tmp_path / "exports" / "m")
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["m"]  # no temporary left
    image = np.random.default_rng(1).random((72, 100, 3), dtype=np.float32)
    reference = DeblurPipeline(model, tile=48, overlap=16, batch_size=2)(image)
    onnx = onnx_backend.OnnxModel(tmp_path / "exports" / "m" / "model.onnx", threads=2)
    out = DeblurPipeline(onnx, tile=48, overlap=16, batch_size=2, channels_last=False)(image)
    assert out.shape == image.shape and np.abs(out - reference).max() < 1e-3
    whole = DeblurPipeline(onnx, tile=0, channels_last=False)(image)  # any shape: dynamic axes
    assert np.abs(whole - DeblurPipeline(model, tile=0)(image)).max() < 1e-3


def test_exported_once_per_model_and_gamma(tiny_model_folder, tmp_path):
    source = photo(tmp_path)
    first = deblur(source, tmp_path / "a", "-w", tiny_model_folder, "--backend", "onnx",
                   "--gamma", "0.3")
    assert first.exit_code == 0, first.output
    assert "exporting the model for ONNX Runtime" in first.output and "ONNX Runtime)" in first.output
    cached = sorted((tiny_model_folder / ".onnx").glob("*/model.onnx"))
    assert len(cached) == 1
    again = deblur(source, tmp_path / "b", "-w", tiny_model_folder, "--backend", "onnx",
                   "--gamma", "0.3")
    assert again.exit_code == 0 and "exporting" not in again.output
    assert np.array_equal(read_image(tmp_path / "a" / "photo.png").pixels,
                          read_image(tmp_path / "b" / "photo.png").pixels)
    torch_run = deblur(source, tmp_path / "t", "-w", tiny_model_folder, "--backend", "torch",
                       "--gamma", "0.3")
    assert torch_run.exit_code == 0 and "ONNX" not in torch_run.output
    diff = np.abs(read_image(tmp_path / "a" / "photo.png").pixels -
                  read_image(tmp_path / "t" / "photo.png").pixels)
    assert diff.max() <= 1 / 255 + 1e-6  # at most one 8-bit level
    other = deblur(source, tmp_path / "c", "-w", tiny_model_folder, "--backend", "onnx",
                   "--gamma", "0.9")
    assert other.exit_code == 0 and "exporting" in other.output
    assert len(list((tiny_model_folder / ".onnx").glob("*/model.onnx"))) == 2


def test_an_unreadable_cached_file_is_rebuilt(tiny_model_folder, tmp_path):
    key = onnx_backend.model_key(tiny_model_folder, gamma=0.7, lora=None)
    path = onnx_backend.cache_dir(tiny_model_folder, key) / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx file")
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder, "--backend", "onnx")
    assert result.exit_code == 0 and "exporting" in result.output
    assert path.stat().st_size > 1000


def test_a_read_only_model_folder_caches_in_the_user_cache(tiny_model_folder, tmp_path,
                                                           monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: the folder says it is read-only instead
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: (
            mode != os.W_OK or not str(path).startswith(str(tiny_model_folder)))
            and real(path, mode))
    else:
        tiny_model_folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    try:
        result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder,
                        "--backend", "onnx")
    finally:
        tiny_model_folder.chmod(0o755)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cache" / "deblurcli" / "onnx").glob("*/model.onnx"))) == 1
    assert not (tiny_model_folder / ".onnx").exists()


@pytest.mark.parametrize("flags,reason", [(["--no-fuse"], "fused adapters only"),
                                          (["--tile", "0"], "tiles of at most 512"),
                                          (["--dtype", "bf16"], "float32 only")])
def test_onnx_where_it_cannot_run_is_one_line(tiny_model_folder, tmp_path, flags, reason,
                                              monkeypatch):
    # bf16 is kept only on a CPU with bfloat16 units (deblurcli.device.resolve_dtype)
    monkeypatch.setattr("deblurcli.device.cpu_has_fast_bf16", lambda: True)
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder,
                    "--backend", "onnx", *flags)
    assert result.exit_code == 1 and reason in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o" / "photo.png").exists()


def test_bf16_on_a_cpu_without_bf16_units_runs_onnx_in_float32(tiny_model_folder, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr("deblurcli.device.cpu_has_fast_bf16", lambda: False)
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder,
                    "--backend", "onnx", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "using fp32" in result.output and (tmp_path / "o" / "photo.png").exists()


def test_unknown_backend_is_a_usage_error(tiny_model_folder, tmp_path):
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder,
                    "--backend", "tensorrt")
    assert result.exit_code == 2 and "--backend" in result.output


def test_the_blend_file_and_fused_gamma_key_the_cache(tiny_model_folder, tmp_path):
    from deblurcli.models.adapters import blend_adapter_files

    blend = tmp_path / "blend.safetensors"
    blend_adapter_files(tiny_model_folder / "lora_real.safetensors",
                        tiny_model_folder / "lora_synthetic.safetensors", 0.4, blend)
    keys = {onnx_backend.model_key(tiny_model_folder, gamma=g, lora=None) for g in (0.3, 0.4)}
    keys.add(onnx_backend.model_key(tiny_model_folder, gamma=0.3, lora=blend))
    assert len(keys) == 3
    from deblurcli.modelfolder import fuse_model_folder

    fuse_model_folder(tiny_model_folder, tmp_path / "fused", 0.4)  # its γ is fixed: one key
    assert len({onnx_backend.model_key(tmp_path / "fused", gamma=g, lora=None)
                for g in (0.3, 0.4)}) == 1
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder, "--backend", "onnx",
                    "--lora", blend)
    assert result.exit_code == 0 and "gamma=0.4 (fused)" in result.output


@pytest.mark.parametrize("flags", [["--device", "cpu"], []])
def test_a_cached_export_starts_without_torch(tiny_model_folder, tmp_path, flags):
    """The point of the back-end: with the export cached, a deblur process on the CPU imports
    neither torch nor diffusers, peft or transformers (what the start-up time goes to)."""
    import json
    import subprocess
    import sys

    from test_startup_imports import SCRIPT

    from deblurcli.device import surely_cpu

    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder).exit_code == 0  # exports
    proc = subprocess.run([sys.executable, "-c", SCRIPT, "deblur", str(source),
                           str(tmp_path / "b"), "--weights", str(tiny_model_folder), *flags],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None) and "ONNX Runtime" in proc.stderr
    unwanted = ("torch", "diffusers", "peft", "transformers") if flags or surely_cpu("auto") \
        else ("diffusers", "peft", "transformers")  # a GPU machine: torch picks the device
    found = [name for name in unwanted if name in result["modules"]]
    assert found == [], f"a cached ONNX run imported {found}"
    assert np.array_equal(read_image(tmp_path / "a" / "photo.png").pixels,
                          read_image(tmp_path / "b" / "photo.png").pixels)


def test_a_failed_export_falls_back_to_pytorch_unless_onnx_was_asked_for(tiny_model_folder,
                                                                         tmp_path, monkeypatch):
    def broken(model, path, parts=None):
        raise RuntimeError("exporter gave up")

    monkeypatch.setattr(onnx_backend, "export", broken)
    source = photo(tmp_path)
    auto = deblur(source, tmp_path / "a", "-w", tiny_model_folder)
    assert auto.exit_code == 0, auto.output
    assert "the ONNX export failed (RuntimeError: exporter gave up); running with PyTorch" \
        in auto.output and (tmp_path / "a" / "photo.png").is_file()
    again = deblur(source, tmp_path / "a2", "-w", tiny_model_folder)  # no second attempt
    assert again.exit_code == 0 and "exporting" not in again.output
    assert "failed in an earlier run (RuntimeError: exporter gave up" in again.output
    asked = deblur(source, tmp_path / "b", "-w", tiny_model_folder, "--backend", "onnx")
    assert asked.exit_code == 1 and "exporter gave up" in asked.output  # asked: tried again
    assert "Traceback" not in asked.output and not (tmp_path / "b" / "photo.png").exists()
    monkeypatch.undo()
    fixed = deblur(source, tmp_path / "c", "-w", tiny_model_folder, "--backend", "onnx")
    assert fixed.exit_code == 0 and "exporting" in fixed.output
    assert not list((tiny_model_folder / ".onnx").glob("*.failed"))


def test_models_in_the_hugging_face_cache_are_exported_to_the_users_cache(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    snapshot = tmp_path / "hub" / "models--someone--osdd" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert onnx_backend.cache_dir(snapshot, "k") == tmp_path / "cache" / "deblurcli" / "onnx" / "k"
    own = tmp_path / "mine"
    own.mkdir()
    assert onnx_backend.cache_dir(own, "k") == own / ".onnx" / "k"


def _attention_modules(model):
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def test_unet_attention_exports_as_multi_head_attention(tiny_model_folder, tmp_path):
    """The UNet's attention is ONNX Runtime's flash-style ``MultiHeadAttention`` in the export
    (the eVAE's 4-D, group-normed attention keeps its MatMul-Softmax-MatMul), with the same
    outputs; the model's own processors are back after the export."""
    import onnx
    import torch

    model = load_model_folder(tiny_model_folder, gamma=0.3)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for param in model.parameters():  # zero-initialised layers would hide attention errors
            if param.ndim >= 2 and not param.any():
                torch.nn.init.normal_(param, std=0.2)
    unet_attention = _attention_modules(model.denoiser.unet)
    evae_attention = _attention_modules(model.evae)
    processors = [m.processor for m in unet_attention + evae_attention]
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        before = model(x)
    onnx_backend.export(model, tmp_path / "m")
    assert [m.processor for m in unet_attention + evae_attention] == processors
    with torch.no_grad():
        assert torch.equal(model(x), before)
    nodes = onnx.load(str(tmp_path / "m" / "model.onnx")).graph.node
    ops = [(node.domain, node.op_type) for node in nodes]
    assert unet_attention and ops.count(("com.microsoft", "MultiHeadAttention")) == \
        len(unet_attention)
    softmax = [node.name for node in nodes if node.op_type == "Softmax"]  # the eVAE's
    assert softmax and not [name for name in softmax if "unet" in name]
    runner = onnx_backend.OnnxModel(tmp_path / "m" / "model.onnx", threads=2)
    for shape in ((2, 3, 64, 96), (1, 3, 72, 40)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
        with torch.no_grad():
            assert (torch.from_numpy(runner(x.numpy())) - model(x)).abs().max() < 1e-4


def test_a_failed_export_restores_the_attention_processors(tiny_model_folder, tmp_path,
                                                           monkeypatch):
    import torch

    model = load_model_folder(tiny_model_folder, gamma=0.3)
    modules = _attention_modules(model)
    processors = [m.processor for m in modules]
    seen = []

    def broken(module, *args, **kwargs):
        seen.extend(type(m.processor).__name__ for m in modules)
        raise RuntimeError("exporter gave up")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter gave up"):
        onnx_backend.export(model, tmp_path / "m")
    assert "_ExportProcessor" in seen  # swapped in during the export...
    assert [m.processor for m in modules] == processors  # ...and back after the error
    assert not (tmp_path / "m").exists()


def test_a_damaged_folder_with_a_cached_export_gets_the_usual_error(tiny_model_folder, tmp_path):
    """The torch-free start gives way to the normal loading, which names what is wrong."""
    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder).exit_code == 0  # exports
    (tiny_model_folder / "checksums.sha256").unlink()
    result = deblur(source, tmp_path / "b", "-w", tiny_model_folder, "--device", "cpu")
    assert result.exit_code == 1
    assert "missing file checksums.sha256" in result.output and "Traceback" not in result.output


def test_a_damaged_weight_file_is_not_run_under_its_old_export(tiny_model_folder, tmp_path):
    """The cache key holds the checksum list, not the files: the files are checked as well."""
    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder).exit_code == 0  # exports
    weights = tiny_model_folder / "lora_real.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    for backend in ("auto", "onnx"):
        result = deblur(source, tmp_path / backend, "-w", tiny_model_folder, "--device", "cpu",
                        "--backend", backend)
        assert result.exit_code == 1, result.output
        assert "lora_real.safetensors" in result.output and "corrupt" in result.output
        assert "Traceback" not in result.output and not (tmp_path / backend).exists()
    shutil.rmtree(tiny_model_folder / ".onnx")  # no export yet: the error comes alone
    result = deblur(source, tmp_path / "fresh", "-w", tiny_model_folder, "--device", "cpu")
    assert result.exit_code == 1 and "exporting" not in result.output, result.output


def test_a_failed_optimisation_keeps_the_raw_export(tiny_model_folder, tmp_path, monkeypatch):
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, options=None, **kwargs):
        if options is not None and options.optimized_model_filepath:
            raise RuntimeError("cannot save the optimised graph")
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    model = load_model_folder(tiny_model_folder, gamma=0.3)
    onnx_backend.export(model, tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["model.onnx"]
    image = np.random.default_rng(2).random((40, 48, 3), dtype=np.float32)
    out = DeblurPipeline(onnx_backend.OnnxModel(tmp_path / "m" / "model.onnx", threads=1),
                         tile=0)(image)
    assert np.abs(out - DeblurPipeline(model, tile=0)(image)).max() < 1e-3


def test_an_export_prunes_the_exports_no_run_can_use(tiny_model_folder, tmp_path):
    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder, "--gamma", "0.3").exit_code == 0
    cache = tiny_model_folder / ".onnx"
    (kept,) = [p for p in cache.iterdir() if p.is_dir()]
    parts = json.loads((kept / "key.json").read_text())
    assert parts["gamma"] == 0.3 and parts["onnxruntime"] and parts["attention"] == "mha"
    _export_copy(kept, "old-version", deblurcli="0.0.1")
    _export_copy(kept, "old-contents", checksums="0" * 64)
    no_record = shutil.copytree(kept, cache / "no-record")
    (no_record / "key.json").unlink()
    assert deblur(source, tmp_path / "b", "-w", tiny_model_folder, "--gamma", "0.9").exit_code == 0
    left = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(left) == 2 and kept.name in left  # the two γ values of this model and version
    # the user's cache holds many models' exports: only other versions go there
    assert onnx_backend.prune(cache, beside=False, checksums="x") == []


def test_a_signal_during_the_onnx_runtime_import_is_not_lost(monkeypatch):
    """ONNX Runtime's extension swallows an exception raised by a signal handler while it
    initialises (a SIGTERM in that window let `deblur` run to the end): the signal is acted on
    once the import is done. The fake module below swallows like the real one."""
    import importlib.abc
    import importlib.util
    import signal
    import sys

    class Swallowing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "onnxruntime" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            try:
                signal.raise_signal(signal.SIGTERM)
                sum(range(1000))  # the handler runs here, and its exception goes nowhere
            except BaseException:  # noqa: BLE001 - the point of the fake
                pass
            module.__version__ = "0.0"

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Swallowing(), *sys.meta_path])
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            onnx_backend._onnxruntime()
        assert signal.getsignal(signal.SIGTERM) is stop
        assert onnx_backend._onnxruntime().__version__ == "0.0"  # imported once, no signal
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_minus_zero_gamma_keys_the_export_of_zero(tiny_model_folder):
    assert onnx_backend.model_key(tiny_model_folder, gamma=-0.0, lora=None) == \
        onnx_backend.model_key(tiny_model_folder, gamma=0.0, lora=None)


def test_a_changed_export_is_made_again(tiny_model_folder, tmp_path):
    """A damaged or replaced model.onnx ran on: its weights altered silently, a broken one
    blamed half precision; the export's files are checked against key.json's digests."""
    import subprocess
    import sys

    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder, "--backend", "onnx").exit_code == 0
    (export,) = (tiny_model_folder / ".onnx").glob("*/model.onnx")
    assert onnx_backend.intact(export.parent)
    data = bytearray(export.read_bytes())
    data[len(data) // 2] ^= 0xFF
    export.write_bytes(bytes(data))
    assert not onnx_backend.intact(export.parent)
    # an export killed half-way leaves its temporary folder: the next export removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = onnx_backend._host()
    abandoned = export.parent.parent / f".{export.parent.name}.tmp-{host}-{dead}"
    running = export.parent.parent / f".{export.parent.name}.tmp-{host}-{os.getppid()}"
    elsewhere = export.parent.parent / f".{export.parent.name}.tmp-other.host-{dead}"
    for folder in (abandoned, running, elsewhere):  # another machine's may run on a shared cache
        folder.mkdir()
    result = deblur(source, tmp_path / "b", "-w", tiny_model_folder, "--backend", "onnx")
    assert result.exit_code == 0 and "exporting" in result.output, result.output
    assert onnx_backend.intact(export.parent)
    assert np.array_equal(read_image(tmp_path / "a" / "photo.png").pixels,
                          read_image(tmp_path / "b" / "photo.png").pixels)
    assert not abandoned.exists() and running.is_dir() and elsewhere.is_dir()


def test_a_copied_export_with_the_same_contents_is_used(tiny_model_folder, tmp_path):
    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder, "--backend", "onnx").exit_code == 0
    copy = tmp_path / "copied-model"
    shutil.copytree(tiny_model_folder, copy)  # copytree keeps times; touch them as cp does
    for path in copy.rglob("*"):
        os.utime(path)
    result = deblur(source, tmp_path / "b", "-w", copy, "--backend", "onnx")
    assert result.exit_code == 0 and "exporting" not in result.output, result.output
    (export,) = (copy / ".onnx").glob("*/model.onnx")  # hashed once: its new time recorded
    record = json.loads((export.parent / "key.json").read_text())["files"]["model.onnx"]
    assert record[1] == export.stat().st_mtime_ns


def test_an_export_from_before_the_file_records_is_kept(tiny_model_folder, tmp_path):
    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder, "--backend", "onnx").exit_code == 0
    (key,) = (tiny_model_folder / ".onnx").glob("*/key.json")
    parts = json.loads(key.read_text())
    key.write_text(json.dumps({k: v for k, v in parts.items() if k != "files"}))
    result = deblur(source, tmp_path / "b", "-w", tiny_model_folder, "--backend", "onnx")
    assert result.exit_code == 0 and "exporting" not in result.output, result.output
    assert json.loads(key.read_text())["files"] == parts["files"]


def test_a_folder_without_its_checksums_is_not_an_export_failure(tiny_model_folder, tmp_path):
    (tiny_model_folder / "checksums.sha256").unlink()
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder, "--backend", "onnx")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == \
        f"error: missing file checksums.sha256 in {tiny_model_folder}"


def test_a_run_without_a_usable_export_hashes_the_folder_once(tiny_model_folder, tmp_path,
                                                               monkeypatch):
    """The weights were hashed three times (two cache lookups and the load) when no export
    could be used, as after a failed export with --backend auto."""
    from deblurcli import modelindex

    key = onnx_backend.model_key(tiny_model_folder, gamma=0.7, lora=None)
    where = onnx_backend.cache_dir(tiny_model_folder, key)
    where.parent.mkdir(parents=True)
    where.with_name(f"{where.name}.failed").write_text("RuntimeError: no\n")
    real, hashed = modelindex.sha256_file, []

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(modelindex, "sha256_file", counting)
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert hashed.count("diffusion_pytorch_model.safetensors") == 3  # evae, unet, prompt: once


def test_auto_says_why_it_runs_pytorch_where_onnx_runtime_is_installed(tiny_model_folder,
                                                                        tmp_path):
    """--tile 600 ran ten times slower with PyTorch, and the header only lost a word."""
    result = deblur(photo(tmp_path), tmp_path / "o", "-w", tiny_model_folder, "--tile", "600")
    assert result.exit_code == 0, result.output
    assert "running with PyTorch, not ONNX Runtime: it runs tiles of at most 512" in \
        " ".join(result.output.split())
    plain = deblur(photo(tmp_path), tmp_path / "o2", "-w", tiny_model_folder, "--backend",
                   "torch")
    assert "not ONNX Runtime" not in plain.output  # asked for: nothing to explain


def test_a_cache_folder_keeps_the_exports_used_last(tiny_model_folder, tmp_path):
    """One export per γ tried: a γ sweep must not fill the disk with full-size networks."""
    source = photo(tmp_path)
    assert deblur(source, tmp_path / "a", "-w", tiny_model_folder, "--gamma", "0.1").exit_code == 0
    cache = tiny_model_folder / ".onnx"
    (first,) = [p for p in cache.iterdir() if p.is_dir()]
    parts = json.loads((first / "key.json").read_text())
    older = []
    for i in range(5):  # other γ values' exports, used at times 1000 .. 5000
        copy = _export_copy(first, f"g{i}", gamma=0.2 + i / 10)
        os.utime(copy, ns=((i + 1) * 10**12,) * 2)
        older.append(copy)
    os.utime(first, ns=(10**9, 10**9))  # used first of all...
    again = deblur(source, tmp_path / "b", "-w", tiny_model_folder, "--gamma", "0.1")
    assert again.exit_code == 0 and "exporting" not in again.output
    assert first.stat().st_mtime_ns > 10**15  # ...and now again: marked as used
    made = deblur(source, tmp_path / "c", "-w", tiny_model_folder, "--gamma", "0.9")
    assert made.exit_code == 0 and "exporting" in made.output
    left = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(left) == onnx_backend.KEEP_EXPORTS == 4
    assert first.name in left and "g4" in left and "g3" in left  # used last, and the new one
    assert not {"g0", "g1", "g2"} & set(left)
    # used in the last minutes, past the count: another run may be opening them; they stay
    for minutes, name in enumerate(("g3", "g4"), start=1):
        moment = time.time_ns() - minutes * 60 * 10**9
        os.utime(cache / name, ns=(moment, moment))
    made_now = _export_copy(first, "g5", gamma=0.5)  # as an export of γ 0.5 would
    assert onnx_backend.prune(cache, beside=True, checksums=parts["checksums"],
                              current=made_now) == []
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 5  # 4 + the one made now


def test_the_hub_cache_is_where_huggingface_hub_puts_it():
    """The older HUGGINGFACE_HUB_CACHE was not read: the ONNX export was written into the Hugging
    Face cache it names. Checked against huggingface_hub's own reading, in one process."""
    import subprocess
    import sys

    script = """
import importlib, os, sys
import huggingface_hub.constants as hc
from deblurcli.onnx_backend import _hub_cache
cases = [{}, {"HF_HOME": "/h"}, {"HUGGINGFACE_HUB_CACHE": "/legacy"},
         {"HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HUB_CACHE": "/new"},
         {"HF_HOME": "~/hf"}, {"XDG_CACHE_HOME": "/x"}, {"HF_HUB_CACHE": "$HOME/c"}]
for case in cases:
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        os.environ.pop(name, None)
    os.environ.update(case)
    importlib.reload(hc)
    if str(_hub_cache()) != hc.HF_HUB_CACHE:
        sys.exit(f"{case}: {_hub_cache()} != {hc.HF_HUB_CACHE}")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_an_export_finished_first_by_another_process_is_kept(tmp_path, monkeypatch):
    """The later of two processes exporting the same model removed the first one's finished
    export (which that process, or a third, may have been opening) to put its own copy there."""
    import torch

    written = []

    def fake_export(module, args, path, **kwargs):  # the exporter, without the minutes
        written.append(path)
        Path(path).write_bytes(f"export {len(written)}".encode())

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    where = tmp_path / ".onnx" / "KEY"
    onnx_backend.export(torch.nn.Identity(), where, {"checksums": "x"})
    first = (where / "model.onnx").stat().st_ino
    onnx_backend.export(torch.nn.Identity(), where, {"checksums": "x"})  # the later process
    assert len(written) == 2 and (where / "model.onnx").read_bytes() == b"export 1"
    assert (where / "model.onnx").stat().st_ino == first
    assert [p.name for p in where.parent.iterdir()] == ["KEY"]  # its copy is not left behind
    (where / "model.onnx").write_bytes(b"damaged")  # not as recorded: replaced
    onnx_backend.export(torch.nn.Identity(), where, {"checksums": "x"})
    assert (where / "model.onnx").read_bytes() == b"export 3"
