"""Phone photos: HEIC/HEIF (with the ``heif`` extra, pillow-heif) and AVIF (Pillow's own) are
read with their orientation and metadata, written back in their own format or converted."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, features
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.errors import ImageReadError
from deblurcli.images import _sniff_format, image_size, read_image, write_image

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
needs_avif = pytest.mark.skipif(not features.check("avif"), reason="Pillow without AVIF")


def _heif():
    return pytest.importorskip("pillow_heif")


def phone_photo(path: Path, fmt: str) -> Path:
    """A 80x60 photo stored sideways with EXIF orientation 6 (as phones do), sRGB profile."""
    if fmt == "HEIF":
        _heif().register_heif_opener()
    pixels = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Apple"
    Image.fromarray(pixels).save(path, format=fmt, quality=95, exif=exif.tobytes(),
                                 icc_profile=SRGB)
    return path


@pytest.mark.parametrize("name,fmt", [pytest.param("p.heic", "HEIF"),
                                      pytest.param("p.avif", "AVIF", marks=needs_avif)])
def test_phone_photos_read_upright_and_write_back_in_any_format(tmp_path, name, fmt):
    image = read_image(phone_photo(tmp_path / name, fmt))
    assert image.format == ("heif" if fmt == "HEIF" else "avif")
    assert image.pixels.shape == (80, 60, 3) and image_size(tmp_path / name) == (80, 60)
    assert image.metadata.icc == SRGB
    for out in ("o.heic", "o.avif", "o.jpg"):
        if out.endswith(".avif") and not features.check("avif"):
            continue
        write_image(tmp_path / out, image.pixels, metadata=image.metadata)
        again = read_image(tmp_path / out)
        assert again.pixels.shape == (80, 60, 3), out  # upright, turned once only
        assert np.abs(again.pixels - image.pixels).mean() < 0.06, out
        assert again.metadata.icc == SRGB, out


def test_the_format_is_told_by_the_ftyp_box_not_the_name():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\0" * 16

    assert _sniff_format(ftyp(b"heic", b"mif1", b"heic")) == "heif"
    assert _sniff_format(ftyp(b"mif1", b"mif1", b"avif")) == "avif"  # AVIF under a mif1 brand
    assert _sniff_format(ftyp(b"avis", b"avis")) == "avif"
    assert _sniff_format(ftyp(b"isom", b"mp41")) is None  # an MP4 video is not a photo


def test_without_pillow_heif_a_heic_fails_with_the_install_command(tmp_path, monkeypatch):
    path = phone_photo(tmp_path / "p.heic", "HEIF")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` fails
    with pytest.raises(ImageReadError, match="pip install 'deblurcli\\[heif\\]'"):
        read_image(path)


def test_deblur_keeps_a_heic_a_heic_or_converts_it(tiny_model_folder, tmp_path):
    (tmp_path / "in").mkdir()
    source = phone_photo(tmp_path / "in" / "IMG_0001.heic", "HEIF")
    runner = CliRunner()
    for ext, written in (("auto", "IMG_0001.heic"), ("jpg", "IMG_0001.jpg")):
        out = tmp_path / f"out-{ext}"
        result = runner.invoke(app, ["deblur", str(source), str(out), "-w",
                                     str(tiny_model_folder), "--backend", "torch", "--ext", ext])
        assert result.exit_code == 0, result.output
        assert read_image(out / written).pixels.shape == (80, 60, 3)
