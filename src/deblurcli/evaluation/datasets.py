"""Evaluation sets: GoPro, RealBlur-J/-R, paired folders, blur-only folders; prediction pairing.

Every pair is matched by name or relative path -- never by sort order -- and anything that does
not match is an error listing the first few offenders and their count.

Layouts (official):

* GoPro (``GOPRO_Large``): ``ROOT/test/<sequence>/blur/<name>.png`` and
  ``ROOT/test/<sequence>/sharp/<name>.png``; key ``<sequence>/<name>``.
* RealBlur-J / -R: ``ROOT/RealBlur_J_test_list.txt`` (``RealBlur_R_test_list.txt``), one pair a
  line, ``<gt path> <blur path>`` relative to ``ROOT``, e.g.
  ``RealBlur-J_ECC_IMCORR_centroid_itensity_ref/scene230/gt/gt_7.png
  RealBlur-J_ECC_IMCORR_centroid_itensity_ref/scene230/blur/blur_7.png``; key ``scene230/blur_7``.
* Folders: ``--blur DIR --sharp DIR`` (e.g. the synth layout ``OUT/blur`` + ``OUT/sharp``), paired
  by relative path without suffix; ``--blur DIR`` alone is a no-reference set.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deblurcli.errors import DatasetError
from deblurcli.images import list_images

DATASET_CHOICES = ("gopro", "realblur-j", "realblur-r", "synth")
_SHOW = 5


@dataclass(frozen=True)
class Pair:
    """One test image: the blurry input, its ground truth (``None`` for no-reference sets).

    ``key`` names the image in reports; ``aliases`` are the relative paths (posix, no suffix) under
    which a prediction for this image is looked up in a ``--pred`` folder, most specific first.
    """

    key: str
    blur: Path
    sharp: Path | None
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class EvalSet:
    """A list of pairs and what they came from."""

    name: str
    pairs: tuple[Pair, ...]

    @property
    def has_reference(self) -> bool:
        return all(p.sharp is not None for p in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return f"{shown}{more} ({len(items)} in all)"


def _stem_key(path: Path, base: Path) -> str:
    """Relative posix path of ``path`` under ``base`` without the suffix, in Unicode's composed
    form (NFC): a name copied from macOS (decomposed, NFD) pairs with its twin."""
    rel = PurePosixPath(path.relative_to(base).as_posix())
    return unicodedata.normalize("NFC", str(rel.with_suffix("")))


def index_folder(folder: Path, what: str) -> dict[str, Path]:
    """Map relative path without suffix -> image file, recursively; duplicates are an error."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} is a file; give the folder that holds the "
                           "images")
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist")
    index: dict[str, Path] = {}
    clashes: list[str] = []
    for path in list_images(folder, recursive=True):
        key = _stem_key(path, folder)
        if key in index:
            clashes.append(f"{index[key].name}/{path.name}")
        index[key] = path
    if clashes:
        raise DatasetError(f"{what} folder {folder} has files whose names differ only in "
                           f"suffix (or Unicode form): {_listing(clashes)}")
    return index


def gopro_set(root: Path) -> EvalSet:
    """The GoPro test set under ``root`` (``root/test/<seq>/{blur,sharp}``)."""
    root = Path(root)
    test = root / "test" if (root / "test").is_dir() else root
    seqs = sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []
    seqs = [s for s in seqs if (s / "blur").is_dir() or (s / "sharp").is_dir()]
    if not seqs:
        raise DatasetError(f"no GoPro test sequences in {test} (expected "
                           f"{test}/<sequence>/blur/*.png and .../sharp/*.png)")
    pairs: list[Pair] = []
    for seq in seqs:
        for p in _pair_folders(seq / "blur", seq / "sharp", prefix=seq.name):
            alias_mirror = f"{seq.name}/blur/{PurePosixPath(p.key).name}"
            pairs.append(Pair(p.key, p.blur, p.sharp, (alias_mirror,) + p.aliases))
    return EvalSet("gopro", tuple(pairs))


def realblur_set(root: Path, variant: str) -> EvalSet:
    """RealBlur-J or -R test pairs from the official list file in ``root``."""
    variant = variant.upper()
    if variant not in ("J", "R"):
        raise DatasetError(f"unknown RealBlur variant {variant!r} (J or R)")
    root = Path(root)
    list_file = root / f"RealBlur_{variant}_test_list.txt"
    if not list_file.is_file():
        raise DatasetError(f"{list_file} not found (the official RealBlur test list; it sits "
                           f"next to the RealBlur-{variant}_..._centroid_itensity_ref folder)")
    pairs: list[Pair] = []
    missing: list[str] = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DatasetError(f"{list_file}:{number}: expected '<gt path> <blur path>'")
        gt, blur = root / parts[0], root / parts[1]
        missing += [str(p.relative_to(root)) for p in (gt, blur) if not p.is_file()]
        blur_rel = PurePosixPath(parts[1])
        scene = blur_rel.parent.parent.name or blur_rel.parent.name
        key = f"{scene}/{blur_rel.stem}"
        index = blur_rel.stem.rsplit("_", 1)[-1]
        aliases = (str(blur_rel.with_suffix("")), key, f"{scene}_{blur_rel.stem}",
                   f"{scene}_{index}")
        pairs.append(Pair(key, blur, gt, aliases))
    if missing:
        raise DatasetError(f"files named in {list_file.name} are missing: {_listing(missing)}")
    if not pairs:
        raise DatasetError(f"{list_file} lists no pairs")
    return EvalSet(f"realblur-{variant.lower()}", tuple(pairs))


