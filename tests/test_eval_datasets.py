"""Test-set layouts (GoPro, RealBlur lists, folders), pairing errors and scoring of tiny sets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deblurcli.errors import DatasetError, ImageReadError
from deblurcli.evaluation.datasets import (
    build_set,
    folder_set,
    gopro_set,
    match_predictions,
    realblur_set,
)
from deblurcli.evaluation.runner import EvalConfig, run_evaluation
from deblurcli.images import read_image, write_image

ASTRO = data.astronaut().astype(np.float32) / 255


def _crop(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    return ASTRO[20 + 30 * i: 20 + 30 * i + h, 100 + 25 * i: 100 + 25 * i + w]


def _blur(img: np.ndarray) -> np.ndarray:
    return ((img + np.roll(img, 1, axis=1) + np.roll(img, 2, axis=1)) / 3).astype(np.float32)


@pytest.fixture()
def gopro_root(tmp_path) -> Path:
    """GOPRO_Large-style: ROOT/test/<seq>/{blur,sharp}/NNNNNN.png, names repeating across seqs."""
    root = tmp_path / "GOPRO_Large"
    i = 0
    for seq in ("GOPR0384_11_00", "GOPR0385_11_01"):
        for name in ("000001.png", "000002.png"):
            write_image(root / "test" / seq / "sharp" / name, _crop(i))
            write_image(root / "test" / seq / "blur" / name, _blur(_crop(i)))
            i += 1
    (root / "train").mkdir()
    return root


@pytest.fixture()
def realblur_root(tmp_path) -> Path:
    """RealBlur-style: official list file of '<gt> <blur>' lines relative to ROOT."""
    root = tmp_path / "RealBlur"
    base = "RealBlur-J_ECC_IMCORR_centroid_itensity_ref"
    lines = []
    for i, (scene, idx) in enumerate((("scene230", 1), ("scene230", 7), ("scene231", 1))):
        gt = f"{base}/{scene}/gt/gt_{idx}.png"
        blur = f"{base}/{scene}/blur/blur_{idx}.png"
        write_image(root / gt, _crop(i))
        write_image(root / blur, _blur(_crop(i)))
        lines.append(f"{gt} {blur}")
    (root / "RealBlur_J_test_list.txt").write_text("\n".join(lines) + "\n")
    return root


def _config(**kw) -> EvalConfig:
    return EvalConfig(metrics=("psnr", "ssim"), device="cpu", **kw)


def test_gopro_layout_pairs_by_sequence_and_name(gopro_root):
    s = gopro_set(gopro_root)
    assert s.name == "gopro" and len(s) == 4 and s.has_reference
    assert [p.key for p in s.pairs] == ["GOPR0384_11_00/000001", "GOPR0384_11_00/000002",
                                        "GOPR0385_11_01/000001", "GOPR0385_11_01/000002"]
    p = s.pairs[2]
    assert p.blur.parent.name == "blur" and p.sharp.parent.name == "sharp"
    assert p.blur.parent.parent.name == p.sharp.parent.parent.name == "GOPR0385_11_01"


def test_gopro_scores_equal_a_direct_computation(gopro_root):
    result = run_evaluation(gopro_set(gopro_root), _config())
    (row,) = result.rows
    assert row.label == "input" and len(row.images) == 4
    expected_psnr, expected_ssim = [], []
    for pair in gopro_set(gopro_root).pairs:
        a, b = read_image(pair.blur).pixels, read_image(pair.sharp).pixels
        expected_psnr.append(peak_signal_noise_ratio(b, a, data_range=1.0))
        expected_ssim.append(structural_similarity(b, a, data_range=1.0, channel_axis=2,
                                                   gaussian_weights=True, sigma=1.5,
                                                   use_sample_covariance=False))
    assert row.summary["psnr"].mean == pytest.approx(np.mean(expected_psnr), abs=1e-3)
    # pyiqa's SSIM follows the MATLAB reference (and downsampling off); close to skimage's
    assert row.summary["ssim"].mean == pytest.approx(np.mean(expected_ssim), abs=0.02)


def test_gopro_pred_folder_mirrored_or_compact(gopro_root, tmp_path):
    s = gopro_set(gopro_root)
    compact, mirrored = tmp_path / "compact", tmp_path / "mirrored"
    for pair in s.pairs:
        seq, name = pair.key.split("/")
        write_image(compact / seq / f"{name}.png", read_image(pair.sharp).pixels)
        write_image(mirrored / seq / "blur" / f"{name}.png", read_image(pair.sharp).pixels)
    for folder in (compact, mirrored):
        files = match_predictions(s, folder)
        assert [f.parent.parent.name if f.parent.name == "blur" else f.parent.name
                for f in files] == [p.key.split("/")[0] for p in s.pairs]
    result = run_evaluation(s, _config(pred=compact))
    assert [r.label for r in result.rows] == ["input", "pred"]
    pred = result.rows[1]
    assert pred.summary["psnr"].n_inf == 4 and math.isnan(pred.summary["psnr"].mean)
    assert pred.summary["ssim"].mean == pytest.approx(1.0, abs=1e-6)
    # GoPro names repeat across sequences: a flat folder cannot be paired and says so
    flat = tmp_path / "flat"
    write_image(flat / "000001.png", _crop(0))
    with pytest.raises(DatasetError, match=r"no prediction .* for 4 image\(s\)"):
        match_predictions(s, flat)


def test_realblur_list_and_prediction_names(realblur_root, tmp_path):
    s = realblur_set(realblur_root, "J")
    assert s.name == "realblur-j"
    assert [p.key for p in s.pairs] == ["scene230/blur_1", "scene230/blur_7", "scene231/blur_1"]
    assert all(p.sharp.name.startswith("gt_") and p.blur.name.startswith("blur_") for p in s.pairs)
    pred = tmp_path / "pred"   # official result naming: <scene>_<index>.png
    for pair in s.pairs:
        scene, stem = pair.key.split("/")
        write_image(pred / f"{scene}_{stem.split('_')[1]}.png", read_image(pair.sharp).pixels)
    assert [f.name for f in match_predictions(s, pred)] == ["scene230_1.png", "scene230_7.png",
                                                           "scene231_1.png"]
    with pytest.raises(DatasetError, match="RealBlur_R_test_list.txt"):
        realblur_set(realblur_root, "R")


def test_realblur_missing_listed_file(realblur_root):
    victim = next(realblur_root.rglob("gt_7.png"))
    victim.unlink()
    with pytest.raises(DatasetError, match=r"missing: .*gt_7.png \(1 in all\)"):
        realblur_set(realblur_root, "J")


def test_realblur_align_compensates_a_shift(realblur_root, tmp_path):
    s = realblur_set(realblur_root, "J")
    pred = tmp_path / "pred"
    for pair in s.pairs:   # the ground truth shifted by (2, -3) px: misaligned but sharp
        shifted = np.roll(np.roll(read_image(pair.sharp).pixels, 2, axis=0), -3, axis=1)
        write_image(pred / f"{pair.key}.png", shifted)
    plain = run_evaluation(s, _config(pred=pred, include_input=False)).rows[0]
    aligned = run_evaluation(s, _config(pred=pred, include_input=False, align=True,
                                        max_shift=5)).rows[0]
    assert all(im.shift == (2, -3) for im in aligned.images)
    assert plain.images[0].shift is None
    assert aligned.summary["psnr"].mean > plain.summary["psnr"].mean + 10
    assert aligned.summary["ssim"].mean > 0.99 > plain.summary["ssim"].mean


def test_folder_pairs_by_relative_path_not_order(tmp_path):
    blur, sharp = tmp_path / "blur", tmp_path / "sharp"
    write_image(blur / "sub" / "a.png", _crop(0))
    write_image(sharp / "sub" / "a.png", _crop(0))
    write_image(blur / "b.jpg", _crop(1))       # suffixes may differ
    write_image(sharp / "b.png", _crop(1))
    s = folder_set(blur, sharp)
    assert [p.key for p in s.pairs] == ["b", "sub/a"]
    assert s.pairs[0].blur.suffix == ".jpg" and s.pairs[0].sharp.suffix == ".png"
    # same counts, different names: an error, never a pairing by sort order
    write_image(blur / "c.png", _crop(2))
    write_image(sharp / "d.png", _crop(2))
    with pytest.raises(DatasetError, match=r"blurry image\(s\) .* no sharp .*: c \(1 in all\).*"
                                           r"sharp image\(s\) .* no blurry .*: d \(1 in all\)"):
        folder_set(blur, sharp)


def test_names_in_either_unicode_form_pair_and_a_file_is_not_a_folder(tmp_path):
    """café.png from macOS (decomposed) against café.png (composed): "no sharp counterpart:
    café ... no blurry counterpart: café", the two names printed alike. --blur FILE said the
    folder "does not exist"."""
    import unicodedata

    blur, sharp = tmp_path / "blur", tmp_path / "sharp"
    write_image(blur / (unicodedata.normalize("NFD", "café") + ".png"), _crop(0))
    write_image(sharp / (unicodedata.normalize("NFC", "café") + ".png"), _crop(0))
    (pair,) = folder_set(blur, sharp).pairs
    assert pair.key == unicodedata.normalize("NFC", "café") and pair.blur.parent == blur
    with pytest.raises(DatasetError, match=r"blur folder .*\.png is a file; give the folder"):
        folder_set(pair.blur, sharp)


def test_unmatched_listing_is_capped(tmp_path):
    blur, sharp = tmp_path / "blur", tmp_path / "sharp"
    img = _crop(0, 16, 16)
    for i in range(8):
        write_image(blur / f"x{i}.png", img)
    write_image(sharp / "x0.png", img)
    with pytest.raises(DatasetError, match=r"x1, x2, x3, x4, x5 and 2 more \(7 in all\)"):
        folder_set(blur, sharp)


def test_suffix_clash_is_an_error(tmp_path):
    write_image(tmp_path / "blur" / "a.png", _crop(0, 16, 16))
    write_image(tmp_path / "blur" / "a.jpg", _crop(0, 16, 16))
    with pytest.raises(DatasetError, match="differ only in suffix"):
        folder_set(tmp_path / "blur")


def test_synth_layout_and_option_errors(tmp_path):
    out = tmp_path / "pairs"
    write_image(out / "blur" / "p0.png", _crop(0, 16, 16))
    write_image(out / "sharp" / "p0.png", _crop(0, 16, 16))
    synth = build_set("synth", out, None, None)
    assert len(synth) == 1 and synth.name == "synth"  # it was reported as "folders"
    assert len(build_set(None, None, out / "blur", out / "sharp")) == 1
    no_ref = build_set(None, None, out / "blur", None)
    assert not no_ref.has_reference and no_ref.name == "no-reference"
    with pytest.raises(DatasetError, match="--root"):
        build_set("gopro", None, None, None)
    with pytest.raises(DatasetError, match="not both"):
        build_set("gopro", out, out / "blur", None)
    with pytest.raises(DatasetError, match="needs --blur"):
        build_set(None, None, None, out / "sharp")
    with pytest.raises(DatasetError, match="no GoPro test sequences"):
        build_set("gopro", out / "blur", None, None)


def test_no_reference_set_rejects_full_reference_metrics(tmp_path):
    write_image(tmp_path / "blur" / "a.png", _crop(0, 16, 16))
    with pytest.raises(DatasetError, match="full-reference metric.*psnr"):
        run_evaluation(folder_set(tmp_path / "blur"), _config())


def test_size_mismatch_is_reported(tmp_path):
    write_image(tmp_path / "blur" / "a.png", _crop(0, 16, 16))
    write_image(tmp_path / "sharp" / "a.png", _crop(0, 16, 24))
    with pytest.raises(DatasetError, match=r"a: the images of this pair differ in size \(its "
                       r"blurry image 16x16, its ground truth 24x16\)"):
        run_evaluation(folder_set(tmp_path / "blur", tmp_path / "sharp"), _config())


def test_without_ground_truth_a_prediction_may_have_its_own_size(tmp_path):
    """No-reference metrics score each image alone: a 2x upscaled output, say, is fine."""
    from deblurcli.evaluation.runner import check_sizes

    write_image(tmp_path / "blur" / "a.png", _crop(0, 16, 16))
    write_image(tmp_path / "pred" / "a.png", _crop(0, 32, 24))
    check_sizes(folder_set(tmp_path / "blur"), [tmp_path / "pred" / "a.png"])
    (tmp_path / "pred" / "a.png").write_bytes(b"not an image")  # still read, header and all
    with pytest.raises(ImageReadError, match="a.png"):
        check_sizes(folder_set(tmp_path / "blur"), [tmp_path / "pred" / "a.png"])


def test_a_metric_that_cannot_score_an_image_leaves_the_others(tmp_path, monkeypatch):
    """NIQE on a 64x64 image raised from inside pyiqa and stopped the whole evaluation, PSNR and
    SSIM included; now that image gets nan for that metric alone, with one warning."""
    from deblurcli.evaluation import metrics

    real_call = metrics.Metric.__call__

    def small_fails(self, pred, ref=None):
        if self.name == "ssim" and pred.shape[0] < 32:
            raise RuntimeError("Expected 3D or 4D (batch mode) tensor, got: [1, 1, 0, 0]")
        return real_call(self, pred, ref)

    monkeypatch.setattr(metrics.Metric, "__call__", small_fails)
    for name, size in (("big", (48, 64)), ("small", (16, 16))):
        write_image(tmp_path / "sharp" / f"{name}.png", _crop(0, *size))
        write_image(tmp_path / "blur" / f"{name}.png", _blur(_crop(0, *size)))
    warnings: list[str] = []
    result = run_evaluation(folder_set(tmp_path / "blur", tmp_path / "sharp"), _config(),
                            warn=warnings.append)
    row = result.rows[0]
    scores = {im.key: im.scores for im in row.images}
    assert math.isnan(scores["small"]["ssim"]) and math.isfinite(scores["small"]["psnr"])
    assert row.summary["ssim"].mean == pytest.approx(scores["big"]["ssim"])
    assert warnings == ["ssim could not score 1 of 2 image(s) of input (e.g. small: Expected 3D "
                        "or 4D (batch mode) tensor, got: [1, 1, 0, 0]); they are left out of its "
                        "mean"]


def test_running_out_of_memory_is_not_blamed_on_the_image(tmp_path, monkeypatch):
    from deblurcli.evaluation import metrics

    def no_memory(self, pred, ref=None):
        raise MemoryError

    monkeypatch.setattr(metrics.Metric, "__call__", no_memory)
    write_image(tmp_path / "sharp" / "a.png", _crop(0))
    write_image(tmp_path / "blur" / "a.png", _blur(_crop(0)))
    with pytest.raises(MemoryError):
        run_evaluation(folder_set(tmp_path / "blur", tmp_path / "sharp"), _config(),
                       warn=lambda m: None)
