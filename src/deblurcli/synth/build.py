"""The ``synth`` job: plan crops or frame windows, make pairs (in worker processes), write a manifest.

Output layout (read by training and evaluation, which pair ``blur/NAME.png`` with ``sharp/NAME.png``)::

    OUT/blur/NAME.png        blurred input, 8-bit RGB PNG
    OUT/sharp/NAME.png       sharp target, 8-bit RGB PNG, pixel-aligned with the blurred image
    OUT/kernels/NAME.npy     kernel (images mode only): float32 (S, S), sums to 1, no pickles
    OUT/manifest.jsonl       one JSON object per finished sample, sorted by (source, crop, k)
    OUT/synth.json           the settings of the job (a later run into OUT must use the same)

Reproducibility: every sample's random generator is seeded from ``(seed, source relative path,
crop/window index, k)`` through :func:`sample_seed` (BLAKE2 hash + ``numpy.random.SeedSequence``),
so the same arguments give byte-identical files whatever the number of workers. Re-running resumes:
samples already in the manifest whose files exist are skipped; the manifest is appended line by line
while running (an interrupted partial line is dropped on the next run) and rewritten atomically,
sorted and without duplicates, at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deblurcli.errors import DatasetError, DeblurcliError, ImageReadError
from deblurcli.images import (
    IMAGE_SUFFIXES,
    atomic_write_bytes,
    image_size,
    in_frame_order,
    list_images,
    read_image,
    scan_folder,
    write_image,
    writing,
)
from deblurcli.progress import ProgressFn, report
from deblurcli.synth.blur import BlurParams, blur_region, degrade, sample_kernel, srgb_to_linear
from deblurcli.synth.frames import average_frames, frame_windows
from deblurcli.video import VIDEO_SUFFIXES, count_frames, iter_frames

WarnFn = Callable[[str], None]
PNG_LEVEL = 1  # zlib level of the output PNGs: ~3x faster to write than 6, files ~20% larger

DF2K_HELP = (
    "DF2K is DIV2K + Flickr2K (3,550 2K-resolution photos); it is not bundled: download both "
    "sets, put their HR images in one folder and pass --src PATH (or set DEBLURCLI_DATA to the "
    "folder that contains DF2K/)"
)


@dataclass(frozen=True)
class SynthConfig:
    """Settings of one ``synth`` job.

    Attributes:
        out: output folder.
        src: folder of sharp photos (images mode), searched recursively.
        frames: folder of consecutive frames, or of sequence folders (frames mode).
        crop: crop side in pixels (images mode: required; frames mode: ``None`` = full frames).
        stride: step between crops of the crop grid (images mode).
        per_crop: number of differently blurred samples per crop (images mode).
        seed: run seed; each sample's generator derives from it (see :func:`sample_seed`).
        workers: worker processes (1 = in this process); does not change the output.
        limit: cap on the number of pairs (the first ones in manifest order), ``None`` = all.
        frame_range: inclusive range of the (odd) number of averaged frames.
        frame_step: frames between the starts of consecutive windows (``None`` = upper end of
            ``frame_range``, i.e. windows do not overlap).
        blur: blur-kernel and noise ranges (images mode).
    """

    out: Path
    src: Path | None = None
    frames: Path | None = None
    crop: int | None = 512
    stride: int = 384
    per_crop: int = 1
    seed: int = 0
    workers: int = 1
    limit: int | None = None
    frame_range: tuple[int, int] = (7, 13)
    frame_step: int | None = None
    blur: BlurParams = field(default_factory=BlurParams)

    @property
    def mode(self) -> str:
        """``"images"`` or ``"frames"``."""
        return "frames" if self.frames is not None else "images"

    def fingerprint(self) -> dict:
        """The settings that determine the output (not ``workers`` or ``limit``), JSON-ready."""
        d = {"mode": self.mode, "seed": self.seed, "crop": self.crop}
        if self.mode == "images":
            d.update(
                src=str(Path(self.src).resolve()),
                stride=self.stride,
                per_crop=self.per_crop,
                blur=asdict(self.blur),
            )
        else:
            d.update(
                frames=str(Path(self.frames).resolve()),
                frame_range=list(self.frame_range),
                frame_step=self.effective_frame_step,
            )
        return json.loads(json.dumps(d))

    @property
    def effective_frame_step(self) -> int:
        """Frame step actually used."""
        return int(self.frame_step) if self.frame_step else int(self.frame_range[1])


@dataclass
class SynthResult:
    """What a job did (for the CLI summary)."""

    out: Path
    mode: str
    planned: int = 0
    written: int = 0
    already_done: int = 0
    unreadable: list[str] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pairs_per_second(self) -> float:
        """Throughput of this run (written pairs per wall-clock second)."""
        return self.written / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# seeds, names, crop plans


def _bytes(text: str) -> bytes:
    """``text`` in UTF-8, a file name's bytes that are not UTF-8 as they were (``os.fsencode``
    on POSIX): a name such as ``caf\\xe9.png`` stopped the whole run."""
    return text.encode("utf-8", "surrogateescape")


def sample_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for one sample, derived from the run seed and stable keys.

    Uses a BLAKE2b digest of the keys (never Python's ``hash()``, which changes between processes)
    as the spawn key of a ``numpy.random.SeedSequence`` with entropy ``seed``.
    """
    digest = hashlib.blake2b(
        _bytes("\x1f".join(str(k) for k in keys)), digest_size=16
    ).digest()
    words = tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=words).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def crop_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Crop grid ``(x, y, w, h)`` over an image, row by row.

    Crops start every ``stride`` pixels and a last crop is aligned with the right/bottom edge so the
    whole image is covered. Small-image rule: if the image is smaller than ``crop`` in a dimension,
    that dimension gets one centred crop of the largest multiple of 8 that fits (so a 300×700 image
    with crop 512 gives 296×512 crops). Images under 8 pixels in a dimension give no crop.
    """

    def axis(n: int) -> list[tuple[int, int]]:
        if n >= crop:
            starts = list(range(0, n - crop + 1, stride))
            if starts[-1] != n - crop:
                starts.append(n - crop)
            return [(s, crop) for s in starts]
        size = (n // 8) * 8
        return [((n - size) // 2, size)] if size >= 8 else []

    return [(x, y, w, h) for (y, h) in axis(height) for (x, w) in axis(width)]


def _unique_stems(stems: dict[str, str]) -> dict[str, str]:
    """Make output stems unique: a stem shared by several sources gets ``_`` + 8 hex digits of the
    SHA-1 of its source path (stable across runs and machines), so no sample overwrites another."""
    counts: dict[str, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {
        rel: stem if counts[stem] == 1 else f"{stem}_{hashlib.sha1(_bytes(rel)).hexdigest()[:8]}"
        for rel, stem in stems.items()
    }


def _base_names(rels: list[str]) -> dict[str, str]:
    """File-name stems for source images: relative path without suffix, '/' -> '__', made unique."""
    return _unique_stems({r: r.rsplit(".", 1)[0].replace("/", "__")
                          if "." in r.rsplit("/", 1)[-1] else r.replace("/", "__") for r in rels})


def _sort_key(record: dict) -> tuple:
    return (
        Path(record["source"]).parts,
        int(record.get("crop_index", record.get("window", 0))),
        int(record.get("k", 0)),
        record["name"],
    )


# --------------------------------------------------------------------------------------------
# source lookup


def resolve_source(arg: str, *, env: dict | None = None, videos: bool = False) -> Path:
    """Find the source folder for ``--src``/``--frames``.

    An existing folder is used as is; with ``videos`` (``--frames``), so is a video file. A bare
    name (no path separator), e.g. ``DF2K``, is looked up
    in the working directory and then in ``$DEBLURCLI_DATA``. Raises :class:`DatasetError` saying
    where it looked (and what DF2K is, for that name).
    """
    env = os.environ if env is None else env
    p = Path(arg).expanduser()
    if p.is_dir():
        return p
    if videos and p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
        return p
    if p.exists():
        what = "a folder of frames or a video file" if videos else "a folder of images"
        raise DatasetError(f"{arg} is a file, not {what}")
    looked = [str(Path.cwd() / arg)]
    name = arg.rstrip("/" + os.sep)  # "DF2K/" is the bare name DF2K too
    bare = bool(name) and "/" not in name and os.sep not in name
    if bare:
        data = env.get("DEBLURCLI_DATA")
        if data:
            cand = Path(data).expanduser() / name
            if cand.is_dir():
                return cand
            looked.append(str(cand))
        else:
            looked.append("$DEBLURCLI_DATA/" + arg + " (DEBLURCLI_DATA is not set)")
    msg = f"source folder {arg!r} not found (looked in: {'; '.join(looked)})"
    if arg.strip("/").upper() == "DF2K":
        msg += f"; {DF2K_HELP}"
    raise DatasetError(msg)


# --------------------------------------------------------------------------------------------
# manifest


def _read_manifest(path: Path) -> list[dict]:
    """Valid records of an existing manifest (a partial or broken line is dropped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("name"), str) and "source" in rec:
            records.append(rec)
    return records