def _pair_folders(blur_dir: Path, sharp_dir: Path, prefix: str = "") -> list[Pair]:
    blur = index_folder(blur_dir, "blur")
    sharp = index_folder(sharp_dir, "sharp")
    only_blur = sorted(set(blur) - set(sharp))
    only_sharp = sorted(set(sharp) - set(blur))
    problems = []
    if only_blur:
        problems.append(f"{len(only_blur)} blurry image(s) in {blur_dir} have no sharp "
                        f"counterpart in {sharp_dir}: {_listing(only_blur)}")
    if only_sharp:
        problems.append(f"{len(only_sharp)} sharp image(s) in {sharp_dir} have no blurry "
                        f"counterpart in {blur_dir}: {_listing(only_sharp)}")
    if problems:
        raise DatasetError("; ".join(problems))
    if not blur:
        raise DatasetError(f"no images in {blur_dir}")
    pairs = []
    for rel in sorted(blur):
        key = f"{prefix}/{rel}" if prefix else rel
        pairs.append(Pair(key, blur[rel], sharp[rel], (key,)))
    return pairs


def folder_set(blur_dir: Path, sharp_dir: Path | None = None) -> EvalSet:
    """Pairs from two folders matched by relative path, or a blur-only (no-reference) set."""
    if sharp_dir is not None:
        return EvalSet("folders", tuple(_pair_folders(Path(blur_dir), Path(sharp_dir))))
    index = index_folder(Path(blur_dir), "blur")
    if not index:
        raise DatasetError(f"no images in {blur_dir}")
    return EvalSet("no-reference", tuple(Pair(k, index[k], None, (k,)) for k in sorted(index)))


def build_set(dataset: str | None, root: Path | None, blur: Path | None,
              sharp: Path | None) -> EvalSet:
    """Choose the set from the CLI options (``--dataset/--root`` or ``--blur [--sharp]``)."""
    if dataset is not None:
        if root is None:
            raise DatasetError(f"--dataset {dataset} needs --root DIR")
        if blur is not None or sharp is not None:
            raise DatasetError("use either --dataset/--root or --blur/--sharp, not both")
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"dataset root {root} does not exist")
        if dataset == "gopro":
            return gopro_set(root)
        if dataset in ("realblur-j", "realblur-r"):
            return realblur_set(root, dataset[-1])
        if dataset == "synth":
            return EvalSet("synth", folder_set(root / "blur", root / "sharp").pairs)
        raise DatasetError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASET_CHOICES)}")
    if blur is None:
        if sharp is not None:
            raise DatasetError("--sharp needs --blur")
        raise DatasetError("say what to evaluate: --dataset NAME --root DIR, or --blur DIR "
                           "[--sharp DIR]")
    return folder_set(Path(blur), Path(sharp) if sharp is not None else None)


def match_predictions(eval_set: EvalSet, pred_dir: Path,
                      on_extra: Callable[[list[str]], None] | None = None) -> list[Path]:
    """For each pair, the prediction file in ``pred_dir`` with the same relative path/name.

    A pair's ``aliases`` are tried in order (suffix ignored); a bare file name is accepted too
    when it is unique both among the test images and in ``pred_dir``. Unmatched pairs are a
    :class:`DatasetError`; prediction files no pair used are passed to ``on_extra``.
    """
    index = index_folder(Path(pred_dir), "prediction")
    by_name: dict[str, list[str]] = {}
    for rel in index:
        by_name.setdefault(PurePosixPath(rel).name, []).append(rel)
    names_of = [{PurePosixPath(a).name for a in pair.aliases} for pair in eval_set.pairs]
    name_count: dict[str, int] = {}
    for names in names_of:
        for n in names:
            name_count[n] = name_count.get(n, 0) + 1
    found: list[Path] = []
    missing: list[str] = []
    used: set[str] = set()
    for pair, names in zip(eval_set.pairs, names_of, strict=True):
        hit = next((a for a in pair.aliases if a in index), None)
        if hit is None:  # a bare name, when it is unique both in the set and in pred_dir
            unique = {by_name[n][0] for n in names
                      if name_count[n] == 1 and len(by_name.get(n, [])) == 1}
            hit = unique.pop() if len(unique) == 1 else None
        if hit is None or hit in used:
            missing.append(pair.key)
            continue
        used.add(hit)
        found.append(index[hit])
    if missing:
        raise DatasetError(f"no prediction in {pred_dir} for {len(missing)} image(s): "
                           f"{_listing(missing)} (name outputs like their inputs, by relative "
                           f"path)")
    extra = sorted(set(index) - used)
    if extra and on_extra is not None:
        on_extra(extra)
    return found
