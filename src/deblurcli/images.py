"""Image files <-> float32 RGB arrays, atomic writes and folder listing.

Reading returns :class:`ImageData`: ``pixels`` are float32 ``(H, W, 3)`` RGB in ``[0, 1]`` (grey
images are repeated to three channels), with the alpha channel, the grey-ness and the bit depth
(8 or 16) kept so that :func:`write_image` can write the result back in the same kind of file.
EXIF orientation is applied on reading.

Back-ends: Pillow for JPEG, WebP, BMP and 8-bit PNG; tifffile for TIFF; OpenCV (``cv2``, installed
with pyiqa as ``opencv-python-headless``) for 16-bit PNG, because Pillow reduces 16-bit colour PNGs
to 8 bits. Every write encodes in memory first and then goes through :func:`atomic_write_bytes`
(temporary file in the destination folder + ``os.replace``), so no half-written file is ever left.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deblurcli.errors import DeblurcliError, ImageReadError

PathLike = str | os.PathLike

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}
)

_FORMAT_BY_SUFFIX = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".webp": "webp",
    ".bmp": "bmp",
}
_EXIF_ORIENTATION = 0x0112


@dataclass
class ImageData:
    """A decoded image and what is needed to write it back faithfully.

    Attributes:
        pixels: float32 ``(H, W, 3)`` RGB in ``[0, 1]``, sRGB-encoded, orientation applied.
        alpha: float32 ``(H, W)`` in ``[0, 1]``, or ``None`` when the file has no alpha.
        grayscale: the file was single-channel (or grey + alpha).
        bit_depth: 8 or 16 (bits per channel of the file; float TIFFs count as 16).
        format: ``"png" | "jpeg" | "tiff" | "webp" | "bmp"``.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    grayscale: bool
    bit_depth: int
    format: str


# --------------------------------------------------------------------------------------------
# atomic writes


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file in the same folder, which
    then gets the usual permissions (``0o666`` minus the umask) and replaces ``path``.

    The parent folder is created if needed. On any failure the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched. Every file the project writes goes
    through here (images, manifests, model folders, reports).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        write(Path(tmp))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


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
    return None


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


def _to_unit_float(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer/float samples -> float32 in [0, 1] and the bit depth to write back (8 or 16)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), 8
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0, 8
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0, 16
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0), 16
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
    arr: np.ndarray, fmt: str, orientation: int, grey_file: bool | None = None
) -> ImageData:
    arr = apply_orientation(arr, orientation)
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
    )


def _pillow_orientation(im) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not stop reading pixels
        return 1


def _png_orientation(path: Path) -> int:
    """EXIF orientation of a PNG from its eXIf chunk, found by skipping over chunk data."""
    from PIL import Image

    with open(path, "rb") as fh:
        fh.seek(8)  # signature
        while True:
            header = fh.read(8)
            if len(header) < 8:
                return 1
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"eXIf":
                exif = Image.Exif()
                try:
                    exif.load(fh.read(length))
                    return int(exif.get(_EXIF_ORIENTATION, 1))
                except Exception:  # noqa: BLE001 - as _pillow_orientation
                    return 1
            if kind == b"IEND":
                return 1
            fh.seek(length + 4, 1)  # data + CRC


def _read_pillow(data: bytes, fmt: str) -> ImageData:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    orientation = _pillow_orientation(im)
    mode = im.mode
    if mode in ("1", "L"):
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
    elif mode in ("RGBA", "RGBa"):
        arr = np.asarray(im.convert("RGBA"))
    else:  # RGB, CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(im.convert("RGB"))
    return _finish(arr, fmt, orientation)


def _read_png16(data: bytes) -> ImageData:
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - cv2 comes with pyiqa
        raise ImageReadError(
            "reading 16-bit PNG needs OpenCV: pip install opencv-python-headless"
        ) from exc
    from PIL import Image

    colour_type = data[25]
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("OpenCV could not decode the PNG")
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
    orientation = _pillow_orientation(Image.open(io.BytesIO(data)))
    return _finish(arr, "png", orientation, grey_file=colour_type in (0, 4))


def _read_tiff(data: bytes) -> ImageData:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        tag = page.tags.get(274)
        orientation = int(tag.value) if tag is not None else 1
        photometric = int(page.photometric)
    if arr.ndim == 3 and arr.shape[2] > 4:
        raise ValueError(f"unsupported TIFF with {arr.shape[2]} channels")
    if photometric == 0 and np.issubdtype(arr.dtype, np.integer):  # MINISWHITE: invert
        arr = np.iinfo(arr.dtype).max - arr
    return _finish(arr, "tiff", orientation)


