"""ONNX Runtime as a CPU back-end of ``deblurcli deblur`` (the ``onnx`` extra).

The fused network (γ-blend merged, float32) is exported once with ``torch.onnx.export``, with
dynamic batch, height and width and the UNet's attention as ONNX Runtime's flash-style
``MultiHeadAttention`` (:mod:`deblurcli.onnx_attention`), stored already optimised by ONNX
Runtime (its portable ``extended`` level) and cached as ``MODEL/.onnx/KEY/model.onnx`` (in the
user's cache folder for a read-only, packaged or Hugging Face cached model). ``KEY`` hashes the
folder's ``checksums.sha256``, γ (or the ``--lora`` blend file), the deblurcli and ONNX Runtime
versions, so a changed model or runtime gets a new export. A later run finds the file and
starts without torch (:func:`cached`).

The same :class:`~deblurcli.pipeline.DeblurPipeline` runs around it (:class:`OnnxModel` is its
model, an array model: numpy in and out). It serves tiles up to :data:`MAX_TILE` px, the sizes
measured against torch (docs/performance.md); larger ones and whole images run with torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

from deblurcli._version import __version__

BACKENDS = ("auto", "torch", "onnx")
OPSET = 17
MAX_TILE = 512
KEEP_EXPORTS = 4  # in one cache folder, the most recently used: one per γ tried, bounded
KEEP_RECENT_S = 600  # an export used this recently stays whatever the count: a run may be opening it
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
        return f"it runs tiles of at most {MAX_TILE} px (--tile 8..{MAX_TILE}, a multiple of 8)"
    return None


def key_parts(folder: Path, *, gamma: float, lora: Path | None) -> dict:
    """What an export of model folder ``folder`` at ``gamma`` (or with the blend file ``lora``)
    depends on: the folder's checksums, γ or the blend file, and the versions that export and
    optimise it. Stored beside each export as ``key.json``."""
    from deblurcli.errors import WeightsError
    from deblurcli.modelindex import CHECKSUM_FILE, held_gamma, sha256_file

    held = held_gamma(folder)  # (reads the folder's record: a bad folder fails here)
    if not (folder / CHECKSUM_FILE).is_file():  # what verify_checksums says, before any export
        raise WeightsError(f"missing file {CHECKSUM_FILE} in {folder}")
    parts: dict = {"checksums": sha256_file(folder / CHECKSUM_FILE), **_runtime_parts()}
    if lora is not None:
        parts["lora"] = sha256_file(lora)
    elif held is None:  # a fused or one-adapter model runs at its own γ
        parts["gamma"] = round(float(gamma), 9) + 0.0  # -0 keys as 0
    return parts


def _runtime_parts() -> dict:
    """The key parts that are the same for every model with this installation."""
    return {"opset": OPSET, "deblurcli": __version__, "attention": "mha",
            "onnxruntime": _runtime_version()}


def model_key(folder: Path, *, gamma: float, lora: Path | None) -> str:
    """The cache key of the fused network of model folder ``folder`` at ``gamma`` (or with the
    blend file ``lora``): a hash of :func:`key_parts`."""
    parts = key_parts(folder, gamma=gamma, lora=lora)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


MODEL_FILE = "model.onnx"
KEY_FILE = "key.json"
FILES_KEY = "files"  # key.json: {file name: [size, mtime_ns, sha256]} of the export's files


def _file_records(folder: Path) -> dict[str, list]:
    """``{name: [size, mtime_ns, sha256]}`` of the files of export folder ``folder``."""
    from deblurcli.modelindex import sha256_file

    records = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != KEY_FILE:
            stat = path.stat()
            records[path.name] = [stat.st_size, stat.st_mtime_ns, sha256_file(path)]
    return records


def intact(folder: Path) -> bool:
    """Whether export folder ``folder`` holds the files its ``key.json`` recorded, unchanged: a
    file of the recorded size and time is taken as it is (as ``make`` and ``rsync`` do); one
    with another time (a copy, an edit) must have the recorded SHA-256, and its new time is
    then recorded (where the folder is writable), so that it is hashed once. An export from
    before these records gets them now, as it is."""
    from deblurcli.images import atomic_write_bytes
    from deblurcli.modelindex import sha256_file

    try:
        parts = json.loads((folder / KEY_FILE).read_text())
        records = parts.get(FILES_KEY)
        names = {path.name for path in folder.iterdir() if path.name != KEY_FILE}
        changed = records is None
        if records is None:
            records = _file_records(folder)
        if set(records) != names:
            return False
        for name, (size, mtime_ns, digest) in list(records.items()):
            stat = (folder / name).stat()
            if stat.st_size != size:
                return False
            if stat.st_mtime_ns != mtime_ns:
                if sha256_file(folder / name) != digest:
                    return False
                records[name] = [size, stat.st_mtime_ns, digest]
                changed = True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    if changed:
        try:
            atomic_write_bytes(folder / KEY_FILE, (json.dumps(
                {**parts, FILES_KEY: records}, sort_keys=True) + "\n").encode())
        except OSError:  # a read-only cache: hashed again next time
            pass
    return True


def _runtime_version() -> str:
    """ONNX Runtime's version (the module's own: onnxruntime-gpu and other builds install it
    under another package name)."""
    return str(_onnxruntime().__version__)


def _onnxruntime():
    """The ``onnxruntime`` module, its first import made with Ctrl-C and SIGTERM held back.

    Its compiled extension's initialisation swallows an exception raised by a signal handler
    while it runs: a Ctrl-C or SIGTERM in that half second was lost and the run went on to the
    end. Here a Python handler of SIGINT or SIGTERM is swapped, for the import only, for one
    that notes the signal; the real one is then called with it, in the caller's code."""
    import signal
    import sys
    import threading

    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    noted: list[int] = []
    swapped: dict = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if callable(signal.getsignal(signum)):  # a default action cannot be swallowed
                swapped[signum] = signal.signal(signum, lambda n, frame: noted.append(n))
    try:
        import onnxruntime
    finally:
        # both handlers back before either runs (a Ctrl-C raising from the first one put back
        # would leave SIGTERM noted only, for the rest of the process)
        block = getattr(signal, "pthread_sigmask", None)
        held = block(signal.SIG_BLOCK, set(swapped)) if block and swapped else None
        try:
            for signum, handler in swapped.items():
                signal.signal(signum, handler)
        finally:
            if held is not None:
                block(signal.SIG_SETMASK, held)
        for signum in dict.fromkeys(noted):
            swapped[signum](signum, None)
    return onnxruntime


