"""Image I/O: round trips (16-bit, alpha, grey) for PNG and TIFF, EXIF orientation, errors, atomic writes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from deblurcli.errors import ImageReadError
from deblurcli.images import (
    IMAGE_SUFFIXES,
    image_size,
    list_images,
    read_image,
    write_image,
)


def _rand(shape, top, seed=0):
    return np.random.default_rng(seed).integers(0, top + 1, size=shape)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("grey", [False, True])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_round_trip_exact(tmp_path, suffix, depth, grey, with_alpha):
    top = 65535 if depth == 16 else 255
    h, w = 7, 9
    colour = _rand((h, w, 1 if grey else 3), top, seed=1).astype(np.float32) / top
    pixels = np.repeat(colour, 3, axis=2) if grey else colour
    alpha = _rand((h, w), top, seed=2).astype(np.float32) / top if with_alpha else None
    path = tmp_path / f"img{suffix}"
    write_image(path, pixels, alpha=alpha, grayscale=grey, bit_depth=depth)
    data = read_image(path)
    assert data.bit_depth == depth
    assert data.grayscale == grey
    assert data.format == ("png" if suffix == ".png" else "tiff")
    assert data.pixels.dtype == np.float32 and data.pixels.shape == (h, w, 3)
    np.testing.assert_array_equal(np.rint(data.pixels * top), np.rint(pixels * top))
    if with_alpha:
        np.testing.assert_array_equal(np.rint(data.alpha * top), np.rint(alpha * top))
    else:
        assert data.alpha is None
    # writing back what was read gives the same samples again
    path2 = tmp_path / f"again{suffix}"
    write_image(
        path2, data.pixels, alpha=data.alpha, grayscale=data.grayscale, bit_depth=data.bit_depth
    )
    again = read_image(path2)
    np.testing.assert_array_equal(again.pixels, data.pixels)


def test_16bit_png_keeps_low_bits(tmp_path):
    # values that differ only below 8 bits must survive (Pillow alone would truncate RGB 16-bit PNGs)
    pixels = np.full((4, 4, 3), 1000 / 65535, dtype=np.float32)
    pixels[0, 0] = 1001 / 65535
    write_image(tmp_path / "a.png", pixels, bit_depth=16)
    back = read_image(tmp_path / "a.png")
    assert (
        round(back.pixels[0, 0, 0] * 65535) == 1001 and round(back.pixels[1, 1, 0] * 65535) == 1000
    )


@pytest.mark.parametrize("suffix,fmt", [(".jpg", "jpeg"), (".webp", "webp"), (".bmp", "bmp")])
def test_other_formats_read_as_8bit_rgb(tmp_path, suffix, fmt):
    pixels = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    write_image(tmp_path / f"x{suffix}", pixels, bit_depth=16, quality=100)
    data = read_image(tmp_path / f"x{suffix}")
    assert data.format == fmt and data.bit_depth == 8 and not data.grayscale
    assert np.abs(data.pixels - pixels).max() < (0.1 if fmt != "bmp" else 1 / 255)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    arr = _rand((6, 10, 3), 255, seed=orientation).astype(np.uint8)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    im.save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    data = read_image(path)
    np.testing.assert_array_equal(np.rint(data.pixels * 255).astype(np.uint8), expected)
    assert image_size(path) == expected.shape[:2]


def test_exif_orientation_jpeg(tmp_path):
    arr = np.zeros((16, 32, 3), np.uint8)
    arr[:, :8] = 255  # bright left band
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    data = read_image(tmp_path / "r.jpg")
    assert data.pixels.shape == (32, 16, 3)
    assert data.pixels[:8].mean() > 0.9 and data.pixels[-8:].mean() < 0.1  # left band now on top


def test_tiff_orientation_tag(tmp_path):
    arr = (_rand((5, 8, 3), 65535, seed=3)).astype(np.uint16)
    import tifffile

    tifffile.imwrite(
        tmp_path / "t.tif", arr, photometric="rgb", extratags=[(274, "H", 1, 8, False)]
    )
    data = read_image(tmp_path / "t.tif")
    np.testing.assert_array_equal(np.rint(data.pixels * 65535).astype(np.uint16), np.rot90(arr, 1))
    assert image_size(tmp_path / "t.tif") == (8, 5)


def test_unreadable_files_raise_one_line(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    for path in (bad, tmp_path / "missing.png", tmp_path):
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    text = tmp_path / "t.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="not a PNG, JPEG"):
        read_image(text)
    truncated = tmp_path / "trunc.png"
    buf = io.BytesIO()
    Image.fromarray(_rand((64, 64, 3), 255).astype(np.uint8)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError):
        read_image(truncated)


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    write_image(target, np.zeros((4, 4, 3), np.float32))
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_image(target, np.ones((4, 4, 3), np.float32))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]
    assert target.read_bytes() == before
    with pytest.raises(ValueError):  # encoding failure: nothing written at all
        write_image(tmp_path / "new.png", np.zeros((4, 4, 5), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_list_images_skips_non_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.tif", "notes.txt", ".hidden.png", "sub/d.webp"):
        (tmp_path / name).write_bytes(b"x")
    skipped = []
    flat = list_images(tmp_path, on_skip=lambda p, why: skipped.append((p.name, why)))
    assert [p.name for p in flat] == ["a.JPG", "b.png"]
    assert [s[0] for s in skipped] == ["notes.txt"] and "not an image" in skipped[0][1]
    deep = list_images(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in deep] == [
        "a.JPG",
        "b.png",
        "sub/c.tif",
        "sub/d.webp",
    ]
    assert ".png" in IMAGE_SUFFIXES
    with pytest.raises(ImageReadError):
        list_images(tmp_path / "nope")


def test_image_size_finds_a_png_exif_chunk_after_the_pixels(tmp_path):
    import struct
    import zlib

    arr = _rand((6, 10, 3), 255, seed=3).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the displayed image is 10 high, 6 wide
    path = tmp_path / "late.png"
    Image.fromarray(arr).save(path, exif=exif)
    raw = path.read_bytes()
    chunks, pos = [], 8
    while pos < len(raw):
        length = struct.unpack(">I", raw[pos:pos + 4])[0]
        chunks.append(raw[pos:pos + 12 + length])
        pos += 12 + length
    exif_chunk = next(c for c in chunks if c[4:8] == b"eXIf")
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    moved = rest[:-1] + [exif_chunk, rest[-1]]  # just before IEND, after IDAT
    assert [c[4:8] for c in moved].index(b"eXIf") > [c[4:8] for c in moved].index(b"IDAT")
    path.write_bytes(raw[:8] + b"".join(moved))
    assert zlib.crc32(exif_chunk[4:-4]) == struct.unpack(">I", exif_chunk[-4:])[0]
    assert image_size(path) == (10, 6) == read_image(path).pixels.shape[:2]
