"""A photo's ICC profile, EXIF and XMP reach its deblurred output, made true of the pixels
written (orientation 1, the output's size, no thumbnail), in every format that holds them."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms
from typer.testing import CliRunner

from deblurcli import imagemeta
from deblurcli.cli.app import app
from deblurcli.images import _png16_bytes as _png16
from deblurcli.images import image_size, read_image, write_image

XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def profile(space: bytes) -> bytes:
    """An ICC profile claiming colour space ``space`` (only the header's signature differs)."""
    return SRGB[:16] + space + SRGB[20:]


def camera_exif(orientation=6, width=80, height=60) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Canon"
    sub = exif.get_ifd(0x8769)
    sub[0x9003] = "2025:12:31 09:00:00"  # DateTimeOriginal
    sub[0xA002], sub[0xA003] = width, height  # PixelXDimension, PixelYDimension
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)  # GPSLatitude
    return exif


def camera_jpeg(path: Path, *, icc=SRGB, mode="RGB") -> Path:
    pixels = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, "JPEG", exif=camera_exif(), icc_profile=icc,
                                               xmp=XMP)
    return path


def read_back(path: Path):
    im = Image.open(path)
    im.load()
    return im


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_icc_exif_and_xmp_reach_the_output(tmp_path, suffix):
    image = read_image(camera_jpeg(tmp_path / "in.jpg"))
    assert image.pixels.shape == (80, 60, 3)  # orientation 6 applied: portrait
    out = tmp_path / f"out{suffix}"
    write_image(out, image.pixels, metadata=image.metadata)
    im = read_back(out)
    assert im.info["icc_profile"] == SRGB
    exif = im.getexif()
    assert exif[0x010F] == "Canon" and exif[0x0112] == 1  # the pixels are upright now
    sub = exif.get_ifd(0x8769)
    assert sub[0x9003] == "2025:12:31 09:00:00"
    assert (sub[0xA002], sub[0xA003]) == (60, 80)  # the output's width and height
    assert exif.get_ifd(0x8825)[2] == (52.0, 31.0, 12.0)
    assert read_image(out).metadata.xmp == XMP


def test_a_16_bit_png_keeps_them_too(tmp_path):
    image = read_image(camera_jpeg(tmp_path / "in.jpg"))
    out = tmp_path / "out.png"
    write_image(out, image.pixels, bit_depth=16, metadata=image.metadata)
    again = read_image(out)
    assert again.bit_depth == 16 and again.pixels.shape == (80, 60, 3)
    assert again.metadata.icc == SRGB and again.metadata.xmp == XMP
    assert imagemeta.exif_orientation(again.metadata) == 1
    written = Image.Exif()
    written.load(b"Exif\x00\x00" + again.metadata.exif)
    assert written[0x010F] == "Canon"
    assert (written.get_ifd(0x8769)[0xA002], written.get_ifd(0x8769)[0xA003]) == (60, 80)


