"""Image files <-> float32 RGB arrays, atomic writes (of files and folders) and folder listing.

Reading returns :class:`ImageData`: ``pixels`` are float32 ``(H, W, 3)`` RGB in ``[0, 1]`` (grey
images are repeated to three channels), with the alpha channel, the grey-ness and the bit depth
(8 or 16) kept so that :func:`write_image` can write the result back in the same kind of file,
and the ICC profile, EXIF and XMP with it (:mod:`deblurcli.imagemeta`). EXIF orientation is
applied on reading.

Back-ends: Pillow for JPEG, WebP, BMP and 8-bit PNG; tifffile for TIFF; OpenCV (``cv2``, the
``opencv-python-headless`` dependency) for 16-bit PNG, because Pillow reduces 16-bit colour PNGs
to 8 bits. Every write encodes in memory first and then goes through :func:`atomic_write_bytes`
(temporary file in the destination folder, flushed to disk, ``os.replace``, folder flushed), so no
half-written file is ever left and a finished write survives a crash.

Reading is bounded: only regular files are opened (a named pipe or a device never is), and one
pixel limit (:data:`DEFAULT_MAX_PIXELS`, ``max_pixels=``) is checked from the header, before any
decoder allocates, for every format; files larger than that limit allows are not read.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deblurcli._version import __version__
from deblurcli.errors import DeblurcliError, ImageReadError, ImageWriteError
from deblurcli.imagemeta import ImageMetadata, exif_orientation

PathLike = str | os.PathLike

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp", ".avif", ".heic", ".heif", ".hif"}
)
KINDS = "PNG, JPEG, TIFF, WebP, BMP, AVIF or HEIC"  # the formats read, for messages
HEIF_HINT = "HEIC/HEIF photos need pillow-heif: pip install 'deblurcli[heif]'"
AVIF_HINT = "AVIF needs a Pillow built with AVIF (11.3 or newer): pip install -U pillow"

_FORMAT_BY_SUFFIX = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".webp": "webp",
    ".bmp": "bmp",
    ".avif": "avif",
    ".heic": "heif",
    ".heif": "heif",
    ".hif": "heif",  # the HEIF suffix of Canon, Fujifilm and Sony cameras
}
# ISO base media (HEIF) brands in an ``ftyp`` box: AVIF first (an AVIF file lists mif1 too)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1",
                          b"msf1"})
_EXIF_ORIENTATION = 0x0112

DEFAULT_MAX_PIXELS = 178_956_970
"""Largest image (width x height) read by default: 2x Pillow's ``MAX_IMAGE_PIXELS``, the size at
which Pillow itself refuses a file (about 13,400 x 13,400; a 16-bit RGBA image of that size is
1.4 GB of samples and 2.9 GB as float32)."""

_HEADER_SLACK_BYTES = 64 << 20  # metadata (EXIF, ICC, XMP) a file may carry beyond its samples
_PILLOW_LIMIT_LOCK = threading.Lock()


@dataclass
class ImageData:
    """A decoded image and what is needed to write it back faithfully.

    Attributes:
        pixels: float32 ``(H, W, 3)`` RGB in ``[0, 1]``, sRGB-encoded, orientation applied.
        alpha: float32 ``(H, W)`` in ``[0, 1]``, or ``None`` when the file has no alpha.
        grayscale: the file was single-channel (or grey + alpha).
        bit_depth: 8 or 16 (bits per channel of the file; float TIFFs count as 16).
        format: ``"png" | "jpeg" | "tiff" | "webp" | "bmp"``.
        metadata: the file's ICC profile, EXIF and XMP (:mod:`deblurcli.imagemeta`), or
            ``None`` when it has none.
        lossless: the file is a lossless WebP (written back as one).
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    grayscale: bool
    bit_depth: int
    format: str
    metadata: ImageMetadata | None = None
    lossless: bool = False


# --------------------------------------------------------------------------------------------
# atomic writes


def cut_name(name: str, room: int) -> str:
    """``name`` cut to ``room`` bytes (UTF-8, never within a character): a hidden name made
    from it, with ``255 - room`` bytes more, still fits the 255 that file systems allow."""
    return name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")


def fill_transparent(pixels: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """``pixels`` with the colour under fully transparent pixels (``alpha == 0``) replaced by
    that of the visible pixels around them (a push-pull pyramid: weighted halvings until every
    pixel has a visible neighbour, then back up), the visible ones untouched.

    The colour under transparency is often black or left over from editing; a network that
    looks at neighbours would draw it into the visible edges as a dark fringe. A new float32
    array (2.6 times the image in memory at the peak, 0.33 s for 3 MP on one core: the
    full-size level is never stored); ``pixels`` itself when nothing is transparent, or
    everything is."""
    import cv2

    if alpha is None:
        return pixels
    visible = alpha > 0
    if visible.all() or not visible.any():
        return pixels

    def half(image: np.ndarray) -> np.ndarray:  # a side of 1 stays 1
        h, w = image.shape[:2]
        return cv2.resize(image, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)

    weight = visible.astype(np.float32)
    levels = [(half(np.multiply(pixels, weight[..., None], dtype=np.float32)), half(weight))]
    while max(levels[-1][1].shape) > 1 and not (levels[-1][1] > 0).all():
        levels.append((half(levels[-1][0]), half(levels[-1][1])))
    filled = None
    while levels:
        colour, level_weight = levels.pop()
        known = level_weight > 0
        colour /= np.maximum(level_weight, 1e-12)[..., None]  # (in place: the level is done)
        if filled is not None:
            up = cv2.resize(filled, (known.shape[1], known.shape[0]),
                            interpolation=cv2.INTER_LINEAR).reshape(colour.shape)
            colour[~known] = up[~known]
        elif not known.all():  # nothing visible nearby even at the top: the mean colour
            colour[~known] = colour[known].mean(axis=0)
        filled = colour
    out = cv2.resize(filled, (visible.shape[1], visible.shape[0]),
                     interpolation=cv2.INTER_LINEAR).reshape(pixels.shape).astype(np.float32,
                                                                                   copy=False)
    out[visible] = pixels[visible]
    return out


def _temp_prefix(path: Path) -> str:
    """``.NAME.`` for the temporary file beside ``path``: 15 bytes more make the temporary
    name (its dots, 8 random characters, ``.part``)."""
    return f".{cut_name(path.name, 240)}."


def atomic_write(path: PathLike, write: Callable[[Path], None], *,
                 before_replace: Callable[[Path], None] | None = None) -> None:
    """Create ``path`` atomically and durably: ``write(tmp)`` fills a temporary file in the same
    folder, which is flushed to disk (``fsync``), gets the usual permissions (``0o666`` minus the
    umask) and replaces ``path``; then the folder itself is flushed, so the new name survives a
    crash too.

    The parent folder is created if needed. On any failure the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched. Every file the project writes goes
    through here (images, manifests, model folders, checkpoints, reports). ``before_replace(tmp)``
    runs on the finished temporary file just before it takes its name (its size, modification
    time and inode are then those of the final file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_folder(path: PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Create the folder ``path`` whole or not at all: the ``with`` body fills the temporary
    folder it is given (beside ``path``, ``.NAME.*.part``), which takes the name ``path`` when
    the body returns; if the body raises, the temporary folder is removed and ``path`` is left
    as it was.

    An existing ``path`` raises ``FileExistsError`` unless ``replace``: it is then moved aside
    (``.NAME.*.old``) just before the rename and removed after it, so that ``path`` never holds
    a mix of the two. The files inside are flushed by whoever writes them (:func:`atomic_write`);
    the folders' new names are flushed here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".part"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        fsync_folder(tmp)
        old = tmp.with_suffix(".old")
        if os.path.lexists(path):
            if not replace:
                raise FileExistsError(errno.EEXIST, "already exists", str(path))
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if os.path.lexists(old):
                os.rename(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_folder(path.parent)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.unlink(old)


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_file(path: PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: PathLike) -> None:
    """Flush a folder's entries (new, renamed or removed names) to disk.

    A no-op where folders cannot be opened (Windows) or the file system does not support it.
    """
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except PermissionError:  # a write-only (-wx) folder: the write itself succeeded
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised inside (a full disk, a read-only folder, a file where a folder
    should be) into a :class:`DeblurcliError` of one line that names ``path``, the file or
    folder being written."""
    try:
        yield
    except OSError as exc:
        raise DeblurcliError(f"cannot write {path}: {exc.strerror or exc}") from None


def atomic_write_bytes(path: PathLike, data: bytes, *,
                       before_replace: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), before_replace=before_replace)