_PARTIAL_GLOB = ".video-*.jsonl"


def _partial_log(out: Path, video: str) -> Path:
    """Where the video task of ``video`` records its pairs as it goes."""
    return out / f".video-{hashlib.blake2b(_bytes(video), digest_size=8).hexdigest()}.jsonl"


def _partial_records(out: Path) -> list[dict]:
    """The pairs recorded by video tasks that did not finish (a run interrupted or killed)."""
    return [rec for path in sorted(out.glob(_PARTIAL_GLOB)) for rec in _read_manifest(path)]


def _remove_partial(out: Path) -> None:
    for path in out.glob(_PARTIAL_GLOB):
        path.unlink(missing_ok=True)


def _files_exist(out: Path, rec: dict) -> bool:
    paths = [out / "blur" / f"{rec['name']}.png", out / "sharp" / f"{rec['name']}.png"]
    if rec.get("kernel_file"):
        paths.append(out / rec["kernel_file"])
    return all(p.is_file() for p in paths)


def _dumps(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))


def _write_manifest(path: Path, records: Iterable[dict]) -> None:
    text = "".join(_dumps(r) + "\n" for r in sorted(records, key=_sort_key))
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# work units (module-level so that spawn-started worker processes can import them)


def _save_pair(
    out: Path, name: str, blurred: np.ndarray, sharp: np.ndarray, kernel: np.ndarray | None
) -> None:
    if kernel is not None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(kernel, dtype=np.float32), allow_pickle=False)
        with writing(path := out / "kernels" / f"{name}.npy"):
            atomic_write_bytes(path, buf.getvalue())
    for folder, pixels in (("sharp", sharp), ("blur", blurred)):
        with writing(path := out / folder / f"{name}.png"):
            write_image(path, pixels, compress_level=PNG_LEVEL)