def test_bmp_keeps_nothing(tmp_path):
    image = read_image(camera_jpeg(tmp_path / "in.jpg"))
    write_image(tmp_path / "out.bmp", image.pixels, metadata=image.metadata)
    assert read_image(tmp_path / "out.bmp").metadata is None


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_a_tiff_keeps_exif_and_xmp_as_tags_of_its_own(tmp_path, bit_depth):
    """TIFF outputs kept only the profile. A TIFF holds EXIF as its own tags: the descriptive
    ones in its first directory, Exif and GPS directories beside; the maker notes stay out
    (their inner offsets would point astray). And a TIFF's EXIF reaches a JPEG made from it."""
    import tifffile

    exif = camera_exif()
    exif.get_ifd(0x8769)[0x927C] = b"maker notes"
    pixels = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.jpg", exif=exif, icc_profile=SRGB, xmp=XMP)
    image = read_image(tmp_path / "in.jpg")
    out = tmp_path / "out.tif"
    write_image(out, image.pixels, metadata=image.metadata, bit_depth=bit_depth,
                alpha=np.ones((80, 60), np.float32))
    with tifffile.TiffFile(out) as tif:
        tags = tif.pages[0].tags
        assert tags["Make"].value == "Canon" and "Orientation" not in tags
        assert tags["Software"].value.startswith("deblurcli ") and "ImageDescription" not in tags
        assert tags["XMP"].value == XMP and tags["InterColorProfile"].value == SRGB
        sub = tags["ExifTag"].value
        assert sub["DateTimeOriginal"] == "2025:12:31 09:00:00" and "MakerNote" not in sub
        assert (sub["PixelXDimension"], sub["PixelYDimension"]) == (60, 80)
        assert tags["GPSTag"].value["GPSLatitude"] == (52, 1, 31, 1, 12, 1)
    again = read_image(out)
    assert again.bit_depth == bit_depth and again.metadata.xmp == XMP
    write_image(tmp_path / "out.jpg", again.pixels, metadata=again.metadata)
    exif = read_back(tmp_path / "out.jpg").getexif()
    assert exif[0x010F] == "Canon"
    assert exif.get_ifd(0x8769)[0x9003] == "2025:12:31 09:00:00"
    assert exif.get_ifd(0x8825)[2] == (52.0, 31.0, 12.0)


def test_a_profile_is_written_only_over_its_own_colour_space(tmp_path):
    cmyk = read_image(camera_jpeg(tmp_path / "cmyk.jpg", icc=profile(b"CMYK"), mode="CMYK"))
    assert cmyk.metadata.icc[16:20] == b"CMYK"  # read, but decoded to RGB without it
    write_image(tmp_path / "out.jpg", cmyk.pixels, metadata=cmyk.metadata)
    out = read_back(tmp_path / "out.jpg")
    assert "icc_profile" not in out.info and out.getexif()[0x010F] == "Canon"

    grey = np.full((8, 8), 0.5, np.float32)
    for icc, kept in ((SRGB, False), (profile(b"GRAY"), True)):
        path = tmp_path / f"grey-{kept}.png"
        write_image(path, grey, grayscale=True, metadata=imagemeta.ImageMetadata(icc=icc))
        assert ("icc_profile" in read_back(path).info) is kept


def test_broken_metadata_never_stops_an_image(tmp_path):
    bad = imagemeta.ImageMetadata(exif=b"II*\x00\xff\xff\xff\xff garbage", icc=b"short")
    path = tmp_path / "out.jpg"
    write_image(path, np.zeros((8, 8, 3), np.float32), metadata=bad)
    assert read_image(path).metadata is None


def test_the_exif_thumbnail_is_left_out():
    thumb = b"\xff\xd8THUMBNAIL\xff\xd9"
    entry = struct.Struct("<HHI4s")
    ifd0 = struct.pack("<H", 1) + entry.pack(0x010F, 2, 6, struct.pack("<I", 26)) + \
        struct.pack("<I", 34)  # Make at 26; IFD1 at 34
    ifd1 = struct.pack("<H", 2) + entry.pack(0x0201, 4, 1, struct.pack("<I", 64)) + \
        entry.pack(0x0202, 4, 1, struct.pack("<I", len(thumb))) + struct.pack("<I", 0)
    blob = b"II*\x00" + struct.pack("<I", 8) + ifd0 + b"Canon\x00\x00\x00" + ifd1 + thumb
    out = imagemeta.for_output(imagemeta.ImageMetadata(exif=blob), width=4, height=4,
                               grayscale=False)
    assert b"Canon" in out.exif and b"THUMBNAIL" not in out.exif


def test_a_large_exif_is_left_out_of_a_jpeg_only(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x927C] = b"\x00" * 70_000  # MakerNote: more than one JPEG segment holds
    meta = imagemeta.ImageMetadata(exif=exif.tobytes()[6:], icc=SRGB)
    pixels = np.zeros((8, 8, 3), np.float32)
    write_image(tmp_path / "out.jpg", pixels, metadata=meta)
    write_image(tmp_path / "out.png", pixels, metadata=meta)
    assert read_image(tmp_path / "out.jpg").metadata == imagemeta.ImageMetadata(icc=SRGB)
    assert read_back(tmp_path / "out.png").getexif()[0x010F] == "Canon"


