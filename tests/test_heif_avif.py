"""Phone photos: HEIC/HEIF (with the ``heif`` extra, pillow-heif) and AVIF (Pillow's own) are
read upright with their metadata, written back in their own format or converted."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, features
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.errors import DeblurcliError, ImageReadError
from deblurcli.images import _sniff_format, image_size, read_image, write_image

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
# smooth and asymmetric (lossy codecs keep it; every turn or flip of it differs)
_Y, _X = np.mgrid[0:60, 0:80]
PIXELS = np.stack([_X * 3, _Y * 4, 255 - (_X + _Y) * 1.5], axis=2).clip(0, 255).astype(np.uint8)
HAS_AVIF = "avif" in features.modules and features.check_module("avif")
needs_avif = pytest.mark.skipif(not HAS_AVIF, reason="Pillow without AVIF")


def _heif():
    return pytest.importorskip("pillow_heif")


def phone_photo(path: Path, fmt: str) -> Path:
    """PIXELS stored sideways with EXIF orientation 6 (as phones do) and an sRGB profile,
    written without registering pillow-heif's Pillow plugin (deblurcli must do that)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Apple"
    meta = dict(quality=95, exif=exif.tobytes(), icc_profile=SRGB)
    if fmt == "HEIF":
        _heif().from_pillow(Image.fromarray(PIXELS)).save(path, **meta)
    else:
        Image.fromarray(PIXELS).save(path, format=fmt, **meta)
    return path


def upright() -> np.ndarray:
    """PIXELS as a viewer shows them under orientation 6: turned 90° clockwise."""
    return np.rot90(PIXELS, k=-1).astype(np.float32) / 255


@pytest.mark.parametrize("name,fmt", [pytest.param("p.heic", "HEIF"),
                                      pytest.param("p.avif", "AVIF", marks=needs_avif)])
def test_phone_photos_read_upright_and_write_back_in_any_format(tmp_path, name, fmt):
    image = read_image(phone_photo(tmp_path / name, fmt))
    assert image.format == ("heif" if fmt == "HEIF" else "avif")
    assert image.pixels.shape == (80, 60, 3) and image_size(tmp_path / name) == (80, 60)
    assert np.abs(image.pixels - upright()).mean() < 0.05  # turned once, the right way
    assert image.metadata.icc == SRGB
    outputs = ["o.jpg"] + (["o.avif"] if HAS_AVIF else [])
    outputs += ["o.heic"] if "pillow_heif" in sys.modules or _can_import_heif() else []
    for out in outputs:
        write_image(tmp_path / out, image.pixels, metadata=image.metadata)
        again = read_image(tmp_path / out)
        assert np.abs(again.pixels - upright()).mean() < 0.06, out  # upright, turned once
        assert again.metadata.icc == SRGB, out


def _can_import_heif() -> bool:
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        return False
    return True


@needs_avif
def test_an_avif_under_a_mif1_brand_reads_after_a_heic(tmp_path):
    """Once pillow-heif's plugin is registered it claims mif1 files first, then fails on AV1."""
    read_image(phone_photo(tmp_path / "p.heic", "HEIF"))
    data = bytearray(phone_photo(tmp_path / "p.avif", "AVIF").read_bytes())
    data[8:12] = b"mif1"  # major brand; avif stays among the compatible ones
    (tmp_path / "mif1.avif").write_bytes(bytes(data))
    assert read_image(tmp_path / "mif1.avif").pixels.shape == (80, 60, 3)


def test_the_format_is_told_by_the_ftyp_box_not_the_name():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\0" * 16

    assert _sniff_format(ftyp(b"heic", b"mif1", b"heic")) == "heif"
    assert _sniff_format(ftyp(b"mif1", b"mif1", b"avif")) == "avif"  # AVIF under a mif1 brand
    assert _sniff_format(ftyp(b"avis", b"avis")) == "avif"
    assert _sniff_format(ftyp(b"isom", b"mp41")) is None  # an MP4 video is not a photo
    assert _sniff_format(ftyp(b"mif1", *[b"miaf"] * 20, b"avif")) == "avif"  # past 64 bytes


