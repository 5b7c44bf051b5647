"""Helpers shared by the benchmark scripts: environment description, timing statistics, peak
memory (RSS and CUDA) and Markdown/JSON output.

Not part of the installed package: the scripts in ``benchmarks/`` import this module from their
own folder (``python benchmarks/bench_deblur.py`` puts that folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


# ----------------------------------------------------------------------------- parsing
def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> ``(1280, 720)`` (width, height); raises ``ValueError`` on bad input."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 1280x720), got {text!r}")
    width, height = (int(p) for p in parts)
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return width, height


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class TimeStats:
    """Summary of repeated wall-clock measurements (seconds)."""

    median: float
    minimum: float
    maximum: float
    mean: float
    runs: int

    @classmethod
    def of(cls, times: Sequence[float]) -> TimeStats:
        """Statistics of a non-empty sequence of durations."""
        if not times:
            raise ValueError("no measurements")
        return cls(median=statistics.median(times), minimum=min(times), maximum=max(times),
                   mean=statistics.fmean(times), runs=len(times))

    def as_dict(self) -> dict[str, float | int]:
        """Plain JSON-friendly dict."""
        return {"median_s": self.median, "min_s": self.minimum, "max_s": self.maximum,
                "mean_s": self.mean, "runs": self.runs}


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    """A ``VmXXX`` value of ``/proc/self/status`` in KiB (Linux), or ``None``."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux ``VmRSS``), or ``None`` elsewhere."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``; falls back to ``ru_maxrss``)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # macOS: bytes


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: ``clear_refs`` = 5).

    Returns ``False`` when that is not possible; :func:`peak_rss_bytes` then keeps reporting
    the peak since the process started.
    """
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def gib(n_bytes: float | None) -> str:
    """Bytes as ``"1.23 GiB"`` (``"-"`` for ``None``)."""
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- environment
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """CPU model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def environment(device: Any) -> dict[str, Any]:
    """Versions, hardware and threading of this process, for the header of every result."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "peft": _version("peft"),
        "deblurcli": _version("deblurcli"),
        "cpu": cpu_model(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if getattr(device, "type", None) == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def attention_processors(module: Any) -> dict[str, int]:
    """How many attention layers of ``module`` use each diffusers attention processor class
    (``AttnProcessor2_0`` = PyTorch ``scaled_dot_product_attention``)."""
    counts: Counter[str] = Counter()
    for sub in module.modules():
        processor = getattr(sub, "processor", None)
        if processor is not None and hasattr(sub, "set_processor"):
            counts[type(processor).__name__] += 1
    return dict(counts)


# ----------------------------------------------------------------------------- output
def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``rows`` (dicts) restricted to ``columns`` in that order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [str(row.get(c, "")).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`deblurcli.images.atomic_write_bytes`)."""
    from deblurcli.images import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON (atomically)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