def test_deblur_keeps_metadata_unless_told_to_strip_it(tiny_model_folder, tmp_path):
    (tmp_path / "in").mkdir()
    source = camera_jpeg(tmp_path / "in" / "photo.jpg")
    runner = CliRunner()
    for flags, kept in (([], True), (["--strip-metadata"], False)):
        out = tmp_path / f"out-{kept}"
        result = runner.invoke(app, ["deblur", str(source), str(out), "-w",
                                     str(tiny_model_folder), "--backend", "torch", *flags])
        assert result.exit_code == 0, result.output
        im = read_back(out / "photo.jpg")
        assert im.size == (60, 80)
        # the profile stays: it says how to show the values (stripped, a wide-gamut photo's
        # colours shifted), as a video keeps its colour tags
        assert ("icc_profile" in im.info, 0x010F in im.getexif(), "xmp" in im.info) == \
            (True, kept, kept)


def test_pillow_reads_what_add_to_png_writes():
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    meta = imagemeta.ImageMetadata(icc=SRGB, xmp=XMP)
    im = Image.open(io.BytesIO(imagemeta.add_to_png(png.getvalue(), meta)))
    im.load()
    assert im.info["icc_profile"] == SRGB and XMP.decode() in im.info["XML:com.adobe.xmp"]


def test_an_orientation_held_in_the_xmp_is_applied_once(tmp_path):
    """Pillow (and photo managers) read XMP's tiff:Orientation where EXIF has none: the output
    must say 1 there too, or every run through deblur would turn the photo again."""
    pixels = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="6"/>' \
        b'</x:xmpmeta>'
    Image.fromarray(pixels).save(tmp_path / "in.jpg", xmp=xmp)
    image = read_image(tmp_path / "in.jpg")
    assert image.pixels.shape == (80, 60, 3)
    for suffix, bits in ((".jpg", 8), (".png", 8), (".png", 16), (".webp", 8)):
        out = tmp_path / f"out{bits}{suffix}"
        write_image(out, image.pixels, metadata=image.metadata, bit_depth=bits)
        again = read_image(out)
        assert again.pixels.shape == (80, 60, 3), suffix
        assert b'tiff:Orientation="1"' in again.metadata.xmp
    turned = imagemeta.add_to_png(imagemeta.add_to_png(  # 16-bit, orientation in XMP only
        _png16(np.zeros((6, 4, 3), np.uint16)), None), imagemeta.ImageMetadata(xmp=xmp))
    (tmp_path / "turned16.png").write_bytes(turned)
    assert read_image(tmp_path / "turned16.png").pixels.shape == (4, 6, 3)
    Image.fromarray(pixels).save(tmp_path / "turned8.png", pnginfo=_xmp_info(xmp))
    for name in ("in.jpg", "turned8.png", "turned16.png"):  # the header-only size agrees
        path = tmp_path / name
        assert image_size(path) == read_image(path).pixels.shape[:2], name
    assert read_image(tmp_path / "turned8.png").pixels.shape == (80, 60, 3)


def _xmp_info(xmp: bytes):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    return info