def atomic_save_safetensors(path: PathLike, tensors, metadata: dict[str, str] | None = None
                            ) -> None:
    """Save a ``{name: torch.Tensor}`` mapping as a safetensors file (contiguous CPU copies),
    atomically (see :func:`atomic_write`)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


# --------------------------------------------------------------------------------------------
# opening only regular files


def not_regular_reason(mode: int) -> str:
    """Why a file of this ``st_mode`` must not be read as an image ("" for a regular file)."""
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "a folder, not an image file"
    if stat.S_ISFIFO(mode):
        return "a named pipe, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    return "not a regular file"


def stat_problem(exc: OSError, is_link: bool) -> str:
    """One-line reason for an ``os.stat`` failure on a listed entry (no path in it)."""
    if exc.errno == errno.ELOOP:
        return "symlink loop (too many levels of links)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and is_link:
        return "broken symlink (its target does not exist)"
    return f"cannot read it: {exc.strerror or exc}"


@contextlib.contextmanager
def open_regular(path: PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for reading only if it is a regular file (symlinks followed).

    The file is opened with ``O_NONBLOCK``, so a named pipe cannot block the open, and its type is
    checked on the open descriptor (no race with a swap after a check). Raises
    :class:`~deblurcli.errors.ImageReadError` with a one-line reason.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        reason = "broken symlink (its target does not exist)" if path.is_symlink() else "no such file"
        raise ImageReadError(f"cannot read {path}: {reason}") from None
    except IsADirectoryError:
        raise ImageReadError(f"cannot read {path}: it is a folder, not an image") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {stat_problem(exc, path.is_symlink())}") \
            from None
    try:
        reason = not_regular_reason(os.fstat(fd).st_mode)
        if reason:
            raise ImageReadError(f"cannot read {path}: {reason}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def max_file_bytes(max_pixels: int) -> int:
    """Largest file read for a pixel limit: 8 bytes per pixel (16-bit RGBA, uncompressed) plus
    64 MiB of metadata. Larger files are refused before being read."""
    return 8 * int(max_pixels) + _HEADER_SLACK_BYTES


def _check_pixels(path: Path, width: int, height: int, max_pixels: int, depth: int = 1) -> None:
    pixels = int(width) * int(height) * max(1, int(depth))
    if pixels > max_pixels:
        raise ImageReadError(
            f"cannot read {path}: {width}x{height} is {pixels:,} pixels, more than the limit of "
            f"{max_pixels:,} (raise it with --max-pixels if the file is trusted)"
        )


@contextlib.contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own decompression-bomb check, in line with ``max_pixels`` (checked first, by us).

    Pillow refuses images over ``2 * Image.MAX_IMAGE_PIXELS`` and warns above half of that; the
    warning is silenced, and Pillow's limit is lifted (under a lock) only when ``max_pixels``
    exceeds it. So are Pillow's warnings about a file's metadata ("Corrupt EXIF data"): they
    name no file, and metadata is best effort.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        limit = Image.MAX_IMAGE_PIXELS
        if limit is None or max_pixels <= 2 * limit:
            yield
            return
        with _PILLOW_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = None
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = limit


# --------------------------------------------------------------------------------------------
# reading


def _sniff_format(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[4:8] == b"ftyp":  # ISO base media: the major brand, then the compatible ones
        size = min(int.from_bytes(head[:4], "big"), len(head))
        brands = {head[8:12], *(head[i:i + 4] for i in range(16, size - 3, 4))}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    return None


def _read_head(fh: BinaryIO) -> bytes:
    """The first bytes of a file, enough to tell its format: 64, or the whole ``ftyp`` box of
    an ISO base media file (up to 4 kB), whose brands may run past them."""
    head = fh.read(64)
    if head[4:8] == b"ftyp" and int.from_bytes(head[:4], "big") > len(head):
        head += fh.read(min(int.from_bytes(head[:4], "big"), 4096) - len(head))
    return head


def pillow_plugin(fmt: str, *, write: bool = False) -> str | None:
    """Make Pillow able to read (and with ``write``, write) ``fmt``; the reason it cannot, or
    None when it can. HEIC/HEIF comes from the optional pillow-heif (the ``heif`` extra); AVIF
    is Pillow's own where it was built with it (11.3 or newer)."""
    from PIL import Image, features

    if fmt == "heif":
        try:
            import pillow_heif
        except ImportError:
            return HEIF_HINT
        pillow_heif.register_heif_opener()
        if write and "HEIF" not in Image.SAVE:  # a libheif built without an HEVC encoder
            return "this pillow-heif cannot write HEIC (its libheif has no HEVC encoder)"
    elif fmt == "avif":
        if "avif" not in features.modules or not features.check_module("avif"):
            return AVIF_HINT
    return None


