"""Where and in which precision the network runs (``--device``, ``--dtype``, ``--threads``).

* ``resolve_device("auto")`` prefers CUDA, then Apple MPS, then the CPU.
* ``resolve_dtype("auto", device)`` picks bfloat16 on CUDA GPUs that support it (Ampere and newer),
  float16 on older CUDA GPUs and on MPS, and float32 on the CPU. bfloat16 is preferred over float16
  because it has float32's exponent range: the Stable Diffusion VAE is known to overflow to
  ``inf``/``NaN`` (black or speckled outputs) in float16, and bfloat16 runs as fast on those GPUs.
* Half precision on the CPU is slow and poorly supported: it falls back to float32 with a warning,
  except ``--dtype bf16`` on a CPU with bfloat16 matrix units, which is used as asked (``auto``
  stays float32 on the CPU: see :func:`resolve_dtype`).
  Training is the exception: ``--mixed-precision bf16`` autocasts on CPUs with native bfloat16
  matrix units (:func:`cpu_has_fast_bf16`: Intel AMX or AVX512-BF16); on a Xeon with
  AVX512-BF16 it measured 1.48x faster per stage-2 step (docs/training.md,
  ``benchmarks/bench_train_step.py``).
* :func:`set_cpu_threads` sets torch's intra-op thread count to the cores this process may use.
* :func:`surely_cpu` tells, without importing torch (2 s), whether a run can only use the CPU:
  the ONNX Runtime back-end then starts without torch.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Optional

from deblurcli.errors import DeblurcliError

if TYPE_CHECKING:
    import torch

DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch attribute names
#: Device files without which torch finds no GPU on Linux: NVIDIA (and Jetson's integrated
#: GPUs), WSL's GPU, AMD ROCm.
GPU_DEVICE_FILES = ("/dev/nvidia*", "/dev/nvhost-*", "/dev/nvmap", "/dev/nvgpu*", "/dev/dxg",
                    "/dev/kfd")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(?::(\d+))?)$")

WarnFn = Callable[[str], None]


def check_device_name(name: str) -> str:
    """Return ``name`` normalised (lower case, stripped) or raise ``ValueError`` if it is not
    one of ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (availability is not checked)."""
    norm = name.strip().lower()
    if not _DEVICE_RE.match(norm):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return norm


def torch_device(device: str | torch.device) -> torch.device:
    """A library caller's ``device``: a name ``--device`` takes (``auto``, ``cuda:1``, ...)
    resolved as :func:`resolve_device` does it, any other name or ``torch.device`` as torch
    reads it (``cpu:0``, ``xpu``, ``meta``)."""
    import torch

    if isinstance(device, str):
        try:
            check_device_name(device)
        except ValueError:
            return torch.device(device)
        return resolve_device(device)
    return torch.device(device)


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A library caller's ``dtype``: a ``torch.dtype``, or a name as ``--dtype`` takes it
    (``fp32``, ``fp16``, ``bf16``) or torch spells it (``float16``, ``bfloat16``, ``half``).

    Raises:
        ValueError: any other value (one line naming the choices).
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {**_DTYPES, "float32": "float32", "float": "float32", "float16": "float16",
             "half": "float16", "bfloat16": "bfloat16"}
    if isinstance(dtype, str) and dtype.strip().lower() in names:
        return getattr(torch, names[dtype.strip().lower()])
    raise ValueError(f"unknown dtype {dtype!r}: use torch.float32, torch.float16, torch.bfloat16 "
                     "or their names (fp32, fp16, bf16)")


def surely_cpu(name: str) -> bool:
    """True when ``--device name`` can only be the CPU on this machine, decided without torch:
    ``cpu``, or ``auto`` on Linux with none of :data:`GPU_DEVICE_FILES` (torch would find no
    GPU either). False when unsure: :func:`resolve_device` then asks torch."""
    try:
        norm = check_device_name(name)
    except ValueError:
        return False
    if norm == "cpu":
        return True
    return norm == "auto" and sys.platform.startswith("linux") and \
        not any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a ``--device`` value into a ``torch.device`` that exists on this machine.

    Raises:
        DeblurcliError: the name is unknown or the device is not available here.
    """
    import torch

    try:
        norm = check_device_name(name)
    except ValueError as exc:
        raise DeblurcliError(str(exc)) from None
    if norm == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if norm == "cpu":
        return torch.device("cpu")
    if norm == "mps":
        if not _mps_available():
            raise DeblurcliError("device 'mps' is not available (needs Apple silicon and a torch "
                                 "build with MPS); use --device cpu")
        return torch.device("mps")
    # cuda or cuda:N
    if not torch.cuda.is_available():
        raise DeblurcliError(f"device {norm!r} is not available: torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); use --device cpu")
    index = int(norm.split(":")[1]) if ":" in norm else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeblurcliError(f"device {norm!r} is not available: this machine has {count} CUDA "
                             f"GPU(s), numbered 0..{count - 1}")
    return torch.device("cuda", index)