def test_maker_notes_keep_their_offsets():
    """The EXIF block is patched in place: maker notes that point at absolute offsets stay
    valid (Pillow's own re-serialisation moves them)."""
    entry = struct.Struct("<HHI4s")
    note = b"MAKERNOTE" + bytes(100)
    ifd0 = struct.pack("<H", 2) + entry.pack(0x0112, 3, 1, struct.pack("<HH", 8, 0)) + \
        entry.pack(0x8769, 4, 1, struct.pack("<I", 38)) + struct.pack("<I", 0)  # 8..38
    sub = struct.pack("<H", 1) + entry.pack(0x927C, 7, len(note), struct.pack("<I", 300)) + \
        struct.pack("<I", 0)  # 38..56; the maker note at 300, after a gap
    body = b"II*\x00" + struct.pack("<I", 8) + ifd0 + sub
    body += bytes(300 - len(body)) + note
    out = imagemeta.for_output(imagemeta.ImageMetadata(exif=body), width=4, height=4,
                               grayscale=False).exif
    assert len(out) == len(body) and out.index(b"MAKERNOTE") == body.index(b"MAKERNOTE")
    assert imagemeta.exif_orientation(imagemeta.ImageMetadata(exif=out)) == 1


def test_a_large_xmp_is_left_out_of_a_jpeg_only(tmp_path):
    xmp = b"<x:xmpmeta>" + b" " * 70_000 + b"</x:xmpmeta>"
    meta = imagemeta.ImageMetadata(xmp=xmp, icc=SRGB)
    pixels = np.zeros((8, 8, 3), np.float32)
    write_image(tmp_path / "out.jpg", pixels, metadata=meta)
    write_image(tmp_path / "out.webp", pixels, metadata=meta)
    assert read_image(tmp_path / "out.jpg").metadata == imagemeta.ImageMetadata(icc=SRGB)
    assert read_image(tmp_path / "out.webp").metadata.xmp == xmp


def test_a_png_profile_that_inflates_too_far_is_dropped(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    bomb = imagemeta._chunk(b"iCCP", b"ICC profile\x00\x00" +
                            zlib.compress(bytes(imagemeta.MAX_INFLATED_BYTES + 1), 9))
    data = png.getvalue()[:33] + bomb + png.getvalue()[33:]
    assert imagemeta.from_png(data).icc is None


def test_a_grey_photo_written_as_webp_gets_no_grey_profile(tmp_path):
    """WebP stores grey pixels as RGB: a GRAY profile would not describe them."""
    grey = np.full((8, 8), 0.5, np.float32)
    path = tmp_path / "out.webp"
    write_image(path, grey, grayscale=True,
                metadata=imagemeta.ImageMetadata(icc=profile(b"GRAY"), xmp=XMP))
    assert read_image(path).metadata == imagemeta.ImageMetadata(xmp=XMP)


def test_xmp_in_png_text_chunks_is_read():
    from PIL import PngImagePlugin

    for zip_ in (False, True):  # a tEXt and a zTXt chunk
        info = PngImagePlugin.PngInfo()
        info.add_text("XML:com.adobe.xmp", XMP.decode(), zip=zip_)
        png = io.BytesIO()
        Image.new("RGB", (4, 4)).save(png, "PNG", pnginfo=info)
        assert (b"zTXt" if zip_ else b"tEXt") in png.getvalue()
        assert imagemeta.from_png(png.getvalue()).xmp == XMP, zip_


def test_a_tiff_pillow_cannot_open_keeps_its_profile(tmp_path):
    """The EXIF of a TIFF is read through Pillow, which cannot open float RGB: the profile
    and XMP still come from tifffile's reading."""
    import tifffile

    path = tmp_path / "float.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((8, 8, 3), dtype=np.float32),
                     photometric="rgb", iccprofile=SRGB, extratags=[(700, "B", len(XMP), XMP)])
    meta = read_image(path).metadata
    assert meta.icc == SRGB and meta.xmp == XMP
    # one Pillow opens, written by tifffile with its array shape as description: no caption
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), photometric="rgb",
                     extratags=[(271, "s", 0, "Canon", True)])
    exif = Image.Exif()
    exif.load(b"Exif\x00\x00" + read_image(path).metadata.exif)
    assert dict(exif) == {271: "Canon"}


