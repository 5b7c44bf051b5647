"""--device / --dtype / --threads resolution (CUDA and MPS are simulated with monkeypatch)."""

from __future__ import annotations

import pytest
import torch

from deblurcli import device as dev
from deblurcli.errors import DeblurcliError


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("name", ["auto", "cpu", "CUDA", " cuda:1 ", "mps"])
def test_check_device_name_accepts(name):
    assert dev.check_device_name(name) == name.strip().lower()


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda1", "", "tpu"])
def test_check_device_name_rejects(name):
    with pytest.raises(ValueError, match="unknown device"):
        dev.check_device_name(name)


def test_auto_falls_back_to_cpu(no_gpu):
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch, two_gpus):
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("mps")


def test_cuda_index(two_gpus):
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeblurcliError, match="numbered 0..1"):
        dev.resolve_device("cuda:2")


@pytest.mark.parametrize("name,match", [("cuda", "no CUDA GPU"), ("cuda:0", "no CUDA GPU"),
                                        ("mps", "not available"), ("gpu", "unknown device")])
def test_unavailable_or_unknown_device_is_one_clear_error(no_gpu, name, match):
    with pytest.raises(DeblurcliError, match=match) as info:
        dev.resolve_device(name)
    assert "\n" not in str(info.value)


def test_dtype_auto_per_device(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    assert dev.resolve_dtype("auto", cpu) == torch.float32
    assert dev.resolve_dtype("auto", mps) == torch.float16
    monkeypatch.setattr(dev, "_bf16_supported", lambda d: True)
    assert dev.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(dev, "_bf16_supported", lambda d: False)
    assert dev.resolve_dtype("auto", cuda) == torch.float16


def test_explicit_dtypes_on_gpu():
    cuda = torch.device("cuda", 0)
    assert dev.resolve_dtype("fp16", cuda) == torch.float16
    assert dev.resolve_dtype("BF16", cuda) == torch.bfloat16
    assert dev.resolve_dtype("fp32", cuda) == torch.float32


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_half_on_cpu_falls_back_to_fp32_with_a_warning(name, monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: False)
    warnings: list[str] = []
    assert dev.resolve_dtype(name, torch.device("cpu"), warn=warnings.append) == torch.float32
    assert len(warnings) == 1 and name in warnings[0] and "fp32" in warnings[0]
    assert dev.resolve_dtype(name, torch.device("cpu")) == torch.float32  # no callback: silent


def test_bf16_on_a_cpu_with_bf16_units_is_used_but_not_chosen_by_auto(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_fast_bf16", lambda: True)
    warnings: list[str] = []
    cpu = torch.device("cpu")
    assert dev.resolve_dtype("bf16", cpu, warn=warnings.append) == torch.bfloat16
    assert dev.resolve_dtype("auto", cpu, warn=warnings.append) == torch.float32
    assert dev.resolve_dtype("fp16", cpu, warn=warnings.append) == torch.float32
    assert len(warnings) == 1 and "fp16" in warnings[0]


def test_unknown_dtype():
    with pytest.raises(DeblurcliError, match="unknown dtype"):
        dev.resolve_dtype("fp64", torch.device("cpu"))


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert dev.usable_cpu_count() >= 1
        assert dev.set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert dev.set_cpu_threads(0) == dev.usable_cpu_count()
        for value, expected in (("1", 1), ("3", 3), ("0", dev.usable_cpu_count()),
                                ("many", dev.usable_cpu_count())):
            monkeypatch.setenv("OMP_NUM_THREADS", value)
            assert dev.set_cpu_threads(0) == expected and torch.get_num_threads() == expected
        with pytest.raises(ValueError):
            dev.set_cpu_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_surely_cpu_only_when_no_gpu_can_be_there(monkeypatch):
    from deblurcli import device as dev

    monkeypatch.setattr(dev.sys, "platform", "linux")
    monkeypatch.setattr(dev.glob, "glob", lambda pattern: [])
    assert dev.surely_cpu("auto") and dev.surely_cpu("CPU") and dev.surely_cpu(" cpu ")
    assert not dev.surely_cpu("cuda") and not dev.surely_cpu("mps") and not dev.surely_cpu("tpu")
    seen = []
    monkeypatch.setattr(dev.glob, "glob",
                        lambda pattern: seen.append(pattern) or (["/dev/nvidia0"]
                                                                 if "nvidia" in pattern else []))
    assert not dev.surely_cpu("auto") and dev.surely_cpu("cpu")  # a GPU: torch decides
    assert "/dev/nvidia*" in seen
    monkeypatch.setattr(dev.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(dev.sys, "platform", "darwin")  # MPS may be there
    assert not dev.surely_cpu("auto")


def test_library_callers_may_name_the_dtype(tiny_model_folder):
    """load_model_folder(dtype="fp16") failed deep in torch with a TypeError."""
    import torch

    from deblurcli.device import torch_dtype
    from deblurcli.modelfolder import load_model_folder

    assert [torch_dtype(n) for n in ("fp16", "BF16", "float32", "half", torch.bfloat16)] == \
        [torch.float16, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        torch_dtype("int8")
    model = load_model_folder(tiny_model_folder, dtype="bf16", vae_dtype="fp32")
    assert model.unet.dtype == torch.bfloat16 and model.evae.dtype == torch.float32


def test_the_vae_runs_in_fp32_under_an_fp16_unet_unless_told_otherwise():
    """fp16, what --dtype auto gives a T4 or MPS, overflows Stable Diffusion's VAE into black
    or speckled images; only --vae-fp32 kept it in fp32."""
    assert dev.vae_dtype_for(torch.float16) == torch.float32
    assert dev.vae_dtype_for(torch.float16, False) is None  # --no-vae-fp32
    assert dev.vae_dtype_for(torch.bfloat16) is None  # fp32's range already
    assert dev.vae_dtype_for(torch.bfloat16, True) == torch.float32  # --vae-fp32
    assert dev.vae_dtype_for(torch.float32, True) is None
