"""A photo's metadata carried from the input file to its deblurred output.

Kept: the **ICC colour profile** (without it a colour-managed viewer shows a wide-gamut photo, a
Display P3 phone picture say, washed out), **EXIF** (date taken, camera, exposure, GPS) and
**XMP** (ratings, keywords, captions of photo managers). They are made true of the pixels
written: the orientation says 1 in EXIF and XMP (reading applied the rotation), the EXIF pixel
dimensions are the output's, and the EXIF thumbnail (a picture of the blurry photo) is cut off.
The EXIF block is patched in place, never re-laid out, so that maker notes that point at
absolute offsets stay readable.

The print resolution (DPI) goes along: JPEG's JFIF density, PNG's pHYs, TIFF's resolution
tags (WebP, AVIF and HEIC have none of their own).

What each format gets:

=========  ===================================  ==============================================
format     read                                 written
=========  ===================================  ==============================================
JPEG       ICC, EXIF, XMP (Pillow)              ICC; EXIF and XMP when each fits one segment
WebP       ICC, EXIF, XMP (Pillow)              ICC, EXIF, XMP
AVIF/HEIC  ICC, EXIF, XMP (Pillow/pillow-heif)  ICC, EXIF, XMP
PNG        iCCP, eXIf; XMP from iTXt/tEXt/zTXt; iCCP, eXIf, iTXt ``XML:com.adobe.xmp``;
           gAMA, cHRM, sRGB, cICP               gAMA, cHRM, sRGB, cICP as they were
TIFF       ICC, XMP, EXIF (its own tags; no     ICC, XMP, EXIF (maker notes dropped)
           maker notes)
BMP        nothing                              nothing
=========  ===================================  ==============================================

An ICC profile is written only over pixels of its colour space (an RGB profile over RGB, a grey
one over grey): a CMYK JPEG is decoded to RGB without colour management, so its CMYK profile
would describe the output wrongly. Metadata is best effort: a block that cannot be parsed, or
that inflates beyond :data:`MAX_INFLATED_BYTES`, is dropped and never stops an image.

A TIFF file holds its EXIF as tags of its own: the descriptive ones of its first directory
(camera, date, artist, copyright, description), an Exif and a GPS sub-directory. Reading one
gathers them into an EXIF block; writing one lays that block's tags out in the file (Pillow
serialises them), without the maker notes, whose inner offsets would point astray there.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

MAX_INFLATED_BYTES = 16 << 20
"""Largest compressed PNG metadata block (ICC profile, XMP) that is inflated; a larger one is
dropped (a few kB of file could otherwise ask for gigabytes)."""

_EXIF_PREFIX = b"Exif\x00\x00"
_XMP_KEY = b"XML:com.adobe.xmp"
_JPEG_MARKER_BYTES = 65533  # the data of one JPEG segment, as Pillow counts it
_JPEG_XMP_HEADER = len(b"http://ns.adobe.com/xap/1.0/\x00")
_ORIENTATION, _WIDTH, _LENGTH = 0x0112, 0x0100, 0x0101
_X_RESOLUTION, _Y_RESOLUTION = 0x011A, 0x011B
_EXIF_IFD, _PIXEL_X, _PIXEL_Y = 0x8769, 0xA002, 0xA003
_GPS_IFD, _INTEROP_IFD, _MAKER_NOTE, _TIFF_XMP = 0x8825, 0xA005, 0x927C, 700
#: Descriptive tags of a TIFF's first directory carried with EXIF: ImageDescription, Make,
#: Model, Orientation, DateTime, Artist, Copyright; Windows' Rating, RatingPercent and
#: XPTitle, XPComment, XPAuthor, XPKeywords, XPSubject.
_TIFF_IFD0_TAGS = (0x010E, 0x010F, 0x0110, _ORIENTATION, 0x0132, 0x013B, 0x8298, 0x4746, 0x4749,
                   0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F)
_ASCII, _SHORT, _LONG = 2, 3, 4
_XMP_ORIENTATION = re.compile(  # an attribute or an element
    rb'(?P<a>tiff:Orientation\s*=\s*["\'])(?P<av>[0-9]+)(?P<a_end>["\'])'
    rb'|(?P<e><tiff:Orientation>)\s*(?P<ev>[0-9]+)\s*(?P<e_end></tiff:Orientation>)')


@dataclass(frozen=True)
class ImageMetadata:
    """Raw metadata blocks of an image file (each ``None`` when absent).

    Attributes:
        icc: the ICC profile.
        exif: the EXIF block as a TIFF structure (``II*``/``MM*``), without the ``Exif\\0\\0``
            prefix JPEG files put before it.
        xmp: the XMP packet (UTF-8 XML).
        dpi: the print resolution ``(x, y)`` in pixels per inch: JPEG's JFIF density, PNG's
            pHYs, a TIFF's resolution tags.
        png_colour: a PNG's colour chunks besides its profile (``gAMA``, ``cHRM``, ``sRGB``,
            ``cICP``), whole, in file order: they say how to show its values, and a PNG output
            gets them back (other formats have no place for them).
    """

    icc: bytes | None = None
    exif: bytes | None = None
    xmp: bytes | None = None
    dpi: tuple[float, float] | None = None
    png_colour: tuple[bytes, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.icc or self.exif or self.xmp or self.dpi or self.png_colour)

    def turned(self) -> ImageMetadata:
        """The metadata of the photo turned by a quarter: the resolution's x and y swapped (the
        print resolution and EXIF's XResolution and YResolution)."""
        return replace(self, dpi=self.dpi[::-1] if self.dpi else None,
                       exif=_turned_exif(self.exif) if self.exif else self.exif)


