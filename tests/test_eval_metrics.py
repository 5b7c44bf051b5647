"""Metric wrappers: agreement with pyiqa's API, inf handling, offline weight checks, alignment."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from deblurcli.errors import DeblurcliError
from deblurcli.evaluation.align import align_to_reference
from deblurcli.evaluation.metrics import (
    METRICS,
    check_weights,
    create_metrics,
    fetch_missing,
    find_weight_file,
    list_metrics,
    parse_metric_names,
    summarise,
)
from deblurcli.images import read_image, write_image

CPU = torch.device("cpu")


@pytest.fixture()
def pair(tmp_path) -> tuple[Path, Path]:
    """An 8-bit sharp crop and a blurred, noisy version of it, as PNG files."""
    rng = np.random.default_rng(0)
    sharp = data.astronaut()[40:104, 180:260].astype(np.float32) / 255
    blurred = (sharp + np.roll(sharp, 2, axis=1) + np.roll(sharp, 4, axis=1)) / 3
    noisy = np.clip(blurred + rng.normal(0, 0.02, blurred.shape), 0, 1).astype(np.float32)
    write_image(tmp_path / "sharp.png", sharp)
    write_image(tmp_path / "pred.png", noisy)
    return tmp_path / "pred.png", tmp_path / "sharp.png"


def test_parse_metric_names():
    assert parse_metric_names(" PSNR, ssim,psnr ") == ["psnr", "ssim"]
    with pytest.raises(ValueError, match="unknown metric.*foo"):
        parse_metric_names("psnr,foo")
    with pytest.raises(ValueError):
        parse_metric_names(" , ")


def test_summarise_keeps_inf_out_of_the_mean():
    s = summarise([math.inf, 30.0, 32.0])
    assert s.mean == pytest.approx(31.0) and s.n == 3 and s.n_inf == 1
    only_inf = summarise([math.inf, math.inf])
    assert math.isnan(only_inf.mean) and only_inf.n_inf == 2


def test_identical_images_give_inf_psnr_and_unit_ssim(pair):
    psnr, ssim = create_metrics(["psnr", "ssim"], device=CPU)
    img = read_image(pair[1]).pixels
    assert math.isinf(psnr(img, img)) and psnr(img, img) > 0
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("y_channel", [False, True])
def test_scores_follow_the_published_conventions(pair, y_channel):
    """SSIM is MATLAB's ssim_index and scikit-image's (8-bit values, Gaussian window, valid
    positions): pyiqa's clamps the contrast term at zero and read up to 0.04 higher on blurred
    images. --y-channel is the Y of YCbCr as MATLAB's rgb2ycbcr gives it (BT.601, 16..235):
    pyiqa's default, YIQ's full-range Y, read 1.32 dB lower."""
    from skimage.metrics import structural_similarity

    pred, sharp = read_image(pair[0]).pixels, read_image(pair[1]).pixels
    rng = np.random.default_rng(1)  # a poor match too, where the clamp mattered
    poor = np.clip(pred + rng.normal(0, 0.15, pred.shape), 0, 1).astype(np.float32)
    psnr, ssim = create_metrics(["psnr", "ssim"], device=CPU, y_channel=y_channel)

    def matlab(x):  # what MATLAB's metric code sees: 8-bit values, or rgb2ycbcr's 8-bit Y
        x = np.round(x.astype(np.float64) * 255)
        return np.round(16 + x @ np.array([65.481, 128.553, 24.966]) / 255) if y_channel else x

    for image in (pred, poor):
        a, b = matlab(image), matlab(sharp)
        expected = structural_similarity(a, b, channel_axis=None if y_channel else 2,
                                         gaussian_weights=True, sigma=1.5, data_range=255,
                                         use_sample_covariance=False)
        assert ssim(image, sharp) == pytest.approx(expected, abs=1e-5)
        mse = np.mean((a - b) ** 2)
        # the Y is not rounded before PSNR (as BasicSR computes it): within 0.02 dB
        assert psnr(image, sharp) == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=0.02)
    assert ssim(poor, sharp) < ssim(pred, sharp) < 1


def test_psnr_matches_definition(pair):
    (psnr,) = create_metrics(["psnr"], device=CPU)
    a, b = read_image(pair[0]).pixels, read_image(pair[1]).pixels
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)


def test_missing_weights_name_the_file_and_nothing_is_downloaded_offline(empty_torch_home):
    check = check_weights(METRICS["niqe"])
    assert not check.ok
    assert "niqe_modelparameters.mat" in check.missing[0]
    assert str(empty_torch_home / "hub" / "pyiqa") in check.missing[0]
    warnings: list[str] = []
    metrics = create_metrics(["psnr", "lpips"], device=CPU, fetcher=None, warn=warnings.append)
    assert [m.name for m in metrics] == ["psnr"]
    assert len(warnings) == 1 and "LPIPS_v0.1_alex-df73285e.pth" in warnings[0]
    assert not any((empty_torch_home / "hub").rglob("*.pth"))  # nothing was downloaded


def test_missing_metrics_are_skipped_one_line_each_and_none_left_is_an_error(empty_torch_home):
    warnings: list[str] = []
    metrics = create_metrics(["psnr", "dists", "musiq"], device=CPU, warn=warnings.append)
    assert [m.name for m in metrics] == ["psnr"]
    assert len(warnings) == 2 and "DISTS_weights-f5e65c96.pth" in warnings[0]
    assert all("\n" not in w and "--fetch-metrics" in w for w in warnings)
    with pytest.raises(DeblurcliError, match="no metric could run"):
        create_metrics(["clipiqa"], device=CPU)


def test_a_damaged_weight_file_skips_its_metric_and_says_which_file(empty_torch_home, tmp_path):
    """A garbage niqe_modelparameters.mat stopped the whole evaluation with "MatReadError: Mat
    file appears to be truncated", naming neither the metric nor the file."""
    (tmp_path / "pyiqa").mkdir()
    damaged = tmp_path / "pyiqa" / "niqe_modelparameters.mat"
    damaged.write_bytes(b"garbage\n")
    warnings: list[str] = []
    reasons: dict[str, str] = {}
    metrics = create_metrics(["psnr", "niqe"], device=CPU, weights_dir=tmp_path,
                             warn=warnings.append, skipped_reasons=reasons)
    assert [m.name for m in metrics] == ["psnr"]
    assert len(warnings) == 1 and warnings[0].startswith(f"metric niqe skipped: cannot load "
                                                         f"{damaged} (")
    assert "--fetch-metrics niqe" in warnings[0] and list(reasons) == ["niqe"]
    with pytest.raises(DeblurcliError, match="no metric could run \\(niqe skipped\\)"):
        create_metrics(["niqe"], device=CPU, weights_dir=tmp_path)


