"""Image I/O: round trips (16-bit, alpha, grey) for PNG and TIFF, EXIF orientation, errors, atomic writes."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from deblurcli.errors import ImageReadError
from deblurcli.images import (
    IMAGE_SUFFIXES,
    image_size,
    list_images,
    read_image,
    scan_folder,
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


def test_a_16bit_png_is_read_as_tolerantly_and_said_wrong_as_an_8bit_one(tmp_path, capfd):
    """OpenCV refused a 16-bit PNG lacking only its closing chunk (Pillow reads the 8-bit one),
    said "OpenCV could not decode the PNG" for a truncated one, and it and libpng printed
    lines of their own among deblurcli's."""
    pixels = np.random.default_rng(0).random((40, 48, 3), dtype=np.float32)
    for depth in (8, 16):
        write_image(tmp_path / f"a{depth}.png", pixels, bit_depth=depth)
        whole = (tmp_path / f"a{depth}.png").read_bytes()
        assert whole.endswith(b"IEND\xaeB`\x82")
        (tmp_path / "open.png").write_bytes(whole[:-12])
        assert read_image(tmp_path / "open.png").pixels.shape == (40, 48, 3)
        (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
        with pytest.raises(ImageReadError, match=r"corrupt or unsupported PNG \(image file is "
                                                 r"truncated"):
            read_image(tmp_path / "cut.png")
        # an optional chunk with a bad checksum after the pixels: read as libpng and Pillow do
        text = struct.pack(">I", 4) + b"tEXtab\x00c" + b"\x00\x00\x00\x00"
        (tmp_path / "text.png").write_bytes(whole[:-12] + text + whole[-12:])
        assert read_image(tmp_path / "text.png").pixels.shape == (40, 48, 3)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    np.testing.assert_array_equal(read_image(tmp_path / "a16.png").pixels,
                                  np.round(pixels * 65535) / 65535)


def test_a_16bit_png_with_data_beyond_its_rows_is_read_without_libpngs_warning(tmp_path, capfd):
    """libpng read it with "libpng warning: IDAT: Too much image data" on stderr, among
    deblurcli's lines (Pillow reads the 8-bit one without a word)."""
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I",
                                                                        zlib.crc32(kind + body))

    values = np.random.default_rng(1).integers(0, 65536, (6, 5, 3)).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in values) + b"\0" * 100  # 100 bytes beyond
    stream = zlib.compress(rows)
    bad_text = struct.pack(">I", 4) + b"tEXtab\x00c" + b"\x00\x00\x00\x00"  # bad checksum
    (tmp_path / "beyond.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 6, 16, 2, 0, 0, 0))
        + bad_text + chunk(b"IDAT", stream[:20]) + chunk(b"IDAT", stream[20:]) + bad_text
        + chunk(b"IEND", b""))
    image = read_image(tmp_path / "beyond.png")
    assert image.bit_depth == 16
    np.testing.assert_array_equal(image.pixels, values.astype(np.float32) / 65535)
    # far beyond: only the rows are inflated to be kept (a 1 MB file of 1x1 pixels and 1 GiB
    # of data behind them took 2 GB)
    import tracemalloc

    far = zlib.compress(b"\0" + b"\x12\x34" * 3 + bytes(48 << 20), 9)
    (tmp_path / "far.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", far) + chunk(b"IEND", b""))
    tracemalloc.start()
    assert read_image(tmp_path / "far.png").pixels.shape == (1, 1, 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 36 << 20, peak
    short = chunk(b"IHDR", struct.pack(">IIBBBB", 1, 1, 16, 2, 0, 0))  # 12 bytes, not 13
    (tmp_path / "short.png").write_bytes(b"\x89PNG\r\n\x1a\n" + short + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match="its IHDR chunk is cut short"):
        read_image(tmp_path / "short.png")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


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


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    from deblurcli.images import atomic_folder

    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed while writing")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    with pytest.raises(FileExistsError), atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("two")
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "b.txt").write_text("two")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in target.iterdir()] == ["b.txt"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


# --------------------------------------------------------------------------------------------
# bounded reading (issue 20): one pixel limit for every decoder, only regular files


def _png_declaring(width: int, height: int, depth: int = 16) -> bytes:
    """A small PNG whose IHDR declares ``width`` x ``height`` RGB (one row of real data)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    row = b"\0" * (1 + width * 3 * depth // 8)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b""))


def _tiled_tiff_declaring(side: int) -> bytes:
    """A tiled 16-bit RGB TIFF of 32 x 32 pixels whose header is patched to say side x side."""
    import struct

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((32, 32, 3), np.uint16), tile=(16, 16), photometric="rgb")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<I" if kind == 4 else "<H", data, entry + 8, side)
    return bytes(data)


def test_pixel_bombs_are_refused_from_the_header(tmp_path):
    """Issue 20 case 4: a 16-bit PNG declaring 30000 x 30000 made OpenCV allocate 5.4 GB and a
    tiled TIFF 10 GiB; both are now refused before any decoder allocates."""
    png = tmp_path / "bomb16.png"
    png.write_bytes(_png_declaring(30000, 30000))
    tif = tmp_path / "bomb.tif"
    tif.write_bytes(_tiled_tiff_declaring(60000))
    for path, size in ((png, "30000x30000"), (tif, "60000x60000")):
        with pytest.raises(ImageReadError, match=f"{size} is .* more than the limit of "
                                                 "178,956,970 .*--max-pixels") as info:
            read_image(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ImageReadError, match="more than the limit of 1,000,000"):
        read_image(png, max_pixels=1_000_000)


@pytest.mark.parametrize("name,kwargs", [
    ("a.png", {}), ("a16.png", {"bit_depth": 16}), ("a.tif", {"bit_depth": 16}), ("a.jpg", {}),
    ("a.webp", {}), ("a.bmp", {}), ("grey16.png", {"bit_depth": 16, "grayscale": True}),
])
def test_one_pixel_limit_for_every_format(tmp_path, name, kwargs):
    path = tmp_path / name
    write_image(path, np.zeros((30, 40, 3), np.float32), **kwargs)
    assert read_image(path, max_pixels=1200).pixels.shape == (30, 40, 3)
    with pytest.raises(ImageReadError, match="40x30 is 1,200 pixels, more than the limit of 1,199"):
        read_image(path, max_pixels=1199)


def test_a_raised_limit_lets_pillow_read_beyond_its_own(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    path = tmp_path / "wide.jpg"
    write_image(path, np.zeros((20, 30, 3), np.float32))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # Pillow alone refuses > 200 pixels
    assert read_image(path, max_pixels=600).pixels.shape == (20, 30, 3)
    assert PILImage.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ImageReadError, match="limit of 599"):
        read_image(path, max_pixels=599)


def test_a_large_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.png"
    write_image(path, np.zeros((4, 4, 3), np.float32))
    with open(path, "ab") as fh:
        fh.truncate(70 << 20)  # sparse: 70 MiB of nothing after the image
    with pytest.raises(ImageReadError, match="bytes is more than an image within the pixel limit"):
        read_image(path, max_pixels=16)


def test_tiff_is_read_without_a_copy_of_the_file(tmp_path):
    """A TIFF is decoded from the file into one array: the peak is the 16-bit samples plus the
    float32 result (the former path held the file's bytes and two float32 copies as well)."""
    import tracemalloc

    path = tmp_path / "big.tif"
    arr = _rand((1000, 1000, 3), 65535, seed=2).astype(np.uint16)
    import tifffile

    tifffile.imwrite(path, arr, photometric="rgb")
    float_bytes = arr.size * 4
    tracemalloc.start()
    try:
        data = read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data.bit_depth == 16
    assert peak < 1.7 * float_bytes, peak / float_bytes


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_only_regular_files_are_opened(tmp_path):
    """Issue 20 case 3: a named pipe called x.png hung the batch; a link to /dev/zero read until
    memory ran out. Neither is opened for reading now."""
    import signal

    os.mkfifo(tmp_path / "x.png")
    os.symlink(tmp_path / "x.png", tmp_path / "pipe-link.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    expected = {"x.png": "named pipe", "pipe-link.png": "named pipe", "zero.png": "a device",
                "loop.png": "symlink loop", "dangling.png": "broken symlink"}
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading blocked"))
    signal.alarm(20)
    try:
        for name, reason in expected.items():
            for read in (read_image, image_size):
                with pytest.raises(ImageReadError, match=reason):
                    read(tmp_path / name)
    finally:
        signal.alarm(0)
    listing = scan_folder(tmp_path)
    assert listing.images == []
    assert {p.name: why for p, why in listing.problems}.keys() == expected.keys()
    assert all(reason in dict((p.name, why) for p, why in listing.problems)[name]
               for name, reason in expected.items())


def test_an_unlistable_sub_folder_is_reported(tmp_path, unlistable):
    for name in ("a.png", "locked/b.png", "open/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_image(tmp_path / name, np.zeros((2, 2, 3), np.float32))
    skipped = []
    found = list_images(tmp_path, recursive=True, on_skip=lambda p, why: skipped.append((p, why)))
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "open/c.png"]
    assert skipped == [(tmp_path / "locked", "cannot list this folder: Permission denied")]


def test_atomic_write_flushes_the_file_then_the_folder(tmp_path, monkeypatch):
    """Writes are durable: the temporary file is fsync-ed before it takes its name, and the
    folder after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_image(tmp_path / "out.png", np.zeros((2, 2, 3), np.float32))
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(".out.png.") and events[0][1].endswith(".part")
    assert events[2][1] == tmp_path.name



def test_tiff_samples_and_sample_size_count_against_the_limit(tmp_path, monkeypatch):
    """A TIFF's pixel count hides samples per pixel and their size: many float64 samples would
    allocate far more than width x height suggests, so the array's bytes are checked before
    tifffile allocates it."""
    import tifffile

    from deblurcli.errors import ImageReadError
    from deblurcli.images import read_image

    many = tmp_path / "many.tif"
    tifffile.imwrite(many, np.zeros((8, 8, 64), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    wide = tmp_path / "wide.tif"  # 2400 x 2400 float64 RGB: 138 MB of pixels, a small file
    tile = np.zeros((256, 256, 3), np.float64)
    tifffile.imwrite(wide, (tile for _ in range(100)), shape=(2400, 2400, 3), dtype=np.float64,
                     tile=(256, 256), compression="zlib", photometric="rgb")
    assert wide.stat().st_size < 2_000_000

    def never(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", never)
    with pytest.raises(ImageReadError, match="64 channels"):
        read_image(many)
    with pytest.raises(ImageReadError, match="bytes, more than the limit"):
        read_image(wide, max_pixels=2400 * 2400)


def test_tiffs_of_every_common_kind_read_as_the_photo(tmp_path):
    """CMYK came out as RGB + a transparent 'alpha', palette as grey indices, planar as 120
    channels, and LZW/JPEG-compressed TIFFs (Photoshop's) needed the imagecodecs package."""
    import tifffile
    from PIL import Image

    y, x = np.mgrid[0:60, 0:80]
    rgb = np.stack([x * 3, y * 4, 255 - (x + y) * 1.5], 2).clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(rgb).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    Image.fromarray(rgb).save(tmp_path / "jpeg.tif", compression="jpeg", quality=95)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb",
                     planarconfig="separate")
    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "palette.tif")
    for name, expected, tolerance in (("cmyk", rgb, 0.5), ("lzw", rgb, 0.5), ("jpeg", rgb, 2),
                                      ("planar", rgb, 0.5),
                                      ("palette", np.asarray(palette.convert("RGB")), 0.5)):
        image = read_image(tmp_path / f"{name}.tif")
        assert image.alpha is None and image.pixels.shape == (60, 80, 3), name
        assert np.abs(image.pixels * 255 - expected).mean() < tolerance, name


def test_a_tiff_with_premultiplied_alpha_reads_as_its_colours(tmp_path):
    """ExtraSamples = associated alpha: the colour is stored multiplied by alpha. Read as it
    was, it came back darker wherever the photo is partly transparent (and was written so)."""
    import tifffile

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 200, 60
    alpha = np.tile(np.linspace(0, 255, 8).round().astype(np.uint8), (8, 1))
    stored = (rgb * (alpha[..., None] / 255.0)).round().astype(np.uint8)
    path = tmp_path / "assoc.tif"
    tifffile.imwrite(path, np.dstack([stored, alpha]), photometric="rgb",
                     extrasamples=["assocalpha"])
    image = read_image(path)
    assert np.allclose(image.alpha * 255, alpha)
    seen = alpha >= 64  # where rounding of the stored colour leaves a good estimate
    assert np.abs(image.pixels[seen] * 255 - rgb[seen]).max() < 3


@pytest.mark.parametrize("mode, key", [("RGB", (0, 255, 0)), ("L", 0)])
def test_a_png_colour_key_becomes_alpha(tmp_path, mode, key):
    """A tRNS colour key in an RGB or grey PNG was dropped: the keyed colour showed."""
    from PIL import Image

    pixels = np.zeros((4, 6, 3 if mode == "RGB" else 1), np.uint8)
    pixels[:, 3:] = 200
    if mode == "RGB":
        pixels[:, :3] = key
    Image.fromarray(pixels.squeeze()).save(tmp_path / "k.png", transparency=key)
    image = read_image(tmp_path / "k.png")
    assert image.alpha is not None and image.grayscale == (mode == "L")
    assert (image.alpha[:, :3] == 0).all() and (image.alpha[:, 3:] == 1).all()


def test_a_16_bit_lzw_tiff_stays_16_bit(tmp_path, monkeypatch):
    """LZW, Photoshop's and Lightroom's default, needed the imagecodecs package: without it a
    16-bit photo came back as 8 bits through Pillow, silently. It is a dependency now, and a
    16-bit TIFF that tifffile cannot decode is an error, never an 8-bit copy."""
    import tifffile

    photo = (np.random.default_rng(0).random((6, 8, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "lzw.tif", photo, photometric="rgb", compression="lzw")
    image = read_image(tmp_path / "lzw.tif")
    assert image.bit_depth == 16 and np.array_equal(
        np.rint(image.pixels * 65535).astype(np.uint16), photo)

    def no_codec(self, *args, **kwargs):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_codec)
    with pytest.raises(ImageReadError, match="16-bit samples, compressed with LZW, could not be"):
        read_image(tmp_path / "lzw.tif")


def test_an_unreadable_file_is_one_plain_line(tmp_path):
    """Pillow's reason named an object's address ('<_io.BytesIO object at 0x7f...>'), and an
    empty TIFF said 'index 0 out of range'."""
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (tmp_path / "empty.tif").write_bytes(b"II*\x00" + bytes(20))
    for name, words in (("bad.jpg", "corrupt or unsupported JPEG"),
                        ("empty.tif", "corrupt or unsupported TIFF (it holds no image)")):
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        assert words in str(info.value) and " at 0x" not in str(info.value), str(info.value)


@pytest.mark.parametrize("depth", [2, 16])
def test_a_2_or_16_bit_grey_png_key_becomes_alpha(tmp_path, depth):
    """Pillow keeps a 1/2/4-bit grey key on its own scale (3) and the pixels on 0..255: nothing
    became transparent; OpenCV, which reads 16-bit PNGs, leaves a grey key out."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = bytes([0b11110000]) if depth == 2 else struct.pack(">4H", 3, 3, 0, 0)  # 3, 3, 0, 0
    rows = b"".join(b"\x00" + row for _ in range(2))
    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 2, depth, 0, 0, 0, 0))
           + chunk(b"tRNS", struct.pack(">H", 3)) + chunk(b"IDAT", zlib.compress(rows))
           + chunk(b"IEND", b""))
    (tmp_path / "g.png").write_bytes(png)
    image = read_image(tmp_path / "g.png")
    assert image.alpha is not None and image.grayscale
    assert image.bit_depth == (16 if depth == 16 else 8)
    assert image.alpha[:, :2].max() == 0 and image.alpha[:, 2:].min() == 1


def test_integer_pixels_are_refused_by_the_writer(tmp_path):
    """write_image took a uint8 photo as floats, clipped at 1: an almost white image."""
    photo = np.full((4, 4, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="pixels must be floats in \\[0, 1\\], got uint8"):
        write_image(tmp_path / "o.png", photo)
    with pytest.raises(ValueError, match="alpha must be floats"):
        write_image(tmp_path / "o.png", photo / 255.0, alpha=np.ones((4, 4), np.uint16))
    nan = np.full((4, 4, 3), 0.5, np.float32)
    nan[1, 2, 0] = np.nan  # written as black before
    with pytest.raises(ValueError, match="pixels hold NaN or infinite values"):
        write_image(tmp_path / "o.png", nan)
    with pytest.raises(ValueError, match="alpha hold NaN"):
        write_image(tmp_path / "o.png", nan[..., 1:2][..., 0] * 0 + 0.5,
                    alpha=np.full((4, 4), np.inf, np.float32))
    assert not (tmp_path / "o.png").exists()


def test_write_image_like_the_photo_read_keeps_what_it_held(tmp_path):
    """The README's library example wrote a 16-bit grey photo with alpha as 8-bit opaque RGB:
    `like=image` gives the writer what read_image found; options given still win."""
    rng = np.random.default_rng(1)
    write_image(tmp_path / "in.png", rng.random((6, 8, 3), dtype=np.float32),
                alpha=rng.random((6, 8), dtype=np.float32), grayscale=True, bit_depth=16)
    image = read_image(tmp_path / "in.png")
    write_image(tmp_path / "out.png", 1 - image.pixels, like=image)
    out = read_image(tmp_path / "out.png")
    assert out.bit_depth == 16 and out.grayscale and np.allclose(out.alpha, image.alpha)
    write_image(tmp_path / "eight.png", image.pixels, like=image, bit_depth=8)
    assert read_image(tmp_path / "eight.png").bit_depth == 8


def test_float_samples_outside_0_1_or_nan_are_refused_not_clipped(tmp_path):
    """A float TIFF of 0..255 values was clipped to white without a word (eval scored it
    3.4 dB, synth wrote white pairs), and NaN became 0. Slight overshoots are still clipped."""
    import tifffile

    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "scaled.tif", (rng.random((8, 8, 3)) * 255).astype(np.float32))
    with pytest.raises(ImageReadError, match=r"float samples span [0-9.e-]+\.\.25[0-9.]+, not 0..1"):
        read_image(tmp_path / "scaled.tif")
    holed = rng.random((8, 8, 3)).astype(np.float32)
    holed[2, 2, 1] = np.nan
    tifffile.imwrite(tmp_path / "holed.tif", holed)
    with pytest.raises(ImageReadError, match="NaN or infinite"):
        read_image(tmp_path / "holed.tif")
    tifffile.imwrite(tmp_path / "over.tif", (rng.random((8, 8, 3)) * 1.2).astype(np.float32))
    assert read_image(tmp_path / "over.tif").pixels.max() == 1.0


def test_tiff_samples_of_any_depth_sign_and_photometric_read_as_they_look(tmp_path):
    """12- and 4-bit samples came out nearly black (unscaled in 16- and 8-bit integers), a 1-bit
    or float MINISWHITE page was not inverted, 16-bit CMYK came out 8-bit, signed samples
    were clipped and a truncated uncompressed file blamed a missing codec."""
    import tifffile

    from deblurcli.errors import ImageReadError

    def written(name, arr, **kwargs):
        tifffile.imwrite(tmp_path / name, arr, **kwargs)
        return read_image(tmp_path / name)

    twelve = written("g12.tif", np.array([[4095, 2048]], np.uint16), bitspersample=12)
    assert twelve.bit_depth == 16
    np.testing.assert_allclose(twelve.pixels[0, :, 0], [1.0, 2048 / 4095], atol=1e-4)
    four = written("g4.tif", np.array([[15, 5]], np.uint8), bitspersample=4)
    assert four.bit_depth == 8
    np.testing.assert_allclose(four.pixels[0, :, 0], [1.0, 5 / 15], atol=1e-6)
    ink = np.zeros((2, 2), bool)
    ink[0] = True  # MINISWHITE: set bits are black
    bw = written("bw.tif", ink, photometric="miniswhite")
    np.testing.assert_array_equal(bw.pixels[:, 0, 0], [0.0, 1.0])
    grey = written("f.tif", np.full((2, 2), 0.2, np.float32), photometric="miniswhite")
    assert grey.pixels[0, 0, 0] == pytest.approx(0.8)
    cmyk = np.zeros((2, 2, 4), np.uint16)
    cmyk[..., 0] = 65535  # full cyan
    cmyk[1, :, 3] = 32768  # half black
    separated = written("cmyk16.tif", cmyk, photometric="separated")
    assert separated.bit_depth == 16
    np.testing.assert_allclose(separated.pixels[0, 0], [0, 1, 1], atol=1e-4)
    np.testing.assert_allclose(separated.pixels[1, 0], [0, 0.5, 0.5], atol=1e-4)
    signed = written("s16.tif", np.full((2, 2), 16384, np.int16))
    assert signed.pixels[0, 0, 0] == pytest.approx(16384 / 32767)
    from PIL import Image  # Pillow saves 16-bit grey (mode "I") as signed 32-bit samples

    Image.fromarray(np.array([[0, 60000]], np.int32), "I").save(tmp_path / "mode_i.tif")
    np.testing.assert_allclose(read_image(tmp_path / "mode_i.tif").pixels[0, :, 0],
                               [0.0, 60000 / 65535], atol=1e-6)
    with pytest.raises(ImageReadError, match="signed and hold negative values"):
        written("neg.tif", np.full((2, 2), -5, np.int16))
    tifffile.imwrite(tmp_path / "whole.tif", np.full((8, 8), 1000, np.uint16))
    (tmp_path / "cut.tif").write_bytes((tmp_path / "whole.tif").read_bytes()[:-40])
    with pytest.raises(ImageReadError, match="pixel data is damaged or cut short"):
        read_image(tmp_path / "cut.tif")


def test_a_name_near_the_file_system_limit_can_be_written(tmp_path):
    """The temporary name, 15 bytes longer than the file's, passed the 255 bytes allowed."""
    from deblurcli.images import atomic_folder

    from pathlib import Path

    from deblurcli.images import in_frame_order
    from deblurcli.video import segment_path

    assert len(segment_path(tmp_path / ("v" * 240 + ".mp4"), 3).name.encode()) <= 255
    assert [p.name for p in in_frame_order([Path("f1²3.png"), Path("f10.png"), Path("f2.png")])] \
        == ["f1²3.png", "f2.png", "f10.png"]  # a digit that is no decimal one: a letter
    for name in ("a" * 248 + ".png", "é" * 123 + ".png"):  # 252 and 250 bytes
        write_image(tmp_path / name, np.zeros((2, 2, 3), np.float32))
        assert read_image(tmp_path / name).pixels.shape == (2, 2, 3)
    with atomic_folder(tmp_path / ("d" * 250)) as folder:
        (folder / "x").write_text("x")
    assert (tmp_path / ("d" * 250) / "x").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_lossless_webp_is_written_back_lossless(tmp_path):
    """--ext auto wrote a lossless WebP as a lossy one (quality 95): graphics lost detail."""
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "lossless.webp", lossless=True)
    Image.fromarray(noise).save(tmp_path / "lossy.webp", quality=80)
    for name, lossless in (("lossless.webp", True), ("lossy.webp", False)):
        image = read_image(tmp_path / name)
        assert image.lossless is lossless
        write_image(tmp_path / "out" / name, image.pixels, like=image)
        data = (tmp_path / "out" / name).read_bytes()
        assert (b"VP8L" in data[12:40]) is lossless
    back = read_image(tmp_path / "out" / "lossless.webp").pixels
    assert np.array_equal(np.rint(back * 255).astype(np.uint8), noise)


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_a_pngs_gamma_and_chromaticities_are_kept(tmp_path, bit_depth):
    """A PNG that says how to show its values with gAMA and cHRM (no profile) was written
    without them: viewers then took a linear image for sRGB."""
    import struct
    import zlib

    from deblurcli.imagemeta import png_chunks

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    write_image(tmp_path / "plain.png", np.full((4, 4, 3), 0.5, np.float32), bit_depth=bit_depth)
    data = (tmp_path / "plain.png").read_bytes()
    gama = struct.pack(">I", 100000)  # gamma 1.0: linear values
    chrm = struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)
    ihdr_end = 8 + 12 + struct.unpack(">I", data[8:12])[0]
    (tmp_path / "linear.png").write_bytes(data[:ihdr_end] + chunk(b"gAMA", gama) +
                                          chunk(b"cHRM", chrm) + data[ihdr_end:])
    image = read_image(tmp_path / "linear.png")
    write_image(tmp_path / "out.png", image.pixels, like=image)
    with open(tmp_path / "out.png", "rb") as fh:
        chunks = png_chunks(fh, (b"gAMA", b"cHRM"))
    assert chunks == {b"gAMA": [gama], b"cHRM": [chrm]}
    assert read_image(tmp_path / "out.png").bit_depth == bit_depth
    write_image(tmp_path / "bare.png", image.pixels, like=image, metadata=None)
    with open(tmp_path / "bare.png", "rb") as fh:
        assert png_chunks(fh, (b"gAMA", b"cHRM")) == {}