def _bf16_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    import torch

    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):  # pragma: no cover - driver trouble
        return False


def vae_dtype_for(dtype: torch.dtype, vae_fp32: Optional[bool] = None) -> Optional[torch.dtype]:
    """The eVAE's dtype under a UNet of ``dtype`` (``None``: the UNet's own).

    ``vae_fp32`` True (``--vae-fp32``): float32; False (``--no-vae-fp32``): the UNet's. Unset:
    float32 under a float16 UNet, as diffusers upcasts Stable Diffusion's VAE
    (``force_upcast``): its activations overflow fp16 into black or speckled images. That is
    what ``--dtype auto`` gives older CUDA GPUs without bf16 (a T4) and Apple MPS; bf16 has
    fp32's range and keeps one dtype.
    """
    import torch

    if vae_fp32 is None:
        vae_fp32 = dtype == torch.float16
    return torch.float32 if vae_fp32 and dtype != torch.float32 else None


def resolve_dtype(name: str, device: torch.device, warn: Optional[WarnFn] = None) -> torch.dtype:
    """Turn a ``--dtype`` value into a ``torch.dtype`` suited to ``device``.

    ``auto``: bf16 on CUDA GPUs with bf16 support, else fp16 on CUDA/MPS, fp32 on the CPU.
    An explicit ``bf16`` on a CPU with bfloat16 matrix units (:func:`cpu_has_fast_bf16`) is
    used; ``fp16`` on any CPU, and ``bf16`` on other CPUs, fall back to fp32 and call ``warn``
    with a message.

    ``auto`` stays fp32 on every CPU because bf16 was not faster where it could be measured: on
    a 2-core Xeon with AVX512-BF16 but no AMX it ran the compact model 0.77x as fast (UNet and
    eVAE bf16, PSNR 39.7 dB against fp32) and 0.86x with the eVAE in fp32 (45.6 dB)
    (``benchmarks/bench_cpu_bf16.py``, docs/performance.md). CPUs with AMX may differ: measure
    there before changing this.

    Raises:
        DeblurcliError: the name is not one of auto, fp32, fp16, bf16.
    """
    import torch

    norm = name.strip().lower()
    if norm not in DTYPE_CHOICES:
        raise DeblurcliError(f"unknown dtype {name!r}; use auto, fp32, fp16 or bf16")
    if norm == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _bf16_supported(device) else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    dtype = getattr(torch, _DTYPES[norm])
    if device.type == "cpu" and dtype != torch.float32:
        if dtype == torch.bfloat16 and cpu_has_fast_bf16():
            return dtype
        if warn is not None:
            why = "" if dtype == torch.float16 else " without bfloat16 matrix units (AMX, " \
                "AVX512-BF16)"
            warn(f"--dtype {norm} is not used on a CPU{why} (slow and inexact there); "
                 "using fp32")
        return torch.float32
    return dtype


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 matrix products natively (Intel AMX tiles or
    AVX512-BF16), so that bf16 autocast speeds training up rather than slowing it down."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)  # private torch helpers: absent in some versions
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:  # pragma: no cover - defensive: unusual builds
            continue
    return False


def usable_cpu_count() -> int:
    """Number of CPU cores this process may run on (respects affinity masks / cgroups cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def default_cpu_threads() -> int:
    """The CPU threads of a run that names none: ``OMP_NUM_THREADS`` when it is set to a
    positive number (as OpenMP and PyTorch read it), else every usable core."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else usable_cpu_count()


def set_cpu_threads(threads: int = 0) -> int:
    """Set torch's intra-op CPU thread count and return it.

    ``threads=0`` means :func:`default_cpu_threads`. Negative values are invalid.
    """
    if threads < 0:
        raise ValueError("threads must be >= 0 (0 = OMP_NUM_THREADS or all usable cores)")
    import torch

    count = threads or default_cpu_threads()
    torch.set_num_threads(count)
    return count