def test_without_pillow_heif_a_heic_fails_with_the_install_command(tmp_path, monkeypatch):
    path = phone_photo(tmp_path / "p.heic", "HEIF")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` fails
    with pytest.raises(ImageReadError, match="pip install 'deblurcli\\[heif\\]'"):
        read_image(path)
    with pytest.raises(DeblurcliError, match="cannot write HEIC: .*deblurcli\\[heif\\]"):
        write_image(tmp_path / "o.heic", np.zeros((8, 8, 3), np.float32))
    result = CliRunner().invoke(app, ["deblur", str(path), str(tmp_path / "out"), "--ext",
                                      "heic"])  # refused before any model or photo is read
    assert result.exit_code == 2 and "cannot write heic" in result.output


@pytest.mark.parametrize("suffix", [".heic", pytest.param(".avif", marks=needs_avif)])
def test_grey_with_alpha_gets_no_grey_profile_over_the_rgba_written(tmp_path, suffix):
    from deblurcli.imagemeta import ImageMetadata

    if suffix == ".heic":
        _heif()
    grey_profile = SRGB[:16] + b"GRAY" + SRGB[20:]
    path = tmp_path / f"o{suffix}"
    write_image(path, np.full((8, 8), 0.5, np.float32), grayscale=True,
                alpha=np.ones((8, 8), np.float32), metadata=ImageMetadata(icc=grey_profile))
    meta = read_image(path).metadata
    assert meta is None or meta.icc is None


def test_deblur_keeps_a_heic_a_heic_or_converts_it(tiny_model_folder, tmp_path):
    (tmp_path / "in").mkdir()
    source = phone_photo(tmp_path / "in" / "IMG_0001.HEIC", "HEIF")
    runner = CliRunner()
    for ext, written in (("auto", "IMG_0001.HEIC"), ("jpg", "IMG_0001.jpg")):
        out = tmp_path / f"out-{ext}"
        result = runner.invoke(app, ["deblur", str(source), str(out), "-w",
                                     str(tiny_model_folder), "--backend", "torch", "--ext", ext])
        assert result.exit_code == 0, result.output
        assert read_image(out / written).pixels.shape == (80, 60, 3)


def test_a_camera_hif_is_a_heif_photo(tmp_path):
    path = phone_photo(tmp_path / "DSC0001.HIF", "HEIF")
    assert read_image(path).format == "heif"
    buf = io.BytesIO(path.read_bytes())
    assert _sniff_format(buf.read(64)) == "heif"


def test_avif_keeps_exif_text_as_its_bytes(tmp_path):
    """Pillow's AVIF writer takes Orientation out of EXIF by parsing and writing the block anew:
    an artist 'José Müller' (UTF-8) came out 'Jos?? M??ller'."""
    import struct

    from deblurcli.images import pillow_plugin

    if pillow_plugin("avif", write=True):
        pytest.skip("this Pillow writes no AVIF")
    artist = "José Müller".encode() + b"\x00"
    entries = struct.pack("<HHII", 0x0112, 3, 1, 6) + struct.pack("<HHII", 0x013B, 2,
                                                                  len(artist), 38)
    block = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + bytes(4) + artist
    Image.new("RGB", (8, 6)).save(tmp_path / "in.jpg", exif=b"Exif\x00\x00" + block)
    image = read_image(tmp_path / "in.jpg")
    write_image(tmp_path / "out.avif", image.pixels, metadata=image.metadata)
    back = read_image(tmp_path / "out.avif")
    assert artist[:-1] in back.metadata.exif and back.pixels.shape == (8, 6, 3)
    assert Image.open(tmp_path / "out.avif").getexif().get(0x0112, 1) == 1
