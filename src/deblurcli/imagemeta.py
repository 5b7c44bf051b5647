"""A photo's metadata carried from the input file to its deblurred output.

Kept: the **ICC colour profile** (without it a colour-managed viewer shows a wide-gamut photo, a
Display P3 phone picture say, washed out), **EXIF** (date taken, camera, exposure, GPS) and
**XMP** (ratings, keywords, captions of photo managers). The EXIF is brought in line with the
pixels written: its orientation tag says 1 (reading applied the rotation), its pixel dimensions
are the output's, and its embedded thumbnail (a picture of the blurry photo) is left out.

Where each lives, per format (what a format cannot hold is left out):

=========  ===================================  =========================================
format     read                                 written
=========  ===================================  =========================================
JPEG/WebP  ICC, EXIF, XMP (Pillow)              ICC, EXIF (up to 64 kB in JPEG), XMP
PNG        iCCP, eXIf, iTXt ``XML:com.adobe.xmp``  the same chunks (8 and 16 bits)
TIFF       ICC (tag 34675)                      ICC
BMP        nothing                              nothing
=========  ===================================  =========================================

An ICC profile is written only over pixels of its colour space (an RGB profile over RGB, a grey
one over grey): a CMYK JPEG is decoded to RGB without colour management, so its CMYK profile
would describe the output wrongly. Metadata is best effort: a block that cannot be parsed is
dropped, and never stops the image being read or written.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

_ORIENTATION = 0x0112
_EXIF_IFD = 0x8769
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
_EXIF_PREFIX = b"Exif\x00\x00"
_XMP_KEY = b"XML:com.adobe.xmp"
_JPEG_EXIF_MAX = 65533 - 2  # one APP1 segment, less its length field


@dataclass(frozen=True)
class ImageMetadata:
    """Raw metadata blocks of an image file (each ``None`` when absent).

    Attributes:
        icc: the ICC profile.
        exif: the EXIF block as a TIFF structure (``II*``/``MM*``), without the ``Exif\\0\\0``
            prefix JPEG files put before it.
        xmp: the XMP packet (UTF-8 XML).
    """

    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None

    def __bool__(self) -> bool:
        return bool(self.icc or self.exif or self.xmp)


def _exif_body(data: bytes | None) -> bytes | None:
    if not data:
        return None
    return data[len(_EXIF_PREFIX):] if data.startswith(_EXIF_PREFIX) else data


def from_pillow(im: Any) -> ImageMetadata:
    """The metadata of an opened Pillow image (JPEG, WebP)."""
    info = im.info
    xmp = info.get("xmp") or info.get(_XMP_KEY.decode())
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return ImageMetadata(icc=info.get("icc_profile") or None, exif=_exif_body(info.get("exif")),
                         xmp=xmp or None)


def png_chunks(data: bytes) -> dict[bytes, list[bytes]]:
    """The bodies of a PNG's ``iCCP``, ``eXIf`` and ``iTXt`` chunks, by type; the pixel data is
    skipped over, not read."""
    found: dict[bytes, list[bytes]] = {}
    pos = 8  # signature
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I", data[pos:pos + 4])[0], data[pos + 4:pos + 8]
        if kind == b"IEND":
            break
        if kind in (b"iCCP", b"eXIf", b"iTXt"):
            found.setdefault(kind, []).append(data[pos + 8:pos + 8 + length])
        pos += 12 + length  # length, type, body, CRC
    return found


def from_png(data: bytes) -> ImageMetadata:
    """The metadata of a PNG file's bytes (any bit depth)."""
    chunks = png_chunks(data)
    icc = exif = xmp = None
    for body in chunks.get(b"iCCP", [])[:1]:
        try:  # profile name, NUL, compression method (0: zlib), compressed profile
            icc = zlib.decompress(body[body.index(b"\x00") + 2:])
        except (ValueError, zlib.error):
            icc = None
    for body in chunks.get(b"eXIf", [])[:1]:
        exif = _exif_body(body)
    for body in chunks.get(b"iTXt", []):
        key, _, rest = body.partition(b"\x00")
        if key != _XMP_KEY or len(rest) < 2:
            continue
        compressed, text = rest[0], rest[2:]
        text = text.split(b"\x00", 2)[-1]  # language tag, NUL, translated keyword, NUL, text
        try:
            xmp = zlib.decompress(text) if compressed else text
        except zlib.error:
            xmp = None
        break
    return ImageMetadata(icc=icc, exif=exif, xmp=xmp)