def _hub_cache() -> Path:
    """The Hugging Face hub cache folder as huggingface_hub finds it (``HF_HUB_CACHE``, the
    older ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub`` or the default; ``~`` and ``$VAR``
    expanded), without importing it."""
    def expand(value: str) -> str:
        return os.path.expandvars(os.path.expanduser(value))

    home = expand(os.environ.get("HF_HOME", os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
        "huggingface")))
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return Path(expand(os.environ.get("HF_HUB_CACHE", legacy)))


def cache_dir(folder: Path, key: str) -> Path:
    """The folder of one export: ``folder/.onnx/KEY/`` for a writable model folder of the
    user's own, else ``$XDG_CACHE_HOME/deblurcli/onnx/KEY/`` (default ``~/.cache``), so that
    the Hugging Face cache, the packaged model and read-only folders stay as they are.

    One folder per export: a model over 2 GB is exported as ``model.onnx`` plus weight files
    whose names the exporter chooses, and two exports must never share those."""
    from deblurcli.modelindex import default_weights_dir

    resolved = folder.resolve()
    shared = resolved == default_weights_dir() or \
        resolved.is_relative_to(_hub_cache().resolve())
    beside = folder / ".onnx"
    if not shared and os.access(beside if beside.is_dir() else folder, os.W_OK):
        return beside / key
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "deblurcli" / "onnx" / key


