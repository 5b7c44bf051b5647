"""ONNX Runtime as a CPU back-end of ``deblurcli deblur`` (the ``onnx`` extra).

The fused network (γ-blend merged, float32) is exported once with ``torch.onnx.export``, with
dynamic batch, height and width, and cached as ``MODEL/.onnx/KEY.onnx`` (in the user's cache
folder when the model folder is read-only). ``KEY`` hashes the folder's ``checksums.sha256``,
γ (or the ``--lora`` blend file) and the deblurcli version, so a changed model gets a new file.
A later run finds the file and starts without diffusers or the model's own loading.

The same :class:`~deblurcli.pipeline.DeblurPipeline` runs around it (:class:`OnnxModel` is its
model callable). It serves tiles up to :data:`MAX_TILE` px: the exported attention is quadratic
in memory, where torch's ``scaled_dot_product_attention`` is not, and whole 1280x720 images ran
3x slower than with torch (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

from deblurcli._version import __version__

BACKENDS = ("auto", "torch", "onnx")
OPSET = 17
MAX_TILE = 512
INSTALL_HINT = "pip install 'deblurcli[onnx]'"


def available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter's ``onnx`` package are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def unsupported(*, device_type: str, fp32: bool, fuse: bool, compile: bool,
                tile: int) -> str | None:
    """Why this run cannot use ONNX Runtime, or ``None`` when it can."""
    if not available():
        return f"ONNX Runtime is not installed ({INSTALL_HINT})"
    if device_type != "cpu":
        return "it runs on the CPU only"
    if not fp32:
        return "it runs float32 only"
    if not fuse:
        return "it runs fused adapters only (not with --no-fuse)"
    if compile:
        return "--compile is a torch option"
    if not 0 < tile <= MAX_TILE:
        return f"it runs tiles of at most {MAX_TILE} px (--tile 1..{MAX_TILE})"
    return None


def model_key(folder: Path, *, gamma: float, lora: Path | None) -> str:
    """The cache key of the fused network of model folder ``folder`` at ``gamma`` (or with the
    blend file ``lora``)."""
    from deblurcli.modelfolder import CHECKSUM_FILE, RECORD_KEY, read_model_index, sha256_file

    record = read_model_index(folder)[RECORD_KEY]
    parts: dict = {"checksums": sha256_file(folder / CHECKSUM_FILE), "opset": OPSET,
                   "deblurcli": __version__}
    if lora is not None:
        parts["lora"] = sha256_file(lora)
    elif record.get("fused_gamma") is None:
        parts["gamma"] = round(float(gamma), 9)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cache_file(folder: Path, key: str) -> Path:
    """``folder/.onnx/KEY.onnx`` when ``folder`` is writable, else the user's cache folder
    (``$XDG_CACHE_HOME/deblurcli/onnx``, default ``~/.cache``)."""
    beside = folder / ".onnx"
    if os.access(beside if beside.is_dir() else folder, os.W_OK):
        return beside / f"{key}.onnx"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "deblurcli" / "onnx" / f"{key}.onnx"


def export(model, path: Path) -> None:
    """Write the float32 network ``model`` (an ``OSDDModel`` with fused adapters) to ``path`` as
    ONNX, atomically; batch, height and width stay dynamic."""
    import torch

    from deblurcli.images import atomic_write

    class Forward(torch.nn.Module):  # the exporter calls forward(x) positionally
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

    # a latent side that no UNet level divides (72 px -> 9): the trace then takes diffusers'
    # path that sizes each upsampling from its skip tensor, which every input size needs
    sample = torch.zeros(1, 3, 72, 72)
    axes = {0: "batch", 2: "height", 3: "width"}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's tracer warnings
            torch.onnx.export(Forward().eval(), (sample,), str(tmp), dynamo=False,
                              opset_version=OPSET, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": axes, "y": axes})

    atomic_write(path, write)


class OnnxModel:
    """An ONNX Runtime session as the model callable of ``DeblurPipeline``: ``(B, 3, h, w)``
    float32 tensor in ``[-1, 1]`` -> same shape (give the pipeline ``channels_last=False``)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x):
        import torch

        y = self.session.run(None, {"x": x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(y)


def load(folder: Path, *, gamma: float, lora: Path | None, threads: int, load_model,
         note=None) -> OnnxModel:
    """The cached ONNX model of ``folder`` (exported first from ``load_model()``, a fused float32
    ``OSDDModel``, when there is none or it does not open); ``note`` gets one line then."""
    path = cache_file(folder, model_key(folder, gamma=gamma, lora=lora))
    if path.is_file():
        try:
            return OnnxModel(path, threads)
        except Exception:  # noqa: BLE001 - ORT's error kinds; an unreadable file is rebuilt
            path.unlink(missing_ok=True)
    if note is not None:
        note(f"exporting the model for ONNX Runtime (once; cached in {path.parent})")
    export(load_model(), path)
    return OnnxModel(path, threads)