def _pillow_formats(fmt: str) -> list[str] | None:
    """The one Pillow plugin to open ``fmt`` with, where another could claim the file (the HEIF
    plugin takes AVIF files under a mif1 brand, then fails without an AV1 decoder)."""
    return [fmt.upper()] if fmt in ("avif", "heif") else None


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation code (1..8) to an ``(H, W, ...)`` array; other codes: no change."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return np.swapaxes(array, 0, 1)
    if orientation == 6:
        return np.rot90(array, k=-1)
    if orientation == 7:
        return np.swapaxes(array[::-1, ::-1], 0, 1)
    if orientation == 8:
        return np.rot90(array, k=1)
    return array


class SampleError(ValueError):
    """Samples deblurcli cannot take as they are (float values far outside 0..1, NaN)."""


def _to_unit_float(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer/float samples -> float32 in [0, 1] and the bit depth to write back (8 or 16).

    8- and 16-bit samples are scaled in place in their float32 copy (one copy, not two)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), 8
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32)
        return np.divide(out, np.float32(255.0), out=out), 8
    if arr.dtype == np.uint16:
        out = arr.astype(np.float32)
        return np.divide(out, np.float32(65535.0), out=out), 16
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise SampleError("its float samples hold NaN or infinite values")
        low, high = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
        if low < -0.5 or high > 1.5:  # 0..255 floats, or HDR: it would be clipped to white
            raise SampleError(f"its float samples span {low:g}..{high:g}, not 0..1 (deblurcli "
                              "reads float images as 0..1: scale it, or save it with 16-bit "
                              "integers)")
        return np.clip(out, 0.0, 1.0, out=out), 16
    if np.issubdtype(arr.dtype, np.integer):  # e.g. Pillow mode "I" (16-bit grey PNG) or int32 TIFF
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(np.iinfo(arr.dtype).max)
        return np.clip(arr.astype(np.float64) / top, 0.0, 1.0).astype(np.float32), 16
    raise ValueError(f"unsupported sample type {arr.dtype}")