def export(model, folder: Path, parts: dict | None = None) -> None:
    """Export the float32 network ``model`` (an ``OSDDModel`` with fused adapters) to
    ``folder/model.onnx`` (with its weight files when over 2 GB; ``parts``, its
    :func:`key_parts`, as ``key.json``): written in a temporary sibling folder and renamed, so
    the folder appears whole or not at all; batch, height and width stay dynamic."""
    import shutil

    import torch

    from deblurcli.images import fsync_folder
    from deblurcli.onnx_attention import DOMAIN, multi_head_attention

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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{_host()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with warnings.catch_warnings(), torch.no_grad(), multi_head_attention(model):
            warnings.simplefilter("ignore")  # the exporter's tracer warnings
            torch.onnx.export(Forward().eval(), (sample,), str(tmp / MODEL_FILE), dynamo=False,
                              opset_version=OPSET, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": axes, "y": axes},
                              custom_opsets={DOMAIN: 1})
        if [path.name for path in tmp.iterdir()] == [MODEL_FILE]:  # one file: under 2 GB
            _optimize(tmp / MODEL_FILE)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if parts is not None:  # with the files' digests, checked by each run that opens them
            record = {**parts, FILES_KEY: _file_records(tmp)}
            (tmp / KEY_FILE).write_text(json.dumps(record, sort_keys=True) + "\n")
        if parts is not None and folder.is_dir() and intact(folder):
            return  # another process finished the same export first: keep that one (it may
            # be opening it), not remove it for this copy
        shutil.rmtree(folder, ignore_errors=True)  # an unreadable earlier export
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same export first: keep that one
            if not (folder / MODEL_FILE).is_file():
                raise
        fsync_folder(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _optimize(path: Path) -> None:
    """Replace the exported file by ONNX Runtime's graph optimised at the portable ``extended``
    level (constant folding, fusions; the CPU-specific layout changes stay to each session): a
    session then opens the compact model in 0.17 s instead of 0.31 s. Where that fails, the
    raw export stays."""
    ort = _onnxruntime()
    optimized = path.with_name(f"optimized-{path.name}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        os.replace(optimized, path)
    except Exception:  # noqa: BLE001 - only an optimisation: the raw export runs as well
        optimized.unlink(missing_ok=True)


class OnnxModel:
    """An ONNX Runtime session as the model of ``DeblurPipeline``, an array model: ``(B, 3, h, w)``
    float32 numpy array in ``[-1, 1]`` -> same shape; no torch involved."""

    takes_arrays = True  # DeblurPipeline passes numpy arrays (deblurcli.pipeline)

    def __init__(self, path: Path, threads: int) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x):
        return self.session.run(None, {"x": x})[0]


def cached(folder: Path, *, gamma: float, lora: Path | None = None,
           threads: int) -> OnnxModel | None:
    """The cached export of ``folder`` at ``gamma`` (or with the blend file ``lora``) opened
    with ONNX Runtime, or None when there is none or it does not open; imports no torch.

    The folder's files are checked against ``checksums.sha256`` first (WeightsError), as the
    PyTorch path checks them: the key holds that list, not the files, so a damaged weight file
    would otherwise run on unnoticed under its old export. An export whose files changed since
    it was written (:func:`intact`) counts as none: it is made again."""
    from deblurcli.modelindex import verify_checksums

    path = cache_dir(folder, model_key(folder, gamma=gamma, lora=lora)) / MODEL_FILE
    if not path.is_file() or not intact(path.parent):
        return None
    _mark_used(path.parent)  # before it is opened: another run's prune now leaves it
    verify_checksums(folder)
    try:
        return OnnxModel(path, threads)
    except Exception:  # noqa: BLE001 - ORT's error kinds; an unreadable export is redone
        return None


def _mark_used(export: Path) -> None:
    """Give export folder ``export`` the time of now: :func:`prune` keeps the exports used
    last (a read-only cache keeps its times)."""
    try:
        os.utime(export)
    except OSError:
        pass


class ExportFailedBefore(RuntimeError):
    """This model's export failed in an earlier run (its ``KEY.failed`` note says why)."""


def load(folder: Path, *, gamma: float, lora: Path | None, threads: int, load_model,
         note=None, retry: bool = True) -> OnnxModel:
    """The cached ONNX model of ``folder`` (exported first from ``load_model()``, a fused float32
    ``OSDDModel``, when there is none or it does not open); ``note`` gets one line then.

    A failed export leaves ``KEY.failed`` beside the export folder; with ``retry=False`` a later
    call raises :class:`ExportFailedBefore` at once instead of loading and exporting again.
    """
    model = cached(folder, gamma=gamma, lora=lora, threads=threads)
    if model is not None:
        return model
    parts = key_parts(folder, gamma=gamma, lora=lora)
    where = cache_dir(folder, model_key(folder, gamma=gamma, lora=lora))
    failed = where.with_name(f"{where.name}.failed")
    if failed.is_file() and not retry:
        raise ExportFailedBefore(f"it failed in an earlier run ({failed.read_text().strip()}; "
                                 "--backend onnx tries again)")
    torch_model = load_model()  # a damaged folder says so here, before the note below
    if note is not None:
        note(f"exporting the model for ONNX Runtime (once; cached in {where})")
    try:
        export(torch_model, where, parts)
        _mark_used(where)
        model = OnnxModel(where / MODEL_FILE, threads)
    except Exception as exc:
        from deblurcli.images import atomic_write_bytes

        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        atomic_write_bytes(failed, (reason + "\n").encode())
        raise
    failed.unlink(missing_ok=True)
    prune(where.parent, beside=where.parent == folder / ".onnx", checksums=parts["checksums"],
          current=where)
    return model


def _host() -> str:
    """This machine's name as it goes into an export's temporary folder name."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _abandoned(name: str) -> bool:
    """Whether ``name`` is the temporary folder of an export of this machine
    (``.KEY.tmp-HOST-PID``) whose process no longer runs (killed mid-export: ``kill -9``, a
    power cut). Another machine's (a cache shared over the network) is never taken for one."""
    head, sep, tail = name.rpartition(".tmp-")
    host, dash, pid = tail.rpartition("-")
    if not sep or not head.startswith(".") or not dash or host != _host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: it runs
        return False
    return False


def prune(cache: Path, *, beside: bool, checksums: str, current: Path | None = None) -> list[Path]:
    """Remove the exports in ``cache`` that no run of this installation can use again: those
    of other deblurcli, ONNX Runtime or export versions (and older ones, without ``key.json``);
    in a model's own ``.onnx`` folder (``beside``) also those of earlier contents of the folder
    (other ``checksums``), and the temporary folders of exports whose process was killed.
    Exports of other γ values (or other models, in the user's cache) stay, up to the
    :data:`KEEP_EXPORTS` used last, and so do those used in the last :data:`KEEP_RECENT_S`
    seconds (another run may be opening one) and ``current``, the export just made. Returns
    the folders removed."""
    import shutil

    current_parts = _runtime_parts()
    removed, usable = [], []
    for entry in cache.iterdir() if cache.is_dir() else ():
        if entry.name.startswith(".") and entry.is_dir() and _abandoned(entry.name):
            shutil.rmtree(entry, ignore_errors=True)  # the export of a process that was killed
            removed.append(entry)
            continue
        if entry.name.startswith(".") or not entry.is_dir():
            continue  # another process's export in progress, or a note
        try:
            parts = json.loads((entry / KEY_FILE).read_text())
            stale = any(parts.get(k) != v for k, v in current_parts.items()) or \
                (beside and parts.get("checksums") != checksums)
        except (OSError, ValueError, AttributeError):
            stale = (entry / MODEL_FILE).is_file()  # an export from before key.json
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif (entry / MODEL_FILE).is_file() and entry != current:
            usable.append(entry)
    room = KEEP_EXPORTS - (current is not None)
    recent = time.time_ns() - KEEP_RECENT_S * 10**9
    by_use = sorted(((_last_used(entry), entry) for entry in usable), reverse=True)
    for used, entry in by_use[max(room, 0):]:
        if used < recent:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _last_used(export: Path) -> int:
    """When export folder ``export`` was last used (:func:`_mark_used`), in ns; 0 if unknown."""
    try:
        return export.stat().st_mtime_ns
    except OSError:
        return 0