def exif_orientation(meta: ImageMetadata) -> int:
    """The EXIF orientation code (1..8) of ``meta``; 1 when there is none or it cannot be read."""
    exif = _load_exif(meta.exif)
    try:
        return int(exif.get(_ORIENTATION, 1)) if exif is not None else 1
    except (TypeError, ValueError):
        return 1


def _load_exif(body: bytes | None):
    if not body:
        return None
    from PIL import Image

    exif = Image.Exif()
    try:
        with warnings.catch_warnings():  # Pillow warns of what it skips; the result tells
            warnings.simplefilter("ignore")
            exif.load(_EXIF_PREFIX + body)
    except Exception:  # noqa: BLE001 - a broken EXIF block is dropped, never fatal
        return None
    return exif if len(exif) else None


def _icc_space(icc: bytes) -> bytes | None:
    """The colour space signature of an ICC profile's header (``b"RGB "``, ``b"GRAY"``, ...)."""
    return icc[16:20] if len(icc) >= 128 else None


def for_output(meta: ImageMetadata | None, *, width: int, height: int,
               grayscale: bool) -> ImageMetadata | None:
    """``meta`` made true of the pixels written: an ICC profile only over its own colour space;
    EXIF with orientation 1, the output's pixel dimensions and no thumbnail."""
    if not meta:
        return None
    icc = meta.icc if meta.icc and _icc_space(meta.icc) == (
        b"GRAY" if grayscale else b"RGB ") else None
    exif = None
    loaded = _load_exif(meta.exif)
    if loaded is not None:
        try:
            if _ORIENTATION in loaded:
                loaded[_ORIENTATION] = 1
            sub = loaded.get_ifd(_EXIF_IFD) if _EXIF_IFD in loaded else {}
            if _PIXEL_X in sub or _PIXEL_Y in sub:
                sub[_PIXEL_X], sub[_PIXEL_Y] = width, height
            exif = _exif_body(loaded.tobytes()) or None  # IFD0 and its sub-IFDs, no IFD1
        except Exception:  # noqa: BLE001 - as _load_exif
            exif = None
    out = ImageMetadata(icc=icc, exif=exif, xmp=meta.xmp)
    return out if out else None


def pillow_save_options(meta: ImageMetadata | None, fmt: str) -> dict[str, Any]:
    """Keyword arguments for Pillow's ``Image.save`` in format ``fmt`` (``"jpeg"``, ``"webp"``,
    ``"png"``) that write ``meta`` (already passed through :func:`for_output`)."""
    if not meta or fmt not in ("jpeg", "webp", "png"):
        return {}
    options: dict[str, Any] = {}
    if meta.icc:
        options["icc_profile"] = meta.icc
    if meta.exif and not (fmt == "jpeg" and len(_EXIF_PREFIX + meta.exif) > _JPEG_EXIF_MAX):
        options["exif"] = _EXIF_PREFIX + meta.exif
    if meta.xmp:
        if fmt == "png":
            from PIL import PngImagePlugin

            info = PngImagePlugin.PngInfo()
            info.add_itxt(_XMP_KEY.decode(), meta.xmp.decode("utf-8", "replace"))
            options["pnginfo"] = info
        else:
            options["xmp"] = meta.xmp
    return options


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + \
        struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def add_to_png(png: bytes, meta: ImageMetadata | None) -> bytes:
    """``png`` (bytes of a PNG written without metadata) with ``meta``'s chunks after IHDR."""
    if not meta:
        return png
    extra = b""
    if meta.icc:
        extra += _chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(meta.icc))
    if meta.exif:
        extra += _chunk(b"eXIf", meta.exif)
    if meta.xmp:
        extra += _chunk(b"iTXt", _XMP_KEY + b"\x00\x00\x00\x00\x00" + meta.xmp)
    ihdr_end = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    return png[:ihdr_end] + extra + png[ihdr_end:]