def read_image(path: PathLike) -> ImageData:
    """Read an image file (PNG, JPEG, TIFF, WebP, BMP) as :class:`ImageData`.

    The format is recognised from the file's content, not its suffix. EXIF orientation is applied.
    Raises :class:`~deblurcli.errors.ImageReadError` (one line) for missing, unreadable, corrupt or
    unsupported files.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(f"cannot read {path}: no such file") from None
    except IsADirectoryError:
        raise ImageReadError(f"cannot read {path}: it is a folder, not an image") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}") from None
    fmt = _sniff_format(data[:16])
    if fmt is None:
        raise ImageReadError(f"cannot read {path}: not a PNG, JPEG, TIFF, WebP or BMP image")
    try:
        if fmt == "tiff":
            return _read_tiff(data)
        if fmt == "png" and len(data) > 25 and data[24] == 16:
            return _read_png16(data)
        return _read_pillow(data, fmt)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds of errors
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(
            f"cannot read {path}: corrupt or unsupported {fmt.upper()} ({detail})"
        ) from None


def image_size(path: PathLike) -> tuple[int, int]:
    """Return ``(height, width)`` of an image after EXIF orientation, reading only its header.

    Raises :class:`~deblurcli.errors.ImageReadError` if the file cannot be opened as an image.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
        fmt = _sniff_format(head)
        if fmt is None:
            raise ImageReadError(f"cannot read {path}: not a PNG, JPEG, TIFF, WebP or BMP image")
        if fmt == "tiff":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                h, w = int(page.imagelength), int(page.imagewidth)
                tag = page.tags.get(274)
                orientation = int(tag.value) if tag is not None else 1
        else:
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                # Pillow's PNG getexif() decodes every pixel to reach an eXIf chunk after IDAT
                orientation = _png_orientation(path) if fmt == "png" else _pillow_orientation(im)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"cannot read {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(
            f"cannot read {path}: corrupt or unsupported image ({detail})"
        ) from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# --------------------------------------------------------------------------------------------
# writing


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
) -> bytes:
    """Encode pixels as the bytes of an image file of format ``fmt`` (see :func:`write_image`)."""
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"pixels must have shape (H, W, 3) or (H, W), got {pixels.shape}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if fmt not in ("png", "tiff"):
        bit_depth = 8
    if fmt == "jpeg":
        alpha = None
    colour = pixels.mean(axis=2, keepdims=True) if (grayscale and pixels.shape[2] == 3) else pixels
    if pixels.shape[2] == 1 and not grayscale:
        colour = np.repeat(pixels, 3, axis=2)
    planes = [colour]
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.shape != pixels.shape[:2]:
            raise ValueError(f"alpha shape {alpha.shape} does not match pixels {pixels.shape[:2]}")
        planes.append(alpha[..., None])
    arr = _quantise(np.concatenate(planes, axis=2), bit_depth)
    channels = arr.shape[2]
    if channels == 1:
        arr = arr[..., 0]

    if fmt == "tiff":
        import tifffile

        buf = io.BytesIO()
        kwargs = {"extrasamples": ["unassalpha"]} if alpha is not None else {}
        photometric = "minisblack" if channels in (1, 2) else "rgb"
        tifffile.imwrite(buf, arr, photometric=photometric, compression="zlib", **kwargs)
        return buf.getvalue()
    if fmt == "png" and bit_depth == 16:
        if channels == 2:  # grey + alpha: OpenCV cannot write it
            return _png16_grey_alpha(arr)
        return _png16_bytes(arr)

    from PIL import Image

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    if fmt == "bmp" and mode == "LA":
        arr, mode = arr[..., 0], "L"
    im = Image.fromarray(np.ascontiguousarray(arr))
    if im.mode != mode:  # pragma: no cover - Pillow infers the mode from the array shape
        raise ValueError(f"unexpected Pillow mode {im.mode} for {mode}")
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=int(compress_level))
    elif fmt == "jpeg":
        im.save(buf, format="JPEG", quality=int(quality))
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=int(quality))
    elif fmt == "bmp":
        im.save(buf, format="BMP")
    else:
        raise ValueError(f"unknown image format {fmt!r}")
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


def write_image(
    path: PathLike,
    pixels: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    grayscale: bool = False,
    bit_depth: int = 8,
    quality: int = 95,
    compress_level: int = 6,
) -> None:
    """Write float pixels in ``[0, 1]`` to ``path`` atomically; the suffix picks the format.

    Args:
        path: destination; ``.png .jpg .jpeg .tif .tiff .webp .bmp``. Parent folders are created.
        pixels: float ``(H, W, 3)`` RGB (or ``(H, W)`` grey) in ``[0, 1]``; values are clipped.
        alpha: optional ``(H, W)`` alpha in ``[0, 1]``; JPEG cannot store it and drops it.
        grayscale: write a single-channel file (the mean of the three channels).
        bit_depth: 8 or 16; 16 is kept for PNG and TIFF, other formats are written with 8 bits.
        quality: JPEG/WebP quality (1-100).
        compress_level: zlib level (0-9) for 8-bit PNG; 1 is ~3x faster than 6 and ~20% larger.
    """
    path = Path(path)
    fmt = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DeblurcliError(
            f"cannot write {path}: unknown image suffix {path.suffix!r} "
            f"(use one of {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    data = encode_image(
        fmt,
        pixels,
        alpha=alpha,
        grayscale=grayscale,
        bit_depth=bit_depth,
        quality=quality,
        compress_level=compress_level,
    )
    atomic_write_bytes(path, data)


# --------------------------------------------------------------------------------------------
# listing


def list_images(
    folder: PathLike, *, recursive: bool = False, on_skip: Callable[[Path, str], None] | None = None
) -> list[Path]:
    """List image files in ``folder`` (sorted), optionally descending into sub-folders.

    Files whose suffix is not in :data:`IMAGE_SUFFIXES` are skipped and reported through
    ``on_skip(path, reason)``; hidden files (name starting with ``.``, e.g. temporary files of
    atomic writes) are ignored silently. Raises :class:`~deblurcli.errors.ImageReadError` if
    ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder} is not a folder")
    found: list[Path] = []
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    for p in entries:
        rel_parts = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel_parts):
            continue
        if p.is_dir():
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES:
            found.append(p)
        elif on_skip is not None:
            on_skip(p, f"not an image (suffix {p.suffix or 'none'!r})")
    return found