def _exif(entries: list[tuple[int, int, int, bytes]], data: bytes = b"") -> bytes:
    """A little-endian EXIF block: IFD0 pointing at an Exif directory of ``entries`` (tag,
    type, count, 4-byte value or offset), followed by ``data`` (which starts at 32 + 12 *
    len(entries))."""
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", 0x8769, 4, 1, 26) + bytes(4)
    sub = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd0 + sub + bytes(4) + data


def test_a_tiff_output_keeps_the_types_exif_was_stored_with(tmp_path):
    """Pillow guessed the types of the Exif directory it wrote: UNDEFINED UserComment and
    FileSource came out as BYTE, an SRATIONAL exposure bias as RATIONAL."""
    comment = b"ASCII\x00\x00\x00a caption"
    at = 32 + 12 * 3
    meta = imagemeta.ImageMetadata(exif=_exif(
        [(0x9204, 10, 1, struct.pack("<I", at + len(comment))),  # ExposureBiasValue
         (0x9286, 7, len(comment), struct.pack("<I", at)),  # UserComment
         (0xA300, 7, 1, b"\x03\x00\x00\x00")],  # FileSource: digital camera
        comment + struct.pack("<ii", 1, 3)))
    out = tmp_path / "out.tif"
    write_image(out, np.zeros((6, 8, 3), np.float32), metadata=meta)
    data = out.read_bytes()
    order, ifd0 = imagemeta._exif_layout(data)
    sub = next(struct.unpack_from("<I", data, at + 8)[0]
               for at, tag, _, _ in imagemeta._ifd_entries(data, ifd0, order) if tag == 0x8769)
    assert {tag: kind for _, tag, kind, _ in imagemeta._ifd_entries(data, sub, order)} == \
        {0x9204: 10, 0x9286: 7, 0xA300: 7}
    from PIL import Image

    exif = Image.open(out).getexif().get_ifd(0x8769)
    assert exif[0x9286] == comment and exif[0xA300] == b"\x03"


