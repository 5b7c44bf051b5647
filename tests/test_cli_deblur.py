"""``deblurcli deblur`` end to end on the tiny model folder, and every error exit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deblurcli.cli.app import app
from deblurcli.images import read_image, write_image


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The command sets torch's thread count for the process; restore it after each test."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(*args: str):
    return CliRunner().invoke(app, ["deblur", *map(str, args)])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """rgb.png (8-bit, odd size), rgba16.png (RGBA, 16-bit), grey.png, sub/nested.jpg, bad.png."""
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    write_image(src / "rgb.png", rng.random((37, 45, 3), dtype=np.float32))
    write_image(src / "rgba16.png", rng.random((32, 24, 3), dtype=np.float32),
                alpha=rng.random((32, 24), dtype=np.float32), bit_depth=16)
    write_image(src / "grey.png", rng.random((24, 32, 3), dtype=np.float32), grayscale=True)
    write_image(src / "sub" / "nested.jpg", rng.random((16, 16, 3), dtype=np.float32))
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return src


def test_help_has_an_example():
    result = run("--help")
    assert result.exit_code == 0 and "deblurcli deblur photo.jpg out/" in result.output


def test_end_to_end_folder(photos, tiny_model_folder, tmp_path):
    out = tmp_path / "out"
    result = run(photos, out, "--weights", tiny_model_folder, "--recursive", "--tile", "16",
                 "--tile-overlap", "8", "--batch-size", "2", "--threads", "1")
    assert result.exit_code == 1, result.output  # bad.png failed, the others were processed
    assert "processed 4, skipped 0, failed 1" in result.stdout
    assert "bad.png" in result.stdout and "1 of 5 image(s) failed" in result.output
    assert f"failed: {photos / 'bad.png'}: cannot read it: corrupt" in result.stdout
    rgb = read_image(out / "rgb.png")
    assert rgb.pixels.shape == (37, 45, 3) and np.isfinite(rgb.pixels).all()
    rgba = read_image(out / "rgba16.png")
    assert rgba.bit_depth == 16 and rgba.pixels.shape == (32, 24, 3)
    np.testing.assert_array_equal(rgba.alpha, read_image(photos / "rgba16.png").alpha)
    grey = read_image(out / "grey.png")
    assert grey.grayscale and grey.pixels.shape == (24, 32, 3)
    assert read_image(out / "sub" / "nested.jpg").format == "jpeg"
    assert not (out / "bad.png").exists()

    # second run: everything that exists is skipped (the model is not even loaded)
    (photos / "bad.png").unlink()
    again = run(photos, out, "--recursive", "--weights", tmp_path / "no-such-model")
    assert again.exit_code == 0, again.output
    assert "skipped 4" in again.stdout


def test_single_file_with_suffix_ext_and_options(photos, tiny_model_folder, tmp_path):
    out = tmp_path / "single"
    result = run(photos / "rgb.png", out, "--weights", tiny_model_folder, "--suffix", "_out",
                 "--ext", "tif", "--tile", "0", "--gamma", "1", "--no-fuse", "--fp32",
                 "--vae-fp32", "--device", "cpu", "--dtype", "auto")
    assert result.exit_code == 0, result.output
    assert "processed 1, skipped 0, failed 0" in result.stdout
    assert read_image(out / "rgb_out.tif").pixels.shape == (37, 45, 3)
    twice = run(photos / "rgb.png", tmp_path / "twice", "--weights", tiny_model_folder,
                "--suffix", "_out", "--ext", "tif", "--tile", "0", "--gamma", "1", "--no-fuse",
                "--device", "cpu")  # auto would pick a GPU (and half precision) where there is one
    assert twice.exit_code == 0, twice.output  # deterministic: same input, same bytes
    assert (tmp_path / "twice" / "rgb_out.tif").read_bytes() == (out / "rgb_out.tif").read_bytes()


def test_color_fix_is_the_plain_output_with_the_inputs_low_frequencies(photos, tiny_model_folder,
                                                                     tmp_path):
    from deblurcli.colorfix import color_fix

    common = [photos / "rgba16.png", "--weights", tiny_model_folder, "--tile", "0",
              "--device", "cpu", "--fp32"]
    plain = run(common[0], tmp_path / "plain", *common[1:])
    fixed = run(common[0], tmp_path / "fixed", *common[1:], "--color-fix", "2")
    assert plain.exit_code == 0 and fixed.exit_code == 0, plain.output + fixed.output
    assert "colour fix sigma=2" in fixed.output
    source = read_image(photos / "rgba16.png").pixels
    expected = color_fix(read_image(tmp_path / "plain" / "rgba16.png").pixels, source, 2.0)
    got = read_image(tmp_path / "fixed" / "rgba16.png").pixels
    np.testing.assert_allclose(got, expected, atol=1e-3)  # 16-bit files: quantisation only
    assert np.abs(got - read_image(tmp_path / "plain" / "rgba16.png").pixels).max() > 1e-2


@pytest.mark.parametrize("args", [
    ["--gamma", "1.5"], ["--gamma", "-0.1"], ["--shard", "2/2"], ["--shard", "x"],
    ["--shard", "1"], ["--tile", "30"], ["--tile", "16", "--tile-overlap", "16"],
    ["--batch-size", "0"], ["--device", "gpu"], ["--dtype", "fp64"],
    ["--fp32", "--dtype", "fp16"], ["--ext", "gif"], ["--threads", "-1"],
    ["--color-fix", "-1"], ["--color-fix", "nan"],
])
def test_bad_flags_exit_2(photos, tmp_path, args):
    result = run(photos, tmp_path / "o", *args)
    assert result.exit_code == 2, result.output


def test_the_start_line_counts_what_is_left_to_do(tiny_model_folder, tmp_path):
    src = tmp_path / "few"
    for name in ("a.png", "b.png", "c.png"):
        write_image(src / name, np.random.default_rng(0).random((16, 16, 3), dtype=np.float32))
    out = tmp_path / "o"
    assert run(src / "a.png", out, "--weights", tiny_model_folder).exit_code == 0
    result = run(src, out, "--weights", tiny_model_folder)
    assert result.exit_code == 0, result.output
    assert "deblurring 2 file(s) (1 already done)" in result.stderr
    # entries that cannot be read are no outputs already done
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    write_image(src / "d.png", np.zeros((16, 16, 3), np.float32))
    result = run(src, out, "--weights", tiny_model_folder)
    assert "deblurring 1 file(s) (3 already done, 1 failing, see below)" in result.stderr, \
        result.stderr


def test_an_empty_shard_says_so(photos, tmp_path):
    """--shard 29/30 of 5 files said 'every output already exists' in a folder never made."""
    result = run(photos, tmp_path / "o", "--shard", "29/30", "--weights", tmp_path / "none")
    assert result.exit_code == 0
    assert "shard 29/30 holds no file of" in result.stdout and "already exists" not in \
        result.stdout


def test_missing_input_exits_1(tmp_path):
    result = run(tmp_path / "nope.png", tmp_path / "o")
    assert result.exit_code == 1 and "input not found" in result.output


def test_output_equal_to_input_is_refused_even_with_overwrite(photos, tiny_model_folder):
    result = run(photos, photos, "--weights", tiny_model_folder, "--overwrite")
    assert result.exit_code == 1 and "refusing to write" in result.output
    assert read_image(photos / "rgb.png").pixels.shape == (37, 45, 3)


def test_photos_in_formats_it_does_not_read_are_named_not_passed_over(photos, tmp_path):
    for name in ("IMG_1.DNG", "IMG_2.dng", "raw.cr2", "notes.txt"):
        (photos / name).write_bytes(b"x")
    result = run(photos, tmp_path / "o", "--weights", tmp_path / "no-model")
    assert "passing over 3 file(s) in formats deblurcli does not read: .cr2 (1), .dng (2)" in \
        " ".join(result.output.split())
    assert "notes.txt" not in result.output

    single = run(photos / "raw.cr2", tmp_path / "o3", "--weights", tmp_path / "no-model")
    assert single.exit_code == 1 and "convert them to JPEG, PNG or TIFF first" in \
        " ".join(single.output.split())

    only = tmp_path / "camera"
    only.mkdir()
    (only / "IMG_1.NEF").write_bytes(b"x")
    result = run(only, tmp_path / "o2", "--weights", tmp_path / "no-model")
    assert result.exit_code == 1 and "it holds .nef files, which deblurcli does not read" in \
        " ".join(result.output.split())

    # videos in formats it does not read get a video's advice, not a photo's
    (only / "IMG_1.NEF").rename(only / "clip.3gp")
    clip = " ".join(run(only / "clip.3gp", tmp_path / "o4", "--weights",
                        tmp_path / "no-model").output.split())
    assert "does not read .3gp files: convert them to MP4, MOV or MKV first" in clip
    (only / "IMG_1.NEF").write_bytes(b"x")
    mixed = " ".join(run(only, tmp_path / "o5", "--weights", tmp_path / "no-model").output.split())
    assert "convert the photos to JPEG, PNG or TIFF and the videos to MP4, MOV or MKV" in mixed


def test_missing_weights_folder_exits_1(photos, tmp_path):
    result = run(photos / "rgb.png", tmp_path / "o", "--weights", tmp_path / "none")
    assert result.exit_code == 1 and "model folder not found" in result.output


@pytest.mark.parametrize("damage,message", [
    ("delete", "missing file unet/diffusion_pytorch_model.safetensors"), ("corrupt", "corrupt")])
def test_missing_or_corrupt_weights_exit_1(photos, tiny_model_folder, tmp_path, damage, message):
    target = tiny_model_folder / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "delete":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    result = run(photos / "rgb.png", tmp_path / "o", "--weights", tiny_model_folder)
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "o" / "rgb.png").exists()


def test_no_weights_and_no_default_model_exits_1(photos, tmp_path, monkeypatch):
    import deblurcli.modelindex as mi

    monkeypatch.setattr(mi, "default_weights_dir", lambda: tmp_path / "packaged-weights")
    result = run(photos / "rgb.png", tmp_path / "o")
    assert result.exit_code == 1
    assert "no default model" in result.output and "--weights" in result.output


def test_dry_run_lists_the_plan_and_touches_nothing(photos, tiny_model_folder, tmp_path,
                                                   monkeypatch):
    """A line per file (written, skipped as existing, failing), a count, the exit status the
    run would end with; no model is loaded and OUTPUT is not created. The input guard and the
    model named still refuse as a run would."""
    import deblurcli.modelindex as mi

    out = tmp_path / "out"
    (photos / "link.png").symlink_to(tmp_path / "nowhere.png")  # a broken link: it would fail
    for weights in ("--weights", tmp_path / "no-model"), ():  # (it said "would process 4")
        monkeypatch.setattr(mi, "default_weights_dir", lambda: tmp_path / "packaged-weights")
        missing = run(photos, out, "--dry-run", *weights)
        assert missing.exit_code == 1 and "would process" not in missing.output
        assert "model folder not found" in missing.output or "no default model" in \
            missing.output, missing.output
    monkeypatch.undo()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    fetched = run(photos, out, "-n", "-w", "someone/model")  # (the cache only is looked at)
    assert "the run would fetch someone/model from the Hugging Face hub" in fetched.stderr
    result = run(photos, out, "--dry-run", "--weights", tiny_model_folder)
    lines = result.output.splitlines()
    assert result.exit_code == 1 and not out.exists()  # a fail line: exit 1, as the run would
    assert f"write  {out / 'rgb.png'}  (from {photos / 'rgb.png'})" in lines
    assert any(line.startswith(f"fail   {photos / 'link.png'}: broken symlink") for line in lines)
    assert lines[-1] == "dry run: would process 4, skip 0, fail 1; nothing was written"
    write_image(out / "grey.png", np.zeros((4, 4, 3), np.float32))
    (photos / "link.png").unlink()
    clean = run(photos, out, "-n", "-w", tiny_model_folder)
    assert clean.exit_code == 0, clean.output
    again = run(photos, out, "-n", "-r", "-w", tiny_model_folder).output.splitlines()
    assert f"skip   {out / 'grey.png'}  (exists; --overwrite replaces it)" in again
    assert f"write  {out / 'sub' / 'nested.jpg'}  (from {photos / 'sub' / 'nested.jpg'})" in again
    assert sorted(p.name for p in out.iterdir()) == ["grey.png"]
    refused = run(photos, photos, "--dry-run")
    assert refused.exit_code == 1 and "refusing to write" in refused.output
    (tmp_path / "a-file").write_text("")
    unwritable = run(photos, tmp_path / "a-file" / "out", "--dry-run")  # as a run would stop
    assert unwritable.exit_code == 1 and "a-file" in unwritable.output


def test_quiet_leaves_out_the_progress_lines_only(photos, tiny_model_folder, tmp_path):
    """train-* and eval took -q; deblur did not."""
    loud = run(photos / "rgb.png", tmp_path / "a", "--weights", tiny_model_folder)
    quiet = run(photos / "rgb.png", tmp_path / "b", "--weights", tiny_model_folder, "-q")
    assert loud.exit_code == quiet.exit_code == 0
    assert "images 1/1" in loud.stderr and "images" not in quiet.stderr
    assert "processed 1" in quiet.stdout and "deblurring 1 file(s)" in quiet.stderr


def test_an_output_named_like_a_photo_is_said_to_be_a_folder(photos, tiny_model_folder,
                                                             tmp_path):
    """`deblur photo.jpg sharp.jpg` made a folder sharp.jpg/ without a word."""
    result = run(photos / "rgb.png", tmp_path / "sharp.png", "-n")
    assert "sharp.png will be a folder (OUTPUT always is one)" in " ".join(result.stderr.split())
    assert "will be a folder" not in run(photos / "rgb.png", tmp_path / "out", "-n").stderr
    odd = run(photos / "rgb.png", tmp_path / "x[/].png", "-n", "-w", tiny_model_folder)  # markup
    assert odd.exit_code == 0 and "x[/].png will be a folder" in odd.stderr, odd.output


def test_ext_jpg_warns_once_that_transparency_is_lost(photos, tiny_model_folder, tmp_path):
    """rgba16.png came out as an RGB JPEG, its transparent areas opaque, without a word."""
    result = run(photos, tmp_path / "o", "--weights", tiny_model_folder, "--ext", "jpg",
                 "--tile", "0", "-q")
    text = " ".join(result.stderr.split())
    assert text.count("JPEG cannot store transparency") == 1
    assert (tmp_path / "o" / "rgba16.jpg").is_file()
    again = run(photos, tmp_path / "o2", "--weights", tiny_model_folder, "--tile", "0", "-q")
    assert "transparency" not in again.stderr  # --ext auto keeps each format (and its alpha)


def test_dry_run_keeps_a_line_per_file_whatever_the_names(tiny_model_folder, tmp_path):
    """A name holding a line break printed over two lines (and one of bytes that are no UTF-8
    printed them raw): a script reading the plan line by line misread it. Other names, with
    Unicode spaces or joiners, print as they are."""
    import os

    folder = tmp_path / "in"
    plain = ("Screenshot 10.00.00\u202fAM.png", "famille \U0001F468\u200d\U0001F469.png")
    for name in ("new\nline.png", *plain):
        write_image(folder / name, np.zeros((8, 8, 3), np.float32))
    with open(os.fsencode(folder) + b"/caf\xe9.png", "wb") as fh:
        fh.write((folder / plain[0]).read_bytes())
    (folder / "gone\n.png").symlink_to(tmp_path / "nowhere.png")  # a fail line names it twice
    result = run(folder, tmp_path / "out", "-n", "-w", tiny_model_folder)
    lines = result.stdout.splitlines()
    assert result.exit_code == 1 and len(lines) == 6, lines
    assert lines[-1].startswith("dry run: would process 4, skip 0, fail 1")
    out = tmp_path / "out"
    assert f"write  {out}/new\\nline.png  (from {folder}/new\\nline.png)" in lines
    assert f"write  {out}/caf\\udce9.png  (from {folder}/caf\\udce9.png)" in lines
    for name in plain:
        assert f"write  {out / name}  (from {folder / name})" in lines
    assert any(line.startswith(f"fail   {folder}/gone\\n.png: broken symlink") for line in lines)