def run_image_task(out: str, path: str, specs: list[dict], blur: BlurParams) -> dict:
    """Make every sample of one source image. Returns ``{"records": [...], "error": str | None}``."""
    try:
        pixels = read_image(path).pixels
    except ImageReadError as exc:
        return {"records": [], "error": str(exc)}
    linear = srgb_to_linear(pixels)
    out_p = Path(out)
    records = []
    for spec in specs:
        x, y, w, h = spec["box"]
        if y + h > pixels.shape[0] or x + w > pixels.shape[1]:
            return {
                "records": records,
                "error": f"cannot read {path}: decoded size differs from its header",
            }
        rng = np.random.default_rng(spec["seed"])
        kernel, kmeta = sample_kernel(rng, blur)
        blurred = blur_region(pixels, (x, y, w, h), kernel, linear=linear)
        blurred, nmeta = degrade(blurred, rng, blur.noise)
        sharp = pixels[y : y + h, x : x + w]
        _save_pair(out_p, spec["name"], blurred, sharp, kernel)
        records.append(
            {
                "name": spec["name"],
                "mode": "images",
                "source": spec["source"],
                "crop_box": [x, y, w, h],
                "crop_index": spec["crop_index"],
                "k": spec["k"],
                "seed": spec["seed"],
                "run_seed": spec["run_seed"],
                "kernel_file": f"kernels/{spec['name']}.npy",
                "kernel": kmeta,
                "noise": nmeta,
            }
        )
    return {"records": records, "error": None}