def test_the_colour_under_transparency_is_filled_from_the_visible_pixels(tmp_path):
    """Black (or leftover) colour under alpha 0 was handed to the network beside the visible
    edge, which would draw it in as a dark fringe."""
    from deblurcli.batch import BatchOptions, plan_jobs, run_jobs
    from deblurcli.images import fill_transparent

    yy, xx = np.mgrid[0:40, 0:50]
    disk = (yy - 20) ** 2 + (xx - 25) ** 2 < 12 ** 2
    pixels = np.zeros((40, 50, 3), np.float32)
    pixels[disk] = (0.9, 0.6, 0.3)
    alpha = disk.astype(np.float32)
    filled = fill_transparent(pixels, alpha)
    np.testing.assert_array_equal(filled[disk], pixels[disk])  # the visible pixels as they were
    ring = ~disk & ((yy - 20) ** 2 + (xx - 25) ** 2 < 15 ** 2)  # just outside the edge
    np.testing.assert_allclose(filled[ring], np.broadcast_to((0.9, 0.6, 0.3), filled[ring].shape),
                               atol=1e-5)
    assert np.isfinite(filled).all()
    assert fill_transparent(pixels, None) is pixels
    assert fill_transparent(pixels, np.ones((40, 50), np.float32)) is pixels
    line = fill_transparent(np.zeros((1, 7, 3), np.float32) + [[[0], [0], [1], [0], [0], [0],
                                                                [0]]],
                            np.array([[0, 0, 1, 0, 0, 0, 0]], np.float32))
    np.testing.assert_allclose(line, 1.0)
    strip = np.zeros((1, 40, 3), np.float32)  # a 1-pixel strip: red, hidden, blue
    strip[0, :10], strip[0, 30:] = (1, 0, 0), (0, 0, 1)
    seen = np.zeros((1, 40), np.float32)
    seen[0, :10] = seen[0, 30:] = 1
    strip = fill_transparent(strip, seen)  # (the mean, purple, was taken beside the red)
    assert strip[0, 10, 0] > 0.9 and strip[0, 29, 2] > 0.9

    write_image(tmp_path / "in" / "cutout.png", pixels, alpha=alpha)
    seen = []

    def looks(pixels, progress=None):
        seen.append(pixels)
        return pixels

    run_jobs(plan_jobs(tmp_path / "in", tmp_path / "out", BatchOptions()), looks, BatchOptions())
    assert seen[0][ring].min() > 0.25  # what the network is given beside the edge
    out = read_image(tmp_path / "out" / "cutout.png")
    np.testing.assert_array_equal(out.alpha, read_image(tmp_path / "in" / "cutout.png").alpha)