def test_a_metric_that_fails_to_build_for_want_of_memory_is_not_blamed_on_its_file(
        empty_torch_home, tmp_path, monkeypatch):
    """A GPU out of memory while a metric was built said "delete the damaged file"."""
    import pyiqa

    (tmp_path / "pyiqa").mkdir()
    (tmp_path / "pyiqa" / "niqe_modelparameters.mat").write_bytes(b"fine, say")

    class OutOfMemoryError(RuntimeError):
        pass

    def busy(*args, **kwargs):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(pyiqa, "create_metric", busy)
    warnings: list[str] = []
    for names in (["niqe"], ["psnr"]):  # (psnr has no file to blame)
        with pytest.raises(OutOfMemoryError):
            create_metrics(names, device=CPU, weights_dir=tmp_path, warn=warnings.append)
    assert warnings == []


def test_the_fetcher_is_asked_for_each_missing_file(empty_torch_home):
    asked = []

    def fake(item):
        asked.append(item)
        path = empty_torch_home / "hub" / item.folder / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return path

    check = check_weights(METRICS["dists"])
    new, reason = fetch_missing(METRICS["dists"], check, fake)
    assert reason is None and new.ok
    assert [item.name for item in asked] == ["DISTS_weights-f5e65c96.pth", "vgg16-397923af.pth"]