def _exif_body(data: bytes | None) -> bytes | None:
    if not data:
        return None
    return data[len(_EXIF_PREFIX):] if data.startswith(_EXIF_PREFIX) else data


def _inflate(data: bytes) -> bytes | None:
    """``data`` decompressed, or None when it is not zlib data or inflates beyond the limit."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error:
        return None
    return None if inflater.unconsumed_tail else out


def _dpi(value: Any) -> tuple[float, float] | None:
    """A resolution ``(x, y)`` in pixels per inch, or None when it is missing or unusable."""
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (0 < x < 1e6 and 0 < y < 1e6):
        return None
    # PNG stores pixels per metre: 300 dpi reads back as 299.9994, 72 as 72.009
    return tuple(float(round(v)) if abs(v - round(v)) < 0.02 else round(v, 2) for v in (x, y))


def from_pillow(im: Any) -> ImageMetadata:
    """The metadata of an opened Pillow image (JPEG, WebP)."""
    info = im.info
    xmp = info.get("xmp") or info.get(_XMP_KEY.decode())
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    dpi = _dpi(info.get("dpi"))
    if im.format == "JPEG" and info.get("jfif_unit") not in (1, 2):
        # no JFIF density in inches or cm: EXIF's resolution, as cameras state it (Pillow fills
        # "dpi" with EXIF's x for both, or with 72 where EXIF states none)
        dpi = _exif_dpi(im)
    return ImageMetadata(icc=info.get("icc_profile") or None, exif=_exif_body(info.get("exif")),
                         xmp=xmp or None, dpi=dpi)


def _exif_dpi(im: Any) -> tuple[float, float] | None:
    """The resolution EXIF's first directory states (XResolution, YResolution, in inches or
    cm by ResolutionUnit, inches where it is absent), in pixels per inch; None without one."""
    try:
        with _quiet():
            tags = im.getexif()
            unit, x = tags.get(0x0128, 2), tags.get(0x011A)
            y = tags.get(0x011B, x)
            if x is None or unit not in (2, 3):  # 1: no absolute unit
                return None
            scale = 2.54 if unit == 3 else 1.0
            return _dpi((float(x) * scale, float(y) * scale))
    except Exception:  # noqa: BLE001 - metadata is best effort
        return None


def from_tiff(im: Any) -> ImageMetadata:
    """The metadata of a TIFF opened by Pillow: its ICC profile, XMP (tag 700) and an EXIF block
    made of its descriptive tags and its Exif and GPS directories, each entry of the type it
    was stored with (None when it has none)."""
    ifd0 = im.tag_v2
    block = None
    try:
        with _quiet():
            fp = im.fp
            fp.seek(0, io.SEEK_END)
            size = fp.tell()
            fp.seek(0)
            head = fp.read(16)  # a BigTIFF's 16 bytes, a classic TIFF's 8
            head = head if head[2:4] in (b"+\x00", b"\x00+") else head[:8]
            values = {tag: ifd0[tag] for tag in _TIFF_IFD0_TAGS if tag in ifd0}
            if str(values.get(0x010E, "")).startswith('{"shape":'):  # tifffile's array shape
                del values[0x010E]
            directories = _directories(fp, head, ifd0, size)
            if values or directories:
                block = _exif_block(values, {tag: ifd0.tagtype.get(tag) for tag in values},
                                    directories)
    except Exception:  # noqa: BLE001 - metadata is best effort
        block = None
    xmp = ifd0.get(_TIFF_XMP)
    if isinstance(xmp, str):  # stored as ASCII: Pillow decoded the bytes as latin-1
        xmp = xmp.encode("latin-1", "replace")
    return ImageMetadata(icc=im.info.get("icc_profile") or None, exif=block,
                         xmp=bytes(xmp) if isinstance(xmp, (bytes, bytearray)) and xmp else None,
                         dpi=_tiff_dpi(im, ifd0))


def _tiff_dpi(im: Any, ifd0: Any) -> tuple[float, float] | None:
    """A TIFF's stated resolution in pixels per inch: Pillow says 1 dpi where the file states
    no XResolution, and 1 for a missing YResolution (which is then XResolution's)."""
    if _X_RESOLUTION not in ifd0:
        return None
    dpi = _dpi(im.info.get("dpi"))
    return dpi if dpi is None or _Y_RESOLUTION in ifd0 else (dpi[0], dpi[0])


def _exif_block(values: dict, types: dict, directories: dict[int, tuple[dict, dict]]) -> bytes:
    """A little-endian EXIF block: a first directory of ``values`` (of ``types``) pointing at
    ``directories`` (``{Exif or GPS tag: (values, types)}``), appended after it."""
    head = b"II*\x00" + struct.pack("<I", 8)
    places = {tag: 0 for tag in directories}
    block = bytearray(head + _directory_bytes(None, {**values, **places},
                                              {**types, **{tag: _LONG for tag in places}},
                                              head, 8))
    for at, tag, kind, n in list(_ifd_entries(bytes(block), 8, "<")):
        if tag in directories and kind == _LONG and n == 1:
            block += bytes(len(block) % 2)
            struct.pack_into("<I", block, at + 8, len(block))
            block += _directory_bytes(tag, *directories[tag], head, len(block))
    return bytes(block)


_PNG_COLOUR = (b"gAMA", b"cHRM", b"sRGB", b"cICP")
_PNG_METADATA = (b"iCCP", b"eXIf", b"iTXt", b"tEXt", b"zTXt", b"pHYs", *_PNG_COLOUR)


def png_chunks(fh: BinaryIO, kinds: tuple[bytes, ...] = _PNG_METADATA) -> dict[bytes,
                                                                               list[bytes]]:
    """The bodies of the chunks of the types ``kinds`` (by default the metadata: ``iCCP``,
    ``eXIf``, ``iTXt``, ``tEXt``, ``zTXt``, ``pHYs``) of the PNG file ``fh``, by type; the pixel
    data is skipped over, not read, and so is a chunk larger than :data:`MAX_INFLATED_BYTES`."""
    found: dict[bytes, list[bytes]] = {}
    fh.seek(8)  # signature
    while True:
        header = fh.read(8)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I", header[:4])[0], header[4:]
        if kind == b"IEND":
            break
        if kind in kinds and length <= MAX_INFLATED_BYTES:
            found.setdefault(kind, []).append(fh.read(length))
            fh.seek(4, 1)  # CRC
        else:
            fh.seek(length + 4, 1)
    return found


def _png_xmp(chunks: dict[bytes, list[bytes]]) -> bytes | None:
    for kind in (b"iTXt", b"zTXt", b"tEXt"):
        for body in chunks.get(kind, []):
            key, _, rest = body.partition(b"\x00")
            if key != _XMP_KEY:
                continue
            if kind == b"tEXt":
                return rest or None
            if kind == b"zTXt":  # compression method, compressed text
                return _inflate(rest[1:]) or None
            if len(rest) < 2:
                continue
            # compression flag, method, language tag NUL, translated keyword NUL, text
            compressed, text = rest[0], rest[2:].split(b"\x00", 2)[-1]
            return (_inflate(text) if compressed else text) or None
    return None


def from_png(source: bytes | BinaryIO) -> ImageMetadata:
    """The metadata of a PNG file (any bit depth): its bytes or the open file."""
    chunks = png_chunks(io.BytesIO(source) if isinstance(source, bytes) else source)
    icc = None
    for body in chunks.get(b"iCCP", [])[:1]:  # profile name, NUL, method (0: zlib), profile
        name_end = body.find(b"\x00")
        icc = _inflate(body[name_end + 2:]) if name_end >= 0 else None
    exif = _exif_body(chunks.get(b"eXIf", [None])[0])
    dpi = None
    for body in chunks.get(b"pHYs", [])[:1]:  # pixels per unit x, y; unit 1: the metre
        if len(body) == 9 and body[8] == 1:
            dpi = _dpi(v * 0.0254 for v in struct.unpack(">II", body[:8]))
    colour = tuple(_chunk(kind, body) for kind in _PNG_COLOUR for body in chunks.get(kind, [])[:1])
    return ImageMetadata(icc=icc or None, exif=exif, xmp=_png_xmp(chunks), dpi=dpi,
                         png_colour=colour)


# --------------------------------------------------------------------------------------------
# EXIF: a TIFF structure, read and patched in place


def _ifd_entries(exif: bytes, offset: int, order: str):
    """``(position of the entry, tag, type, count)`` of each entry of the IFD at ``offset``."""
    (count,) = struct.unpack_from(order + "H", exif, offset)
    for i in range(count):
        at = offset + 2 + 12 * i
        tag, kind, n = struct.unpack_from(order + "HHI", exif, at)
        yield at, tag, kind, n


def _exif_layout(exif: bytes):
    """``(byte order, IFD0 offset)`` of an EXIF block; ValueError when it is not one."""
    order = {b"II": "<", b"MM": ">"}.get(exif[:2])
    if order is None or struct.unpack_from(order + "H", exif, 2)[0] != 42:
        raise ValueError("not a TIFF structure")
    return order, struct.unpack_from(order + "I", exif, 4)[0]


def exif_orientation(meta: ImageMetadata | None) -> int:
    """The orientation code (1..8) of ``meta``: EXIF's, else XMP's ``tiff:Orientation`` (as
    Pillow reads it); 1 when there is none or it cannot be read."""
    if not meta:
        return 1
    try:
        order, ifd0 = _exif_layout(meta.exif or b"")
        for at, tag, kind, n in _ifd_entries(meta.exif, ifd0, order):
            if tag == _ORIENTATION and kind in (_SHORT, _LONG) and n == 1:
                value = struct.unpack_from(order + ("H" if kind == _SHORT else "I"), meta.exif,
                                           at + 8)[0]
                return value if 1 <= value <= 8 else 1
    except (struct.error, ValueError):
        pass
    found = _XMP_ORIENTATION.search(meta.xmp or b"")
    if found is not None:
        value = int(found["av"] or found["ev"])
        return value if 1 <= value <= 8 else 1
    return 1


def _turned_exif(exif: bytes) -> bytes:
    """``exif`` with IFD0's XResolution and YResolution swapped (each entry points at its
    value: the two pointers trade places); ``exif`` itself when it has not both or is no EXIF."""
    try:
        order, ifd0 = _exif_layout(exif)
        at = {tag: (at, kind, n) for at, tag, kind, n in _ifd_entries(exif, ifd0, order)
              if tag in (_X_RESOLUTION, _Y_RESOLUTION)}
        if len(at) != 2 or at[_X_RESOLUTION][1:] != at[_Y_RESOLUTION][1:]:
            return exif
        out = bytearray(exif)
        x, y = at[_X_RESOLUTION][0] + 8, at[_Y_RESOLUTION][0] + 8
        out[x:x + 4], out[y:y + 4] = exif[y:y + 4], exif[x:x + 4]
        return bytes(out)
    except (struct.error, ValueError):
        return exif


def _patched_exif(exif: bytes, width: int, height: int) -> bytes | None:
    """``exif`` with orientation 1, the pixel size ``width`` x ``height`` and no thumbnail
    (IFD0's link to IFD1 cut); every other byte where it was. None when it is no EXIF block."""
    try:
        order, ifd0 = _exif_layout(exif)
        out = bytearray(exif)
        sizes = {_WIDTH: width, _LENGTH: height, _PIXEL_X: width, _PIXEL_Y: height}

        def patch(offset: int, tags: set[int]) -> int | None:
            """Patch the IFD at ``offset``; return its Exif sub-IFD offset, if it has one."""
            sub = None
            entries = list(_ifd_entries(exif, offset, order))
            for at, tag, kind, n in entries:
                if n != 1 or tag not in tags | {_EXIF_IFD}:
                    continue
                if tag == _EXIF_IFD and kind == _LONG:
                    sub = struct.unpack_from(order + "I", exif, at + 8)[0]
                elif tag == _ORIENTATION and kind in (_SHORT, _LONG):
                    struct.pack_into(order + ("H" if kind == _SHORT else "I"), out, at + 8, 1)
                elif tag in sizes and kind == _LONG:
                    struct.pack_into(order + "I", out, at + 8, sizes[tag])
                elif tag in sizes and kind == _SHORT and sizes[tag] <= 0xFFFF:
                    struct.pack_into(order + "H", out, at + 8, sizes[tag])
            if offset == ifd0:  # cut the link to IFD1 and blank the thumbnail it points at
                link = offset + 2 + 12 * len(entries)
                ifd1 = struct.unpack_from(order + "I", exif, link)[0]
                struct.pack_into(order + "I", out, link, 0)
                if 8 <= ifd1 < len(exif):
                    _blank_thumbnail(exif, out, ifd1, order)
            return sub

        sub = patch(ifd0, {_ORIENTATION, _WIDTH, _LENGTH})
        if sub is not None and 8 <= sub < len(exif):
            patch(sub, {_PIXEL_X, _PIXEL_Y})
        return bytes(out)
    except (struct.error, ValueError):
        return None


def _without_orientation(exif: bytes) -> bytes:
    """``exif`` without IFD0's Orientation entry: the entries after it move up one place and
    the link to the next directory with them; no value moves (what is left at the old end of
    the directory is referenced by nothing). ``exif`` itself when it has none or is no EXIF."""
    try:
        order, ifd0 = _exif_layout(exif)
        entries = list(_ifd_entries(exif, ifd0, order))
        at = next((at for at, tag, _, _ in entries if tag == _ORIENTATION), None)
        if at is None:
            return exif
        out = bytearray(exif)
        end = ifd0 + 2 + 12 * len(entries) + 4  # the entries and the link after them
        out[at:end - 12] = exif[at + 12:end]
        struct.pack_into(order + "H", out, ifd0, len(entries) - 1)
        return bytes(out)
    except (struct.error, ValueError):
        return exif


def _blank_thumbnail(exif: bytes, out: bytearray, ifd1: int, order: str) -> None:
    """Zero the JPEG thumbnail that IFD1 at ``ifd1`` points at (dropped from the end)."""
    where = {tag: struct.unpack_from(order + "I", exif, at + 8)[0]
             for at, tag, kind, n in _ifd_entries(exif, ifd1, order)
             if tag in (0x0201, 0x0202) and kind == _LONG and n == 1}
    start, size = where.get(0x0201, 0), where.get(0x0202, 0)
    if 8 <= start and size and start + size <= len(out):
        out[start:start + size] = bytes(size)
        if start + size == len(out):
            del out[start:]


def _upright_xmp(xmp: bytes) -> bytes:
    """``xmp`` with ``tiff:Orientation`` set to 1 (Pillow and photo managers read it too)."""
    def one(match: re.Match) -> bytes:
        return match["a"] + b"1" + match["a_end"] if match["a"] is not None else \
            match["e"] + b"1" + match["e_end"]

    return _XMP_ORIENTATION.sub(one, xmp)


def _icc_space(icc: bytes) -> bytes | None:
    """The colour space signature of an ICC profile's header (``b"RGB "``, ``b"GRAY"``, ...)."""
    return icc[16:20] if len(icc) >= 128 else None


def for_output(meta: ImageMetadata | None, *, width: int, height: int,
               grayscale: bool) -> ImageMetadata | None:
    """``meta`` made true of the ``width`` x ``height`` pixels written (grey or RGB): an ICC
    profile only over its own colour space; orientation 1 in EXIF and XMP; the EXIF pixel size
    of the output and no thumbnail."""
    if not meta:
        return None
    icc = meta.icc if meta.icc and _icc_space(meta.icc) == (
        b"GRAY" if grayscale else b"RGB ") else None
    exif = _patched_exif(meta.exif, width, height) if meta.exif else None
    xmp = _upright_xmp(meta.xmp) if meta.xmp else None
    out = ImageMetadata(icc=icc, exif=exif, xmp=xmp, dpi=meta.dpi, png_colour=meta.png_colour)
    return out if out else None


def pillow_save_options(meta: ImageMetadata | None, fmt: str) -> dict[str, Any]:
    """Keyword arguments for Pillow's ``Image.save`` in format ``fmt`` (``"jpeg"``, ``"webp"``,
    ``"png"``, ``"avif"``, ``"heif"``) that write ``meta`` (already passed through
    :func:`for_output`). In a JPEG, an EXIF or XMP block larger than one segment holds is left
    out."""
    if not meta or fmt not in ("jpeg", "webp", "png", "avif", "heif"):
        return {}
    if fmt == "jpeg":
        meta = replace(
            meta,
            exif=meta.exif if meta.exif and len(_EXIF_PREFIX + meta.exif) <= _JPEG_MARKER_BYTES
            else None,
            xmp=meta.xmp if meta.xmp and len(meta.xmp) <= _JPEG_MARKER_BYTES - _JPEG_XMP_HEADER
            else None)
    options: dict[str, Any] = {}
    if meta.dpi and (fmt == "png" or fmt == "jpeg" and max(meta.dpi) <= 0xFFFF):
        options["dpi"] = meta.dpi  # (JFIF holds 16 bits)
    if meta.icc:
        options["icc_profile"] = meta.icc
    if meta.exif:
        # Pillow's AVIF writer takes Orientation out of an EXIF block by parsing and writing it
        # anew (text not ASCII became "?", maker notes moved): the entry is taken out here
        exif = _without_orientation(meta.exif) if fmt == "avif" else meta.exif
        options["exif"] = _EXIF_PREFIX + exif
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
    extra = b"".join(meta.png_colour)
    if meta.icc:
        extra += _chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(meta.icc))
    if meta.exif:
        extra += _chunk(b"eXIf", meta.exif)
    if meta.xmp:  # keyword NUL, not compressed, method 0, no language NUL, no translation NUL
        extra += _chunk(b"iTXt", _XMP_KEY + b"\x00\x00\x00\x00\x00" + meta.xmp)
    if meta.dpi:  # pixels per metre, unit 1
        extra += _chunk(b"pHYs", struct.pack(">IIB", *(round(v / 0.0254) for v in meta.dpi), 1))
    ihdr_end = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    return png[:ihdr_end] + extra + png[ihdr_end:]