def test_odd_exif_in_a_tiff_output_is_written_without_a_warning(tmp_path):
    """Pillow warned on the terminal ("Metadata Warning, tag 41730 had too many entries") for
    EXIF a camera got slightly wrong, here a CFAPattern of two SHORTs."""
    import warnings

    meta = imagemeta.ImageMetadata(exif=_exif([(0xA302, 3, 2, struct.pack("<HH", 2, 2))]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_image(tmp_path / "out.tif", np.zeros((6, 8, 3), np.float32), metadata=meta)
    assert [str(w.message) for w in caught] == []


def test_a_tiff_inputs_maker_notes_stay_out_of_its_exif(tmp_path):
    """Laid out anew in the EXIF block of a TIFF input, maker notes would point astray."""
    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[0x010F] = "Canon"
    info[0x8769] = {0x9003: "2025:12:31 09:00:00", 0x927C: b"maker notes"}
    Image.new("RGB", (8, 6)).save(tmp_path / "in.tif", tiffinfo=info)
    exif = Image.Exif()
    exif.load(b"Exif\x00\x00" + read_image(tmp_path / "in.tif").metadata.exif)
    assert exif[0x010F] == "Canon"
    assert exif.get_ifd(0x8769) == {0x9003: "2025:12:31 09:00:00"}


def test_a_jpeg_with_corrupt_exif_reads_without_a_warning(tmp_path):
    """Pillow's "Corrupt EXIF data" warning reached the terminal, naming no file."""
    import warnings

    path = tmp_path / "bad.jpg"
    Image.new("RGB", (8, 6)).save(
        path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_image(path).pixels.shape == (6, 8, 3)
    assert [str(w.message) for w in caught] == []


def test_text_in_exif_keeps_its_bytes_through_a_tiff(tmp_path):
    """Artist, captions and the like written in UTF-8 came out as 'J??rg M??ller' (or were left
    out) whenever the EXIF passed through a TIFF."""
    artist, caption, owner = "Jörg Müller".encode(), "Île de Ré".encode(), "Zoë".encode()
    exif = Image.Exif()
    exif[0x013B] = artist
    exif[0x010E] = caption
    Image.new("RGB", (8, 6)).save(tmp_path / "in.jpg", exif=exif)
    image = read_image(tmp_path / "in.jpg")
    write_image(tmp_path / "out.tif", image.pixels, metadata=image.metadata)
    tif = Image.open(tmp_path / "out.tif")
    assert tif.tag_v2[0x013B].encode("latin-1") == artist  # Pillow decodes text as latin-1
    assert tif.tag_v2[0x010E].encode("latin-1") == caption
    # an ASCII entry of the Exif directory (CameraOwnerName) through a TIFF
    at = 32 + 12
    meta = imagemeta.ImageMetadata(exif=_exif(
        [(0xA430, 2, len(owner) + 1, struct.pack("<I", at))], owner + b"\x00"))
    write_image(tmp_path / "owner.tif", np.zeros((6, 8, 3), np.float32), metadata=meta)
    again = read_image(tmp_path / "owner.tif")  # and out of the TIFF, into a JPEG
    write_image(tmp_path / "out.jpg", again.pixels, metadata=again.metadata)
    back = Image.Exif()
    back.load(b"Exif\x00\x00" + read_image(tmp_path / "out.jpg").metadata.exif)
    assert back.get_ifd(0x8769)[0xA430].encode("latin-1") == owner


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
def test_the_print_resolution_reaches_the_output(tmp_path, suffix):
    """JPEG's JFIF density, PNG's pHYs and a TIFF's resolution were all lost (print workflows
    use them); turned upright, x and y swap."""
    exif = Image.Exif()
    exif[0x0112], exif[0x011A], exif[0x011B] = 6, 300, 200  # EXIF's resolution too
    Image.new("RGB", (8, 6)).save(tmp_path / "in.jpg", dpi=(300, 200), exif=exif)
    image = read_image(tmp_path / "in.jpg")
    assert image.metadata.dpi == (200.0, 300.0) and image.pixels.shape == (8, 6, 3)
    for depth in (8, 16) if suffix != ".jpg" else (8,):
        out = tmp_path / f"out{depth}{suffix}"
        write_image(out, image.pixels, metadata=image.metadata, bit_depth=depth)
        assert read_image(out).metadata.dpi == (200.0, 300.0), (suffix, depth)
        with Image.open(out) as im:
            assert tuple(round(v) for v in im.info["dpi"]) == (200, 300)
            if suffix != ".tif":  # a TIFF's own resolution tags are the dpi above
                assert (im.getexif()[0x011A], im.getexif()[0x011B]) == (200, 300), depth


def test_windows_rating_and_title_reach_a_tiff(tmp_path):
    import tifffile

    title = "Sunset".encode("utf-16-le") + b"\x00\x00"
    exif = Image.Exif()
    exif[0x4746], exif[0x9C9B] = 4, title  # Rating, XPTitle
    Image.new("RGB", (8, 6)).save(tmp_path / "in.jpg", exif=exif)
    image = read_image(tmp_path / "in.jpg")
    write_image(tmp_path / "out.tif", image.pixels, metadata=image.metadata)
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        tags = tif.pages[0].tags
        assert tags["Rating"].value == 4 and tags["XPTitle"].value == title


def test_a_tiff_pillow_decodes_keeps_its_exif_and_turns_its_resolution(tmp_path):
    """A CMYK TIFF (read through Pillow) lost its EXIF, as Pillow lets go of the file once it
    has loaded it; and Pillow turns the pixels upright itself, so the resolution was not."""
    from PIL import TiffImagePlugin

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[0x010F], info[0x0112] = "Canon", 6
    info[0x8769] = {0x9003: "2025:12:31 09:00:00"}
    Image.new("CMYK", (40, 30)).save(tmp_path / "in.tif", tiffinfo=info, dpi=(300, 150))
    image = read_image(tmp_path / "in.tif")
    assert image.pixels.shape == (40, 30, 3) and image.metadata.dpi == (150.0, 300.0)
    write_image(tmp_path / "out.jpg", image.pixels, metadata=image.metadata)
    exif = read_back(tmp_path / "out.jpg").getexif()
    assert exif[0x010F] == "Canon" and exif[0x0112] == 1
    assert exif.get_ifd(0x8769)[0x9003] == "2025:12:31 09:00:00"


def test_an_orientation_stored_as_a_long_is_made_1_too(tmp_path):
    """Kept with its stored type, an Orientation LONG of 6 survived into the output of the
    turned pixels: viewers turned the photo twice."""
    import tifffile

    tifffile.imwrite(tmp_path / "in.tif", np.zeros((30, 40, 3), np.uint8), photometric="rgb",
                     extratags=[(0x0112, "I", 1, 6, True)])
    image = read_image(tmp_path / "in.tif")
    assert image.pixels.shape == (40, 30, 3)
    write_image(tmp_path / "out.jpg", image.pixels, metadata=image.metadata)
    assert read_back(tmp_path / "out.jpg").getexif()[0x0112] == 1


def test_a_jpeg_that_states_no_density_gets_no_resolution(tmp_path):
    """Pillow reports 72 dpi for a JPEG that states none: outputs gained a density the photo
    never had."""
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    Image.new("RGB", (8, 6)).save(tmp_path / "plain.jpg", exif=exif)
    Image.new("RGB", (8, 6)).save(tmp_path / "dense.jpg", dpi=(300, 300))
    assert read_image(tmp_path / "plain.jpg").metadata.dpi is None
    assert read_image(tmp_path / "dense.jpg").metadata.dpi == (300.0, 300.0)


@pytest.mark.parametrize("unit, stated, dpi", [(2, 300, (300.0, 300.0)), (3, 118.11, (300.0,
                                                300.0)), (None, 240, (240.0, 240.0)),
                                               (1, 300, None)])
def test_a_camera_jpeg_keeps_the_resolution_its_exif_states(tmp_path, unit, stated, dpi):
    """Cameras state the density in EXIF, with no JFIF one: it was dropped with Pillow's 72-dpi
    guess. In cm it is converted; absent, the unit is the inch; unit 1 is no absolute one."""
    from fractions import Fraction

    exif = Image.Exif()
    exif[0x011A] = exif[0x011B] = Fraction(stated).limit_denominator(100)
    if unit is not None:
        exif[0x0128] = unit
    Image.new("RGB", (8, 6)).save(tmp_path / "camera.jpg", exif=exif)
    image = read_image(tmp_path / "camera.jpg")
    assert image.metadata.dpi == dpi
    if dpi is not None:
        write_image(tmp_path / "out.png", image.pixels, metadata=image.metadata)
        assert read_image(tmp_path / "out.png").metadata.dpi == dpi


def test_a_tiff_that_states_no_resolution_gets_none(tmp_path):
    """Pillow reports 1 dpi for a TIFF without XResolution: outputs claimed 1 dpi, which print
    dialogs take as it is."""
    Image.new("RGB", (8, 6)).save(tmp_path / "scan.tif")
    image = read_image(tmp_path / "scan.tif")
    assert image.metadata is None or image.metadata.dpi is None
    write_image(tmp_path / "out.jpg", image.pixels, metadata=image.metadata)
    assert read_image(tmp_path / "out.jpg").metadata is None or \
        read_image(tmp_path / "out.jpg").metadata.dpi is None
    Image.new("RGB", (8, 6)).save(tmp_path / "dense.tif", dpi=(300, 300))
    assert read_image(tmp_path / "dense.tif").metadata.dpi == (300.0, 300.0)
    from PIL import TiffImagePlugin  # XResolution alone: Pillow gives y as 1

    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[0x011A], info[0x0128] = 300.0, 2
    Image.new("RGB", (8, 6)).save(tmp_path / "x-only.tif", tiffinfo=info)
    assert read_image(tmp_path / "x-only.tif").metadata.dpi == (300.0, 300.0)