def test_metric_weights_dir_layouts(empty_torch_home, tmp_path):
    nested, flat = tmp_path / "nested", tmp_path / "flat"
    (nested / "pyiqa").mkdir(parents=True)
    flat.mkdir()
    (nested / "pyiqa" / "niqe_modelparameters.mat").write_bytes(b"x")
    (flat / "niqe_modelparameters.mat").write_bytes(b"x")
    wf = METRICS["niqe"].weights[0]
    assert find_weight_file(wf, nested) == nested / "pyiqa" / "niqe_modelparameters.mat"
    assert find_weight_file(wf, flat) == flat / "niqe_modelparameters.mat"
    assert find_weight_file(wf, None) is None
    # torchvision / CLIP backbones are only found in the hub layout (DIR/checkpoints/, DIR/clip/)
    (flat / "RN50.pt").write_bytes(b"x")
    assert find_weight_file(METRICS["clipiqa"].weights[0], flat) is None
    (nested / "clip").mkdir()
    (nested / "clip" / "RN50.pt").write_bytes(b"x")
    assert find_weight_file(METRICS["clipiqa"].weights[0], nested) == nested / "clip" / "RN50.pt"
    rows = {r.name: r for r in list_metrics(nested)}
    assert rows["niqe"].available and not rows["lpips"].available and rows["psnr"].available
    assert rows["clipiqa"].available
    assert rows["lpips"].kind == "FR" and rows["lpips"].arrow == "↓" and rows["musiq"].arrow == "↑"


def _niqe_weights(tmp_path: Path) -> Path:
    """The folder to pass as --metric-weights, from DEBLURCLI_TEST_NIQE_WEIGHTS (file or folder)."""
    given = Path(os.environ["DEBLURCLI_TEST_NIQE_WEIGHTS"])
    if given.is_dir():
        return given
    folder = tmp_path / "niqe-weights"
    folder.mkdir()
    shutil.copy(given, folder / "niqe_modelparameters.mat")
    return folder


@pytest.mark.skipif(not os.environ.get("DEBLURCLI_TEST_NIQE_WEIGHTS"),
                    reason="DEBLURCLI_TEST_NIQE_WEIGHTS (niqe_modelparameters.mat) not set")
def test_niqe_matches_pyiqa_with_offline_weights(tmp_path, empty_torch_home):
    import pyiqa

    folder = _niqe_weights(tmp_path)
    (niqe,) = create_metrics(["niqe"], device=CPU, weights_dir=folder)
    path = find_weight_file(METRICS["niqe"].weights[0], folder)
    img = data.astronaut()[::2, ::2].astype(np.float32) / 255   # 256x256
    write_image(tmp_path / "a.png", img)
    ours = niqe(read_image(tmp_path / "a.png").pixels)
    ref = float(pyiqa.create_metric("niqe", device=CPU, pretrained_model_path=str(path))(
        str(tmp_path / "a.png")))
    assert ours == pytest.approx(ref, rel=1e-5)
    assert 0 < ours < 100