# --------------------------------------------------------------------------------------------
# TIFF output: the EXIF block as tags of the file


def _tiff_directories(exif: bytes) -> dict[int, tuple[dict, dict]]:
    """The Exif and GPS directories of the EXIF block ``exif`` (see :func:`_directories`)."""
    from PIL import TiffImagePlugin

    head, data = exif[:8], io.BytesIO(exif)
    ifd0 = TiffImagePlugin.ImageFileDirectory_v2(head)
    data.seek(ifd0.next)
    ifd0.load(data)
    return _directories(data, head, ifd0, len(exif))


def _directories(data: BinaryIO, head: bytes, ifd0: Any, size: int) -> dict[int, tuple[dict,
                                                                                     dict]]:
    """The Exif and GPS directories that the first directory ``ifd0`` of the TIFF structure
    ``data`` (``size`` bytes, in the byte order of ``head``) points at, as ``{tag: (values,
    types)}`` with the types they were stored with; maker notes left out (laid out anew,
    their inner offsets would point astray), each directory checked to serialise."""
    from PIL import TiffImagePlugin

    found: dict[int, tuple[dict, dict]] = {}
    for tag in (_EXIF_IFD, _GPS_IFD):
        offset = ifd0.get(tag)
        if not isinstance(offset, int) or not 8 <= offset < size:
            continue
        ifd = TiffImagePlugin.ImageFileDirectory_v2(head, group=tag)
        data.seek(offset)
        ifd.load(data)
        values = dict(ifd)
        values.pop(_MAKER_NOTE, None)
        interop = values.pop(_INTEROP_IFD, None)
        if tag == _EXIF_IFD and isinstance(interop, int) and 8 <= interop < size:
            inner = TiffImagePlugin.ImageFileDirectory_v2(head, group=_INTEROP_IFD)
            data.seek(interop)
            inner.load(data)
            if len(inner):
                values[_INTEROP_IFD] = dict(inner)  # written as a directory, typed by its group
        if values:
            types = {key: ifd.tagtype[key] for key in values if key in ifd.tagtype
                     and key != _INTEROP_IFD}
            _directory_bytes(tag, values, types, b"II*\x00", 8)  # raises if it cannot be written
            found[tag] = (values, types)
    return found