def run_frames_task(out: str, spec: dict, crop: int | None) -> dict:
    """Average one frame window (and optionally crop it). Returns like :func:`run_image_task`."""
    try:
        frames = [read_image(p).pixels for p in spec["frame_paths"]]
    except ImageReadError as exc:
        return {"records": [], "error": str(exc)}
    return _window_pair(Path(out), spec, frames, crop)


def run_video_task(out: str, path: str, specs: list[dict], crop: int | None,
                   log: str | None = None) -> dict:
    """Make every window of one video file, decoding it once from the start and holding only the
    frames of the windows in progress. Returns like :func:`run_image_task`.

    Each pair's record is also appended to ``log`` (made on the first one) once its files are
    written: a long video interrupted keeps the pairs it finished (:func:`_partial_records`).
    """
    pending = sorted(specs, key=lambda s: s["frames"][0])
    records: list[dict] = []
    held: dict[int, np.ndarray] = {}
    last = -1
    log_file = None
    try:
        for index, pixels in iter_frames(Path(path)):
            last = index
            if not pending:
                break
            if index >= pending[0]["frames"][0]:
                held[index] = pixels
            while pending and pending[0]["frames"][-1] <= index:
                spec = pending.pop(0)
                res = _window_pair(Path(out), spec, [held[i] for i in spec["frames"]], crop)
                if res["error"]:
                    return {"records": records, "error": res["error"]}
                records.extend(res["records"])
                if log is not None:
                    if log_file is None:
                        log_file = open(log, "a", encoding="utf-8")  # noqa: SIM115
                    log_file.writelines(_dumps(rec) + "\n" for rec in res["records"])
                    log_file.flush()
                first_needed = pending[0]["frames"][0] if pending else index + 1
                held = {i: f for i, f in held.items() if i >= first_needed}
    except ImageReadError as exc:
        return {"records": records, "error": str(exc)}
    finally:
        if log_file is not None:
            log_file.close()
    if pending:
        return {"records": records,
                "error": f"video {path}: only {last + 1} frames could be decoded; "
                         f"{len(pending)} window(s) after frame {last} skipped"}
    return {"records": records, "error": None}