def test_alignment_recovers_a_translation_and_gain():
    img = data.astronaut()[60:188, 150:278].astype(np.float32) / 255
    ref = img[8:-8, 8:-8]
    shifted = (np.roll(np.roll(img, 3, axis=0), -5, axis=1)[8:-8, 8:-8] * 0.8).astype(np.float32)
    al = align_to_reference(shifted, ref, max_shift=8)
    assert (al.dy, al.dx) == (3, -5)
    assert al.pred.shape == al.ref.shape == (112 - 3, 112 - 5, 3)
    assert 1.1 < al.scale < 1.35 and al.ncc > 0.99
    same = align_to_reference(ref, ref, max_shift=4)
    assert (same.dy, same.dx) == (0, 0) and same.pred.shape == ref.shape
    assert np.allclose(same.pred, ref, atol=1e-6)
    flat = np.full((20, 20, 3), 0.5, np.float32)
    assert (align_to_reference(flat, flat, 3).dy, align_to_reference(flat, flat, 3).dx) == (0, 0)
    # a flat prediction of a detailed image: the rounding left in its variance found a shift
    flat = np.full((40, 40, 3), 0.5, np.float32)
    detailed = img[:40, :40]
    al = align_to_reference(flat, detailed, 8)
    assert (al.dy, al.dx) == (0, 0) and al.pred.shape == detailed.shape


def test_hub_dir_override_is_scoped(tmp_path, empty_torch_home, monkeypatch):
    from deblurcli.evaluation.metrics import _hub_dir

    before = torch.hub.get_dir()
    assert before == str(empty_torch_home / "hub")
    with _hub_dir(tmp_path):
        assert torch.hub.get_dir() == str(tmp_path)
    assert torch.hub.get_dir() == before
    with pytest.raises(RuntimeError), _hub_dir(tmp_path):
        raise RuntimeError("boom")
    assert torch.hub.get_dir() == before
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))  # $TORCH_HOME still followed
    assert torch.hub.get_dir() == str(tmp_path / "elsewhere" / "hub")


def test_psnr_and_ssim_without_pyiqa_match_scikit_image(pair):
    """The PSNR/SSIM that training's validation, the scripts and the benchmarks use."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from deblurcli.evaluation.metrics import psnr, ssim

    pred, sharp = (read_image(p).pixels for p in pair)
    assert psnr(pred, sharp) == pytest.approx(peak_signal_noise_ratio(sharp, pred, data_range=1.0),
                                              abs=1e-6)
    expected = structural_similarity(sharp, pred, data_range=1.0, channel_axis=2,
                                     gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim(pred, sharp) == pytest.approx(expected, abs=2e-3)
    as_tensor = [torch.from_numpy(p.transpose(2, 0, 1).copy())[None] for p in (pred, sharp)]
    assert psnr(*as_tensor) == pytest.approx(psnr(pred, sharp), abs=1e-6)
    assert ssim(*as_tensor) == pytest.approx(ssim(pred, sharp), abs=1e-6)
    assert math.isinf(psnr(sharp, sharp)) and ssim(sharp, sharp) == pytest.approx(1.0, abs=1e-6)


def test_niqe_says_its_smallest_image_before_pyiqa_fails_on_it():
    import numpy as np

    from deblurcli.evaluation.metrics import METRICS, Metric

    def never(*args):
        raise AssertionError("the network must not see the image")

    metric = Metric(METRICS["niqe"], never, "cpu")
    with pytest.raises(ValueError, match="niqe needs images of at least 96x96 pixels, this one "
                                         "is 128x95"):
        metric(np.zeros((95, 128, 3), np.float32))


def test_a_score_given_as_nan_is_warned_about_like_a_failure():
    """A metric returning nan without an error (NIQE on a flat image) lowered its count
    without a word."""
    from deblurcli.evaluation.runner import ImageScore, RowResult, _finish_row

    row = RowResult(label="input", gamma=None)
    row.images = [ImageScore("a", {"niqe": 4.0}), ImageScore("b", {"niqe": math.nan})]
    said: list[str] = []
    _finish_row(row, ["niqe"], 0.1, CPU, {}, said.append)
    assert said == ["niqe gave no score (nan) for 1 of 2 image(s) of input; they are left out "
                    "of its mean"]
    assert row.summary["niqe"].n_scored == 1 and row.summary["niqe"].mean == 4.0