def test_an_image_of_several_frames_or_pages_is_refused(tmp_path):
    """An animated PNG/WebP or a multi-page TIFF was read as its first image alone, its other
    frames dropped without a word; a TIFF's reduced-size preview is no page of its own."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    for name in ("a.png", "a.webp"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        for read in (read_image, image_size):  # the header check says it first
            with pytest.raises(ImageReadError, match="an animated (PNG|WebP) of 3 frames; only"):
                read(tmp_path / name)
    frames[0].save(tmp_path / "still.webp")
    assert read_image(tmp_path / "still.webp").pixels.shape == (16, 16, 3)
    deep = (rng.random((16, 16, 3)) * 65535).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        tif.write(deep)
        tif.write(deep)
    for read in (read_image, image_size):
        with pytest.raises(ImageReadError, match="a TIFF of 2 pages; only single-page files"):
            read(tmp_path / "pages.tif")
    with tifffile.TiffWriter(tmp_path / "preview.tif") as tif:
        tif.write(deep)
        tif.write(deep[::2, ::2], subfiletype=1)  # a reduced-resolution preview
        tif.write(np.zeros((16, 16), np.uint8),  # a transparency mask (as GDAL writes one)
                  extratags=[(254, "I", 1, 4, True)])
    assert read_image(tmp_path / "preview.tif").bit_depth == 16
    assert image_size(tmp_path / "preview.tif") == (16, 16)
    apng16 = tmp_path / "deep.png"  # the 16-bit PNG reader (OpenCV) too
    Image.fromarray(deep[..., 0]).save(apng16)
    data = apng16.read_bytes()
    ihdr_end = 8 + 8 + 13 + 4
    actl = b"acTL" + struct.pack(">II", 2, 0)
    chunk = struct.pack(">I", 8) + actl + struct.pack(">I", zlib.crc32(actl))
    apng16.write_bytes(data[:ihdr_end] + chunk + data[ihdr_end:])
    with pytest.raises(ImageReadError, match="an animated PNG of 2 frames"):
        read_image(apng16)