def _window_pair(out: Path, spec: dict, frames: list[np.ndarray], crop: int | None) -> dict:
    """Average one window's frames, crop, save the pair; returns like :func:`run_image_task`."""
    try:
        blurred, sharp = average_frames(frames)
    except ValueError as exc:  # frames of different sizes
        return {"records": [], "error": f"sequence {spec['source']}: {exc}"}
    H, W = sharp.shape[:2]
    rng = np.random.default_rng(spec["seed"])
    if crop:
        ch = crop if H >= crop else (H // 8) * 8
        cw = crop if W >= crop else (W // 8) * 8
        if ch < 8 or cw < 8:
            return {
                "records": [],
                "error": f"sequence {spec['source']}: frames are smaller than 8 pixels",
            }
        y = int(rng.integers(0, H - ch + 1))
        x = int(rng.integers(0, W - cw + 1))
        box = [x, y, cw, ch]
        blurred, sharp = blurred[y : y + ch, x : x + cw], sharp[y : y + ch, x : x + cw]
    else:
        box = [0, 0, W, H]
    _save_pair(out, spec["name"], blurred, sharp, None)
    rec = {
        "name": spec["name"],
        "mode": "frames",
        "source": spec["source"],
        "window": spec["window"],
        "frames": spec["frames"],
        "num_frames": len(spec["frames"]),
        "sharp_frame": spec["frames"][len(spec["frames"]) // 2],
        "crop_box": box,
        "seed": spec["seed"],
        "run_seed": spec["run_seed"],
    }
    return {"records": [rec], "error": None}


# --------------------------------------------------------------------------------------------
# planning


def _plan_images(cfg: SynthConfig, src: Path, warn: WarnFn, result: SynthResult) -> list[dict]:
    out_abs = Path(cfg.out).resolve()

    skipped: list[tuple[Path, str]] = []
    paths = list_images(src, recursive=True, on_skip=lambda p, why: skipped.append((p, why)))
    for path, why in skipped:
        if not path.resolve().is_relative_to(out_abs):
            warn(f"skipping {path}: {why}")
    inside = {p: p.resolve() for p in paths}  # --out inside --src: its files are not sources
    inside = {p: where for p, where in inside.items() if where.is_relative_to(out_abs)}
    theirs = [p for p, where in inside.items() if not any(
        where.is_relative_to(out_abs / sub) for sub in ("blur", "sharp"))]
    if theirs:
        warn(f"leaving out {len(theirs)} image(s) inside --out {cfg.out} (e.g. {theirs[0]}): "
             "the output folder is not read as a source")
    paths = [p for p in paths if p not in inside]
    if not paths:
        raise DatasetError(
            f"no images found in {src} (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    paths.sort(key=lambda p: p.relative_to(src).parts)
    rels = [p.relative_to(src).as_posix() for p in paths]
    names = _base_names(rels)
    specs = []
    for p, rel in zip(paths, rels, strict=True):
        try:
            h, w = image_size(p)
        except ImageReadError as exc:
            warn(str(exc))
            result.unreadable.append(str(exc))
            continue
        boxes = crop_boxes(h, w, int(cfg.crop), cfg.stride)
        if not boxes:
            warn(f"skipping {p}: smaller than 8 pixels ({w}x{h})")
            result.too_small.append(str(p))
            continue
        for i, box in enumerate(boxes):
            for k in range(cfg.per_crop):
                specs.append(
                    {
                        "name": f"{names[rel]}_c{i:03d}_k{k}",
                        "source": rel,
                        "path": str(p),
                        "box": list(box),
                        "crop_index": i,
                        "k": k,
                        "run_seed": cfg.seed,
                        "seed": sample_seed(cfg.seed, rel, i, k),
                    }
                )
    if not specs:
        raise DatasetError(f"none of the {len(paths)} images in {src} could be used")
    return specs


def _sequences(root: Path, warn: WarnFn, out: Path) -> list[tuple[str, list[Path] | Path]]:
    """Every sequence under ``root``: ``(relative path, frame files)`` for each folder that holds
    frames, ``(relative path, video file)`` for each video file (``root`` itself may be one).
    The output folder ``out``, when inside ``root``, is not read."""
    if root.is_file():
        return [(".", root)]
    out_abs = out.resolve()
    skip_out = out_abs.is_relative_to(root.resolve())
    folders = [root] + sorted(
        (
            d
            for d in root.rglob("*")
            if d.is_dir() and not any(s.startswith(".") for s in d.relative_to(root).parts)
            and not (skip_out and d.resolve().is_relative_to(out_abs))
        ),
        key=lambda d: d.relative_to(root).parts,
    )
    seqs: list[tuple[str, list[Path] | Path]] = []
    for d in folders:
        listing = scan_folder(d, suffixes=IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        skipped = [(p, f"not an image or video (suffix {p.suffix or 'none'!r})")
                   for p in listing.others]
        for p, why in sorted(skipped + listing.problems):
            warn(f"skipping {p}: {why}")
        frames = in_frame_order(p for p, _ in listing.images
                                if p.suffix.lower() in IMAGE_SUFFIXES)
        if frames:
            seqs.append((d.relative_to(root).as_posix(), frames))
        seqs.extend((p.relative_to(root).as_posix(), p) for p, _ in listing.images
                    if p.suffix.lower() in VIDEO_SUFFIXES)
    return seqs


def _stem(rel: str, source: list[Path] | Path, root: Path) -> str:
    if rel == ".":
        return (root.stem if isinstance(source, Path) else root.resolve().name) or "frames"
    if isinstance(source, Path):  # a video: its path without the suffix
        rel = rel.rsplit(".", 1)[0]
    return rel.replace("/", "__")


def _plan_frames(cfg: SynthConfig, root: Path, warn: WarnFn, result: SynthResult) -> list[dict]:
    seqs = _sequences(root, warn, Path(cfg.out))
    if not seqs:
        raise DatasetError(
            f"no frames found in {root} (expected a folder of consecutive frames "
            "or a folder of sequence folders)"
        )
    specs = []
    lo = cfg.frame_range[0] + (cfg.frame_range[0] % 2 == 0)  # windows use odd frame counts
    stems = _unique_stems({rel: _stem(rel, source, root) for rel, source in seqs})
    for rel, frames in seqs:
        where = root if rel == "." else root / rel
        if isinstance(frames, Path):  # a video file
            try:
                count = count_frames(frames)
            except ImageReadError as exc:
                warn(str(exc))
                result.unreadable.append(str(exc))
                continue
        else:
            count = len(frames)
        rng = np.random.default_rng(sample_seed(cfg.seed, "windows", rel))
        windows = frame_windows(
            count, rng, n_range=cfg.frame_range, step=cfg.effective_frame_step
        )
        if not windows:
            warn(f"skipping sequence {where}: {count} frames, fewer than {lo}")
        stem = stems[rel]
        for i, win in enumerate(windows):
            if isinstance(frames, Path):  # frames by number (0-based, in presentation order)
                specs.append({
                    "name": f"{stem}_w{i:04d}",
                    "source": rel if rel != "." else frames.name,
                    "window": i,
                    "frames": list(range(win.start, win.start + win.length)),
                    "video_path": str(frames),
                    "run_seed": cfg.seed,
                    "seed": sample_seed(cfg.seed, rel, i),
                })
                continue
            chosen = frames[win.start : win.start + win.length]
            specs.append(
                {
                    "name": f"{stem}_w{i:04d}",
                    "source": rel,
                    "window": i,
                    "frames": [f.relative_to(root).as_posix() for f in chosen],
                    "frame_paths": [str(f) for f in chosen],
                    "run_seed": cfg.seed,
                    "seed": sample_seed(cfg.seed, rel, i),
                }
            )
    if not specs:
        unreadable = f" ({len(result.unreadable)} unreadable: {result.unreadable[0]})" \
            if result.unreadable else ""
        raise DatasetError(f"no sequence in {root} has at least {lo} frames{unreadable}")
    # in manifest order (a folder's videos were planned before its sub-folders): --limit M
    # takes the first M samples of a full run's manifest
    specs.sort(key=lambda spec: (Path(spec["source"]).parts, spec["window"]))
    return specs


# --------------------------------------------------------------------------------------------
# the job


def _check_out(cfg: SynthConfig) -> None:
    """Refuse an output folder that is a file or the source itself; in images mode also one
    that holds the source (every photo would then be skipped as an output, see
    :func:`_plan_images`), in frames mode frames inside the output's pair folders (pairs would
    be written among them). An output inside the source is fine: it is never read as input."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DeblurcliError(f"--out must be a folder, but {out} is a file")
    flag, source = ("--src", cfg.src) if cfg.mode == "images" else ("--frames", cfg.frames)
    where, inside = Path(source).resolve(), out.resolve()
    if where == inside:
        raise DeblurcliError(f"--out must differ from {flag}, but both are {out}; write the pairs "
                             "to another folder")
    if cfg.mode == "images" and where.is_relative_to(inside):
        raise DeblurcliError(f"--out must not hold {flag}, but {source} is inside {out}; write "
                             "the pairs to another folder")
    pair_folders = [inside / sub for sub in ("blur", "sharp", "kernels")]
    if cfg.mode != "images" and any(where.is_relative_to(f) for f in pair_folders):
        raise DeblurcliError(f"{flag} {source} lies in a folder of pairs that --out {out} "
                             "writes (blur/, sharp/, kernels/); write the pairs to another folder")


def _check_settings(cfg: SynthConfig) -> None:
    settings = cfg.out / "synth.json"
    fp = cfg.fingerprint()
    if settings.exists():
        try:
            old = json.loads(settings.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old != fp:
            raise DatasetError(
                f"{cfg.out} was made with different synth settings (see "
                f"{settings}); use a new --out folder or the same settings"
            )
    else:
        atomic_write_bytes(settings, (json.dumps(fp, indent=2, sort_keys=True) + "\n").encode())


def run_synth(
    cfg: SynthConfig, *, progress: ProgressFn | None = None, warn: WarnFn | None = None
) -> SynthResult:
    """Run a ``synth`` job (see the module docstring for the layout and guarantees).

    Raises :class:`DatasetError` for a missing/empty source, an output folder made with other
    settings, or a job that makes no pair at all (nor found any made before): the output files
    and folders it created are then removed again. Unreadable images are reported through
    ``warn`` and listed in the result.
    """
    warn = warn or (lambda _msg: None)
    started = time.perf_counter()
    result = SynthResult(out=cfg.out, mode=cfg.mode)
    if cfg.seed < 0:
        raise DatasetError(f"--seed must be >= 0 (got {cfg.seed})")
    if cfg.mode == "images":
        if cfg.src is None:
            raise DatasetError(
                "give --src (a folder of photos) or --frames (a folder of video frames)"
            )
        if not cfg.crop:
            raise DatasetError("images mode needs a crop size")
        _check_out(cfg)
        specs = _plan_images(cfg, Path(cfg.src), warn, result)
    else:
        _check_out(cfg)
        specs = _plan_frames(cfg, Path(cfg.frames), warn, result)
    planned_names = {s["name"] for s in specs}
    planned_sources = {s["source"] for s in specs}
    if cfg.limit is not None:
        specs = specs[: max(0, int(cfg.limit))]
    result.planned = len(specs)

    new_folders = _missing_folders(cfg.out)
    manifest, settings = cfg.out / "manifest.jsonl", cfg.out / "synth.json"
    new_files = [p for p in (manifest, settings) if not p.exists()]
    done: dict[str, dict] = {}
    todo: list[dict] = []
    running = False  # pairs are being written: those not recorded are removed on failure
    try:
        with writing(cfg.out):
            cfg.out.mkdir(parents=True, exist_ok=True)
        with writing(settings):
            _check_settings(cfg)
        _remove_temporary(cfg.out)  # of a run killed while it wrote
        for rec in _read_manifest(manifest) + _partial_records(cfg.out):
            if rec["source"] in planned_sources and rec["name"] not in planned_names:
                _remove_pair(cfg.out, rec["name"])  # its source's name changed: made again
            elif _files_exist(cfg.out, rec):
                done[rec["name"]] = rec
        todo = [s for s in specs if s["name"] not in done]
        result.already_done = len(specs) - len(todo)
        with writing(manifest):  # drop broken lines / duplicates before appending
            _write_manifest(manifest, done.values())
        _remove_partial(cfg.out)  # (now in the manifest)

        if cfg.mode == "images":
            groups: dict[str, list[dict]] = {}
            for s in todo:
                groups.setdefault(s["path"], []).append(s)
            tasks = [(run_image_task, (str(cfg.out), path, g, cfg.blur)) for path, g in groups.items()]
        else:
            videos: dict[str, list[dict]] = {}
            tasks = []
            for s in todo:
                if "video_path" in s:
                    videos.setdefault(s["video_path"], []).append(s)
                else:
                    tasks.append((run_frames_task, (str(cfg.out), s, cfg.crop)))
            tasks += [(run_video_task, (str(cfg.out), path, g, cfg.crop,
                                        str(_partial_log(cfg.out, path))))
                      for path, g in videos.items()]

        report(progress, "pairs", 0, len(todo))
        with writing(manifest):
            mf = open(manifest, "a", encoding="utf-8")
        running = True
        with mf:

            def consume(res: dict) -> None:
                for rec in res["records"]:
                    with writing(manifest):
                        mf.write(_dumps(rec) + "\n")
                        mf.flush()
                    done[rec["name"]] = rec
                    result.written += 1
                if res["error"]:
                    warn(res["error"])
                    result.unreadable.append(res["error"])
                report(progress, "pairs", result.written, len(todo))

            if cfg.workers <= 1 or len(tasks) <= 1:
                for fn, args in tasks:
                    consume(fn(*args))
            else:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
                    futures = [pool.submit(fn, *args) for fn, args in tasks]
                    try:
                        for fut in futures:  # submission order: deterministic manifest appends
                            consume(fut.result())
                    except BaseException:
                        for fut in futures:
                            fut.cancel()
                        raise
    except BaseException:  # a failed write, Ctrl-C: as below when not one pair exists
        if running:
            try:
                _keep_partial(cfg.out, manifest, done)
            finally:  # (on a full disk, recording them fails too: their files go then)
                _remove_unfinished(cfg.out, todo, done)
        if not done:
            _remove_new(new_files, new_folders)
        raise
    if not done:  # not one pair, now or before: no output, and leave none of it behind
        _remove_partial(cfg.out)
        _remove_unfinished(cfg.out, todo, done)
        _remove_new(new_files, new_folders)
        source = cfg.src if cfg.mode == "images" else cfg.frames
        why = f": {result.unreadable[0]}" if result.unreadable else ""
        more = f" (and {len(result.unreadable) - 1} more)" if len(result.unreadable) > 1 else ""
        raise DatasetError(f"no pairs could be made from {source}{why}{more}")
    with writing(manifest):
        _write_manifest(manifest, done.values())
    _remove_partial(cfg.out)  # (their records are in the manifest)
    result.seconds = time.perf_counter() - started
    return result


_PAIR_FILES = (("blur", ".png"), ("sharp", ".png"), ("kernels", ".npy"))


def _remove_pair(out: Path, name: str) -> None:
    """The files of the pair ``name`` (those that exist)."""
    for sub, suffix in _PAIR_FILES:
        (out / sub / f"{name}{suffix}").unlink(missing_ok=True)


def _keep_partial(out: Path, manifest: Path, done: dict[str, dict]) -> None:
    """Record the pairs the interrupted video tasks finished (in ``done`` and the manifest)."""
    found = [rec for rec in _partial_records(out) if rec["name"] not in done
             and _files_exist(out, rec)]
    if found:
        done.update((rec["name"], rec) for rec in found)
        with writing(manifest):
            _write_manifest(manifest, done.values())
    _remove_partial(out)


def _remove_unfinished(out: Path, todo: list[dict], done: dict[str, dict]) -> None:
    """The files of pairs this job set out to make but did not record (a pair's blurred image
    written, its sharp one not): training reads the folders, not the manifest, and would take
    them. Each folder is listed once (not three look-ups per pair: seconds for 100k pairs)."""
    unfinished = {spec["name"] for spec in todo} - done.keys()
    for sub, suffix in _PAIR_FILES:
        folder = out / sub
        if not unfinished or not folder.is_dir() or folder.is_symlink():
            continue
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            if name.endswith(suffix) and name[:-len(suffix)] in unfinished:
                (folder / name).unlink(missing_ok=True)


def _remove_temporary(out: Path) -> None:
    """Temporary files (``.NAME.*.part``) a killed run left in the pair folders."""
    for sub, _ in _PAIR_FILES:
        folder = out / sub
        if folder.is_dir() and not folder.is_symlink():
            for path in folder.glob(".*.part"):
                path.unlink(missing_ok=True)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_new(files: list[Path], folders: list[Path]) -> None:
    """Undo a job that made no pair: remove the ``files`` it created (its settings and an empty
    manifest), the ``blur/``, ``sharp/`` and ``kernels/`` of the ``folders`` it created (what
    they hold is this job's: the parts of a pair it did not finish), then those folders
    (innermost first) as far as they are empty. Nothing in a folder that existed before the job
    but its settings and manifest is touched."""
    import shutil

    for path in files:
        path.unlink(missing_ok=True)
    for folder in folders:
        for sub in ("blur", "sharp", "kernels"):
            if (folder / sub).is_dir() and not (folder / sub).is_symlink():
                shutil.rmtree(folder / sub, ignore_errors=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