def _directory_bytes(group: int | None, values: dict, types: dict, head: bytes,
                     offset: int) -> bytes:
    """The directory ``group`` (Exif, GPS; None: a first one) holding ``values`` of ``types``
    and its data, to sit at ``offset`` of a file starting with ``head`` (its byte order). Text
    goes out as the bytes it was read from (Pillow decodes it as latin-1 and would write
    anything else as '?')."""
    from PIL import TiffImagePlugin

    order = "<" if head[:2] == b"II" else ">"
    ifd = TiffImagePlugin.ImageFileDirectory_v2(ifh=head[:4] + struct.pack(order + "I", 8),
                                                group=group)
    for tag, value in values.items():
        kind = types.get(tag)
        if isinstance(value, str) and kind in (None, _ASCII):
            kind, value = _ASCII, value.encode("latin-1", "replace")
        if kind is not None:
            ifd.tagtype[tag] = kind
        ifd[tag] = value
    return ifd.tobytes(offset)


def tiff_tags(meta: ImageMetadata | None) -> list[tuple]:
    """tifffile ``extratags`` writing ``meta`` (passed through :func:`for_output`) but for its
    ICC profile: XMP, the descriptive EXIF tags, and a place for each Exif and GPS directory
    that :func:`add_tiff_directories` fills once the file is written. tifffile writes no entry
    of those two tags itself, so the places are entries of the unused tags just below them
    (34664, 34852): renamed, the entries stay in the order of their tags."""
    if not meta:
        return []
    extra: list[tuple] = []
    if meta.xmp:
        extra.append((_TIFF_XMP, "B", len(meta.xmp), meta.xmp, True))
    if meta.exif:
        from PIL import Image

        try:
            with _quiet():
                tags = Image.Exif()
                tags.load(_EXIF_PREFIX + meta.exif)
                directories = _tiff_directories(meta.exif)
            described = [entry for tag in _TIFF_IFD0_TAGS if tag != _ORIENTATION
                         for entry in [_tiff_entry(tag, tags.get(tag))] if entry]
            places = [(tag - 1, "I", 1, 0, True) for tag in directories]
            extra += described + places
        except Exception:  # noqa: BLE001 - metadata is best effort
            pass
    return extra