def _split_channels(
    arr: np.ndarray, grey_file: bool | None = None
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(H, W[, C]) samples -> (colour (H, W, 3 or 1), alpha (H, W) or None, grayscale)."""
    if arr.ndim == 2:
        return arr[..., None], None, True
    c = arr.shape[2]
    if c == 1:
        return arr, None, True
    if c == 2:
        return arr[..., :1], arr[..., 1], True
    if c == 3:
        return arr, None, False
    if grey_file:  # grey + alpha delivered as 4 channels (OpenCV)
        return arr[..., :1], arr[..., 3], True
    return arr[..., :3], arr[..., 3], False


def _finish(
    arr: np.ndarray, fmt: str, orientation: int, grey_file: bool | None = None,
    metadata: ImageMetadata | None = None,
) -> ImageData:
    arr = apply_orientation(arr, orientation)
    if metadata and orientation in (5, 6, 7, 8):  # turned by a quarter: so is the resolution
        metadata = metadata.turned()
    colour, alpha, grey = _split_channels(arr, grey_file)
    pix, depth = _to_unit_float(colour)
    if pix.shape[2] == 1:
        pix = np.repeat(pix, 3, axis=2)
    a = None if alpha is None else _to_unit_float(alpha)[0]
    return ImageData(
        pixels=np.ascontiguousarray(pix, dtype=np.float32),
        alpha=None if a is None else np.ascontiguousarray(a, dtype=np.float32),
        grayscale=grey,
        bit_depth=depth,
        format=fmt,
        metadata=metadata or None,
    )


def _pillow_orientation(im, fmt: str = "") -> int:
    """The orientation to apply. In AVIF only the EXIF's counts (Pillow keeps it in step with
    the irot/imir boxes; an XMP tiff:Orientation, which getexif() would fall back to, is
    not the format's); pillow-heif turns HEIC photos upright itself and reports 1."""
    try:
        if fmt == "avif":  # the EXIF block alone, without the XMP from_pillow also reads
            from deblurcli.imagemeta import from_pillow

            return exif_orientation(ImageMetadata(exif=from_pillow(im).exif))
        with warnings.catch_warnings():  # Pillow's "Corrupt EXIF data" is no news to the user
            warnings.simplefilter("ignore")
            return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop reading pixels
        return 1


def _png_orientation(fh: BinaryIO) -> int:
    """Orientation of a PNG from its eXIf (or XMP) chunk, found by skipping over chunk data
    (Pillow's ``getexif()`` decodes every pixel to reach an eXIf chunk placed after IDAT)."""
    from deblurcli import imagemeta

    try:
        return imagemeta.exif_orientation(imagemeta.from_png(fh))
    except Exception:  # noqa: BLE001 - as _pillow_orientation
        return 1


def _png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk (the first chunk, at a fixed offset)."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    return struct.unpack(">II", data[16:24])


def _read_pillow(data: bytes, fmt: str, path: Path, max_pixels: int) -> ImageData:
    from PIL import Image

    missing = pillow_plugin(fmt)
    if missing:
        raise ImageReadError(f"cannot read {path}: {missing}")
    with _pillow_limit(max_pixels):
        try:
            im = Image.open(io.BytesIO(data), formats=_pillow_formats(fmt))
        except Image.DecompressionBombError:
            raise ImageReadError(f"cannot read {path}: more pixels than the limit of "
                                 f"{max_pixels:,} (raise it with --max-pixels)") from None
        _check_pixels(path, *im.size, max_pixels)  # header only: nothing decoded yet
        if fmt in ("webp", "avif"):
            _refuse_frames(path, _FRAME_KINDS[fmt], int(getattr(im, "n_frames", 1)))
        # a TIFF's metadata before load(), which turns it upright and lets go of its file
        turned = fmt == "tiff" and im.tag_v2.get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
        metadata = _pillow_metadata(im, data, fmt) if fmt == "tiff" else None
        im.load()
    if fmt != "tiff":
        metadata = _pillow_metadata(im, data, fmt)
    elif turned and metadata:  # Pillow turned the pixels itself: _finish sees orientation 1
        metadata = metadata.turned()
    orientation = exif_orientation(metadata) if fmt == "png" else _pillow_orientation(im, fmt)
    mode = im.mode
    keyed = "transparency" in im.info  # a tRNS colour key: transparent where a pixel has it
    if keyed and fmt == "png" and mode == "L" and len(data) > 24 and data[24] in (1, 2, 4):
        # Pillow keeps a 1/2/4-bit grey key on its own scale but its pixels on 0..255
        im.info["transparency"] = int(im.info["transparency"]) * (255 // (2 ** data[24] - 1))
    if mode in ("1", "L") and keyed:
        arr = np.asarray(im.convert("LA"))
    elif mode in ("1", "L"):
        arr = np.asarray(im.convert("L"))
    elif mode in ("LA", "La"):
        arr = np.asarray(im.convert("LA"))
    elif mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.uint16)
    elif mode in ("I", "F"):
        arr = np.asarray(im)
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        arr = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    elif mode in ("RGBA", "RGBa") or mode == "RGB" and keyed:
        arr = np.asarray(im.convert("RGBA"))
    else:  # RGB, CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(im.convert("RGB"))
    image = _finish(arr, fmt, orientation, metadata=metadata)
    image.lossless = fmt == "webp" and _webp_lossless(data)
    return image


def _webp_lossless(data: bytes) -> bool:
    """Whether a WebP file's image is stored lossless (a ``VP8L`` chunk, not ``VP8 ``)."""
    at = 12  # after RIFF, its size and WEBP
    while at + 8 <= len(data):
        kind, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        if kind in (b"VP8L", b"VP8 "):
            return kind == b"VP8L"
        at += 8 + size + (size & 1)
    return False


def _pillow_metadata(im, data: bytes, fmt: str) -> ImageMetadata | None:
    from deblurcli import imagemeta

    try:
        if fmt == "png":
            return imagemeta.from_png(data)
        if fmt == "tiff":
            return imagemeta.from_tiff(im)
        return imagemeta.from_pillow(im) if fmt in ("jpeg", "webp", "avif", "heif") else None
    except Exception:  # noqa: BLE001 - metadata is best effort (deblurcli.imagemeta)
        return None


_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def _whole_png(data: bytes) -> bytes:
    """``data`` checked as Pillow checks an 8-bit PNG before OpenCV decodes it: chunks cut
    short, the checksums of those the image needs, a pixel stream that does not inflate to its
    size (ValueError, in Pillow's words); a file that only lacks its closing chunk gets one, as
    Pillow reads it, and an optional chunk whose checksum is bad is left out (libpng would
    print a warning)."""
    pos, idat, width, height, dropped, spans = 8, [], 0, 0, [], []
    channels = interlaced = 0  # (an IHDR cut short sets neither)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I", data[pos:pos + 4])[0], data[pos + 4:pos + 8]
        if pos + 12 + length > len(data):
            raise ValueError("image file is truncated")
        body = data[pos + 8:pos + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[pos + 8 + length:
                                                               pos + 12 + length])[0]:
            if not kind[0] & 0x20:  # a critical chunk
                raise ValueError(f"broken PNG file (bad checksum in {kind.decode('latin-1')!r})")
            dropped.append((pos, pos + 12 + length))  # as libpng does, without its warning
        if kind == b"IHDR" and length < 13:  # (OpenCV: an error line of its own on stderr)
            raise ValueError("broken PNG file (its IHDR chunk is cut short)")
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            channels, interlaced = _PNG_CHANNELS.get(body[9], 0), body[12]
        elif kind == b"IDAT":
            idat.append(body)
            spans.append((pos, pos + 12 + length))
        elif kind == b"IEND":
            break
        pos += 12 + length
    else:
        if pos != len(data):
            raise ValueError("image file is truncated")
        data += _IEND
    inflate, size = zlib.decompressobj(), 0
    try:
        for body in idat:
            while body:
                size += len(inflate.decompress(body, 1 << 24))
                body = inflate.unconsumed_tail
    except zlib.error:
        raise ValueError("broken data stream when reading image file") from None
    if not inflate.eof:
        raise ValueError("image file is truncated")
    whole = height * (1 + width * channels * 2)
    if width and not interlaced and channels and size < whole:
        raise ValueError("image file is truncated")
    edits = [(start, end, b"") for start, end in dropped]
    if width and not interlaced and channels and size > whole:
        # data beyond the image: Pillow leaves it unread, libpng reads it with a warning on
        # stderr ("IDAT: Too much image data"); the image's own rows, compressed again
        pixels = zlib.decompressobj().decompress(b"".join(idat), whole)  # no more than that
        edits += [(spans[0][0], spans[0][1], _png_chunk(b"IDAT", zlib.compress(pixels, 1)))]
        edits += [(start, end, b"") for start, end in spans[1:]]
    for start, end, new in sorted(edits, reverse=True):
        data = data[:start] + new + data[end:]
    return data


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _read_png16(data: bytes) -> ImageData:
    """A 16-bit PNG (its IHDR already checked against the pixel limit) through OpenCV."""
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - cv2 is a dependency
        raise ImageReadError(
            "reading 16-bit PNG needs OpenCV: pip install opencv-python-headless"
        ) from exc

    colour_type = data[25]
    data = _whole_png(data)  # (libpng prints its own complaints about the rest to stderr)
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("OpenCV could not decode the PNG")
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
    if colour_type == 0 and arr.ndim == 2:  # OpenCV leaves a grey colour key out
        from deblurcli.imagemeta import png_chunks

        key = png_chunks(io.BytesIO(data), (b"tRNS",)).get(b"tRNS", [b""])[0]
        if len(key) == 2:
            alpha = np.where(arr == struct.unpack(">H", key)[0], 0, 65535).astype(np.uint16)
            arr = np.stack([arr, alpha], axis=-1)
    metadata = _pillow_metadata(None, data, "png")  # its chunks walked once, for both
    return _finish(arr, "png", exif_orientation(metadata), grey_file=colour_type in (0, 4),
                   metadata=metadata)


def _tiff_metadata(fh: BinaryIO, max_pixels: int, plain: ImageMetadata) -> ImageMetadata | None:
    """The ICC profile, EXIF and XMP of the TIFF file ``fh`` (Pillow reads its tags only), or
    ``plain`` where Pillow cannot open it (a float RGB TIFF, say)."""
    from PIL import Image

    from deblurcli import imagemeta

    try:
        fh.seek(0)
        with _pillow_limit(max_pixels), Image.open(fh, formats=["TIFF"]) as im:
            return imagemeta.from_tiff(im) or None
    except Exception:  # noqa: BLE001 - metadata is best effort (deblurcli.imagemeta)
        return plain or None


def _read_tiff(fh: BinaryIO, path: Path, max_pixels: int) -> ImageData:
    """The first page of a TIFF, read from the open file (only the strips or tiles it needs, into
    one array allocated after the pixel limit is checked)."""
    import tifffile

    with tifffile.TiffFile(fh, name=path.name) as tif:
        page = tif.pages[0]
        _refuse_frames(path, "TIFF", _tiff_pages(tif), unit="pages")
        _check_pixels(path, page.imagewidth, page.imagelength, max_pixels,
                      getattr(page, "imagedepth", 1))
        # the pixel count says nothing of samples per pixel or their size: check the array's
        # bytes (what asarray allocates) before allocating it
        if int(page.samplesperpixel) > 4:
            raise ValueError(f"unsupported TIFF with {page.samplesperpixel} channels")
        if int(page.nbytes) > max_file_bytes(max_pixels):
            raise ImageReadError(f"cannot read {path}: its pixels take {int(page.nbytes):,} "
                                 f"bytes, more than the limit of {max_file_bytes(max_pixels):,} "
                                 "(raise --max-pixels if the file is trusted)")
        photometric = int(page.photometric)
        bits = int(page.bitspersample)
        arr = None
        # grey or RGB, and CMYK of more than 8 bits (which Pillow would read as 8); palette,
        # YCbCr, Lab and 8-bit CMYK: Pillow below
        if photometric in (0, 1, 2) or photometric == 5 and bits > 8:
            try:
                arr = page.asarray()
            except Exception as exc:  # noqa: BLE001 - a codec tifffile lacks: Pillow, if 8-bit
                if bits > 8 or photometric == 5:  # Pillow would read it as 8 bits, silently
                    raise ImageReadError(_tiff_failure(path, page, exc)) from None
                arr = None
        tag = page.tags.get(274)
        orientation = int(tag.value) if tag is not None else 1
        # the profile and XMP as tifffile reads them, for a file Pillow cannot open
        icc, xmp = (page.tags.get(code) for code in (34675, 700))
        plain = ImageMetadata(**{name: bytes(tag.value) for name, tag in (("icc", icc), ("xmp", xmp))
                                 if tag is not None and isinstance(tag.value, bytes)})
        separate = int(getattr(page, "planarconfig", 1)) == 2  # one plane per sample
        samples = int(page.samplesperpixel)
        # ExtraSamples 1: colour premultiplied by alpha (Pillow's reading below undoes it itself)
        associated = [int(v) for v in (getattr(page, "extrasamples", None) or ())][:1] == [1]
    if arr is None:  # Pillow converts these kinds (and decodes LZW, JPEG, ...) to RGB(A)
        size = os.fstat(fh.fileno()).st_size
        if size > max_file_bytes(max_pixels):
            raise ImageReadError(f"cannot read {path}: {size:,} bytes is more than an image "
                                 f"within the pixel limit of {max_pixels:,} needs (raise it with "
                                 "--max-pixels)")
        fh.seek(0)
        return _read_pillow(fh.read(size + 1), "tiff", path, max_pixels)
    if separate and samples > 1 and arr.ndim == 3 and arr.shape[0] == samples:
        arr = np.moveaxis(arr, 0, -1)  # (samples, height, width) -> (height, width, samples)
    if arr.ndim == 3 and arr.shape[2] > 4:
        raise ValueError(f"unsupported TIFF with {arr.shape[2]} channels")
    arr = _tiff_samples(arr, bits, path)
    if photometric == 0:  # MINISWHITE: 0 is white
        arr = ~arr if arr.dtype == np.bool_ else 1.0 - arr if arr.dtype.kind == "f" else \
            np.iinfo(arr.dtype).max - arr
    if photometric == 5:  # CMYK(+alpha) as Pillow turns 8-bit CMYK into RGB, without a profile
        cmyk = arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
        ink = 1.0 - cmyk[..., 3:4]
        rgb = (1.0 - cmyk[..., :3]) * ink
        arr = np.concatenate([rgb, cmyk[..., 4:]], axis=2) if cmyk.shape[2] > 4 else rgb
        arr = np.rint(arr * 65535.0).astype(np.uint16)
    image = _finish(arr, "tiff", orientation, metadata=_tiff_metadata(fh, max_pixels, plain))
    if associated and image.alpha is not None:  # as every other file: colour not premultiplied
        alpha = image.alpha[..., None]
        image.pixels = np.where(alpha > 0, np.clip(image.pixels / np.maximum(alpha, 1e-12),
                                                   0.0, 1.0), 0.0).astype(np.float32)
    return image


def _tiff_failure(path: Path, page: Any, exc: BaseException) -> str:
    """Why tifffile could not decode a page: a codec it lacks, or data cut short or damaged."""
    compression = getattr(page.compression, "name", page.compression)
    reason = " ".join(str(exc).split())[:120]
    if int(page.compression) == 1:  # not compressed: nothing to decode, the bytes are missing
        return f"cannot read {path}: its pixel data is damaged or cut short ({reason})"
    return (f"cannot read {path}: its {page.bitspersample}-bit samples, compressed with "
            f"{compression}, could not be decoded ({reason}): the file is damaged, or the "
            "codec missing (is imagecodecs installed?)")


def _tiff_samples(arr: np.ndarray, bits: int, path: Path) -> np.ndarray:
    """TIFF samples as :func:`_to_unit_float` takes them: unsigned ones of 2..15 bits (tifffile
    unpacks 4- or 12-bit samples into 8- or 16-bit integers unscaled) stretched to the full
    8- or 16-bit range; signed ones of non-negative values read as a fraction of their type's
    maximum (8 and 16 bits; wider ones, such as Pillow's 16-bit grey saved as 32-bit, as
    :func:`_to_unit_float` reads integers), negative ones having no place in 0..1."""
    if arr.dtype.kind == "u" and 1 < bits < 16 and bits != 8:
        top = np.float64(2 ** bits - 1)
        target = np.uint8 if bits < 8 else np.uint16
        return np.rint(np.minimum(arr, top) * (np.iinfo(target).max / top)).astype(target)
    if arr.dtype.kind == "i":
        if arr.size and int(arr.min()) < 0:
            raise ImageReadError(f"cannot read {path}: its samples are signed and hold negative "
                                 "values, which have no place in 0..1 (save it with unsigned "
                                 "samples)")
        if arr.dtype.itemsize >= 4:  # Pillow's mode "I" (16-bit values): _to_unit_float's rule
            return arr
        return (arr.astype(np.float64) / np.iinfo(arr.dtype).max).astype(np.float32)
    return arr


def read_image(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageData:
    """Read an image file (PNG, JPEG, TIFF, WebP, BMP, AVIF, HEIC) as :class:`ImageData`.

    The format is recognised from the file's content, not its suffix. EXIF orientation is applied.
    Only regular files are opened; an image of more than ``max_pixels`` pixels (width x height,
    read from the header before decoding) or a non-TIFF file larger than
    :func:`max_file_bytes` is refused. TIFFs are read from the file, not from a copy of it.
    Raises :class:`~deblurcli.errors.ImageReadError` (one line) for missing, unreadable, too large,
    corrupt or unsupported files.
    """
    path = Path(path)
    with open_regular(path) as fh:
        try:
            head = _read_head(fh)
        except OSError as exc:
            raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}") from None
        fmt = _sniff_format(head)
        if fmt is None:
            raise ImageReadError(f"cannot read {path}: not a {KINDS} image")
        try:
            if fmt == "tiff":
                fh.seek(0)
                return _read_tiff(fh, path, max_pixels)
            size = os.fstat(fh.fileno()).st_size
            if size > max_file_bytes(max_pixels):
                raise ImageReadError(
                    f"cannot read {path}: {size:,} bytes is more than an image within the pixel "
                    f"limit of {max_pixels:,} needs (raise it with --max-pixels)"
                )
            if fmt == "png":
                _check_pixels(path, *_png_size(head), max_pixels)
            fh.seek(0)
            data = fh.read(size + 1)
            if fmt == "png":
                _refuse_frames(path, "PNG", _apng_frames(data))
            if fmt == "png" and len(data) > 25 and data[24] == 16:
                return _read_png16(data)
            return _read_pillow(data, fmt, path, max_pixels)
        except ImageReadError:
            raise
        except SampleError as exc:
            raise ImageReadError(f"cannot read {path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many kinds of errors
            raise ImageReadError(
                f"cannot read {path}: corrupt or unsupported {fmt.upper()} ({_reason(exc, fmt)})"
            ) from None


_FRAME_KINDS = {"png": "PNG", "webp": "WebP", "avif": "AVIF"}


def _tiff_pages(tif) -> int:
    """A TIFF's pages of its own (not a reduced-resolution preview or a transparency mask:
    NewSubfileType bits 1 and 4)."""
    return sum(not int(getattr(page, "subfiletype", 0)) & 5 for page in tif.pages)


def _apng_frames(data: bytes) -> int:
    """The frames of an animated PNG (its ``acTL`` chunk), 1 for a still one."""
    from deblurcli.imagemeta import png_chunks

    control = png_chunks(io.BytesIO(data), (b"acTL",)).get(b"acTL", [b""])[0]
    return struct.unpack(">I", control[:4])[0] if len(control) >= 4 else 1


def _refuse_frames(path: Path, kind: str, frames: int, unit: str = "frames") -> None:
    """One line for a file of several images (an animation, pages): deblurring the first
    alone would drop the others without a word."""
    if frames > 1:
        what = (f"a {kind} of {frames} pages; only single-page files are read (save each "
                "page as its own file)" if unit == "pages" else
                f"an animated {kind} of {frames} frames; only still images are read (make it "
                "a video to deblur every frame)")
        raise ImageReadError(f"cannot read {path}: {what}")


def _reason(exc: BaseException, fmt: str | None = None) -> str:
    """A decoder's error as one line, without the object addresses some put in it (Pillow's
    "cannot identify image file <_io.BytesIO object at 0x7f...>")."""
    if fmt == "tiff" and isinstance(exc, IndexError):  # tifffile: no first page
        return "it holds no image"
    text = re.sub(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>", "", " ".join(str(exc).split())).strip()
    return text or type(exc).__name__


def image_size(path: PathLike) -> tuple[int, int]:
    """Return ``(height, width)`` of an image after EXIF orientation, reading only its header.

    Raises :class:`~deblurcli.errors.ImageReadError` if the file cannot be opened as an image.
    """
    path = Path(path)
    fmt = None
    try:
        with open_regular(path) as fh:
            head = _read_head(fh)
            fmt = _sniff_format(head)
            if fmt is None:
                raise ImageReadError(f"cannot read {path}: not a {KINDS} image")
            missing = pillow_plugin(fmt)
            if missing:
                raise ImageReadError(f"cannot read {path}: {missing}")
            fh.seek(0)
            if fmt == "tiff":
                import tifffile

                with tifffile.TiffFile(fh, name=path.name) as tif:
                    page = tif.pages[0]
                    _refuse_frames(path, "TIFF", _tiff_pages(tif), unit="pages")
                    h, w = int(page.imagelength), int(page.imagewidth)
                    tag = page.tags.get(274)
                    orientation = int(tag.value) if tag is not None else 1
            else:
                from PIL import Image

                with Image.open(fh, formats=_pillow_formats(fmt)) as im:
                    w, h = im.size
                    if fmt in ("png", "webp", "avif"):  # what read_image refuses, said first
                        _refuse_frames(path, _FRAME_KINDS[fmt], int(getattr(im, "n_frames", 1)))
                    orientation = (_png_orientation(fh) if fmt == "png"
                                   else _pillow_orientation(im, fmt))
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"cannot read {path}: corrupt or unsupported image ({_reason(exc, fmt)})"
        ) from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# --------------------------------------------------------------------------------------------
# writing


def _stored_depth(fmt: str, bit_depth: int) -> int:
    """The bits per sample a ``fmt`` file is written with: 16 only in PNG and TIFF."""
    return bit_depth if fmt in ("png", "tiff") else 8


def _stored_colour(pixels: np.ndarray, grayscale: bool) -> np.ndarray:
    """The colour planes written of float ``(H, W, 1 or 3)`` pixels: one (the mean of three)
    for a grey file, else three."""
    if grayscale and pixels.shape[2] == 3:
        return pixels.mean(axis=2, keepdims=True)
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 and not grayscale else pixels


def as_stored(fmt: str, pixels: np.ndarray, *, grayscale: bool = False,
              bit_depth: int = 8) -> np.ndarray:
    """The float32 ``(H, W, 3)`` RGB that reading back a file of lossless format ``fmt``
    (``"png"``, ``"tiff"``, ``"bmp"``) written by :func:`encode_image` with these options
    gives: its samples quantised, without encoding them."""
    depth = _stored_depth(fmt, bit_depth)
    colour = _quantise(_stored_colour(np.asarray(pixels, dtype=np.float32), grayscale), depth)
    colour = colour.astype(np.float32) / (65535.0 if depth == 16 else 255.0)
    return np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour


def _quantise(x: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 65535.0 if bit_depth == 16 else 255.0
    q = np.rint(np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * top)
    return q.astype(np.uint16 if bit_depth == 16 else np.uint8)


def _png16_bytes(arr: np.ndarray) -> bytes:
    import cv2

    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:  # pragma: no cover
        raise DeblurcliError("could not encode a 16-bit PNG")
    return buf.tobytes()


def encode_image(
    fmt: str,
    pixels: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    grayscale: bool = False,
    bit_depth: int = 8,
    quality: int = 95,
    compress_level: int = 6,
    metadata: ImageMetadata | None = None,
    lossless: bool = False,
) -> bytes:
    """Encode pixels as the bytes of an image file of format ``fmt`` (``"png"``, ``"jpeg"``,
    ``"tiff"``, ``"webp"``, ``"bmp"``, ``"avif"`` or ``"heif"``).

    Args:
        pixels: float ``(H, W, 3)`` RGB (or ``(H, W)`` grey) in ``[0, 1]``; values are clipped.
        alpha: optional ``(H, W)`` alpha in ``[0, 1]``; JPEG cannot store it and drops it.
        grayscale: write a single-channel file (the mean of the three channels).
        bit_depth: 8 or 16; 16 is kept for PNG and TIFF, other formats are written with 8 bits.
        quality: JPEG/WebP/AVIF/HEIC quality (1-100).
        compress_level: zlib level (0-9) for 8-bit PNG; 1 is ~3x faster than 6 and ~20% larger.
        metadata: ICC profile, EXIF and XMP to write where the format holds them, made true of
            these pixels first (:func:`deblurcli.imagemeta.for_output`).
        lossless: a lossless WebP (other formats: no effect).
    """
    from deblurcli import imagemeta

    for name, values in (("pixels", pixels), ("alpha", alpha)):
        kind = None if values is None else np.asarray(values).dtype
        if kind is not None and not np.issubdtype(kind, np.floating):
            raise ValueError(f"{name} must be floats in [0, 1], got {kind} (divide 8-bit values "
                             "by 255 and 16-bit ones by 65535)")
        if kind is not None and not np.isfinite(values).all():  # no pixel value to write
            raise ValueError(f"{name} hold NaN or infinite values")
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"pixels must have shape (H, W, 3) or (H, W), got {pixels.shape}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    bit_depth = _stored_depth(fmt, bit_depth)
    if fmt == "jpeg":
        alpha = None
    planes = [_stored_colour(pixels, grayscale)]
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.shape != pixels.shape[:2]:
            raise ValueError(f"alpha shape {alpha.shape} does not match pixels {pixels.shape[:2]}")
        planes.append(alpha[..., None])
    too_large = side_limit_problem(fmt, pixels.shape[1], pixels.shape[0])
    if too_large:
        raise ImageWriteError(too_large)
    arr = _quantise(np.concatenate(planes, axis=2), bit_depth)
    channels = arr.shape[2]
    if channels == 1:
        arr = arr[..., 0]
    # WebP has no grey mode, AVIF and HEIC none with alpha: Pillow writes them as RGB(A)
    grey_written = channels == 1 and fmt != "webp" or channels == 2 and fmt in ("png", "tiff")
    metadata = imagemeta.for_output(metadata, width=arr.shape[1], height=arr.shape[0],
                                    grayscale=grey_written) if fmt != "bmp" else None
    try:
        return _encode_array(fmt, arr, alpha=alpha is not None, metadata=metadata,
                             quality=quality, compress_level=compress_level,
                             lossless=lossless)
    except DeblurcliError:
        raise
    except (ValueError, RuntimeError, OSError, struct.error) as exc:
        # what the encoder refuses: a size past the format's limit (WebP 16383 px, JPEG 65500)
        name = "HEIC" if fmt == "heif" else fmt.upper()
        raise ImageWriteError(f"{name} cannot hold this {arr.shape[1]}x{arr.shape[0]} image "
                              f"({' '.join(str(exc).split()) or type(exc).__name__}); choose "
                              "another --ext") from None


def _encode_array(fmt: str, arr: np.ndarray, *, alpha: bool, metadata: ImageMetadata | None,
                  quality: int, compress_level: int, lossless: bool = False) -> bytes:
    """The bytes of ``arr`` (quantised, ``(H, W)`` or ``(H, W, C)``) as a ``fmt`` file."""
    from deblurcli import imagemeta

    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if fmt == "tiff":
        import tifffile

        buf = io.BytesIO()
        kwargs = {"extrasamples": ["unassalpha"]} if alpha else {}
        if metadata is not None and metadata.icc:
            kwargs["iccprofile"] = metadata.icc
        if metadata is not None and metadata.dpi:
            kwargs.update(resolution=metadata.dpi, resolutionunit="INCH")
        photometric = "minisblack" if channels in (1, 2) else "rgb"
        tifffile.imwrite(buf, arr, photometric=photometric, compression="zlib", metadata=None,
                         software=f"deblurcli {__version__}",
                         extratags=imagemeta.tiff_tags(metadata), **kwargs)
        return imagemeta.add_tiff_directories(buf.getvalue(), metadata)
    if fmt == "png" and arr.dtype == np.uint16:
        if channels == 2:  # grey + alpha: OpenCV cannot write it
            return imagemeta.add_to_png(_png16_grey_alpha(arr), metadata)
        return imagemeta.add_to_png(_png16_bytes(arr), metadata)
    if fmt == "png" and metadata is not None and metadata.png_colour:  # Pillow wrote the rest
        return imagemeta.add_to_png(_pillow_bytes(fmt, arr, channels, metadata, quality,
                                                  compress_level, lossless),
                                    ImageMetadata(png_colour=metadata.png_colour))
    return _pillow_bytes(fmt, arr, channels, metadata, quality, compress_level, lossless)


def _pillow_bytes(fmt: str, arr: np.ndarray, channels: int, metadata: ImageMetadata | None,
                  quality: int, compress_level: int, lossless: bool) -> bytes:
    from deblurcli import imagemeta

    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    if fmt == "bmp" and mode == "LA":
        arr, mode = arr[..., 0], "L"
    im = Image.fromarray(np.ascontiguousarray(arr))
    if im.mode != mode:  # pragma: no cover - Pillow infers the mode from the array shape
        raise ValueError(f"unexpected Pillow mode {im.mode} for {mode}")
    options = {"png": {"compress_level": int(compress_level)}, "jpeg": {"quality": int(quality)},
               "webp": {"quality": int(quality), **({"lossless": True} if lossless else {})},
               "bmp": {}, "avif": {"quality": int(quality)},
               "heif": {"quality": int(quality)}}.get(fmt)
    if options is None:
        raise ValueError(f"unknown image format {fmt!r}")
    missing = pillow_plugin(fmt, write=True)
    if missing:
        raise DeblurcliError(f"cannot write {'HEIC' if fmt == 'heif' else fmt.upper()}: "
                             f"{missing}")
    meta = imagemeta.pillow_save_options(metadata, fmt)
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt.upper(), **options, **meta)
    except ValueError:  # metadata Pillow refuses (it is best effort): the pixels without it
        if not meta:
            raise
        buf = io.BytesIO()
        im.save(buf, format=fmt.upper(), **options)
    return buf.getvalue()


def _png16_grey_alpha(arr: np.ndarray) -> bytes:
    """Minimal PNG encoder for 16-bit grey + alpha (colour type 4), which OpenCV cannot write."""
    import zlib

    h, w, _ = arr.shape
    rows = np.ascontiguousarray(arr.astype(">u2")).reshape(h, w * 2).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


MAX_SIDE = {"jpeg": 65500, "webp": 16383}  # the widest and tallest image each format holds


def side_limit_problem(fmt: str, width: int, height: int) -> str | None:
    """Why format ``fmt`` cannot hold a ``width`` x ``height`` image (a side past its limit),
    or None. Checked before the encoder, which would say it with a line of its own on stderr
    (libjpeg), and before a deblurring whose output could not be written."""
    limit = MAX_SIDE.get(fmt)
    if limit is None or max(width, height) <= limit:
        return None
    name = "JPEG" if fmt == "jpeg" else "WebP"
    return f"{name} holds at most {limit} px a side, not this {width}x{height} image; choose " \
        "another --ext"


def format_of(path: PathLike) -> str | None:
    """The format a path's suffix picks for writing (``"png"``, ``"jpeg"``, ...), or None."""
    return _FORMAT_BY_SUFFIX.get(Path(path).suffix.lower())


def write_image(path: PathLike, pixels: np.ndarray, *, like: ImageData | None = None,
                before_replace: Callable[[Path], None] | None = None, **options: Any) -> None:
    """Write float pixels in ``[0, 1]`` to ``path`` atomically; the suffix picks the format
    (``.png .jpg .jpeg .tif .tiff .webp .bmp``). Parent folders are created.

    ``options`` are :func:`encode_image`'s (``alpha``, ``grayscale``, ``bit_depth``, ``quality``,
    ``compress_level``, ``metadata``); ``like``, the :class:`ImageData` the pixels were made
    from, gives the ones not given (its alpha, grey-ness, bit depth and metadata), so that
    ``write_image(out, pipe(image.pixels), like=image)`` writes the photo back as it came.
    ``before_replace`` is :func:`atomic_write`'s.
    """
    if like is not None:
        options = {"alpha": like.alpha, "grayscale": like.grayscale,
                   "bit_depth": like.bit_depth, "metadata": like.metadata,
                   "lossless": like.lossless, **options}
    path = Path(path)
    fmt = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DeblurcliError(
            f"cannot write {path}: unknown image suffix {path.suffix!r} "
            f"(use one of {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    try:
        data = encode_image(fmt, pixels, **options)
    except ImageWriteError as exc:
        raise ImageWriteError(f"cannot write {path}: {exc}") from None
    atomic_write_bytes(path, data, before_replace=before_replace)


# --------------------------------------------------------------------------------------------
# listing


@dataclass
class FolderListing:
    """What :func:`scan_folder` found; every list is sorted by path.

    Attributes:
        images: ``(path, stat)`` of each regular file with an image suffix (symlinks followed).
        problems: ``(path, reason)`` of each entry with an image suffix that is not a readable
            regular file (symlink loop, broken symlink, named pipe, socket, device, link to a
            folder) and of each sub-folder that could not be listed.
        others: files without an image suffix.
        folder_links: links to folders without an image suffix (not followed, not listed).
        folders: ``(st_dev, st_ino)`` of every folder that was listed.
    """

    images: list[tuple[Path, os.stat_result]] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    folder_links: list[Path] = field(default_factory=list)
    folders: set[tuple[int, int]] = field(default_factory=set)


def scan_folder(folder: PathLike, *, recursive: bool = False,
                suffixes: frozenset[str] = IMAGE_SUFFIXES) -> FolderListing:
    """List ``folder`` (and with ``recursive`` its sub-folders) without raising for any entry.

    Hidden names (starting with ``.``, e.g. the temporary files of atomic writes) are ignored, and
    so are sub-folders unless ``recursive``. Symlinks to folders are not followed, so a link cannot
    make a loop or pull a second copy of a tree in. Every image-suffixed entry is ``stat``-ed once
    (without opening it) to tell regular files from the rest. Raises
    :class:`~deblurcli.errors.ImageReadError` only if ``folder`` itself is not a folder or cannot
    be listed. ``suffixes`` are the (lower-case) suffixes listed as ``images`` (``deblur`` adds
    its video suffixes).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder} is not a folder")
    listing = FolderListing()
    pending = [folder]
    while pending:
        here = pending.pop()
        try:
            info = os.stat(here)
            with os.scandir(here) as it:
                entries = list(it)
        except OSError as exc:
            if here is folder:
                raise ImageReadError(f"cannot list {folder}: {exc.strerror or exc}") from None
            listing.problems.append((here, f"cannot list this folder: {exc.strerror or exc}"))
            continue
        key = (info.st_dev, info.st_ino)
        if key in listing.folders:  # the same folder reached twice (e.g. a bind mount)
            continue
        listing.folders.add(key)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_link = entry.is_symlink()
                is_real_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_link, is_real_dir = False, False
            if is_real_dir:
                if recursive:
                    pending.append(path)
                continue
            if path.suffix.lower() not in suffixes:
                if is_link and _is_dir(path):  # a link to a folder is no file to report
                    listing.folder_links.append(path)
                else:
                    listing.others.append(path)
                continue
            try:
                info = os.stat(path)
            except OSError as exc:
                listing.problems.append((path, stat_problem(exc, is_link)))
                continue
            reason = not_regular_reason(info.st_mode)
            if reason:
                if stat.S_ISDIR(info.st_mode):
                    reason = "a link to a folder (not followed), not an image file"
                listing.problems.append((path, reason))
            else:
                listing.images.append((path, info))
    listing.images.sort(key=lambda item: item[0])
    listing.problems.sort()
    listing.others.sort()
    listing.folder_links.sort()
    return listing


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def in_frame_order(paths: Iterable[Path]) -> list[Path]:
    """Frame files in the order of the numbers in their names (``f2.png`` before ``f10.png``,
    as numbered by ``ffmpeg -i clip.mp4 f%d.png``); zero-padded names keep their name order."""
    def key(path: Path) -> list:
        return [(0, int(part), part) if part.isdecimal() else (1, 0, part)
                for part in re.split(r"(\d+)", path.name) if part]

    return sorted(paths, key=key)


def list_images(
    folder: PathLike, *, recursive: bool = False, on_skip: Callable[[Path, str], None] | None = None
) -> list[Path]:
    """List the image files in ``folder`` (sorted), optionally descending into sub-folders.

    Only regular files with a suffix in :data:`IMAGE_SUFFIXES` are returned (see
    :func:`scan_folder`). Other files, entries that cannot be read (symlink loops, broken links,
    named pipes, devices) and sub-folders that cannot be listed are reported through
    ``on_skip(path, reason)``; hidden files (name starting with ``.``, e.g. temporary files of
    atomic writes) are ignored silently. Raises :class:`~deblurcli.errors.ImageReadError` if
    ``folder`` is not a folder or cannot be listed.
    """
    listing = scan_folder(folder, recursive=recursive)
    if on_skip is not None:
        skipped = [(p, f"not an image (suffix {p.suffix or 'none'!r})") for p in listing.others]
        for path, reason in sorted(skipped + listing.problems):
            on_skip(path, reason)
    return [path for path, _ in listing.images]
