"""Paired training data: discovery, early validation, and a seeded, resumable torch Dataset.

Sources (one main source per run, optionally mixed with frames at a set fraction):

* **GoPro**: ``ROOT/{train,test}/SEQ/{blur,sharp}/*.png``;
* **RealBlur** list files: one ``gt blur`` path pair per line, relative to the dataset root;
* **synth** output: ``OUT/blur/NAME.png`` + ``OUT/sharp/NAME.png``;
* **folders**: ``--blur DIR --sharp DIR`` paired by relative path;
* **sharp photos**: blurred on the fly with random camera-shake kernels (``synth.blur``);
* **frame folders**: consecutive video frames averaged on the fly (``synth.frames``).

Every sample is a pure function of ``(seed, position)``, where ``position`` counts samples drawn
since the start of training: the epoch order is a seeded permutation and the crop, flips, 90°
rotation and on-the-fly blur use a generator seeded by the position. Resuming at step ``s``
therefore reproduces the exact data an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deblurcli.errors import DatasetError
from deblurcli.images import in_frame_order

MAX_LISTED = 5


@dataclass(frozen=True)
class PairItem:
    """A stored blurry/sharp pair; ``group`` names the photo it was made from when several pairs
    share one (``synth`` output), so that validation holds them out together."""

    blur: Path
    sharp: Path
    group: str | None = None


@dataclass(frozen=True)
class SharpItem:
    """A sharp photo that is blurred on the fly."""

    sharp: Path


@dataclass(frozen=True)
class FramesItem:
    """Consecutive sharp frames averaged on the fly (the middle frame is the target)."""

    frames: tuple[Path, ...]


Item = PairItem | SharpItem | FramesItem


# ----------------------------------------------------------------------------- discovery
def _images(folder: Path, recursive: bool = True,
            problems: list[str] | None = None) -> list[Path]:
    """The image files in ``folder`` (and below it); with ``problems``, what cannot be read
    there is added to it: broken links, unlistable folders, and links to folders, which are not
    followed (a training set that silently lost those photos would train on less than asked)."""
    from deblurcli.images import scan_folder

    listing = scan_folder(folder, recursive=recursive)
    if problems is not None:
        problems.extend(f"{path}: {why}" for path, why in listing.problems)
        problems.extend(f"{path}: a link to a folder, not followed (give the folder itself, or "
                        "copy it in)" for path in listing.folder_links)
    return [path for path, _ in listing.images]


def _partner(folder: Path, rel: Path, listings: dict[Path, dict[str, list[str]]] | None = None
             ) -> Path | None:
    """``folder/rel`` or, failing that, a file with the same stem and another image suffix
    (``listings``: each folder's names by stem, listed once for many look-ups)."""
    from deblurcli.images import IMAGE_SUFFIXES

    exact = folder / rel
    if exact.is_file():
        return exact
    parent = (folder / rel).parent
    if parent.is_dir():
        for suffix in sorted(IMAGE_SUFFIXES):
            candidate = parent / (rel.stem + suffix)
            if candidate.is_file():
                return candidate
        listings = {} if listings is None else listings
        if parent not in listings:  # a suffix in another case (x.PNG for x.png)
            by_stem: dict[str, list[str]] = {}
            try:
                for name in sorted(os.listdir(parent)):
                    stem, dot, suffix = name.rpartition(".")
                    if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
                        by_stem.setdefault(stem, []).append(name)
            except OSError:
                pass
            listings[parent] = by_stem
        for name in listings[parent].get(rel.stem, []):
            if (parent / name).is_file():
                return parent / name
    return None


def pair_folders(blur_dir: str | Path, sharp_dir: str | Path) -> tuple[list[PairItem], list[str]]:
    """Pair ``blur_dir`` and ``sharp_dir`` by relative path; returns ``(pairs, problems)``."""
    blur_dir, sharp_dir = Path(blur_dir), Path(sharp_dir)
    for folder, flag in ((blur_dir, "blur"), (sharp_dir, "sharp")):
        if not folder.is_dir():
            raise DatasetError(f"the {flag} folder {folder} does not exist")
    pairs: list[PairItem] = []
    problems: list[str] = []
    matched: dict[Path, Path] = {}
    listings: dict[Path, dict[str, list[str]]] = {}
    blurs = _images(blur_dir, problems=problems)
    exact = {blur for blur in blurs if (sharp_dir / blur.relative_to(blur_dir)).is_file()}
    for blur in blurs:
        if blur in exact:  # same name: never taken by another suffix of its stem
            matched[(sharp_dir / blur.relative_to(blur_dir)).resolve()] = blur
    for blur in blurs:
        rel = blur.relative_to(blur_dir)
        sharp = _partner(sharp_dir, rel, listings)
        if sharp is None:
            problems.append(f"{blur}: no sharp partner in {sharp_dir}")
            continue
        if blur not in exact and sharp.resolve() in matched:  # a.png and a.jpg for one a.png
            problems.append(f"{blur}: its sharp partner {sharp} is already the partner of "
                            f"{matched[sharp.resolve()]} (two images of one name)")
            continue
        matched[sharp.resolve()] = blur
        pairs.append(PairItem(blur, sharp))
    for sharp in _images(sharp_dir, problems=problems):
        rel = sharp.relative_to(sharp_dir)
        if sharp.resolve() in matched:
            continue
        partner = _partner(blur_dir, rel, listings)
        if partner is None:
            problems.append(f"{sharp}: no blurry partner in {blur_dir}")
        else:
            problems.append(f"{sharp}: unused, its blurry partner {partner} pairs with another "
                            "image of its name")
    return pairs, problems


def gopro_pairs(root: str | Path, split: str = "train") -> tuple[list[PairItem], list[str]]:
    """GoPro pairs of ``ROOT/SPLIT/SEQ/{blur,sharp}`` (``ROOT`` may also be the split folder)."""
    root = Path(root)
    base = root / split if (root / split).is_dir() else root
    sequences = sorted(p for p in base.iterdir() if (p / "blur").is_dir()) if base.is_dir() else []
    if not sequences:
        raise DatasetError(f"{root} has no GoPro sequences (expected {root}/{split}/SEQ/blur and "
                           f"SEQ/sharp folders)")
    pairs: list[PairItem] = []
    problems: list[str] = []
    for seq in sequences:
        if not (seq / "sharp").is_dir():
            problems.append(f"{seq}: has blur/ but no sharp/ folder")
            continue
        seq_pairs, seq_problems = pair_folders(seq / "blur", seq / "sharp")
        pairs += seq_pairs
        problems += seq_problems
    return pairs, problems


def realblur_pairs(list_file: str | Path, root: str | Path | None = None) \
        -> tuple[list[PairItem], list[str]]:
    """Pairs from a RealBlur list file (``gt blur`` per line, relative to ``root``).

    ``root`` defaults to the list file's folder.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DatasetError(f"RealBlur list file {list_file} does not exist")
    base = Path(root) if root is not None else list_file.parent
    pairs: list[PairItem] = []
    problems: list[str] = []
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"{list_file} is not a RealBlur list file (text lines of 'gt blur' "
                           "paths); --data takes that, a GoPro folder or a folder with blur/ "
                           "and sharp/") from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            problems.append(f"{list_file}:{number}: expected 'gt blur' paths")
            continue
        gt, blur = base / fields[0], base / fields[1]
        missing = [str(p) for p in (gt, blur) if not p.is_file()]
        if missing:
            problems.append(f"{list_file}:{number}: missing {', '.join(missing)}")
            continue
        pairs.append(PairItem(blur=blur, sharp=gt))
    return pairs, problems


def synth_pairs(out: str | Path) -> tuple[list[PairItem], list[str]]:
    """Pairs of a ``deblurcli synth`` output folder (``OUT/blur`` + ``OUT/sharp``)."""
    out = Path(out)
    pairs, problems = pair_folders(out / "blur", out / "sharp")
    return with_sources(pairs, out), problems


def with_sources(pairs: list[PairItem], out: Path) -> list[PairItem]:
    """``pairs`` from the ``synth`` output ``out`` with the photo each was made from as its
    group (from ``OUT/manifest.jsonl``; unchanged without one): the crops of one photo, and
    its other kernels of one crop, share pixels. Pairs of frame windows stay apart (each
    window its own frames)."""
    import json

    manifest = out / "manifest.jsonl"
    if not manifest.is_file():
        return pairs
    sources: dict[str, str] = {}
    for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("name"), str) and \
                record.get("mode", "images") == "images":  # frame windows: neighbours, apart
            sources[record["name"]] = str(record.get("source"))
    return [PairItem(p.blur, p.sharp, sources.get(p.blur.stem)) for p in pairs]


def _paired_folder(folder: Path) -> Path | None:
    """A ``blur`` folder with a ``sharp`` beside it anywhere below ``folder`` (pairs), or None."""
    for blur in sorted(folder.rglob("blur")):
        if blur.is_dir() and (blur.parent / "sharp").is_dir() and not any(
                part.startswith(".") for part in blur.relative_to(folder).parts):
            return blur
    return None


def sharp_photo_items(folder: str | Path) -> tuple[list[SharpItem], list[str]]:
    """Every image below ``folder``, to be blurred on the fly; returns ``(items, problems)``
    (entries that cannot be read, links to folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"the sharp-photo folder {folder} does not exist")
    try:
        layout = detect_layout(folder)
    except DatasetError:
        layout = None
    if layout in ("synth", "gopro"):  # its blurred images would be trained on as sharp ones
        raise DatasetError(f"--sharp-photos {folder} holds pairs of blurred and sharp images "
                           f"(a {layout} layout): give them as --data {folder}, or a folder of "
                           "sharp photos only")
    paired = _paired_folder(folder)
    if paired is not None:
        raise DatasetError(f"--sharp-photos {folder} holds blurred images ({paired}, beside "
                           f"{paired.parent / 'sharp'}), which would be trained on as sharp "
                           "ones: give a folder of sharp photos only")
    problems: list[str] = []
    return [SharpItem(p) for p in _images(folder, problems=problems)], problems


def _clip_folders(folder: Path) -> list[Path]:
    """``folder`` and every folder below it (not hidden ones), sorted: where clips' frames may
    be. A ``blur`` folder beside a ``sharp`` one among them is refused (pairs, not frames)."""
    clips = [folder] + sorted(p for p in folder.rglob("*") if p.is_dir() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
    paired = next((p for p in clips if p.name == "blur" and (p.parent / "sharp").is_dir()), None)
    if paired is not None:
        raise DatasetError(f"--frames {folder} holds pairs of blurred and sharp images "
                           f"({paired}): frames are consecutive sharp video frames; give "
                           "pairs with --data")
    return clips


def frame_items(folder: str | Path, frames_per_blur: int = 7) -> list[FramesItem]:
    """Non-overlapping windows of ``frames_per_blur`` consecutive frames.

    ``folder`` holds frames directly or one sub-folder of frames per clip (in the order of the
    numbers in their names).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"the frame folder {folder} does not exist")
    if frames_per_blur < 1 or frames_per_blur % 2 == 0:
        raise DatasetError(f"frames per blurred image must be odd (got {frames_per_blur})")
    clips = _clip_folders(folder)
    items: list[FramesItem] = []
    longest = 0
    for clip in clips:
        frames = in_frame_order(_images(clip, recursive=False))
        longest = max(longest, len(frames))
        for start in range(0, len(frames) - frames_per_blur + 1, frames_per_blur):
            items.append(FramesItem(tuple(frames[start:start + frames_per_blur])))
    if not items and longest:  # beside another source it would have been dropped unsaid
        raise DatasetError(f"no clip in the frame folder {folder} has {frames_per_blur} frames "
                           f"for one blurred image (the longest has {longest}); lower "
                           "--frames-per-blur")
    if not items:
        raise DatasetError(f"the frame folder {folder} holds no frame images (training reads "
                           "frames as image files; make pairs of video files with deblurcli "
                           "synth --frames)")
    return items


def detect_layout(path: str | Path, split: str = "train") -> str:
    """``gopro``, ``realblur`` or ``synth`` for a ``--data`` path.

    Raises:
        DatasetError: the layout cannot be recognised.
    """
    path = Path(path)
    if path.is_file():
        return "realblur"
    if not path.is_dir():
        raise DatasetError(f"dataset {path} does not exist")
    if (path / "blur").is_dir() and (path / "sharp").is_dir():
        return "synth"
    for base in (path / split, path):
        if base.is_dir() and any((p / "blur").is_dir() for p in base.iterdir() if p.is_dir()):
            return "gopro"
    raise DatasetError(f"cannot tell the layout of {path}: expected GoPro ({path}/{split}/SEQ/"
                       f"blur), a synth folder ({path}/blur + {path}/sharp) or a RealBlur list "
                       "file")


def discover(*, data: str | None = None, layout: str = "auto", split: str = "train",
             data_root: str | None = None, blur: str | None = None,
             sharp: str | None = None, sharp_photos: str | None = None,
             frames: str | None = None, frames_per_blur: int = 7) -> tuple[list[Item], list[str]]:
    """Find the training items of the sources given; returns ``(items, problems)``.

    One main source (``data``, ``blur`` + ``sharp`` or ``sharp_photos``) and/or ``frames``; the
    frame windows come last (:class:`FramesItem`, so a caller can tell them apart).

    Raises:
        DatasetError: no source, two main sources, or an unrecognisable layout.
    """
    given = [name for name, value in (("--data", data), ("--blur/--sharp", blur or sharp),
                                      ("--sharp-photos", sharp_photos)) if value]
    if not given and not frames:
        raise DatasetError("no training data: give --data, --blur and --sharp, --sharp-photos "
                           "or --frames")
    if len(given) > 1:
        raise DatasetError(f"give one data source, not {' and '.join(given)} (--frames may be "
                           "added to any of them)")
    items: list[Item] = []
    problems: list[str] = []
    if blur or sharp:
        if not (blur and sharp):
            raise DatasetError("--blur and --sharp must be given together")
        items, problems = pair_folders(blur, sharp)
        if Path(blur).resolve().parent == Path(sharp).resolve().parent:  # synth's OUT/{blur,sharp}
            items = with_sources(items, Path(blur).resolve().parent)
    elif sharp_photos:
        items, problems = sharp_photo_items(sharp_photos)
    elif data:
        kind = detect_layout(data, split) if layout == "auto" else layout
        if kind == "gopro":
            items, problems = gopro_pairs(data, split)
        elif kind == "realblur":
            items, problems = realblur_pairs(data, data_root)
        elif kind in ("synth", "folders"):
            items, problems = synth_pairs(data)
        else:
            raise DatasetError(f"unknown dataset layout {kind!r}")
    if frames:
        items = list(items) + list(frame_items(frames, frames_per_blur))
    return items, problems


def frame_clips(folder: str | Path) -> list[list[Path]]:
    """Every clip below ``folder`` as its sorted list of frames (``folder`` itself and each
    sub-folder holding frames is one clip), for training that draws its own windows."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"the frame folder {folder} does not exist")
    clips = _clip_folders(folder)
    return [frames for frames in (in_frame_order(_images(c, recursive=False)) for c in clips)
            if frames]


def item_paths(item: Item) -> tuple[Path, ...]:
    """All files an item reads."""
    if isinstance(item, PairItem):
        return (item.blur, item.sharp)
    if isinstance(item, SharpItem):
        return (item.sharp,)
    return item.frames


def validate_items(items: Sequence[Item], problems: Sequence[str] = (), *, min_size: int = 8,
                   source: str = "dataset") -> None:
    """Check every item before training: partners exist, sizes agree, images are big enough.

    Only image headers are read. Raises one :class:`DatasetError` listing the first offenders.
    """
    from deblurcli.errors import ImageReadError
    from deblurcli.images import image_size

    found = list(problems)
    if not items and not found:
        raise DatasetError(f"{source} contains no training images")
    for item in items:
        try:
            sizes = [image_size(p) for p in item_paths(item)]
        except ImageReadError as exc:
            found.append(str(exc))
            continue
        if len(set(sizes)) > 1:
            detail = " vs ".join(f"{p.name} {w}x{h}"
                                 for p, (h, w) in zip(item_paths(item), sizes, strict=True))
            found.append(f"size mismatch: {detail} ({item_paths(item)[0].parent})")
        elif min(sizes[0]) < min_size:
            h, w = sizes[0]
            found.append(f"{item_paths(item)[0]} is {w}x{h}, under the {min_size} px an image "
                         "needs at least")
    if found:
        shown = "; ".join(found[:MAX_LISTED])
        more = f" (+{len(found) - MAX_LISTED} more)" if len(found) > MAX_LISTED else ""
        raise DatasetError(f"{source} has {len(found)} problem(s): {shown}{more}")


def split_validation(items: Sequence[Item], count: int, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out ``count`` items (seeded choice).

    Pairs of one group (made from one photo: see :class:`PairItem`) are held out together: one
    of them validates and the others leave training, which would otherwise have seen the
    validation pixels.

    Raises:
        DatasetError: ``count`` leaves no item to train on (``--val-count`` at least the number
            of items, or of photos the pairs were made from).
    """
    items = list(items)
    if count <= 0:
        return items, []
    keys = [getattr(item, "group", None) or i for i, item in enumerate(items)]
    groups = list(dict.fromkeys(keys))
    if count >= len(groups):
        what = f"{len(items)} training pair(s)" if len(groups) == len(items) else \
            f"{len(groups)} photo(s) the {len(items)} training pairs were made from (the " \
            "pairs of one photo are held out together)"
        raise DatasetError(f"--val-count {count} holds out every one of the {what}; hold out at "
                           f"most {len(groups) - 1}, or give --val-data")
    order = np.random.default_rng([seed, 7]).permutation(len(groups))
    held = {groups[int(i)] for i in order[:count]}
    train = [it for it, key in zip(items, keys, strict=True) if key not in held]
    val, seen = [], set()
    for item, key in zip(items, keys, strict=True):
        if key in held and key not in seen:
            seen.add(key)
            val.append(item)
    return train, val


# ----------------------------------------------------------------------------- pixels
def _read(path: Path) -> np.ndarray:
    from deblurcli.images import read_image

    return read_image(path).pixels


def augment_pair(blur: np.ndarray, sharp: np.ndarray, rng: np.random.Generator, crop: int,
                 flip_rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Aligned random ``crop``×``crop`` window, horizontal/vertical flips and a 90° rotation.

    Images smaller than ``crop`` are reflect-padded first. The same draws are used for both.
    """
    blur, sharp = _pad_to(blur, crop), _pad_to(sharp, crop)
    h, w = sharp.shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    hflip, vflip, turns = rng.random() < 0.5, rng.random() < 0.5, int(rng.integers(0, 4))
    out = []
    for arr in (blur, sharp):
        arr = arr[top:top + crop, left:left + crop]
        if flip_rotate:
            if hflip:
                arr = arr[:, ::-1]
            if vflip:
                arr = arr[::-1]
            arr = np.rot90(arr, turns)
        out.append(np.ascontiguousarray(arr, dtype=np.float32))
    return out[0], out[1]


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h >= size and w >= size:
        return arr
    ph, pw = max(0, size - h), max(0, size - w)
    return np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """Central ``s``×``s`` window with ``s = min(size, H, W)`` rounded down to a multiple of 8."""
    h, w = arr.shape[:2]
    s = max(8, min(size, h, w) // 8 * 8)
    arr = _pad_to(arr, s)
    h, w = arr.shape[:2]
    top, left = (h - s) // 2, (w - s) // 2
    return np.ascontiguousarray(arr[top:top + s, left:left + s])


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` float in ``[0, 1]`` → ``(3, H, W)`` float32 in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float() * 2.0 - 1.0


def load_item(item: Item, rng: np.random.Generator,
              blur_params=None) -> tuple[np.ndarray, np.ndarray]:
    """Full-size ``(blurry, sharp)`` pixels of an item (on-the-fly items are synthesised)."""
    if isinstance(item, PairItem):
        blur, sharp = _read(item.blur), _read(item.sharp)
        if blur.shape != sharp.shape:
            raise DatasetError(f"size mismatch: {item.blur} vs {item.sharp}")
        return blur, sharp
    if isinstance(item, SharpItem):
        from deblurcli.synth.blur import random_blur_pair

        sharp = _read(item.sharp)
        blur, _, _ = random_blur_pair(sharp, rng, blur_params)
        return blur.astype(np.float32), sharp
    from deblurcli.synth.frames import average_frames

    blur, sharp = average_frames([_read(p) for p in item.frames])
    return blur, sharp


def blurred_crop(item: SharpItem, rng: np.random.Generator, side: int, *, centre: bool = False,
                 blur_params=None) -> tuple[np.ndarray, np.ndarray]:
    """``(blurry, sharp)`` of a ``side`` x ``side`` window of a sharp photo (reflect-padded to
    at least ``side``): a random window (drawn from ``rng``), or with ``centre`` the window of
    :func:`center_crop` (``side`` at most the photo's, rounded down to a multiple of 8). Only
    the window and the kernel's margin around it are blurred (a kernel drawn from ``rng``, then
    noise), not the whole photo: a 256 px crop of a 12 MP photo costs what the crop costs."""
    from deblurcli.synth.blur import BlurParams, blur_region, degrade, sample_kernel

    params = blur_params or BlurParams()
    sharp = _read(item.sharp)
    if centre:
        side = max(8, min(side, *sharp.shape[:2]) // 8 * 8)
    sharp = _pad_to(sharp, side)
    h, w = sharp.shape[:2]
    if centre:
        top, left = (h - side) // 2, (w - side) // 2
    else:
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    kernel, _ = sample_kernel(rng, params)
    blurred = blur_region(sharp, (left, top, side, side), kernel)
    blurred, _ = degrade(blurred, rng, params.noise)
    return blurred.astype(np.float32), np.ascontiguousarray(sharp[top:top + side,
                                                                  left:left + side])


# ----------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class CropSchedule:
    """Crop side as a function of the training step (the paper's progressive resolution).

    ``sizes[k]`` is used for steps ``[k·steps_each, (k+1)·steps_each)``; the last size after that.
    ``samples_per_step`` converts a sample position into a step (batch × processes × accumulation).
    """

    sizes: tuple[int, ...]
    steps_each: int
    samples_per_step: int

    def size_at_step(self, step: int) -> int:
        """Crop side for optimiser step ``step`` (0-based)."""
        return self.sizes[min(step // max(self.steps_each, 1), len(self.sizes) - 1)]

    def size_at(self, position: int) -> int:
        """Crop side for sample ``position``."""
        return self.size_at_step(position // self.samples_per_step)


class PairedDataset(Dataset):
    """Training pairs indexed by *sample position* (0, 1, 2, … forever).

    ``dataset[p]`` returns ``{"blur": (3,c,c), "sharp": (3,c,c), "position": p}`` tensors in
    ``[-1, 1]``. Epoch ``e = p // len`` visits the items in a permutation seeded by ``(seed, e)``.
    """

    def __init__(self, items: Sequence[Item], *, crop: int, seed: int, augment: bool = True,
                 schedule: CropSchedule | None = None, blur_params=None) -> None:
        if not items:
            raise DatasetError("no training items")
        self.items = list(items)
        self.crop = crop
        self.seed = seed
        self.augment = augment
        self.schedule = schedule
        self.blur_params = blur_params

    def __len__(self) -> int:
        return len(self.items)

    def index_at(self, position: int) -> int:
        """Which item sample ``position`` uses."""
        n = len(self.items)
        epoch, offset = divmod(position, n)
        return int(np.random.default_rng([self.seed, 1, epoch]).permutation(n)[offset])

    def __getitem__(self, position: int) -> dict:
        item = self.items[self.index_at(position)]
        rng = np.random.default_rng([self.seed, 2, position])
        crop = self.schedule.size_at(position) if self.schedule is not None else self.crop
        if isinstance(item, SharpItem):  # the crop first, then its blur: not the whole photo's
            blur, sharp = blurred_crop(item, rng, crop, blur_params=self.blur_params)
        else:
            blur, sharp = load_item(item, rng, self.blur_params)
        blur, sharp = augment_pair(blur, sharp, rng, crop, flip_rotate=self.augment)
        return {"blur": to_tensor(blur), "sharp": to_tensor(sharp), "position": position}


class ValidationDataset(Dataset):
    """Held-out pairs, centre-cropped to ``size`` (fixed on-the-fly blur per item)."""

    def __init__(self, items: Sequence[Item], *, size: int, seed: int, blur_params=None) -> None:
        self.items = list(items)
        self.size = size
        self.seed = seed
        self.blur_params = blur_params

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, 3, index])
        item = self.items[index]
        if isinstance(item, SharpItem):
            blur, sharp = blurred_crop(item, rng, self.size, centre=True,
                                       blur_params=self.blur_params)
            return {"blur": to_tensor(blur), "sharp": to_tensor(sharp), "index": index}
        blur, sharp = load_item(item, rng, self.blur_params)
        return {"blur": to_tensor(center_crop(blur, self.size)),
                "sharp": to_tensor(center_crop(sharp, self.size)), "index": index}


class StreamBatchSampler:
    """Endless batches of sample positions for one process of a (possibly) multi-process run.

    Micro-batch ``k`` of process ``rank`` holds positions ``((k·world + rank)·B + j)``; starting
    at ``start_batch`` resumes the stream exactly.
    """

    def __init__(self, batch_size: int, *, rank: int = 0, world: int = 1,
                 start_batch: int = 0) -> None:
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start_batch
        while True:
            base = (k * self.world + self.rank) * self.batch_size
            yield list(range(base, base + self.batch_size))
            k += 1


class MixedDataset(Dataset):
    """Two :class:`PairedDataset` streams mixed by position: sample ``p`` comes from ``real``
    with probability ``fraction`` (a seeded draw per position), else from ``main``."""

    def __init__(self, main: PairedDataset, real: PairedDataset, fraction: float,
                 seed: int) -> None:
        self.main, self.real, self.fraction, self.seed = main, real, fraction, seed

    def __len__(self) -> int:
        return len(self.main) + len(self.real)

    def __getitem__(self, position: int) -> dict:
        pick_real = np.random.default_rng([self.seed, 4, position]).random() < self.fraction
        return (self.real if pick_real else self.main)[position]