def _tiff_entry(tag: int, value: Any) -> tuple | None:
    """A tifffile ``extratags`` entry of a first-directory EXIF tag: text as the bytes it was
    read from (Pillow decodes it as latin-1), a number as a SHORT, bytes (the XP tags) as
    BYTEs; None for anything else."""
    if isinstance(value, str) and value:
        return (tag, "s", 0, value.encode("latin-1", "replace"), True)
    if isinstance(value, int) and 0 <= value <= 0xFFFF:
        return (tag, "H", 1, value, True)
    if isinstance(value, bytes) and value:
        return (tag, "B", len(value), value, True)
    return None


def add_tiff_directories(tiff: bytes, meta: ImageMetadata | None) -> bytes:
    """``tiff`` (written with :func:`tiff_tags`) with ``meta``'s Exif and GPS directories
    appended and its first directory's entries for them pointed there."""
    if not meta or not meta.exif or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return tiff  # no EXIF, or a BigTIFF (tifffile's choice for huge images: left out)
    try:
        with _quiet():
            order, ifd0 = _exif_layout(tiff)
            wanted = _tiff_directories(meta.exif)  # as tiff_tags found them: serialisable
            out = bytearray(tiff)
            for at, place, kind, n in _ifd_entries(tiff, ifd0, order):
                tag = place + 1
                if tag in wanted and kind == _LONG and n == 1:
                    out += bytes(len(out) % 2)  # a directory starts on a word boundary
                    struct.pack_into(order + "HHII", out, at, tag, _LONG, 1, len(out))
                    out += _directory_bytes(tag, *wanted[tag], tiff[:4], len(out))
            return bytes(out)
    except Exception:  # noqa: BLE001 - best effort: the places stay, as unknown private tags
        return tiff


@contextlib.contextmanager
def _quiet():
    """Pillow's warnings about odd EXIF ("Corrupt EXIF data", "too many entries") kept off the
    user's terminal: metadata is best effort."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
